"""The barhandler as a real subprocess against the real broker and MongoDB-wire server."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pika
import pytest

from qamarket.models import Bar
from qamarket.rpc import AsyncHistoryClient, HistoryClient, HistoryError, HistoryTimeout, IndicatorBar
from qamarket.sessions import ms_of
from qamarket.store import BarStore
from qapubsub import keys
from qapubsub.messages import decode, encode
from qapubsub.topology import Topology
from tests import daemons
from tests.helpers import wait_for
from tests.unit.qamarket_history.test_history import ALL, assert_matches_pandas

pytestmark = pytest.mark.integration
M = 60_000
DAY1 = ms_of(2025, 3, 3, 9, 0)  # QUANTAXIS only
DAY2 = ms_of(2025, 3, 4, 9, 0)  # ours (bars) + QUANTAXIS overlap, then live


def _qa_doc(label: int, close: float) -> dict:
    """A QUANTAXIS future_min document as its saver writes it (labelled by the bar's END)."""
    import datetime as dt

    end = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=label + M)
    return {"code": "RB2605", "open": close - 1, "high": close + 2, "low": close - 2, "close": close,
            "trade": 120.0, "position": 1000.0, "amount": 1.2e6, "price": close,
            "datetime": end.strftime("%Y-%m-%d %H:%M:%S"), "date": end.strftime("%Y-%m-%d"),
            "date_stamp": 0.0, "time_stamp": end.timestamp(), "type": "1min"}


def _bar(label: int, close: float, *, final: bool = True, tick_count: int = 10, freq: str = "1min") -> Bar:
    return Bar(symbol="rb2605", exchange="SHFE", freq=freq, datetime=label, trading_day="20250304",  # type: ignore[arg-type]
               open=close - 1, high=close + 3, low=close - 3, close=close, volume=50.0, final=final,
               tick_count=tick_count)


@pytest.fixture
def env(amqp_url: str, mongo_url: str, topology: Topology, mongo_db) -> dict[str, str]:
    return {"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_NAMESPACE": topology.namespace,
            "QA_MONGO_DB": mongo_db.name}


def _publish(ch, topo: Topology, b: Bar, message_id: str | None = None) -> None:  # type: ignore[no-untyped-def]
    ex = topo.bar if b.final else topo.rtbar
    mid = message_id or (f"bar.{b.freq}.{b.exchange}.{b.symbol}.{b.datetime}" if b.final else b.id)
    ch.basic_publish(ex, keys.bar_key(b.freq, b.exchange, b.symbol), encode(b),
                     pika.BasicProperties(message_id=mid, content_type="application/json", type="qa.bar"))


def test_history_plus_live_merged_deduped_with_indicators(amqp_url, topology, env, mongo_db, amqp_channel,
                                                          tmp_path: Path) -> None:
    # history: QUANTAXIS day 1 (30 bars) and day 2 09:00-09:04 (overlapping ours); ours day 2 09:00-09:09
    mongo_db.future_min.insert_many([_qa_doc(DAY1 + i * M, 3000 + i) for i in range(30)] +
                                    [_qa_doc(DAY2 + i * M, 9999) for i in range(5)])
    BarStore(mongo_db).write([_bar(DAY2 + i * M, 3100 + (i % 4) * 3) for i in range(10)])
    ibar_q = f"{topology.namespace}test.ibar"
    amqp_channel.queue_declare(ibar_q, durable=False)
    amqp_channel.queue_bind(ibar_q, topology.ibar, routing_key=keys.ALL)
    log = tmp_path / "bh.log"
    client = HistoryClient(amqp_url, topology=topology, timeout=20)
    with daemons.running("handlers.barhandler", "--subscribe", "SHFE.rb2605:1min", "--indicators", "MA(5)",
                         "--quantaxis-db", mongo_db.name, env=env, log=log) as proc:
        first = client.get("rb2605", "SHFE", "1min", count=100)  # answered once the subscription is loaded
        assert len(first) == 40, log.read_text()[-3000:]
        # live: two new closed bars, a re-publish of one (same id), a stored bar again, realtime updates
        ch = amqp_channel
        _publish(ch, topology, _bar(DAY2 + 9 * M, 3109))            # already history (stored): not emitted
        _publish(ch, topology, _bar(DAY2 + 10 * M, 3110))
        _publish(ch, topology, _bar(DAY2 + 11 * M, 3111, final=False, tick_count=4))
        _publish(ch, topology, _bar(DAY2 + 11 * M, 3111))
        _publish(ch, topology, _bar(DAY2 + 11 * M, 3111))            # crash re-publish, same message id
        _publish(ch, topology, _bar(DAY2 + 11 * M, 3050, final=False, tick_count=20))  # after its close: ignored
        _publish(ch, topology, _bar(DAY2 + 12 * M, 3120, final=False, tick_count=5))
        _publish(ch, topology, _bar(DAY2 + 12 * M, 3119, final=False, tick_count=3))   # out of order: ignored

        def merged() -> list[Bar] | None:
            got = client.get("rb2605", "SHFE", "1min", count=100)
            return got if got and got[-1].datetime == DAY2 + 12 * M else None

        bars = wait_for(merged, timeout=15, what="the in-progress bar of 09:12")
        labels = [b.datetime for b in bars]
        assert labels == sorted(set(labels)), "duplicate or unordered labels"
        assert labels == [DAY1 + i * M for i in range(30)] + [DAY2 + i * M for i in range(13)]
        assert [b.close for b in bars[30:35]] == [3100, 3103, 3106, 3109, 3100]  # ours win over QUANTAXIS
        assert bars[0].close == 3000 and bars[0].volume == 120.0 and bars[0].open_interest == 1000.0
        cur = bars[-1]
        assert not cur.final and cur.close == 3120 and cur.tick_count == 5
        assert all(b.final for b in bars[:-1])
        assert client.get("rb2605", "SHFE", "1min", count=3, include_current=False)[-1].datetime == DAY2 + 11 * M

        # indicators over history + live equal pandas over the same bars
        reply = client.request("rb2605", "SHFE", "1min", count=100, indicators=ALL, include_current=False)
        assert len(reply.bars) == 42
        assert_matches_pandas(reply.bars, reply.indicators)
        assert reply.sources == {} or reply.sources.get("quantaxis", 0) >= 0

        # a series added at run time by a request, then fed live
        assert client.get("rb2605", "SHFE", "5min", count=10) == []
        _publish(ch, topology, _bar(DAY2, 3200, freq="5min"))
        wait_for(lambda: [b.close for b in client.get("rb2605", "SHFE", "5min", count=10)] == [3200], timeout=10,
                 what="the 5min bar of the runtime subscription")

        # bad requests: an error reply naming the field, once (not retried)
        bad = decode(client.send_raw(b'{"symbol":"rb2605","exchange":"SHFE","freq":"1min","count":"x"}'),
                     dict)
        assert bad["ok"] is False and bad["field"] == "count"
        with pytest.raises(HistoryError) as info:
            client.request("rb2605", "SHFE", "1min", count=5, indicators=["MA(0)"])
        assert info.value.field == "indicators"
        bad2 = json.loads(client.send_raw(b'{"symbol":"rb2605","exchange":"NYSE","freq":"1min","count":3}'))
        assert bad2["field"] == "exchange"

        async def async_get() -> list[Bar]:
            async with AsyncHistoryClient(amqp_url, topology=topology, timeout=10) as ac:
                return await ac.get("rb2605", "SHFE", "1min", count=5)

        assert [b.datetime for b in asyncio.run(async_get())] == [DAY2 + i * M for i in range(8, 13)]

        assert daemons.stop(proc) == 0, log.read_text()[-3000:]
    client.close()
    assert amqp_channel.queue_declare(topology.history_requests.name, passive=True).method.message_count == 0

    emitted = []
    while True:
        m, props, body = amqp_channel.basic_get(ibar_q, auto_ack=True)
        if m is None:
            break
        emitted.append((props.message_id, decode(body, IndicatorBar)))
    assert [mid for mid, _ in emitted] == [f"ibar.1min.SHFE.rb2605.{DAY2 + 10 * M}",
                                           f"ibar.1min.SHFE.rb2605.{DAY2 + 11 * M}",
                                           f"ibar.5min.SHFE.rb2605.{DAY2}"]
    ib = emitted[1][1]
    assert ib.bar.close == 3111
    assert ib.indicators["MA(5)"] == pytest.approx((3103 + 3106 + 3109 + 3110 + 3111) / 5)


def test_no_barhandler_gives_a_clear_timeout(amqp_url, topology) -> None:
    with HistoryClient(amqp_url, topology=topology, timeout=0.5) as client:
        with pytest.raises(HistoryTimeout, match="barhandler"):
            client.get("rb2605", "SHFE", "1min", count=5)
