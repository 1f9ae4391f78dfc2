from __future__ import annotations

import datetime as dt

import pytest

from qamarket.models import spec_for
from qamarket.sessions import (
    Calendar, Phase, bar_close_time, bar_end, bar_label, from_ms, is_trading, phase, trading_day,
)

from .helpers import FRI, MON, at

RB, CU, AU, M, SR, AP, IF, T = (spec_for(s) for s in ("rb2510", "cu2510", "au2512", "m2509", "SR601",
                                                               "AP510", "IF2512", "T2512"))
STOCK = spec_for("600000", "SSE")


@pytest.mark.parametrize(
    "spec,hhmmss,expected",
    [
        (RB, (8, 54, 59), Phase.CLOSED), (RB, (8, 55, 0), Phase.AUCTION), (RB, (8, 59, 0), Phase.AUCTION),
        (RB, (9, 0, 0), Phase.CONTINUOUS), (RB, (10, 14, 59), Phase.CONTINUOUS),
        (RB, (10, 15, 0), Phase.CONTINUOUS),  # CTP's closing snapshot, within the 1 s grace
        (RB, (10, 15, 1), Phase.CLOSED), (RB, (10, 29, 59), Phase.CLOSED), (RB, (10, 30, 0), Phase.CONTINUOUS),
        (RB, (12, 0, 0), Phase.CLOSED), (RB, (13, 30, 0), Phase.CONTINUOUS), (RB, (15, 0, 1), Phase.CLOSED),
        (RB, (20, 59, 0), Phase.AUCTION), (RB, (22, 59, 59), Phase.CONTINUOUS), (RB, (23, 0, 2), Phase.CLOSED),
        (CU, (23, 30, 0), Phase.CONTINUOUS), (CU, (0, 59, 59), Phase.CONTINUOUS), (CU, (1, 0, 5), Phase.CLOSED),
        (AU, (2, 29, 59), Phase.CONTINUOUS), (AU, (2, 30, 5), Phase.CLOSED), (AU, (1, 30, 0), Phase.CONTINUOUS),
        (M, (22, 0, 0), Phase.CONTINUOUS), (M, (23, 30, 0), Phase.CLOSED),  # DCE
        (SR, (21, 30, 0), Phase.CONTINUOUS), (AP, (21, 30, 0), Phase.CLOSED),  # CZCE: AP has no night
        (IF, (9, 0, 0), Phase.CLOSED), (IF, (9, 26, 0), Phase.AUCTION), (IF, (9, 30, 0), Phase.CONTINUOUS),
        (IF, (11, 45, 0), Phase.CLOSED), (IF, (13, 0, 0), Phase.CONTINUOUS), (IF, (15, 5, 0), Phase.CLOSED),
        (T, (15, 10, 0), Phase.CONTINUOUS), (T, (15, 16, 0), Phase.CLOSED),
        (STOCK, (9, 15, 0), Phase.AUCTION), (STOCK, (9, 27, 0), Phase.AUCTION), (STOCK, (9, 30, 0), Phase.CONTINUOUS),
        (STOCK, (14, 58, 0), Phase.AUCTION), (STOCK, (12, 0, 0), Phase.CLOSED), (STOCK, (21, 0, 0), Phase.CLOSED),
    ],
)
def test_phase(spec, hhmmss, expected) -> None:  # type: ignore[no-untyped-def]
    assert phase(spec, at(MON, *hhmmss)) is expected


def test_is_trading_is_truthy_and_knows_weekends() -> None:
    assert is_trading(RB, at(MON, 9, 5)) is Phase.CONTINUOUS
    assert not is_trading(RB, at(MON, 12, 0))
    assert is_trading(RB, dt.datetime(2025, 3, 3, 8, 59)) is Phase.AUCTION
    assert not is_trading(RB, at((2025, 3, 8), 10, 0))  # Saturday
    assert is_trading(CU, at((2025, 3, 8), 0, 30))  # Friday night continues past midnight
    assert not is_trading(CU, at((2025, 3, 9), 21, 30))  # Sunday night has no session... Sunday is not business
    cal = Calendar(holidays=["20250303"])
    assert not is_trading(RB, at(MON, 9, 5), cal)


def test_trading_day() -> None:
    assert trading_day(RB, at(MON, 9, 5)) == "20250303"
    assert trading_day(RB, at(MON, 21, 5)) == "20250304"
    assert trading_day(RB, at(MON, 20, 59)) == "20250304"  # night auction
    assert trading_day(RB, at(FRI, 21, 5)) == "20250310"  # Friday night -> Monday
    assert trading_day(CU, at((2025, 3, 8), 0, 30)) == "20250310"  # Saturday 00:30 -> Monday
    assert trading_day(CU, at((2025, 3, 4), 0, 30)) == "20250304"  # Tuesday 00:30 -> Tuesday
    cal = Calendar(holidays=["20250310"])
    assert trading_day(RB, at(FRI, 21, 5), cal) == "20250311"
    assert trading_day(STOCK, at(MON, 10, 0)) == "20250303"


def _lab(spec, hh, mm, ss=0, freq="1min"):  # type: ignore[no-untyped-def]
    lab = bar_label(spec, at(MON, hh, mm, ss), freq)
    return None if lab is None else from_ms(lab).strftime("%H:%M")


def test_minute_labels_and_folding() -> None:
    assert _lab(RB, 9, 0, 30) == "09:00"
    assert _lab(RB, 8, 59) == "09:00"  # auction folds into the first bar
    assert _lab(RB, 20, 59) == "21:00"
    assert _lab(RB, 10, 15, 0) == "10:14"  # closing snapshot
    assert _lab(RB, 10, 16) is None
    assert _lab(STOCK, 9, 20) == "09:30"
    assert _lab(IF, 9, 29) == "09:30"


@pytest.mark.parametrize(
    "freq,hhmm,label,end",
    [
        ("5min", (10, 12), "10:10", "10:15"), ("15min", (10, 14), "10:00", "10:15"),
        ("30min", (10, 14), "10:00", "10:15"), ("30min", (10, 31), "10:30", "11:00"),
        ("60min", (10, 5), "10:00", "10:15"), ("60min", (10, 45), "10:30", "11:00"),
        ("60min", (11, 20), "11:00", "11:30"), ("60min", (13, 40), "13:30", "14:00"),
        ("30min", (13, 40), "13:30", "14:00"), ("60min", (14, 59), "14:00", "15:00"),
        ("60min", (22, 59), "22:00", "23:00"),
    ],
)
def test_n_minute_bars_do_not_span_breaks(freq, hhmm, label, end) -> None:  # type: ignore[no-untyped-def]
    lab = bar_label(RB, at(MON, *hhmm), freq)
    assert lab is not None and from_ms(lab).strftime("%H:%M") == label
    assert from_ms(bar_end(RB, lab, freq)).strftime("%H:%M") == end


def test_close_times() -> None:
    assert bar_close_time(RB, at(MON, 9, 0), "1min") == at(MON, 9, 1)
    assert bar_close_time(RB, at(MON, 10, 14), "1min") == at(MON, 10, 15, 1)  # segment end + grace
    assert bar_close_time(RB, at(MON, 10, 10), "5min") == at(MON, 10, 15, 1)
    assert bar_close_time(RB, at(MON, 10, 0), "30min") == at(MON, 10, 15, 1)
    assert bar_close_time(RB, at(MON, 9, 0), "5min") == at(MON, 9, 5)
    assert bar_close_time(CU, at((2025, 3, 4), 0, 0), "60min") == at((2025, 3, 4), 1, 0, 1)
    assert bar_close_time(AU, at((2025, 3, 4), 2, 0), "60min") == at((2025, 3, 4), 2, 30, 1)
    assert bar_close_time(CU, at(MON, 23, 0), "60min") == at((2025, 3, 4), 0, 0)  # midnight is not a break
    assert bar_close_time(T, at(MON, 0, 0), "1day") == at(MON, 15, 15, 1)
    assert bar_close_time(STOCK, at(MON, 11, 29), "1min") == at(MON, 11, 30, 1)
    assert bar_label(RB, at(FRI, 21, 5), "1day") == at((2025, 3, 10), 0, 0)
