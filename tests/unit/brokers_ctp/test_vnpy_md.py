"""The market-data feed driven through a REAL vn.py EventEngine with REAL TickData/LogData.

No CTP server is reachable here: the gateway is either a recording BaseGateway subclass or
the real ``vnpy_ctp.CtpGateway`` whose API callbacks (``onRspUserLogin``,
``onFrontDisconnected``, ``onRtnDepthMarketData``) are called directly, as the CTP library
would, with only the outbound ``subscribeMarketData`` replaced by a recorder.
"""
from __future__ import annotations

import datetime as dt
import sys
import threading
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest

pytest.importorskip("vnpy.trader.object", reason="vn.py not installed (pip install 'qaflow[ctp]')")

from vnpy.event import Event, EventEngine  # noqa: E402
from vnpy.trader.constant import Exchange  # noqa: E402
from vnpy.trader.event import EVENT_LOG, EVENT_TICK  # noqa: E402
from vnpy.trader.gateway import BaseGateway  # noqa: E402
from vnpy.trader.object import LogData, SubscribeRequest, TickData  # noqa: E402

from brokers.ctp import vnpy_compat as vc  # noqa: E402
from brokers.ctp.md import CtpMarketData, guarded  # noqa: E402
from brokers.ctp.settings import CtpSettings  # noqa: E402
from qamarket.models import Tick  # noqa: E402

from .conftest import ENV, ListSink, wait_for  # noqa: E402

SH = ZoneInfo("Asia/Shanghai")
DBL_MAX = sys.float_info.max


class RecordingGateway(BaseGateway):
    """A vn.py gateway that records connect/subscribe instead of talking to CTP."""

    default_name = "CTP"
    exchanges = [Exchange.SHFE, Exchange.DCE]

    def __init__(self, event_engine: EventEngine, gateway_name: str) -> None:
        super().__init__(event_engine, gateway_name)
        self.connected_with: dict[str, Any] | None = None
        self.requests: list[SubscribeRequest] = []
        self.closed = False

    def connect(self, setting: dict) -> None:
        self.connected_with = dict(setting)

    def close(self) -> None:
        self.closed = True

    def subscribe(self, req: SubscribeRequest) -> None:
        self.requests.append(req)

    def send_order(self, req: Any) -> str:
        raise NotImplementedError

    def cancel_order(self, req: Any) -> None:
        raise NotImplementedError

    def query_account(self) -> None:
        pass

    def query_position(self) -> None:
        pass


def make_tick(symbol: str = "rb2512", exchange: Exchange = Exchange.SHFE, **kw: Any) -> TickData:
    base: dict[str, Any] = dict(symbol=symbol, exchange=exchange, gateway_name="CTP",
                                datetime=dt.datetime(2025, 3, 3, 21, 0, 1, 500_000, tzinfo=SH), last_price=3925.0)
    base.update(kw)
    return TickData(**base)


@pytest.fixture
def engine() -> Iterator[EventEngine]:
    ee = EventEngine(0.1)   # type: ignore[arg-type]  # plain vn.py engine (short timer: quick stop)
    ee.start()
    yield ee
    ee.stop()


@pytest.fixture
def feed(engine: EventEngine) -> Iterator[tuple[CtpMarketData, ListSink]]:
    sink = ListSink()
    md = CtpMarketData(CtpSettings.from_env(ENV), gateway_class=RecordingGateway, event_engine=engine,
                       sink_factory=lambda: sink, flush_interval=0.01)
    md.start()
    yield md, sink
    md.stop()


def test_tick_flows_from_gateway_to_sink_on_the_publisher_thread(feed: tuple[CtpMarketData, ListSink]) -> None:
    md, sink = feed
    md.gateway.on_tick(make_tick())   # BaseGateway.on_tick -> EVENT_TICK (+ EVENT_TICK + vt_symbol)
    assert wait_for(lambda: len(sink.items) == 1)
    exchange, key, tick = sink.items[0]
    assert (exchange, key) == ("qa.tick", "SHFE.rb2512")
    assert isinstance(tick, Tick) and tick.last_price == 3925.0 and tick.seq == 1
    assert sink.thread == "qaflow-md-ctp-publisher"          # never vn.py's EventEngine thread
    assert wait_for(lambda: sink.flushes >= 1)               # confirms awaited when the queue is idle
    assert md.gateway.connected_with is not None and md.gateway.connected_with["密码"] == "s3cret-pw"


def test_mapping_field_by_field_from_real_tickdata() -> None:
    from brokers.ctp.mapping import tick_from_vnpy

    values = {f: float(i + 1) for i, f in enumerate(
        ["volume", "turnover", "open_interest", "last_price", "last_volume", "limit_up", "limit_down",
         "open_price", "high_price", "low_price", "pre_close",
         *[f"{s}_{k}_{n}" for s in ("bid", "ask") for k in ("price", "volume") for n in range(1, 6)]])}
    t = make_tick(**values)
    m = tick_from_vnpy(t, seq=42)
    for name, value in values.items():
        assert getattr(m, name) == value, name
    assert (m.symbol, m.exchange, m.source, m.seq) == ("rb2512", "SHFE", "CTP", 42)
    # 21:00:01.500 Asia/Shanghai -> exchange-local epoch ms of that wall clock
    assert m.datetime == int(dt.datetime(2025, 3, 3, 21, 0, 1, 500_000, tzinfo=dt.timezone.utc).timestamp() * 1000)
    assert m.dt == dt.datetime(2025, 3, 3, 21, 0, 1, 500_000)
    assert (m.pre_settlement, m.trading_day) == (0.0, "")   # not in vn.py's TickData
    # the same instant in another zone is the same local wall clock
    utc = make_tick(datetime=dt.datetime(2025, 3, 3, 13, 0, 1, 500_000, tzinfo=dt.timezone.utc))
    assert tick_from_vnpy(utc).datetime == m.datetime
    naive = make_tick(datetime=dt.datetime(2025, 3, 3, 21, 0, 1, 500_000))
    assert tick_from_vnpy(naive).datetime == m.datetime
    # round trip through the wire codec
    from qapubsub.messages import decode, encode
    assert decode(encode(m), Tick) == m


def test_unset_prices_dbl_max_map_to_zero() -> None:
    from brokers.ctp.mapping import PRICE_FIELDS, tick_from_vnpy

    t = make_tick(**{f: DBL_MAX for f in PRICE_FIELDS})
    m = tick_from_vnpy(t)
    assert all(getattr(m, f) == 0.0 for f in PRICE_FIELDS)


def test_every_exchange_is_read_by_name() -> None:
    from brokers.ctp.mapping import tick_from_vnpy

    for ex in (Exchange.SHFE, Exchange.DCE, Exchange.CZCE, Exchange.CFFEX, Exchange.INE, Exchange.GFEX):
        assert tick_from_vnpy(make_tick(exchange=ex)).exchange == ex.name


def test_localised_enum_values_do_not_leak(feed: tuple[CtpMarketData, ListSink]) -> None:
    import enum

    class Localised(enum.Enum):   # vn.py's own enums show Chinese values (Direction.LONG.value == "多")
        DCE = "大连商品交易所"

    md, sink = feed
    tick = make_tick(symbol="i2601", exchange=Exchange.DCE)
    tick.exchange = Localised.DCE  # type: ignore[assignment]
    md.gateway.on_event(EVENT_TICK, tick)
    assert wait_for(lambda: len(sink.items) == 1)
    assert sink.items[0][1] == "DCE.i2601" and sink.items[0][2].exchange == "DCE"
    # subscribe requests carry vn.py's Exchange looked up by name
    assert {(r.exchange, r.symbol) for r in md.gateway.requests} == {(Exchange.SHFE, "rb2512"), (Exchange.DCE, "i2601")}


def test_handler_exception_does_not_kill_the_engine(feed: tuple[CtpMarketData, ListSink]) -> None:
    md, sink = feed
    bad = make_tick()
    bad.last_price = "not a number"  # type: ignore[assignment]  # float() raises inside our handler
    md.gateway.on_tick(bad)
    md.gateway.on_tick(make_tick(last_price=3926.0))
    assert wait_for(lambda: len(sink.items) == 1)
    assert sink.items[0][2].last_price == 3926.0
    assert md.handler_errors == 1
    assert md.event_engine._thread.is_alive()


def test_unsupported_exchange_is_counted_not_published(feed: tuple[CtpMarketData, ListSink]) -> None:
    md, sink = feed
    md.gateway.on_tick(make_tick(symbol="ESZ5", exchange=Exchange.CME))
    md.gateway.on_tick(make_tick())
    assert wait_for(lambda: len(sink.items) == 1)
    assert md.unsupported == 1 and md.handler_errors == 0


def test_ticks_of_another_gateway_are_ignored(feed: tuple[CtpMarketData, ListSink]) -> None:
    md, sink = feed
    md.gateway.on_tick(make_tick(gateway_name="OTHER"))
    md.gateway.on_tick(make_tick())
    assert wait_for(lambda: len(sink.items) == 1)
    assert md.received == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_plain_vnpy_engine_dies_on_an_unguarded_handler_and_guarded_survives() -> None:
    """Pins the vn.py behaviour the wrappers exist for."""
    seen: list[int] = []

    def boom(event: Event) -> None:
        if event.data == 1:
            raise RuntimeError("boom")
        seen.append(event.data)

    plain = EventEngine(0.1)  # type: ignore[arg-type]
    plain.register("x", boom)
    plain.start()
    try:
        plain.put(Event("x", 1))
        assert wait_for(lambda: not plain._thread.is_alive(), 3)   # worker thread gone
    finally:
        plain._active = False
        plain._timer.join()

    errors: list[tuple[str, BaseException]] = []
    ee = EventEngine(0.1)  # type: ignore[arg-type]
    ee.register("x", guarded(boom, lambda n, e: errors.append((n, e)), "boom"))
    ee.start()
    try:
        ee.put(Event("x", 1))
        ee.put(Event("x", 2))
        assert wait_for(lambda: seen == [2])
        assert errors and errors[0][0] == "boom" and isinstance(errors[0][1], RuntimeError)
    finally:
        ee.stop()


def test_guarded_engine_class_survives_handlers_it_does_not_own() -> None:
    errors: list[str] = []
    seen: list[int] = []
    ee = vc.guarded_engine_class(lambda t, e: errors.append(t))()

    def gateway_timer_handler(event: Event) -> None:   # e.g. vnpy_ctp's process_timer_event
        raise ValueError("td api not connected")

    ee.register("x", gateway_timer_handler)
    ee.register("x", lambda e: seen.append(e.data))   # the next handler of the same event still runs
    ee.register_general(lambda e: seen.append(-1) if e.type == "x" else None)
    ee.start()
    try:
        ee.put(Event("x", 1))
        ee.put(Event("x", 2))
        assert wait_for(lambda: seen == [1, -1, 2, -1])
        assert errors == ["x", "x"] and ee._thread.is_alive()
    finally:
        ee.stop()


def test_resubscribes_every_symbol_after_each_login(feed: tuple[CtpMarketData, ListSink]) -> None:
    md, _ = feed
    gw = md.gateway
    initial = [(r.exchange, r.symbol) for r in gw.requests]
    assert initial == [(Exchange.SHFE, "rb2512"), (Exchange.DCE, "i2601")]   # at start
    gw.write_log(vc.MD_CONNECTED)
    gw.write_log(vc.MD_LOGIN_OK)
    assert wait_for(lambda: len(gw.requests) == 4)
    gw.write_log(f"{vc.MD_DISCONNECTED}，原因4097")
    assert wait_for(lambda: md.disconnects == 1 and not md.md_logged_in)
    assert len(gw.requests) == 4                                   # nothing sent while down
    gw.write_log(vc.MD_CONNECTED)
    gw.write_log(vc.MD_LOGIN_OK)
    assert wait_for(lambda: len(gw.requests) == 6)
    assert [(r.exchange, r.symbol) for r in gw.requests[4:]] == initial
    assert md.logins == 2 and md.md_logged_in
    # another gateway's login in the same engine is not ours
    gw.event_engine.put(Event(EVENT_LOG, LogData(msg=vc.MD_LOGIN_OK, gateway_name="OTHER")))
    gw.write_log("sync")
    assert wait_for(lambda: md.logins == 2) and len(gw.requests) == 6


def test_full_queue_drops_oldest_and_counts(engine: EventEngine) -> None:
    gate = threading.Event()
    sink = ListSink(gate)
    md = CtpMarketData(CtpSettings.from_env({**ENV, "QA_CTP_QUEUE_SIZE": "3"}), gateway_class=RecordingGateway,
                       event_engine=engine, sink_factory=lambda: sink, flush_interval=0.01)
    md.start()
    try:
        for i in range(10):
            md.gateway.on_tick(make_tick(last_price=4000.0 + i))
        assert wait_for(lambda: md.received == 10)
        gate.set()
        assert wait_for(lambda: md.published + md.dropped == 10)
        prices = [t.last_price for _, _, t in sink.items]
        assert md.dropped >= 6 and prices[-1] == 4009.0            # the newest always survives
        assert prices == sorted(prices)
        seqs = [t.seq for _, _, t in sink.items]
        assert seqs[-1] == 10 and len(seqs) == 10 - md.dropped      # gaps in seq show the drops downstream
    finally:
        gate.set()
        md.stop()


def test_stop_drains_queue_and_closes(engine: EventEngine) -> None:
    gate = threading.Event()
    sink = ListSink(gate)
    md = CtpMarketData(CtpSettings.from_env(ENV), gateway_class=RecordingGateway, event_engine=engine,
                       sink_factory=lambda: sink, flush_interval=0.01)
    md.start()
    for i in range(5):
        md.gateway.on_tick(make_tick(last_price=4000.0 + i))
    assert wait_for(lambda: md.received == 5)
    gate.set()
    md.stop()
    assert len(sink.items) == 5 and sink.flushes >= 1 and sink.closed and md.gateway.closed
    assert md.stats()["published"] == 5


def test_publish_error_is_retried_not_fatal(engine: EventEngine) -> None:
    class Flaky(ListSink):
        fails = 1

        def publish(self, exchange: str, routing_key: str, message: Any) -> None:
            if self.fails:
                self.fails -= 1
                raise ConnectionResetError("broker gone")
            super().publish(exchange, routing_key, message)

    sinks: list[Flaky] = []

    def factory() -> Flaky:
        sinks.append(Flaky())
        return sinks[-1]

    md = CtpMarketData(CtpSettings.from_env(ENV), gateway_class=RecordingGateway, event_engine=engine,
                       sink_factory=factory, flush_interval=0.01)
    md.start()
    try:
        md.gateway.on_tick(make_tick(last_price=1.0))
        md.gateway.on_tick(make_tick(last_price=2.0))
        assert wait_for(lambda: md.published == 1)
        assert md.publish_errors == 1 and sinks[0].items[0][2].last_price == 2.0
    finally:
        md.stop()


def test_engine_stops_before_the_gateway_closes() -> None:
    """vnpy_ctp's timer handler queries the trader API; after close() released it, that segfaults
    (seen in test_vnpy_ctp_process). So the feed's own engine must be stopped first."""

    class TimerGateway(RecordingGateway):
        engine_active_at_close: bool | None = None

        def connect(self, setting: dict) -> None:
            super().connect(setting)
            self.event_engine.register("eTimer", self.process_timer_event)

        def process_timer_event(self, event: Event) -> None:
            assert not self.closed, "timer handler ran on a closed gateway"

        def close(self) -> None:
            self.engine_active_at_close = self.event_engine._active
            super().close()

    sink = ListSink()
    md = CtpMarketData(CtpSettings.from_env(ENV), gateway_class=TimerGateway, sink_factory=lambda: sink)
    md.start()                      # its own (guarded) engine
    md.stop()
    assert md.gateway.closed and md.gateway.engine_active_at_close is False
    assert md.handler_errors == 0
