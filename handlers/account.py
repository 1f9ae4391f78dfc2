"""``qaflow account``: the QIFI account daemon and the account commands.

::

    qaflow account [run] [--namespace NS] [--snapshot-interval 0.5]   # the daemon
    qaflow account open --account A --cash 1000000 [--trading-day 20250102]
    qaflow account instrument --key SHFE.rb2512 --margin-rate 0.1 --open-ratio 0.0001 [--close-today-ratio ...]
    qaflow account settle --account A --price SHFE.rb2512=3900 [--price ...] [--next-day 20250103]
    qaflow account show [--account A] [--json]

Accounts are opened explicitly (``open`` writes the QIFI document with the initial
deposit, ``rev`` 1); reports for an account that was never opened are dead-lettered with
the reason. Instruments come from :class:`qaaccount.store.InstrumentTable`
(``account_instruments`` overrides, else the market spec with a 10 % margin and no fees).

The daemon consumes ``Topology.account_reports`` (``qa.report`` ``*.order`` / ``*.trade``)
and binds it to ``qa.exec`` ``#`` as well: the *child order itself* is what freezes
margin/commission (opens) or position volume (closes), because an ``OrderStatusReport``
carries neither direction, offset nor price. The order always reaches the queue before
the executor's reports of it (it is routed to this queue when it is published to the
executor). Each message must come from where its type is sent: orders and cancels from
``qa.exec`` under their account's key, reports and trades from ``qa.report`` under
``<account>.order|trade`` (:func:`source_error`); anything else is dead-lettered with the
reason, never applied. ``CANCELLED``/``REJECTED`` reports release what is left (``traded`` of the
report keeps the reservation of fills still on their way); trades are applied once by
``trade_id`` (ids are persisted with the document in ``seen_trade_ids``, so a trade
redelivered after a restart or a settlement counts once). Each change is saved to
``accounts`` (with ``rev`` +1) BEFORE the message is acked; a save that finds another
``rev`` (a ``settle``/``open`` from the CLI meanwhile) reloads the document and applies
the message again. A live tick queue (bounded) bound to the held instruments marks the
positions to market. ``AccountSnapshot`` goes to ``qa.report`` ``<account>.account`` at
most every ``--snapshot-interval`` seconds per account, from a flusher thread that also
persists marks and reloads documents changed by the CLI.

Threads (one pika connection each): reports, ticks, flusher; the accounts are shared
behind one lock. SIGTERM/SIGINT: the message in hand is finished, saved and acked; a
last snapshot is published; exit 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from qaaccount.account import Account, AccountError, UnknownOrderError
from qaaccount.store import AccountExists, AccountStore, InstrumentTable, StaleAccount
from qamarket.models import Tick, TickBatch
from qaorder.models import AccountSnapshot, Cancel, Order, OrderStatus, OrderStatusReport, Trade
from qapubsub import keys
from qapubsub.handling import Reject
from qapubsub.settings import Settings
from qapubsub.topology import Binding, Topology

log = logging.getLogger(__name__)


def source_error(msg: Any, exchange: str, routing_key: str, topo: Topology) -> str | None:
    """Why ``msg`` must not be applied, given where it came from; None if it may.

    Orders and cancels are what the router sent to an executor: only from ``qa.exec`` with the
    account's key. Status reports and trades are what an executor sent: only from ``qa.report``
    with ``<account>.order`` / ``<account>.trade``. Anything else (a well-formed order published to
    ``qa.report``, a trade published to ``qa.exec``, a report under another account's key) would
    move money or positions that no executor moved.
    """
    try:
        if isinstance(msg, (Order, Cancel)):
            want_exchange, want_key = topo.exec, keys.exec_key(msg.account)
        else:
            kind = "trade" if isinstance(msg, Trade) else "order"
            want_exchange, want_key = topo.report, keys.report_key(msg.account, kind)
    except keys.KeyError_ as exc:
        return f"{msg.schema}: account {msg.account!r} cannot be a routing key ({exc})"
    if exchange != want_exchange or routing_key != want_key:
        return (f"{msg.schema} for account {msg.account!r} arrived from exchange {exchange!r} key {routing_key!r}; "
                f"it is only accepted from {want_exchange!r} key {want_key!r}")
    return None


class AccountService:
    """Accounts in memory, saved on every change. Thread-safe (one lock)."""

    def __init__(self, store: AccountStore, *, interval: float = 0.5) -> None:
        self.store = store
        self.interval = interval
        self.lock = threading.RLock()
        self.accounts: dict[str, tuple[Account, int]] = {}
        self.last_snapshot: dict[str, float] = {}
        self.dirty: set[str] = set()       # changed since the last snapshot
        self.unsaved: set[str] = set()     # marked to market, not saved yet
        for a in store.ids():
            self._load(a)

    def _load(self, name: str) -> tuple[Account, int] | None:
        got = self.store.load(name)
        if got is None:
            self.accounts.pop(name, None)
            return None
        self.accounts[name] = got
        self.unsaved.discard(name)
        self.dirty.add(name)
        return got

    def instruments(self) -> set[tuple[str, str]]:
        with self.lock:
            return {(p.exchange, p.symbol) for acc, _ in self.accounts.values() for p in acc if not p.is_flat}

    # -- messages ---------------------------------------------------------------------
    def handle(self, msg: Any) -> bool:
        """Apply one order / status report / trade; persisted before returning. True if changed."""
        account = msg.account
        with self.lock:
            for attempt in (1, 2):
                got = self.accounts.get(account) or self._load(account)
                if got is None:
                    raise Reject(f"account {account!r} was never opened (qaflow account open --account {account} "
                                 f"--cash N)")
                acc, rev = got
                changed = self._apply(acc, msg)
                log.debug("%s %s: changed=%s", msg.schema, getattr(msg, "trade_id", None) or msg.order_id, changed)
                if not changed and account not in self.unsaved:
                    return False
                try:
                    self.accounts[account] = (acc, self.store.save(acc, rev))
                except StaleAccount:
                    if attempt == 2:
                        raise
                    log.info("account document changed elsewhere: reloading", extra={"account": account})
                    self._load(account)
                    continue
                self.unsaved.discard(account)
                self.dirty.add(account)
                return changed
        return False

    @staticmethod
    def _apply(acc: Account, msg: Any) -> bool:
        if isinstance(msg, Order):
            try:
                return acc.on_order(msg)
            except AccountError as exc:
                # the executor decides; the account only mirrors. A fill of this order will be
                # dead-lettered (unknown order) for an operator to look at.
                log.warning("order %s cannot be frozen: %s", msg.order_id, exc,
                            extra={"account": msg.account, "order_id": msg.order_id})
                return False
        if isinstance(msg, OrderStatusReport):
            if msg.status in (OrderStatus.CANCELLED, OrderStatus.REJECTED):
                return acc.on_cancel(msg.order_id, traded=msg.traded, reason=msg.status.value)
            return False
        if isinstance(msg, Trade):
            try:
                return acc.on_trade(msg)
            except UnknownOrderError as exc:
                raise Reject(str(exc)) from None
            except AccountError as exc:
                raise Reject(f"trade {msg.trade_id}: {exc}") from None
        return False

    def on_tick(self, tick: Tick) -> None:
        key = f"{tick.exchange}.{tick.symbol}"
        with self.lock:
            for name, (acc, _) in self.accounts.items():
                p = acc.positions.get(key)
                if p is not None and p.last_price != tick.last_price:
                    acc.on_price(tick.exchange, tick.symbol, tick.last_price)
                    self.unsaved.add(name)
                    self.dirty.add(name)

    # -- flusher ------------------------------------------------------------------------
    def due_snapshots(self, now: float, *, force: bool = False) -> list[AccountSnapshot]:
        """Save marks and make the snapshots that are due (throttled per account)."""
        out = []
        with self.lock:
            for name in sorted(self.dirty):
                if not force and now - self.last_snapshot.get(name, 0.0) < self.interval:
                    continue
                got = self.accounts.get(name)
                if got is None:
                    self.dirty.discard(name)
                    continue
                acc, rev = got
                if name in self.unsaved:
                    try:
                        self.accounts[name] = (acc, self.store.save(acc, rev))
                        self.unsaved.discard(name)
                    except StaleAccount:
                        acc, _ = self._load(name) or (acc, rev)
                q = acc.to_qifi()
                out.append(AccountSnapshot(account_cookie=name, trading_day=q["trading_day"], accounts=q["accounts"],
                                           positions=q["positions"], orders=q["orders"], trades=q["trades"],
                                           frozen=q["frozen"]))
                self.dirty.discard(name)
                self.last_snapshot[name] = now
        return out

    def refresh(self) -> None:
        """Reload documents changed by someone else (``open``, ``settle``)."""
        revs = {str(d["_id"]): int(d.get("rev", 0)) for d in self.store.coll.find({}, {"rev": 1})}
        with self.lock:
            for name, rev in revs.items():
                got = self.accounts.get(name)
                if got is None or got[1] != rev:
                    self._load(name)


# the daemon -------------------------------------------------------------------------------
def _db(settings: Settings) -> Any:
    from handlers.broker import _mongo_db

    return _mongo_db(settings)


def run_daemon(args: argparse.Namespace) -> int:
    from handlers.broker import Runner
    from qapubsub.sync import Connection, Consumer, Publisher

    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 <pid>`: every thread's stack to stderr
    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    db = _db(settings)
    service = AccountService(AccountStore(db), interval=args.snapshot_interval)
    log.info("accounts loaded", extra={"accounts": sorted(service.accounts)})
    runner = Runner()

    tick_conn = Connection(settings, client_name="qaflow-account-ticks")
    initial = [Binding(topo.tick, keys.tick_key(ex, sym)) for ex, sym in sorted(service.instruments())]

    def on_tick(msg: Any, _d: Any) -> None:
        for t in (msg.ticks if isinstance(msg, TickBatch) else (msg,)):
            service.on_tick(t)

    ticks = Consumer(tick_conn, topo.live_queue("", *initial), on_tick, message_type=Tick | TickBatch,
                     topology=topo, prefetch=1000, ack_every=100)
    runner.start(ticks, "ticks")

    rep_conn = Connection(settings, client_name="qaflow-account-reports")

    def on_report(msg: Any, d: Any) -> None:
        why = source_error(msg, d.exchange, d.routing_key, topo)
        if why is not None:
            raise Reject(why)   # dead-lettered with the reason, never applied
        service.handle(msg)
        if isinstance(msg, Trade):
            ticks.bind(topo.tick, keys.tick_key(msg.exchange.value, msg.symbol))

    reports = Consumer(rep_conn, topo.account_reports.with_bindings(Binding(topo.exec, keys.ALL)), on_report,
                       message_type=Order | Cancel | OrderStatusReport | Trade, topology=topo, prefetch=200)
    runner.start(reports, "reports")

    stop_flusher = threading.Event()
    flush_conn = Connection(settings, client_name="qaflow-account-snapshots")
    pub = Publisher(flush_conn, topology=topo, mandatory=False)

    def flush(force: bool = False) -> None:
        for snap in service.due_snapshots(time.monotonic(), force=force):
            pub.publish(topo.report, keys.report_key(snap.account_cookie, "account"), snap, persistent=False)

    def flusher() -> None:
        last_refresh = 0.0
        while not stop_flusher.wait(min(0.1, args.snapshot_interval / 2)):
            try:
                if time.monotonic() - last_refresh > 1.0:
                    service.refresh()
                    last_refresh = time.monotonic()
                flush()
            except Exception as exc:  # noqa: BLE001 - keep flushing; the next round retries
                log.warning("snapshot flush failed: %s", exc)

    ft = threading.Thread(target=flusher, name="flusher", daemon=True)
    ft.start()
    deadline = time.monotonic() + 30
    while not (reports.ready.is_set() and ticks.ready.is_set()) and time.monotonic() < deadline \
            and not runner.stop_event.is_set():
        time.sleep(0.05)
    log.info("account daemon ready")
    runner.wait_for_signal()
    runner.stop([[reports], [ticks]])
    stop_flusher.set()
    ft.join(10)
    try:
        flush(force=True)
    except Exception as exc:  # noqa: BLE001
        log.warning("last snapshot not published: %s", exc)
    flush_conn.close()
    if runner.errors:
        return 1
    log.info("account daemon stopped")
    return 0


# commands -------------------------------------------------------------------------------------
def _store() -> AccountStore:
    return AccountStore(_db(Settings.from_env()))


def run_open(args: argparse.Namespace) -> int:
    store = _store()
    try:
        acc = store.open(args.account, args.cash, trading_day=args.trading_day)
    except AccountExists as exc:
        print(f"qaflow: {exc}", file=sys.stderr)
        return 1
    except AccountError as exc:
        print(f"qaflow: {exc}", file=sys.stderr)
        return 2
    print(f"opened {acc.account_cookie} with {acc.balance:,.2f}")
    return 0


def run_instrument(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in ("margin_rate", "open_ratio", "open_per_lot", "close_ratio",
                                            "close_per_lot", "close_today_ratio", "close_today_per_lot",
                                            "multiplier", "price_tick") if getattr(args, k) is not None}
    table = InstrumentTable(_db(Settings.from_env()))
    try:
        print(json.dumps(table.configure(args.key, **params)))
    except (ValueError, KeyError) as exc:
        print(f"qaflow: {exc}", file=sys.stderr)
        return 2
    return 0


def _parse_prices(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        try:
            if not sep or "." not in key:
                raise ValueError
            out[key] = float(val)
        except ValueError:
            raise SystemExit(f"qaflow: --price {item!r}: expected EXCHANGE.symbol=PRICE") from None
    return out


def run_settle(args: argparse.Namespace) -> int:
    store = _store()
    prices = _parse_prices(args.price or [])
    for _ in range(5):
        got = store.load(args.account)
        if got is None:
            print(f"qaflow: no account {args.account!r}", file=sys.stderr)
            return 1
        acc, rev = got
        try:
            expired = acc.settle(prices, next_trading_day=args.next_day)
        except AccountError as exc:
            print(f"qaflow: {exc}", file=sys.stderr)
            return 1
        try:
            store.save(acc, rev)
        except StaleAccount:
            continue
        print(f"settled {args.account}: balance {acc.balance:,.2f}, {len(expired)} working orders expired")
        return 0
    print("qaflow: the account kept changing; try again", file=sys.stderr)
    return 1


def _fmt(x: float) -> str:
    return f"{x:,.2f}"


def render(doc: dict[str, Any]) -> str:
    a = doc["accounts"]
    lines = [f"account {doc['account_cookie']}   trading day {doc.get('trading_day') or '-'}   rev {doc.get('rev')}",
             "  balance {b}  available {av}  margin {m}  frozen {f}  position profit {pp}  close profit {cp}  "
             "commission {c}  risk {r:.2%}".format(
                 b=_fmt(a["balance"]), av=_fmt(a["available"]), m=_fmt(a["margin"]),
                 f=_fmt(a["frozen_margin"] + a["frozen_commission"]), pp=_fmt(a["position_profit"]),
                 cp=_fmt(a["close_profit"]), c=_fmt(a["commission"]), r=a["risk_ratio"])]
    pos = doc.get("positions") or {}
    if pos:
        lines.append(f"  {'position':<16}{'long td/yd':>12}{'short td/yd':>13}{'last':>10}{'pos.profit':>13}"
                     f"{'margin':>14}")
        for k, p in sorted(pos.items()):
            lines.append(f"  {k:<16}{p['volume_long_today']:>6}/{p['volume_long_his']:<5}"
                         f"{p['volume_short_today']:>7}/{p['volume_short_his']:<5}{p['last_price']:>10g}"
                         f"{_fmt(p['position_profit']):>13}{_fmt(p['margin']):>14}")
    working = [o for o in (doc.get("orders") or {}).values() if o.get("status") == "ALIVE"]
    if working:
        lines.append(f"  {'working order':<24}{'instrument':<16}{'dir':<5}{'offset':<11}{'price':>10}{'vol':>6}"
                     f"{'left':>6}")
        for o in working:
            lines.append(f"  {o['order_id']:<24}{o['exchange_id'] + '.' + o['instrument_id']:<16}{o['direction']:<5}"
                         f"{o['offset']:<11}{o['limit_price']:>10g}{o['volume_orign']:>6}{o['volume_left']:>6}")
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    docs = _store().docs(args.account or None)
    if args.account and not docs:
        print(f"qaflow: no account {', '.join(args.account)}", file=sys.stderr)
        return 1
    if args.json:
        for d in docs:
            d.pop("seen_trade_ids", None)
        print(json.dumps(docs, default=str, indent=1))
    else:
        print("\n\n".join(render(d) for d in docs) or "no accounts")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--snapshot-interval", type=float, default=0.5, help="seconds between snapshots per account")
    parser.set_defaults(_account_run=run_daemon)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = False
    r = sub.add_parser("run", help="the account daemon (the default)")
    r.set_defaults(_account_run=run_daemon)
    o = sub.add_parser("open", help="open an account with an initial deposit")
    o.add_argument("--account", required=True)
    o.add_argument("--cash", type=float, required=True)
    o.add_argument("--trading-day", default="")
    o.set_defaults(_account_run=run_open)
    i = sub.add_parser("instrument", help="set an instrument's margin rate / fees (account_instruments)")
    i.add_argument("--key", required=True, help="EXCHANGE.symbol")
    for f in ("margin-rate", "open-ratio", "open-per-lot", "close-ratio", "close-per-lot", "close-today-ratio",
              "close-today-per-lot", "multiplier", "price-tick"):
        i.add_argument(f"--{f}", type=float, default=None)
    i.set_defaults(_account_run=run_instrument)
    s = sub.add_parser("settle", help="daily settlement at the given prices (else the last marks)")
    s.add_argument("--account", required=True)
    s.add_argument("--price", action="append", metavar="EXCHANGE.symbol=PRICE")
    s.add_argument("--next-day", default="", help="next trading day, YYYYMMDD")
    s.set_defaults(_account_run=run_settle)
    sh = sub.add_parser("show", help="balance, margin, positions and working orders")
    sh.add_argument("--account", action="append")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(_account_run=run_show)


def run(args: argparse.Namespace) -> int:
    return int(args._account_run(args))


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow account"))
