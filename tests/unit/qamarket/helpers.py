"""Tick builders for the qamarket tests."""
from __future__ import annotations

from typing import Any

from qamarket.models import Tick
from qamarket.sessions import ms_of

# 2025-03-03 is a Monday; 2025-03-07 a Friday.
MON = (2025, 3, 3)
FRI = (2025, 3, 7)


def at(day: tuple[int, int, int], hh: int, mm: int, ss: int = 0, ms: int = 0) -> int:
    return ms_of(*day, hh, mm, ss, ms)


def tick(t: int, price: float = 3500.0, volume: float = 0.0, *, symbol: str = "rb2510", exchange: str = "SHFE",
         turnover: float | None = None, **kw: Any) -> Tick:
    return Tick(symbol=symbol, exchange=exchange, datetime=t, last_price=price, volume=volume,  # type: ignore[arg-type]
                turnover=volume * price * 10 if turnover is None else turnover, **kw)
