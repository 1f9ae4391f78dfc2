"""The tickhandler against the real broker and MongoDB-wire server, as a real subprocess."""
from __future__ import annotations

import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from brokers.random_source import RandomSource, market_fields
from qamarket.cleaning import TickCleaner
from qamarket.models import DEFAULT_REGISTRY, Bar, Tick
from qamarket.store import BarStore, TickStore
from qapubsub import keys
from qapubsub.messages import decode
from qapubsub.sync import Connection, StreamPublisher
from qapubsub.topology import Topology
from tests import daemons
from tests.helpers import cleaned, expected_after_cleaning, wait_for

pytestmark = pytest.mark.integration
INSTRUMENTS = ["SHFE.rb2605", "DCE.i2605", "CZCE.SR605"]


@pytest.fixture
def env(amqp_url: str, mongo_url: str, topology: Topology, mongo_db) -> dict[str, str]:
    return {"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_NAMESPACE": topology.namespace,
            "QA_MONGO_DB": mongo_db.name}


@pytest.fixture
def bar_queue(amqp_channel, topology: Topology) -> Iterator[str]:
    name = f"{topology.namespace}test.bars"
    amqp_channel.queue_declare(name, durable=True)
    amqp_channel.queue_bind(name, topology.bar, routing_key=keys.ALL)
    yield name


def _publish(amqp_url: str, topology: Topology, ticks: list[Tick]) -> None:
    conn = Connection(urls=[amqp_url])
    pub = StreamPublisher(conn, topology=topology)
    for t in ticks:
        pub.publish(topology.tick, keys.tick_key(t.exchange, t.symbol), t)
    pub.flush()
    conn.close()


def _drain_bars(channel, queue: str) -> list[tuple[str, Bar]]:
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((props.message_id, decode(body, Bar)))




def _ticks(n: int, seed: int = 11) -> list[Tick]:
    src = RandomSource(seed=seed, instruments=INSTRUMENTS, start="2025-03-04 09:00:00")
    ticks = list(src.ticks(n))
    # a few bad ones the cleaner must drop: unset price, exact duplicate, out of order
    bad = [Tick(symbol="rb2605", exchange="SHFE", datetime=ticks[10].datetime + 1, last_price=sys.float_info.max),
           ticks[20], ticks[5]]
    # and one kept tick with unset (CTP DBL_MAX) book and limit prices: stored as 0.0
    ticks[40] = msgspec.structs.replace(ticks[40], limit_up=sys.float_info.max, ask_price_5=sys.float_info.max)
    return ticks[:30] + bad + ticks[30:]


def _stored(mongo_db) -> dict[tuple[str, str], list[tuple]]:
    store = TickStore(mongo_db, create_indexes=False)
    return {(ex, sym): [market_fields(t) for t in store.ticks(ex, sym)] for ex, sym in store.instruments()}


def test_ticks_stored_once_and_bars_on_bus_equal_bars_in_db(amqp_url, topology, env, mongo_db, amqp_channel,
                                                             bar_queue, tmp_path: Path) -> None:
    ticks = _ticks(3000)
    expected = expected_after_cleaning(ticks)
    with daemons.running("handlers.tickhandler", env=env, log=tmp_path / "th.log") as proc:
        _publish(amqp_url, topology, ticks)
        total = sum(len(v) for v in expected.values())
        wait_for(lambda: sum(len(v) for v in _stored(mongo_db).values()) >= total, timeout=30,
                 what="all clean ticks stored")
        # the last bars close by the timer, without a later tick
        wait_for(lambda: amqp_channel.queue_declare(bar_queue, passive=True).method.message_count > 0, timeout=10)
        assert daemons.stop(proc) == 0, (tmp_path / "th.log").read_text()[-3000:]
    assert _stored(mongo_db) == expected
    t40 = ticks[43]  # ticks[40] of the feed, after the three bad ones
    back = TickStore(mongo_db, create_indexes=False).ticks(t40.exchange, t40.symbol, t40.datetime, t40.datetime)
    assert [(t.limit_up, t.ask_price_5) for t in back] == [(0.0, 0.0)]
    on_bus = _drain_bars(amqp_channel, bar_queue)
    ids = Counter(mid for mid, _ in on_bus)
    assert ids and max(ids.values()) == 1, "a bar was published twice"
    db_bars = {f"bar.{b['freq']}.{b['exchange']}.{b['symbol']}.{b['datetime']}" for b in mongo_db.bars.find()}
    assert set(ids) == db_bars
    one_min = [b for _, b in on_bus if b.freq == "1min" and b.symbol == "rb2605"]
    assert all(b.low <= min(b.open, b.close) and b.high >= max(b.open, b.close) for b in one_min)
    stored_rb = expected[("SHFE", "rb2605")]
    assert sum(b.volume for b in one_min) <= stored_rb[-1][5]  # never more than the day's cumulative
    # each closed bar names the one its series had before (a consumer that missed one can tell)
    series = sorted(one_min, key=lambda b: b.datetime)
    assert len(series) >= 2 and series[0].prev is None
    assert [b.prev for b in series[1:]] == [b.datetime for b in series[:-1]]


def test_kill_9_mid_stream_loses_nothing_and_stores_nothing_twice(amqp_url, topology, env, mongo_db, bar_queue,
                                                                  amqp_channel, tmp_path: Path) -> None:
    ticks = _ticks(12000, seed=5)
    expected = expected_after_cleaning(ticks)
    total = sum(len(v) for v in expected.values())
    log = tmp_path / "th.log"
    proc = daemons.start("handlers.tickhandler", "--batch-size", "200", env=env, log=log)
    try:
        _publish(amqp_url, topology, ticks)
        wait_for(lambda: 0 < sum(len(v) for v in _stored(mongo_db).values()), timeout=30, what="some ticks stored")
        assert daemons.stop(proc, signal.SIGKILL) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    with daemons.running("handlers.tickhandler", env=env, log=log) as proc2:
        wait_for(lambda: sum(len(v) for v in _stored(mongo_db).values()) >= total, timeout=60,
                 what="all clean ticks stored after the restart")
        wait_for(lambda: amqp_channel.queue_declare(topology.tickhandler.name,
                                                    passive=True).method.message_count == 0, timeout=30)
        assert daemons.stop(proc2) == 0
    assert _stored(mongo_db) == expected  # each tick exactly once, in order
    bars = BarStore(mongo_db)
    stored_1min = bars.bars("SHFE", "rb2605", "1min")
    labels = [b.datetime for b in stored_1min]
    assert labels == sorted(set(labels))
    on_bus = Counter(mid for mid, _ in _drain_bars(amqp_channel, bar_queue))
    db_ids = {f"bar.{b['freq']}.{b['exchange']}.{b['symbol']}.{b['datetime']}" for b in mongo_db.bars.find()}
    assert set(on_bus) == db_ids  # every stored bar reached the bus, none is missing
    # a bar published just before the kill and not acked may come again, with the same id
    assert sum(n - 1 for n in on_bus.values()) <= 200


def test_malformed_tick_is_dead_lettered_and_the_daemon_goes_on(amqp_url, topology, env, mongo_db, amqp_channel,
                                                                tmp_path: Path) -> None:
    good = _ticks(50)
    with daemons.running("handlers.tickhandler", env=env, log=tmp_path / "th.log") as proc:
        amqp_channel.basic_publish(topology.tick, "SHFE.rb2605", b'{"schema":"qa.tick","symbol":"rb2605"}')
        amqp_channel.basic_publish(topology.tick, "XXX.zz", b"not json")
        _publish(amqp_url, topology, good)
        expected = expected_after_cleaning(good)
        wait_for(lambda: _stored(mongo_db) == expected, timeout=30, what="good ticks stored after bad ones")

        def dead() -> list[str]:
            got = []
            while True:
                m, props, _ = amqp_channel.basic_get(topology.dead_letters.name, auto_ack=True)
                if m is None:
                    return got
                got.append(props.headers["x-qa-error"])

        reasons = wait_for(lambda: dead() or None, timeout=10, what="dead letters")
        assert proc.poll() is None
        assert daemons.stop(proc) == 0
    text = " | ".join(reasons)
    assert "exchange" in text or "missing required field" in text


def test_two_shards_split_instruments_and_a_standby_takes_over(amqp_url, topology, env, mongo_db, amqp_channel,
                                                               tmp_path: Path) -> None:
    """Ticks spread over 2 shards by instrument (each instrument whole on one shard); a second instance of
    shard 0 stands by (single active consumer) and takes over when the first stops."""
    ticks = _ticks(4000, seed=9)
    expected = expected_after_cleaning(ticks)
    total = sum(len(v) for v in expected.values())
    logs = {name: tmp_path / f"{name}.log" for name in ("s0", "s0b", "s1")}
    q0, q1 = topology.tick_queue(0).name, topology.tick_queue(1).name
    def consumers(q: str) -> int:
        # the shard queues are quorum queues: their declare-ok counts only the *active* single-active
        # consumer; the management API lists the standbys too
        import urllib.parse

        from qapubsub.management import Management

        info = Management(amqp_url).get(f"/api/queues/%2F/{urllib.parse.quote(q, safe='')}")
        return len(info.get("consumer_details") or [])
    s0 = daemons.start("handlers.tickhandler", "--shards", "2", "--shard", "0", env=env, log=logs["s0"])
    s0b = s1 = s0
    try:
        wait_for(lambda: consumers(q0) == 1, timeout=20, what="shard 0's first instance consuming (the active one)")
        s0b = daemons.start("handlers.tickhandler", "--shards", "2", "--shard", "0", env=env, log=logs["s0b"])
        s1 = daemons.start("handlers.tickhandler", "--shards", "2", "--shard", "1", env=env, log=logs["s1"])
        wait_for(lambda: consumers(q0) == 2 and consumers(q1) == 1, timeout=20, what="standby and shard 1 up")
        half = len(ticks) // 2
        _publish(amqp_url, topology, ticks[:half])
        wait_for(lambda: all(amqp_channel.queue_declare(q, passive=True).method.message_count == 0
                             for q in (q0, q1)), timeout=30, what="first half consumed")
        assert daemons.stop(s0) == 0  # the standby of shard 0 takes over
        _publish(amqp_url, topology, ticks[half:])
        wait_for(lambda: sum(len(v) for v in _stored(mongo_db).values()) >= total, timeout=60,
                 what="every clean tick stored")
        assert _stored(mongo_db) == expected
    finally:
        codes = [daemons.stop(p) for p in (s0b, s1)]
        for p in (s0, s0b, s1):
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    # Bars across the hand-over equal bars made by one process from the same ticks.
    from qamarket.aggregation import Aggregator

    ref = Aggregator(freqs=("1min",), realtime=())
    cleaners: dict[tuple[str, str], TickCleaner] = {}
    want = {}
    for t in ticks:
        c = cleaners.setdefault((t.exchange, t.symbol), TickCleaner(DEFAULT_REGISTRY.get(t.symbol, t.exchange)))
        if c.check(t) is None:
            for b in ref.on_tick(t):
                if b.final and b.freq == "1min":
                    want[(b.exchange, b.symbol, b.datetime)] = (b.open, b.high, b.low, b.close, b.volume)
    got = {(b["exchange"], b["symbol"], b["datetime"]): (b["open"], b["high"], b["low"], b["close"], b["volume"])
           for b in mongo_db.bars.find({"freq": "1min"})}
    # The bar open at the hand-over can differ (see handlers/tickhandler.py: ticks the stopped instance had
    # received but not acknowledged come back after newer ones); every other bar is exact.
    handover = ticks[half].datetime // 60_000 * 60_000
    window = {handover - 60_000, handover, handover + 60_000}
    last = {}  # each instrument's last minute: closed by the timer at the end, not by a later tick
    for ex, sym, label in want:
        last[(ex, sym)] = max(last.get((ex, sym), label), label)
    diff = {k: (got[k], want.get(k)) for k in got
            if k in want and k[2] not in window and k[2] != last[k[:2]] and got[k] != want[k]}
    assert got and not diff, diff
    received = {name: _received(logs[name]) for name in logs}
    assert received["s1"] > 0 and received["s0"] > 0 and received["s0b"] > 0, received  # both shards, and the standby
    assert sum(received.values()) == len(ticks), received  # nothing consumed twice


def _received(log: Path) -> int:
    import re

    m = re.findall(r"tickhandler stopped: .*'received': (\d+)", log.read_text())
    assert m, f"no summary line in {log}"
    return int(m[-1])


def test_a_failed_store_write_loses_nothing_when_the_batch_comes_again(mongo_db) -> None:
    """The cleaners judge a redelivered batch as they judged it the first time (a failed write used to
    leave them believing they had seen those ticks, and the redelivery was dropped as duplicates)."""
    from types import SimpleNamespace

    from handlers.tickhandler import TickPipeline
    from qapubsub.handling import Transient

    class FailOnce:
        def __init__(self, store: TickStore) -> None:
            self.store, self.failed = store, False

        def write(self, ticks):  # noqa: ANN001, ANN201
            if not self.failed:
                self.failed = True
                raise ConnectionError("MongoDB went away")
            return self.store.write(ticks)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.store, name)

    published: list = []
    pipe = TickPipeline(FailOnce(TickStore(mongo_db)), BarStore(mongo_db), lambda c, r: published.extend(c),
                        takeover_hold=0)
    ticks = _ticks(200)
    items = [(t, SimpleNamespace(delivery_tag=i + 1, redelivered=False)) for i, t in enumerate(ticks)]
    with pytest.raises(Transient):
        pipe.handle(items)
    again = [(t, SimpleNamespace(delivery_tag=d.delivery_tag, redelivered=True)) for t, d in items]
    assert pipe.handle(again) == {}
    assert _stored(mongo_db) == expected_after_cleaning(ticks)


def _one_shot_bars(ticks: list[Tick]) -> dict[str, tuple]:
    """Closed 1-min bars of the cleaned ticks, aggregated in one pass without any store or failure."""
    from qamarket.aggregation import Aggregator

    agg = Aggregator(freqs=("1min",), realtime=())
    out = {}
    for t in cleaned(ticks):
        for b in agg.on_tick(t):
            if b.final and b.freq == "1min":
                out[f"{b.exchange}.{b.symbol}.{b.datetime}"] = (b.open, b.high, b.low, b.close, b.volume)
    return out


def test_the_background_writer_fails_requeues_rebuilds_and_loses_nothing(mongo_db) -> None:
    """Batches handed to the writer thread, the first write fails: every batch in flight fails with it,
    the next batch is refused once (the pipeline forgets those instruments), the redelivered batches
    are stored exactly once, and the closed bars equal a one-pass aggregation of the clean ticks;
    every closed bar was published only after its ticks were stored."""
    import threading
    from types import SimpleNamespace

    from handlers.tickhandler import TickPipeline
    from qapubsub.handling import Transient

    class FailFirst:
        def __init__(self, store: TickStore) -> None:
            self.store, self.calls, self.gate = store, 0, threading.Event()

        def write(self, ticks):  # noqa: ANN001, ANN201
            self.calls += 1
            if self.calls == 1:
                self.gate.wait(10)   # the first write hangs until every batch is handed over, then fails
                raise ConnectionError("MongoDB went away")
            return self.store.write(ticks)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.store, name)

    store = TickStore(mongo_db)
    failing = FailFirst(store)
    published: list[Bar] = []
    early: list[str] = []

    def publish(closed, realtime) -> None:  # noqa: ANN001
        for b in closed:   # closed by a later tick, which must already be stored (so are all before it)
            newest = store.last_tick(b.exchange, b.symbol)
            if newest is None or newest.datetime < b.datetime + 60_000:
                early.append(b.id or "")
        published.extend(closed)

    pipe = TickPipeline(failing, BarStore(mongo_db), publish, takeover_hold=0, background=True, freqs=("1min",))
    ticks = _ticks(1200, seed=3)
    batches = [[(t, SimpleNamespace(delivery_tag=i + 1, redelivered=False)) for i, t in enumerate(ticks)][k:k + 100]
               for k in range(0, len(ticks), 100)]
    try:
        futures = [pipe.submit(b) for b in batches]
        failing.gate.set()
        for f in futures:
            with pytest.raises(Transient):
                f.result(30)
        # what the consumer does: requeue everything in flight; the first batch handed over next is refused once
        again = [[(t, SimpleNamespace(delivery_tag=d.delivery_tag, redelivered=True)) for t, d in b] for b in batches]
        with pytest.raises(Transient, match="rebuilt from the store"):
            pipe.submit(again[0])
        futures = [pipe.submit(b) for b in again]
        assert [f.result(30) for f in futures] == [{}] * len(again)
        pipe.flush()
    finally:
        pipe.close()
    assert _stored(mongo_db) == expected_after_cleaning(ticks)
    # rebuilt from the store, the instruments took the redelivered ticks as new, not as late ones
    assert pipe.counts["stored_late"] == 0 and pipe.counts["stored"] == sum(map(len, _stored(mongo_db).values()))
    expected_bars = _one_shot_bars(ticks)
    stored_bars = {f"{d['exchange']}.{d['symbol']}.{d['datetime']}": (d["open"], d["high"], d["low"], d["close"], d["volume"])
                   for d in mongo_db.bars.find({"freq": "1min"})}
    assert expected_bars and all(stored_bars[k] == v for k, v in expected_bars.items())
    assert published and not early, f"closed bars published before their ticks were stored: {early[:3]}"
    by_id: dict[str, Bar] = {}
    for b in published:   # published again after the rebuild: the same id carries the same bar
        assert by_id.setdefault(b.id, b) == b
