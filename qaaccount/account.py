"""A QIFI-compatible account: cash, margin, fees, positions, freezes, settlement. Pure.

Ledger (DIFF/QIFI definitions)::

    static_balance = pre_balance + deposit - withdraw
    balance        = static_balance + close_profit - commission - premium + position_profit
    available      = balance - margin - frozen_margin - frozen_commission - frozen_premium
    risk_ratio     = 1 - available / balance

Positions are kept in four buckets per instrument (long/short x today/his). Each bucket
holds its volume, its frozen volume (by working close orders), its *position cost*
(``sum(price * volume * multiplier)`` at the price it is marked from: the fill price for
today's, the last settlement price for yesterday's) and its open cost. Hence, mark-to-
market by date as Chinese futures brokers do:

* ``position_profit = sign * (last_price * volume * multiplier - position_cost)``
* ``close_profit`` of a close = ``sign * (price * v * multiplier - position_cost share)``
* ``margin = position_cost * margin_rate`` (stocks: margin rate 1, i.e. cash paid)
* settlement marks everything at the settlement price, rolls today into his, and makes
  ``pre_balance`` the day's closing balance.

Orders: :meth:`Account.on_order` freezes margin + commission (opens) or position volume
(closes) and raises :class:`InsufficientFunds` / :class:`InsufficientPosition` /
:class:`InvalidOrder` without changing anything. :meth:`Account.on_cancel` (also for
rejects and expiries) releases what is left -- including the frozen volume of a
cancelled close, which QIFIAccount never released. :meth:`Account.on_trade` converts the
freeze into a position/fee, idempotently by ``trade_id``. Frozen totals are computed
from the working-order records, never kept as running sums, so they return to exactly 0
when nothing is working.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qaaccount.instruments import FeeKind, Instrument, Instruments, UnknownInstrument
from qaorder.models import (
    SPLIT_TODAY_EXCHANGES, Direction, Exchange, Offset, Order, PriceType, Trade, position_key,
)

__all__ = ["AccountError", "InsufficientFunds", "InsufficientPosition", "InvalidOrder", "UnknownOrderError",
           "Bucket", "Position", "Account"]

BUCKETS = ("long_today", "long_his", "short_today", "short_his")


class AccountError(ValueError):
    """The account refused an operation; nothing was changed."""


class InsufficientFunds(AccountError):
    pass


class InsufficientPosition(AccountError):
    pass


class InvalidOrder(AccountError):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class UnknownOrderError(AccountError):
    pass


@dataclass
class Bucket:
    volume: int = 0
    frozen: int = 0
    position_cost: float = 0.0
    open_cost: float = 0.0

    @property
    def free(self) -> int:
        return self.volume - self.frozen

    def add(self, volume: int, cost: float) -> None:
        self.volume += volume
        self.position_cost += cost
        self.open_cost += cost

    def remove(self, volume: int) -> tuple[float, float]:
        """Take ``volume`` out at average cost; returns (position_cost, open_cost) removed."""
        assert 0 < volume <= self.volume
        if volume == self.volume:
            pc, oc = self.position_cost, self.open_cost
            self.volume, self.position_cost, self.open_cost = 0, 0.0, 0.0
            return pc, oc
        pc = self.position_cost * volume / self.volume
        oc = self.open_cost * volume / self.volume
        self.volume -= volume
        self.position_cost -= pc
        self.open_cost -= oc
        return pc, oc


@dataclass
class Position:
    inst: Instrument
    long_today: Bucket = field(default_factory=Bucket)
    long_his: Bucket = field(default_factory=Bucket)
    short_today: Bucket = field(default_factory=Bucket)
    short_his: Bucket = field(default_factory=Bucket)
    last_price: float | None = None
    commission: float = 0.0

    # views used by qaorder.routing.plan_force_close (PositionView protocol)
    @property
    def exchange(self) -> str:
        return self.inst.exchange.value

    @property
    def symbol(self) -> str:
        return self.inst.symbol

    @property
    def key(self) -> str:
        return self.inst.key

    def bucket(self, name: str) -> Bucket:
        return getattr(self, name)  # type: ignore[no-any-return]

    @property
    def volume_long(self) -> int:
        return self.long_today.volume + self.long_his.volume

    @property
    def volume_short(self) -> int:
        return self.short_today.volume + self.short_his.volume

    @property
    def is_flat(self) -> bool:
        return all(self.bucket(b).volume == 0 for b in BUCKETS)

    def _pnl(self, names: tuple[str, ...], sign: int, attr: str) -> float:
        if self.last_price is None:
            return 0.0
        m = self.inst.multiplier
        return sum(sign * (self.last_price * self.bucket(n).volume * m - getattr(self.bucket(n), attr)) for n in names
                   if self.bucket(n).volume)

    @property
    def position_profit_long(self) -> float:
        return self._pnl(("long_today", "long_his"), 1, "position_cost")

    @property
    def position_profit_short(self) -> float:
        return self._pnl(("short_today", "short_his"), -1, "position_cost")

    @property
    def position_profit(self) -> float:
        return self.position_profit_long + self.position_profit_short

    @property
    def float_profit_long(self) -> float:
        return self._pnl(("long_today", "long_his"), 1, "open_cost")

    @property
    def float_profit_short(self) -> float:
        return self._pnl(("short_today", "short_his"), -1, "open_cost")

    @property
    def margin_long(self) -> float:
        return (self.long_today.position_cost + self.long_his.position_cost) * self.inst.margin_rate

    @property
    def margin_short(self) -> float:
        return (self.short_today.position_cost + self.short_his.position_cost) * self.inst.margin_rate

    @property
    def margin(self) -> float:
        return self.margin_long + self.margin_short

    def to_qifi(self, user_id: str) -> dict[str, Any]:
        m = self.inst.multiplier
        d: dict[str, Any] = {"user_id": user_id, "exchange_id": self.exchange, "instrument_id": self.symbol}
        for side in ("long", "short"):
            t, h = self.bucket(f"{side}_today"), self.bucket(f"{side}_his")
            vol = t.volume + h.volume
            oc, pc = t.open_cost + h.open_cost, t.position_cost + h.position_cost
            d.update({
                f"volume_{side}_today": t.volume, f"volume_{side}_his": h.volume, f"volume_{side}": vol,
                f"volume_{side}_frozen_today": t.frozen, f"volume_{side}_frozen_his": h.frozen,
                f"volume_{side}_frozen": t.frozen + h.frozen,
                f"open_price_{side}": oc / (vol * m) if vol else 0.0, f"open_cost_{side}": oc,
                f"position_price_{side}": pc / (vol * m) if vol else 0.0, f"position_cost_{side}": pc,
                # exact per-bucket costs, so that from_qifi restores the ledger to the cent
                f"open_cost_{side}_today": t.open_cost, f"open_cost_{side}_his": h.open_cost,
                f"position_cost_{side}_today": t.position_cost, f"position_cost_{side}_his": h.position_cost,
            })
        d.update({
            "last_price": self.last_price if self.last_price is not None else 0.0,
            "float_profit_long": self.float_profit_long, "float_profit_short": self.float_profit_short,
            "float_profit": self.float_profit_long + self.float_profit_short,
            "position_profit_long": self.position_profit_long, "position_profit_short": self.position_profit_short,
            "position_profit": self.position_profit,
            "margin_long": self.margin_long, "margin_short": self.margin_short, "margin": self.margin,
            "commission": self.commission,
        })
        return d


@dataclass
class _Working:
    """The freeze held by one accepted order."""

    order: Order
    left: int                       # volume still expected to fill against this freeze
    margin_per_lot: float = 0.0     # cash/margin frozen per unit (opens / stock buys)
    commission_per_lot: float = 0.0
    alloc: dict[str, int] = field(default_factory=dict)   # close: bucket -> frozen volume left
    filled: int = 0
    closed: bool = False            # cancelled/rejected: only fills already reported may still come


class Account:
    """One QIFI account. ``instruments`` must know every instrument traded."""

    def __init__(self, account_cookie: str, instruments: Instruments | Mapping[str, Instrument], *,
                 pre_balance: float = 0.0, trading_day: str = "") -> None:
        self.account_cookie = account_cookie
        self.instruments = instruments
        self.trading_day = trading_day
        self.pre_balance = float(pre_balance)
        self.deposit = 0.0
        self.withdraw = 0.0
        self.close_profit = 0.0
        self.commission = 0.0
        self.premium = 0.0
        self.positions: dict[str, Position] = {}
        self._working: dict[str, _Working] = {}
        self._orders: dict[str, dict[str, Any]] = {}     # today's orders, QIFI-shaped
        self._trades: dict[str, dict[str, Any]] = {}     # today's trades, QIFI-shaped
        self._trade_ids: set[str] = set()                # every trade id applied (kept across settlement)
        self._order_objs: dict[str, Order] = {}

    # ------------------------------------------------------------------ ledger
    @property
    def static_balance(self) -> float:
        return self.pre_balance + self.deposit - self.withdraw

    @property
    def position_profit(self) -> float:
        return sum(p.position_profit for p in self.positions.values())

    @property
    def float_profit(self) -> float:
        return sum(p.float_profit_long + p.float_profit_short for p in self.positions.values())

    @property
    def balance(self) -> float:
        return self.static_balance + self.close_profit - self.commission - self.premium + self.position_profit

    @property
    def margin(self) -> float:
        return sum(p.margin for p in self.positions.values())

    @property
    def frozen_margin(self) -> float:
        return sum(w.margin_per_lot * w.left for w in self._working.values())

    @property
    def frozen_commission(self) -> float:
        return sum(w.commission_per_lot * w.left for w in self._working.values())

    @property
    def frozen_premium(self) -> float:
        return 0.0

    @property
    def available(self) -> float:
        return self.balance - self.margin - self.frozen_margin - self.frozen_commission - self.frozen_premium

    @property
    def risk_ratio(self) -> float:
        b = self.balance
        return 1 - self.available / b if b else 0.0

    @property
    def working_order_ids(self) -> list[str]:
        return [oid for oid, w in self._working.items() if not w.closed]

    def working_orders(self) -> list[Order]:
        return [order for order, _left in self.working()]

    def working(self) -> list[tuple[Order, int]]:
        """Orders still working (not cancelled or rejected) with the lots still expected to fill."""
        return [(w.order, w.left) for w in self._working.values() if not w.closed]

    def position(self, exchange: str, symbol: str) -> Position | None:
        return self.positions.get(position_key(exchange, symbol))

    def __iter__(self) -> Iterator[Position]:
        return iter(self.positions.values())

    # ------------------------------------------------------------------ cash
    def deposit_cash(self, amount: float) -> None:
        if not math.isfinite(amount) or amount <= 0:
            raise AccountError(f"deposit must be > 0, got {amount!r}")
        self.deposit += amount

    def withdraw_cash(self, amount: float) -> None:
        if not math.isfinite(amount) or amount <= 0:
            raise AccountError(f"withdraw must be > 0, got {amount!r}")
        if amount > self.available + 1e-9:
            raise InsufficientFunds(f"{self.account_cookie}: withdraw {amount:.2f} > available {self.available:.2f}")
        self.withdraw += amount

    # ------------------------------------------------------------------ prices
    def on_price(self, exchange: str, symbol: str, price: float) -> None:
        """Mark-to-market one instrument (a tick's last price)."""
        if not math.isfinite(price) or price <= 0:
            return
        p = self.positions.get(position_key(exchange, symbol))
        if p is not None:
            p.last_price = price

    def mark(self, prices: Mapping[str, float]) -> None:
        for key, price in prices.items():
            ex, _, sym = key.partition(".")
            self.on_price(ex, sym, price)

    # ------------------------------------------------------------------ orders
    def _inst(self, order: Order | Trade) -> Instrument:
        try:
            return self.instruments[order.key]
        except (KeyError, UnknownInstrument):
            raise InvalidOrder("symbol", f"unknown instrument {order.key}") from None

    def _pos(self, inst: Instrument) -> Position:
        p = self.positions.get(inst.key)
        if p is None:
            p = self.positions[inst.key] = Position(inst)
        return p

    @staticmethod
    def _close_side(direction: Direction) -> str:
        return "long" if direction is Direction.SELL else "short"   # SELL closes longs

    def _close_plan(self, inst: Instrument, pos: Position, direction: Direction, offset: Offset, volume: int,
                    *, use_free: bool = True) -> dict[str, int]:
        """Which buckets a close of ``volume`` takes, or InsufficientPosition."""
        side = self._close_side(direction)
        today = pos.bucket(f"{side}_today")
        qty = (lambda b: b.free) if use_free else (lambda b: b.volume)
        if inst.is_stock:
            order = [f"{side}_his"]                  # T+1: only yesterday's shares can be sold
        elif offset is Offset.CLOSETODAY:
            order = [f"{side}_today"]
        elif offset is Offset.CLOSEYESTERDAY or inst.exchange in SPLIT_TODAY_EXCHANGES:
            order = [f"{side}_his"]                  # SHFE/INE: CLOSE means close yesterday's
        else:
            order = [f"{side}_his", f"{side}_today"]  # other exchanges close the oldest first
        plan: dict[str, int] = {}
        need = volume
        for name in order:
            take = min(need, qty(pos.bucket(name)))
            if take > 0:
                plan[name] = take
                need -= take
        if need > 0:
            avail = sum(qty(pos.bucket(n)) for n in order)
            hint = ""
            if inst.is_stock and today.volume:
                hint = f" ({today.volume} bought today are not sellable until the next trading day: T+1)"
            elif inst.exchange in SPLIT_TODAY_EXCHANGES and offset is not Offset.CLOSETODAY and today.free:
                hint = f" ({today.free} of today's need CLOSETODAY on {inst.exchange.value})"
            raise InsufficientPosition(
                f"{self.account_cookie}: {offset.value} {volume} {side} {inst.key}: only {avail} closable{hint}")
        return plan

    def on_order(self, order: Order) -> bool:
        """Accept ``order``: freeze funds or volume. False if this order id was seen before."""
        if order.order_id in self._orders:
            return False
        if order.account != self.account_cookie:
            raise InvalidOrder("account", f"{order.account!r} is not {self.account_cookie!r}")
        inst = self._inst(order)
        pos = self.positions.get(inst.key)
        price = order.price
        if price is None:
            price = pos.last_price if pos is not None else None
        if price is None:
            raise InvalidOrder("price", "a MARKET order without a price needs a known last price to freeze against")

        is_open = order.offset is Offset.OPEN
        if inst.is_stock:
            if order.direction is Direction.BUY and not is_open:
                raise InvalidOrder("offset", "a stock BUY must be OPEN")
            if order.direction is Direction.SELL and (is_open or order.offset is Offset.CLOSETODAY):
                raise InvalidOrder("offset", "a stock SELL must be CLOSE (no short selling; T+1 forbids CLOSETODAY)")

        work = _Working(order=order, left=order.volume)
        if is_open:
            if order.volume % inst.lot_size:
                raise InvalidOrder("volume", f"{order.volume} is not a multiple of the lot size {inst.lot_size}")
            margin = inst.margin(price, order.volume)
            fee = inst.fee(FeeKind.OPEN, price, order.volume)
            if margin + fee > self.available + 1e-9:
                raise InsufficientFunds(
                    f"{self.account_cookie}: {order.order_id} needs {margin + fee:.2f} "
                    f"(margin {margin:.2f} + fees {fee:.2f}), available {self.available:.2f}")
            work.margin_per_lot = margin / order.volume
            work.commission_per_lot = fee / order.volume
        else:
            if pos is None:
                raise InsufficientPosition(f"{self.account_cookie}: no position in {inst.key} to close")
            if inst.is_stock and order.volume % inst.lot_size:
                holding = pos.long_his.free
                if order.volume % inst.lot_size != holding % inst.lot_size:
                    raise InvalidOrder("volume", f"odd lots ({order.volume % inst.lot_size}) can only be sold to "
                                                 f"clear the odd part of the holding ({holding % inst.lot_size})")
            plan = self._close_plan(inst, pos, order.direction, order.offset, order.volume)
            fee = max(inst.fee(FeeKind.CLOSE, price, order.volume, sell=order.direction is Direction.SELL),
                      inst.fee(FeeKind.CLOSETODAY, price, order.volume, sell=order.direction is Direction.SELL))
            work.commission_per_lot = fee / order.volume
            for name, v in plan.items():
                pos.bucket(name).frozen += v
            work.alloc = plan
        self._working[order.order_id] = work
        self._order_objs[order.order_id] = order
        self._orders[order.order_id] = self._order_doc(order, work)
        return True

    def _release_volume(self, work: _Working) -> None:
        if not work.alloc:
            return
        pos = self.positions[work.order.key]
        for name, v in work.alloc.items():
            pos.bucket(name).frozen -= v
        work.alloc = {}

    def on_cancel(self, order_id: str, traded: int | None = None, *, reason: str = "CANCELLED") -> bool:
        """Release what ``order_id`` still holds (cancel, reject, expiry).

        ``traded`` is the executor's cumulative traded volume at the cancel, if it said so:
        the part traded but not yet applied stays reserved for the trades still to come.
        False if there was nothing to release (unknown, finished, or already released).
        """
        work = self._working.get(order_id)
        if work is None or work.closed:
            return False
        pending = max(0, (traded or 0) - work.filled) if traded is not None else 0
        pending = min(pending, work.left)
        if pending and work.alloc:
            # keep frozen volume only for the pending fills, taken from the buckets in plan order
            keep: dict[str, int] = {}
            need = pending
            for name, v in work.alloc.items():
                k = min(v, need)
                if k:
                    keep[name] = k
                    need -= k
            pos = self.positions[work.order.key]
            for name, v in work.alloc.items():
                pos.bucket(name).frozen -= v - keep.get(name, 0)
            work.alloc = keep
        elif not pending:
            self._release_volume(work)
        work.left = pending
        work.closed = True
        if pending == 0:
            del self._working[order_id]
        # else: the reservation for the pending fills stays counted in frozen_* until they arrive
        doc = self._orders.get(order_id)
        if doc is not None:
            doc.update(status="FINISHED", last_msg=reason, volume_left=0)
        return True

    on_reject = on_cancel

    # ------------------------------------------------------------------ trades
    def on_trade(self, trade: Trade) -> bool:
        """Apply one fill. False (and no change) if ``trade_id`` was applied before."""
        if trade.trade_id in self._trade_ids:
            return False
        if trade.account != self.account_cookie:
            raise AccountError(f"trade {trade.trade_id} is for {trade.account!r}, not {self.account_cookie!r}")
        order = self._order_objs.get(trade.order_id)
        if order is None:
            raise UnknownOrderError(f"trade {trade.trade_id}: order {trade.order_id} was never accepted by {self.account_cookie}")
        if (trade.key, trade.direction, trade.offset) != (order.key, order.direction, order.offset):
            raise AccountError(f"trade {trade.trade_id} does not match order {order.order_id} (instrument/direction/offset)")
        inst = self._inst(trade)
        work = self._working.get(trade.order_id)
        v = trade.volume
        if work is not None and v > work.left:
            if not work.closed:
                raise AccountError(f"trade {trade.trade_id}: {v} > {work.left} left on order {order.order_id}")
            # a cancelled order's late fill larger than its reservation: drop the reservation
            # and apply the fill against free volume/cash (a fill is a fact)
            self._release_volume(work)
            del self._working[trade.order_id]
            work = None
        pos = self._pos(inst)
        m = inst.multiplier
        sell = trade.direction is Direction.SELL

        if trade.offset is Offset.OPEN:
            side = "long" if trade.direction is Direction.BUY else "short"
            fee = trade.commission if trade.commission is not None else inst.fee(FeeKind.OPEN, trade.price, v)
            pos.bucket(f"{side}_today").add(v, trade.price * v * m)
        else:
            if work is not None and work.alloc:
                plan: dict[str, int] = {}
                need = v
                for name, fv in list(work.alloc.items()):
                    k = min(fv, need)
                    if k:
                        plan[name] = k
                        need -= k
                if need:
                    raise AccountError(f"trade {trade.trade_id}: frozen volume of {order.order_id} does not cover {v}")
                for name, k in plan.items():
                    pos.bucket(name).frozen -= k
                    work.alloc[name] -= k
                    if not work.alloc[name]:
                        del work.alloc[name]
            else:
                # late fill of an order whose freeze was already released: take free volume
                plan = self._close_plan(inst, pos, trade.direction, trade.offset, v)
            sign = 1 if self._close_side(trade.direction) == "long" else -1
            fee = 0.0
            for name, k in plan.items():
                pc, _oc = pos.bucket(name).remove(k)
                self.close_profit += sign * (trade.price * k * m - pc)
                if trade.commission is None and not inst.is_stock:
                    kind = FeeKind.CLOSETODAY if name.endswith("today") else FeeKind.CLOSE
                    fee += inst.fee(kind, trade.price, k)
            if trade.commission is not None:
                fee = trade.commission
            elif inst.is_stock:
                fee = inst.fee(FeeKind.CLOSE, trade.price, v, sell=sell)
        if pos.last_price is None:
            pos.last_price = trade.price
        pos.commission += fee
        self.commission += fee
        self._trade_ids.add(trade.trade_id)
        self._trades[trade.trade_id] = {
            "user_id": self.account_cookie, "order_id": trade.order_id, "trade_id": trade.trade_id,
            "exchange_id": trade.exchange.value, "instrument_id": trade.symbol, "direction": trade.direction.value,
            "offset": trade.offset.value, "price": trade.price, "volume": v, "commission": fee,
            "trade_date_time": trade.trade_time,
        }
        if work is not None:
            work.filled += v
            work.left -= v
            if work.left <= 0:
                self._release_volume(work)
                del self._working[trade.order_id]
        doc = self._orders.get(trade.order_id)
        if doc is not None and doc["status"] == "ALIVE":
            traded = sum(t["volume"] for t in self._trades.values() if t["order_id"] == trade.order_id)
            doc["volume_left"] = max(0, order.volume - traded)
            if doc["volume_left"] == 0:
                doc.update(status="FINISHED", last_msg="ALLTRADED")
        return True

    # ------------------------------------------------------------------ settlement
    def settle(self, settlement_prices: Mapping[str, float], next_trading_day: str = "") -> list[str]:
        """End of day: expire working orders, mark at settlement, roll today into his.

        ``settlement_prices`` by ``"EXCHANGE.symbol"``; a held instrument without one is an
        error (an account must not settle at a guessed price). Returns the expired order ids.
        """
        missing = [k for k, p in self.positions.items() if not p.is_flat and k not in settlement_prices
                   and p.last_price is None]
        if missing:
            raise AccountError(f"{self.account_cookie}: no settlement price for {', '.join(sorted(missing))}")
        expired = [oid for oid in list(self._working)]
        for oid in expired:
            w = self._working[oid]
            self._release_volume(w)
            del self._working[oid]
        for key, p in self.positions.items():
            if key in settlement_prices:
                price = float(settlement_prices[key])
                if not math.isfinite(price) or price <= 0:
                    raise AccountError(f"settlement price for {key} must be > 0")
                p.last_price = price
        self.pre_balance = self.balance
        self.deposit = self.withdraw = 0.0
        self.close_profit = self.commission = self.premium = 0.0
        for key in list(self.positions):
            p = self.positions[key]
            if p.is_flat:
                del self.positions[key]
                continue
            m = p.inst.multiplier
            assert p.last_price is not None
            for side in ("long", "short"):
                t, h = p.bucket(f"{side}_today"), p.bucket(f"{side}_his")
                h.volume += t.volume
                h.open_cost += t.open_cost
                h.position_cost = p.last_price * h.volume * m
                h.frozen = 0
                p.__setattr__(f"{side}_today", Bucket())
            p.commission = 0.0
        self._orders = {}
        self._trades = {}
        self._order_objs = {oid: o for oid, o in self._order_objs.items() if oid in self._working}
        if next_trading_day:
            self.trading_day = next_trading_day
        return [oid for oid in expired]

    # ------------------------------------------------------------------ QIFI
    def _order_doc(self, order: Order, work: _Working) -> dict[str, Any]:
        return {
            "account_cookie": self.account_cookie, "user_id": self.account_cookie, "order_id": order.order_id,
            "exchange_id": order.exchange.value, "instrument_id": order.symbol,
            "direction": order.direction.value, "offset": order.offset.value,
            "volume_orign": order.volume, "price_type": order.price_type.value,
            "limit_price": order.price if order.price is not None else 0.0, "volume_left": order.volume,
            "status": "ALIVE", "last_msg": "ALIVE", "insert_date_time": order.order_time or order.ts,
            "strategy_id": order.strategy_id,
        }

    def account_msg(self) -> dict[str, Any]:
        return {
            "user_id": self.account_cookie, "currency": "CNY", "pre_balance": self.pre_balance,
            "deposit": self.deposit, "withdraw": self.withdraw, "WithdrawQuota": max(self.available, 0.0),
            "close_profit": self.close_profit, "commission": self.commission, "premium": self.premium,
            "static_balance": self.static_balance, "position_profit": self.position_profit,
            "float_profit": self.float_profit, "balance": self.balance, "margin": self.margin,
            "frozen_margin": self.frozen_margin, "frozen_commission": self.frozen_commission,
            "frozen_premium": self.frozen_premium, "available": self.available, "risk_ratio": self.risk_ratio,
        }

    def to_qifi(self) -> dict[str, Any]:
        """The QIFI document (QIFIAccount's ``message`` shape, plus exact per-bucket costs)."""
        frozen = {
            oid: {"order_id": oid, "amount": w.left, "money": w.margin_per_lot * w.left,
                  "coeff": w.margin_per_lot, "commission_per_lot": w.commission_per_lot,
                  "alloc": dict(w.alloc), "filled": w.filled, "closed": w.closed,
                  "order": msgspec.to_builtins(w.order)}
            for oid, w in self._working.items()
        }
        return {
            "account_cookie": self.account_cookie, "trading_day": self.trading_day, "status": 200,
            "money": self.available, "accounts": self.account_msg(),
            "positions": {k: p.to_qifi(self.account_cookie) for k, p in self.positions.items()},
            "orders": {k: dict(v) for k, v in self._orders.items()},
            "trades": {k: dict(v) for k, v in self._trades.items()},
            "frozen": frozen, "event": {}, "transfers": {}, "banks": {}, "settlement": {},
        }

    @classmethod
    def from_qifi(cls, doc: Mapping[str, Any], instruments: Instruments | Mapping[str, Instrument]) -> Account:
        acc_part = doc["accounts"]
        a = cls(doc["account_cookie"], instruments, pre_balance=float(acc_part["pre_balance"]),
                trading_day=str(doc.get("trading_day", "")))
        a.deposit = float(acc_part.get("deposit", 0.0))
        a.withdraw = float(acc_part.get("withdraw", 0.0))
        a.close_profit = float(acc_part.get("close_profit", 0.0))
        a.commission = float(acc_part.get("commission", 0.0))
        a.premium = float(acc_part.get("premium", 0.0))
        for key, pd in doc.get("positions", {}).items():
            inst = instruments[key]
            p = Position(inst, last_price=pd.get("last_price") or None, commission=float(pd.get("commission", 0.0)))
            for side in ("long", "short"):
                for when in ("today", "his"):
                    b = p.bucket(f"{side}_{when}")
                    b.volume = int(pd.get(f"volume_{side}_{when}", 0))
                    b.frozen = int(pd.get(f"volume_{side}_frozen_{when}", 0))
                    if f"position_cost_{side}_{when}" in pd:
                        b.position_cost = float(pd[f"position_cost_{side}_{when}"])
                        b.open_cost = float(pd[f"open_cost_{side}_{when}"])
                    else:   # a plain QIFI document: split the side's cost by volume
                        tot = int(pd.get(f"volume_{side}", 0)) or 1
                        b.position_cost = float(pd.get(f"position_cost_{side}", 0.0)) * b.volume / tot
                        b.open_cost = float(pd.get(f"open_cost_{side}", 0.0)) * b.volume / tot
            a.positions[key] = p
        a._orders = {k: dict(v) for k, v in doc.get("orders", {}).items()}
        a._trades = {k: dict(v) for k, v in doc.get("trades", {}).items()}
        a._trade_ids = set(a._trades)
        for oid, fz in doc.get("frozen", {}).items():
            if "order" not in fz:
                continue
            order = msgspec.convert(fz["order"], Order)
            a._working[oid] = _Working(order=order, left=int(fz["amount"]), margin_per_lot=float(fz["coeff"]),
                                       commission_per_lot=float(fz["commission_per_lot"]),
                                       alloc={k: int(v) for k, v in fz["alloc"].items()},
                                       filled=int(fz["filled"]), closed=bool(fz["closed"]))
        for oid, od in a._orders.items():
            if oid in a._working:
                a._order_objs[oid] = a._working[oid].order
            else:   # finished today: enough to check late trades against
                a._order_objs[oid] = Order(
                    order_id=oid, account=a.account_cookie, symbol=od["instrument_id"], exchange=Exchange(od["exchange_id"]),
                    direction=Direction(od["direction"]), offset=Offset(od["offset"]),
                    price_type=PriceType(od.get("price_type", "LIMIT")),
                    price=od.get("limit_price") or None,
                    volume=int(od["volume_orign"]), strategy_id=od.get("strategy_id", ""))
        return a
