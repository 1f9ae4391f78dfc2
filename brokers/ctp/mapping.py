"""vn.py ``TickData`` -> :class:`qamarket.models.Tick`.

Duck-typed (reads attributes only), so it imports nothing of vn.py and is tested both
with real ``vnpy.trader.object.TickData`` objects and without vn.py.

* Exchange: by the enum's ``.name`` (``Exchange.SHFE.name == "SHFE"``), never ``.value``
  (vn.py's enum values are display strings, Chinese under a Chinese locale for most enums).
  An exchange QAFlow does not know raises :class:`UnsupportedTick`.
* Time: vnpy_ctp stamps ``datetime`` tz-aware ``Asia/Shanghai``; the Tick carries
  exchange-local epoch milliseconds (:func:`qamarket.sessions.to_ms`): an aware datetime is
  converted to UTC+8 first, a naive one is taken as exchange-local.
* Prices: CTP marks an unset price with DBL_MAX (1.797e308). vnpy_ctp zeroes most of them
  but not ``limit_up``/``limit_down``, and only when the value is exactly DBL_MAX; here every
  price that is not finite or is >= 1e300 becomes 0.0 (and so does a NaN volume).
* Not in vn.py's TickData, so left at the Tick default: ``pre_settlement`` (0.0) and
  ``trading_day`` ("": derived downstream from ``datetime`` and the session calendar).
* ``source`` = vn.py ``gateway_name``; ``seq`` = the caller's per-process sequence number.
"""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from qamarket.models import EXCHANGES, Tick
from qamarket.sessions import to_ms

#: prices at or above this are CTP's "unset" marker (DBL_MAX = 1.7976931348623157e308).
UNSET_THRESHOLD = 1e300

PRICE_FIELDS = (
    "last_price", "open_price", "high_price", "low_price", "pre_close", "limit_up", "limit_down",
    "bid_price_1", "bid_price_2", "bid_price_3", "bid_price_4", "bid_price_5",
    "ask_price_1", "ask_price_2", "ask_price_3", "ask_price_4", "ask_price_5",
)
VOLUME_FIELDS = (
    "volume", "turnover", "open_interest", "last_volume",
    "bid_volume_1", "bid_volume_2", "bid_volume_3", "bid_volume_4", "bid_volume_5",
    "ask_volume_1", "ask_volume_2", "ask_volume_3", "ask_volume_4", "ask_volume_5",
)
_KNOWN = frozenset(EXCHANGES)


class UnsupportedTick(ValueError):
    """A vn.py tick that cannot become a Tick (unknown exchange, no datetime); ``str()`` says why."""


def clean_price(value: Any) -> float:
    """CTP's unset marker (DBL_MAX, inf, NaN) -> 0.0; anything else as float."""
    v = float(value or 0.0)
    if not math.isfinite(v) or abs(v) >= UNSET_THRESHOLD:
        return 0.0
    return v


def clean_volume(value: Any) -> float:
    v = float(value or 0.0)
    return v if math.isfinite(v) and abs(v) < UNSET_THRESHOLD else 0.0


def enum_name(value: Any) -> str:
    """An enum member's ``.name``; a plain string as is (upper-cased)."""
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(value, str):
        return value.upper()
    raise UnsupportedTick(f"exchange {value!r} is neither an enum member nor a string")


def local_ms(dt: Any) -> int:
    """Exchange-local epoch ms of vn.py's ``datetime`` (aware: converted to UTC+8; naive: local)."""
    if not isinstance(dt, datetime):
        raise UnsupportedTick(f"tick datetime {dt!r} is not a datetime")
    return to_ms(dt)


def tick_from_vnpy(t: Any, *, seq: int = 0) -> Tick:
    """Map one vn.py ``TickData`` to a :class:`Tick` (raises :class:`UnsupportedTick`)."""
    exchange = enum_name(t.exchange)
    if exchange not in _KNOWN:
        raise UnsupportedTick(f"tick {t.symbol!r}: exchange {exchange!r} is not one of {', '.join(EXCHANGES)}")
    g = t.__getattribute__
    return Tick(
        symbol=t.symbol,
        exchange=exchange,  # type: ignore[arg-type]
        datetime=local_ms(t.datetime),
        last_price=clean_price(g("last_price")),
        volume=clean_volume(g("volume")),
        turnover=clean_volume(g("turnover")),
        open_interest=clean_volume(g("open_interest")),
        last_volume=clean_volume(g("last_volume")),
        open_price=clean_price(g("open_price")),
        high_price=clean_price(g("high_price")),
        low_price=clean_price(g("low_price")),
        pre_close=clean_price(g("pre_close")),
        limit_up=clean_price(g("limit_up")),
        limit_down=clean_price(g("limit_down")),
        bid_price_1=clean_price(g("bid_price_1")),
        bid_price_2=clean_price(g("bid_price_2")),
        bid_price_3=clean_price(g("bid_price_3")),
        bid_price_4=clean_price(g("bid_price_4")),
        bid_price_5=clean_price(g("bid_price_5")),
        ask_price_1=clean_price(g("ask_price_1")),
        ask_price_2=clean_price(g("ask_price_2")),
        ask_price_3=clean_price(g("ask_price_3")),
        ask_price_4=clean_price(g("ask_price_4")),
        ask_price_5=clean_price(g("ask_price_5")),
        bid_volume_1=clean_volume(g("bid_volume_1")),
        bid_volume_2=clean_volume(g("bid_volume_2")),
        bid_volume_3=clean_volume(g("bid_volume_3")),
        bid_volume_4=clean_volume(g("bid_volume_4")),
        bid_volume_5=clean_volume(g("bid_volume_5")),
        ask_volume_1=clean_volume(g("ask_volume_1")),
        ask_volume_2=clean_volume(g("ask_volume_2")),
        ask_volume_3=clean_volume(g("ask_volume_3")),
        ask_volume_4=clean_volume(g("ask_volume_4")),
        ask_volume_5=clean_volume(g("ask_volume_5")),
        source=str(getattr(t, "gateway_name", "") or ""),
        seq=seq,
    )
