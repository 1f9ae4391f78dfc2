"""End to end on the real RabbitMQ: vn.py EventEngine -> CtpMarketData -> StreamPublisher -> qa.tick.

Marked ``integration`` (needs the broker ``make test`` starts); lives here because it needs
the vn.py test helpers. Skipped without vn.py.
"""
from __future__ import annotations

import datetime as dt
import uuid
from zoneinfo import ZoneInfo

import pytest

pytest.importorskip("vnpy.trader.object", reason="vn.py not installed (pip install 'qaflow[ctp]')")

from vnpy.event import EventEngine  # noqa: E402
from vnpy.trader.constant import Exchange  # noqa: E402
from vnpy.trader.object import TickData  # noqa: E402

from brokers.ctp.md import CtpMarketData, _StreamSink  # noqa: E402
from brokers.ctp.settings import CtpSettings  # noqa: E402
from qamarket.models import Tick  # noqa: E402
from qapubsub import keys  # noqa: E402
from qapubsub.messages import decode  # noqa: E402
from qapubsub.settings import Settings  # noqa: E402
from qapubsub.topology import Binding, Topology, declare_queue_sync  # noqa: E402

from .conftest import ENV, wait_for  # noqa: E402
from .test_vnpy_md import RecordingGateway  # noqa: E402

pytestmark = pytest.mark.integration


def test_ticks_reach_qa_tick_with_tick_keys(amqp_url: str, topology: Topology, amqp_channel) -> None:  # type: ignore[no-untyped-def]
    ch = amqp_channel
    q = topology.live_queue(f"{topology.namespace}md-ctp-{uuid.uuid4().hex[:6]}",
                            Binding(topology.tick, keys.ticks_of_exchange("SHFE")))
    qname = declare_queue_sync(ch, q)
    ee = EventEngine(0.1)  # type: ignore[arg-type]
    ee.start()
    md = CtpMarketData(CtpSettings.from_env(ENV), topology=topology, gateway_class=RecordingGateway,
                       event_engine=ee, sink_factory=lambda: _StreamSink(topology, Settings(amqp_urls=(amqp_url,))))
    md.start()
    try:
        sh = ZoneInfo("Asia/Shanghai")
        for i in range(200):
            md.gateway.on_tick(TickData(gateway_name="CTP", symbol="rb2512", exchange=Exchange.SHFE,
                                        datetime=dt.datetime(2025, 3, 3, 21, 0, 0, tzinfo=sh) + dt.timedelta(milliseconds=500 * i),
                                        last_price=3900.0 + i))
        md.gateway.on_tick(TickData(gateway_name="CTP", symbol="i2601", exchange=Exchange.DCE,
                                    datetime=dt.datetime(2025, 3, 3, 21, 0, 0, tzinfo=sh), last_price=800.0))
        assert wait_for(lambda: md.published == 201, 10)
    finally:
        md.stop()
        ee.stop()
    got = []
    for _ in range(250):
        method, props, body = ch.basic_get(qname, auto_ack=True)
        if method is None:
            break
        assert method.routing_key == "SHFE.rb2512" and props.type == "qa.tick"
        got.append(decode(body, Tick))
    assert [t.last_price for t in got] == [3900.0 + i for i in range(200)]   # in order, none lost, none doubled
    assert [t.seq for t in got] == list(range(1, 201))
    assert got[0].dt == dt.datetime(2025, 3, 3, 21, 0, 0)
