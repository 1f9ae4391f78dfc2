"""``qaflow web``: the web daemon (tornado + aio-pika + motor, one process, asyncio).

* ``/ws`` -- WebSocket in the DIFF / QAUTLRA-RS shape (see ``docs/web.md``)::

      -> {"aid": "subscribe_quote", "ins_list": "rb2605,SHFE.au2606"}
      <- {"aid": "subscribe_quote_result", "ins_list": ["SHFE.rb2605", ...], "ignored": {...}}
      <- {"aid": "rtn_data", "data": [{"quotes": {"SHFE.rb2605": {...full quote...}}}]}
      <- {"aid": "rtn_data", "data": [{"quotes": {"SHFE.rb2605": {"last_price": 3901}}}]}
      -> {"aid": "subscribe_account", "accounts": "acc1,acc2", "token": "..."}
      <- {"aid": "subscribe_account_result", "accounts": ["acc1"], "ignored": {"acc2": "..."}}
      <- {"aid": "rtn_data", "data": [{"trade": {"acc1": {"accounts": {...}, "orders": {...}}}}]}

  Changes are batched per client (every 100 ms or 50 changes), coalesced while the
  previous message is unwritten, and a client that stays behind is closed (1013 + reason).
  Ticks come from one bounded live queue on ``qa.tick`` bound to the union of subscribed
  instruments; account data from a live queue on ``qa.report`` (``<account>.*``) and a
  tap on ``qaorder`` (orders as sent), bound per subscribed account.
* REST (JSON): ``/api/accounts``, ``/api/accounts/<a>``, ``/api/orders?account=``,
  ``/api/bars?symbol=&exchange=&freq=&count=``, ``/api/follow``, ``/api/risk``,
  ``POST /api/orders`` (token), ``/healthz``, ``/readyz``, ``/metrics``.
* ``/`` -- the dashboard (``handlers/static``: plain HTML/JS/CSS, no build step).

Tokens: ``QA_WEB_TOKENS`` (``{"token": ["acc1"]}`` or ``tok=acc1+acc2;tok2=*``) or
``QA_WEB_TOKEN`` (all accounts). Without any, reads are open and writes are refused.
"""
from __future__ import annotations

import argparse
import json
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from handlers.webdiff import (
    ClientState, QuoteBook, Subscriptions, Tokens, TokenError, instrument_key, parse_accounts, parse_ins_list,
    quote_of, rtn_data,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_INSTRUMENTS_PER_CLIENT = 500
MAX_ACCOUNTS_PER_CLIENT = 100
SEND_BUFFER = 256 * 1024     # SO_SNDBUF of each WebSocket (bytes)
FLUSH_TICK = 0.01            # the batcher looks at every client this often (s)
_json = msgspec.json.Encoder()
_ENVELOPE = ("schema", "version", "id")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Web daemon: WebSocket quotes and accounts, REST API, dashboard."
    parser.add_argument("--host", default=os.environ.get("QA_WEB_HOST", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; QA_WEB_HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("QA_WEB_PORT", "8010")),
                        help="port (default 8010; QA_WEB_PORT; 0 = any free port, printed at start)")
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--interval", type=float, default=0.1, help="batch interval in seconds (default 0.1)")
    parser.add_argument("--max-changes", type=int, default=2000,
                        help="send a batch early at this many distinct pending fields (default 2000; a field "
                             "changed again before the batch leaves counts once)")
    parser.add_argument("--deflate", action=argparse.BooleanOptionalAction,
                        default=os.environ.get("QA_WEB_DEFLATE", "1") not in ("0", "false", "no"),
                        help="offer permessage-deflate on /ws (default on; QA_WEB_DEFLATE=0 turns it off)")
    parser.add_argument("--drop-after", type=float, default=5.0,
                        help="close a client whose previous message is unwritten after this many seconds")
    parser.add_argument("--queue-max", type=int, default=10_000, help="x-max-length of the live tick queue")


# ------------------------------------------------------------------------------------------ metrics
class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.consumed = Counter("qaflow_web_consumed", "messages consumed from the broker", ["stream"], registry=r)
        self.published = Counter("qaflow_web_published", "orders published to qaorder", registry=r)
        self.rejected = Counter("qaflow_web_rejected", "POST /api/orders refused (validation or auth)", registry=r)
        self.ws_clients = Gauge("qaflow_web_ws_clients", "connected WebSocket clients", registry=r)
        self.dropped = Counter("qaflow_web_dropped_clients", "clients closed for being too slow", registry=r)
        self.sent_messages = Counter("qaflow_web_ws_messages_sent", "rtn_data messages sent", ["mode"], registry=r)
        self.sent_bytes = Counter("qaflow_web_ws_bytes_sent", "bytes of rtn_data JSON sent (before compression)",
                                  ["mode"], registry=r)
        self.wire_bytes = Counter("qaflow_web_ws_wire_bytes_sent",
                                  "bytes written to WebSocket sockets (frames, after permessage-deflate if agreed)",
                                  ["mode", "deflate"], registry=r)
        self.coalesced = Counter("qaflow_web_coalesced", "changes overwritten before they were sent", registry=r)
        self.lag = Histogram("qaflow_web_tick_lag_seconds", "tick publish -> web consume (tick ts to now)",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.instruments = Gauge("qaflow_web_instruments", "instruments bound on qa.tick", registry=r)


# ------------------------------------------------------------------------------------------ hub
class Client:
    """One WebSocket connection as the hub sees it (the handler is a thin shell around it)."""

    __slots__ = ("handler", "state", "full", "accounts_token", "closed", "deflate", "__weakref__")

    def __init__(self, handler: Any, state: ClientState) -> None:
        self.handler = handler
        self.state = state
        self.full = False        # "mode": "full": whole quotes every time (baseline, simple clients)
        self.accounts_token: str | None = None
        self.closed = False
        self.deflate = False     # permessage-deflate agreed with this client


def resolve_instrument(word: str) -> tuple[str, str]:
    """``"rb2605"`` / ``"SHFE.rb2605"`` -> ``("SHFE", "rb2605")``; ValueError if unknown."""
    from qamarket.models import EXCHANGES, UnknownInstrument, spec_for
    from qapubsub import keys

    if "." in word:
        ex, _, sym = word.partition(".")
        ex = ex.upper()
        if ex not in EXCHANGES:
            raise ValueError(f"unknown exchange {ex!r}")
    else:
        sym = word
        try:
            ex = spec_for(sym).exchange
        except UnknownInstrument:
            raise ValueError("unknown instrument: write it as EXCHANGE.symbol") from None
    keys.tick_key(ex, sym)   # raises on a word that is not a valid routing-key word
    return ex, sym


class Hub:
    """State shared by every handler: clients, subscriptions, the quote book, AMQP and MongoDB."""

    def __init__(self, settings: Any, topo: Any, tokens: Tokens, *, interval: float = 0.1, max_changes: int = 2000,
                 drop_after: float = 5.0, queue_max: int = 10_000, mongo_timeout_ms: int = 2000,
                 deflate: bool = True) -> None:
        self.settings = settings
        self.topo = topo
        self.tokens = tokens
        self.interval, self.max_changes, self.drop_after = interval, max_changes, drop_after
        self.queue_max = queue_max
        self.deflate = deflate
        self.metrics = Metrics()
        self.book = QuoteBook()
        self.clients: dict[Client, None] = {}
        self.quote_subs = Subscriptions()
        self.account_subs = Subscriptions()
        self.conn: Any = None
        self.tick_consumer: Any = None
        self.report_consumer: Any = None
        self.publisher: Any = None
        self._bind_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        import motor.motor_asyncio

        self.mongo = motor.motor_asyncio.AsyncIOMotorClient(settings.mongo_url, serverSelectionTimeoutMS=mongo_timeout_ms,
                                                           connectTimeoutMS=mongo_timeout_ms)
        self.db = self.mongo[settings.mongo_db]

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        from qamarket.models import Tick, TickBatch
        from qapubsub.aio import CommandPublisher, Connection, Consumer

        self.conn = Connection(self.settings.amqp_urls, name="qaflow-web")
        await self.conn.start(timeout=15)
        await self.conn.declare(exchanges=[self.topo.exchange(self.topo.tick), self.topo.exchange(self.topo.report),
                                           self.topo.exchange(self.topo.order), self.topo.exchange(self.topo.unroutable)],
                                queues=[])
        self.tick_consumer = await Consumer(self.conn, self.topo.live_queue("", max_length=self.queue_max), self._on_tick,
                                            type_=Tick | TickBatch, prefetch=1000, ack_every=100).start()
        self.report_consumer = await Consumer(self.conn, self.topo.live_queue("", max_length=self.queue_max),
                                              self._on_report, prefetch=200, ack_every=20).start()
        self.publisher = await CommandPublisher(self.conn).start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="qaflow-web-flusher")

    async def close(self) -> None:
        for c in list(self.clients):
            with contextlib.suppress(Exception):
                c.handler.close(1001, "server shutting down")
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        if self.conn is not None:
            await self.conn.close()
        self.mongo.close()

    # -- clients ------------------------------------------------------------------------
    def add_client(self, handler: Any) -> Client:
        c = Client(handler, ClientState(interval=self.interval, max_changes=self.max_changes,
                                        drop_after=self.drop_after))
        self.clients[c] = None
        self.metrics.ws_clients.set(len(self.clients))
        return c

    async def remove_client(self, c: Client) -> None:
        if c.closed:
            return
        c.closed = True
        self.clients.pop(c, None)
        self.metrics.ws_clients.set(len(self.clients))
        await self._apply_quote_bindings(set(), self.quote_subs.remove(c))
        await self._apply_account_bindings(set(), self.account_subs.remove(c))

    async def subscribe_quotes(self, c: Client, ins_list: Iterable[str], *, full: bool = False) -> dict[str, Any]:
        wanted: list[str] = []
        ignored: dict[str, str] = {}
        for word in ins_list:
            try:
                ex, sym = resolve_instrument(word)
            except ValueError as exc:
                ignored[word] = str(exc)
                continue
            wanted.append(instrument_key(ex, sym))
        if len(wanted) > MAX_INSTRUMENTS_PER_CLIENT:
            for w in wanted[MAX_INSTRUMENTS_PER_CLIENT:]:
                ignored[w] = f"more than {MAX_INSTRUMENTS_PER_CLIENT} instruments"
            wanted = wanted[:MAX_INSTRUMENTS_PER_CLIENT]
        c.full = full
        before = self.quote_subs.keys(c)
        to_bind, to_unbind = self.quote_subs.set(c, wanted)
        await self._apply_quote_bindings(to_bind, to_unbind)
        # snapshot of what is known, for instruments new to this client (DIFF: first full)
        now = time.monotonic()
        snap = {k: dict(q) for k in wanted if k not in before and (q := self.book.get(k)) is not None}
        gone = {k: None for k in before - set(wanted)}
        if snap or gone:
            c.state.add({"quotes": {**snap, **gone}}, now, urgent=True)
        return {"aid": "subscribe_quote_result", "ins_list": wanted, "ignored": ignored}

    async def subscribe_accounts(self, c: Client, accounts: Iterable[str], token: str | None) -> dict[str, Any]:
        from qapubsub import keys

        wanted, ignored = [], {}
        if token is not None:
            c.accounts_token = token
        covered, refused = self.tokens.split(c.accounts_token, accounts)
        for a in refused:
            ignored[a] = "not covered by the token" if self.tokens.valid(c.accounts_token) else "no valid token"
        for a in covered:
            try:
                keys.order_key(a)
            except ValueError as exc:
                ignored[a] = str(exc)
                continue
            wanted.append(a)
        wanted = wanted[:MAX_ACCOUNTS_PER_CLIENT]
        before = self.account_subs.keys(c)
        to_bind, to_unbind = self.account_subs.set(c, wanted)
        await self._apply_account_bindings(to_bind, to_unbind)
        new = [a for a in wanted if a not in before]
        if new:
            snap: dict[str, Any] = {}
            try:
                async for d in self.db["accounts"].find({"_id": {"$in": new}}):
                    snap[str(d["_id"])] = qifi_tree(d)
            except Exception as exc:  # noqa: BLE001 - MongoDB down: the stream still works
                log.warning("account snapshot unavailable: %s", exc)
            for a in new:
                snap.setdefault(a, {"accounts": {}, "positions": {}, "orders": {}, "trades": {}})
            c.state.add({"trade": snap}, time.monotonic(), urgent=True)
        gone = before - set(wanted)
        if gone:
            c.state.add({"trade": {a: None for a in gone}}, time.monotonic(), urgent=True)
        return {"aid": "subscribe_account_result", "accounts": wanted, "ignored": ignored}

    async def _apply_quote_bindings(self, to_bind: set[str], to_unbind: set[str]) -> None:
        from qapubsub import keys

        if not (to_bind or to_unbind) or self.tick_consumer is None:
            return
        async with self._bind_lock:
            for k in sorted(to_bind):
                ex, _, sym = k.partition(".")
                await self.tick_consumer.bind(self.topo.tick, keys.tick_key(ex, sym))
            for k in sorted(to_unbind):
                ex, _, sym = k.partition(".")
                await self.tick_consumer.unbind(self.topo.tick, keys.tick_key(ex, sym))
        self.metrics.instruments.set(len(self.quote_subs.keys()))

    async def _apply_account_bindings(self, to_bind: set[str], to_unbind: set[str]) -> None:
        from qapubsub import keys

        if not (to_bind or to_unbind) or self.report_consumer is None:
            return
        async with self._bind_lock:
            for a in sorted(to_bind):
                await self.report_consumer.bind(self.topo.report, keys.reports_of(a, "*"))
                await self.report_consumer.bind(self.topo.order, keys.order_key(a))
            for a in sorted(to_unbind):
                await self.report_consumer.unbind(self.topo.report, keys.reports_of(a, "*"))
                await self.report_consumer.unbind(self.topo.order, keys.order_key(a))

    # -- inbound ------------------------------------------------------------------------
    async def _on_tick(self, msg: Any, _d: Any) -> None:
        ticks = msg.ticks if hasattr(msg, "ticks") else (msg,)
        now = time.monotonic()
        now_ns = time.time_ns()
        for t in ticks:
            self.metrics.consumed.labels("tick").inc()
            self.metrics.lag.observe(max(0.0, (now_ns - t.ts) / 1e9))
            self.on_tick(t, now)

    def on_tick(self, t: Any, now: float) -> None:
        """Fan a tick out to the clients subscribed to its instrument (no I/O)."""
        key = instrument_key(str(t.exchange), t.symbol)
        changed = self.book.update(key, quote_of(t))
        if not changed:
            return
        holders = self.quote_subs.clients(key)
        if not holders:
            return
        n = len(changed)
        diff_patch = {"quotes": {key: changed}}
        full_patch = None
        for c in holders:
            if c.full:  # type: ignore[attr-defined]
                if full_patch is None:
                    full_patch = {"quotes": {key: dict(self.book.quotes[key])}}
                c.state.add(full_patch, now, changes=n, origin_ns=t.ts)  # type: ignore[attr-defined]
            else:
                c.state.add(diff_patch, now, changes=n, origin_ns=t.ts)  # type: ignore[attr-defined]

    async def _on_report(self, body: bytes, d: Any) -> None:
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError:
            log.warning("undecodable report on %s dropped", d.routing_key)
            return
        if not isinstance(doc, dict):
            return
        if d.exchange == self.topo.order:
            self.metrics.consumed.labels("order").inc()
            account, patch = d.routing_key, order_sent_patch(doc)
        else:
            self.metrics.consumed.labels("report").inc()
            account, _, kind = d.routing_key.rpartition(".")
            patch = report_patch(kind, doc)
        if not patch:
            return
        now = time.monotonic()
        for c in self.account_subs.clients(account):
            c.state.add({"trade": {account: patch}}, now)  # type: ignore[attr-defined]

    # -- outbound -----------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_TICK)
            try:
                self.flush_once(time.monotonic())
            except Exception:  # noqa: BLE001 - never let the batcher die
                log.exception("flush failed")

    def flush_once(self, now: float) -> None:
        for c in list(self.clients):
            st = c.state
            reason = st.drop_reason(now)
            if reason is not None:
                self.drop(c, reason)
                continue
            got = st.take(now)
            if got is None:
                continue
            tree, origin = got
            data = _json.encode(rtn_data(tree, origin)).decode()
            mode = "full" if c.full else "diff"
            self.metrics.sent_messages.labels(mode).inc()
            self.metrics.sent_bytes.labels(mode).inc(len(data))
            if st.coalesced:
                self.metrics.coalesced.inc(st.coalesced)
                st.coalesced = 0
            try:
                fut = c.handler.write_message(data)
            except Exception:  # noqa: BLE001 - closed meanwhile
                st.written()
                continue
            fut.add_done_callback(lambda f, st=st: (st.written(), f.exception()))

    def drop(self, c: Client, reason: str) -> None:
        log.warning("dropping a WebSocket client: %s", reason)
        self.metrics.dropped.inc()
        with contextlib.suppress(Exception):
            c.handler.close(1013, reason[:120])
        # an unresponsive peer may never complete the closing handshake: abort the stream
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().call_later(1.0, _abort, c.handler)
        asyncio.ensure_future(self.remove_client(c))

    # -- readiness ----------------------------------------------------------------------
    async def ready(self) -> dict[str, Any]:
        out: dict[str, Any] = {"broker": bool(self.conn is not None and self.conn.is_connected)}
        try:
            await asyncio.wait_for(self.mongo.admin.command("ping"), 3.0)
            out["mongo"] = True
        except Exception as exc:  # noqa: BLE001
            out["mongo"] = False
            out["mongo_error"] = f"{type(exc).__name__}"
        return out


def _abort(handler: Any) -> None:
    conn = getattr(handler, "ws_connection", None)
    stream = getattr(conn, "stream", None)
    if stream is not None and not stream.closed():
        stream.close()


# ------------------------------------------------------------------------------------------ report -> tree
def _strip(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in _ENVELOPE}


def qifi_tree(d: Mapping[str, Any]) -> dict[str, Any]:
    """An ``accounts`` (QIFI) document as the DIFF ``trade.<account>`` subtree."""
    return {"accounts": dict(d.get("accounts") or {}), "positions": dict(d.get("positions") or {}),
            "orders": dict(d.get("orders") or {}), "trades": dict(d.get("trades") or {}),
            "trading_day": d.get("trading_day", "")}


def order_sent_patch(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """An order seen on ``qaorder`` (as sent, before routing) -> ``orders.<id>`` with status SENT."""
    if doc.get("schema") == "qa.cancel" or doc.get("topic") == "cancel_order":
        oid = doc.get("order_id")
        return {"orders": {str(oid): {"cancel_requested": True}}} if oid else None
    oid = doc.get("order_id")
    if not oid:
        return None
    o = _strip(doc)
    if "code" in o and "symbol" not in o:   # QATrader dialect
        o["symbol"] = o.get("code")
    o.setdefault("status", "SENT")
    return {"orders": {str(oid): o}}


def report_patch(kind: str, doc: Mapping[str, Any]) -> dict[str, Any] | None:
    if kind == "order" and doc.get("order_id"):
        return {"orders": {str(doc["order_id"]): _strip(doc)}}
    if kind == "trade" and doc.get("trade_id"):
        return {"trades": {str(doc["trade_id"]): _strip(doc)}}
    if kind == "account":
        return {"accounts": dict(doc.get("accounts") or {}), "positions": dict(doc.get("positions") or {})}
    if kind == "reject":
        oid = doc.get("order_id")
        p: dict[str, Any] = {"notify": {str(doc.get("id") or oid): _strip(doc)}}
        if oid:
            p["orders"] = {str(oid): {"status": "REJECTED", "reason": f"{doc.get('field', '')}: {doc.get('reason', '')}"}}
        return p
    if kind == "risk":
        return {"risk": {str(doc.get("id") or doc.get("command_id") or time.time_ns()): _strip(doc)}}
    return None


# ------------------------------------------------------------------------------------------ tornado
def _json_default(o: Any) -> Any:
    import datetime as dt

    from bson import ObjectId

    if isinstance(o, ObjectId):
        return str(o)
    if isinstance(o, (dt.datetime, dt.date)):
        return o.isoformat()
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    if isinstance(o, bool):
        return bool(o)
    if isinstance(o, int):      # bson.Int64 and other int subclasses
        return int(o)
    if isinstance(o, float):
        return float(o)
    return str(o)


_rest_json = msgspec.json.Encoder(enc_hook=_json_default)


def make_app(hub: Hub) -> Any:
    import tornado.web
    import tornado.websocket
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Base(tornado.web.RequestHandler):
        def set_default_headers(self) -> None:
            self.set_header("Cache-Control", "no-store")
            self.set_header("X-Content-Type-Options", "nosniff")

        def token(self) -> str | None:
            auth = self.request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                return auth[7:].strip() or None
            return self.request.headers.get("X-QA-Token") or None

        def send_json(self, obj: Any, status: int = 200) -> None:
            self.set_status(status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(_rest_json.encode(obj))

        def fail(self, status: int, reason: str) -> None:
            self.send_json({"error": reason}, status)

        def can_read(self, account: str | None = None) -> bool:
            """Reads: open without configured tokens; else a valid token covering ``account``."""
            if not hub.tokens.configured:
                return True
            tok = self.token()
            if not hub.tokens.valid(tok):
                self.fail(401, "a valid token is required (Authorization: Bearer <token>)")
                return False
            if account is not None and not hub.tokens.covers(tok, account):
                self.fail(403, f"the token does not cover account {account!r}")
                return False
            return True

        def write_error(self, status_code: int, **kwargs: Any) -> None:
            self.send_json({"error": self._reason}, status_code)

    class Health(Base):
        def get(self) -> None:
            self.send_json({"status": "alive", "pid": os.getpid()})

    class Ready(Base):
        async def get(self) -> None:
            r = await hub.ready()
            ok = r["broker"] and r["mongo"]
            self.send_json({"status": "ready" if ok else "not ready", **r}, 200 if ok else 503)

    class MetricsH(Base):
        def get(self) -> None:
            self.set_header("Content-Type", CONTENT_TYPE_LATEST)
            self.finish(generate_latest(hub.metrics.registry))

    class Accounts(Base):
        async def get(self) -> None:
            if not self.can_read():
                return
            tok = self.token()
            out = []
            async for d in hub.db["accounts"].find({}, {"orders": 0, "trades": 0, "frozen": 0, "seen_trade_ids": 0}):
                a = str(d["_id"])
                if hub.tokens.configured and not hub.tokens.covers(tok, a):
                    continue
                acc = d.get("accounts") or {}
                out.append({"account": a, "trading_day": d.get("trading_day", ""), **acc,
                            "positions": d.get("positions") or {}})
            out.sort(key=lambda x: x["account"])
            self.send_json({"accounts": out})

    class AccountOne(Base):
        async def get(self, account: str) -> None:
            if not self.can_read(account):
                return
            d = await hub.db["accounts"].find_one({"_id": account}, {"seen_trade_ids": 0})
            if d is None:
                return self.fail(404, f"no account {account!r}")
            self.send_json({"account": account, **qifi_tree(d)})

    class Orders(Base):
        async def get(self) -> None:
            account = self.get_query_argument("account", None)
            if not account:
                return self.fail(400, "account= is required")
            if not self.can_read(account):
                return
            limit = min(int(self.get_query_argument("limit", "200")), 1000)
            # The orders routed to this account: children of the router's plans (one per order the
            # account received: direct, group member or copy-trade follower), with the status the
            # router knows of (REJECTED / PENDING_CANCEL are in child_orders; else routed).
            status = {d["_id"]: d for d in await hub.db["child_orders"].find({"account": account}).to_list(limit)}
            children = []
            plans = hub.db["orders"].find({"children": {"$elemMatch": {"account": account}}},
                                          {"children": 1, "received_ns": 1, "dialect": 1})
            for plan in await plans.to_list(limit):
                for c in plan.get("children") or []:
                    if c.get("account") != account:
                        continue
                    body = json.loads(c["body"]) if c.get("body") else {}
                    known = status.pop(c.get("order_id"), {})
                    children.append({**{k: body.get(k) for k in ("symbol", "exchange", "direction", "offset",
                                                                 "price", "volume", "strategy_id")},
                                     "_id": c.get("order_id"), "parent_id": plan["_id"], "account": account,
                                     "status": known.get("status") or ("REJECTED" if c.get("error") else "ROUTED"),
                                     "reason": known.get("reason") or c.get("error") or "",
                                     "updated_ns": known.get("updated_ns") or plan.get("received_ns")})
            children.extend(status.values())
            incoming = await hub.db["orders"].find({"routing_key": account}, {"children.body": 0}).to_list(limit)
            children.sort(key=lambda x: x.get("updated_ns") or 0, reverse=True)
            incoming.sort(key=lambda x: x.get("received_ns") or 0, reverse=True)
            self.send_json({"account": account, "orders": children, "incoming": incoming})

        async def post(self) -> None:
            await post_order(self)

    async def post_order(h: Base) -> None:
        from qaorder.dialects import decode_order
        from qaorder.models import Order, OrderRejected
        from qapubsub import keys
        from qapubsub.aio import PublishError
        from qapubsub.messages import new_id

        tok = h.token()
        if not hub.tokens.configured:
            hub.metrics.rejected.inc()
            return h.fail(403, "no token is configured (QA_WEB_TOKENS / QA_WEB_TOKEN): state changes are disabled")
        if not hub.tokens.valid(tok):
            hub.metrics.rejected.inc()
            return h.fail(401, "a valid token is required (Authorization: Bearer <token>)")
        try:
            body = msgspec.json.decode(h.request.body or b"null")
        except msgspec.DecodeError as exc:
            return h.fail(400, f"not valid JSON: {exc}")
        if not isinstance(body, dict):
            return h.fail(400, "the body must be a JSON object (an order)")
        account = body.get("account")
        if not isinstance(account, str) or not account:
            return h.fail(400, "account: missing")
        if not hub.tokens.covers(tok, account):
            hub.metrics.rejected.inc()
            return h.fail(403, f"the token does not cover account {account!r}")
        doc = {"order_id": new_id(), "source": "web", **body, "schema": "qa.order"}
        try:
            key = keys.order_key(account)
            msg, _dialect = decode_order(msgspec.json.encode(doc), key)
        except OrderRejected as exc:
            hub.metrics.rejected.inc()
            return h.send_json({"error": f"invalid {exc.field or 'order'}: {exc.reason}", "field": exc.field}, 400)
        except ValueError as exc:
            hub.metrics.rejected.inc()
            return h.fail(400, str(exc))
        if not isinstance(msg, Order):
            return h.fail(400, "POST /api/orders takes an order")
        try:
            await hub.publisher.publish(hub.topo.order, key, msg)
        except PublishError as exc:
            return h.fail(503, f"not published: {exc}")
        hub.metrics.published.inc()
        log.info("order %s published for %s", msg.order_id, account, extra={"account": account})
        h.send_json({"order_id": msg.order_id, "account": account, "status": "SENT"}, 202)

    class Bars(Base):
        async def get(self) -> None:
            from qamarket.store import BAR_FIELDS, AsyncBarStore

            if not self.can_read():
                return
            sym = self.get_query_argument("symbol", "")
            ex = self.get_query_argument("exchange", "")
            try:
                ex, sym = resolve_instrument(f"{ex.upper()}.{sym}" if ex else sym)
                count = max(1, min(int(self.get_query_argument("count", "120")), 5000))
            except ValueError as exc:
                return self.fail(400, str(exc))
            freq = self.get_query_argument("freq", "1min")
            bars = await AsyncBarStore(hub.db).bars(ex, sym, freq, count=count)
            self.send_json({"symbol": sym, "exchange": ex, "freq": freq,
                            "bars": [{f: getattr(b, f) for f in BAR_FIELDS} for b in bars]})

    class Follow(Base):
        async def get(self) -> None:
            if not self.can_read():
                return
            rules = await hub.db["follower_rules"].find({}).to_list(1000)
            rules.sort(key=lambda r: str(r.get("_id")))
            self.send_json({"rules": rules})

    class Risk(Base):
        async def get(self) -> None:
            if not self.can_read():
                return
            tok = self.token()
            names = await hub.db.list_collection_names()
            state = await hub.db["account_state"].find({}).to_list(1000) if "account_state" in names else []
            events: list[Any] = []
            for coll in ("risk_audit", "risk_events"):
                if coll in names:
                    got = await hub.db[coll].find({}).to_list(2000)
                    got.sort(key=lambda e: e.get("ts") or e.get("ts_ns") or 0, reverse=True)
                    events += got[:100]
            if hub.tokens.configured:
                state = [s for s in state if hub.tokens.covers(tok, str(s.get("_id")))]
                events = [e for e in events if hub.tokens.covers(tok, str(e.get("account", "")))]
            self.send_json({"account_state": state, "events": events})

    class Ws(tornado.websocket.WebSocketHandler):
        client: Client

        def open(self) -> None:  # type: ignore[override]
            # a bounded kernel send buffer too, so a stalled reader is noticed in seconds
            with contextlib.suppress(Exception):
                self.ws_connection.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self.client = c = hub.add_client(self)
            conn = self.ws_connection
            c.deflate = getattr(conn, "_compressor", None) is not None
            stream = getattr(conn, "stream", None)
            if stream is not None:   # count what reaches the socket (frames, compressed or not)
                write = stream.write
                wire = hub.metrics.wire_bytes
                defl = "1" if c.deflate else "0"

                def counted(data: Any, *a: Any, **kw: Any) -> Any:
                    wire.labels("full" if c.full else "diff", defl).inc(len(data))
                    return write(data, *a, **kw)

                stream.write = counted
            tok = self.get_query_argument("token", None)
            if tok:
                self.client.accounts_token = tok

        async def on_message(self, message: str | bytes) -> None:
            try:
                req = msgspec.json.decode(message)
                if not isinstance(req, dict):
                    raise ValueError("a request is a JSON object with an aid")
                aid = req.get("aid")
                if aid == "subscribe_quote":
                    reply = await hub.subscribe_quotes(self.client, parse_ins_list(req.get("ins_list", "")),
                                                       full=req.get("mode") == "full")
                elif aid == "subscribe_account":
                    reply = await hub.subscribe_accounts(self.client, parse_accounts(req.get("accounts", "")),
                                                         req.get("token"))
                elif aid == "peek_message":   # DIFF clients send it; we push anyway
                    return
                else:
                    reply = {"aid": "error", "error": f"unknown aid {aid!r}"}
            except (msgspec.DecodeError, ValueError) as exc:
                reply = {"aid": "error", "error": str(exc)[:300]}
            if not self.client.closed:
                with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                    await self.write_message(_json.encode(reply).decode())

        def on_close(self) -> None:
            asyncio.ensure_future(hub.remove_client(self.client))

        def get_compression_options(self) -> dict[str, Any] | None:
            # permessage-deflate when the client offers it (browsers do): zlib level 6, a 32 KiB
            # window kept across messages (context takeover: field names and values repeat)
            return {"compression_level": 6, "mem_level": 8} if hub.deflate else None

    class Index(Base):
        def get(self) -> None:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish((STATIC / "index.html").read_bytes())

    return tornado.web.Application([
        (r"/", Index),
        (r"/healthz", Health),
        (r"/readyz", Ready),
        (r"/metrics", MetricsH),
        (r"/ws", Ws),
        (r"/api/accounts", Accounts),
        (r"/api/accounts/([^/]+)", AccountOne),
        (r"/api/orders", Orders),
        (r"/api/bars", Bars),
        (r"/api/follow", Follow),
        (r"/api/risk", Risk),
        (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": str(STATIC)}),
    ], websocket_max_message_size=256 * 1024, websocket_ping_interval=20, websocket_ping_timeout=30)


# ------------------------------------------------------------------------------------------ daemon
async def serve(args: argparse.Namespace, *, stop: asyncio.Event | None = None,
                started: Any = None) -> int:
    """Run until ``stop`` is set (SIGTERM/SIGINT in the daemon). ``started(port, hub)`` is
    called once listening (in-process tests use it)."""
    import tornado.httpserver
    import tornado.netutil

    from handlers.cli import CannotConnect
    from qapubsub.aio import NotConnected
    from qapubsub.settings import ConfigError, Settings
    from qapubsub.topology import Topology

    settings = Settings.from_env()
    try:
        tokens = Tokens.from_env(os.environ)
    except TokenError as exc:
        raise ConfigError(str(exc)) from None
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    hub = Hub(settings, topo, tokens, interval=args.interval, max_changes=args.max_changes,
              drop_after=args.drop_after, queue_max=args.queue_max, deflate=args.deflate)
    try:
        await hub.start()
    except NotConnected as exc:
        await hub.close()
        raise CannotConnect(str(exc)) from None
    server = tornado.httpserver.HTTPServer(make_app(hub), max_buffer_size=1 << 20)
    socks = tornado.netutil.bind_sockets(args.port, args.host)
    server.add_sockets(socks)
    port = socks[0].getsockname()[1]
    log.info("web listening on http://%s:%d/ (tokens %s)", args.host, port,
             "configured" if tokens.configured else "not configured: read-only")
    print(f"listening on http://{args.host}:{port}/", flush=True)
    if started is not None:
        started(port, hub)
    stop = stop or asyncio.Event()
    await stop.wait()
    log.info("stopping: closing clients and the broker connection")
    server.stop()
    await hub.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.close_all_connections(), 5)
    return 0


def run(args: argparse.Namespace) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                os._exit(128 + signum)
            log.info("signal %s: stopping", signal.Signals(signum).name)
            stop.set()

        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, on_signal, s)
        return await serve(args, stop=stop)

    return asyncio.run(main())


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow web"))
