"""``qaflow strategy``: run one strategy (a :class:`qamarket.strategy.Strategy` subclass) live.

::

    qaflow strategy qamarket.strategies.ma_cross:MaCross --accounts acc1,acc2 \\
        --symbol SHFE.rb2605 --freq 1min --param fast=5 slow=20 volume=2
    qaflow strategy mypkg.mystrat:MyStrategy --group g1 --id my-strat-1

Start-up, in this order (so no bar falls between history and live):

1. declare two bounded live queues (``Topology.live_queue``: exclusive, ``x-max-length``,
   drop-head) and their bindings: *market* (``qa.ibar`` -- or ``qa.bar`` with ``--bars bar`` --
   key ``<freq>.<EX>.<symbol>`` per series; ``qa.rtbar`` if ``wants_realtime``; ``qa.tick`` if
   ``wants_ticks``) and *reports* (``qa.report`` ``<account>.order|trade|account|reject`` of
   each bound account, or of each member of the group plus ``<group>.reject``);
2. load the positions of the followed accounts from the QIFI documents in ``accounts``;
3. ask the barhandler for history + today's closed bars of every series
   (:class:`qamarket.rpc.HistoryClient`) -> ``on_init``; ``on_start``;
4. loop: drain the reports queue, then take market messages, with ``basic_get``.

Why one thread, one connection and ``basic_get`` polling: strategy callbacks must run on one
thread (user code holds no locks; vn.py and QAStrategy run them the same way), pika's
``BlockingConnection`` is not thread-safe, and the reports must be applied *before* the next
bar is handed to ``on_bar`` so that ``pos`` is current (the router drains its risk queue before
each order for the same reason). Two consumers on one channel would interleave both streams
in arrival order instead. ``basic_get`` costs a round trip per message (thousands per second
on loopback), far more than one strategy's bars, reports and the ticks of its instruments.
Live queues are read with ``auto_ack``: they are exclusive, so a crash deletes them anyway;
what a restart needs (positions, history) is reloaded from MongoDB and the barhandler.

Orders and cancels go to ``qaorder`` (routing key = account or group) through a confirmed,
``mandatory`` :class:`qapubsub.sync.Publisher` on the same connection; a message not yet
confirmed stays in the engine's outbox and is sent again (same id) after a reconnect.
After a reconnect the queues are declared again, the positions reloaded and the bars missed
meanwhile fetched from the barhandler (deduplicated by label).

Exit codes: 0 after SIGTERM/SIGINT (the event in hand is finished, the outbox flushed),
1 when a callback raised under ``--halt-on-error``, 2 bad arguments, 3 no barhandler reply.
"""
from __future__ import annotations

import argparse
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from qamarket.models import Bar, Tick, TickBatch
from qamarket.rpc import HistoryError, HistoryTimeout, IndicatorBar
from qamarket.strategy import (
    Strategy, StrategyEngine, StrategyHalted, Target, load_strategy_class, parse_instrument, parse_params,
)
from qaorder.models import AccountSnapshot, Order, OrderStatusReport, Reject, Trade
from qapubsub import keys
from qapubsub.errors import Backoff
from qapubsub.messages import DecodeError, decode
from qapubsub.settings import ConfigError, Settings, mongo_client
from qapubsub.topology import Binding, Topology

log = logging.getLogger(__name__)

FREQS = ("1min", "5min", "15min", "30min", "60min", "1day")
REPORT_KINDS = ("order", "trade", "account", "reject")
_ID = re.compile(r"^[A-Za-z0-9_\-]{1,40}$")
REPORT_TYPE = OrderStatusReport | Trade | Reject | AccountSnapshot
EXIT_HALTED, EXIT_CONNECT = 1, 3


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("strategy", metavar="module:Class", help="e.g. qamarket.strategies.ma_cross:MaCross")
    tgt = parser.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--accounts", help="comma-separated accounts: one order per account")
    tgt.add_argument("--group", help="an account group: one order keyed by the group, the router fans it out")
    parser.add_argument("--symbol", action="append", metavar="EX.symbol",
                        help="instrument (repeatable; the first is the main one); default SHFE.rb2605")
    parser.add_argument("--freq", action="append", choices=FREQS, help="bar frequency (repeatable); default 1min")
    parser.add_argument("--param", action="extend", nargs="+", default=[], metavar="name=value",
                        help="strategy parameters, e.g. --param fast=5 slow=20 volume=2")
    parser.add_argument("--id", dest="strategy_id", default=None,
                        help="strategy id, in every order id and order's strategy_id (default: the class name, "
                             "lower case); give distinct ids to two runs of one class on one account")
    parser.add_argument("--bars", choices=("ibar", "bar"), default="ibar",
                        help="live closed bars from qa.ibar (barhandler, default) or qa.bar (tickhandler)")
    parser.add_argument("--history", type=int, default=None, help="bars of history per series (default: the "
                                                                   "class's history_bars)")
    parser.add_argument("--history-timeout", type=float, default=30.0, help="seconds to wait for the barhandler")
    parser.add_argument("--no-history", action="store_true", help="start without asking the barhandler")
    parser.add_argument("--halt-on-error", action="store_true",
                        help="exit 1 when a callback raises (default: log it, count it, go on)")
    parser.add_argument("--live-max-length", type=int, default=10_000, help="bound of each live queue")
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")


def build(args: argparse.Namespace, db: Any) -> tuple[Strategy, Target]:
    """The strategy instance and its target from the arguments; ConfigError names what is wrong."""
    try:
        cls = load_strategy_class(args.strategy)
    except (ValueError, ImportError, AttributeError) as exc:
        raise ConfigError(f"strategy {args.strategy!r}: {exc}") from None
    try:
        params = parse_params(args.param)
        instruments = [parse_instrument(s) for s in (args.symbol or ["SHFE.rb2605"])]
        for ex, sym in instruments:
            keys.tick_key(ex, sym)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    sid = args.strategy_id or cls.__name__.lower()
    if not _ID.match(sid):
        raise ConfigError(f"--id {sid!r}: use 1-40 letters, digits, '-' or '_'")
    try:
        strategy = cls(sid, instruments=instruments, freqs=args.freq or ["1min"], params=params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{args.strategy}: {exc}") from None
    try:
        if args.accounts is not None:
            accounts = tuple(dict.fromkeys(keys.order_key(a.strip()) for a in args.accounts.split(",") if a.strip()))
            if not accounts:
                raise ConfigError("--accounts: give at least one account")
            target = Target(accounts=accounts)
        else:
            group = keys.order_key(args.group)
            doc = db["groups"].find_one({"_id": group})  # the router's groups (qaorder.store)
            if doc is None or not doc.get("members"):
                raise ConfigError(f"--group {group!r}: no such group with members (qaflow follow / groups)")
            target = Target(group=group, members=tuple(dict.fromkeys(doc["members"])))
    except keys.KeyError_ as exc:
        raise ConfigError(str(exc)) from None
    return strategy, target


class StrategyRunner:
    """One strategy, one thread, one pika connection (see the module doc)."""

    def __init__(self, settings: Settings, args: argparse.Namespace, db: Any, strategy: Strategy,
                 target: Target) -> None:
        from qapubsub.sync import Connection, Publisher

        self.settings = settings
        self.args = args
        self.db = db
        self.topo = topo = Topology(settings.namespace if args.namespace is None else args.namespace)
        self.strategy = strategy
        self.target = target
        self.engine = StrategyEngine(strategy, target, halt_on_error=args.halt_on_error)
        self.conn = Connection(settings, client_name=f"qaflow-strategy-{strategy.strategy_id}")
        self.pub = Publisher(self.conn, topology=topo)
        self.stop_event = threading.Event()
        self.backoff = Backoff()
        tag = uuid.uuid4().hex[:8]
        bar_ex = topo.ibar if args.bars == "ibar" else topo.bar
        self.series = [(ex, sym, f) for ex, sym in strategy.instruments for f in strategy.freqs]
        market = [Binding(bar_ex, keys.bar_key(f, ex, sym)) for ex, sym, f in self.series]
        if strategy.wants_realtime:
            market += [Binding(topo.rtbar, keys.bar_key(f, ex, sym)) for ex, sym, f in self.series]
        if strategy.wants_ticks:
            market += [Binding(topo.tick, keys.tick_key(ex, sym)) for ex, sym in strategy.instruments]
        reports = [Binding(topo.report, keys.report_key(a, k)) for a in target.report_accounts for k in REPORT_KINDS]
        if target.group:
            reports.append(Binding(topo.report, keys.report_key(target.group, "reject")))
        sid = strategy.strategy_id
        self.market_q = topo.live_queue(topo.name(f"qa.strategy.{sid}.market.{tag}"), *market,
                                        max_length=args.live_max_length)
        self.report_q = topo.live_queue(topo.name(f"qa.strategy.{sid}.reports.{tag}"), *reports,
                                        max_length=args.live_max_length)
        self._ch: Any = None
        self._gen = -1
        self.counts = {"decode_errors": 0, "reconnects": 0, "published": 0, "unroutable": 0, "publish_retries": 0}

    # -- set-up ---------------------------------------------------------------------------------
    def _channel(self) -> Any:
        """The polling channel, with both queues declared and bound; after a reconnect the positions
        are reloaded and missed bars fetched."""
        conn = self.conn.ensure()
        if self._ch is not None and self._ch.is_open and self._gen == self.conn.generation:
            return self._ch
        ch = conn.channel()
        self.topo.declare_sync(ch, queues=(self.market_q, self.report_q))
        reconnect = self._gen != -1
        self._ch, self._gen = ch, self.conn.generation
        log.info("queues ready", extra={"queues": [self.market_q.name, self.report_q.name]})
        if reconnect:
            self.counts["reconnects"] += 1
            self.load_accounts()
            if self.strategy.inited:
                self.catch_up()
        return ch

    def load_accounts(self) -> None:
        for acc in self.target.report_accounts:
            self.engine.load_account(acc, self.db["accounts"].find_one({"_id": acc}))
        log.info("positions loaded", extra={"accounts": list(self.target.report_accounts),
                                            "pos": {a: {k: p.net for k, p in b.positions.items()}
                                                    for a, b in self.engine.books.items()}})

    def _history(self, count: int | None = None) -> dict[tuple[str, str, str], list[Bar]]:
        from qamarket.rpc import HistoryClient

        out: dict[tuple[str, str, str], list[Bar]] = {}
        n = count or self.args.history or self.strategy.history_bars
        with HistoryClient(self.conn.url or self.settings.amqp_url, topology=self.topo,
                           timeout=self.args.history_timeout) as hc:
            for ex, sym, freq in self.series:
                reply = hc.request(sym, ex, freq, count=n, indicators=list(self.strategy.indicators),
                                   include_current=False)
                out[(ex, sym, freq)] = reply.bars
                log.info("history %s: %d bars", keys.bar_key(freq, ex, sym), len(reply.bars))
        return out

    def catch_up(self) -> None:
        """Bars closed while the connection was down (the dedupe by label drops the known ones)."""
        try:
            hist = self._history(count=100)
        except (HistoryTimeout, HistoryError) as exc:
            log.warning("could not fetch the bars missed during the reconnect: %s", exc)
            return
        for bars in hist.values():
            for b in bars:
                self.engine.on_bar(b, None)

    # -- the loop -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Publish the outbox in order; what is not confirmed stays for the next round."""
        from qapubsub.errors import Unroutable

        while self.engine.outbox:
            key, msg = self.engine.outbox[0]
            try:
                self.pub.publish(self.topo.order, keys.order_key(key), msg)
            except Unroutable as exc:
                self.engine.outbox.pop(0)
                self.counts["unroutable"] += 1
                log.error("%s %s unroutable on %s: %s", msg.schema, msg.order_id, self.topo.order, exc,
                          extra={"order_id": msg.order_id, "account": key})
                if isinstance(msg, Order):
                    self.engine.on_report(Reject(account=key, field="account", reason=f"unroutable: {exc}",
                                                 order_id=msg.order_id))
                continue
            self.engine.outbox.pop(0)
            self.counts["published"] += 1

    def _dispatch_market(self, exchange: str, props: Any, body: bytes) -> None:
        t = self.topo
        if exchange == t.tick:
            msg = decode(body, Tick | TickBatch)
            for tick in (msg.ticks if isinstance(msg, TickBatch) else (msg,)):
                self.engine.on_tick(tick)
        elif exchange == t.ibar:
            ib = decode(body, IndicatorBar)
            self.engine.on_bar(ib.bar, props.message_id, ib.indicators)
        else:
            self.engine.on_bar(decode(body, Bar), props.message_id if exchange == t.bar else None)

    def poll(self, max_market: int = 50) -> int:
        """Drain the reports, then up to ``max_market`` market messages (reports first after each)."""
        ch = self._channel()
        n = 0
        for _ in range(max_market):
            while not self.stop_event.is_set():
                method, props, body = ch.basic_get(self.report_q.name, auto_ack=True)
                if method is None:
                    break
                n += 1
                try:
                    self.engine.on_report(decode(body, REPORT_TYPE))
                except DecodeError as exc:
                    self.counts["decode_errors"] += 1
                    log.warning("undecodable report dropped: %s", exc, extra={"routing_key": method.routing_key})
                self.flush()
            if self.stop_event.is_set():
                break
            method, props, body = ch.basic_get(self.market_q.name, auto_ack=True)
            if method is None:
                break
            n += 1
            try:
                self._dispatch_market(method.exchange, props, body)
            except DecodeError as exc:
                self.counts["decode_errors"] += 1
                log.warning("undecodable market message dropped: %s", exc,
                            extra={"routing_key": method.routing_key, "message_id": props.message_id})
            self.flush()
        return n

    def start(self) -> None:
        self._channel()          # bind first: nothing closed after the history request is missed
        self.load_accounts()
        history = {} if self.args.no_history else self._history()
        self.engine.init(history)
        self.flush()
        log.info("strategy %s ready: %s -> %s", self.strategy.strategy_id, [keys.bar_key(f, e, s) for e, s, f in
                                                                             self.series],
                 self.target.accounts or f"group {self.target.group} {list(self.target.members)}")

    def run(self) -> int:
        from qapubsub.errors import FatalError, Interrupted
        from qapubsub.sync import CONNECTION_ERRORS
        import pika.exceptions as pex

        failures = 0
        last_stats = time.monotonic()
        try:
            while not self.stop_event.is_set():
                try:
                    n = self.poll()
                    self.flush()
                    failures = 0
                    if n == 0:
                        self.conn.ensure().process_data_events(time_limit=0.05)
                except (StrategyHalted, FatalError):
                    raise
                except Interrupted:
                    continue
                except CONNECTION_ERRORS + (pex.ChannelClosed, pex.AMQPError) as exc:  # type: ignore[operator]
                    failures += 1
                    self.counts["publish_retries"] += 1
                    log.warning("connection problem, reconnecting: %s", f"{type(exc).__name__}: {exc}")
                    self._ch = None
                    self.conn.lost(exc)
                    self.stop_event.wait(self.backoff.delay(failures - 1))
                except Exception as exc:  # noqa: BLE001 - e.g. PublishError after retries: keep the outbox, retry
                    failures += 1
                    log.error("loop error: %s", f"{type(exc).__name__}: {exc}", exc_info=True)
                    self.stop_event.wait(self.backoff.delay(failures - 1))
                if time.monotonic() - last_stats > 60:
                    last_stats = time.monotonic()
                    log.info("stats %s %s", self.engine.stats(), self.counts)
        except StrategyHalted as exc:
            log.error("halting (--halt-on-error): %s", exc)
            return EXIT_HALTED
        finally:
            try:
                self.engine.stop()
                self.flush()
            except Exception as exc:  # noqa: BLE001
                log.warning("on stop: %s", exc)
            self.conn.close()
            log.info("strategy %s stopped: %s %s", self.strategy.strategy_id, self.engine.stats(), self.counts)
        return 0


def run(args: argparse.Namespace) -> int:

    from handlers.cli import CannotConnect

    settings = Settings.from_env()
    client = mongo_client(settings)
    db = client[settings.mongo_db]
    strategy, target = build(args, db)
    runner = StrategyRunner(settings, args, db, strategy, target)

    def stop_while_starting(signum: int, _frame: Any) -> None:
        log.info("signal %s while starting: exiting", signal.Signals(signum).name)
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_while_starting)
    try:
        runner.start()
    except HistoryTimeout as exc:
        runner.conn.close()
        raise CannotConnect(str(exc)) from None
    except HistoryError as exc:
        runner.conn.close()
        raise ConfigError(str(exc)) from None
    except StrategyHalted as exc:
        log.error("halting (--halt-on-error): %s", exc)
        runner.conn.close()
        return EXIT_HALTED

    def on_signal(signum: int, _frame: Any) -> None:
        if runner.stop_event.is_set():
            raise SystemExit(128 + signum)
        log.info("signal %s: stopping after the event in hand", signal.Signals(signum).name)
        runner.stop_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        return runner.run()
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    from handlers.cli import run_module

    return run_module(__name__, argv, "qaflow strategy")


if __name__ == "__main__":
    raise SystemExit(main())
