"""TickStore / BarStore / QUANTAXIS readers against the real MongoDB-wire server (nx-27017)."""
from __future__ import annotations

import random

import pytest

from qamarket.models import Bar, Tick
from qamarket.sessions import ms_of
from qamarket.store import ENVELOPE_FIELDS, BarStore, TickStore

pytestmark = pytest.mark.integration

T0 = ms_of(2025, 3, 3, 9, 0, 0)


def feed(n: int = 300, symbols: tuple[str, ...] = ("rb2512", "hc2512"), seed: int = 7) -> list[Tick]:
    rnd = random.Random(seed)
    out: list[Tick] = []
    vol = {s: 0.0 for s in symbols}
    for i in range(n):
        s = symbols[i % len(symbols)]
        vol[s] += rnd.randint(0, 3)
        p = 3500.0 + rnd.randint(-20, 20)
        out.append(Tick(symbol=s, exchange="SHFE", datetime=T0 + 250 * i, last_price=p, trading_day="20250303",
                        volume=vol[s], turnover=vol[s] * p * 10, open_interest=1e5 + i, bid_price_1=p - 1,
                        ask_price_1=p + 1, bid_volume_1=float(rnd.randint(1, 99)), ask_volume_3=0.5,
                        limit_up=3800.0, source="ctp", seq=i + 1))
    return out


def same(a: Tick, b: Tick) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in Tick.__struct_fields__ if f not in ENVELOPE_FIELDS)


def stored(store: TickStore, sym: str) -> list[Tick]:
    return store.ticks("SHFE", sym)


def assert_feed_stored(store: TickStore, ticks: list[Tick]) -> None:
    for sym in {t.symbol for t in ticks}:
        want = [t for t in ticks if t.symbol == sym]
        got = stored(store, sym)
        assert len(got) == len(want)
        assert all(same(a, b) for a, b in zip(got, want))


def test_round_trip_field_by_field(mongo_db) -> None:
    ticks = feed()
    store = TickStore(mongo_db)
    res = store.write(ticks)
    assert res.stored == len(ticks) and res.skipped == 0 and res.chunks == 2
    assert [id(t) for t in res.new] == [id(t) for s in ("rb2512", "hc2512") for t in ticks if t.symbol == s]
    assert_feed_stored(store, ticks)
    last = store.last_tick("SHFE", "rb2512")
    assert last is not None and same(last, [t for t in ticks if t.symbol == "rb2512"][-1])
    assert store.last_tick("SHFE", "nope") is None


def test_replay_with_other_batch_boundaries_stores_nothing_twice(mongo_db) -> None:
    ticks = feed()
    store = TickStore(mongo_db)
    for i in range(0, len(ticks), 37):
        store.write(ticks[i:i + 37])
    n_docs = mongo_db.ticks.estimated_document_count()
    # replay all of it, in one batch, then one tick per batch, then in odd slices
    assert store.write(ticks).stored == 0
    for t in ticks[::10]:
        assert store.write([t]).stored == 0
    for i in range(0, len(ticks), 11):
        assert store.write(ticks[i:i + 11]).stored == 0
    assert mongo_db.ticks.estimated_document_count() == n_docs
    assert_feed_stored(store, ticks)


def test_crash_between_write_and_ack_then_redelivery(mongo_db) -> None:
    ticks = feed()
    first, second, third = ticks[:100], ticks[100:200], ticks[200:]
    s1 = TickStore(mongo_db)
    s1.write(first)
    s1.write(second)  # written, then the process "dies" before the ack
    s2 = TickStore(mongo_db)  # restart: marks reloaded from the collection
    marks = s2.load_watermarks()
    assert marks[("SHFE", "rb2512")] == max((t.datetime, t.volume, t.seq) for t in ticks[:200] if t.symbol == "rb2512")
    # the broker redelivers the un-acked batch, overlapping, with different boundaries
    r = s2.write(ticks[150:250])
    assert r.stored == 50 and r.skipped == 50
    s2.write(third)
    assert_feed_stored(s2, ticks)
    # a third process without load_watermarks looks marks up lazily and also stores nothing twice
    s3 = TickStore(mongo_db, create_indexes=False)
    assert s3.write(ticks).stored == 0
    assert_feed_stored(s3, ticks)


def test_duplicate_chunk_from_stale_mark_is_rechecked(mongo_db) -> None:
    ticks = [t for t in feed() if t.symbol == "rb2512"]
    a = TickStore(mongo_db)
    a.write(ticks[:80])
    b = TickStore(mongo_db)
    b._marks[("SHFE", "rb2512")] = None  # a writer with a stale (empty) mark, as after a lost reply
    b._complete = True
    r = b.write(ticks[:120])  # same first tick -> same _id -> 11000, re-check, rest written
    assert r.already_stored == 1 and r.stored == 40
    assert_feed_stored(b, ticks[:120])


def test_same_millisecond_ticks_in_separate_batches(mongo_db) -> None:
    base = dict(symbol="SR601", exchange="CZCE", datetime=T0, last_price=5000.0, trading_day="20250303")
    a = Tick(**base, volume=10.0, seq=1)
    b = Tick(**base, volume=12.0, seq=2)
    c = Tick(**base, volume=12.0, seq=3)  # no trade, new depth, same ms: distinct by seq
    store = TickStore(mongo_db)
    assert store.write([a]).stored == 1
    assert store.write([b]).stored == 1
    assert store.write([c, b, a]).stored == 1
    got = store.ticks("CZCE", "SR601")
    assert [(t.volume, t.seq) for t in got] == [(10.0, 1), (12.0, 2), (12.0, 3)]


def test_range_reads_ordered_and_bounded(mongo_db) -> None:
    ticks = [t for t in feed(600) if t.symbol == "rb2512"]
    store = TickStore(mongo_db, max_chunk_ticks=25)
    for i in range(0, len(ticks), 40):
        store.write(ticks[i:i + 40])
    lo, hi = ticks[33].datetime, ticks[201].datetime
    got = store.ticks("SHFE", "rb2512", lo, hi)
    assert [t.datetime for t in got] == [t.datetime for t in ticks[33:202]]
    assert store.ticks("SHFE", "rb2512", hi + 1, hi + 2) == []
    assert len(store.ticks("SHFE", "rb2512", end=lo)) == 34
    assert len(store.ticks("SHFE", "rb2512", start=hi)) == len(ticks) - 201
    assert store.ticks("SHFE", "hc2512", lo, hi) == []


def test_chunks_split_by_trading_day_and_span(mongo_db) -> None:
    base = dict(symbol="rb2512", exchange="SHFE", last_price=1.0)
    ticks = [Tick(**base, datetime=T0, trading_day="20250303", volume=1.0),
             Tick(**base, datetime=T0 + 700_000, trading_day="20250303", volume=2.0),  # > 10 min later
             Tick(**base, datetime=T0 + 700_500, trading_day="20250304", volume=0.0)]
    store = TickStore(mongo_db)
    assert store.write(ticks).chunks == 3
    assert [t.trading_day for t in store.ticks("SHFE", "rb2512", T0 + 1)] == ["20250303", "20250304"]


def bar(label: int, close: float, final: bool = True) -> Bar:
    return Bar(symbol="rb2512", exchange="SHFE", freq="1min", datetime=label, trading_day="20250303",
               open=1.0, high=max(2.0, close), low=0.5, close=close, volume=3.0, turnover=30.0,
               open_interest=7.0, final=final, tick_count=4)


def test_bar_upsert_idempotent_and_reads(mongo_db) -> None:
    store = BarStore(mongo_db)
    bars = [bar(T0 + 60_000 * i, 1.0 + i) for i in range(10)]
    store.write(bars)
    store.write(bars)
    store.write(bars[3:5])
    assert mongo_db.bars.estimated_document_count() == 10
    assert mongo_db.bars.find_one({"_id": f"1min.SHFE.rb2512.{T0}"}) is not None
    got = store.bars("SHFE", "rb2512", "1min")
    assert [(b.datetime, b.close, b.final) for b in got] == [(b.datetime, b.close, True) for b in bars]
    assert all(g.high == b.high and g.tick_count == 4 and g.trading_day == "20250303" for g, b in zip(got, bars))
    assert [b.close for b in store.bars("SHFE", "rb2512", "1min", count=3)] == [8.0, 9.0, 10.0]
    assert [b.close for b in store.bars("SHFE", "rb2512", "1min", T0 + 60_000, T0 + 180_000)] == [2.0, 3.0, 4.0]
    assert [b.close for b in store.bars("SHFE", "rb2512", "1min", end=T0 + 180_000, count=2)] == [3.0, 4.0]
    last = store.last_bar("SHFE", "rb2512", "1min")
    assert last is not None and last.close == 10.0
    assert store.last_bar("SHFE", "rb2512", "5min") is None
    # a corrected closed bar replaces the stored one; a realtime (non-final) update is ignored
    store.write([bar(T0, 42.0), bar(T0 + 60_000, 99.0, final=False)])
    got = store.bars("SHFE", "rb2512", "1min", count=10)
    assert got[0].close == 42.0 and got[1].close == 2.0
    assert mongo_db.bars.estimated_document_count() == 10


async def test_async_bar_store(mongo_url: str, mongo_db) -> None:
    from motor.motor_asyncio import AsyncIOMotorClient

    from qamarket.store import AsyncBarStore

    client = AsyncIOMotorClient(mongo_url)
    try:
        store = AsyncBarStore(client[mongo_db.name])
        await store.create_indexes()
        await store.write([bar(T0 + 60_000 * i, float(i)) for i in range(5)])
        await store.write([bar(T0 + 60_000 * i, float(i)) for i in range(5)])
        got = await store.bars("SHFE", "rb2512", "1min", count=2)
        assert [b.close for b in got] == [3.0, 4.0]
        assert (await store.last_bar("SHFE", "rb2512", "1min")).close == 4.0  # type: ignore[union-attr]
    finally:
        client.close()
    assert BarStore(mongo_db).bars("SHFE", "rb2512", "1min")[-1].close == 4.0


def test_quantaxis_collections_read_as_bars(mongo_db) -> None:
    from qamarket.quantaxis import fetch_day_bars, fetch_min_bars
    from qamarket.sessions import from_ms

    def qa_min(code: str, end: str, typ: str, future: bool, close: float) -> dict:
        d = {"code": code, "open": 1.0, "high": 2.0, "low": 0.5, "close": close, "datetime": end, "date": end[:10],
             "date_stamp": 0.0, "time_stamp": 0.0, "type": typ, "amount": 1e6}
        d.update({"trade": 12.0, "position": 3456.0, "price": 1.1} if future else {"vol": 1200.0})
        return d

    mongo_db.future_min.insert_many([
        qa_min("RB2512", "2025-03-03 21:01:00", "1min", True, 1.0),
        qa_min("RB2512", "2025-03-03 21:02:00", "1min", True, 2.0),
        qa_min("RB2512", "2025-03-03 21:02:00", "1min", True, 2.0),  # saved twice by a re-run
        qa_min("RB2512", "2025-03-03 21:05:00", "5min", True, 5.0),
        qa_min("HC2512", "2025-03-03 21:01:00", "1min", True, 9.0),
    ])
    mongo_db.stock_min.insert_many([
        qa_min("600000", "2025-03-03 09:31:00", "1min", False, 1.0),
        qa_min("600000", "2025-03-03 13:30:00", "30min", False, 2.0),
        qa_min("600000", "2025-03-03 10:30:00", "60min", False, 3.0),
    ])
    mongo_db.future_day.insert_many([{"code": "RB2512", "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5,
                                      "position": 10.0, "trade": 20.0, "price": 1.4, "amount": 3.0,
                                      "date": d, "date_stamp": 0.0} for d in ("2025-03-03", "2025-03-04")])
    mongo_db.stock_day.insert_one({"code": "000001", "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "vol": 7.0,
                                   "amount": 8.0, "date": "2025-03-04", "date_stamp": 0.0})

    got = fetch_min_bars(mongo_db, "rb2512", "1min")
    assert [(str(from_ms(b.datetime)), b.close) for b in got] == [("2025-03-03 21:00:00", 1.0), ("2025-03-03 21:01:00", 2.0)]
    b = got[0]
    assert (b.symbol, b.exchange, b.freq, b.trading_day, b.volume, b.open_interest, b.turnover, b.final) == \
        ("rb2512", "SHFE", "1min", "20250304", 12.0, 3456.0, 1e6, True)
    assert [b.datetime for b in fetch_min_bars(mongo_db, "rb2512", "1min", start=got[1].datetime)] == [got[1].datetime]
    assert [x.datetime for x in fetch_min_bars(mongo_db, "rb2512", "1min", end=got[0].datetime)] == [got[0].datetime]
    assert [str(from_ms(b.datetime)) for b in fetch_min_bars(mongo_db, "rb2512", "5min")] == ["2025-03-03 21:00:00"]
    st = {b.freq: b for f in ("1min", "30min", "60min") for b in fetch_min_bars(mongo_db, "600000", f, market="stock")}
    assert {f: str(from_ms(b.datetime))[11:] for f, b in st.items()} == {"1min": "09:30:00", "30min": "13:00:00", "60min": "09:30:00"}
    assert st["1min"].exchange == "SSE" and st["1min"].volume == 1200.0 and st["1min"].open_interest == 0.0
    days = fetch_day_bars(mongo_db, "rb2512", "2025-03-04")
    assert [(b.freq, b.trading_day, b.volume, b.open_interest) for b in days] == [("1day", "20250304", 20.0, 10.0)]
    sd = fetch_day_bars(mongo_db, "000001", market="stock")
    assert [(b.exchange, b.trading_day, b.volume, b.turnover) for b in sd] == [("SZSE", "20250304", 7.0, 8.0)]


def test_bars_read_back_encode_to_json(mongo_db) -> None:
    """Bars read from the store re-encode (no bson.Int64 left in int fields)."""
    from qamarket.models import Bar
    from qamarket.store import BarStore
    from qapubsub.messages import decode, encode

    store = BarStore(mongo_db)
    b = Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=1_741_000_000_000, trading_day="20250304",
            open=1.0, high=2.0, low=0.5, close=1.5, volume=10.0, tick_count=3)
    store.write([b])
    back = store.last_bar("SHFE", "rb2605", "1min")
    assert type(back.datetime) is int and type(back.tick_count) is int
    assert decode(encode(back), Bar).datetime == b.datetime


def test_late_redelivered_ticks_are_stored_once_and_read_back_in_order(mongo_db) -> None:
    """A shard hand-over redelivers ticks after newer ones were stored: write() skips them, write_late()
    stores exactly the missing ones, and reads merge the overlapping chunks back into order."""
    from brokers.random_source import RandomSource
    from qamarket.store import TickStore

    ticks = list(RandomSource(seed=3, instruments=["SHFE.rb2605"], start="2025-03-04 09:00:00").ticks(300))
    store = TickStore(mongo_db)
    held_back = ticks[100:150]  # what the stopped instance had received but not acknowledged
    store.write(ticks[:100])
    store.write(ticks[150:])
    assert store.write(held_back).stored == 0  # below the watermark: skipped as a replay
    res = store.write_late(held_back + ticks[140:160])  # plus some that are stored already
    assert res.stored == 50
    again = store.write_late(held_back)
    assert again.stored == 0 and again.skipped == 50
    back = store.ticks("SHFE", "rb2605")
    assert [(t.datetime, t.volume) for t in back] == [(t.datetime, t.volume) for t in ticks]
