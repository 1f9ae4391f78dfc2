"""Hypothesis: cash and position conservation over random order/fill/cancel/price/settle sequences."""
from __future__ import annotations

import itertools
import math

from hypothesis import event, given, settings
from hypothesis import strategies as st

from qaaccount.account import Account, AccountError
from qaaccount.instruments import Instruments, future, stock
from qaorder.models import Direction, Offset, Order, PriceType, Trade

INSTS = Instruments([
    future("rb2510", "SHFE", multiplier=10, price_tick=1, margin_rate=0.1, open_ratio=0.0001, close_ratio=0.0001,
           close_today_ratio=0.0002),
    future("m2509", "DCE", multiplier=10, price_tick=1, margin_rate=0.12, open_per_lot=1.5, close_per_lot=1.5,
           close_today_per_lot=3.0),
    stock("600000", "SSE"),
])
KEYS = list(INSTS)

order_op = st.tuples(st.just("order"), st.sampled_from(KEYS), st.sampled_from(list(Direction)),
                     st.sampled_from([Offset.OPEN, Offset.OPEN, Offset.OPEN, Offset.CLOSE, Offset.CLOSETODAY,
                                      Offset.CLOSEYESTERDAY]),
                     st.integers(1, 6), st.integers(-50, 50), st.integers(0, 6))
fill_op = st.tuples(st.just("fill"), st.integers(0, 20), st.integers(1, 6), st.integers(-50, 50))
op = st.one_of(
    order_op, order_op, fill_op, fill_op, fill_op,
    st.tuples(st.just("cancel"), st.integers(0, 20), st.one_of(st.none(), st.integers(0, 6))),
    st.tuples(st.just("price"), st.sampled_from(KEYS), st.integers(-80, 80)),
    st.tuples(st.just("settle"), st.integers(-30, 30)),
    st.tuples(st.just("dup"),),
)
BASE = {"SHFE.rb2510": 3500.0, "DCE.m2509": 3000.0, "SSE.600000": 10.0}


def price_of(key: str, delta: int) -> float:
    inst = INSTS[key]
    return round(BASE[key] + delta * inst.price_tick, 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, min_size=12, max_size=50))
def test_conservation(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    a = Account("a", INSTS, pre_balance=2_000_000)
    ids = itertools.count()
    cash_flow = 0.0                     # sum of -signed notional over fills
    net: dict[str, int] = {k: 0 for k in KEYS}
    applied: list[Trade] = []
    fee_total = 0.0
    def expand(ops: list[tuple]) -> list[tuple]:  # type: ignore[type-arg]
        out = []
        for step in ops:
            if step[0] == "order":
                out.append(step[:-1])
                if step[-1]:                           # fill (part of) the order just sent, at once
                    out.append(("fill", -1, step[-1], step[-2]))
            else:
                out.append(step)
        return out

    for step in expand(ops):
        kind = step[0]
        try:
            if kind == "order":
                _, key, d, off, v, dp = step
                inst = INSTS[key]
                vol = v * inst.lot_size
                a.on_order(Order(order_id=f"o{next(ids)}", account="a", symbol=inst.symbol, exchange=inst.exchange,
                                 direction=d, offset=off, price_type=PriceType.LIMIT, price=price_of(key, dp), volume=vol))
            elif kind == "fill":
                _, i, v, dp = step
                working = list(a._working.values())
                if not working:
                    continue
                w = working[-1] if i < 0 else working[i % len(working)]
                vol = min(w.left, v * INSTS[w.order.key].lot_size)
                t = Trade(trade_id=f"t{next(ids)}", order_id=w.order.order_id, account="a", symbol=w.order.symbol,
                          exchange=w.order.exchange, direction=w.order.direction, offset=w.order.offset,
                          price=price_of(w.order.key, dp), volume=vol, trade_time=0)
                c0 = a.commission
                assert a.on_trade(t)
                fee_total += a.commission - c0      # the fee this fill charged (fees of past days sit in pre_balance)
                applied.append(t)
            elif kind == "cancel":
                _, i, traded = step
                working = [w for w in a._working.values() if not w.closed]
                if not working:
                    continue
                w = working[i % len(working)]
                a.on_cancel(w.order.order_id, None if traded is None else w.filled + min(traded, w.left))
            elif kind == "price":
                _, key, dp = step
                ex, _, sym = key.partition(".")
                a.on_price(ex, sym, price_of(key, dp))
            elif kind == "settle":
                a.settle({k: price_of(k, step[1]) for k in KEYS})
            elif kind == "dup" and applied:
                event("duplicate fill")
                assert not a.on_trade(applied[-1])
                continue
        except AccountError:
            pass
        else:
            if kind == "fill":
                m = INSTS[t.key].multiplier
                cash_flow -= t.price * t.volume * m * t.direction.sign
                net[t.key] += t.volume * t.direction.sign
        # ---- invariants
        scale = 1e-6 * 2_000_000
        assert math.isclose(a.balance, a.static_balance + a.close_profit - a.commission - a.premium + a.position_profit,
                            abs_tol=scale)
        # independent equity: initial + cash flows - fees + net position marked at the account's last price
        marked = 0.0
        for key in KEYS:
            p = a.positions.get(key)
            assert (p.volume_long - p.volume_short if p else 0) == net[key]
            if p is not None and (p.volume_long or p.volume_short):
                marked += (p.volume_long - p.volume_short) * (p.last_price or 0) * p.inst.multiplier
        assert math.isclose(a.balance, 2_000_000 + cash_flow - fee_total + marked, abs_tol=scale)
        for p in a.positions.values():
            for b in (p.long_today, p.long_his, p.short_today, p.short_his):
                assert 0 <= b.frozen <= b.volume
                assert b.volume >= 0
            if p.inst.is_stock:
                assert p.volume_short == 0
        if not a._working:
            assert a.frozen_margin == 0 and a.frozen_commission == 0
            assert all(b.frozen == 0 for p in a.positions.values()
                       for b in (p.long_today, p.long_his, p.short_today, p.short_his))
    event(f"fills applied: {'0' if not applied else '1-4' if len(applied) < 5 else '5+'}")
    event(f"open positions at end: {sum(1 for v in net.values() if v)}")
