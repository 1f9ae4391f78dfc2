"""The platform's topology: every exchange, queue and binding, declared here once.

Declaring is idempotent. A name that already exists with another type or other
arguments fails at start with :class:`TopologyMismatch`, whose message names the
exchange (or queue) and both values, instead of pika's bare ``PRECONDITION_FAILED``.

Tests pass a ``namespace`` (``"t-1a2b3c."``) so each test gets its own names; the
contract names (``qaorder``, ``qarisk``, ``QAORDER_ROUTER`` ...) are those of the
default, empty namespace.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import keys

# Delivery attempts before a quorum queue dead-letters a message by itself (RabbitMQ 3.10
# sets no default). Our consumers dead-letter poison messages earlier, with a reason.
DELIVERY_LIMIT = 10
# Live (lossy) market-data queues for strategies and the web: bounded, oldest dropped first.
LIVE_QUEUE_MAX_LENGTH = 10_000


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str
    durable: bool = True
    arguments: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    doc: str = field(default="", compare=False)


@dataclass(frozen=True)
class Binding:
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class Queue:
    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    bindings: tuple[Binding, ...] = ()

    @property
    def quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"

    def with_bindings(self, *extra: Binding) -> Queue:
        return Queue(self.name, self.durable, self.exclusive, self.auto_delete, dict(self.arguments),
                     self.bindings + tuple(b for b in extra if b not in self.bindings))


class TopologyMismatch(RuntimeError):
    """An exchange or queue exists with another type or other arguments than QAFlow declares."""


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>exchange|queue) '(?P<name>[^']+)'.*?"
    r"received (?P<received>.+?) but current is (?P<current>.+)$"
)


def explain_precondition(reply_text: str) -> str:
    """Turn RabbitMQ's PRECONDITION_FAILED reply into a sentence with both values and a fix."""
    m = _INEQUIVALENT.search(reply_text or "")
    if not m:
        return f"RabbitMQ refused the declaration: {reply_text}"
    what = "type" if m["arg"] == "type" else f"argument {m['arg']}"
    hint = ""
    if m["kind"] == "queue" and m["arg"] == "x-queue-type" and "qa.tickhandler." in m["name"]:
        have = re.search(r"'([^']+)'", m["current"])
        hint = (f" The tick shard queues' type is QA_TICK_QUEUE (classic or quorum): QA_TICK_QUEUE="
                f"{have[1] if have else 'classic'} keeps this queue.")
    return (
        f"{m['kind']} {m['name']!r} already exists with {what} {m['current'].strip()} but QAFlow declares it "
        f"with {m['received'].strip()}. Delete it (rabbitmqctl delete_{m['kind']} {m['name']}) if nothing "
        f"depends on it, or point QAFlow at another vhost.{hint}"
    )


def missing_plugin(reply_text: str) -> str:
    return (f"RabbitMQ does not know an exchange type QAFlow declares ({reply_text}). The tick shards need "
            "the consistent-hash exchange: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange")


TICK_QUEUE_TYPES = ("classic", "quorum")


def tick_queue_type_from_env(env: Any = None) -> str:
    """``QA_TICK_QUEUE``: the type of the tickhandler shard queues, ``classic`` (default) or ``quorum``."""
    import os

    from .settings import ConfigError

    value = ((os.environ if env is None else env).get("QA_TICK_QUEUE") or "classic").strip().lower()
    if value not in TICK_QUEUE_TYPES:
        raise ConfigError(f"QA_TICK_QUEUE={value!r} is not one of {', '.join(TICK_QUEUE_TYPES)}")
    return value


def tick_shards_from_env(env: Any = None) -> int:
    """``QA_TICK_SHARDS``: how many tickhandler shard queues the ticks are spread over (default 1)."""
    import os

    from .settings import ConfigError

    raw = ((os.environ if env is None else env).get("QA_TICK_SHARDS") or "1").strip()
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"QA_TICK_SHARDS={raw!r} is not a whole number") from None
    if n < 1:
        raise ConfigError(f"QA_TICK_SHARDS={raw!r}: at least 1")
    return n


class Topology:
    """All names and declarations of one QAFlow installation (one namespace).

    ``tick_queue_type`` (default: ``QA_TICK_QUEUE``, else ``classic``) is the type of the
    tickhandler shard queues; every process of one installation must use the same.
    """

    def __init__(self, namespace: str = "", *, tick_queue_type: str | None = None) -> None:
        self.namespace = namespace
        self.tick_queue_type = tick_queue_type_from_env() if tick_queue_type is None else tick_queue_type
        if self.tick_queue_type not in TICK_QUEUE_TYPES:
            raise ValueError(f"tick_queue_type must be one of {TICK_QUEUE_TYPES}, not {self.tick_queue_type!r}")
        n = self.name
        self.tick = n("qa.tick")
        self.tick_shards = n("qa.tick.shards")
        self.rtbar = n("qa.rtbar")
        self.bar = n("qa.bar")
        self.ibar = n("qa.ibar")
        self.order = n("qaorder")
        self.qapubsub_order = n("QAORDER_ROUTER")
        self.risk = n("qarisk")
        self.exec = n("qa.exec")
        self.report = n("qa.report")
        self.dlx = n("qa.dlx")
        self.unroutable = n("qa.unroutable")
        ae = {"alternate-exchange": self.unroutable}
        self.exchanges: tuple[Exchange, ...] = (
            Exchange(self.dlx, "fanout", doc="dead letters: malformed or failed messages, with x-qa-error"),
            Exchange(self.unroutable, "fanout", doc="alternate exchange of qaorder and qarisk"),
            Exchange(self.tick, "topic", doc="raw ticks, key `<EXCHANGE>.<symbol>`"),
            Exchange(self.tick_shards, "x-consistent-hash",
                     doc="ticks from qa.tick, spread over the tickhandler shards by hash of the key (one instrument, one shard)"),
            Exchange(self.rtbar, "topic", doc="realtime (unfinished) bars, key `<freq>.<EXCHANGE>.<symbol>`"),
            Exchange(self.bar, "topic", doc="closed bars, key `<freq>.<EXCHANGE>.<symbol>`"),
            Exchange(self.ibar, "topic", doc="closed bars merged by the barhandler, with indicators, key `<freq>.<EXCHANGE>.<symbol>`"),
            Exchange(self.order, "topic", arguments=ae, doc="orders and cancels from anyone, key = account or group"),
            # QAPUBSUB declares it direct and non-durable; any other declaration breaks its clients.
            Exchange(self.qapubsub_order, "direct", durable=False,
                     doc="QUANTAXIS QAPUBSUB publisher_routing orders (QATrader JSON), key = account"),
            Exchange(self.risk, "topic", arguments=ae, doc="force-close / release from the risk identity, key = account"),
            Exchange(self.exec, "topic", doc="child orders to executors, key = account"),
            Exchange(self.report, "topic", doc="order status, trades, snapshots, key `<account>.<kind>`"),
        )
        # (destination, source, key): exchange-to-exchange bindings
        self.exchange_bindings: tuple[tuple[str, str, str], ...] = ((self.tick_shards, self.tick, keys.ALL),)
        # Queues that must exist even while their consumer is down, so nothing is lost.
        # Quorum, like the commands: a dead letter or a parked order must survive the loss of a node.
        self.dead_letters = Queue(n("qa.dead"), arguments={"x-queue-type": "quorum"},
                                  bindings=(Binding(self.dlx, ""),))
        self.unroutable_queue = Queue(n("qa.unroutable"), arguments={"x-queue-type": "quorum"},
                                      bindings=(Binding(self.unroutable, ""),))
        self.router_orders = self.command_queue(n("qa.router.orders"), Binding(self.order, keys.ALL))
        self.router_risk = self.command_queue(n("qa.router.risk"), Binding(self.risk, keys.ALL))
        self.tickhandler = self.tick_queue(0)
        self.account_reports = self.command_queue(n("qa.account.reports"), Binding(self.report, keys.reports_of("*", "order")),
                                                  Binding(self.report, keys.reports_of("*", "trade")))
        # RPC requests (default exchange): expire with the client's timeout, never dead-lettered.
        self.history_requests = Queue(n("qa.barhandler.history"))
        self.platform_queues: tuple[Queue, ...] = (
            self.dead_letters, self.unroutable_queue, self.router_orders, self.router_risk,
            self.tickhandler, self.account_reports, self.history_requests,
        )

    # names ---------------------------------------------------------------------------
    def name(self, base: str) -> str:
        return f"{self.namespace}{base}"

    def exchange(self, name: str) -> Exchange:
        for ex in self.exchanges:
            if ex.name == name:
                return ex
        raise KeyError(f"no exchange {name!r} in this topology")

    # queue builders --------------------------------------------------------------------
    def command_queue(self, name: str, *bindings: Binding) -> Queue:
        """Orders, cancels, force-closes, reports: replicated quorum queue, bounded redelivery."""
        return Queue(name, arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT,
                                      "x-dead-letter-exchange": self.dlx}, bindings=tuple(bindings))

    def durable_queue(self, name: str, *bindings: Binding) -> Queue:
        """High-rate but lossless streams (ticks to the tickhandler): durable classic queue."""
        return Queue(name, arguments={"x-dead-letter-exchange": self.dlx}, bindings=tuple(bindings))

    def live_queue(self, name: str, *bindings: Binding, max_length: int = LIVE_QUEUE_MAX_LENGTH) -> Queue:
        """A subscriber's own market-data queue: gone with its connection, bounded, sheds the oldest."""
        return Queue(name, durable=False, exclusive=True, auto_delete=True,
                     arguments={"x-max-length": max_length, "x-overflow": "drop-head"}, bindings=tuple(bindings))

    def tick_queue(self, shard: int) -> Queue:
        """Tickhandler shard ``shard``: one active consumer at a time (others stand by), bound to the
        consistent-hash exchange with weight 1, so every instrument stays on one shard, in order.

        Its type is ``tick_queue_type``. ``classic`` (durable; the default): on one node the lowest
        latency (measured at 5,000 ticks/s: p50 0.2 ms, p99 3-23 ms one hop, against 4-22 / 85-220 ms
        for a quorum queue, whose every message waits for its Raft log write; see
        docs/benchmarks.md). ``quorum`` on a cluster: replicated, so the queue and the ticks
        routed to it while a node is down survive the loss of that node (docs/scaling.md).
        No ``x-delivery-limit``: a database outage requeues whole batches again and again
        (BatchConsumer, ``Transient``) and must never dead-letter good ticks; poison ticks are
        dead-lettered by the consumer itself, with a reason."""
        if shard < 0:
            raise ValueError("shard must be >= 0")
        args: dict[str, Any] = {"x-single-active-consumer": True, "x-dead-letter-exchange": self.dlx}
        if self.tick_queue_type == "quorum":
            args = {"x-queue-type": "quorum", **args}
        return Queue(self.name(f"qa.tickhandler.{shard}"), arguments=args, bindings=(Binding(self.tick_shards, "1"),))

    def exec_queue(self, account: str) -> Queue:
        return self.command_queue(self.name(f"qa.exec.{keys.exec_key(account)}"), Binding(self.exec, keys.exec_key(account)))

    # declaration -----------------------------------------------------------------------
    def declare_sync(self, channel: Any, queues: Iterable[Queue] | None = None) -> None:
        """Declare every exchange (and the platform queues, or ``queues``) on a pika channel."""
        import pika.exceptions

        try:
            for ex in self.exchanges:
                channel.exchange_declare(ex.name, ex.type, durable=ex.durable, arguments=ex.arguments or None)
            for dest, source, key in self.exchange_bindings:
                channel.exchange_bind(dest, source, routing_key=key)
            for q in self.platform_queues if queues is None else queues:
                declare_queue_sync(channel, q)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406:
                raise TopologyMismatch(explain_precondition(exc.reply_text)) from None
            raise
        except pika.exceptions.ConnectionClosedByBroker as exc:
            if "invalid exchange type" in str(exc.reply_text):
                raise TopologyMismatch(missing_plugin(exc.reply_text)) from None
            raise

    async def declare_async(self, channel: Any, queues: Iterable[Queue] | None = None) -> None:
        """Declare every exchange (and the platform queues, or ``queues``) on an aio-pika channel."""
        declared = {}
        for ex in self.exchanges:
            declared[ex.name] = await declare_exchange_async(channel, ex)
        for dest, source, key in self.exchange_bindings:
            await declared[dest].bind(declared[source], routing_key=key)
        for q in self.platform_queues if queues is None else queues:
            await declare_queue_async(channel, q)

    def delete_sync(self, channel: Any, queues: Iterable[Queue] = ()) -> None:
        """Remove this namespace's exchanges and queues (tests clean up with it)."""
        if not self.namespace:
            raise RuntimeError("refusing to delete the production topology (empty namespace)")
        for q in (*self.platform_queues, *queues):
            channel.queue_delete(q.name)
        for ex in self.exchanges:
            channel.exchange_delete(ex.name)


def declare_queue_sync(channel: Any, q: Queue) -> str:
    """Declare ``q`` and its bindings on a pika channel; returns the queue name."""
    import pika.exceptions

    try:
        ok = channel.queue_declare(q.name, durable=q.durable, exclusive=q.exclusive, auto_delete=q.auto_delete,
                                   arguments=q.arguments or None)
        name = ok.method.queue
        for b in q.bindings:
            channel.queue_bind(name, b.exchange, routing_key=b.routing_key)
        return str(name)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise TopologyMismatch(explain_precondition(exc.reply_text)) from None
        raise


async def declare_exchange_async(channel: Any, ex: Exchange) -> Any:
    import aio_pika
    import aiormq.exceptions

    try:
        return await channel.declare_exchange(ex.name, aio_pika.ExchangeType(ex.type), durable=ex.durable,
                                              arguments=ex.arguments or None)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyMismatch(explain_precondition(str(exc))) from None


async def declare_queue_async(channel: Any, q: Queue) -> Any:
    """Declare ``q`` and its bindings on an aio-pika channel; returns the aio-pika queue object."""
    import aiormq.exceptions

    try:
        queue = await channel.declare_queue(q.name or None, durable=q.durable, exclusive=q.exclusive,
                                            auto_delete=q.auto_delete, arguments=q.arguments or None)
        for b in q.bindings:
            await queue.bind(b.exchange, routing_key=b.routing_key)
        return queue
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyMismatch(explain_precondition(str(exc))) from None


def markdown_tables(topo: Topology | None = None) -> str:
    """The exchange and queue tables of docs/topology.md (a test keeps the doc equal to this)."""
    topo = topo or Topology(tick_queue_type="classic")  # the default, whatever QA_TICK_QUEUE says here
    rows = ["| exchange | type | durable | arguments | carries |", "|---|---|---|---|---|"]
    for ex in topo.exchanges:
        args = ", ".join(f"`{k}={v}`" for k, v in ex.arguments.items()) or "-"
        rows.append(f"| `{ex.name}` | {ex.type} | {'yes' if ex.durable else 'no'} | {args} | {ex.doc} |")
    rows += ["", "| queue | kind | arguments | bound to |", "|---|---|---|---|"]
    for q in topo.platform_queues:
        kind = "quorum" if q.quorum else ("classic, durable" if q.durable else "classic, transient")
        args = ", ".join(f"`{k}={v}`" for k, v in q.arguments.items() if k != "x-queue-type") or "-"
        binds = ", ".join(f"`{b.exchange}` `{b.routing_key or '(any)'}`" for b in q.bindings)
        rows.append(f"| `{q.name}` | {kind} | {args} | {binds} |")
    return "\n".join(rows) + "\n"
