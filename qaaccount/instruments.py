"""The instrument data the account needs: size, tick, lot, margin and fee table.

Deliberately minimal and independent of ``qamarket.models.InstrumentSpec`` (a richer,
market-side description written elsewhere); an adapter can build one from the other.

Fees (all in the account currency):

* futures: ``ratio * price * volume * multiplier + per_lot * volume`` with separate
  (ratio, per_lot) pairs for open, close (yesterday's positions) and close-today;
* stocks: commission ``max(commission_ratio * turnover, min_commission)`` per fill,
  plus ``transfer_fee_ratio * turnover`` (both sides), plus ``stamp_duty * turnover``
  on sells only. Lots of ``lot_size`` (100) to buy; odd lots only to sell; T+1.
"""
from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from qaorder.models import STOCK_EXCHANGES, Exchange, position_key

__all__ = ["ProductClass", "FeeKind", "Instrument", "Instruments", "UnknownInstrument", "future", "stock",
           "product_root", "round_down_to_lot"]


class ProductClass(str, enum.Enum):
    FUTURE = "FUTURE"
    STOCK = "STOCK"


class FeeKind(str, enum.Enum):
    OPEN = "OPEN"
    CLOSE = "CLOSE"              # closing yesterday's (or, for stocks, any) position
    CLOSETODAY = "CLOSETODAY"    # closing a position opened today


class UnknownInstrument(KeyError):
    pass


_ROOT = re.compile(r"^([A-Za-z]+)")


def product_root(symbol: str) -> str:
    """``rb2510 -> rb``, ``IF2509 -> IF``, ``600000 -> 600000``."""
    m = _ROOT.match(symbol)
    return m.group(1) if m else symbol


def round_down_to_lot(volume: float, lot_size: int) -> int:
    """Largest multiple of ``lot_size`` not above ``volume`` (never negative)."""
    if lot_size <= 0:
        raise ValueError("lot_size must be > 0")
    if not math.isfinite(volume) or volume <= 0:
        return 0
    # guard against 2.9999999996 from ratio arithmetic
    lots = math.floor(volume / lot_size + 1e-9)
    return max(lots, 0) * lot_size


@dataclass(frozen=True)
class Instrument:
    symbol: str
    exchange: Exchange
    product_class: ProductClass
    multiplier: float = 1.0
    price_tick: float = 0.01
    lot_size: int = 1
    margin_rate: float = 1.0
    # futures fee table
    open_ratio: float = 0.0
    open_per_lot: float = 0.0
    close_ratio: float = 0.0
    close_per_lot: float = 0.0
    close_today_ratio: float = 0.0
    close_today_per_lot: float = 0.0
    # stock fees
    commission_ratio: float = 0.0
    min_commission: float = 0.0
    stamp_duty: float = 0.0
    transfer_fee_ratio: float = 0.0
    t_plus: int = 0

    def __post_init__(self) -> None:
        if self.multiplier <= 0 or self.price_tick <= 0 or self.lot_size <= 0:
            raise ValueError(f"{self.key}: multiplier, price_tick and lot_size must be > 0")
        if not 0 < self.margin_rate <= 1:
            raise ValueError(f"{self.key}: margin_rate must be in (0, 1]")

    @property
    def key(self) -> str:
        return position_key(self.exchange, self.symbol)

    @property
    def product(self) -> str:
        return product_root(self.symbol)

    @property
    def is_stock(self) -> bool:
        return self.product_class is ProductClass.STOCK

    def turnover(self, price: float, volume: int) -> float:
        return price * volume * self.multiplier

    def margin(self, price: float, volume: int) -> float:
        return self.turnover(price, volume) * self.margin_rate

    def fee(self, kind: FeeKind, price: float, volume: int, *, sell: bool = False) -> float:
        """Fee of one fill of ``volume`` at ``price``."""
        if volume <= 0:
            return 0.0
        t = self.turnover(price, volume)
        if self.is_stock:
            commission = max(self.commission_ratio * t, self.min_commission)
            return commission + self.transfer_fee_ratio * t + (self.stamp_duty * t if sell else 0.0)
        if kind is FeeKind.OPEN:
            return self.open_ratio * t + self.open_per_lot * volume
        if kind is FeeKind.CLOSETODAY:
            return self.close_today_ratio * t + self.close_today_per_lot * volume
        return self.close_ratio * t + self.close_per_lot * volume

    def round_price(self, price: float) -> float:
        ticks = round(price / self.price_tick)
        return round(ticks * self.price_tick, 10)


def future(symbol: str, exchange: Exchange | str, *, multiplier: float, price_tick: float, margin_rate: float,
           open_ratio: float = 0.0, open_per_lot: float = 0.0, close_ratio: float | None = None,
           close_per_lot: float | None = None, close_today_ratio: float | None = None,
           close_today_per_lot: float | None = None, lot_size: int = 1) -> Instrument:
    """A futures contract. Close fees default to the open fees when not given."""
    return Instrument(symbol=symbol, exchange=Exchange(exchange), product_class=ProductClass.FUTURE,
                      multiplier=multiplier, price_tick=price_tick, lot_size=lot_size, margin_rate=margin_rate,
                      open_ratio=open_ratio, open_per_lot=open_per_lot,
                      close_ratio=open_ratio if close_ratio is None else close_ratio,
                      close_per_lot=open_per_lot if close_per_lot is None else close_per_lot,
                      close_today_ratio=(open_ratio if close_ratio is None else close_ratio) if close_today_ratio is None else close_today_ratio,
                      close_today_per_lot=(open_per_lot if close_per_lot is None else close_per_lot) if close_today_per_lot is None else close_today_per_lot)


def stock(symbol: str, exchange: Exchange | str, *, commission_ratio: float = 0.00025, min_commission: float = 5.0,
          stamp_duty: float = 0.0005, transfer_fee_ratio: float = 0.00001, lot_size: int = 100,
          price_tick: float = 0.01) -> Instrument:
    """An A-share: 100-share lots, T+1, min commission 5 CNY, stamp duty 0.05% on sells."""
    ex = Exchange(exchange)
    if ex not in STOCK_EXCHANGES:
        raise ValueError(f"{ex.value} is not a stock exchange")
    return Instrument(symbol=symbol, exchange=ex, product_class=ProductClass.STOCK, multiplier=1.0,
                      price_tick=price_tick, lot_size=lot_size, margin_rate=1.0,
                      commission_ratio=commission_ratio, min_commission=min_commission, stamp_duty=stamp_duty,
                      transfer_fee_ratio=transfer_fee_ratio, t_plus=1)


class Instruments(Mapping[str, Instrument]):
    """Instruments by ``"EXCHANGE.symbol"``; a missing one raises :class:`UnknownInstrument`."""

    def __init__(self, items: Iterable[Instrument] = ()) -> None:
        self._by_key: dict[str, Instrument] = {}
        for i in items:
            self.add(i)

    def add(self, inst: Instrument) -> None:
        self._by_key[inst.key] = inst

    def __getitem__(self, key: str) -> Instrument:
        try:
            return self._by_key[key]
        except KeyError:
            raise UnknownInstrument(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def of(self, exchange: Exchange | str, symbol: str) -> Instrument:
        return self[position_key(exchange, symbol)]
