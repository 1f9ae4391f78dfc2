"""Builders shared by the qarisk unit tests (no I/O)."""
from __future__ import annotations

import itertools
from typing import Any

from qaaccount.account import Bucket, Position
from qaaccount.instruments import Instruments, future, stock
from qamarket.models import Tick
from qamarket.sessions import ms_of
from qaorder.models import Direction, Exchange, Offset, Order, PriceType
from qarisk import AccountSnapshot, MarketSnapshot, RiskConfig, RiskEngine

RB = future("rb2510", "SHFE", multiplier=10, price_tick=1, margin_rate=0.1, open_ratio=0.0001, close_today_ratio=0.0002)
IF = future("IF2509", "CFFEX", multiplier=300, price_tick=0.2, margin_rate=0.12, open_per_lot=2.0)
AU = future("au2512", "SHFE", multiplier=1000, price_tick=0.02, margin_rate=0.08)
DCE_M = future("m2509", "DCE", multiplier=10, price_tick=1, margin_rate=0.1, open_per_lot=1.5, close_per_lot=1.5)
PF = stock("600000", "SSE")
INSTRUMENTS = Instruments([RB, IF, AU, DCE_M, PF])

#: Monday 2025-03-03 10:00:00 local: day session of futures and stocks
T0 = ms_of(2025, 3, 3, 10, 0, 0)

_ids = itertools.count(1)


def order(symbol: str = "rb2510", exchange: str = "SHFE", direction: str = "BUY", offset: str = "OPEN",
          price: float | None = 3500.0, volume: int = 1, account: str = "acc", price_type: str = "LIMIT",
          order_id: str | None = None) -> Order:
    return Order(order_id=order_id or f"o{next(_ids)}", account=account, symbol=symbol, exchange=Exchange(exchange),
                 direction=Direction(direction), offset=Offset(offset), price_type=PriceType(price_type), price=price,
                 volume=volume)


def raw_order(**kw: Any) -> Order:
    """An order built with plain strings for the enums (as a careless caller might)."""
    base: dict[str, Any] = dict(order_id=f"r{next(_ids)}", account="acc", symbol="rb2510", exchange="SHFE",
                                direction="BUY", offset="OPEN", price_type="LIMIT", price=3500.0, volume=1)
    base.update(kw)
    return Order(**base)


def tick(symbol: str = "rb2510", exchange: str = "SHFE", last: float = 3500.0, up: float = 3675.0,
         down: float = 3325.0) -> Tick:
    return Tick(symbol=symbol, exchange=exchange, datetime=T0, last_price=last, limit_up=up, limit_down=down)  # type: ignore[arg-type]


def market(**quotes: Tick) -> MarketSnapshot:
    q = {"SHFE.rb2510": tick(), "CFFEX.IF2509": tick("IF2509", "CFFEX", 4000.0, 4400.0, 3600.0),
         "SHFE.au2512": tick("au2512", "SHFE", 600.0, 660.0, 540.0),
         "DCE.m2509": tick("m2509", "DCE", 3000.0, 3300.0, 2700.0),
         "SSE.600000": tick("600000", "SSE", 10.0, 11.0, 9.0)}
    q.update(quotes)
    return MarketSnapshot(instruments=INSTRUMENTS, quotes=q)


def position(inst: Any, lt: int = 0, lh: int = 0, st: int = 0, sh: int = 0, *, lt_f: int = 0, lh_f: int = 0,
             st_f: int = 0, sh_f: int = 0) -> Position:
    return Position(inst, long_today=Bucket(lt, lt_f), long_his=Bucket(lh, lh_f), short_today=Bucket(st, st_f),
                    short_his=Bucket(sh, sh_f))


def account(available: float = 1e9, *positions: Position, long_value: float = 0.0, short_value: float = 0.0,
            gross_lots: int | None = None) -> AccountSnapshot:
    pos = {p.key: p for p in positions}
    if gross_lots is None:
        gross_lots = sum(p.volume_long + p.volume_short for p in positions)
    return AccountSnapshot(available=available, positions=pos, long_value=long_value, short_value=short_value,
                           gross_lots=gross_lots)


def only(rule: str, **limits: Any) -> RiskConfig:
    """A config with only ``rule`` enabled, with ``limits`` for it."""
    d: dict[str, Any] = {r: {"enabled": False} for r in
                         ("state", "session", "volume", "price", "position", "funds", "exposure", "flow")}
    d[rule] = {"enabled": True, **limits}
    return RiskConfig.from_dict(d)


def engine(cfg: RiskConfig, account_name: str = "acc") -> RiskEngine:
    return RiskEngine({account_name: cfg})
