"""``qaflow broker``: broker executors. ``sim`` is the paper-trading executor.

::

    qaflow broker sim --account A [--account B ...] [--namespace NS]

(``ctp`` / ``qmt`` subcommands are added by their own modules: see :data:`EXECUTORS`.)

The sim executor consumes each account's exec queue (``Topology.exec_queue(account)``,
quorum, durable) and a live tick queue (bounded, exclusive) bound at run time to the
instruments it has working orders for, matches with :class:`brokers.sim.SimBook` and
publishes ``OrderStatusReport`` / ``Trade`` / ``Reject`` to ``qa.report``
(``<account>.order|trade|reject``) with the confirmed :class:`~qapubsub.sync.Publisher`.

Crash safety: every change of an order is written to MongoDB (``sim_orders``, with the
encoded events in an *outbox*) BEFORE its events are published and BEFORE the exec
message is acked; the outbox is cleared after the publisher confirms and re-published
at start. Trade ids are ``<order_id>-<fill n>`` and report ids ``<order_id>.r<n>``, so a
re-published event repeats the same ids. A redelivered order (same order id) is found in
``sim_orders`` and is not placed again; a redelivered cancel is found by its message id.

Threads: pika's BlockingConnection is not thread-safe, so each consumer runs in its own
thread on its own :class:`~qapubsub.sync.Connection` (one per exec queue, one for ticks)
with its own publisher. ``Consumer`` offers no way to drive two consumers from one loop
without reaching into its internals, and a thread per queue keeps a slow MongoDB write on
one account from delaying the others' acks. The matching books are shared, behind one
lock: a fill from a tick and a cancel never interleave. SIGTERM/SIGINT: stop the exec
consumers (message in hand finishes, is persisted, published and acked), then the tick
consumer; exit 0. A second signal exits at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from brokers.sim import Quote, SimBook, SimOrder
from qaaccount.store import OutboxItem, SimStateStore
from qamarket.models import Tick, TickBatch
from qaorder.models import Cancel, Order, OrderStatusReport, Reject, Trade
from qapubsub import keys
from qapubsub.messages import Message, encode
from qapubsub.settings import Settings
from qapubsub.topology import Binding, Topology

log = logging.getLogger(__name__)

#: broker name -> (configure, run) ; others register ``ctp`` / ``qmt`` here
EXECUTORS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _kind(msg: Message) -> str:
    if isinstance(msg, Trade):
        return "trade"
    if isinstance(msg, OrderStatusReport):
        return "order"
    return "reject"


def _order_id(msg: Message) -> str | None:
    return getattr(msg, "order_id", None)


class SimService:
    """The executor's I/O-free-ish core: books + persistence + publishing (a publisher is passed in
    by the calling thread). Thread-safe."""

    def __init__(self, db: Any, accounts: Sequence[str], topology: Topology,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.topo = topology
        self.store = SimStateStore(db)
        self.books = {a: SimBook(a, clock=clock) for a in accounts}
        self.outbox: dict[str, list[OutboxItem]] = {}
        self.cancel_ids: dict[str, list[str]] = {}
        self.lock = threading.RLock()
        for a, book in self.books.items():
            for d in self.store.load(a):
                so = SimOrder.from_doc(d)
                book.orders[so.order.order_id] = so
                self.outbox[so.order.order_id] = [OutboxItem.from_doc(x) for x in d.get("outbox", [])]
                self.cancel_ids[so.order.order_id] = list(d.get("cancel_ids", []))
            log.info("sim book restored", extra={"account": a, "orders": len(book.orders),
                                                 "working": len(book.working())})

    def instruments(self) -> set[tuple[str, str]]:
        """(exchange, symbol) of every working order."""
        with self.lock:
            return {(so.order.exchange.value, so.order.symbol) for b in self.books.values() for so in b.working()}

    # -- commands ----------------------------------------------------------------------
    def on_order(self, order: Order, publisher: Any) -> None:
        with self.lock:
            book = self.books.get(order.account)
            if book is None:   # cannot happen with per-account exec queues; be explicit anyway
                book = next(iter(self.books.values()))
            if order.order_id in book.orders:
                log.info("order seen before: not placed again", extra={"order_id": order.order_id})
                self._publish_pending(book.account, [order.order_id], publisher)
                return
            self._commit(book, book.place(order), publisher)

    def on_cancel(self, cancel: Cancel, publisher: Any) -> None:
        with self.lock:
            book = self.books.get(cancel.account) or next(iter(self.books.values()))
            if cancel.id in self.cancel_ids.get(cancel.order_id, ()):
                self._publish_pending(book.account, [cancel.order_id], publisher)
                return
            events = book.cancel(cancel)
            touched: list[str] = []
            so = book.orders.get(cancel.order_id)
            if so is not None and so.order.account == cancel.account:
                self.cancel_ids.setdefault(cancel.order_id, []).append(cancel.id)
                touched.append(cancel.order_id)
            self._commit(book, events, publisher, touched=touched)

    def on_tick(self, tick: Tick, publisher: Any) -> None:
        q = Quote.from_tick(tick)
        with self.lock:
            for book in self.books.values():
                events = book.on_quote(q)
                if events:
                    self._commit(book, events, publisher)

    def publish_all_pending(self, publisher: Any) -> int:
        with self.lock:
            n = 0
            for a, book in self.books.items():
                ids = [oid for oid, items in self.outbox.items() if items and oid in book.orders]
                n += sum(len(self.outbox[i]) for i in ids)
                self._publish_pending(a, ids, publisher)
            return n

    # -- persistence + publishing ---------------------------------------------------------
    def _commit(self, book: SimBook, events: list[Message], publisher: Any, touched: Iterable[str] = ()) -> None:
        affected: list[str] = list(touched)
        loose: list[OutboxItem] = []
        for e in events:
            item = OutboxItem(_kind(e), e.id, e.schema, encode(e).decode())
            oid = _order_id(e)
            if oid in book.orders and not isinstance(e, Reject):
                self.outbox.setdefault(oid, []).append(item)
                affected.append(oid)
            else:
                loose.append(item)
        affected = list(dict.fromkeys(affected))
        # 1. persist (state + outbox) -- before anything is published or acked
        self.store.save(book.account, [(book.orders[o].to_doc(), self.outbox.get(o, []), self.cancel_ids.get(o, []))
                                       for o in affected])
        # 2. publish, confirmed; 3. clear the outbox
        for item in loose:
            self._send(book.account, item, publisher)
        self._publish_pending(book.account, affected, publisher)

    def _publish_pending(self, account: str, order_ids: Iterable[str], publisher: Any) -> None:
        done = []
        for oid in order_ids:
            items = self.outbox.get(oid) or []
            for item in items:
                self._send(account, item, publisher)
            if items:
                done.append(oid)
        if done:
            self.store.clear_outbox(done)
            for oid in done:
                self.outbox[oid] = []

    def _send(self, account: str, item: OutboxItem, publisher: Any) -> None:
        publisher.publish(self.topo.report, keys.report_key(account, item.kind), item.body.encode(),
                          properties={"message_id": item.message_id, "type": item.type,
                                      "content_type": "application/json"},
                          mandatory=item.kind != "reject")


# wiring -------------------------------------------------------------------------------------
def _mongo_db(settings: Settings) -> Any:
    import pymongo

    from handlers.cli import CannotConnect

    client = pymongo.MongoClient(settings.mongo_url, serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001
        raise CannotConnect(f"MongoDB: {type(exc).__name__}: {exc}") from None
    return client[settings.mongo_db]


class Runner:
    """Consumers in threads, stopped together on a signal."""

    def __init__(self) -> None:
        self.threads: list[tuple[Any, threading.Thread]] = []
        self.errors: list[BaseException] = []
        self.stop_event = threading.Event()

    def start(self, consumer: Any, name: str) -> None:
        def target() -> None:
            try:
                consumer.run()
            except BaseException as exc:  # noqa: BLE001
                log.error("consumer %s failed: %s", name, exc)
                self.errors.append(exc)
                self.stop_event.set()

        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append((consumer, t))

    def wait_for_signal(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            if self.stop_event.is_set():
                os._exit(128 + signum)
            log.info("signal %s: draining", signal.Signals(signum).name)
            self.stop_event.set()

        for s in signals:
            signal.signal(s, on_signal)
        while not self.stop_event.wait(0.2):
            pass

    def stop(self, groups: Sequence[Sequence[Any]]) -> None:
        """Stop consumers group by group (each group drained before the next is stopped)."""
        by_consumer = {id(c): (c, t) for c, t in self.threads}
        for group in groups:
            for c in group:
                c.stop()
            for c in group:
                _, t = by_consumer[id(c)]
                t.join(30)
                c.connection.close()


def run_sim(args: argparse.Namespace) -> int:
    from qapubsub.sync import Connection, Consumer, Publisher

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    accounts = list(dict.fromkeys(args.account))
    for a in accounts:
        keys.exec_key(a)   # validates the name
    db = _mongo_db(settings)
    service = SimService(db, accounts, topo)

    # declare: exchanges, the exec queues and the account daemon's queue, so no report is lost
    # while the account daemon is down; then re-publish what a crash left unconfirmed
    boot = Connection(settings, client_name="qaflow-broker-sim")
    try:
        ch = boot.channel()
        # (the account daemon's queue with its qa.exec binding: the child order is what freezes funds)
        topo.declare_sync(ch, queues=[topo.dead_letters, topo.account_reports.with_bindings(Binding(topo.exec, keys.ALL)),
                                      *(topo.exec_queue(a) for a in accounts)])
        n = service.publish_all_pending(Publisher(boot, topology=topo))
        if n:
            log.info("re-published %d unconfirmed events after a restart", n)
    except Exception as exc:  # noqa: BLE001
        from handlers.cli import CannotConnect
        from qapubsub.sync import TransportError

        if isinstance(exc, (TransportError, OSError)):
            raise CannotConnect(f"RabbitMQ: {exc}") from None
        raise
    finally:
        boot.close()

    runner = Runner()
    tick_conn = Connection(settings, client_name="qaflow-broker-sim-ticks")
    tick_pub = Publisher(tick_conn, topology=topo)

    def on_tick(msg: Any, _d: Any) -> None:
        for t in (msg.ticks if isinstance(msg, TickBatch) else (msg,)):
            service.on_tick(t, tick_pub)

    initial = [Binding(topo.tick, keys.tick_key(ex, sym)) for ex, sym in sorted(service.instruments())]
    tick_consumer = Consumer(tick_conn, topo.live_queue("", *initial), on_tick, message_type=Tick | TickBatch,
                             topology=topo, prefetch=1000, ack_every=100)
    runner.start(tick_consumer, "ticks")

    tick_keys: set[str] = set()
    exec_consumers = []
    for a in accounts:
        conn = Connection(settings, client_name=f"qaflow-broker-sim-{a}")
        pub = Publisher(conn, topology=topo)

        def on_exec(msg: Any, _d: Any, pub: Any = pub) -> None:
            if isinstance(msg, Order):
                # bind the instrument's ticks first: once NOTTRADED is out, its ticks reach us
                # (once per instrument: bind() is a cross-thread round trip; it is restored on reconnects)
                tkey = keys.tick_key(msg.exchange.value, msg.symbol)
                if tkey not in tick_keys:
                    tick_consumer.bind(topo.tick, tkey)
                    tick_keys.add(tkey)
                service.on_order(msg, pub)
            else:
                service.on_cancel(msg, pub)

        c = Consumer(conn, topo.exec_queue(a), on_exec, message_type=Order | Cancel, topology=topo, prefetch=50)
        exec_consumers.append(c)
        runner.start(c, f"exec-{a}")
    deadline = time.monotonic() + 30
    while not all(c.ready.is_set() for c in (*exec_consumers, tick_consumer)) and not runner.stop_event.is_set():
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    log.info("sim executor ready", extra={"accounts": accounts})
    runner.wait_for_signal()
    runner.stop([exec_consumers, [tick_consumer]])
    errors = runner.errors
    if errors:
        log.error("stopped after an error: %s", errors[0])
        return 1
    log.info("sim executor stopped")
    return 0


def _configure_sim(p: argparse.ArgumentParser) -> None:
    p.add_argument("--account", action="append", required=True, help="account to execute for (repeatable)")
    p.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")


EXECUTORS["sim"] = (_configure_sim, run_sim)


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    def call(*a: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), attr)(*a)
    return call


# (the SDKs, vn.py and xtquant, are imported only when the executor starts)
EXECUTORS["ctp"] = (_lazy("brokers.ctp.td", "configure"), _lazy("brokers.ctp.td", "run"))
EXECUTORS["qmt"] = (_lazy("brokers.qmt.executor", "configure"), _lazy("brokers.qmt.executor", "run"))


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="broker", metavar="BROKER")
    sub.required = True
    helps = {"sim": "paper trading: match child orders against live ticks, report fills",
             "ctp": "China futures through vnpy_ctp: one process per CTP account",
             "qmt": "A-shares through MiniQMT (xtquant, Windows): one process per account"}
    for name, (conf, run_) in EXECUTORS.items():
        p = sub.add_parser(name, help=helps.get(name, name))
        p.set_defaults(_broker_run=run_)
        conf(p)


def run(args: argparse.Namespace) -> int:
    return int(args._broker_run(args))


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow broker"))
