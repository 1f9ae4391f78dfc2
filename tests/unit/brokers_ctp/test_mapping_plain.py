"""Mapping rules that need no vn.py (duck-typed ticks); the real TickData is in test_vnpy_mapping.py."""
from __future__ import annotations

import datetime as dt
import enum
import sys
from types import SimpleNamespace

import pytest

from brokers.ctp.mapping import UnsupportedTick, clean_price, tick_from_vnpy
from qamarket.sessions import ms_of

DBL_MAX = sys.float_info.max


@pytest.mark.parametrize("raw, want", [(DBL_MAX, 0.0), (float("inf"), 0.0), (float("nan"), 0.0), (1e301, 0.0),
                                       (-DBL_MAX, 0.0), (None, 0.0), (3925.0, 3925.0), (0, 0.0), (7, 7.0)])
def test_clean_price(raw: object, want: float) -> None:
    assert clean_price(raw) == want


class LocalisedExchange(enum.Enum):  # values as a localised display would show them
    SHFE = "上海期货交易所"
    LSE = "London"


def _tick(**kw: object) -> SimpleNamespace:
    base = dict(symbol="rb2512", exchange=LocalisedExchange.SHFE, gateway_name="CTP",
                datetime=dt.datetime(2025, 3, 3, 9, 0, 0, 500_000))
    base.update(kw)
    fields = {f: 0.0 for f in ("last_price", "volume", "turnover", "open_interest", "last_volume", "open_price",
                              "high_price", "low_price", "pre_close", "limit_up", "limit_down")}
    fields.update({f"{s}_{k}_{i}": 0.0 for s in ("bid", "ask") for k in ("price", "volume") for i in range(1, 6)})
    fields.update(base)
    return SimpleNamespace(**fields)


def test_exchange_by_name_not_value_and_naive_time_is_local() -> None:
    t = tick_from_vnpy(_tick(), seq=7)
    assert t.exchange == "SHFE" and t.datetime == ms_of(2025, 3, 3, 9, 0, 0, 500) == 1740992400500
    assert t.seq == 7 and t.source == "CTP"


def test_unknown_exchange_and_missing_datetime_are_unsupported() -> None:
    with pytest.raises(UnsupportedTick, match="LSE"):
        tick_from_vnpy(_tick(exchange=LocalisedExchange.LSE))
    with pytest.raises(UnsupportedTick, match="datetime"):
        tick_from_vnpy(_tick(datetime=None))
