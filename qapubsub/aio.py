"""The asyncio transport (aio-pika): connection with fail-over, publishers, consumers.

Same semantics as the pika transport (``qapubsub.sync``); the ack / requeue / dead-letter
rules live in :mod:`qapubsub.handling` and are shared.

* :class:`Connection` -- one per process. Connects to the first reachable URL of a list
  (fail-over), reconnects with exponential backoff and jitter, and on every (re)connect
  re-declares everything it was told about (exchanges, queues, bindings, including those
  added after start) and re-attaches every publisher and consumer. We run our own
  reconnect loop over plain ``aio_pika.connect`` instead of ``connect_robust`` so that
  restoring is explicit and ordered, every declared queue is strongly referenced here
  (aio-pika #536 loses weakly held ones) and a broker-side consumer cancel leads to a
  re-declare + re-consume (aio-pika #334).
* :class:`CommandPublisher` -- orders, cancels, force-closes: confirms, ``mandatory``,
  persistent, AMQP properties from :func:`qapubsub.messages.amqp_properties`;
  :class:`Unroutable` when the broker returns it; the same ``message_id`` re-published a
  bounded number of times on a nack or a dropped connection, then :class:`PublishError`.
* :class:`MarketDataPublisher` -- high rate: confirms gathered in batches
  (``max_in_flight`` publishes outstanding, 100-1000), failed ones re-published.
* :class:`Consumer` -- manual ack after the handler, bounded prefetch, optional
  multiple-ack batches, strict decode when given a type, dead-lettering with a reason.

Usage::

    conn = Connection(settings.amqp_urls, name="tickhandler")
    await conn.start()
    await conn.declare(topology)
    consumer = await Consumer(conn, topology.tickhandler, on_tick, type_=Tick, prefetch=1000,
                              ack_every=100).start()
    await consumer.bind(topology.tick, keys.tick_key("SHFE", "rb2512"))
    ...
    await conn.close()          # stops consumers gracefully (in-flight finished, acks flushed)
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from pamqp import commands as spec

from . import handling
from .messages import DecodeError, Message, amqp_properties, decode, encode, new_id
from .settings import redact_url
from .topology import Binding, Exchange, Queue, Topology, TopologyMismatch, declare_exchange_async, declare_queue_async

log = logging.getLogger(__name__)

__all__ = [
    "Backoff", "CommandPublisher", "Connection", "Consumer", "Delivery", "MarketDataPublisher", "NotConnected",
    "PublishError", "TransportError", "Unroutable",
]


from .errors import Backoff, NotConnected, PublishError, TransportError, Unroutable  # noqa: E402


# Errors after which a publish may be retried on a fresh channel / connection.
_RETRYABLE = (
    aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed, ConnectionError, asyncio.TimeoutError, RuntimeError,
)


def _props(props: Mapping[str, Any]) -> spec.Basic.Properties:
    """messages.amqp_properties() dict -> pamqp Basic.Properties (for aiormq's basic_publish)."""
    p = dict(props)
    ts = p.get("timestamp")
    if isinstance(ts, (int, float)):
        p["timestamp"] = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
    if "type" in p:
        p["message_type"] = p.pop("type")
    return spec.Basic.Properties(**p)


class _Member:
    """Something the connection re-attaches after every (re)connect."""

    async def _attach(self, conn: AbstractConnection) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _detach(self) -> None:
        """The connection is gone: forget channels (no I/O)."""


# ---------------------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------------------
class Connection:
    """One broker connection per process, kept up by a supervisor task.

    ``urls`` are tried in order (fail-over); after a failure the next one is tried after
    ``backoff.delay(attempt)``. Every exchange and queue passed to :meth:`declare` and every
    publisher / consumer created on this connection is restored after a reconnect.
    """

    def __init__(self, urls: str | Sequence[str], *, name: str = "qaflow", backoff: Backoff | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.urls: tuple[str, ...] = (urls,) if isinstance(urls, str) else tuple(urls)
        if not self.urls:
            raise ValueError("Connection needs at least one AMQP URL")
        self.name = name
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout
        self.reconnects = 0                      # how many times the connection was re-established
        self.url_index = 0                       # which URL we are on
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[str, Queue] = {}
        self._members: list[_Member] = []        # strong references, restore order
        self._conn: AbstractConnection | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._fatal: BaseException | None = None
        self._last_error: BaseException | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lost: asyncio.Event | None = None
        self._restore_lock = asyncio.Lock()

    # -- life cycle ----------------------------------------------------------------------
    async def start(self, timeout: float | None = 30.0) -> Connection:
        """Start the supervisor and wait until connected (``NotConnected`` after ``timeout``)."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._run(), name=f"qapubsub-aio-{self.name}")
        await self.wait_ready(timeout)
        return self

    async def __aenter__(self) -> Connection:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_connected(self) -> bool:
        return self._ready.is_set()

    @property
    def connection(self) -> AbstractConnection:
        """The current aio-pika connection (tests use it to inspect; do not keep it)."""
        if self._conn is None:
            raise NotConnected("not connected")
        return self._conn

    async def wait_ready(self, timeout: float | None = None) -> AbstractConnection:
        if self._fatal is not None:
            raise self._fatal
        if self._supervisor is None:
            raise NotConnected("Connection.start() was not called")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            if self._fatal is not None:
                raise self._fatal from None
            raise NotConnected(f"no broker reachable among {[redact_url(u) for u in self.urls]} "
                               f"within {timeout} s (last error: {self._last_error!r})") from None
        if self._fatal is not None:
            raise self._fatal
        assert self._conn is not None
        return self._conn

    async def close(self, timeout: float = 10.0) -> None:
        """Stop consumers gracefully (finish in-flight, flush acks), flush publishers, close."""
        if self._closing:
            return
        for m in list(reversed(self._members)):
            if isinstance(m, Consumer):
                with contextlib.suppress(Exception):
                    await m.stop(timeout=timeout)
            elif isinstance(m, MarketDataPublisher):
                try:
                    await asyncio.wait_for(m.flush(), timeout)
                except Exception as exc:  # noqa: BLE001
                    log.warning("market-data publisher could not flush on close: %s", exc)
        self._closing = True
        if self._lost is not None:
            self._lost.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        conn, self._conn = self._conn, None
        self._ready.clear()
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout)
        log.info("connection %s closed", self.name)

    # -- topology ------------------------------------------------------------------------
    async def declare(self, topology: Topology | None = None, *, exchanges: Iterable[Exchange] = (),
                      queues: Iterable[Queue] | None = None) -> None:
        """Declare (now, and again after every reconnect) a topology's exchanges and queues.

        With a ``topology``, its exchanges and -- unless ``queues`` is given -- its platform
        queues are declared; ``exchanges`` / ``queues`` add more. Raises TopologyMismatch.
        """
        exs = list(topology.exchanges if topology is not None else ()) + list(exchanges)
        qs = list(queues if queues is not None else (topology.platform_queues if topology is not None else ()))
        for ex in exs:
            self._exchanges[ex.name] = ex
        for q in qs:
            if q.name:
                self._queues[q.name] = q
        if self._conn is not None:
            ch = await self._conn.channel(publisher_confirms=False)
            try:
                for ex in exs:
                    await declare_exchange_async(ch, ex)
                for q in qs:
                    await declare_queue_async(ch, q)
            finally:
                if not ch.is_closed:
                    await ch.close()

    def _register(self, member: _Member) -> None:
        if member not in self._members:
            self._members.append(member)

    def _unregister(self, member: _Member) -> None:
        with contextlib.suppress(ValueError):
            self._members.remove(member)

    # -- supervisor ----------------------------------------------------------------------
    async def _connect_once(self, url: str) -> AbstractConnection:
        return await aio_pika.connect(url, timeout=self.connect_timeout,
                                      client_properties={"connection_name": self.name})

    async def _restore(self, conn: AbstractConnection) -> None:
        ch = await conn.channel(publisher_confirms=False)
        try:
            for ex in list(self._exchanges.values()):
                await declare_exchange_async(ch, ex)
            for q in list(self._queues.values()):
                await declare_queue_async(ch, q)
        finally:
            if not ch.is_closed:
                await ch.close()
        for m in list(self._members):
            await m._attach(conn)

    async def _run(self) -> None:
        attempt = 0
        first = True
        while not self._closing:
            url = self.urls[self.url_index % len(self.urls)]
            conn: AbstractConnection | None = None
            try:
                conn = await self._connect_once(url)
                lost = asyncio.Event()
                self._lost = lost
                # bind this connection's event: an old connection closing late must not end the new one
                conn.close_callbacks.add(lambda *_a, _lost=lost, **_k: _lost.set())
                async with self._restore_lock:
                    await self._restore(conn)
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                raise
            except TopologyMismatch as exc:  # configuration error: retrying cannot help
                self._fatal = exc
                self._ready.set()
                log.error("topology mismatch on %s: %s", redact_url(url), exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                return
            except Exception as exc:  # noqa: BLE001 - any connect/restore failure: back off, fail over
                self._last_error = exc
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                delay = self.backoff.delay(attempt)
                log.warning("cannot connect to %s (%s: %s); next try in %.2f s", redact_url(url),
                            type(exc).__name__, exc, delay)
                attempt += 1
                self.url_index += 1
                await asyncio.sleep(delay)
                continue
            self._conn = conn
            if not first:
                self.reconnects += 1
            first = False
            attempt = 0
            self._ready.set()
            log.info("connected to %s as %s", redact_url(url), self.name)
            await lost.wait()
            self._ready.clear()
            self._conn = None
            for m in list(self._members):
                m._detach()
            if self._closing:
                return
            log.warning("connection to %s lost; reconnecting", redact_url(url))
            # first retry on the same URL almost at once; later failures back off and fail over
            await asyncio.sleep(self.backoff.delay(0) * 0.1)

    async def _reattach_later(self, member: _Member, what: str) -> None:
        """A member's channel closed while the connection stayed up: re-open it with backoff."""
        attempt = 0
        while not self._closing and member in self._members:
            conn = self._conn
            if conn is None or conn.is_closed:
                return  # the supervisor will re-attach everything after the reconnect
            try:
                async with self._restore_lock:
                    if self._conn is conn:
                        await member._attach(conn)
                log.info("%s re-attached after its channel closed", what)
                return
            except Exception as exc:  # noqa: BLE001
                delay = self.backoff.delay(attempt)
                attempt += 1
                log.warning("%s: cannot re-attach (%s: %s); next try in %.2f s", what, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)


# ---------------------------------------------------------------------------------------
# Publishers
# ---------------------------------------------------------------------------------------
class _ChannelMember(_Member):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._channel: AbstractChannel | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._attached = asyncio.Event()
        self._closed = False
        self._reattach_task: asyncio.Task[None] | None = None

    def _detach(self) -> None:
        self._channel = None
        self._raw = None
        self._attached.clear()

    def _watch(self, channel: AbstractChannel) -> None:
        def on_close(*_a: Any, **_k: Any) -> None:
            if self._channel is not channel:
                return
            self._detach()
            conn = self.connection._conn
            if self._closed or self.connection._closing or conn is None or conn.is_closed:
                return
            log.warning("%s: channel closed by the broker; re-opening", type(self).__name__)
            self._reattach_task = asyncio.ensure_future(
                self.connection._reattach_later(self, type(self).__name__))
        channel.close_callbacks.add(on_close)

    async def _raw_channel(self, timeout: float | None) -> aiormq.abc.AbstractChannel:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            raw = self._raw
            if raw is not None and not raw.is_closed:
                return raw
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise NotConnected("no open channel")
            try:
                await asyncio.wait_for(self._attached.wait(), remaining)
            except asyncio.TimeoutError:
                raise NotConnected("no open channel") from None


class CommandPublisher(_ChannelMember):
    """Publishes commands (orders, cancels, force-closes, reports) with every guarantee.

    ``publish`` returns once the broker has confirmed the message; it raises
    :class:`Unroutable` for a returned message and :class:`PublishError` after
    ``attempts`` tries (nack, lost connection, confirm timeout). Each retry re-sends the same
    ``message_id``, so an idempotent consumer processes the command once.
    """

    def __init__(self, connection: Connection, *, attempts: int = 6, confirm_timeout: float = 10.0) -> None:
        super().__init__(connection)
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.attempts = attempts
        self.confirm_timeout = confirm_timeout
        self.published = 0
        self.retries = 0
        connection._register(self)

    async def start(self) -> CommandPublisher:
        conn = await self.connection.wait_ready(self.connection.connect_timeout * 6)
        if self._raw is None:
            await self._attach(conn)
        return self

    async def _attach(self, conn: AbstractConnection) -> None:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = ch
        self._raw = await ch.get_underlay_channel()
        self._watch(ch)
        self._attached.set()

    async def publish(self, exchange: str, routing_key: str, message: Message, *, correlation_id: str | None = None,
                      headers: Mapping[str, Any] | None = None, mandatory: bool = True,
                      persistent: bool = True) -> None:
        body = encode(message)
        props = amqp_properties(message, persistent=persistent, correlation_id=correlation_id)
        if headers:
            props["headers"] = {**props["headers"], **headers}
        await self.publish_raw(exchange, routing_key, body, props, mandatory=mandatory)

    async def publish_raw(self, exchange: str, routing_key: str, body: bytes, props: Mapping[str, Any], *,
                          mandatory: bool = True) -> None:
        """Publish bytes with the given AMQP properties (must hold a ``message_id``)."""
        if not props.get("message_id"):
            raise ValueError("a command needs a message_id (the retry key)")
        properties = _props(props)
        extra = {"message_id": props["message_id"], "routing_key": routing_key, "exchange": exchange}
        last: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                raw = await self._raw_channel(self.confirm_timeout)
                result = await raw.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                                 properties=properties, mandatory=mandatory,
                                                 timeout=self.confirm_timeout)
                if isinstance(result, spec.Basic.Nack):
                    raise aiormq.exceptions.DeliveryError(None, result)
                self.published += 1
                return
            except aiormq.exceptions.PublishError as exc:  # returned: mandatory and no queue bound
                frame = getattr(exc, "frame", None)
                why = f"{getattr(frame, 'reply_code', 312)} {getattr(frame, 'reply_text', 'NO_ROUTE')}"
                raise Unroutable(exchange, routing_key, detail=str(why)) from None
            except aiormq.exceptions.DeliveryError as exc:  # nack
                last = exc
                log.warning("publish nacked (attempt %d/%d)", attempt, self.attempts, extra=extra)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise PublishError(f"cannot publish to {exchange!r}: {exc}") from None
            except NotConnected as exc:
                last = exc
                log.warning("publish: not connected (attempt %d/%d)", attempt, self.attempts, extra=extra)
            except _RETRYABLE as exc:
                last = exc
                log.warning("publish failed (attempt %d/%d): %s: %s", attempt, self.attempts, type(exc).__name__,
                            exc, extra=extra)
            if attempt < self.attempts:
                self.retries += 1
                await asyncio.sleep(self.connection.backoff.delay(attempt - 1))
        raise PublishError(f"message {props['message_id']} to {exchange!r}/{routing_key!r} not confirmed after "
                           f"{self.attempts} attempts: {type(last).__name__}: {last}")

    async def close(self) -> None:
        self._closed = True
        self.connection._unregister(self)
        ch, self._channel = self._channel, None
        self._detach()
        if ch is not None and not ch.is_closed:
            with contextlib.suppress(Exception):
                await ch.close()


class MarketDataPublisher(CommandPublisher):
    """High-rate publisher (ticks, bars): confirms gathered in batches.

    :meth:`publish` sends at once and returns; up to ``max_in_flight`` publishes are
    outstanding, then the batch's confirms are awaited together. :meth:`flush` waits for
    all. A nacked or lost publish is re-sent (same ``message_id``) up to ``attempts`` times
    in all, then :class:`PublishError` is raised from ``publish``/``flush``. Not mandatory
    by default: a tick nobody listens to is not an error.
    """

    def __init__(self, connection: Connection, exchange: str, *, max_in_flight: int = 500, persistent: bool = False,
                 mandatory: bool = False, attempts: int = 3, confirm_timeout: float = 10.0) -> None:
        super().__init__(connection, attempts=attempts, confirm_timeout=confirm_timeout)
        if not 1 <= max_in_flight <= 10_000:
            raise ValueError("max_in_flight must be in 1..10000")
        self.exchange = exchange
        self.max_in_flight = max_in_flight
        self.persistent = persistent
        self.mandatory = mandatory
        self._pending: list[tuple[asyncio.Future[Any], str, bytes, spec.Basic.Properties]] = []

    async def publish(self, routing_key: str, message: Message | bytes, *,  # type: ignore[override]
                      properties: Mapping[str, Any] | None = None) -> None:
        if isinstance(message, Message):
            body = encode(message)
            props = amqp_properties(message, persistent=self.persistent)
        else:
            body = bytes(message)
            props = {"message_id": new_id(), "content_type": "application/json",
                     "delivery_mode": 2 if self.persistent else 1}
        if properties:
            props.update(properties)
        raw = await self._raw_channel(self.confirm_timeout)
        p = _props(props)
        # wait=False: aiormq otherwise holds the channel lock until each frame is written,
        # which serialises the batch (5k/s instead of 9k/s here)
        fut = asyncio.ensure_future(raw.basic_publish(body, exchange=self.exchange, routing_key=routing_key,
                                                      properties=p, mandatory=self.mandatory,
                                                      timeout=self.confirm_timeout, wait=False))
        self._pending.append((fut, routing_key, body, p))
        if len(self._pending) >= self.max_in_flight:
            await self.flush()

    async def flush(self) -> None:
        """Wait for every outstanding confirm; re-send failed ones (bounded)."""
        attempt = 1
        while self._pending:
            batch, self._pending = self._pending, []
            await asyncio.gather(*(f for f, *_ in batch), return_exceptions=True)
            failed = []
            for fut, key, body, p in batch:
                exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
                if exc is None and not isinstance(fut.result(), spec.Basic.Nack):
                    self.published += 1
                    continue
                if isinstance(exc, aiormq.exceptions.PublishError):
                    raise Unroutable(self.exchange, key)
                failed.append((key, body, p, exc))
            if not failed:
                return
            if attempt >= self.attempts:
                raise PublishError(f"{len(failed)} market-data messages to {self.exchange!r} not confirmed after "
                                   f"{self.attempts} attempts (last error: {failed[-1][3]!r})")
            log.warning("%d market-data publishes failed (attempt %d/%d); re-sending", len(failed), attempt,
                        self.attempts)
            self.retries += len(failed)
            await asyncio.sleep(self.connection.backoff.delay(attempt - 1))
            attempt += 1
            raw = await self._raw_channel(self.confirm_timeout)
            for key, body, p, _exc in failed:
                fut = asyncio.ensure_future(raw.basic_publish(body, exchange=self.exchange, routing_key=key,
                                                              properties=p, mandatory=self.mandatory,
                                                              timeout=self.confirm_timeout, wait=False))
                self._pending.append((fut, key, body, p))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        await super().close()


# ---------------------------------------------------------------------------------------
# Consumer
# ---------------------------------------------------------------------------------------
@dataclass
class Delivery:
    """What a handler gets besides the decoded message."""

    body: bytes
    routing_key: str
    exchange: str
    message_id: str | None
    headers: Mapping[str, Any]
    redelivered: bool
    correlation_id: str | None = None
    type: str | None = None


Handler = Callable[[Any, Delivery], Awaitable[None]]


class Consumer(_ChannelMember):
    """Consumes one queue; manual ack only after ``handler(message, delivery)`` returned.

    ``message`` is ``messages.decode(body, type_)`` when ``type_`` is given, else the raw
    body. Outcomes follow :mod:`qapubsub.handling`: decode error or ``handling.Reject`` ->
    a copy with ``x-qa-error`` is published (confirmed) to ``dlx`` and the original acked;
    any other exception -> requeued, up to ``max_attempts`` deliveries, then dead-lettered.

    ``ack_every > 1`` acks with ``multiple=True`` every ``ack_every`` messages, and after
    ``ack_interval`` seconds of quiet (so a slow stream is never left unacked). Deliveries
    are handled one at a time, in order. Consumes through aiormq directly (the aio-pika
    IncomingMessage wrapper and its extra task per message cost ~40 % of the rate).
    """

    def __init__(self, connection: Connection, queue: Queue, handler: Handler, *, type_: Any = None,
                 prefetch: int = 100, ack_every: int = 1, ack_interval: float = 0.02,
                 max_attempts: int = handling.DEFAULT_MAX_ATTEMPTS, dlx: str | None = None) -> None:
        super().__init__(connection)
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1 (unbounded prefetch is not allowed)")
        if ack_every < 1 or ack_every > prefetch:
            raise ValueError("ack_every must be in 1..prefetch")
        self.queue = queue
        self.handler = handler
        self.type_ = type_
        self.prefetch = prefetch
        self.ack_every = ack_every
        self.ack_interval = ack_interval
        self.dlx = dlx if dlx is not None else queue.arguments.get("x-dead-letter-exchange")
        self.tracker = handling.AttemptTracker(max_attempts)
        self.stats = {"delivered": 0, "acked": 0, "requeued": 0, "dead_lettered": 0, "recancelled": 0}
        self._aq: AbstractQueue | None = None       # strong reference (aio-pika #536)
        self._dl_channel: AbstractChannel | None = None
        self._tag: str | None = None
        self._gen = 0
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._unacked: tuple[int, Any, int] | None = None   # (generation, raw channel, highest tag)
        self._unacked_n = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def name(self) -> str:
        return self._aq.name if self._aq is not None else self.queue.name

    async def start(self) -> Consumer:
        self.connection._register(self)
        self._worker = asyncio.create_task(self._work(), name=f"qapubsub-consumer-{self.queue.name}")
        conn = await self.connection.wait_ready(self.connection.connect_timeout * 6)
        if self._channel is None:
            async with self.connection._restore_lock:
                if self._channel is None and self.connection._conn is conn:
                    await self._attach(conn)
        return self

    async def bind(self, exchange: str, routing_key: str) -> None:
        """Add a binding now; it is restored after every reconnect like the initial ones."""
        self.queue = self.queue.with_bindings(Binding(exchange, routing_key))
        if self._aq is not None and self._channel is not None and not self._channel.is_closed:
            await self._aq.bind(exchange, routing_key=routing_key)

    async def unbind(self, exchange: str, routing_key: str) -> None:
        b = Binding(exchange, routing_key)
        self.queue = Queue(self.queue.name, self.queue.durable, self.queue.exclusive, self.queue.auto_delete,
                           dict(self.queue.arguments), tuple(x for x in self.queue.bindings if x != b))
        if self._aq is not None and self._channel is not None and not self._channel.is_closed:
            await self._aq.unbind(exchange, routing_key=routing_key)

    # -- attach / restore --------------------------------------------------------------
    async def _attach(self, conn: AbstractConnection) -> None:
        if self._stopping:
            return
        self._gen += 1
        gen = self._gen
        self._unacked, self._unacked_n = None, 0  # tags of an old channel are void
        ch = await conn.channel(publisher_confirms=False)
        dl = await conn.channel(publisher_confirms=True)
        try:
            await ch.set_qos(prefetch_count=self.prefetch)
            raw = await ch.get_underlay_channel()
            self._aq = await declare_queue_async(ch, self.queue)  # queue + every binding, strongly held
        except BaseException:
            for c in (ch, dl):
                with contextlib.suppress(Exception):
                    await c.close()
            raise
        self._channel, self._dl_channel, self._raw = ch, dl, raw

        def on_dl_close(*_a: Any, **_k: Any) -> None:  # the dead-letter channel died: restart both
            if self._dl_channel is dl and self._channel is not None and not self._channel.is_closed:
                asyncio.ensure_future(self._channel.close())
        dl.close_callbacks.add(on_dl_close)

        async def on_cancel(_frame: Any) -> None:  # broker cancelled us (queue deleted, node down...)
            if gen != self._gen or self._stopping:
                return
            self.stats["recancelled"] += 1
            log.warning("consumer on %s cancelled by the broker; re-declaring and re-consuming", self.name)
            asyncio.ensure_future(self._reconsume(gen))

        raw.on_consumer_cancel_callbacks.add(on_cancel)
        await self._consume(gen, raw)
        self._watch(ch)
        self._attached.set()
        log.info("consuming %s (prefetch %d)", self.name, self.prefetch)

    async def _consume(self, gen: int, raw: Any) -> None:
        put = self._inbox.put_nowait

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            put((gen, raw, message))

        assert self._aq is not None
        ok = await raw.basic_consume(self._aq.name, on_message, no_ack=False)
        self._tag = ok.consumer_tag

    async def _reconsume(self, gen: int) -> None:
        attempt = 0
        while gen == self._gen and not self._stopping and not self.connection._closing:
            ch, raw = self._channel, self._raw
            try:
                if ch is None or ch.is_closed or raw is None:
                    return  # channel / connection recovery re-attaches us
                self._aq = await declare_queue_async(ch, self.queue)
                await self._consume(gen, raw)
                log.info("re-consuming %s after a broker cancel", self.name)
                return
            except Exception as exc:  # noqa: BLE001
                delay = self.connection.backoff.delay(attempt)
                attempt += 1
                log.warning("cannot re-consume %s (%s); next try in %.2f s", self.name, exc, delay)
                await asyncio.sleep(delay)

    def _detach(self) -> None:
        super()._detach()
        self._dl_channel = None
        self._tag = None
        self._unacked, self._unacked_n = None, 0

    # -- processing --------------------------------------------------------------------
    _FLUSH = object()

    def _timer_fired(self) -> None:
        self._flush_timer = None
        self._inbox.put_nowait(self._FLUSH)

    async def _work(self) -> None:
        inbox = self._inbox
        while True:
            item = await inbox.get()
            try:
                if item is None:
                    await self._flush_acks()
                    return
                if item is self._FLUSH:
                    await self._flush_acks()
                    continue
                gen, raw, message = item
                if gen != self._gen:
                    continue  # delivered on a channel that is gone: the broker redelivers it
                await self._handle(raw, message)
                if self._unacked is not None and self._flush_timer is None and inbox.empty():
                    self._flush_timer = asyncio.get_running_loop().call_later(self.ack_interval, self._timer_fired)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - ack/publish failed: channel gone, broker redelivers
                log.warning("consumer %s: could not settle a delivery (%s: %s); the broker will redeliver it",
                            self.name, type(exc).__name__, exc)

    async def _handle(self, raw: Any, m: aiormq.abc.DeliveredMessage) -> None:
        self.stats["delivered"] += 1
        props = m.header.properties
        dlv = m.delivery
        headers = props.headers or {}
        d = Delivery(body=m.body, routing_key=dlv.routing_key or "", exchange=dlv.exchange or "",
                     message_id=props.message_id, headers=headers, redelivered=bool(dlv.redelivered),
                     correlation_id=props.correlation_id, type=props.message_type)
        tag = dlv.delivery_tag
        try:
            payload = decode(m.body, self.type_) if self.type_ is not None else m.body
        except DecodeError as exc:
            await self._dead_letter(raw, tag, d, props, str(exc), attempts=1)
            return
        try:
            await self.handler(payload, d)
        except handling.Reject as exc:
            await self._dead_letter(raw, tag, d, props, handling.reason_of(exc), attempts=1)
            return
        except Exception as exc:  # noqa: BLE001 - the handler's failure is data for the rules
            key = d.message_id or f"body:{hash(m.body)}"
            count = headers.get("x-delivery-count")
            outcome, n = self.tracker.failed(key, int(count) if isinstance(count, int) else None)
            extra = {"message_id": d.message_id, "routing_key": d.routing_key}
            if outcome is handling.Outcome.DEAD_LETTER:
                log.error("handler failed %d times on %s; dead-lettering: %s", n, self.name, handling.reason_of(exc),
                          extra=extra)
                await self._dead_letter(raw, tag, d, props, handling.reason_of(exc), attempts=n)
            else:
                log.warning("handler failed (attempt %d) on %s; requeueing: %s", n, self.name,
                            handling.reason_of(exc), extra=extra)
                await raw.basic_reject(tag, requeue=True)
                self.stats["requeued"] += 1
            return
        if d.message_id:
            self.tracker.succeeded(d.message_id)
        if self.ack_every == 1:
            await raw.basic_ack(tag, wait=False)
            self.stats["acked"] += 1
        else:
            self._unacked = (self._gen, raw, tag)
            self._unacked_n += 1
            if self._unacked_n >= self.ack_every:
                await self._flush_acks()

    async def _flush_acks(self) -> None:
        u, n = self._unacked, self._unacked_n
        self._unacked, self._unacked_n = None, 0
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if u is None:
            return
        gen, raw, tag = u
        if gen != self._gen or raw.is_closed:
            return  # those deliveries will come again
        await raw.basic_ack(tag, multiple=True, wait=False)
        self.stats["acked"] += n

    async def _dead_letter(self, raw: Any, tag: int, d: Delivery, props: Any, reason: str, *, attempts: int) -> None:
        if not self.dlx:
            log.error("no dead-letter exchange for %s; rejecting without requeue: %s", self.name, reason)
            await raw.basic_reject(tag, requeue=False)
            self.stats["dead_lettered"] += 1
            return
        headers = handling.dead_letter_headers(d.headers, reason=reason, exchange=d.exchange,
                                               routing_key=d.routing_key, queue=self.name, attempts=attempts)
        dl = self._dl_channel
        if dl is None or dl.is_closed:
            raise NotConnected("dead-letter channel closed")
        dl_raw = await dl.get_underlay_channel()
        out = spec.Basic.Properties(
            message_id=d.message_id or new_id(), correlation_id=d.correlation_id, message_type=d.type,
            content_type=props.content_type or "application/json", delivery_mode=2, headers=headers)
        result = await dl_raw.basic_publish(d.body, exchange=self.dlx, routing_key=d.routing_key, properties=out,
                                            timeout=10.0)
        if isinstance(result, spec.Basic.Nack):
            raise PublishError("dead-letter copy nacked")
        await raw.basic_ack(tag)
        self.stats["dead_lettered"] += 1
        log.warning("dead-lettered a message from %s: %s", self.name, reason,
                    extra={"message_id": d.message_id, "routing_key": d.routing_key})

    # -- stop ----------------------------------------------------------------------------
    async def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming, finish what was delivered, flush acks, close the channels."""
        if self._stopping:
            return
        self._stopping = True
        ch, raw = self._channel, self._raw
        if self._tag is not None and raw is not None and not raw.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(raw.basic_cancel(self._tag), timeout)
        self._tag = None
        if self._worker is not None:
            self._inbox.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            except asyncio.TimeoutError:
                log.warning("consumer %s: in-flight work did not finish in %.1f s; unacked messages will be "
                            "redelivered", self.name, timeout)
                self._worker.cancel()
            except Exception:  # noqa: BLE001
                pass
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._closed = True
        self.connection._unregister(self)
        dl, self._dl_channel = self._dl_channel, None
        self._detach()
        for c in (ch, dl):
            if c is not None and not c.is_closed:
                with contextlib.suppress(Exception):
                    await c.close()
        log.info("consumer on %s stopped: %s", self.name, self.stats)
