"""``qaflow risk``: the live risk monitor daemon, the risk-desk commands, and the router's risk gate.

::

    qaflow risk [run] [--namespace NS]                     # the monitor daemon
    qaflow risk force-close --account A [--symbol SHFE.rb2512 ...] --reason "..." [--operator NAME]
    qaflow risk release --account A [--reason "..."] [--operator NAME]
    qaflow risk status [--account A ...] [--json]
    qaflow risk config --account A [--set funds.enabled=false ...] [--file cfg.json] [--show] [--delete]

Identity. ``force-close``/``release`` and the monitor's automatic force-closes are published
to ``qarisk`` on a connection logged in as the risk identity, with the AMQP ``user_id`` set
to that user (RabbitMQ refuses a ``user_id`` other than the login; the router refuses any
user but ``QA_RISK_USER``). Credentials: ``QA_RISK_AMQP_URL``, else ``QA_RISK_USER`` +
``QA_RISK_PASSWORD`` on the host of ``QA_AMQP_URL``. They are never printed or logged.

:class:`RiskGate` is the router's ``risk_check`` (see :mod:`handlers.router` and
``docs/risk.md``): a :class:`qarisk.RiskEngine` configured from ``risk_configs``, account
views from the ``accounts`` QIFI documents (re-parsed only when ``rev`` changed), quotes
from a live, bounded tick subscription (seeded once per instrument from
``TickStore.last_tick``), counters fed from ``qa.report`` ``*.order``/``*.trade`` on the same
bounded queue and from force-close/release.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from qapubsub import keys
from qapubsub.settings import ConfigError, Settings, mongo_client, redact_url
from qapubsub.topology import Binding, Topology

log = logging.getLogger(__name__)

LIVE_MAX = 10_000
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3
MONITOR_OPERATOR = "qaflow-risk-monitor"


def local_now_ms() -> int:
    """Exchange-local epoch ms (what :mod:`qarisk.rules` and :mod:`qamarket.sessions` use)."""
    from qamarket.sessions import to_ms

    return to_ms(_dt.datetime.now(_dt.timezone.utc))


# ============================================================================ identity
def risk_identity(settings: Settings, env: Any = None) -> tuple[str, str]:
    """(AMQP URL, user) of the risk identity; :class:`ConfigError` when none is configured."""
    env = os.environ if env is None else env
    url = env.get("QA_RISK_AMQP_URL", "")
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname or not parts.username:
            raise ConfigError(f"QA_RISK_AMQP_URL={redact_url(url)!r} is not amqp://user:password@host:port/vhost")
        return url, urllib.parse.unquote(parts.username)
    user, pwd = env.get("QA_RISK_USER", ""), env.get("QA_RISK_PASSWORD", "")
    if user and pwd:
        parts = urllib.parse.urlsplit(settings.amqp_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        q = urllib.parse.quote
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{q(user, safe='')}:{q(pwd, safe='')}@{host}")), user
    raise ConfigError("no risk identity: set QA_RISK_AMQP_URL (amqp://qarisk:PASSWORD@host:5672/%2F) or "
                      "QA_RISK_USER and QA_RISK_PASSWORD")


def risk_publisher(settings: Settings, *, max_retries: int | None = 2) -> tuple[Any, Any, str]:
    """(connection, publisher, user) logged in as the risk identity (confirms + mandatory + user_id)."""
    from qapubsub.sync import Connection, Publisher

    url, user = risk_identity(settings)
    conn = Connection(urls=[url], client_name="qaflow-risk", max_retries=max_retries)
    return conn, Publisher(conn, user_id=user), user


# ============================================================================ the router's gate
class RiskGate:
    """Pre-trade rules for the router (its ``risk_check``) and the engine's counters.

    Single-threaded: every method runs on the router's consumer thread (the report/tick
    deliveries are dispatched by the same pika I/O loop)."""

    def __init__(self, db: Any, topology: Topology, *, clock: Callable[[], int] = local_now_ms,
                 reload_interval: float = 1.0, flush_interval: float = 1.0) -> None:
        from qaaccount.store import InstrumentTable
        from qaorder.store import OrderStore
        from qarisk import MarketSnapshot, RiskConfig, RiskEngine
        from qarisk.store import RiskStore

        self.db = db
        self.topo = topology
        self.clock = clock
        self.store = RiskStore(db)
        self.orders = OrderStore(db, create_indexes=False)
        self.instruments = InstrumentTable(db)
        self.quotes: dict[str, Any] = {}
        self.market = MarketSnapshot(instruments=self.instruments, quotes=self.quotes, sessions={})
        self.engine = RiskEngine(default=RiskConfig.all_off())
        self.reload_interval, self.flush_interval = reload_interval, flush_interval
        self._version = -1
        self._configured: set[str] = set()
        self._stored: dict[str, Any] = {}
        self._default_rules: Any = RiskConfig.all_off()
        self._last_reload = self._last_flush = 0.0
        self._views: dict[str, tuple[Any, Any]] = {}
        self._dirty: set[str] = set()
        self._wanted: set[str] = set()       # tick keys to bind
        self._bound: set[str] = set()
        self._seeded: set[str] = set()
        self._ch: Any = None
        self._gen = -1
        self._queue = ""
        self.counts = {"checked": 0, "rejected": 0, "reports": 0, "ticks": 0}
        self.reload(force=True)
        self._restore()

    # configuration / restore ---------------------------------------------------------------
    def reload(self, force: bool = False) -> bool:
        from qarisk import RiskConfig

        v = self.store.version()
        self._last_reload = time.monotonic()
        if not force and v == self._version:
            return False
        self._version = v
        from qarisk.store import DEFAULT_KEY

        stored = self.store.load_configs()
        default = stored.pop(DEFAULT_KEY, None)
        self._default_rules = default.rules if default is not None else RiskConfig.all_off()
        self._stored = {acc: cfg.rules for acc, cfg in stored.items()}
        for acc in self._configured | set(self._stored):
            self.engine.configure(acc, self._stored.get(acc, self._default_rules))
        self._configured |= set(self._stored)
        log.info("risk configs loaded", extra={"version": v, "accounts": sorted(stored)})
        return True

    def _restore(self) -> None:
        for acc, d in self.store.account_states().items():
            if d.get("reduce_only"):
                self.engine.force_close(acc, str(d.get("reason") or d.get("command_id") or "force-close"))
        today = self.engine.calendar.trading_day(self.clock())
        for acc, d in self.store.load_counters().items():
            if d.get("trading_day") != today:
                continue
            st = self.engine.state(acc)
            st.trading_day = today
            st.daily_orders = int(d.get("daily_orders", 0))
            st.orders_by.update(d.get("orders_by") or {})
            st.daily_cancels = int(d.get("daily_cancels", 0))
            st.cancels_by.update(d.get("cancels_by") or {})
            st.daily_trades = int(d.get("daily_trades", 0))
            st.trades_by.update(d.get("trades_by") or {})
            if d.get("halted"):
                self.engine.halt(acc, str(d.get("reason") or "halted"))
        self._restore_working()

    def _restore_working(self) -> None:
        """Working orders come back from the account documents (the account daemon keeps each order it
        saw on qa.exec, with the lots still open, until it is filled, cancelled or rejected): without
        them a restarted router would let an account exceed its working-order, position and exposure
        limits, or close more than it holds."""
        from qaaccount.store import AccountStore

        accounts = AccountStore(self.db, self.instruments)
        restored = 0
        for doc in accounts.docs():
            try:
                working = accounts.from_doc(doc).working()
            except Exception as exc:  # noqa: BLE001 - one bad document must not stop the router
                log.warning("working orders of %s not restored: %s", doc.get("_id"), exc)
                continue
            for order, left in working:
                self.engine.restore_working(order, left, self.market)
                restored += 1
        if restored:
            log.info("restored %d working order(s) into the risk engine", restored)

    # the check ------------------------------------------------------------------------------
    def _view(self, account: str) -> Any:
        from qaaccount.account import Account
        from qarisk import AccountSnapshot

        doc = self.orders.accounts.find_one({"_id": account})
        if doc is None:
            self._views.pop(account, None)
            return None
        rev = doc.get("rev")
        cached = self._views.get(account)
        if cached is not None and rev is not None and cached[0] == rev:
            return cached[1]
        try:
            view = AccountSnapshot.from_account(Account.from_qifi(doc, self.instruments))
        except Exception as exc:  # noqa: BLE001 - a document we cannot read: rules that need it fail closed
            log.warning("account %s: document unreadable for the risk view: %s", account, exc)
            return None
        self._views[account] = (rev, view)
        return view

    def _want_quote(self, key: str) -> None:
        if key in self._seeded:
            return
        self._seeded.add(key)
        self._wanted.add(key)
        if self._ch is not None and self._ch.is_open:
            self._bind_ticks()
        if key not in self.quotes:
            from qamarket.store import TickStore

            ex, _, sym = key.partition(".")
            try:
                t = TickStore(self.db, create_indexes=False).last_tick(ex, sym)
            except Exception as exc:  # noqa: BLE001
                log.warning("last tick of %s unreadable: %s", key, exc)
                t = None
            if t is not None and key not in self.quotes:
                self.quotes[key] = t

    def __call__(self, child: Any, ctx: Any = None) -> Any:
        if child.account not in self._configured:
            self.engine.configure(child.account, self._default_rules)
            self._configured.add(child.account)
        cfg = self.engine.config(child.account)
        if cfg is None or not cfg.enabled:
            return None
        self.counts["checked"] += 1
        self._want_quote(child.key)
        dec = self.engine.check(child, self._view(child.account), self.market, self.clock())
        if not dec.ok:
            self.counts["rejected"] += 1
            r = dec.rejection
            self.store.audit({"action": "reject", "account": child.account, "order_id": child.order_id,
                              "parent_id": child.parent_id or child.order_id, "rule": r.rule, "check": r.check,
                              "detail": r.reason, "limit": r.limit, "value": r.value})
        return dec

    # counters ---------------------------------------------------------------------------------
    def on_order_accepted(self, child: Any) -> None:
        self.engine.on_order_accepted(child, self.clock(), self.market)
        self._dirty.add(child.account)

    def on_order_failed(self, order_id: str) -> None:
        self.engine.on_order_done(order_id)

    def force_close(self, account: str, reason: str) -> None:
        self.engine.force_close(account, reason)
        self._dirty.add(account)

    def release(self, account: str) -> None:
        self.engine.release(account)
        self._dirty.add(account)

    def on_report(self, body: bytes) -> None:
        from qaorder.models import OrderStatus, OrderStatusReport, Trade
        from qapubsub.messages import decode

        msg = decode(body, OrderStatusReport | Trade)
        self.counts["reports"] += 1
        if isinstance(msg, Trade):
            self.engine.on_order_traded(msg.order_id, msg.volume, msg.trade_id)
        elif msg.status is OrderStatus.CANCELLED:
            self.engine.on_cancel(msg.order_id, self.clock(), account=msg.account)
        elif msg.status.is_terminal:
            self.engine.on_order_done(msg.order_id)
        else:
            return
        self._dirty.add(msg.account)

    def on_tick(self, body: bytes) -> None:
        from qamarket.models import Tick, TickBatch
        from qapubsub.messages import decode

        msg = decode(body, Tick | TickBatch)
        for t in (msg.ticks if isinstance(msg, TickBatch) else (msg,)):
            self.quotes[f"{t.exchange}.{t.symbol}"] = t
            self.counts["ticks"] += 1

    # the live subscription (reports + ticks), on the router's connection ------------------------
    def attach(self, connection: Any) -> None:
        """(Re)declare the bounded report/tick queue and consume it (cheap when already done)."""
        if self._ch is not None and self._ch.is_open and self._gen == connection.generation:
            return
        conn = connection.ensure()
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True, auto_delete=True,
                             arguments={"x-max-length": LIVE_MAX, "x-overflow": "drop-head"}).method.queue
        for kind in ("order", "trade"):
            ch.queue_bind(q, self.topo.report, routing_key=keys.reports_of("*", kind))
        ch.basic_qos(prefetch_count=1000)
        ch.basic_consume(q, self._on_message, auto_ack=False)
        self._ch, self._gen, self._queue, self._bound = ch, connection.generation, q, set()
        self._bind_ticks()

    def _bind_ticks(self) -> None:
        for key in sorted(self._wanted - self._bound):
            ex, _, sym = key.partition(".")
            try:
                self._ch.queue_bind(self._queue, self.topo.tick, routing_key=keys.tick_key(ex, sym))
                self._bound.add(key)
            except keys.KeyError_:
                self._bound.add(key)

    def _on_message(self, ch: Any, method: Any, _props: Any, body: bytes) -> None:
        try:
            if method.exchange == self.topo.tick:
                self.on_tick(body)
            else:
                self.on_report(body)
        except Exception as exc:  # noqa: BLE001 - a bad report must not stop the router
            log.warning("risk gate: %s from %s ignored: %s", method.routing_key, method.exchange, exc)
        ch.basic_ack(method.delivery_tag)

    def periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_reload >= self.reload_interval:
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001
                log.warning("risk config reload failed: %s", exc)
        if self._dirty and now - self._last_flush >= self.flush_interval:
            self.flush()

    def counters_doc(self, account: str) -> dict[str, Any]:
        st = self.engine.state(account)
        return {"_id": account, "trading_day": st.trading_day, "daily_orders": st.daily_orders,
                "orders_by": dict(st.orders_by), "daily_cancels": st.daily_cancels, "cancels_by": dict(st.cancels_by),
                "daily_trades": st.daily_trades, "trades_by": dict(st.trades_by), "active_orders": len(st.active),
                "working_open_lots": st.working_open_lots, "reduce_only": st.reduce_only, "halted": st.halted,
                "reason": st.reason}

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        dirty, self._dirty = self._dirty, set()
        try:
            self.store.save_counters(self.counters_doc(a) for a in sorted(dirty))
        except Exception as exc:  # noqa: BLE001
            self._dirty |= dirty
            log.warning("risk counters not saved: %s", exc)


# ============================================================================ the monitor daemon
class Monitor:
    """Account snapshots + ticks -> :func:`qarisk.monitor.evaluate` -> risk events, audit, force-closes."""

    def __init__(self, db: Any, topology: Topology, report_pub: Any, risk_pub: Any, *,
                 bind_tick: Callable[[str], None] = lambda key: None, reload_interval: float = 1.0) -> None:
        from qaaccount.store import InstrumentTable
        from qarisk.store import RiskStore

        self.topo = topology
        self.store = RiskStore(db)
        self.instruments = InstrumentTable(db)
        self.report_pub, self.risk_pub = report_pub, risk_pub
        self.bind_tick = bind_tick
        self.reload_interval = reload_interval
        self.configs: dict[str, Any] = {}
        self._version = -1
        self._last_reload = 0.0
        self.figs: dict[str, Any] = {}
        self.states: dict[str, Any] = {}
        self._ticks_bound: set[str] = set()
        self.breaches = 0
        self.reload(force=True)

    def reload(self, force: bool = False) -> None:
        self._last_reload = time.monotonic()
        v = self.store.version()
        if force or v != self._version:
            self._version = v
            self.configs = self.store.load_configs()

    def config(self, account: str) -> Any:
        from qarisk.store import DEFAULT_KEY

        if time.monotonic() - self._last_reload >= self.reload_interval:
            self.reload()
        return self.configs.get(account) or self.configs.get(DEFAULT_KEY)

    def handle(self, body: bytes, delivery: Any) -> None:
        from qamarket.models import Tick, TickBatch
        from qaorder.models import AccountSnapshot
        from qapubsub.messages import decode

        if delivery.exchange == self.topo.tick:
            msg = decode(body, Tick | TickBatch)
            for t in (msg.ticks if isinstance(msg, TickBatch) else (msg,)):
                self.on_tick(f"{t.exchange}.{t.symbol}", t.last_price)
        else:
            snap = decode(body, AccountSnapshot)
            self.on_snapshot(msgspec.to_builtins(snap))

    def on_snapshot(self, doc: dict[str, Any]) -> None:
        from qarisk.monitor import AccountFigures

        fig = AccountFigures.from_qifi(doc)
        self.figs[fig.account] = fig
        for key in fig.positions:
            if key not in self._ticks_bound:
                self._ticks_bound.add(key)
                self.bind_tick(key)
        self.check(fig.account)

    def on_tick(self, key: str, price: float) -> None:
        mult = None
        for acc, fig in self.figs.items():
            if key in fig.positions:
                if mult is None:
                    try:
                        mult = self.instruments[key].multiplier
                    except KeyError:
                        return
                if fig.remark(key, price, mult):
                    self.check(acc)

    def check(self, account: str) -> None:
        from qarisk.monitor import evaluate

        cfg = self.config(account)
        if cfg is None or not cfg.monitor.enabled:
            return
        fig = self.figs[account]
        st = self.states.get(account)
        if st is None:
            st = self.states[account] = self.store.monitor_state(account)
        before = (st.trading_day, st.high_water, frozenset(st.fired))
        for b in evaluate(cfg.monitor, fig, st):
            self.act(b)
        if (st.trading_day, st.high_water, frozenset(st.fired)) != before:
            self.store.save_monitor_state(account, st, equity=fig.equity, margin=fig.margin)

    def act(self, b: Any) -> None:
        from qaorder.models import ForceClose
        from qarisk.monitor import RiskEvent

        self.breaches += 1
        ev = RiskEvent.of(b)
        log.warning("risk breach %s on %s: %s", b.rule, b.account, b.reason,
                    extra={"account": b.account, "rule": b.rule, "command_id": b.command_id})
        self.store.audit({"_id": f"{b.command_id}:warn", "action": "warn", "account": b.account, "rule": b.rule,
                          "detail": b.reason, "value": b.value, "limit": b.limit, "symbol": b.symbol,
                          "trading_day": b.trading_day, "command_id": b.command_id if b.force_close else None})
        self.report_pub.publish(self.topo.report, keys.report_key(b.account, "risk"), ev, persistent=False)
        if b.force_close:
            fc = ForceClose(id=b.command_id, command_id=b.command_id, account=b.account, operator=MONITOR_OPERATOR,
                            reason=f"{b.rule}: {b.reason}", symbols=[b.symbol] if b.symbol else None)
            self.risk_pub.publish(self.topo.risk, keys.risk_key(b.account), fc)
            self.store.audit({"_id": f"{b.command_id}:forceclose", "action": "forceclose", "account": b.account,
                              "rule": b.rule, "command_id": b.command_id, "operator": MONITOR_OPERATOR,
                              "detail": f"force-close {b.command_id} issued: {b.reason}", "symbol": b.symbol})


def run_daemon(args: argparse.Namespace) -> int:
    import signal


    from handlers.cli import CannotConnect
    from qapubsub.sync import Connection, Consumer, FatalError, Publisher, TransportError

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    client = mongo_client(settings, server_selection_ms=3000)
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001
        raise CannotConnect(f"MongoDB at {redact_url(settings.mongo_url)}: {exc}") from None
    db = client[settings.mongo_db]
    conn = Connection(settings, client_name="qaflow-risk-monitor", max_retries=2)
    risk_conn, risk_pub, user = risk_publisher(settings)
    try:
        conn.ensure()
        risk_conn.ensure()
    except FatalError as exc:
        raise CannotConnect(str(exc)) from None
    except TransportError as exc:
        raise CannotConnect(str(exc)) from None
    conn.max_retries = None
    risk_conn.max_retries = None
    report_pub = Publisher(conn, mandatory=False)
    holder: dict[str, Any] = {}

    def bind_tick(key: str) -> None:
        ex, _, sym = key.partition(".")
        try:
            holder["consumer"].bind(topo.tick, keys.tick_key(ex, sym))
        except keys.KeyError_:
            pass

    monitor = Monitor(db, topo, report_pub, risk_pub, bind_tick=bind_tick)
    queue = topo.live_queue("", Binding(topo.report, keys.reports_of("*", "account")), max_length=LIVE_MAX)
    consumer = Consumer(conn, queue, monitor.handle, topology=topo, prefetch=500, ack_every=50)
    holder["consumer"] = consumer
    import faulthandler

    faulthandler.register(signal.SIGUSR1)
    log.info("risk monitor started", extra={"namespace": topo.namespace, "risk_user": user})
    try:
        return consumer.run_until_signal()
    finally:
        risk_conn.close()
        client.close()
        log.info("risk monitor stopped")


# ============================================================================ commands
def _db(settings: Settings) -> Any:

    from handlers.cli import CannotConnect

    client = mongo_client(settings, server_selection_ms=3000)
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001
        raise CannotConnect(f"MongoDB at {redact_url(settings.mongo_url)}: {exc}") from None
    return client[settings.mongo_db]


def _publish_command(args: argparse.Namespace, msg: Any, what: str) -> int:
    from handlers.cli import CannotConnect
    from qapubsub.sync import FatalError, PublishError, TransportError, Unroutable

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    conn, pub, user = risk_publisher(settings)
    try:
        pub.publish(topo.risk, keys.risk_key(msg.account), msg)
    except FatalError:
        raise CannotConnect(f"RabbitMQ refused the login of the risk identity {user!r}: check its password "
                            f"(QA_RISK_AMQP_URL / QA_RISK_PASSWORD)") from None
    except TransportError as exc:
        if isinstance(exc, (PublishError, Unroutable)):
            print(f"qaflow: {what} {msg.command_id} NOT published: {exc}", file=sys.stderr)
            return EXIT_ERROR
        raise CannotConnect(str(exc)) from None
    finally:
        conn.close()
    try:
        from qarisk.store import RiskStore

        RiskStore(_db(settings)).audit({"action": what.replace("-", ""), "account": msg.account,
                                        "command_id": msg.command_id, "operator": msg.operator,
                                        "detail": f"{what} published by {msg.operator} as {user}: {msg.reason}",
                                        "symbols": getattr(msg, "symbols", None)})
    except Exception as exc:  # noqa: BLE001 - the command is out; the audit is best effort here
        print(f"qaflow: warning: {what} published but not audited: {exc}", file=sys.stderr)
    print(f"{what} {msg.command_id} published for account {msg.account} (as {user})")
    print(msg.command_id)
    return EXIT_OK


def _operator(args: argparse.Namespace) -> str:
    import getpass

    if args.operator:
        return str(args.operator)
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "risk-desk"


def _check_account(account: str) -> None:
    try:
        keys.risk_key(account)
    except keys.KeyError_ as exc:
        raise ConfigError(f"--account: {exc}") from None


def run_force_close(args: argparse.Namespace) -> int:
    from qaorder.models import ForceClose

    _check_account(args.account)
    if not args.reason.strip():
        raise ConfigError("--reason must not be empty")
    cid = args.command_id or f"fc-{uuid.uuid4().hex}"
    msg = ForceClose(id=cid, command_id=cid, account=args.account, reason=args.reason, operator=_operator(args),
                     symbols=list(dict.fromkeys(args.symbol)) if args.symbol else None)
    return _publish_command(args, msg, "force-close")


def run_release(args: argparse.Namespace) -> int:
    from qaorder.models import Release

    _check_account(args.account)
    cid = args.command_id or f"rel-{uuid.uuid4().hex}"
    msg = Release(id=cid, command_id=cid, account=args.account, operator=_operator(args), reason=args.reason or "")
    return _publish_command(args, msg, "release")


def run_halt(args: argparse.Namespace) -> int:
    from qaorder.models import Halt

    _check_account(args.account)
    if not args.reason.strip():
        raise ConfigError("--reason must not be empty")
    cid = args.command_id or f"halt-{uuid.uuid4().hex}"
    return _publish_command(args, Halt(id=cid, command_id=cid, account=args.account, reason=args.reason,
                                       operator=_operator(args)), "halt")


def run_resume(args: argparse.Namespace) -> int:
    from qaorder.models import Resume

    _check_account(args.account)
    cid = args.command_id or f"resume-{uuid.uuid4().hex}"
    return _publish_command(args, Resume(id=cid, command_id=cid, account=args.account, operator=_operator(args),
                                         reason=args.reason or ""), "resume")


def status_docs(db: Any, accounts: list[str] | None = None) -> list[dict[str, Any]]:
    from qarisk.store import DEFAULT_KEY, RiskStore

    store = RiskStore(db, create_indexes=False)
    configs = {d["_id"]: d for d in store.configs.find({})}
    counters = store.load_counters()
    states = store.account_states()
    monitor = {d["_id"]: d for d in store.monitor.find({})}
    acc_docs = {d["_id"]: d for d in db["accounts"].find({}, {"accounts": 1, "trading_day": 1})}
    names = accounts or sorted((set(configs) - {DEFAULT_KEY}) | set(counters) | set(states) | set(acc_docs))
    out = []
    for a in names:
        c, s, m = counters.get(a) or {}, states.get(a) or {}, monitor.get(a) or {}
        cfg = configs.get(a) or configs.get(DEFAULT_KEY)
        halted = bool(s.get("halted") or c.get("halted"))
        state = "halted" if halted else "reduce-only" if s.get("reduce_only") else "normal"
        why = (s.get("halt") or {}) if s.get("halted") else s
        ad = (acc_docs.get(a) or {}).get("accounts") or {}
        out.append({
            "account": a, "state": state, "since_command": why.get("command_id"), "reason": why.get("reason") or "",
            "config": "own" if a in configs else ("default (*)" if cfg else "none: rules off"),
            "limits": _limits(cfg), "counters": {k: c.get(k) for k in ("trading_day", "daily_orders", "daily_cancels",
                                                                          "daily_trades", "active_orders")},
            "monitor": {"trading_day": m.get("trading_day"), "high_water": m.get("high_water"),
                        "fired": m.get("fired") or []},
            "equity": ad.get("balance"), "margin": ad.get("margin")})
    return out


def _limits(doc: dict[str, Any] | None) -> dict[str, Any]:
    if not doc:
        return {}
    out: dict[str, Any] = {}
    rules = doc.get("rules") or {}
    if not rules.get("enabled", True):
        out["rules"] = "off"
    for sec, d in rules.items():
        if isinstance(d, dict) and d.get("enabled", True):
            for k, v in d.items():
                if k != "enabled" and v is not None and k.startswith("max"):
                    out[f"{sec}.{k}"] = v
        elif isinstance(d, dict):
            out[f"{sec}"] = "off"
    mon = doc.get("monitor") or {}
    if mon.get("enabled"):
        for k, v in mon.items():
            if k != "enabled" and v not in (None, [], ()):
                out[f"monitor.{k}"] = v
    return out


def run_status(args: argparse.Namespace) -> int:
    db = _db(Settings.from_env())
    docs = status_docs(db, args.account)
    if args.json:
        print(json.dumps(docs, default=str, indent=1))
        return EXIT_OK
    if not docs:
        print("no accounts")
    for d in docs:
        c = d["counters"]
        line = f"account {d['account']}: {d['state'].upper()}"
        if d["state"] != "normal":
            line += f" (command {d['since_command']}: {d['reason']})"
        print(line)
        if d["equity"] is not None:
            print(f"  equity {d['equity']:,.2f}  margin {d['margin'] or 0:,.2f}")
        print(f"  config: {d['config']}")
        for k, v in d["limits"].items():
            print(f"    {k} = {v}")
        print(f"  today ({c.get('trading_day') or '-'}): orders {c.get('daily_orders') or 0}, "
              f"cancels {c.get('daily_cancels') or 0}, trades {c.get('daily_trades') or 0}, "
              f"working {c.get('active_orders') or 0}")
        m = d["monitor"]
        if m["trading_day"]:
            hw = m["high_water"]
            print(f"  monitor ({m['trading_day']}): high-water {hw:,.2f}" if hw is not None else "  monitor:",
                  f"breaches: {', '.join(m['fired']) or 'none'}")
    if args.account:
        missing = [a for a in args.account if not any(d["account"] == a for d in docs)]
        if missing:
            print(f"qaflow: no account {', '.join(missing)}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_OK


def run_config(args: argparse.Namespace) -> int:
    from qarisk.config import RiskConfigError
    from qarisk.store import DEFAULT_KEY, RiskStore

    if args.account != DEFAULT_KEY:
        _check_account(args.account)
    store = RiskStore(_db(Settings.from_env()))
    if args.delete:
        print(f"risk config of {args.account} {'deleted' if store.delete_config(args.account) else 'did not exist'}")
        return EXIT_OK
    if args.file or args.set:
        if args.file:
            try:
                with open(args.file, "rb") as f:
                    base = json.loads(f.read())
            except (OSError, ValueError) as exc:
                print(f"qaflow: --file {args.file}: {exc}", file=sys.stderr)
                return EXIT_USAGE
        else:
            base = store.raw_config(args.account) or {}
        try:
            from qarisk.store import apply_sets

            data = apply_sets(base, args.set or [])
            cfg = store.set_config(args.account, data, operator=_operator(args))
        except RiskConfigError as exc:
            print(f"qaflow: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps({**cfg.rules.to_dict(), "monitor": msgspec.to_builtins(cfg.monitor)}, indent=1))
        return EXIT_OK
    raw = store.raw_config(args.account)
    if raw is None:
        print(f"qaflow: no risk config for {args.account} (pre-trade rules off)", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(raw, indent=1, default=str))
    return EXIT_OK


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Risk desk: the live monitor daemon (default), force-close / release / halt / resume as "
                          "the risk identity, account risk status, per-account risk configs.")
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.set_defaults(_risk_run=run_daemon)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = False
    r = sub.add_parser("run", help="the monitor daemon (the default)", description="the live risk monitor daemon")
    r.set_defaults(_risk_run=run_daemon)
    f = sub.add_parser("force-close", help="cancel working orders, flatten, block opens (as the risk identity)",
                       description="Publish a ForceClose to qarisk as the risk identity (QA_RISK_AMQP_URL, or "
                                   "QA_RISK_USER/QA_RISK_PASSWORD). Prints the command id. Durable: executed when "
                                   "the router (re)starts if it is down.")
    f.add_argument("--account", required=True)
    f.add_argument("--symbol", action="append", metavar="EXCHANGE.symbol", help="only these instruments (repeat)")
    f.add_argument("--reason", required=True)
    f.add_argument("--operator", default=None, help="who (default: the OS user)")
    f.add_argument("--command-id", default=None, help=argparse.SUPPRESS)
    f.set_defaults(_risk_run=run_force_close)
    rl = sub.add_parser("release", help="lift the reduce-only block of a force-close",
                        description="Publish a Release to qarisk as the risk identity.")
    rl.add_argument("--account", required=True)
    rl.add_argument("--reason", default="")
    rl.add_argument("--operator", default=None)
    rl.add_argument("--command-id", default=None, help=argparse.SUPPRESS)
    rl.set_defaults(_risk_run=run_release)
    h = sub.add_parser("halt", help="refuse every new order of an account, closing ones too (as the risk identity)",
                       description="Publish a Halt to qarisk as the risk identity: from the router's next batch on, "
                                   "every new order of the account is rejected until a resume; working orders stay "
                                   "(cancels pass), positions are not touched. Prints the command id.")
    h.add_argument("--account", required=True)
    h.add_argument("--reason", required=True)
    h.add_argument("--operator", default=None, help="who (default: the OS user)")
    h.add_argument("--command-id", default=None, help=argparse.SUPPRESS)
    h.set_defaults(_risk_run=run_halt)
    rs = sub.add_parser("resume", help="lift a halt",
                        description="Publish a Resume to qarisk as the risk identity (a force-close's reduce-only "
                                    "stays until a release).")
    rs.add_argument("--account", required=True)
    rs.add_argument("--reason", default="")
    rs.add_argument("--operator", default=None)
    rs.add_argument("--command-id", default=None, help=argparse.SUPPRESS)
    rs.set_defaults(_risk_run=run_resume)
    s = sub.add_parser("status", help="each account's state (normal/reduce-only/halted), limits, day's counters",
                       description="Read from MongoDB: account_state, risk_configs, risk_counters, risk_monitor.")
    s.add_argument("--account", action="append")
    s.add_argument("--json", action="store_true")
    s.set_defaults(_risk_run=run_status)
    c = sub.add_parser("config", help="show or set an account's risk config (validated)",
                       description="--set section.key=value (repeat; JSON values: false, 10, null), or --file a JSON "
                                   "config ({\"volume\": {\"max_volume\": 10}, \"monitor\": {...}}); --account '*' is "
                                   "the default for accounts without their own. Sections: state session volume price "
                                   "position funds exposure flow monitor.")
    c.add_argument("--account", required=True)
    c.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    c.add_argument("--file", default=None)
    c.add_argument("--show", action="store_true", help="print the stored config (the default without --set/--file)")
    c.add_argument("--delete", action="store_true")
    c.add_argument("--operator", default=None)
    c.set_defaults(_risk_run=run_config)


def run(args: argparse.Namespace) -> int:
    return int(args._risk_run(args))


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow risk"))
