"""History requests to the barhandler: message schemas and small sync / async clients.

A strategy asks the barhandler for history + today in one call::

    from qamarket.rpc import HistoryClient

    with HistoryClient() as hc:                       # QA_AMQP_URL / QA_NAMESPACE from the environment
        bars = hc.get("rb2605", "SHFE", "1min", count=500)      # oldest first
        reply = hc.request("rb2605", "SHFE", "5min", count=100, indicators=["MA(20)", "MACD"])
        reply.bars[-1].final          # False: the bar in progress (include_current=True by default)
        reply.indicators["MACD(12,26,9).dif"]   # a column aligned with reply.bars

Transport: the request goes to the default exchange with routing key = the barhandler's
request queue (``Topology.history_requests``, ``qa.barhandler.history``), ``reply_to`` =
RabbitMQ's direct reply-to pseudo-queue ``amq.rabbitmq.reply-to`` (no queue to declare or
delete per client), ``correlation_id`` = the request id, ``expiration`` = the timeout (a request
nobody served in time is dropped by the broker; the barhandler also drops one past its
``deadline``). No reply in time raises :class:`HistoryTimeout`; an error reply raises
:class:`HistoryError` whose ``field`` names the bad field. Bad requests are answered once and
never retried.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any



from qapubsub import keys
from qapubsub.messages import DecodeError, Message, decode, encode, now_ns

from .history import IndicatorSpec, parse_indicators
from .models import Bar, Exchange, Freq

__all__ = ["HistoryRequest", "HistoryReply", "IndicatorBar", "BadRequest", "HistoryError", "HistoryTimeout",
           "validate_request", "parse_request", "error_field", "HistoryClient", "AsyncHistoryClient",
           "DIRECT_REPLY_TO", "MAX_COUNT"]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
MAX_COUNT = 100_000
DEFAULT_TIMEOUT = 10.0


class HistoryRequest(Message, tag="qa.history.request", forbid_unknown_fields=True):
    """Ask for the merged bars of one instrument and frequency.

    Give ``count`` (the newest ``count`` bars, up to ``end`` if given) and/or ``start``/``end``
    (labels = bar starts, exchange-local epoch ms, inclusive). ``indicators`` as
    :func:`qamarket.history.parse_indicator` reads them. ``deadline``: UTC ns after which the
    answer is useless (0: none)."""

    symbol: str
    exchange: Exchange
    freq: Freq
    count: int | None = None
    start: int | None = None
    end: int | None = None
    indicators: list[str] = []
    include_current: bool = True
    deadline: int = 0


class HistoryReply(Message, tag="qa.history.reply"):
    """``ok`` with ``bars`` (oldest first; the last one has ``final=False`` when it is the bar in
    progress) and ``indicators`` (column name -> values aligned with ``bars``), or ``ok=False``
    with ``error`` and ``field`` (the request field that is wrong, "" if none)."""

    ok: bool
    request_id: str = ""
    error: str = ""
    field: str = ""
    symbol: str = ""
    exchange: str = ""
    freq: str = ""
    bars: list[Bar] = []
    indicators: dict[str, list[float | None]] = {}
    sources: dict[str, int] = {}


class IndicatorBar(Message, tag="qa.ibar"):
    """A closed bar as the barhandler emits it downstream, with its subscription's indicator values."""

    bar: Bar
    indicators: dict[str, float | None] = {}


class BadRequest(ValueError):
    """A request field is wrong; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(reason)


class HistoryError(RuntimeError):
    """The barhandler answered with an error; ``field`` names the bad request field (or "")."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"history request refused: {reason}" + (f" (field {field!r})" if field else ""))


class HistoryTimeout(TimeoutError):
    """No reply in time: the barhandler is not running, or is overloaded."""


_FIELD_PATTERNS = (re.compile(r"at `\$\.([A-Za-z_]\w*)"), re.compile(r"field `([A-Za-z_]\w*)`"))


def error_field(message: str) -> str:
    """The field a msgspec validation message is about (``"... - at `$.count`"`` -> ``"count"``)."""
    for p in _FIELD_PATTERNS:
        m = p.search(message)
        if m:
            return m.group(1)
    return ""


def validate_request(req: HistoryRequest) -> list[IndicatorSpec]:
    """Semantic checks beyond the schema; returns the parsed indicators. Raises :class:`BadRequest`."""
    try:
        keys.bar_key(req.freq, req.exchange, req.symbol)
    except ValueError as exc:
        raise BadRequest("symbol", str(exc)) from None
    if req.count is not None and not 1 <= req.count <= MAX_COUNT:
        raise BadRequest("count", f"count {req.count} must be in 1..{MAX_COUNT}")
    if req.count is None and req.start is None:
        raise BadRequest("count", "give count, or start (and optionally end)")
    if req.start is not None and req.end is not None and req.start > req.end:
        raise BadRequest("end", f"end {req.end} is before start {req.start}")
    try:
        return parse_indicators(req.indicators)
    except ValueError as exc:
        raise BadRequest("indicators", str(exc)) from None


def parse_request(body: bytes) -> tuple[HistoryRequest, list[IndicatorSpec]]:
    """Decode strictly and validate; :class:`BadRequest` names the field."""
    try:
        req = decode(body, HistoryRequest)
    except DecodeError as exc:
        raise BadRequest(error_field(str(exc)), str(exc)) from None
    return req, validate_request(req)


def _make_request(symbol: str, exchange: str, freq: str, count: int | None, start: int | None, end: int | None,
                  indicators: Sequence[str], include_current: bool, timeout: float) -> HistoryRequest:
    return HistoryRequest(symbol=symbol, exchange=exchange, freq=freq, count=count, start=start, end=end,  # type: ignore[arg-type]
                          indicators=list(indicators), include_current=include_current,
                          deadline=now_ns() + int(timeout * 1e9))


def _check(reply: HistoryReply) -> HistoryReply:
    if not reply.ok:
        raise HistoryError(reply.field, reply.error)
    return reply


def _settings_url_and_topology(url: str | None, topology: Any) -> tuple[str, Any]:
    from qapubsub.settings import Settings
    from qapubsub.topology import Topology

    if url is None or topology is None:
        settings = Settings.from_env()
        url = url or settings.amqp_url
        topology = topology or Topology(settings.namespace)
    return url, topology


class HistoryClient:
    """Synchronous client (pika). One instance per thread; reconnects once per call if the connection dropped."""

    def __init__(self, url: str | None = None, *, topology: Any = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url, self.topology = _settings_url_and_topology(url, topology)
        self.queue = self.topology.history_requests.name
        self.timeout = timeout
        self._conn: Any = None
        self._ch: Any = None
        self._replies: dict[str, bytes] = {}
        self._returned: set[str] = set()

    def _channel(self) -> Any:
        import pika

        if self._conn is None or not self._conn.is_open or self._ch is None or not self._ch.is_open:
            self.close()
            self._conn = pika.BlockingConnection(pika.URLParameters(self.url))
            self._ch = self._conn.channel()
            self._ch.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
            self._ch.add_on_return_callback(self._on_return)
        return self._ch

    def _on_reply(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        if props.correlation_id:
            self._replies[props.correlation_id] = body

    def _on_return(self, _ch: Any, _method: Any, props: Any, _body: bytes) -> None:
        if props.correlation_id:
            self._returned.add(props.correlation_id)

    def request(self, symbol: str, exchange: str, freq: str, count: int | None = None, *, start: int | None = None,
                end: int | None = None, indicators: Sequence[str] = (), include_current: bool = True,
                timeout: float | None = None) -> HistoryReply:
        """Send one request and wait for its reply; raises :class:`HistoryError` / :class:`HistoryTimeout`."""
        timeout = self.timeout if timeout is None else timeout
        req = _make_request(symbol, exchange, freq, count, start, end, indicators, include_current, timeout)
        return _check(decode(self.send_raw(encode(req), correlation_id=req.id, timeout=timeout), HistoryReply))

    def get(self, symbol: str, exchange: str, freq: str, count: int | None = None, *, start: int | None = None,
            end: int | None = None, indicators: Sequence[str] = (), include_current: bool = True,
            timeout: float | None = None) -> list[Bar]:
        """The merged bars, oldest first (the last may be the bar in progress, ``final=False``)."""
        return self.request(symbol, exchange, freq, count, start=start, end=end, indicators=indicators,
                            include_current=include_current, timeout=timeout).bars

    def send_raw(self, body: bytes, *, correlation_id: str | None = None, timeout: float | None = None) -> bytes:
        """Publish ``body`` as a request and return the reply body (tests use it for malformed requests)."""
        import pika

        timeout = self.timeout if timeout is None else timeout
        cid = correlation_id or uuid.uuid4().hex
        props = pika.BasicProperties(reply_to=DIRECT_REPLY_TO, correlation_id=cid, message_id=cid,
                                     content_type="application/json", type=HistoryRequest.__struct_config__.tag,
                                     expiration=str(max(1, int(timeout * 1000))), delivery_mode=1)
        ch = self._channel()
        ch.basic_publish("", self.queue, body, props, mandatory=True)
        deadline = time.monotonic() + timeout
        try:
            while cid not in self._replies:
                if cid in self._returned:
                    raise HistoryTimeout(f"no queue {self.queue!r} on the broker: run `qaflow declare` or start "
                                         f"`qaflow barhandler`")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HistoryTimeout(f"no reply to the history request within {timeout:g} s: is `qaflow "
                                         f"barhandler` running (request queue {self.queue!r})?")
                self._conn.process_data_events(time_limit=min(0.05, left))
            return self._replies.pop(cid)
        finally:
            self._returned.discard(cid)

    def close(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> HistoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHistoryClient:
    """The same over aio-pika, for asyncio strategies::

        async with AsyncHistoryClient() as hc:
            bars = await hc.get("rb2605", "SHFE", "1min", count=500)
    """

    def __init__(self, url: str | None = None, *, topology: Any = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url, self.topology = _settings_url_and_topology(url, topology)
        self.queue = self.topology.history_requests.name
        self.timeout = timeout
        self._conn: Any = None
        self._ch: Any = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    async def _channel(self) -> Any:
        import aio_pika

        if self._conn is None or self._conn.is_closed or self._ch is None or self._ch.is_closed:
            await self.close()
            self._conn = await aio_pika.connect(self.url)
            self._ch = await self._conn.channel(publisher_confirms=False)
            q = await self._ch.declare_queue(DIRECT_REPLY_TO, passive=True)
            await q.consume(self._on_reply, no_ack=True)
        return self._ch

    async def _on_reply(self, message: Any) -> None:
        fut = self._pending.get(message.correlation_id or "")
        if fut is not None and not fut.done():
            fut.set_result(message.body)

    async def request(self, symbol: str, exchange: str, freq: str, count: int | None = None, *,
                      start: int | None = None, end: int | None = None, indicators: Sequence[str] = (),
                      include_current: bool = True, timeout: float | None = None) -> HistoryReply:
        timeout = self.timeout if timeout is None else timeout
        req = _make_request(symbol, exchange, freq, count, start, end, indicators, include_current, timeout)
        body = await self.send_raw(encode(req), correlation_id=req.id, timeout=timeout)
        return _check(decode(body, HistoryReply))

    async def get(self, symbol: str, exchange: str, freq: str, count: int | None = None, *,
                  start: int | None = None, end: int | None = None, indicators: Sequence[str] = (),
                  include_current: bool = True, timeout: float | None = None) -> list[Bar]:
        reply = await self.request(symbol, exchange, freq, count, start=start, end=end, indicators=indicators,
                                   include_current=include_current, timeout=timeout)
        return reply.bars

    async def send_raw(self, body: bytes, *, correlation_id: str | None = None, timeout: float | None = None) -> bytes:
        import aio_pika

        timeout = self.timeout if timeout is None else timeout
        cid = correlation_id or uuid.uuid4().hex
        ch = await self._channel()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            await ch.default_exchange.publish(
                aio_pika.Message(body, reply_to=DIRECT_REPLY_TO, correlation_id=cid, message_id=cid,
                                 content_type="application/json", type=HistoryRequest.__struct_config__.tag,
                                 expiration=timeout),
                routing_key=self.queue)
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise HistoryTimeout(f"no reply to the history request within {timeout:g} s: is `qaflow "
                                     f"barhandler` running (request queue {self.queue!r})?") from None
        finally:
            self._pending.pop(cid, None)

    async def close(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        if conn is not None and not conn.is_closed:
            await conn.close()

    async def __aenter__(self) -> AsyncHistoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def reply_error(request_id: str, exc: BadRequest) -> HistoryReply:
    return HistoryReply(ok=False, request_id=request_id, error=str(exc), field=exc.field)



