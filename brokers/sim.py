"""Paper-trading matching engine (the ``sim`` executor's brain). Pure: no I/O.

Matching against the best level of live quotes (:class:`Quote`, made from a
:class:`qamarket.models.Tick`):

* BUY fills when ``ask_price_1 > 0``, ``ask_volume_1 > 0`` and ``ask_price_1 <= price``,
  at the ask; SELL when ``bid_price_1 >= price``, at the bid. A fill takes at most the
  volume quoted at that level (partial fills); orders of one instrument matched on the
  same quote share that volume in arrival order.
* A fill price is never outside ``[limit_down, limit_up]`` (when the quote carries them);
  an order whose limit price is outside the band is REJECTED with the reason.
* MARKET: the best opposite price, once (immediate-or-cancel, as Chinese exchanges treat
  market orders): what the level cannot fill is CANCELLED. A protective ``price`` given
  with a MARKET order is honoured as a limit.
* FAK: match once at the limit, cancel the rest. FOK: fill all at once or cancel all.
  An IOC order (MARKET/FAK/FOK) that arrives before any quote of its instrument waits
  for the first quote, is matched once, then finished.
* Cancel: a working order is CANCELLED (fills so far stay); a cancel of an unknown or
  finished order changes nothing and is answered with a :class:`Reject`.

Every event is a message with a *deterministic* id: trade ``<order_id>-<n>`` (n = fill
number, from 1; the Trade's message id is the trade id), status report
``<order_id>.r<n>``. Re-publishing an event after a crash therefore repeats the same
ids, which consumers de-duplicate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qaorder.models import (
    Cancel, Direction, Order, OrderStatus, OrderStatusReport, PriceType, Reject, Trade,
)
from qapubsub.messages import Message

__all__ = ["Quote", "SimOrder", "Fill", "SimBook", "crossing", "trade_id"]

IOC_TYPES = frozenset({PriceType.MARKET, PriceType.FAK, PriceType.FOK})


@dataclass(frozen=True)
class Quote:
    """The best level of one instrument."""

    exchange: str
    symbol: str
    bid: float = 0.0
    bid_volume: float = 0.0
    ask: float = 0.0
    ask_volume: float = 0.0
    limit_up: float = 0.0
    limit_down: float = 0.0
    last: float = 0.0

    @classmethod
    def from_tick(cls, t: Any) -> Quote:
        return cls(t.exchange, t.symbol, t.bid_price_1, t.bid_volume_1, t.ask_price_1, t.ask_volume_1,
                   t.limit_up, t.limit_down, t.last_price)

    @property
    def key(self) -> str:
        return f"{self.exchange}.{self.symbol}"

    def in_band(self, price: float) -> bool:
        if self.limit_up > 0 and price > self.limit_up + 1e-9:
            return False
        if self.limit_down > 0 and price < self.limit_down - 1e-9:
            return False
        return True


def trade_id(order_id: str, n: int) -> str:
    return f"{order_id}-{n}"


@dataclass(frozen=True)
class Fill:
    price: float
    volume: int


def crossing(direction: Direction, limit: float | None, q: Quote) -> tuple[float, int] | None:
    """(price, volume available) at which an order of ``direction``/``limit`` trades on ``q``, or None."""
    if direction is Direction.BUY:
        px, vol = q.ask, q.ask_volume
        ok = px > 0 and (limit is None or px <= limit + 1e-9)
    else:
        px, vol = q.bid, q.bid_volume
        ok = px > 0 and (limit is None or px >= limit - 1e-9)
    if not ok or vol < 1 or not q.in_band(px):
        return None
    return px, int(vol)


@dataclass
class SimOrder:
    """The executor's record of one order (persisted as a document)."""

    order: Order
    status: OrderStatus = OrderStatus.NOTTRADED
    traded: int = 0
    fills: int = 0          # fill counter: the next trade id is <order_id>-<fills + 1>
    reports: int = 0        # status-report counter (report message ids)
    cost: float = 0.0       # sum(price * volume) of the fills
    reason: str = ""

    @property
    def left(self) -> int:
        return self.order.volume - self.traded

    @property
    def avg_price(self) -> float:
        return self.cost / self.traded if self.traded else 0.0

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def key(self) -> str:
        return self.order.key

    def to_doc(self) -> dict[str, Any]:
        return {"order": msgspec.to_builtins(self.order), "status": self.status.value, "traded": self.traded,
                "fills": self.fills, "reports": self.reports, "cost": self.cost, "reason": self.reason}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> SimOrder:
        return cls(order=msgspec.convert(d["order"], Order), status=OrderStatus(d["status"]),
                   traded=int(d["traded"]), fills=int(d["fills"]), reports=int(d["reports"]),
                   cost=float(d["cost"]), reason=str(d.get("reason", "")))


@dataclass
class SimBook:
    """One account's working orders and the last quote per instrument. Each method returns
    the events (messages) to publish, in order; the caller persists, then publishes them."""

    account: str
    orders: dict[str, SimOrder] = field(default_factory=dict)   # every order seen (working and finished)
    quotes: dict[str, Quote] = field(default_factory=dict)
    clock: Any = time.time_ns

    # -- events ----------------------------------------------------------------------
    def _report(self, so: SimOrder, status: OrderStatus, reason: str = "") -> OrderStatusReport:
        so.status = status
        if reason:
            so.reason = reason
        so.reports += 1
        o = so.order
        return OrderStatusReport(id=f"{o.order_id}.r{so.reports}", ts=self.clock(), order_id=o.order_id,
                                 account=o.account, status=status, traded=so.traded,
                                 avg_price=so.avg_price, volume=o.volume, reason=reason[:512],
                                 symbol=o.symbol, exchange=o.exchange)

    def _fill(self, so: SimOrder, price: float, volume: int) -> list[Message]:
        so.fills += 1
        so.traded += volume
        so.cost += price * volume
        o = so.order
        tid = trade_id(o.order_id, so.fills)
        now = self.clock()
        trade = Trade(id=tid, ts=now, trade_id=tid, order_id=o.order_id, account=o.account, symbol=o.symbol,
                      exchange=o.exchange, direction=o.direction, offset=o.offset, price=price, volume=volume,
                      trade_time=now)
        status = OrderStatus.ALLTRADED if so.left == 0 else OrderStatus.PARTTRADED
        return [trade, self._report(so, status)]

    # -- commands --------------------------------------------------------------------
    def place(self, order: Order) -> list[Message]:
        """A new order. A repeated order id returns no events (never placed twice)."""
        if order.order_id in self.orders:
            return []
        so = SimOrder(order, status=OrderStatus.SUBMITTING)
        self.orders[order.order_id] = so
        if order.account != self.account:
            return [self._report(so, OrderStatus.REJECTED, f"account {order.account!r} is not served by this executor "
                                                           f"({self.account!r})")]
        q = self.quotes.get(order.key)
        if q is not None:
            reason = self._impossible(order, q)
            if reason:
                return [self._report(so, OrderStatus.REJECTED, reason)]
        events: list[Message] = [self._report(so, OrderStatus.NOTTRADED)]
        if q is not None:
            events += self._match(so, q, {})
        return events

    def cancel(self, cancel: Cancel) -> list[Message]:
        so = self.orders.get(cancel.order_id)
        if so is None or so.order.account != cancel.account:
            return [Reject(id=f"{cancel.id}.reject", account=cancel.account, field="order_id",
                           reason=f"unknown order {cancel.order_id}", order_id=cancel.order_id)]
        if so.is_terminal:
            return [Reject(id=f"{cancel.id}.reject", account=cancel.account, field="order_id",
                           reason=f"order {cancel.order_id} is already {so.status.value}", order_id=cancel.order_id)]
        return [self._report(so, OrderStatus.CANCELLED, cancel.reason or "cancelled on request")]

    def on_quote(self, q: Quote) -> list[Message]:
        """A new best level: match every working order of that instrument, in arrival order."""
        self.quotes[q.key] = q
        used: dict[str, int] = {}
        events: list[Message] = []
        for so in list(self.orders.values()):
            if so.is_terminal or so.key != q.key:
                continue
            reason = self._impossible(so.order, q) if so.traded == 0 else ""
            if reason:
                events.append(self._report(so, OrderStatus.REJECTED, reason))
                continue
            events += self._match(so, q, used)
        return events

    def working(self) -> list[SimOrder]:
        return [so for so in self.orders.values() if not so.is_terminal]

    # -- matching ----------------------------------------------------------------------
    @staticmethod
    def _impossible(order: Order, q: Quote) -> str:
        if order.price is not None and not q.in_band(order.price):
            return (f"price {order.price} is outside the limit band [{q.limit_down}, {q.limit_up}] of "
                    f"{order.exchange.value}.{order.symbol}")
        if order.price_type is PriceType.MARKET:
            opp = q.ask if order.direction is Direction.BUY else q.bid
            if opp <= 0:
                return f"MARKET order but no {'ask' if order.direction is Direction.BUY else 'bid'} quoted"
        return ""

    def _match(self, so: SimOrder, q: Quote, used: dict[str, int]) -> list[Message]:
        o = so.order
        side = "ask" if o.direction is Direction.BUY else "bid"
        hit = crossing(o.direction, o.price, q)
        events: list[Message] = []
        if hit is not None:
            price, avail = hit
            avail -= used.get(side, 0)
            if o.price_type is PriceType.FOK and avail < so.left:
                return [self._report(so, OrderStatus.CANCELLED,
                                     f"FOK: only {max(avail, 0)} of {so.left} available at {price}")]
            vol = min(so.left, avail)
            if vol > 0:
                used[side] = used.get(side, 0) + vol
                events += self._fill(so, price, vol)
        if o.price_type in IOC_TYPES and not so.is_terminal:
            events.append(self._report(so, OrderStatus.CANCELLED,
                                       f"{o.price_type.value}: {so.left} not filled immediately"))
        return events
