"""CTP market data -> ``qa.tick``: vn.py's EventEngine + ``vnpy_ctp.CtpGateway`` in its own process.

Threads::

    CTP API thread ──on_tick/write_log──► vn.py EventEngine queue
    EventEngine worker: _on_tick (map -> bounded queue, drop-oldest when full, counted)
                        _on_log  (log; on "行情服务器登录成功" re-subscribe every symbol)
    publisher thread:   bounded queue ──► StreamPublisher(qa.tick, keys.tick_key) ──► RabbitMQ

pika is not thread-safe, so nothing is published from vn.py's threads: the only object
they share with the publisher thread is a ``queue.Queue``. Every handler registered on the
EventEngine is wrapped by :func:`guarded` (an exception is logged and counted, never
propagated: vn.py's worker thread dies silently otherwise), and the engine itself is a
:func:`~brokers.ctp.vnpy_compat.guarded_engine_class` so the gateway's own timer handler
cannot kill it either.

Example::

    from brokers.ctp.md import CtpMarketData
    from brokers.ctp.settings import CtpSettings

    md = CtpMarketData(CtpSettings.from_env())
    md.start()               # connects CTP, starts the publisher thread
    ...
    md.stop()                # closes CTP, drains the queue, flushes confirms

or ``python -m brokers.ctp.md --symbols SHFE.rb2512,DCE.i2601`` (settings in ``QA_CTP_*``;
see docs/brokers.md). vn.py is imported in :meth:`CtpMarketData.start`, not at import.
"""
from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from qapubsub import keys
from qapubsub.topology import Topology

from .mapping import UnsupportedTick, tick_from_vnpy
from .settings import CtpSettings, SettingsError, parse_symbols

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3
_STOP = object()


class TickSink(Protocol):
    """What the publisher thread publishes to (a :class:`qapubsub.sync.StreamPublisher`)."""

    def publish(self, exchange: str, routing_key: str, message: Any) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _RateLimited:
    """Log the first ``first`` occurrences, then every ``every``-th."""

    def __init__(self, first: int = 10, every: int = 1000) -> None:
        self.first, self.every, self.n = first, every, 0

    def __call__(self) -> bool:
        self.n += 1
        return self.n <= self.first or self.n % self.every == 0


def guarded(handler: Callable[[Any], None], on_error: Callable[[str, BaseException], None],
            name: str | None = None) -> Callable[[Any], None]:
    """Wrap a vn.py event handler: an exception goes to ``on_error(name, exc)``, never up."""
    label = name or getattr(handler, "__qualname__", repr(handler))

    def guarded_handler(event: Any) -> None:
        try:
            handler(event)
        except Exception as exc:  # noqa: BLE001 - vn.py's worker thread must not die
            on_error(label, exc)

    guarded_handler.__qualname__ = f"guarded({label})"
    guarded_handler.__wrapped__ = handler  # type: ignore[attr-defined]
    return guarded_handler


class _StreamSink:
    """Default sink: one pika connection + StreamPublisher, built inside the publisher thread."""

    def __init__(self, topology: Topology, amqp: Any = None) -> None:
        from qapubsub.settings import Settings
        from qapubsub.sync import Connection, StreamPublisher

        self.connection = Connection(amqp or Settings.from_env(), client_name="qaflow-md-ctp")
        self.publisher = StreamPublisher(self.connection, topology=topology, batch_size=1000)

    def publish(self, exchange: str, routing_key: str, message: Any) -> None:
        self.publisher.publish(exchange, routing_key, message)

    def flush(self) -> None:
        self.publisher.flush()

    def close(self) -> None:
        self.publisher.close()
        self.connection.close()

    def interrupt(self) -> None:
        """Thread-safe: abort a reconnect back-off of the publisher thread."""
        self.connection.interrupt()


class CtpMarketData:
    """One CTP market-data feed: vn.py gateway in, ``qa.tick`` out. See the module doc.

    ``gateway_class`` (default ``vnpy_ctp.CtpGateway``), ``event_engine`` (default a guarded
    vn.py EventEngine) and ``sink_factory`` (default a StreamPublisher on ``QA_AMQP_URL``,
    called in the publisher thread) are injectable for tests. Counters are in :meth:`stats`.
    """

    def __init__(self, settings: CtpSettings, *, topology: Topology | None = None,
                 gateway_class: type | None = None, event_engine: Any = None,
                 sink_factory: Callable[[], TickSink] | None = None, flush_interval: float = 0.05,
                 drain_timeout: float = 10.0) -> None:
        self.settings = settings
        self.topology = topology or Topology()
        self.gateway_name = settings.gateway_name
        self.symbols: tuple[tuple[str, str], ...] = settings.symbols
        self._gateway_class = gateway_class
        self._event_engine = event_engine
        self._sink_factory = sink_factory or (lambda: _StreamSink(self.topology))
        self.flush_interval = flush_interval
        self.drain_timeout = drain_timeout
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self.gateway: Any = None
        self.event_engine: Any = None
        self._vn: Any = None
        self._sink: Any = None
        self._thread: threading.Thread | None = None
        self._own_engine = False
        self._stopping = threading.Event()   # stop(): the publisher drains and ends
        self.shutdown = threading.Event()    # a signal or a fatal publish error: run_until_signal stops
        self.stopped = threading.Event()
        self.fatal: BaseException | None = None
        self.md_logged_in = False
        # counters (each written by one thread only)
        self.received = 0          # ticks from our gateway (EventEngine thread)
        self.mapped = 0
        self.unsupported = 0       # ticks that could not be mapped (unknown exchange, no datetime)
        self.dropped = 0           # oldest ticks shed because the queue was full
        self.handler_errors = 0    # exceptions caught around handlers
        self.logins = 0            # market-data front logins (first + every reconnect)
        self.disconnects = 0       # market-data front disconnects
        self.subscribe_requests = 0
        self.published = 0         # handed to the StreamPublisher (publisher thread); confirms: its .confirmed
        self.publish_errors = 0
        self._log_drop = _RateLimited()
        self._log_error = _RateLimited()
        self._log_unsupported = _RateLimited()

    # vn.py side -----------------------------------------------------------------------
    def _on_handler_error(self, name: str, exc: BaseException) -> None:
        self.handler_errors += 1
        if self._log_error():
            log.error("CTP handler %s raised %s: %s (%d so far; the feed goes on)", name, type(exc).__name__, exc,
                      self.handler_errors, exc_info=exc, extra={"handler": name})

    def _on_tick(self, event: Any) -> None:
        t = event.data
        if getattr(t, "gateway_name", self.gateway_name) != self.gateway_name or self._stopping.is_set():
            return
        self.received += 1
        try:
            tick = tick_from_vnpy(t, seq=self.received)
            key = keys.tick_key(tick.exchange, tick.symbol)
        except (UnsupportedTick, keys.KeyError_) as exc:
            self.unsupported += 1
            if self._log_unsupported():
                log.warning("CTP tick not published: %s", exc, extra={"symbol": getattr(t, "symbol", None)})
            return
        self.mapped += 1
        item = (key, tick)
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            # Shed the oldest tick (the newest is worth more), as the live queues do (drop-head).
            try:
                self.queue.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                self.dropped += 1
            if self._log_drop():
                log.warning("tick queue full (%d): %d ticks dropped so far; is RabbitMQ slow or down?",
                            self.queue.maxsize, self.dropped, extra={"routing_key": key})

    def _on_log(self, event: Any) -> None:
        from . import vnpy_compat as vc

        rec = event.data
        if getattr(rec, "gateway_name", None) != self.gateway_name:
            return
        msg = str(getattr(rec, "msg", ""))
        if msg.startswith(vc.MD_LOGIN_OK):
            self.md_logged_in = True
            self.logins += 1
            log.info("CTP market-data front logged in (#%d): subscribing %d symbols", self.logins, len(self.symbols),
                     extra={"gateway": self.gateway_name})
            self.subscribe_all()
        elif msg.startswith(vc.MD_DISCONNECTED):
            self.md_logged_in = False
            self.disconnects += 1
            log.warning("CTP market-data front disconnected (%s); CTP reconnects by itself", msg,
                        extra={"gateway": self.gateway_name})
        elif msg.startswith((vc.MD_LOGIN_FAILED, vc.TD_LOGIN_FAILED, vc.TD_AUTH_FAILED, vc.MD_SUBSCRIBE_FAILED,
                             vc.MD_ERROR)):
            log.error("CTP: %s", msg, extra={"gateway": self.gateway_name})
        else:
            log.info("CTP: %s", msg, extra={"gateway": self.gateway_name})

    def subscribe_all(self) -> None:
        """Ask the gateway for every configured symbol (exchange enum looked up by name)."""
        vn = self._vn
        for exchange, symbol in self.symbols:
            req = vn.SubscribeRequest(symbol=symbol, exchange=vn.Exchange[exchange])
            self.gateway.subscribe(req)
            self.subscribe_requests += 1

    # publisher side ---------------------------------------------------------------------
    def _publish_loop(self) -> None:
        sink: Any = None
        pending = 0
        failures = 0
        exchange = self.topology.tick
        try:
            while True:
                try:
                    if sink is None:
                        sink = self._sink = self._sink_factory()
                    if pending:
                        try:
                            item = self.queue.get_nowait()
                        except queue.Empty:
                            sink.flush()   # queue idle: wait for the confirms of what was sent
                            pending = 0
                            continue
                    else:
                        try:
                            item = self.queue.get(timeout=self.flush_interval)
                        except queue.Empty:
                            if self._stopping.is_set():
                                return
                            continue
                    if item is _STOP:
                        if pending:
                            sink.flush()
                        return
                    key, tick = item
                    sink.publish(exchange, key, tick)
                    self.published += 1
                    pending += 1
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - keep publishing; fatal ones stop the feed
                    from qapubsub.sync import FatalError, Interrupted
                    from qapubsub.topology import TopologyMismatch

                    if isinstance(exc, Interrupted):
                        return
                    if isinstance(exc, (FatalError, TopologyMismatch)):
                        self.fatal = exc
                        log.error("cannot publish ticks: %s", exc)
                        self.shutdown.set()
                        return
                    self.publish_errors += 1
                    failures += 1
                    pending = 0
                    log.error("publishing ticks failed (%s: %s); retrying", type(exc).__name__, exc)
                    if self._stopping.wait(min(5.0, 0.1 * 2 ** min(failures, 6))):
                        return
        finally:
            if sink is not None:
                try:
                    sink.close()
                except Exception:  # noqa: BLE001
                    pass

    # life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Import vn.py, start the event engine, the publisher thread, connect and subscribe."""
        from . import vnpy_compat

        self._vn = vn = vnpy_compat.load(with_ctp=self._gateway_class is None)
        gateway_class = self._gateway_class or vn.CtpGateway
        if self._event_engine is None:
            self._event_engine = vnpy_compat.guarded_engine_class(self._on_handler_error)()
            self._own_engine = True
        else:
            self._own_engine = False
        self.event_engine = ee = self._event_engine
        ee.register(vn.EVENT_TICK, guarded(self._on_tick, self._on_handler_error, "on_tick"))
        ee.register(vn.EVENT_LOG, guarded(self._on_log, self._on_handler_error, "on_log"))
        self._thread = threading.Thread(target=self._publish_loop, name="qaflow-md-ctp-publisher", daemon=True)
        self._thread.start()
        if self._own_engine:
            ee.start()
        self.gateway = gateway_class(ee, self.gateway_name)
        log.info("starting CTP market data: %s", self.settings.describe())
        self.gateway.connect(self.settings.vnpy_setting())
        self.subscribe_all()  # before login vnpy_ctp only records them; sent on login

    def stop(self) -> None:
        """Close the gateway, stop the engine, drain the queue to RabbitMQ (bounded), close."""
        if self.stopped.is_set():
            return
        # Engine first (as vn.py's MainEngine.close does): vnpy_ctp's timer handler queries the
        # trader API every 2 s, and a query on an API that gateway.close() released segfaults.
        if self.event_engine is not None:
            if self._own_engine:
                self.event_engine.stop()
            elif self.gateway is not None and hasattr(self.gateway, "process_timer_event"):
                self.event_engine.unregister(self._vn.EVENT_TIMER, self.gateway.process_timer_event)
        if self.gateway is not None:
            try:
                self.gateway.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the CTP gateway: %s", exc)
        self._stopping.set()
        if self._thread is not None:
            try:
                self.queue.put(_STOP, timeout=self.drain_timeout)
            except queue.Full:
                pass
            self._thread.join(self.drain_timeout)
            if self._thread.is_alive():
                sink = self._sink
                if sink is not None and hasattr(sink, "interrupt"):
                    sink.interrupt()
                self._thread.join(2.0)
                log.warning("stopped with %d ticks not published", self.queue.qsize())
            self._thread = None
        self.stopped.set()
        log.info("CTP market data stopped: %s", self.stats())

    def stats(self) -> dict[str, int]:
        return {"received": self.received, "mapped": self.mapped, "unsupported": self.unsupported,
                "dropped": self.dropped, "handler_errors": self.handler_errors, "logins": self.logins,
                "disconnects": self.disconnects, "subscribe_requests": self.subscribe_requests,
                "published": self.published, "publish_errors": self.publish_errors, "queued": self.queue.qsize()}

    def run_until_signal(self, stats_every: float = 60.0) -> int:
        """Start, wait for SIGTERM/SIGINT (a second one exits at once), stop; 0, or 3 if publishing failed."""
        def on_signal(signum: int, _frame: Any) -> None:
            if self.shutdown.is_set():
                log.warning("second signal: exiting now")
                raise SystemExit(EXIT_ERROR)
            log.info("signal %d: stopping", signum)
            self.shutdown.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            next_stats = time.monotonic() + stats_every
            while not self.shutdown.wait(0.5):
                if time.monotonic() >= next_stats:
                    log.info("CTP market data: %s", self.stats())
                    next_stats += stats_every
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return EXIT_CONNECT if self.fatal is not None else EXIT_OK


# command line -----------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", help="EXCHANGE.symbol list, comma separated (default: QA_CTP_SYMBOLS)")
    parser.add_argument("--env", choices=("production", "test"), default=None,
                        help="CTP counter environment: production (实盘) or test (测试) (default: QA_CTP_ENV)")
    parser.add_argument("--gateway-name", default=None, help="vn.py gateway name (default: QA_CTP_GATEWAY_NAME or CTP)")
    parser.add_argument("--queue-size", type=int, default=None, help="ticks buffered before the oldest are dropped")


def run(args: argparse.Namespace) -> int:
    from qapubsub.settings import ConfigError, Settings, redact_url
    from qapubsub.sync import Connection, FatalError, TransportError

    from .vnpy_compat import VnpyMissing

    try:
        settings = CtpSettings.from_env(
            symbols=parse_symbols(args.symbols) if args.symbols else None, environment=args.env,
            gateway_name=args.gateway_name, queue_size=args.queue_size)
        if not settings.symbols:
            raise SettingsError("no symbols: pass --symbols SHFE.rb2512,... or set QA_CTP_SYMBOLS")
        amqp = Settings.from_env()
    except (SettingsError, ConfigError) as exc:
        print(f"qaflow md ctp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:  # fail at start, with exit 3, when RabbitMQ is not there
        Connection(amqp, max_retries=0).ensure().close()
    except (FatalError, TransportError) as exc:
        print(f"qaflow md ctp: cannot connect to RabbitMQ {redact_url(amqp.amqp_urls[0])}: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    try:
        return CtpMarketData(settings).run_until_signal()
    except VnpyMissing as exc:
        print(f"qaflow md ctp: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qaflow md ctp", description="CTP market data (vnpy_ctp) -> qa.tick")
    configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
