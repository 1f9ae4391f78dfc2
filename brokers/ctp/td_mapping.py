"""Our orders <-> vn.py trading objects, pure (no vn.py import: enums are handled by ``.name``).

Decisions (see docs/brokers.md, "CTP executor"):

* **Exchanges**: CTP serves SHFE, INE, DCE, CZCE, CFFEX, GFEX; anything else is rejected.
* **Price types**: LIMIT -> ``LIMIT``; FAK -> ``FAK``; FOK -> ``FOK``. MARKET *with* a
  protective price -> ``FAK`` at that price everywhere (Chinese exchanges treat market orders
  as immediate-or-cancel, so an IOC limit at the protective price is the faithful order).
  MARKET *without* a price -> vn.py ``MARKET`` (CTP ``AnyPrice``) on DCE, CZCE and GFEX; on
  SHFE, INE and CFFEX (which refuse market orders) it is **rejected**: the executor does not
  subscribe to market data and so does not know the limit-up/limit-down price it would need.
* **SHFE/INE CLOSE split**: an Order with offset CLOSE is split using the last position
  snapshot (vn.py ``PositionData``: ``volume``, ``yd_volume``) of the side it closes, minus
  what our own working close legs already hold: **close-yesterday first** (FIFO, and the
  cheaper leg for most SHFE products), the rest close-today. Rejected when no snapshot of
  that position has arrived since login (the split would be a guess) or when the volume
  exceeds what is available. CLOSETODAY / CLOSEYESTERDAY are passed through as given.
  On other exchanges CLOSE is sent as CLOSE (the exchange closes yesterday's first).
* **Status** by the enum's ``.name`` (``Status.ALLTRADED`` -> ``ALLTRADED``).
* **Trade ids**: ``<order_id>-<EXCHANGE>-<vn.py tradeid stripped>`` (CTP pads TradeID with
  spaces; a TradeID is unique per exchange and trading day, and scoping it by our order id
  makes it unique forever and keeps the two sides of a self-trade apart).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from qaorder.models import Direction, Exchange, Offset, Order, OrderStatus, PriceType

CTP_EXCHANGES = frozenset({"SHFE", "INE", "DCE", "CZCE", "CFFEX", "GFEX"})
#: exchanges that refuse market orders (CTP THOST_FTDC_OPT_AnyPrice)
NO_MARKET_EXCHANGES = frozenset({"SHFE", "INE", "CFFEX"})
SPLIT_EXCHANGES = frozenset({"SHFE", "INE"})
SHANGHAI = ZoneInfo("Asia/Shanghai")

#: vn.py Status name -> ours (same names; SUBMITTING..REJECTED)
STATUS_BY_NAME = {s.name: s for s in OrderStatus}


class MappingRejected(ValueError):
    """An order that cannot be sent to CTP; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class LegSpec:
    """One vn.py ``OrderRequest`` to send, with enum *names* (turned into vn.py enums by td.py)."""

    symbol: str
    exchange: str       # vn.py Exchange name
    direction: str      # LONG | SHORT
    offset: str         # OPEN | CLOSE | CLOSETODAY | CLOSEYESTERDAY
    type: str           # LIMIT | MARKET | FAK | FOK
    price: float
    volume: int


@dataclass
class PositionSnap:
    """The last vn.py ``PositionData`` of one (exchange, symbol, LONG|SHORT)."""

    volume: int = 0
    yd_volume: int = 0
    frozen: int = 0

    @property
    def td_volume(self) -> int:
        return max(0, self.volume - self.yd_volume)


@dataclass
class PositionBook:
    """Positions as vn.py reports them, adjusted by our fills between two snapshots."""

    snaps: dict[tuple[str, str, str], PositionSnap] = field(default_factory=dict)

    def on_position(self, exchange: str, symbol: str, direction: str, volume: float, yd_volume: float,
                    frozen: float = 0) -> None:
        self.snaps[(exchange, symbol, direction)] = PositionSnap(int(volume), int(yd_volume), int(frozen))

    def on_fill(self, exchange: str, symbol: str, direction: str, offset: str, volume: int) -> None:
        """A fill since the last snapshot: OPEN adds to today's holding of ``direction``; a close
        reduces the *opposite* holding (a SELL CLOSE closes LONG)."""
        if offset == "OPEN":
            snap = self.snaps.get((exchange, symbol, direction))
            if snap is not None:
                snap.volume += volume
            return
        held = "SHORT" if direction == "LONG" else "LONG"
        snap = self.snaps.get((exchange, symbol, held))
        if snap is None:
            return
        if offset == "CLOSEYESTERDAY" or (offset == "CLOSE" and exchange not in SPLIT_EXCHANGES):
            take = min(volume, snap.yd_volume)
            snap.yd_volume -= take
            snap.volume -= volume
        else:
            snap.volume -= volume
        snap.volume = max(snap.volume, 0)
        snap.yd_volume = min(snap.yd_volume, snap.volume)

    def clear(self) -> None:
        self.snaps.clear()


def vn_direction(d: Direction) -> str:
    return "LONG" if d is Direction.BUY else "SHORT"


def order_type_and_price(order: Order) -> tuple[str, float]:
    ex = order.exchange.value
    if order.price_type is PriceType.MARKET:
        if order.price is not None:
            return "FAK", float(order.price)
        if ex in NO_MARKET_EXCHANGES:
            raise MappingRejected("price_type", f"{ex} does not accept market orders; send LIMIT/FAK/FOK, or MARKET "
                                                f"with a protective price (sent as FAK at that price)")
        return "MARKET", 0.0
    assert order.price is not None
    return order.price_type.value, float(order.price)


def legs_for(order: Order, positions: PositionBook,
             working_close: dict[tuple[str, str, str, str], int] | None = None) -> list[LegSpec]:
    """The vn.py requests for ``order`` (one, or two for a split SHFE/INE CLOSE).

    ``working_close[(exchange, symbol, held_direction, offset)]`` = volume our own working
    close legs still hold (not yet filled or cancelled), subtracted from what can be closed.
    """
    ex = order.exchange.value
    if ex not in CTP_EXCHANGES:
        raise MappingRejected("exchange", f"CTP trades {', '.join(sorted(CTP_EXCHANGES))}, not {ex}")
    vtype, price = order_type_and_price(order)
    direction = vn_direction(order.direction)

    def leg(offset: str, volume: int) -> LegSpec:
        return LegSpec(order.symbol, ex, direction, offset, vtype, price, volume)

    if order.offset is not Offset.CLOSE or ex not in SPLIT_EXCHANGES:
        return [leg(order.offset.value, order.volume)]
    held = "SHORT" if direction == "LONG" else "LONG"
    snap = positions.snaps.get((ex, order.symbol, held))
    if snap is None:
        raise MappingRejected("offset", f"CLOSE on {ex} needs a today/yesterday split, but no {held} position of "
                                        f"{ex}.{order.symbol} has been reported since login; send CLOSETODAY or "
                                        f"CLOSEYESTERDAY explicitly")
    w = working_close or {}
    yd = max(0, snap.yd_volume - w.get((ex, order.symbol, held, "CLOSEYESTERDAY"), 0))
    td = max(0, snap.td_volume - w.get((ex, order.symbol, held, "CLOSETODAY"), 0))
    if order.volume > yd + td:
        raise MappingRejected("volume", f"CLOSE {order.volume} of {ex}.{order.symbol} but only {yd} yesterday + {td} "
                                        f"today {held} available")
    legs: list[LegSpec] = []
    from_yd = min(order.volume, yd)
    if from_yd:
        legs.append(leg("CLOSEYESTERDAY", from_yd))
    if order.volume - from_yd:
        legs.append(leg("CLOSETODAY", order.volume - from_yd))
    return legs


# reports --------------------------------------------------------------------------------
def status_of(vn_status: Any) -> OrderStatus:
    name = getattr(vn_status, "name", vn_status)
    try:
        return STATUS_BY_NAME[str(name)]
    except KeyError:
        raise ValueError(f"unknown vn.py order status {vn_status!r}") from None


def direction_of(vn_direction: Any) -> Direction:
    name = getattr(vn_direction, "name", vn_direction)
    if name == "LONG":
        return Direction.BUY
    if name == "SHORT":
        return Direction.SELL
    raise ValueError(f"vn.py direction {vn_direction!r} is neither LONG nor SHORT")


def offset_of(vn_offset: Any, default: Offset) -> Offset:
    name = getattr(vn_offset, "name", vn_offset)
    try:
        return Offset(str(name))
    except ValueError:
        return default   # Offset.NONE


def exchange_of(vn_exchange: Any) -> Exchange:
    return Exchange(str(getattr(vn_exchange, "name", vn_exchange)))


def trade_id(order_id: str, exchange: str, vn_tradeid: str) -> str:
    tid = f"{order_id}-{exchange}-{str(vn_tradeid).strip()}"
    if len(tid) <= 128 and " " not in tid:
        return tid
    digest = hashlib.sha1(tid.encode()).hexdigest()[:20]  # noqa: S324 - an id, not security
    return f"{order_id[:100]}-{digest}"


def utc_ns(dt: Any, default: int) -> int:
    """vn.py's ``datetime`` (aware, Asia/Shanghai from vnpy_ctp; naive taken as Shanghai) -> UTC ns."""
    if not isinstance(dt, datetime):
        return default
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=SHANGHAI)
    return int(dt.astimezone(timezone.utc).timestamp() * 1_000_000) * 1000


def parse_orderid(orderid: str) -> dict[str, Any]:
    """vnpy_ctp's ``orderid`` is ``<FrontID>_<SessionID>_<OrderRef>``; anything else -> {}."""
    parts = str(orderid).split("_")
    if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts[:2]):
        return {"front_id": int(parts[0]), "session_id": int(parts[1]), "order_ref": parts[2]}
    return {}
