"""``qaflow router``: the order router daemon (pika, one connection).

Consumes ``router_orders`` (``qaorder`` ``#`` and ``QAORDER_ROUTER`` once per known
account/group key) and ``router_risk`` (force-close / release / halt / resume from ``qarisk``), routes
orders with :func:`qaorder.routing.route` and publishes the children to ``qa.exec``
(key = account; confirms + mandatory: no executor queue => Reject report).

Batches. The orders queue is consumed with :class:`qapubsub.batch.BatchConsumer`: a batch is
up to ``batch_size`` (200) deliveries, or whatever one I/O read delivered (``batch_wait`` 0:
a lone order waits for nothing, a burst is routed in bulk). Per batch (:meth:`Router.on_batch`):

1. the risk commands already pushed to the router are handled -- risk first, see below;
   the routing configuration version is read if 0.2 s have passed since the last read;
2. every order is decoded and routed (pure); pre-trade checks per child (the risk gate's
   account read is served from one ``$in`` read of the batch's accounts; the gate is told of
   each accepted child before the next check, so counting limits see earlier orders of the
   batch); an order id seen earlier in the same batch is a duplicate;
3. ONE unordered ``insert_many`` of the plans (``_id`` = order id; each plan keeps its
   routing decisions): the duplicate-key errors of that write are the redeliveries -- their
   stored plans are read (one ``$in`` read, only when there are any): ``planned`` ones are
   resumed (their unconfirmed children re-published with the stored bodies and the SAME
   message ids; their decisions audited if their audit document is missing), ``routed``/
   ``rejected`` ones -- and ``planned`` ones whose earlier batch is still being marked --
   audited as ``duplicate`` and skipped;
4. every child is published (persistent, ``mandatory``) on a
   :class:`qapubsub.sync.StreamPublisher` and the router waits ONCE for all confirms; a child
   the broker returned (tracked by message id: RabbitMQ sends ``basic.return`` before the ack
   of that message) becomes a Reject report for that child (``child_orders`` status REJECTED,
   the plan's child gets ``error``);
5. the rest is handed to the writer thread (:func:`_write_batches`) and the next batch is
   routed meanwhile: ONE audit document for the batch's decisions, then ONE bulk write marking
   the orders ``routed`` (or ``rejected``: no child accepted), with the children's flags for
   those with returned children. The writes of batches waiting together (or within 5 ms) are
   coalesced into one ``insert_many`` and one bulk write. Only then is the batch acked (the
   batch consumer's pipelining: in order, one multiple-ack, at most 8 batches in flight).

A crash, or a failed write, anywhere before the ack leaves the batch unacked (a failed write
requeues it and every later batch in flight): the redelivery finds the plans (step 3) and
publishes only what is not marked, with the same message ids; executors de-duplicate by
order id / message id. A cancel inside a batch ends the run of orders before it (they are
planned, published and marked first) and is handled alone, in delivery order; a cancel or a
force-close first waits for every batch's marks (it reads the plans).

Risk first. The risk queue is consumed on its own channel of the router's connection, on
pika's channel implementation: a command lands in the router's inbox the moment its frames
are read -- in any I/O, also while a batch waits for confirms -- not when pika gets round to
dispatching it. The inbox is handled (a) at the start of *every batch*, (b) as soon as the
consumer loop wakes for it, and (c) before the orders consumer starts (what waits on the
queue then is fetched with ``basic_get``). So every force-close that reached the router
before a batch starts is applied (reduce-only) before any order of that batch is routed --
including orders delivered before the command; one arriving while a batch is being routed
applies from the next batch. (Until session 3 the queue was polled with ``basic_get`` before
every batch: 0.5-1.1 ms a batch on the quorum queue, for the same guarantee.) A command that
fails is requeued with every command after it (the risk channel is closed and made again),
so a release never overtakes the force-close before it. Why not an ordinary second consumer:
pika delivers both consumers' messages in arrival order through one dispatch, so a
force-close could wait behind a prefetched batch of orders.

Halt / resume. A Halt refuses every new order of the account from the next batch on --
closing ones too, unlike a force-close's reduce-only -- with a Reject naming the command;
working orders stay and cancels pass; a Resume lifts it (``account_state.halted``, read at
start). Both come from the risk identity only, like force-close and release.

Idempotency. Force-close, release, halt and resume are idempotent by ``command_id`` (``processed``), cancels
by message id; their children go out with the same gathered publisher.

Quotes for force-close pricing: the last stored tick of each instrument
(:meth:`qamarket.store.TickStore.last_tick`, collection ``ticks`` of the same database,
written by the tickhandler). Price mode ``QA_FORCECLOSE_PRICE`` = ``LIMIT_PRICE``
(default: sell at limit-down / buy at limit-up) or ``TICKS`` (best opposite price +- 5 ticks).
A position without a usable quote is skipped and audited, never priced by guess.

Instruments (lot size, price tick): :func:`qamarket.models.spec_for`, the registry.

Pre-trade rules: ``qaflow router`` passes a :class:`handlers.risk.RiskGate` as ``risk_check``
(``--no-risk-rules`` to skip): it checks each child first (rejections name the rule,
``risk.<rule>.<check>``), is told of dispatched children, force-closes and releases, and
consumes executor reports and ticks on its own bounded queue of this connection (see
``docs/risk.md``).

Order status updates from ``qa.report`` are left to the account daemon. ``child_orders`` holds
only status exceptions the router sets (REJECTED, PENDING_CANCEL); accepted children live in
their parent's plan (``OrderStore.working_children`` derives an account's working children for
force-close planning).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qaorder.dialects import decode_order
from qaorder.models import Cancel, ForceClose, Halt, Offset, Order, OrderRejected, OrderStatus, Release, Resume
from qaorder.models import Reject as RejectReport
from qaorder.routing import FollowerRule, PriceMode, Sizing, plan_force_close, route, route_cancel
from qaorder.store import OrderStore
from qapubsub import handling, keys
from qapubsub.coalesce import CoalescingWriter
from qapubsub.messages import DecodeError, Message, decode, encode
from qapubsub.settings import Settings, mongo_client
from qapubsub.topology import Binding, Topology, declare_queue_sync

log = logging.getLogger(__name__)

RiskCheck = Callable[[Order, "RiskContext"], Any]

#: batches whose MongoDB marks are still being written while the next ones are routed
PIPELINE_DEPTH = 8
#: risk commands the broker may push ahead of their handling
RISK_PREFETCH = 100
#: the writer thread waits this long after a batch's writes for later batches' writes to join them
WRITE_LINGER = 0.005


def _noop() -> None:
    pass


@dataclass
class RiskContext:
    """What the pre-trade hook gets besides the child order."""

    parent: Order
    dialect: str
    reduce_only: bool
    store: OrderStore
    extra: dict[str, Any] = field(default_factory=dict)

    def account_doc(self, account: str) -> dict[str, Any] | None:
        return self.store.account_doc(account)


class _Instruments:
    """``"EXCHANGE.symbol" -> InstrumentSpec`` (lot_size, price_tick) from the qamarket registry."""

    def get(self, key: str, default: Any = None) -> Any:
        from qamarket.models import spec_for

        ex, _, sym = key.partition(".")
        try:
            return spec_for(sym, ex)
        except Exception:  # noqa: BLE001 - unknown instrument: the caller skips with the reason
            return default


def _word(value: str | None) -> str:
    try:
        return keys.exec_key(value or "")
    except keys.KeyError_:
        return "_unknown"


def _rejection(result: Any, child: Order) -> tuple[str, str] | None:
    """A risk hook's answer as (field, reason), None for accept."""
    if result is None or result is True:
        return None
    if hasattr(result, "ok") and getattr(result, "ok"):
        return None
    if hasattr(result, "rejection") and not hasattr(result, "to_order_rejected"):  # a Decision
        result = result.rejection or "rejected by the risk check"
    if hasattr(result, "to_order_rejected"):
        err = result.to_order_rejected(child)
        return err.field, err.reason
    if isinstance(result, OrderRejected):
        return result.field or "risk", result.reason
    return "risk", str(result)


class _BatchAccounts:
    """Account documents read once per batch: ``find_one({"_id": a})`` of the risk gate and the
    equity sizing are served from ONE ``find({"_id": {"$in": [...]}})`` of every account the
    batch touches (cleared before each batch, so never older than the batch). Anything else
    goes to the real collection."""

    def __init__(self, coll: Any) -> None:
        self.coll = coll
        self._wanted: set[str] = set()
        self._docs: dict[str, dict[str, Any] | None] = {}

    def clear(self) -> None:
        self._wanted.clear()
        self._docs.clear()

    def want(self, accounts: Iterable[str]) -> None:
        self._wanted.update(accounts)

    def get(self, account: str) -> dict[str, Any] | None:
        if account not in self._docs:
            ids = sorted((self._wanted | {account}) - set(self._docs))
            found = {d["_id"]: d for d in self.coll.find({"_id": {"$in": ids}})}
            for i in ids:
                self._docs[i] = found.get(i)
        return self._docs[account]

    def equities(self, accounts: Iterable[str]) -> dict[str, float]:
        self.want(accounts)
        out: dict[str, float] = {}
        for a in dict.fromkeys(accounts):
            bal = ((self.get(a) or {}).get("accounts") or {}).get("balance")
            if isinstance(bal, (int, float)):
                out[a] = float(bal)
        return out

    def find_one(self, query: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(query, dict) and set(query) == {"_id"} and isinstance(query["_id"], str) and not args and not kw:
            return self.get(query["_id"])
        return self.coll.find_one(query, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.coll, name)


@dataclass
class _Writes:
    """What one routed batch still has to write after its confirms."""

    result: dict[int, str]                     # the batch's {delivery_tag: reason}, for the consumer
    audit: list[Any]                           # its audit records (ONE document)
    orders: list[str]                          # the plans whose decisions those records are
    states: dict[str, list[str]]               # plans to mark: {"routed"|"rejected": [ids]}
    sets: dict[str, dict[str, Any]]            # per plan: the children's flags (returned children)
    status_docs: list[dict[str, Any]]          # ``child_orders`` documents of returned children
    ts: int = field(default_factory=time.time_ns)
    future: Future[dict[int, str]] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


def _write_batches(store: OrderStore, jobs: list[_Writes]) -> None:
    """The writes of routed batches, coalesced by the router's writer thread: ONE ``insert_many``
    of their audit documents (one per batch), the status documents of returned children, then ONE
    ``finish_many`` of the plans in ``orders`` (so a plan is never marked before its decisions are
    audited). Fewer, larger writes leave the MongoDB server free for the plan inserts, which are on
    the order's path. Each batch's future is then done -- or failed, all of them together: the
    consumer requeues the first and everything after it."""
    from pymongo.errors import ConnectionFailure

    try:
        try:
            store.audit_batches([(w.audit, w.orders, w.ts) for w in jobs])
            store.save_children([d for w in jobs for d in w.status_docs])
            states: dict[str, list[str]] = {}
            sets: dict[str, dict[str, Any]] = {}
            for w in jobs:
                for state, ids in w.states.items():
                    states.setdefault(state, []).extend(ids)
                sets.update(w.sets)
            store.finish_many("orders", states, sets)
        except ConnectionFailure as exc:   # MongoDB down: requeue after back-off, count no attempt
            raise handling.Transient(f"MongoDB: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - every batch of the write fails with it
        for w in jobs:
            w.future.set_exception(exc)
        return
    for w in jobs:
        w.future.set_result(w.result)


class Router:
    def __init__(self, settings: Settings, topology: Topology, db: Any, *, risk_check: RiskCheck | None = None,
                 connection: Any = None, risk_interval: float = 0.1, bindings_interval: float = 5.0,
                 price_mode: PriceMode | None = None, batch_size: int = 200, batch_wait: float = 0.0,
                 reload_interval: float = 0.2) -> None:
        from qapubsub.sync import Connection, Publisher, StreamPublisher

        self.settings = settings
        self.topo = topology
        self.store = OrderStore(db)
        self.db = db
        self.risk_check = risk_check
        # a RiskGate (handlers.risk) also wants dispatched orders, reports and force-closes
        self.risk_gate: Any = risk_check if hasattr(risk_check, "on_order_accepted") else None
        self.connection = connection or Connection(settings, client_name="qaflow-router")
        # children and reports: confirms gathered (one wait per batch), mandatory (returns tracked by
        # message id), persistent; dead letters of risk commands: confirm each
        self.exec_pub = StreamPublisher(self.connection, topology=topology, persistent=True, mandatory=True,
                                        batch_size=100_000, io_every=50)
        self.cmd_pub = Publisher(self.connection, topology=topology)
        self.reload_interval = reload_interval
        self._last_reload = 0.0
        self._audit_buf: list[Any] = []
        self._audit_orders: list[str] = []            # plans whose decisions are in _audit_buf
        self._states: dict[str, list[str]] = {}       # this batch's marks of its plans ...
        self._sets: dict[str, dict[str, Any]] = {}    # ... the flags of their returned children ...
        self._status_docs: list[dict[str, Any]] = []  # ... and those children's child_orders documents
        # the batches' writes, in order; those handed over within WRITE_LINGER s of the first waiting
        # one are coalesced (_write_batches)
        self._writer: CoalescingWriter[_Writes] = CoalescingWriter(
            lambda jobs: _write_batches(self.store, jobs), name="qaflow-router-writes", linger=WRITE_LINGER)
        self._marking: list[str] = []                 # this batch's plans, marked by its writes
        self._unmarked: dict[str, Future[Any]] = {}   # plans published, marks maybe not landed yet
        self._accounts = _BatchAccounts(self.store.accounts)
        if self.risk_gate is not None and hasattr(getattr(self.risk_gate, "orders", None), "accounts"):
            self.risk_gate.orders.accounts = self._accounts   # its per-child account read, once per batch
        self.instruments = _Instruments()
        mode = price_mode or PriceMode(os.environ.get("QA_FORCECLOSE_PRICE", PriceMode.LIMIT_PRICE.value))
        self.price_mode = mode
        self.risk_interval = risk_interval
        self.bindings_interval = bindings_interval
        self._version = -1
        self.rules: list[FollowerRule] = []
        self.groups: dict[str, list[str]] = {}
        self.reduce_only: set[str] = set()
        self.halted: dict[str, dict[str, Any]] = {}   # account -> the Halt that blocks it (command_id, reason)
        self._risk_ch: Any = None
        self._risk_gen = -1
        self._risk_inbox: deque[tuple[int, Any, Any, bytes]] = deque()
        self._last_risk = 0.0
        self._last_bindings = 0.0
        self._bound: set[str] = set()
        self.counts = {"orders": 0, "children": 0, "rejected": 0, "duplicates": 0, "cancels": 0, "forceclose": 0}
        self.reload(force=True)
        self.consumer = _RouterConsumer(self, self.connection, topology.router_orders.with_bindings(
            *(Binding(topology.qapubsub_order, k) for k in sorted(self._known_keys()))), self.on_batch,
            topology=topology, batch_size=batch_size, batch_wait=batch_wait, prefetch=max(50, 2 * batch_size),
            idle_interval=min(risk_interval, 0.05), pipeline_depth=PIPELINE_DEPTH)
        self._bound = {b.routing_key for b in self.consumer.bindings if b.exchange == topology.qapubsub_order}

    # configuration ----------------------------------------------------------------------
    def reload(self, force: bool = False) -> bool:
        self._last_reload = time.monotonic()
        v = self.store.version()
        if not force and v == self._version:
            return False
        self._version = v
        self.rules = self.store.load_rules()
        self.groups = self.store.load_groups()
        self.reduce_only = self.store.reduce_only_accounts()
        self.halted = self.store.halted_accounts()
        log.info("routing configuration loaded", extra={"version": v, "rules": len(self.rules),
                                                         "groups": len(self.groups)})
        return True

    def _known_keys(self) -> set[str]:
        out: set[str] = set(self.store.account_ids()) | set(self.groups)
        for members in self.groups.values():
            out.update(members)
        for r in self.rules:
            out.update((r.leader, r.follower))
        good = set()
        for k in out:
            try:
                good.add(keys.order_key(k))
            except keys.KeyError_:
                log.warning("account/group %r cannot be a routing key; not bound to QAORDER_ROUTER", k)
        return good

    def refresh_bindings(self) -> None:
        for k in sorted(self._known_keys() - self._bound):
            self.consumer.bind(self.topo.qapubsub_order, k)
            self._bound.add(k)
        self._last_bindings = time.monotonic()

    def idle(self) -> None:
        """Called from the consumer loop: serve the risk queue, refresh QAORDER_ROUTER bindings."""
        now = time.monotonic()
        if now - self._last_risk >= self.risk_interval:
            self.poll_risk()
        if now - self._last_bindings >= self.bindings_interval:
            self.refresh_bindings()
        if self.risk_gate is not None:
            self.risk_gate.periodic()

    # reports ----------------------------------------------------------------------------
    def report_reject(self, account: str | None, field_: str, reason: str, *, order_id: str | None = None,
                      dialect: str = "", routing_key: str = "") -> None:
        acc = _word(account or routing_key)
        msg = RejectReport(account=account or routing_key, field=field_, reason=reason, order_id=order_id,
                           dialect=dialect, routing_key=routing_key)
        self.exec_pub.publish(self.topo.report, keys.report_key(acc, "reject"), msg)   # gathered by the caller
        self.counts["rejected"] += 1

    # orders -----------------------------------------------------------------------------
    def on_order(self, body: bytes, delivery: Any) -> None:
        """One order as a batch of one (the batch consumer calls :meth:`on_batch`)."""
        why = self.on_batch([(body, delivery)])
        if isinstance(why, Future):
            why = why.result()
        if why:
            raise handling.Reject(next(iter(why.values())))

    def on_batch(self, items: Sequence[tuple[bytes, Any]]) -> dict[int, str] | Future[dict[int, str]]:
        """A batch of deliveries from ``router_orders``; returns ``{delivery_tag: reason}`` to dead-letter,
        or a future of it while the batch's MongoDB marks are written (:meth:`_submit_writes`).

        Risk first: the risk queue is drained before anything of the batch is routed, so every
        force-close the broker holds when the batch starts blocks opening orders of the whole
        batch. New orders are handled in runs (one plan insert, one gathered publish, one bulk
        state update, one audit document per run); a cancel ends the run before it (so it sees
        the plans of the orders before it) and is handled on its own, in delivery order.
        """
        from pymongo.errors import ConnectionFailure

        try:
            return self._on_batch(items)
        except ConnectionFailure as exc:   # MongoDB down: requeue after back-off, count no attempt
            raise handling.Transient(f"MongoDB: {exc}") from exc

    def _on_batch(self, items: Sequence[tuple[bytes, Any]]) -> dict[int, str] | Future[dict[int, str]]:
        self.poll_risk()                 # force-close / release first, always
        self._maybe_reload()
        self._accounts.clear()
        rejected: dict[int, str] = {}
        run: list[tuple[Order, str, Any]] = []
        for body, delivery in items:
            rk = delivery.routing_key
            try:
                msg, dialect = decode_order(body, rk)
            except OrderRejected as exc:
                self._audit_buf.append({"action": "reject", "parent_id": exc.order_id or "",
                                        "account": exc.account or rk, "detail": str(exc), "field": exc.field})
                self.report_reject(exc.account, exc.field, exc.reason, order_id=exc.order_id, routing_key=rk)
                rejected[delivery.delivery_tag] = f"{exc.field}: {exc.reason}" if exc.field else exc.reason
                continue
            if isinstance(msg, Cancel):
                self._route_run(run)
                run = []
                self._on_cancel(msg, delivery, body)
            else:
                run.append((msg, dialect, delivery))
        self._route_run(run)
        if self.exec_pub._pending:  # noqa: SLF001 - reports of rejects still unconfirmed
            self.exec_pub.gather()
        return self._submit_writes(rejected)

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._last_reload >= self.reload_interval:
            if self.reload():
                self.refresh_bindings()

    # the batch's writes after its confirms ---------------------------------------------------
    def _submit_writes(self, result: dict[int, str]) -> dict[int, str] | Future[dict[int, str]]:
        """Hand what the batch still has to write -- its ONE audit document, then the plans' marks
        (``routed``/``rejected``, returned children) -- to the writer thread (:func:`_write_batches`);
        the future's result is ``result``, and the batch consumer acks the batch only when it is
        done (in order). The next batch is routed meanwhile: the plans were inserted before
        anything was published, so a crash or a failed write before these marks land only means a
        redelivery, which resumes the plans (their children go out again with the same ids) and
        audits the decisions whose audit document is missing."""
        w = _Writes(result, self._audit_buf, self._audit_orders, self._states, self._sets, self._status_docs)
        marking = self._marking
        self._audit_buf, self._audit_orders, self._status_docs, self._marking = [], [], [], []
        self._states, self._sets = {}, {}
        if not (w.audit or w.orders or w.states or w.status_docs):
            return result
        fut = self._writer.put(w)
        for oid in marking:
            self._unmarked[oid] = fut
        return fut

    def _marking_ok(self, order_id: str) -> bool:
        """True if an earlier batch published this plan and its marks are landing or landed: a
        delivery of the same order now is a duplicate even though the read says ``planned``. (If
        those writes fail, the consumer requeues that batch and every later one, this included.)"""
        fut = self._unmarked.get(order_id)
        return fut is not None and (not fut.done() or fut.exception() is None)

    def _settle_writes(self) -> None:
        """Write what this batch has collected so far and wait for every batch's writes (a cancel or
        a force-close reads the plans); raises if this batch's own writes failed."""
        fut = self._submit_writes({})
        self._writer.wait_idle()
        if isinstance(fut, Future):
            fut.result()

    def close(self) -> None:
        """Let the writes in flight land and end the writer thread (after the consumer stopped)."""
        self._writer.close()

    def _child_entry(self, msg: Message, account: str, kind: str = "order") -> dict[str, Any]:
        return {"order_id": getattr(msg, "order_id"), "account": account, "routing_key": keys.exec_key(account),
                "message_id": msg.id, "type": msg.schema, "kind": kind, "body": encode(msg).decode(),
                "correlation_id": getattr(msg, "correlation_id", None), "confirmed": False, "error": None}

    def _child_doc(self, o: Order, status: str = OrderStatus.SUBMITTING.value) -> dict[str, Any]:
        return {"_id": o.order_id, "parent_id": o.parent_id or o.order_id, "account": o.account, "symbol": o.symbol,
                "exchange": o.exchange.value, "direction": o.direction.value, "offset": o.offset.value,
                "volume": o.volume, "price": o.price, "source": o.source, "status": status, "reason": "",
                "order": msgspec.to_builtins(o), "updated_ns": time.time_ns()}

    def _check_child(self, child: Order, parent: Order, dialect: str) -> tuple[str, str] | None:
        halt = self.halted.get(child.account)
        if halt is not None:             # a Halt refuses everything, closing orders too
            return "account", (f"account {child.account} is halted by {halt.get('command_id', '?')} "
                               f"({halt.get('reason') or 'no reason given'}): every new order is refused until "
                               f"a resume")
        if self.risk_gate is not None:   # the pre-trade rules first: their rejections name the rule
            ctx = RiskContext(parent=parent, dialect=dialect, reduce_only=child.account in self.reduce_only,
                              store=self.store)
            why = _rejection(self.risk_check(child, ctx), child)  # type: ignore[misc]
            if why is not None:
                return why
        if child.account in self.reduce_only and child.offset is Offset.OPEN:
            st = self.store.account_state.find_one({"_id": child.account}) or {}
            return "offset", (f"account {child.account} is reduce-only after force-close {st.get('command_id', '?')}: "
                              f"opening orders are refused until a release")
        if self.risk_check is not None and self.risk_gate is None:
            ctx = RiskContext(parent=parent, dialect=dialect, reduce_only=child.account in self.reduce_only,
                              store=self.store)
            return _rejection(self.risk_check(child, ctx), child)
        return None

    def _route_run(self, run: Sequence[tuple[Order, str, Any]]) -> None:
        """Route consecutive new orders: plan all, ONE insert_many, publish, gather, ONE bulk update."""
        if not run:
            return
        self._accounts.want(o.account for o, _d, _dl in run)
        seen: set[str] = set()
        fresh: list[tuple[dict[str, Any], list[Order], list[tuple[Order, str, str]], str, Any]] = []
        audit: list[Any] = []
        later_dups: list[Order] = []
        for order, dialect, delivery in run:
            if order.order_id in seen:            # the same id twice in one batch: the first one counts
                later_dups.append(order)
                continue
            seen.add(order.order_id)
            equities: dict[str, float] = {}
            if any(r.sizing is Sizing.EQUITY and r.leader == order.account and r.enabled for r in self.rules):
                equities = self._accounts.equities([order.account, *(r.follower for r in self.rules)])
            dec = route(order, self.rules, self.groups, equities, self.instruments)  # type: ignore[arg-type]
            accepted: list[Order] = []
            rejected: list[tuple[Order, str, str]] = []
            recs: list[Any] = list(dec.audit)
            self._accounts.want(c.account for c in dec.children)
            for child in dec.children:
                why = self._check_child(child, order, dialect)
                if why is None:
                    accepted.append(child)
                    if self.risk_gate is not None:   # before the next check: limits see this order
                        self.risk_gate.on_order_accepted(child)
                else:
                    rejected.append((child, *why))
                    recs.append({"action": "reject", "parent_id": order.order_id, "account": child.account,
                                 "child_id": child.order_id, "field": why[0], "detail": why[1]})
            doc = {"_id": order.order_id, "order": msgspec.to_builtins(order), "dialect": dialect,
                   "routing_key": delivery.routing_key, "exchange": delivery.exchange, "state": "planned",
                   "received_ns": time.time_ns(),
                   "children": [self._child_entry(c, c.account) for c in accepted],
                   "rejected": [{"order_id": c.order_id, "account": c.account, "field": f, "reason": r}
                                for c, f, r in rejected],
                   # audited on a resume if their audit document never landed; one JSON string, not
                   # an array of documents: nx-27017's insert cost is per value (+26 % for a copy-trade
                   # batch as documents, +10 % as a string)
                   "decisions": msgspec.json.encode(recs).decode()}
            fresh.append((doc, accepted, rejected, dialect, recs))
        self._unmarked = {k: f for k, f in self._unmarked.items() if not f.done()}   # before the read below
        existing_ids = self.store.plan_orders([f[0] for f in fresh])
        records: list[dict[str, Any]] = []           # what to publish, in delivery order
        dup_ids: list[str] = []
        for doc, _accepted, rejected, dialect, recs in fresh:
            if doc["_id"] in existing_ids:
                records.append({"_id": doc["_id"], "_existing": True})
                continue
            self.counts["orders"] += 1
            audit.extend(recs)
            self._audit_orders.append(doc["_id"])
            if rejected:
                self.store.save_children([{**self._child_doc(c, OrderStatus.REJECTED.value), "reason": r}
                                          for c, _f, r in rejected])
            for c, f, r in rejected:
                self.report_reject(c.account, f, r, order_id=c.order_id, dialect=dialect, routing_key=doc["routing_key"])
            records.append(doc)
        if existing_ids:
            stored = self.store.get_orders(sorted(existing_ids))
            resumed: list[dict[str, Any]] = []
            for i, rec in enumerate(records):
                if rec.get("_existing"):
                    got = stored.get(rec["_id"])
                    if got is not None and got.get("state") == "planned" and not self._marking_ok(rec["_id"]):
                        log.info("resuming a planned order", extra={"id": rec["_id"]})
                        records[i] = got
                        resumed.append(got)
                    else:
                        dup_ids.append(rec["_id"])
                        records[i] = {}
            audited = self.store.audited_orders([g["_id"] for g in resumed]) if resumed else set()
            for g in resumed:
                if g["_id"] not in audited:       # its batch's audit document never landed
                    audit.extend(msgspec.json.decode(g.get("decisions") or "[]"))
                    self._audit_orders.append(g["_id"])
                audit.append({"action": "resume", "parent_id": g["_id"], "account": "",
                              "detail": "planned but not marked routed: unconfirmed children published again "
                                        "with the same ids"})
        for o in later_dups:
            dup_ids.append(o.order_id)
        for oid in dup_ids:
            self.counts["duplicates"] += 1
            audit.append({"action": "duplicate", "parent_id": oid, "account": "",
                          "detail": "already planned or routed: not placed again"})
            log.info("duplicate delivery ignored", extra={"id": oid})
        self._audit_buf.extend(audit)                 # written with the marks, after the confirms
        records = [r for r in records if r]
        self._marking.extend(r["_id"] for r in records)
        self._publish_records("orders", records,
                              lambda r: "routed" if r.get("children") else "rejected")

    def _publish_records(self, coll: str, records: Sequence[dict[str, Any]],
                         final_state: Callable[[dict[str, Any]], str] | None) -> None:
        """Publish every unconfirmed child of ``records`` (same body, same ``message_id``), wait once
        for all confirms, turn returned children into Reject reports, then mark the records.

        With ``final_state`` (the plans of orders, in ``orders``) the marks -- a state per record,
        the returned children's flags, their status documents and audit records -- go to the
        batch's writes behind it (:meth:`_submit_writes`). Without (a cancel or force-close record
        in ``processed``) only the children's flags are written, now, with ONE bulk write."""
        if not records:
            return
        todo: list[tuple[dict[str, Any], int, dict[str, Any]]] = []
        for rec in records:
            for i, c in enumerate(rec.get("children") or []):
                if c.get("confirmed"):
                    continue
                props = {"message_id": c["message_id"], "type": c.get("type"), "content_type": "application/json"}
                if c.get("correlation_id"):
                    props["correlation_id"] = c["correlation_id"]
                self.exec_pub.publish(self.topo.exec, c["routing_key"], c["body"].encode(), properties=props)
                todo.append((rec, i, c))
        returned = self.exec_pub.gather() if todo or self.exec_pub._pending else set()  # noqa: SLF001
        self.counts["children"] += len(todo)
        sets: dict[str, dict[str, Any]] = {}
        failed: list[dict[str, Any]] = []
        status_docs: list[dict[str, Any]] = []
        for rec, i, c in todo:
            if c["message_id"] not in returned and final_state is not None:
                continue            # state routed/done: every child confirmed
            err = f"no executor for account {c['account']}" if c["message_id"] in returned else None
            # the whole array, not "children.<i>.confirmed": nx-27017 ignores array-index paths in $set
            s = sets.setdefault(rec["_id"], {"children": [dict(x) for x in rec["children"]]})
            s["children"][i].update(confirmed=True, error=err)
            if err:
                self.counts["children"] -= 1
                if c.get("kind", "order") == "order":
                    o = msgspec.json.decode(c["body"])
                    status_docs.append({"_id": c["order_id"], "parent_id": rec["_id"], "account": c["account"],
                                        "symbol": o.get("symbol"), "exchange": o.get("exchange"),
                                        "direction": o.get("direction"), "offset": o.get("offset"),
                                        "volume": o.get("volume"), "price": o.get("price"), "source": o.get("source"),
                                        "status": OrderStatus.REJECTED.value, "reason": err,
                                        "updated_ns": time.time_ns()})
                    if self.risk_gate is not None:
                        self.risk_gate.on_order_failed(c["order_id"])
                failed.append({"action": "reject", "parent_id": rec["_id"], "account": c["account"],
                               "child_id": c["order_id"], "detail": err})
                self.report_reject(c["account"], "account", err, order_id=c["order_id"], routing_key=c["routing_key"])
        if failed:
            self.exec_pub.gather()                    # the Reject reports, before the records are marked
        if final_state is not None:                   # plans of orders: marked behind the batch
            self._audit_buf.extend(failed)
            self._status_docs.extend(status_docs)
            for rec in records:
                self._states.setdefault(final_state(rec), []).append(rec["_id"])
            self._sets.update(sets)
            return
        if failed:
            self.store.save_children(status_docs)
            self.store.audit_batch(failed)
        if sets:
            from pymongo import UpdateOne

            self.store.db[coll].bulk_write([UpdateOne({"_id": k}, {"$set": v}) for k, v in sets.items()],
                                           ordered=False)

    def _publish_children(self, coll: str, rec: dict[str, Any]) -> None:
        """One record's unconfirmed children (cancels, force-close), flags marked; no state change."""
        self._publish_records(coll, [rec], None)

    # cancels ------------------------------------------------------------------------------
    def _on_cancel(self, cancel: Cancel, delivery: Any, body: bytes) -> None:
        self._settle_writes()        # the plans before it are marked (returned children known)
        mid = delivery.message_id or "sha1:" + hashlib.sha1(body).hexdigest()  # noqa: S324
        key = f"cancel:{mid}"
        rec = self.store.get_processed(key)
        if rec is None:
            self.counts["cancels"] += 1
            cancels = route_cancel(cancel, self.rules, self.groups,
                                   children_of={cancel.order_id: c} if (c := self.store.children_of(cancel.order_id))
                                   is not None else None)
            cancels = [msgspec.structs.replace(c, id=f"{c.order_id}/x/{mid}"[:128].replace(" ", "_")) for c in cancels]
            rec, _ = self.store.plan_processed({"_id": key, "kind": "cancel", "order_id": cancel.order_id,
                                                "state": "planned", "received_ns": time.time_ns(),
                                                "children": [self._child_entry(c, c.account, "cancel") for c in cancels]})
            self.store.audit([{"action": "cancel", "parent_id": cancel.order_id, "account": c.account,
                               "child_id": c.order_id, "detail": c.reason} for c in cancels])
            for c in cancels:
                self.store.set_child_status(c.order_id, OrderStatus.PENDING_CANCEL.value, c.reason,
                                            account=c.account, parent_id=cancel.order_id)
        if rec.get("state") == "planned":
            self._publish_children("processed", rec)
            self.store.finish("processed", key, "done")

    # risk ---------------------------------------------------------------------------------
    def _risk_channel(self) -> Any:
        """The risk queue's channel, consuming into :attr:`_risk_inbox` (re-made after a reconnect).

        It consumes on pika's channel *implementation*, whose callback runs the moment the
        delivery's frames are read -- in any I/O of this connection, also while a batch waits for
        its confirms -- where a BlockingChannel consumer would wait for pika's dispatch. So at the
        start of a batch the inbox holds every command that reached the router before it, without
        a round trip to the broker (``basic_get`` on the quorum queue took 0.5-1.1 ms a batch).
        What waits on the queue when the channel is made is fetched first (``basic_get`` until
        empty), so that it is in the inbox before the orders consumer starts."""
        conn = self.connection.ensure()
        if self._risk_ch is None or not self._risk_ch.is_open or self._risk_gen != self.connection.generation:
            self._risk_inbox.clear()          # deliveries of a dead channel are redelivered by the broker
            ch = conn.channel()
            declare_queue_sync(ch, self.topo.router_risk)
            ch.basic_qos(prefetch_count=RISK_PREFETCH)
            gen = self.connection.generation
            while len(self._risk_inbox) < RISK_PREFETCH:
                method, props, body = ch.basic_get(self.topo.router_risk.name, auto_ack=False)
                if method is None:
                    break
                self._risk_inbox.append((gen, method, props, body))

            def deliver(_ch: Any, method: Any, props: Any, body: bytes) -> None:
                self._risk_inbox.append((gen, method, props, body))
                self.connection.add_callback_threadsafe(_noop)   # end the loop's wait: handled at once

            ch._impl.basic_consume(self.topo.router_risk.name, deliver, auto_ack=False)  # noqa: SLF001
            self._risk_ch, self._risk_gen = ch, gen
        return self._risk_ch

    def poll_risk(self, limit: int = 100) -> int:
        """Handle the risk commands the broker has pushed (in order); returns how many were handled.

        A command that fails (not a refusal: those are dead-lettered) closes the risk channel, so
        the broker requeues it and everything after it in order; the channel is made again at the
        next call."""
        self._last_risk = time.monotonic()
        ch = self._risk_channel()
        if self.risk_gate is not None:
            self.risk_gate.attach(self.connection)   # its bounded report/tick queue on this connection
        n = 0
        while self._risk_inbox and n < limit:
            gen, method, props, body = self._risk_inbox.popleft()
            if gen != self._risk_gen:
                continue
            n += 1
            try:
                self.on_risk(body, props, method.routing_key)
                self.exec_pub.gather()
            except handling.Reject as exc:
                self.exec_pub.gather()
                self._dead_letter(body, props, method, str(exc))
                ch.basic_ack(method.delivery_tag)
            except Exception as exc:  # noqa: BLE001
                log.error("risk command failed, requeued with the ones after it: %s", exc, exc_info=True)
                self._risk_inbox.clear()
                self._risk_ch = None
                try:
                    ch.close()
                except Exception as close_exc:  # noqa: BLE001 - the connection may be gone too
                    log.debug("risk channel close: %s", close_exc)
                break
            else:
                ch.basic_ack(method.delivery_tag)
        return n

    def _dead_letter(self, body: bytes, props: Any, method: Any, reason: str) -> None:
        from qapubsub.sync import Unroutable, properties_dict

        p = properties_dict(props)
        p["headers"] = handling.dead_letter_headers(props.headers, reason=reason, exchange=method.exchange,
                                                    routing_key=method.routing_key, queue=self.topo.router_risk.name,
                                                    attempts=1)
        p.pop("user_id", None)   # the broker refuses another user's id on our connection
        try:
            self.cmd_pub.publish(self.topo.dlx, method.routing_key, body, properties=p)
        except Unroutable:
            log.error("dead-letter exchange has no queue; dropping: %s", reason)
        log.error("risk command dead-lettered: %s", reason, extra={"routing_key": method.routing_key})

    def on_risk(self, body: bytes, props: Any, routing_key: str) -> None:
        try:
            cmd = decode(body, ForceClose | Release | Halt | Resume)
        except DecodeError as exc:
            self.store.audit([{"action": "refused", "parent_id": "", "account": routing_key, "detail": str(exc)}])
            raise handling.Reject(str(exc)) from None
        kind = {ForceClose: "forceclose", Release: "release", Halt: "halt", Resume: "resume"}[type(cmd)]
        user = getattr(props, "user_id", None)
        if user != self.settings.risk_user:
            reason = (f"{kind} {cmd.command_id} refused: AMQP user_id {user!r} is not the risk identity "
                      f"{self.settings.risk_user!r}")
            self.store.audit([{"action": "refused", "parent_id": cmd.command_id, "account": cmd.account,
                               "detail": reason}])
            self.report_reject(cmd.account, "user_id", reason, order_id=cmd.command_id, routing_key=routing_key)
            raise handling.Reject(reason)
        if isinstance(cmd, Release):
            self._on_release(cmd)
        elif isinstance(cmd, ForceClose):
            self._on_force_close(cmd)
        else:
            self._on_halt(cmd)

    def _on_release(self, cmd: Release) -> None:
        key = f"release:{cmd.command_id}"
        if self.store.get_processed(key) is not None:
            return
        self.store.set_reduce_only(cmd.account, False, command_id=cmd.command_id, reason=cmd.reason,
                                   operator=cmd.operator)
        self.reduce_only.discard(cmd.account)
        if self.risk_gate is not None:
            self.risk_gate.release(cmd.account)
        self.store.audit([{"action": "release", "parent_id": cmd.command_id, "account": cmd.account,
                           "detail": f"released by {cmd.operator}: {cmd.reason}"}])
        self.store.plan_processed({"_id": key, "kind": "release", "state": "done", "children": []})

    def _on_halt(self, cmd: Halt | Resume) -> None:
        """Halt: every new order of the account is refused from the next batch on (working orders
        stay, cancels pass); Resume lifts it. Idempotent by command id, audited."""
        on = isinstance(cmd, Halt)
        key = f"{'halt' if on else 'resume'}:{cmd.command_id}"
        if self.store.get_processed(key) is not None:
            return
        info = {"command_id": cmd.command_id, "reason": cmd.reason, "operator": cmd.operator}
        self.store.set_halted(cmd.account, on, **info)
        if on:
            self.halted[cmd.account] = info
        else:
            self.halted.pop(cmd.account, None)
        self.store.audit([{"action": "halt" if on else "halt_lifted", "parent_id": cmd.command_id,
                           "account": cmd.account,
                           "detail": (f"halted by {cmd.operator}: {cmd.reason}; every new order refused until a resume"
                                      if on else f"halt lifted by {cmd.operator}: {cmd.reason}")}])
        self.store.plan_processed({"_id": key, "kind": "halt" if on else "resume", "state": "done", "children": []})
        log.warning("account %s", "halted" if on else "resumed", extra={"account": cmd.account, **info})

    def _on_force_close(self, cmd: ForceClose) -> None:
        from qamarket.store import TickStore

        key = f"forceclose:{cmd.command_id}"
        self._settle_writes()        # every routed batch marked: its returned children are not working
        rec = self.store.get_processed(key)
        if rec is None:
            self.counts["forceclose"] += 1
            self.store.set_reduce_only(cmd.account, True, command_id=cmd.command_id, reason=cmd.reason,
                                       operator=cmd.operator)
            self.reduce_only.add(cmd.account)
            if self.risk_gate is not None:
                self.risk_gate.force_close(cmd.account, f"force-close {cmd.command_id}: {cmd.reason}")
            working = [msgspec.convert(d["order"], Order) for d in self.store.working_children(cmd.account)
                       if d.get("order")]
            positions = self.store.positions(cmd.account)
            ticks = TickStore(self.db, create_indexes=False)
            quotes = {}
            for p in positions:
                t = ticks.last_tick(p.exchange, p.symbol)
                if t is not None:
                    quotes[f"{p.exchange}.{p.symbol}"] = t
            plan = plan_force_close(cmd, positions, working, quotes, self.instruments,  # type: ignore[arg-type]
                                    mode=self.price_mode, now_ns=time.time_ns())
            children = ([self._child_entry(c, c.account, "cancel") for c in plan.cancels] +
                        [self._child_entry(o, o.account) for o in plan.orders])
            rec, fresh = self.store.plan_processed({"_id": key, "kind": "forceclose", "account": cmd.account,
                                                    "command_id": cmd.command_id, "state": "planned",
                                                    "received_ns": time.time_ns(), "children": children})
            if fresh:
                self.store.audit([{"action": "forceclose", "parent_id": cmd.command_id, "account": cmd.account,
                                   "detail": f"accepted from {cmd.operator}: {cmd.reason}; reduce-only until release; "
                                             f"{len(plan.cancels)} cancels, {len(plan.orders)} orders, "
                                             f"{len(plan.skipped)} skipped"}, *plan.audit])
                for c in plan.cancels:
                    self.store.set_child_status(c.order_id, OrderStatus.PENDING_CANCEL.value, c.reason,
                                                account=c.account)
                # the flattening orders are working children through this ``processed`` plan
        if rec.get("state") == "planned":
            self._publish_children("processed", rec)   # cancels first, then the flattening orders
            self.store.finish("processed", key, "done")

    # running ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.consumer.run()
        finally:
            self.close()

    def stop(self) -> None:
        self.consumer.stop()

    def run_until_signal(self) -> int:
        try:
            return self.consumer.run_until_signal()
        finally:
            self.close()


def _make_consumer_class() -> type:
    from qapubsub.batch import BatchConsumer

    class RouterConsumer(BatchConsumer):  # type: ignore[misc]
        """The orders consumer (batches: up to ``batch_size`` orders, or what arrived within
        ``batch_wait`` s; with 0 a batch is whatever one I/O read delivered, so a lone order waits
        for nothing and a burst is handled in bulk). Its loop also serves the risk queue and the
        bindings (Router.idle)."""

        def __init__(self, router: Router, *args: Any, **kw: Any) -> None:
            super().__init__(*args, on_idle=router.idle, **kw)
            self.router = router
            self.poll_interval = max(self.poll_interval, 0.02)   # returns early on a delivery anyway

        def _setup(self) -> None:
            self.router.poll_risk()      # what waits on the risk queue, before any order is consumed
            super()._setup()

        def _maybe_flush_acks(self) -> None:
            if self.router._risk_inbox:  # noqa: SLF001 - a risk command arrived: before anything else
                self.router.poll_risk()
            super()._maybe_flush_acks()

    return RouterConsumer


def _RouterConsumer(router: Router, *args: Any, **kw: Any) -> Any:  # noqa: N802
    return _make_consumer_class()(router, *args, **kw)


# CLI ----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Order router: consumes qaorder / QAORDER_ROUTER orders and qarisk commands, "
                          "routes (groups, copy-trade, force-close) and publishes child orders to qa.exec.")
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--no-risk-rules", action="store_true",
                        help="skip the pre-trade rules (risk_configs); force-close still applies")


def run(args: argparse.Namespace) -> int:

    from handlers.cli import CannotConnect
    from qapubsub.settings import redact_url
    from qapubsub.sync import Connection, TransportError

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    client = mongo_client(settings, server_selection_ms=3000)
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001
        raise CannotConnect(f"MongoDB at {redact_url(settings.mongo_url)}: {exc}") from None
    conn = Connection(settings, client_name="qaflow-router", max_retries=2)
    try:
        conn.ensure()
    except TransportError as exc:
        raise CannotConnect(str(exc)) from None
    conn.max_retries = None   # once up, reconnect forever
    gate = None
    if not args.no_risk_rules:
        from handlers.risk import RiskGate

        gate = RiskGate(client[settings.mongo_db], topo)
    router = Router(settings, topo, client[settings.mongo_db], connection=conn, risk_check=gate)
    log.info("router started", extra={"namespace": topo.namespace})
    try:
        return router.run_until_signal()
    finally:
        client.close()


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow router"))
