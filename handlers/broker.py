"""``qaflow broker``: broker executors. ``sim`` is the paper-trading executor.

::

    qaflow broker sim --account A [--account B ...] [--namespace NS]

(``ctp`` / ``qmt`` subcommands are added by their own modules: see :data:`EXECUTORS`.)

The sim executor consumes each account's exec queue (``Topology.exec_queue(account)``,
quorum, durable) and a live tick queue (bounded, exclusive) bound at run time to the
instruments it has working orders for, matches with :class:`brokers.sim.SimBook` and
publishes ``OrderStatusReport`` / ``Trade`` / ``Reject`` to ``qa.report``
(``<account>.order|trade|reject``).

Batches, like the router: every queue is consumed with :class:`qapubsub.batch.BatchConsumer`
(a batch is what one I/O read delivered, ``batch_wait`` 0: a lone order waits for nothing;
up to 200 orders / 1 000 tick messages). Per batch (:class:`SimService`): all orders/cancels
(or quotes) applied to the books, ONE ``bulk_write`` of the changed ``sim_orders`` documents
with their outbox, every report published persistent + ``mandatory`` on a
:class:`~qapubsub.sync.StreamPublisher` with ONE wait for all confirms, then ONE
multiple-ack. Outboxes are emptied lazily (by the next batch's write or a 0.2 s timer):
see :class:`SimService` for why that is safe.

Crash safety: every change of an order is written to MongoDB (``sim_orders``, with the
encoded events in an *outbox*) BEFORE its events are published and BEFORE the exec
message is acked; the stored outbox is emptied only after the publisher confirmed it and
is re-published at start. Trade ids are ``<order_id>-<fill n>`` and report ids
``<order_id>.r<n>``, so a re-published event repeats the same ids. A redelivered order
(same order id) is found in ``sim_orders`` and is not placed again; a redelivered cancel
is found by its message id.

Threads: pika's BlockingConnection is not thread-safe, so each consumer runs in its own
thread on its own :class:`~qapubsub.sync.Connection` (one per exec queue, one for ticks)
with its own publisher. ``Consumer`` offers no way to drive two consumers from one loop
without reaching into its internals, and a thread per queue keeps a slow MongoDB write on
one account from delaying the others' acks. The matching books are shared, behind one
lock, held over a whole batch: a fill from a tick and a cancel never interleave. SIGTERM/SIGINT:
stop the exec consumers (the batch in hand finishes, is persisted, published and acked; the
lazy outbox clears are written), then the tick consumer; exit 0. A second signal exits at once.
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

from pymongo.errors import PyMongoError

from brokers.sim import Quote, SimBook, SimOrder
from qaaccount.store import OutboxItem, SimStateStore
from qamarket.models import Tick, TickBatch
from qaorder.models import Cancel, Order, OrderStatusReport, Reject, Trade
from qapubsub import keys
from qapubsub.errors import Unroutable
from qapubsub.handling import Transient
from qapubsub.messages import Message, encode
from qapubsub.settings import Settings, mongo_client
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


class _Staged:
    """What one batch changed: order ids to write (per account) and events to publish, in order."""

    __slots__ = ("write", "publish", "seen", "rejects")

    def __init__(self) -> None:
        self.write: dict[str, str] = {}                      # order id -> account (documents to rewrite)
        self.publish: list[tuple[str, OutboxItem]] = []      # (account, event) in the order they happened
        self.seen: dict[str, None] = {}                      # order ids whose outbox is in ``publish`` (ordered)
        self.rejects: set[str] = set()                       # message ids of Reject reports (not mandatory)


class SimService:
    """The executor's core: books + persistence + publishing, one batch at a time. Thread-safe
    (one lock over a whole batch: apply, write, publish, confirm -- so a fill from a tick and a
    cancel never interleave and an order's reports leave in the order they were made).

    Per batch (:meth:`on_commands` for an exec queue's orders/cancels, :meth:`on_ticks` for quotes):

    1. every command/quote is applied to the books (pure); a redelivered order (id already in
       the book) is not placed again, a redelivered cancel (message id in ``cancel_ids``) not
       applied again -- their unconfirmed events, if any, are re-published;
    2. ONE ``bulk_write`` (:meth:`SimStateStore.commit`) replaces every changed ``sim_orders``
       document with its outbox (the encoded events) -- BEFORE anything is published or acked;
       the same write empties the outboxes that earlier batches got confirmed (lazy clear);
    3. every event is published (persistent, ``mandatory``) on a :class:`~qapubsub.sync.StreamPublisher`
       and the batch waits ONCE for all confirms (``gather()``); a returned order/trade report
       raises :class:`~qapubsub.errors.Unroutable` (nothing acked, outbox kept); a returned
       Reject is ignored (no queue binds ``<account>.reject``: it was never mandatory);
    4. the in-memory outboxes are emptied and their ids remembered as *to clear*; the consumer
       then acks the batch with one multiple-ack.

    Lazy outbox clear, why it is safe: the stored outbox is always a *superset* of the events
    not yet confirmed -- an event enters it (step 2) before it is published and leaves it only
    after its confirm (the next batch's write, :meth:`idle` after ``clear_delay`` s, or the stop).
    A kill -9 in the window between a confirm and the clear re-publishes at start events that
    were already delivered, with the SAME message ids (trade ``<order_id>-<n>``, report
    ``<order_id>.r<n>``): consumers de-duplicate by id (the account daemon by trade id), so the
    cost is a duplicate *delivery*, never a duplicate trade; the eager clear had the same window
    (between the confirm and its ``update_many``), only shorter. It saves one MongoDB round trip
    per batch (~1 ms on nx-27017). A document rewritten in step 2 gets its in-memory outbox,
    which never holds confirmed events, so it is cleared by the same write.

    A failed write (MongoDB down) leaves the batch unacked (``Transient``: requeued without
    counting attempts); the books already hold its changes, so the ids are kept as *unsaved*
    and rewritten by the next write -- a redelivered order found in the book is thus persisted
    before it is acked.
    """

    def __init__(self, db: Any, accounts: Sequence[str], topology: Topology,
                 clock: Callable[[], int] = time.time_ns, clear_delay: float = 0.2) -> None:
        self.topo = topology
        self.store = SimStateStore(db)
        self.books = {a: SimBook(a, clock=clock) for a in accounts}
        self.outbox: dict[str, list[OutboxItem]] = {}
        self.cancel_ids: dict[str, list[str]] = {}
        self.account_of: dict[str, str] = {}       # order id -> the book holding it
        self.to_clear: dict[str, str] = {}         # order id -> account: outbox confirmed, stored copy not emptied yet
        self.unsaved: dict[str, str] = {}          # order id -> account: changed in a book, write failed
        self.retry: dict[str, str] = {}            # order id -> account: publishing its events failed
        self._clear_since = 0.0
        self.clear_delay = clear_delay
        self.counts = {"batches": 0, "writes": 0, "published": 0}
        self.lock = threading.RLock()
        for a, book in self.books.items():
            for d in self.store.load(a):
                so = SimOrder.from_doc(d)
                book.orders[so.order.order_id] = so
                self.account_of[so.order.order_id] = a
                self.outbox[so.order.order_id] = [OutboxItem.from_doc(x) for x in d.get("outbox", [])]
                self.cancel_ids[so.order.order_id] = list(d.get("cancel_ids", []))
            log.info("sim book restored", extra={"account": a, "orders": len(book.orders),
                                                 "working": len(book.working())})

    def instruments(self) -> set[tuple[str, str]]:
        """(exchange, symbol) of every working order."""
        with self.lock:
            return {(so.order.exchange.value, so.order.symbol) for b in self.books.values() for so in b.working()}

    def _book(self, account: str) -> SimBook:
        # cannot miss with per-account exec queues; be explicit anyway (the book rejects the order)
        return self.books.get(account) or next(iter(self.books.values()))

    # -- batches -----------------------------------------------------------------------------
    def on_commands(self, commands: Iterable[Order | Cancel], publisher: Any) -> None:
        """Orders and cancels of one batch, in delivery order: apply, ONE write, publish, ONE confirm wait."""
        with self.lock:
            st = self._begin()
            for cmd in commands:
                if isinstance(cmd, Order):
                    book = self._book(cmd.account)
                    if cmd.order_id in book.orders:
                        log.info("order seen before: not placed again", extra={"order_id": cmd.order_id})
                        self._touch(st, book.account, cmd.order_id, write=False)
                        continue
                    self._stage(st, book, book.place(cmd))
                else:
                    book = self._book(cmd.account)
                    if cmd.id in self.cancel_ids.get(cmd.order_id, ()):
                        self._touch(st, book.account, cmd.order_id, write=False)
                        continue
                    events = book.cancel(cmd)
                    touched: list[str] = []
                    so = book.orders.get(cmd.order_id)
                    if so is not None and so.order.account == cmd.account:
                        self.cancel_ids.setdefault(cmd.order_id, []).append(cmd.id)
                        touched.append(cmd.order_id)
                    self._stage(st, book, events, touched)
            self._commit(st, publisher)

    def on_ticks(self, ticks: Iterable[Tick], publisher: Any) -> None:
        """Quotes of one batch: match them all, then ONE write and ONE confirm wait (if anything filled)."""
        quotes = [Quote.from_tick(t) for t in ticks]
        with self.lock:
            st = self._begin()
            for q in quotes:
                for book in self.books.values():
                    events = book.on_quote(q)
                    if events:
                        self._stage(st, book, events)
            if st.publish or st.write:
                self._commit(st, publisher)

    # one-message forms (tests, tools)
    def on_order(self, order: Order, publisher: Any) -> None:
        self.on_commands([order], publisher)

    def on_cancel(self, cancel: Cancel, publisher: Any) -> None:
        self.on_commands([cancel], publisher)

    def on_tick(self, tick: Tick, publisher: Any) -> None:
        self.on_ticks([tick], publisher)

    def publish_all_pending(self, publisher: Any) -> int:
        """At start: re-publish every stored outbox (same message ids), confirm, clear."""
        with self.lock:
            st = _Staged()
            for oid, items in self.outbox.items():
                if items and oid in self.account_of:
                    self._touch(st, self.account_of[oid], oid, write=False)
            n = len(st.publish)
            self._commit(st, publisher)
            self.flush_clears()
            return n

    def idle(self) -> None:
        """From the consumers' loops: empty the stored outboxes confirmed ``clear_delay`` s ago or more
        when no batch came to do it."""
        if self.to_clear and time.monotonic() - self._clear_since >= self.clear_delay:
            self.flush_clears()

    def flush_clears(self) -> None:
        with self.lock:
            if self.to_clear or self.unsaved:
                self._write(_Staged())

    # -- staging -------------------------------------------------------------------------------
    def _begin(self) -> _Staged:
        st = _Staged()
        for oid, acc in list(self.retry.items()):   # events a failed batch left unconfirmed go out first
            self._touch(st, acc, oid, write=False)
        self.retry.clear()
        return st

    def _touch(self, st: _Staged, account: str, oid: str, write: bool = True) -> None:
        if oid not in st.seen:   # first time in this batch: its unconfirmed events go out first
            st.seen[oid] = None
            st.publish.extend((account, item) for item in self.outbox.get(oid) or ())
        if write:
            st.write[oid] = account

    def _stage(self, st: _Staged, book: SimBook, events: list[Message], touched: Iterable[str] = ()) -> None:
        for oid in touched:
            self.account_of.setdefault(oid, book.account)
            self._touch(st, book.account, oid)
        for e in events:
            item = OutboxItem(_kind(e), e.id, e.schema, encode(e).decode())
            oid = _order_id(e)
            if oid in book.orders and not isinstance(e, Reject):
                self.account_of.setdefault(oid, book.account)
                self._touch(st, book.account, oid)
                self.outbox.setdefault(oid, []).append(item)
                st.publish.append((book.account, item))
            else:   # a Reject of a cancel: not stored (the cancel is redelivered if it is lost)
                if isinstance(e, Reject):
                    st.rejects.add(e.id)
                st.publish.append((book.account, item))

    # -- persistence + publishing ---------------------------------------------------------
    def _write(self, st: _Staged) -> None:
        for oid, acc in st.write.items():
            self.unsaved[oid] = acc
        rows = []
        for oid, acc in self.unsaved.items():
            book = self.books[acc]
            rows.append((acc, book.orders[oid].to_doc(), self.outbox.get(oid, []), self.cancel_ids.get(oid, [])))
        clear = [oid for oid in self.to_clear if not self.outbox.get(oid)]
        try:
            if self.store.commit(rows, clear):
                self.counts["writes"] += 1
        except PyMongoError as exc:
            raise Transient(f"sim_orders: {type(exc).__name__}: {exc}") from exc
        self.unsaved.clear()
        for oid in clear:
            self.to_clear.pop(oid, None)

    def _commit(self, st: _Staged, publisher: Any) -> None:
        try:
            # 1. persist (state + outbox, and the lazy clears) -- before anything is published or acked
            self._write(st)
            if not st.publish:
                return
            # 2. publish everything, ONE wait for the confirms
            for account, item in st.publish:
                self._send(account, item, publisher)
            returned = publisher.gather()
            bad = [m for m in returned if m not in st.rejects]
            if bad:
                account, item = next((a, i) for a, i in st.publish if i.message_id == bad[0])
                raise Unroutable(self.topo.report, keys.report_key(account, item.kind), bad[0])
        except BaseException:
            for oid in st.seen:   # not confirmed: re-published by the next batch (and at start)
                self.retry[oid] = self.account_of.get(oid, "")
            raise
        # 3. confirmed: the stored outboxes are emptied by the next write (or idle()/stop)
        if not self.to_clear:
            self._clear_since = time.monotonic()
        for oid in st.seen:
            if self.outbox.get(oid):
                self.outbox[oid] = []
                self.to_clear[oid] = self.account_of.get(oid, "")
        self.counts["batches"] += 1
        self.counts["published"] += len(st.publish)

    def _send(self, account: str, item: OutboxItem, publisher: Any) -> None:
        publisher.publish(self.topo.report, keys.report_key(account, item.kind), item.body.encode(),
                          properties={"message_id": item.message_id, "type": item.type,
                                      "content_type": "application/json", "delivery_mode": 2})


# wiring -------------------------------------------------------------------------------------
def _mongo_db(settings: Settings) -> Any:

    from handlers.cli import CannotConnect

    client = mongo_client(settings)
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
    from qapubsub.batch import BatchConsumer
    from qapubsub.sync import Connection, StreamPublisher

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
        n = service.publish_all_pending(StreamPublisher(boot, topology=topo, persistent=True, mandatory=True,
                                                        batch_size=100_000))
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

    def batch_consumer(conn: Any, queue: Any, handler: Any, message_type: Any, size: int) -> Any:
        # a batch is what one I/O read delivered (batch_wait 0: a lone order waits for nothing)
        c = BatchConsumer(conn, queue, handler, message_type=message_type, topology=topo, batch_size=size,
                          batch_wait=0.0, prefetch=2 * size, on_idle=service.idle, idle_interval=0.05,
                          on_stop=service.flush_clears)
        c.poll_interval = 0.02   # process_data_events returns early on a delivery anyway
        return c

    def stream_publisher(conn: Any) -> Any:
        # reports: persistent, mandatory (returns tracked by message id), confirms gathered per batch
        return StreamPublisher(conn, topology=topo, persistent=True, mandatory=True, batch_size=100_000, io_every=50)

    tick_conn = Connection(settings, client_name="qaflow-broker-sim-ticks")
    tick_pub = stream_publisher(tick_conn)

    def on_ticks(items: Sequence[tuple[Any, Any]]) -> None:
        ticks: list[Tick] = []
        for msg, _d in items:
            ticks.extend(msg.ticks if isinstance(msg, TickBatch) else (msg,))
        service.on_ticks(ticks, tick_pub)

    initial = [Binding(topo.tick, keys.tick_key(ex, sym)) for ex, sym in sorted(service.instruments())]
    tick_consumer = batch_consumer(tick_conn, topo.live_queue("", *initial), on_ticks, Tick | TickBatch, 1000)
    runner.start(tick_consumer, "ticks")

    tick_keys: set[str] = set()
    exec_consumers = []
    for a in accounts:
        conn = Connection(settings, client_name=f"qaflow-broker-sim-{a}")
        pub = stream_publisher(conn)

        def on_exec(items: Sequence[tuple[Any, Any]], pub: Any = pub) -> None:
            for msg, _d in items:
                if isinstance(msg, Order):
                    # bind the instrument's ticks first: once NOTTRADED is out, its ticks reach us
                    # (once per instrument: bind() is a cross-thread round trip, made outside the
                    # service lock; it is restored on reconnects)
                    tkey = keys.tick_key(msg.exchange.value, msg.symbol)
                    if tkey not in tick_keys:
                        tick_consumer.bind(topo.tick, tkey)
                        tick_keys.add(tkey)
            service.on_commands([msg for msg, _d in items], pub)

        c = batch_consumer(conn, topo.exec_queue(a), on_exec, Order | Cancel, 200)
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
    log.info("sim executor stopped", extra=dict(service.counts))
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
