"""RandomSource without I/O: determinism, sessions, tick grid, limits, cumulative fields, batching."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brokers.random_source import RandomSource, batch_ticks, default_instruments, market_fields, parse_instrument
from qamarket.models import Tick, TickBatch, spec_for
from qamarket.sessions import Phase, from_ms, is_trading, ms_of
from qapubsub.messages import decode, encode

# Monday 2025-03-03 14:55: the close, the night session (new trading day), after midnight.
START = "2025-03-03 14:55:00"


def on_grid(price: float, step: float) -> bool:
    n = price / step
    return abs(n - round(n)) < 1e-6


def test_same_seed_same_ticks_other_seed_other_ticks() -> None:
    a = [market_fields(t) for t in RandomSource(42, start=START).ticks(3000)]
    b = [market_fields(t) for t in RandomSource(42, start=START).ticks(3000)]
    c = [market_fields(t) for t in RandomSource(43, start=START).ticks(3000)]
    assert a == b
    assert a != c


def test_ids_stay_unique_across_runs() -> None:
    a = list(RandomSource(1, start=START).ticks(200))
    b = list(RandomSource(1, start=START).ticks(200))
    assert len({t.id for t in a + b}) == 400


def test_ticks_only_inside_continuous_sessions_with_night_and_breaks() -> None:
    # a Friday: break, lunch, close, Friday night, weekend, Monday; a coarse clock to get there fast
    src = RandomSource(7, ["SHFE.au2606", "SHFE.rb2605", "DCE.jd2605", "CFFEX.IF2603", "CFFEX.T2606", "SSE.600000"],
                       start="2025-03-07 10:10:00", interval_ms=30_000)
    ticks = list(src.ticks(4_000))
    hours = set()
    for t in ticks:
        spec = spec_for(t.symbol, t.exchange)
        assert is_trading(spec, t.datetime) is Phase.CONTINUOUS, (t.symbol, from_ms(t.datetime))
        hours.add(from_ms(t.datetime).strftime("%a %H"))
    # the futures 10:15-10:30 break is seen only by CFFEX and stocks
    brk = [t for t in ticks if ms_of(2025, 3, 7, 10, 15) <= t.datetime < ms_of(2025, 3, 7, 10, 30)]
    assert brk and {t.exchange for t in brk} <= {"CFFEX", "SSE", "SZSE"}
    assert "Fri 21" in hours and "Fri 12" not in hours and "Fri 16" not in hours
    # after the Friday night session (ends 02:30 Saturday for au/ag) the next tick is Monday morning
    sat = [t for t in ticks if from_ms(t.datetime).weekday() == 5]
    assert sat and max(from_ms(t.datetime).strftime("%H:%M") for t in sat) < "02:30"
    assert {from_ms(t.datetime).weekday() for t in ticks} == {0, 4, 5}
    assert all(from_ms(t.datetime).weekday() != 5 for t in ticks if t.symbol in ("rb2605", "jd2605", "IF2603"))
    assert all(a.datetime <= b.datetime for a, b in zip(ticks, ticks[1:]))


def test_night_ticks_belong_to_next_trading_day() -> None:
    ticks = list(RandomSource(3, start="2025-03-07 20:59:00").ticks(500))  # Friday night
    assert ticks[0].dt.hour == 21
    assert {t.trading_day for t in ticks} == {"20250310"}  # Monday


def test_prices_on_grid_and_within_limits() -> None:
    at_limit = 0
    for t in RandomSource(11, start=START, vol=0.002).ticks(20_000):  # high vol: hits the limits
        at_limit += t.last_price in (t.limit_up, t.limit_down)
        step = spec_for(t.symbol, t.exchange).price_tick
        for p in (t.last_price, t.limit_up, t.limit_down, t.open_price, t.high_price, t.low_price, t.pre_close,
                  t.bid_price_1, t.ask_price_1, t.bid_price_5, t.ask_price_5):
            if p:
                assert on_grid(p, step), (t.symbol, p, step)
        assert t.limit_down <= t.last_price <= t.limit_up
        assert t.limit_down <= t.low_price <= t.last_price <= t.high_price <= t.limit_up
        for k in range(1, 6):
            bp, ap = getattr(t, f"bid_price_{k}"), getattr(t, f"ask_price_{k}")
            assert (bp == 0 or t.limit_down <= bp <= t.limit_up) and (ap == 0 or t.limit_down <= ap <= t.limit_up)
            assert (bp == 0) == (getattr(t, f"bid_volume_{k}") == 0)
        assert t.bid_price_1 < t.ask_price_1 or not (t.bid_price_1 and t.ask_price_1)
    assert at_limit > 0


def test_limits_from_pre_settlement() -> None:
    src = RandomSource(5, ["SHFE.rb2605", "SSE.600000", "SZSE.300750"], start=START, prices={"rb": 3300})
    seen = {}
    for t in src.ticks(300):
        seen[t.symbol] = t
    rb = seen["rb2605"]
    assert rb.pre_settlement == 3300 and rb.limit_up == math.floor(3300 * 1.07) and rb.limit_down == math.ceil(3300 * 0.93)
    assert seen["600000"].limit_up == pytest.approx(11.55) and seen["600000"].limit_down == pytest.approx(9.45)
    assert seen["300750"].limit_up == pytest.approx(300.0)  # ChiNext: 20 %
    assert seen["600000"].volume % 100 == 0 and seen["600000"].open_interest == 0


def test_cumulative_volume_monotone_in_a_day_and_reset_on_a_new_day() -> None:
    ticks = list(RandomSource(9, start=START).ticks(20_000))
    last: dict[str, Tick] = {}
    resets = 0
    for t in ticks:
        prev = last.get(t.symbol)
        if prev is not None and prev.trading_day == t.trading_day:
            assert t.volume == prev.volume + t.last_volume
            assert t.turnover >= prev.turnover
        elif prev is not None:
            resets += 1
            assert t.trading_day > prev.trading_day
            assert t.volume == t.last_volume  # restarted
            assert t.pre_settlement == prev.last_price or t.exchange in ("SSE", "SZSE")
            assert t.pre_close == prev.last_price
            assert t.open_interest >= 0
        last[t.symbol] = t
    assert resets >= 10  # every night-session product started a new trading day


def test_turnover_is_price_volume_multiplier() -> None:
    src = RandomSource(2, ["SHFE.rb2605"], start=START)
    t = next(iter(src.ticks(1)))
    assert t.turnover == pytest.approx(t.last_price * t.last_volume * 10)


def test_batches_hold_every_tick_once_per_instrument() -> None:
    src = RandomSource(4, start=START)
    batches = list(src.batches(7, n=1000))
    assert all(isinstance(b, TickBatch) and 1 <= len(b.ticks) <= 7 for b in batches)
    assert all(tk.symbol == b.symbol and tk.exchange == b.exchange for b in batches for tk in b.ticks)
    assert sum(len(b.ticks) for b in batches) == 1000
    flat = sorted((market_fields(t) for b in batches for t in b.ticks), key=lambda f: (f[2], f[0]))
    ref = sorted((market_fields(t) for t in RandomSource(4, start=START).ticks(1000)), key=lambda f: (f[2], f[0]))
    assert flat == ref
    assert decode(encode(batches[0]), TickBatch) == batches[0]


def test_batch_ticks_rejects_zero() -> None:
    with pytest.raises(ValueError):
        list(batch_ticks([], 0))


def test_instruments_parsing_and_defaults() -> None:
    assert parse_instrument("SHFE.rb2601") == ("SHFE", "rb2601")
    assert parse_instrument("rb2601.SHFE") == ("SHFE", "rb2601")
    assert parse_instrument("SR601") == ("CZCE", "SR601")
    assert parse_instrument(("sse", "600000")) == ("SSE", "600000")
    inst = default_instruments("2025-03-03 09:00:00")
    assert ("SHFE", "rb2505") in inst and ("CZCE", "SR505") in inst and ("SSE", "600000") in inst
    assert len(inst) > 15


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), minute=st.integers(0, 7 * 1440 - 1))
def test_any_start_gives_in_session_on_grid_ticks(seed: int, minute: int) -> None:
    start = ms_of(2025, 3, 3) + minute * 60_000
    src = RandomSource(seed, ["SHFE.au2606", "CFFEX.T2606", "CZCE.MA605", "SZSE.000001"], start=start)
    for t in src.ticks(200):
        spec = spec_for(t.symbol, t.exchange)
        assert t.datetime >= start
        assert is_trading(spec, t.datetime) is Phase.CONTINUOUS
        assert on_grid(t.last_price, spec.price_tick)
