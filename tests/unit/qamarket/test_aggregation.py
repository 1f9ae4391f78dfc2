from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qamarket.aggregation import Aggregator, BarAggregator
from qamarket.models import Bar, spec_for
from qamarket.sessions import MS_MIN, Calendar, bar_label, from_ms, minute_label, template

from .helpers import FRI, MON, at, tick


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def agg(symbol: str = "rb2510", freqs=("1min", "5min", "30min", "1day"), **kw) -> BarAggregator:  # type: ignore[no-untyped-def]
    kw.setdefault("realtime", ())
    return BarAggregator(symbol, spec_for(symbol).exchange, freqs=freqs, **kw)


def finals(bars, freq="1min"):  # type: ignore[no-untyped-def]
    return [b for b in bars if b.final and b.freq == freq]


def hhmm(b: Bar) -> str:
    return from_ms(b.datetime).strftime("%H:%M")


def feed(a: BarAggregator, ticks) -> list[Bar]:  # type: ignore[no-untyped-def]
    out: list[Bar] = []
    for t in ticks:
        out.extend(a.on_tick(t))
    return out


def test_basic_minute_ohlcv_and_close_on_later_tick() -> None:
    a = agg()
    out = feed(a, [tick(at(MON, 9, 0, 0, 500), 10, 100), tick(at(MON, 9, 0, 20), 12, 105),
                   tick(at(MON, 9, 0, 40), 9, 112), tick(at(MON, 9, 0, 59, 500), 11, 120)])
    assert out == []
    out = feed(a, [tick(at(MON, 9, 1, 0, 500), 11, 121)])
    (b,) = finals(out)
    assert (hhmm(b), b.open, b.high, b.low, b.close, b.volume, b.tick_count) == ("09:00", 10, 12, 9, 11, 20, 4)
    assert b.trading_day == "20250303" and b.turnover == (120 - 100) * 0 + 120 * 11 * 10 - 100 * 10 * 10


def test_silent_minutes_and_missing_00_tick_timer_closes() -> None:
    a = agg()
    feed(a, [tick(at(MON, 9, 0, 10), 10, 1), tick(at(MON, 9, 0, 30), 11, 3)])
    assert a.on_timer(at(MON, 9, 0, 59, 999)) == ()
    out = a.on_timer(at(MON, 9, 1, 0, 10))
    assert [hhmm(b) for b in finals(out)] == ["09:00"]
    out = feed(a, [tick(at(MON, 9, 3, 10), 12, 10)])
    assert finals(out) == []  # 09:01, 09:02 silent: no bars
    out = a.on_timer(at(MON, 9, 5, 0, 1))
    assert [hhmm(b) for b in finals(out)] == ["09:03"]
    (b5,) = finals(out, "5min")
    assert (hhmm(b5), b5.open, b5.high, b5.close, b5.volume, b5.tick_count) == ("09:00", 10, 12, 12, 9, 3)
    assert a.on_timer(at(MON, 9, 6)) == ()  # exactly once


def test_late_tick_after_timer_is_dropped_and_counted() -> None:
    a = agg()
    feed(a, [tick(at(MON, 9, 0, 10), 10, 1), tick(at(MON, 9, 0, 30), 11, 3)])
    assert len(finals(a.on_timer(at(MON, 9, 1, 0, 100)))) == 1
    assert feed(a, [tick(at(MON, 9, 0, 59, 500), 99, 5)]) == []
    assert a.stats["late"] == 1
    out = feed(a, [tick(at(MON, 9, 1, 30), 12, 6)]) + a.on_timer(at(MON, 9, 2, 0, 5))
    (b,) = finals(out)
    assert b.volume == 3 and b.high == 12  # the late tick's trade folds into the next delta
    assert feed(a, [tick(at(MON, 9, 0, 20), 1, 6)]) == [] and a.stats["late"] == 2


def test_cumulative_volume_reset() -> None:
    a = agg()
    out = feed(a, [tick(at(MON, 9, 0, 1), 10, 100), tick(at(MON, 9, 0, 2), 10, 110),
                   tick(at(MON, 9, 0, 3), 10, 5), tick(at(MON, 9, 0, 4), 10, 8), tick(at(MON, 9, 1, 4), 10, 9)])
    (b,) = finals(out)
    assert b.volume == 10 + 3 and a.stats["volume_reset"] == 1


def test_break_1015_ends_bars_and_closing_snapshot() -> None:
    a = agg()
    feed(a, [tick(at(MON, 10, 0, 1), 10, 1), tick(at(MON, 10, 14, 30), 11, 2)])
    assert a.on_timer(at(MON, 10, 15, 0, 500)) == ()  # grace: the 10:15:00 snapshot may still come
    out = feed(a, [tick(at(MON, 10, 15, 0, 0), 13, 4)])
    assert out == []
    out = a.on_timer(at(MON, 10, 15, 1, 0))
    assert [(b.freq, hhmm(b)) for b in out if b.final] == [("1min", "10:14"), ("5min", "10:10"), ("30min", "10:00")]
    assert finals(out)[0].close == 13
    out = feed(a, [tick(at(MON, 10, 30, 0, 500), 14, 5)]) + a.on_timer(at(MON, 10, 31))
    assert [(b.freq, hhmm(b)) for b in out if b.final] == [("1min", "10:30")]


def test_break_closes_on_next_session_tick_without_timer() -> None:
    a = agg()
    feed(a, [tick(at(MON, 10, 13, 1), 10, 1), tick(at(MON, 10, 14, 30), 11, 2)])
    out = feed(a, [tick(at(MON, 10, 30, 0, 500), 14, 5)])
    assert [(b.freq, hhmm(b)) for b in out if b.final] == [("1min", "10:14"), ("5min", "10:10"), ("30min", "10:00")]


def test_auction_tick_folds_into_first_bar_with_its_volume() -> None:
    a = agg()
    feed(a, [tick(at(MON, 14, 59, 50), 3400, 5000)])  # previous trading day
    out = feed(a, [tick(at(MON, 20, 59, 0), 3500, 300), tick(at(MON, 21, 0, 0, 500), 3510, 320),
                   tick(at(MON, 21, 0, 30), 3490, 330)])
    assert [(b.freq, hhmm(b), b.trading_day) for b in out if b.final] == [
        ("1min", "14:59", "20250303"), ("5min", "14:55", "20250303"), ("30min", "14:30", "20250303"),
        ("1day", "00:00", "20250303")]
    out = a.on_timer(at(MON, 21, 1))
    (b,) = finals(out)
    assert (hhmm(b), b.open, b.high, b.low, b.close, b.volume, b.trading_day) == (
        "21:00", 3500, 3510, 3490, 3490, 330, "20250304")


def test_day_change_first_tick_is_baseline_when_not_auction() -> None:
    a = agg()
    feed(a, [tick(at(MON, 14, 59, 50), 3400, 5000)])
    feed(a, [tick(at(MON, 21, 0, 1), 3500, 300), tick(at(MON, 21, 0, 30), 3490, 330)])
    (b,) = finals(a.on_timer(at(MON, 21, 1)))
    assert b.volume == 30  # vn.py's rule: the first tick's cumulative is the baseline
    z = agg(day_baseline="zero")
    feed(z, [tick(at(MON, 14, 59, 50), 3400, 5000), tick(at(MON, 21, 0, 1), 3500, 300),
             tick(at(MON, 21, 0, 30), 3490, 330)])
    assert finals(z.on_timer(at(MON, 21, 1)))[0].volume == 330


def test_night_across_midnight_cu_and_au() -> None:
    a = agg("cu2510", freqs=("1min", "60min"))
    out = feed(a, [tick(at(FRI, 23, 59, 30), 70000, 10, symbol="cu2510"),
                   tick(at((2025, 3, 8), 0, 0, 30), 70010, 12, symbol="cu2510"),
                   tick(at((2025, 3, 8), 1, 0, 0, 0), 70020, 15, symbol="cu2510")])
    assert [(hhmm(b), b.trading_day) for b in finals(out)] == [("23:59", "20250310"), ("00:00", "20250310")]
    assert [hhmm(b) for b in finals(out, "60min")] == ["23:00"]  # closed by its last minute
    assert feed(a, [tick(at((2025, 3, 8), 1, 0, 5), 1, 16, symbol="cu2510")]) == []
    assert a.stats["outside_session"] == 1
    out = a.on_timer(at((2025, 3, 8), 1, 0, 1))
    assert [(b.freq, hhmm(b), b.close, b.volume) for b in out] == [("1min", "00:59", 70020, 3),
                                                                    ("60min", "00:00", 70020, 5)]
    g = agg("au2512", freqs=("1min", "30min"))
    feed(g, [tick(at((2025, 3, 4), 2, 29, 1), 600, 1, symbol="au2512"),
             tick(at((2025, 3, 4), 2, 30, 0, 500), 601, 2, symbol="au2512")])
    out = g.on_timer(at((2025, 3, 4), 2, 30, 1))
    assert [(b.freq, hhmm(b), b.close, b.trading_day) for b in out] == [
        ("1min", "02:29", 601, "20250304"), ("30min", "02:00", 601, "20250304")]


def test_daily_bar_closes_by_timer_after_session_end() -> None:
    a = agg(freqs=("1min", "1day"))
    feed(a, [tick(at(MON, 9, 0, 1), 10, 1), tick(at(MON, 14, 59, 59), 12, 9)])
    assert [b.freq for b in a.on_timer(at(MON, 15, 0, 0, 999))] == []
    out = a.on_timer(at(MON, 15, 0, 1))
    assert [(b.freq, b.volume, b.high) for b in out] == [("1min", 8, 12), ("1day", 8, 12)]


def test_realtime_throttle_with_injected_clock() -> None:
    clk = FakeClock()
    a = agg(realtime=("1min", "5min"), clock=clk)
    out = feed(a, [tick(at(MON, 9, 0, 1), 10, 1)])
    assert [(b.freq, b.final, b.open) for b in out] == [("1min", False, 10), ("5min", False, 10)]
    clk.now = 0.3
    assert feed(a, [tick(at(MON, 9, 0, 2), 11, 2)]) == []
    clk.now = 0.5
    out = feed(a, [tick(at(MON, 9, 0, 3), 12, 4)])
    assert [(b.close, b.volume, b.tick_count) for b in out] == [(12, 3, 3), (12, 3, 3)]
    clk.now = 1.0
    out = feed(a, [tick(at(MON, 9, 1, 3), 8, 5)])
    assert [(b.freq, b.final) for b in out] == [("1min", True), ("1min", False), ("5min", False)]
    rt5 = out[-1]
    assert (rt5.open, rt5.low, rt5.high, rt5.volume, rt5.datetime) == (10, 8, 12, 4, at(MON, 9, 0))


def test_day_extremes_between_snapshots_are_absorbed() -> None:
    a = agg()
    feed(a, [tick(at(MON, 9, 0, 1), 10, 1, high_price=10, low_price=9),
             tick(at(MON, 9, 0, 2), 10, 2, high_price=13, low_price=9),
             tick(at(MON, 9, 0, 3), 10, 3, high_price=13, low_price=7)])
    (b,) = finals(a.on_timer(at(MON, 9, 1)))
    assert (b.high, b.low) == (13, 7)


def test_multi_instrument_router() -> None:
    m = Aggregator(freqs=("1min",), realtime=())
    m.on_tick(tick(at(MON, 9, 0, 1), 10, 1))
    m.on_tick(tick(at(MON, 9, 0, 1), 20, 1, symbol="m2509", exchange="DCE"))
    m.on_tick(tick(at(MON, 9, 0, 1), 20, 1, symbol="zz2509", exchange="DCE"))
    out = m.on_timer(at(MON, 9, 1))
    assert sorted(b.symbol for b in out) == ["m2509", "rb2510"]
    assert len(m) == 2 and m.stats["unknown_instrument"] == 1


# ----------------------------------------------------------------------------------- properties
_SLOTS: dict[str, list[int]] = {}


def slots(symbol: str) -> list[int]:
    """Every 500 ms instant of two trading days (Fri night, Mon, Mon night, ...) in a session or auction."""
    if symbol not in _SLOTS:
        tpl = template(spec_for(symbol))
        cal = Calendar()
        out = []
        t = at(FRI, 20, 0)
        end = at((2025, 3, 11), 3, 0)
        while t < end:  # minute by minute, plus the closing snapshot second after a segment end
            if cal.is_session_day(t):
                if minute_label(tpl, t + 1500) is not None:
                    out.extend(range(t, t + MS_MIN, 500))
                elif minute_label(tpl, t) is not None:
                    out.extend((t, t + 500))
            t += MS_MIN
        _SLOTS[symbol] = out
    return _SLOTS[symbol]


@st.composite
def streams(draw):  # type: ignore[no-untyped-def]
    symbol = draw(st.sampled_from(["rb2510", "cu2510", "au2512", "IF2512", "SR601"]))
    sl = slots(symbol)
    # clustered picks: a start and increasing small/large gaps, so minutes have several ticks and gaps
    n = draw(st.integers(1, 150))
    i = draw(st.integers(0, len(sl) - 1))
    idx = []
    for _ in range(n):
        idx.append(i)
        i += draw(st.one_of(st.integers(1, 4), st.integers(1, 400), st.integers(1, 5000)))
        if i >= len(sl):
            break
    cal = Calendar()
    ticks = []
    vol, day, price = 0.0, None, 100.0
    for k in idx:
        t = sl[k]
        td = cal.trading_day(t)
        if td != day:
            vol = float(draw(st.integers(0, 50)))
            day = td
        if draw(st.integers(0, 30)) == 0:
            vol = float(draw(st.integers(0, 5)))  # cumulative reset
        else:
            vol += draw(st.integers(0, 20))
        price = max(1.0, price + draw(st.integers(-3, 3)))
        ticks.append(tick(t, price, vol, symbol=symbol, exchange=spec_for(symbol).exchange))
    timers = draw(st.lists(st.booleans(), min_size=len(ticks), max_size=len(ticks)))
    return symbol, ticks, timers


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_properties_ohlc_volume_exactly_once(data) -> None:  # type: ignore[no-untyped-def]
    symbol, ticks, timers = data
    spec = spec_for(symbol)
    a = BarAggregator(symbol, spec.exchange, freqs=("1min", "5min", "15min", "60min", "1day"), realtime=(),
                      day_baseline="first_tick")
    out: list[Bar] = []
    for i, (tk, use_timer) in enumerate(zip(ticks, timers)):
        out.extend(a.on_tick(tk))
        if use_timer and i + 1 < len(ticks):
            out.extend(a.on_timer(ticks[i + 1].datetime))  # never past the next tick: nothing becomes late
    assert a.stats["late"] == 0 and a.stats["outside_session"] == 0
    out.extend(a.on_timer(ticks[-1].datetime + 4 * 86_400_000))
    assert a.flush() == []  # the timer closed everything
    assert all(b.final for b in out)
    for b in out:
        assert b.low <= b.open <= b.high and b.low <= b.close <= b.high
    # exactly once: one final bar per (freq, label) that had ticks, and none other
    for freq in ("1min", "5min", "15min", "60min", "1day"):
        labels = [b.datetime for b in out if b.freq == freq]
        assert len(labels) == len(set(labels)), freq
        assert set(labels) == {bar_label(spec, tk.datetime, freq) for tk in ticks}, freq
    # volume conservation: sum over runs (same trading day, non-decreasing cumulative) of last - first
    expected = 0.0
    first = prev = None
    cal = Calendar()
    for tk in ticks:
        if prev is None or cal.trading_day(tk.datetime) != cal.trading_day(prev.datetime) or tk.volume < prev.volume:
            if prev is not None:
                expected += prev.volume - first.volume  # type: ignore[union-attr]
            first = tk
        prev = tk
    expected += prev.volume - first.volume  # type: ignore[union-attr]
    for freq in ("1min", "5min", "60min", "1day"):
        assert sum(b.volume for b in out if b.freq == freq) == expected, freq
    assert sum(b.tick_count for b in out if b.freq == "1min") == len(ticks)
    assert Counter(b.trading_day for b in out if b.freq == "1day") == Counter(
        {d: 1 for d in {cal.trading_day(tk.datetime) for tk in ticks}})
