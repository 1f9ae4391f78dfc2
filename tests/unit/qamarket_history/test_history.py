"""qamarket.history: merging history and live bars, dedupe, gaps, indicators vs pandas."""
from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qamarket.history import BarSeries, merge_sources, parse_indicator, parse_indicators, split_indicator_list
from qamarket.models import Bar
from qamarket.rpc import BadRequest, HistoryRequest, error_field, parse_request
from qapubsub.messages import encode

M = 60_000
T0 = 1_740_992_400_000  # 2025-03-03 09:00 local


def bar(i: int, close: float = 100.0, *, final: bool = True, tick_count: int = 1, ts: int = 1, vol: float = 1.0,
        src: str = "") -> Bar:
    return Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=T0 + i * M, trading_day="20250303",
               open=close, high=close + 1, low=close - 1, close=close, volume=vol, final=final,
               tick_count=tick_count, ts=ts, id=f"bar.{i}{src}")


def series(**kw) -> BarSeries:  # type: ignore[no-untyped-def]
    return BarSeries("SHFE", "rb2605", "1min", **kw)


def labels(bars: list[Bar]) -> list[int]:
    return [(b.datetime - T0) // M for b in bars]


# ------------------------------------------------------------------------------------------ merging
def test_ours_win_over_quantaxis_where_both_have_a_label() -> None:
    ours = [bar(2, 10), bar(3, 11)]
    theirs = [bar(1, 99), bar(2, 99), bar(3, 99), bar(4, 99)]
    got = merge_sources(ours, theirs)
    assert labels(got) == [1, 2, 3, 4]
    assert [b.close for b in got] == [99, 10, 11, 99]


def test_history_then_live_closed_bars_no_duplicate_labels() -> None:
    s = series(emit_after=T0 + 2 * M)
    s.add_history([bar(0), bar(1), bar(2)])
    assert s.on_closed(bar(2, src="live"), "bar.2") is None  # history already; stored before subscribing
    assert s.on_closed(bar(3), "bar.3") is not None
    assert s.add_history([bar(3, 55), bar(4)]) == 1  # history never replaces a live label
    assert labels(s.closed) == [0, 1, 2, 3, 4]
    assert s.closed[3].close == 100.0


def test_duplicate_closed_bar_same_message_id_is_emitted_once() -> None:
    s = series()
    assert s.on_closed(bar(0), "bar.1min.SHFE.rb2605.0") is not None
    assert s.on_closed(bar(0), "bar.1min.SHFE.rb2605.0") is None
    assert s.stats["dup_id"] == 1 and s.stats["emitted"] == 1


def test_duplicate_closed_label_with_another_id_is_dropped() -> None:
    s = series()
    assert s.on_closed(bar(0), "a") is not None
    assert s.on_closed(bar(0, 101), "b") is None
    assert s.stats["dup_label"] == 1 and s.closed[0].close == 100.0


def test_realtime_replaces_the_in_progress_bar_and_out_of_order_updates_are_ignored() -> None:
    s = series()
    s.on_closed(bar(0), "0")
    assert s.on_realtime(bar(1, 101, final=False, tick_count=5, ts=5))
    assert not s.on_realtime(bar(1, 100.5, final=False, tick_count=3, ts=3))  # older update, delivered late
    assert s.current is not None and s.current.close == 101
    assert s.on_realtime(bar(2, 102, final=False, tick_count=1, ts=6))  # the next minute started
    assert not s.on_realtime(bar(1, 101.5, final=False, tick_count=9, ts=4))  # older label
    assert s.current.close == 102 and s.stats["rt_out_of_order"] == 2
    assert labels(s.select(include_current=True)) == [0, 2]
    assert s.select(include_current=True)[-1].final is False


def test_realtime_update_after_the_close_of_the_same_label_is_ignored() -> None:
    s = series()
    s.on_realtime(bar(0, 100, final=False, tick_count=2))
    assert s.on_closed(bar(0, 100.5), "0") is not None
    assert s.current is None  # the close clears it
    assert not s.on_realtime(bar(0, 99, final=False, tick_count=7))
    assert s.current is None and s.stats["rt_after_close"] == 1


def test_gap_filled_late_is_inserted_in_order_emitted_once_and_indicators_recomputed() -> None:
    s = series(next_label=lambda lab: lab + M)
    ma = parse_indicator("MA(2)")
    s.track([ma])
    for i in (0, 1, 3):
        s.on_closed(bar(i, 100 + i), str(i))
    assert s.stats["gaps"] == 1
    assert s.latest_indicators() == {"MA(2)": (101 + 103) / 2}
    assert s.on_closed(bar(2, 102), "2") is not None  # the missing bar arrives late
    assert s.on_closed(bar(2, 102), "2") is None
    assert labels(s.closed) == [0, 1, 2, 3]
    assert s.stats["gap_filled"] == 1
    assert s.indicator_columns([ma])["MA(2)"] == [None, 100.5, 101.5, 102.5]
    assert s.on_closed(bar(4, 104), "4") is not None
    assert s.latest_indicators() == {"MA(2)": 103.5}  # still tracked after the recompute


def test_select_count_range_and_current() -> None:
    s = series()
    s.add_history([bar(i, 100 + i) for i in range(10)])
    s.on_realtime(bar(10, 110, final=False))
    assert labels(s.select(count=3)) == [7, 8, 9]
    got = s.select(count=3, include_current=True)
    assert labels(got) == [8, 9, 10] and not got[-1].final
    assert labels(s.select(start=T0 + 2 * M, end=T0 + 4 * M, include_current=True)) == [2, 3, 4]
    cols = s.indicator_columns([parse_indicator("MA(2)")], count=3, include_current=True)
    assert cols["MA(2)"] == [107.5, 108.5, 109.5]


def test_max_bars_keeps_the_newest_and_indicator_columns_aligned() -> None:
    s = series(max_bars=5)
    ma = parse_indicator("MA3")
    s.track([ma])
    for i in range(12):
        s.on_closed(bar(i, 100 + i), str(i))
    assert labels(s.closed) == [7, 8, 9, 10, 11]
    assert s.indicator_columns([ma])["MA(3)"] == [106.0, 107.0, 108.0, 109.0, 110.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.booleans(), st.integers(1, 5)), max_size=120),
       st.integers(0, 30))
def test_property_any_delivery_order_emits_each_closed_label_at_most_once(events, hist_upto) -> None:  # type: ignore[no-untyped-def]
    s = series(emit_after=T0 + hist_upto * M)
    s.add_history([bar(i) for i in range(0, hist_upto + 1, 2)])
    emitted: list[int] = []
    for i, final, tc in events:
        out = s.on_bar(bar(i, final=final, tick_count=tc), f"bar.{i}" if final else None)
        if out is not None:
            emitted.append(out.datetime)
    assert len(emitted) == len(set(emitted))
    labs = [b.datetime for b in s.closed]
    assert labs == sorted(set(labs))
    if s.current is not None:
        assert s.current.datetime > labs[-1] if labs else True
    # every live closed label is in the series, and was emitted unless it was history at the start
    for i, final, _ in events:
        if final:
            assert T0 + i * M in labs
            assert (T0 + i * M in emitted) or (i <= hist_upto)


# ------------------------------------------------------------------------------------------ indicators
def _random_bars(n: int, seed: int = 7) -> list[Bar]:
    rnd = random.Random(seed)
    out, c = [], 3500.0
    for i in range(n):
        o = c
        c = max(1.0, c + rnd.gauss(0, 5))
        out.append(Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=T0 + i * M, trading_day="20250303",
                       open=o, high=max(o, c) + abs(rnd.gauss(0, 3)), low=min(o, c) - abs(rnd.gauss(0, 3)), close=c))
    return out


def _wilder(s: pd.Series, n: int) -> pd.Series:
    seed = s.iloc[:n].mean()
    tail = pd.concat([pd.Series([seed]), s.iloc[n:]], ignore_index=True)
    sm = tail.ewm(alpha=1 / n, adjust=False).mean()
    return pd.concat([pd.Series([np.nan] * (n - 1)), sm], ignore_index=True)


def pandas_reference(bars: list[Bar]) -> dict[str, pd.Series]:
    """MA(5), EMA(12), MACD(12,26,9), RSI(14), ATR(14), BOLL(20,2) over ``bars`` with pandas."""
    c = pd.Series([b.close for b in bars])
    h = pd.Series([b.high for b in bars])
    lo = pd.Series([b.low for b in bars])
    n = len(c)
    ema = lambda x, span: x.ewm(span=span, adjust=False).mean()  # noqa: E731
    dif = ema(c, 12) - ema(c, 26)
    dea = ema(dif, 9)
    warm = pd.Series([np.nan] * 25 + [0.0] * max(0, n - 25))
    d = c.diff().iloc[1:].reset_index(drop=True)
    rsi = 100 - 100 / (1 + _wilder(d.clip(lower=0), 14) / _wilder((-d).clip(lower=0), 14))
    tr = pd.concat([h - lo, (h - c.shift(1)).abs(), (lo - c.shift(1)).abs()], axis=1).max(axis=1)
    tr.iloc[0] = h.iloc[0] - lo.iloc[0]
    mid = c.rolling(20).mean()
    sd = c.rolling(20).std(ddof=0)
    e12 = ema(c, 12)
    e12[:11] = np.nan
    return {
        "MA(5)": c.rolling(5).mean(), "EMA(12)": e12,
        "MACD(12,26,9).dif": dif + warm, "MACD(12,26,9).dea": dea + warm, "MACD(12,26,9).hist": 2 * (dif - dea) + warm,
        "RSI(14)": pd.concat([pd.Series([np.nan]), rsi], ignore_index=True), "ATR(14)": _wilder(tr, 14),
        "BOLL(20,2).up": mid + 2 * sd, "BOLL(20,2).mid": mid, "BOLL(20,2).down": mid - 2 * sd,
    }


ALL = ["MA(5)", "EMA(12)", "MACD", "RSI(14)", "ATR(14)", "BOLL(20,2)"]


def assert_matches_pandas(bars: list[Bar], cols: dict[str, list[float | None]]) -> None:
    ref = pandas_reference(bars)
    assert set(cols) == set(ref)
    for name, values in cols.items():
        ours = np.array([np.nan if v is None else v for v in values], dtype=float)
        np.testing.assert_allclose(ours, ref[name].to_numpy(dtype=float), rtol=1e-9, atol=1e-9, err_msg=name)


def test_indicators_over_history_plus_live_equal_pandas() -> None:
    bars = _random_bars(200)
    s = series()
    s.add_history(bars[:120])
    specs = parse_indicators(ALL)
    s.track(specs)  # computed over history, then incrementally over live bars
    for b in bars[120:]:
        s.on_closed(b, b.id)
    assert_matches_pandas(bars, s.indicator_columns(specs))
    latest = s.latest_indicators()
    assert latest["MA(5)"] == pytest.approx(np.mean([b.close for b in bars[-5:]]))


def test_indicator_value_of_the_in_progress_bar_does_not_change_the_state() -> None:
    bars = _random_bars(60)
    s = series()
    s.add_history(bars[:59])
    spec = parse_indicator("EMA(12)")
    s.on_realtime(msgspec_replace(bars[59], final=False))
    with_cur = s.indicator_columns([spec], include_current=True)["EMA(12)"]
    s.on_closed(bars[59], "x")
    closed = s.indicator_columns([spec])["EMA(12)"]
    assert with_cur == pytest.approx(closed)


def msgspec_replace(b: Bar, **kw) -> Bar:  # type: ignore[no-untyped-def]
    import msgspec

    return msgspec.structs.replace(b, **kw)


@pytest.mark.parametrize("text,canonical", [("MA(20)", "MA(20)"), ("ma20", "MA(20)"), ("EMA:12", "EMA(12)"),
                                            ("MACD", "MACD(12,26,9)"), ("boll(20, 2.5)", "BOLL(20,2.5)"),
                                            ("RSI", "RSI(14)")])
def test_parse_indicator(text: str, canonical: str) -> None:
    assert parse_indicator(text).canonical == canonical


@pytest.mark.parametrize("text", ["FOO(3)", "MA(0)", "MA(2.5)", "MACD(1,2,3,4)", "MA(x)", ""])
def test_parse_indicator_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_indicator(text)


def test_split_indicator_list_keeps_commas_inside_parentheses() -> None:
    assert split_indicator_list("MA(5),MACD(12,26,9) RSI;BOLL(20,2)") == ["MA(5)", "MACD(12,26,9)", "RSI", "BOLL(20,2)"]


# ------------------------------------------------------------------------------------------ requests
@pytest.mark.parametrize("body,field", [
    (b'{"symbol":"rb2605","exchange":"SHFE","freq":"1min","count":"ten"}', "count"),
    (b'{"symbol":"rb2605","exchange":"XXX","freq":"1min","count":10}', "exchange"),
    (b'{"symbol":"rb2605","exchange":"SHFE","freq":"2min","count":10}', "freq"),
    (b'{"exchange":"SHFE","freq":"1min","count":10}', "symbol"),
    (b'{"symbol":"rb2605","exchange":"SHFE","freq":"1min","count":10,"cnt":3}', "cnt"),
    (b'{"symbol":"rb2605","exchange":"SHFE","freq":"1min","count":0}', "count"),
    (b'{"symbol":"rb2605","exchange":"SHFE","freq":"1min"}', "count"),
    (b'{"symbol":"rb.2605","exchange":"SHFE","freq":"1min","count":5}', "symbol"),
    (b'{"symbol":"rb2605","exchange":"SHFE","freq":"1min","start":5,"end":1}', "end"),
    (b'{"symbol":"rb2605","exchange":"SHFE","freq":"1min","count":5,"indicators":["MA(0)"]}', "indicators"),
])
def test_bad_requests_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(body)
    assert info.value.field == field, str(info.value)


def test_good_request_round_trip() -> None:
    req = HistoryRequest(symbol="rb2605", exchange="SHFE", freq="5min", count=10, indicators=["MA(5)", "MACD"])
    got, specs = parse_request(encode(req))
    assert got == req and [s.canonical for s in specs] == ["MA(5)", "MACD(12,26,9)"]
    assert error_field("Expected `int`, got `str` - at `$.count`") == "count"
