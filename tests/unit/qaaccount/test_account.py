"""Account math against hand-computed ledgers (the arithmetic is in the comments)."""
from __future__ import annotations

import itertools

import pytest

from qaaccount.account import Account, AccountError, InsufficientFunds, InsufficientPosition, InvalidOrder, UnknownOrderError
from qaaccount.instruments import FeeKind, Instruments, future, round_down_to_lot, stock
from qaorder.models import Direction, Exchange, Offset, Order, PriceType, Trade

RB = future("rb2510", "SHFE", multiplier=10, price_tick=1, margin_rate=0.1,
            open_ratio=0.0001, close_ratio=0.0001, close_today_ratio=0.0002)
M = future("m2509", "DCE", multiplier=10, price_tick=1, margin_rate=0.1, open_per_lot=1.5, close_per_lot=1.5,
           close_today_per_lot=3.0)
PF = stock("600000", "SSE")     # 0.025% min 5, stamp 0.05% on sells, transfer 0.001%
INSTS = Instruments([RB, M, PF])
_ids = itertools.count(1)
approx = pytest.approx


def o(inst, direction, offset, volume, price, acc="a", oid=None, pt=PriceType.LIMIT):  # type: ignore[no-untyped-def]
    return Order(order_id=oid or f"o{next(_ids)}", account=acc, symbol=inst.symbol, exchange=inst.exchange,
                 direction=direction, offset=offset, price_type=pt, price=price, volume=volume)


def fill(order: Order, volume: int, price: float, tid: str | None = None, commission: float | None = None) -> Trade:
    return Trade(trade_id=tid or f"t{next(_ids)}", order_id=order.order_id, account=order.account, symbol=order.symbol,
                 exchange=order.exchange, direction=order.direction, offset=order.offset, price=price, volume=volume,
                 trade_time=0, commission=commission)


B, S = Direction.BUY, Direction.SELL
OPEN, CLOSE, CT, CY = Offset.OPEN, Offset.CLOSE, Offset.CLOSETODAY, Offset.CLOSEYESTERDAY


def test_futures_day_and_settlement_ledger() -> None:
    a = Account("a", INSTS, pre_balance=1_000_000, trading_day="2025-06-03")
    # 1. BUY OPEN 2 @ 3500: frozen margin 3500*2*10*0.1 = 7000; frozen fee 0.0001*70000 = 7
    o1 = o(RB, B, OPEN, 2, 3500)
    assert a.on_order(o1)
    assert (a.frozen_margin, a.frozen_commission) == (approx(7000), approx(7))
    assert a.available == approx(1_000_000 - 7007)                       # 992993
    assert not a.on_order(o1)                                             # redelivered order: once
    # 2. filled 2 @ 3490: margin 3490*20*0.1 = 6980; fee 0.0001*69800 = 6.98
    assert a.on_trade(t := fill(o1, 2, 3490))
    assert not a.on_trade(t)                                              # same trade_id: once
    assert (a.frozen_margin, a.frozen_commission) == (0, 0)
    assert a.margin == approx(6980) and a.commission == approx(6.98)
    assert a.balance == approx(999_993.02) and a.available == approx(993_013.02)
    # 3. mark at 3510: position profit (3510-3490)*2*10 = 400
    a.on_price("SHFE", "rb2510", 3510)
    assert a.position_profit == approx(400) and a.balance == approx(1_000_393.02)
    # 4. SHFE: CLOSE means yesterday's -> nothing to close; CLOSETODAY freezes today's
    with pytest.raises(InsufficientPosition, match="CLOSETODAY"):
        a.on_order(o(RB, S, CLOSE, 1, 3520))
    o2 = o(RB, S, CT, 1, 3520)
    a.on_order(o2)
    pos = a.positions["SHFE.rb2510"]
    assert pos.long_today.frozen == 1
    assert a.frozen_commission == approx(7.04)                            # max(3.52, 0.0002*35200=7.04)
    # 5. close today 1 @ 3520: close profit (3520-3490)*10 = 300; fee 0.0002*35200 = 7.04
    a.on_trade(fill(o2, 1, 3520))
    assert a.close_profit == approx(300) and a.commission == approx(6.98 + 7.04)
    assert a.margin == approx(3490) and a.position_profit == approx(200)   # 1 left, (3510-3490)*10
    assert a.balance == approx(1_000_000 + 300 - 14.02 + 200)             # 1000485.98
    # 6. settle at 3500: pre_balance = 1e6 + 300 - 14.02 + (3500-3490)*10 = 1000385.98
    a.settle({"SHFE.rb2510": 3500}, "2025-06-04")
    assert a.pre_balance == approx(1_000_385.98) and a.balance == approx(1_000_385.98)
    assert (a.close_profit, a.commission, a.position_profit) == (0, 0, approx(0))
    assert (pos.long_today.volume, pos.long_his.volume) == (0, 1)
    assert a.margin == approx(3500) and a.available == approx(996_885.98)
    assert a.trading_day == "2025-06-04"
    # 7. day 2: CLOSE (yesterday's) 1 @ 3480: close profit (3480-3500)*10 = -200, fee 0.0001*34800 = 3.48
    o3 = o(RB, S, CLOSE, 1, 3480)
    a.on_order(o3)
    a.on_trade(fill(o3, 1, 3480))
    # cross-check: (3520-3490 + 3480-3490)*10 = 200 pnl, fees 6.98+7.04+3.48 = 17.50
    assert a.balance == approx(1_000_000 + 200 - 17.50) == approx(1_000_182.50)
    assert a.margin == 0 and a.available == approx(a.balance)


def test_per_lot_fees_and_dce_close_takes_his_first_then_today() -> None:
    a = Account("a", INSTS, pre_balance=100_000)
    a.positions["DCE.m2509"] = p = __import__("qaaccount").Position(M)
    p.long_his.add(2, 3000 * 2 * 10)              # 2 old lots at 3000
    p.last_price = 3000
    o1 = o(M, B, OPEN, 1, 3010)
    a.on_order(o1)
    a.on_trade(fill(o1, 1, 3010))                  # fee 1.5 per lot -> 1.5
    o2 = o(M, S, CLOSE, 3, 3020)
    a.on_order(o2)
    assert (p.long_his.frozen, p.long_today.frozen) == (2, 1)
    a.on_trade(fill(o2, 3, 3020))
    # 2 his at 1.5 + 1 today at 3.0 = 6.0; total fees 7.5
    # close profit: (3020-3000)*2*10 + (3020-3010)*1*10 = 400 + 100 = 500
    assert a.commission == approx(7.5) and a.close_profit == approx(500)
    assert p.is_flat and a.balance == approx(100_000 + 500 - 7.5)


def test_stock_t_plus_1_lots_min_commission_stamp_duty() -> None:
    a = Account("s", INSTS, pre_balance=100_000)
    with pytest.raises(InvalidOrder) as ei:
        a.on_order(o(PF, B, OPEN, 150, 10.0, acc="s"))
    assert ei.value.field == "volume"
    # BUY 1000 @ 10: cash frozen 10000; fee estimate max(0.00025*10000=2.5, 5) + 0.00001*10000 = 5.10
    o1 = o(PF, B, OPEN, 1000, 10.0, acc="s")
    a.on_order(o1)
    assert a.frozen_margin == approx(10_000) and a.frozen_commission == approx(5.10)
    a.on_trade(fill(o1, 1000, 10.0))
    assert a.commission == approx(5.10) and a.margin == approx(10_000)
    assert a.balance == approx(99_994.90) and a.available == approx(89_994.90)
    # T+1: today's shares cannot be sold
    with pytest.raises(InsufficientPosition, match="T\\+1"):
        a.on_order(o(PF, S, CLOSE, 1000, 10.5, acc="s"))
    with pytest.raises(InvalidOrder):
        a.on_order(o(PF, S, CT, 100, 10.5, acc="s"))
    # settle at 10.50: pre_balance = 99994.90 + (10.5-10)*1000 = 100494.90
    a.settle({"SSE.600000": 10.5})
    assert a.pre_balance == approx(100_494.90)
    # SELL 1000 @ 11: commission max(2.75, 5) = 5; transfer 0.11; stamp 0.0005*11000 = 5.5 -> 10.61
    o2 = o(PF, S, CLOSE, 1000, 11.0, acc="s")
    a.on_order(o2)
    a.on_trade(fill(o2, 1000, 11.0))
    assert a.commission == approx(10.61) and a.close_profit == approx(500)
    # cross-check: 100000 + (11-10)*1000 - 5.10 - 10.61 = 100984.29
    assert a.balance == approx(100_984.29) and a.available == approx(100_984.29)


def test_stock_commission_above_minimum() -> None:
    # BUY 10000 @ 10: turnover 100000 -> 0.00025*100000 = 25 (> 5) + transfer 1.00 = 26
    assert PF.fee(FeeKind.OPEN, 10.0, 10_000) == approx(26.0)
    # SELL: 25 + 1 + stamp 50 = 76
    assert PF.fee(FeeKind.CLOSE, 10.0, 10_000, sell=True) == approx(76.0)


def test_stock_odd_lots_only_to_sell() -> None:
    a = Account("s", INSTS, pre_balance=10_000)
    from qaaccount import Position
    a.positions["SSE.600000"] = p = Position(PF, last_price=10.0)
    p.long_his.add(350, 3500.0)
    with pytest.raises(InvalidOrder, match="odd lots"):
        a.on_order(o(PF, S, CLOSE, 30, 10.0, acc="s"))
    assert a.on_order(o(PF, S, CLOSE, 150, 10.0, acc="s"))      # 1 lot + the 50 odd shares
    assert a.on_order(o(PF, S, CLOSE, 200, 10.0, acc="s"))
    with pytest.raises(InsufficientPosition):
        a.on_order(o(PF, S, CLOSE, 100, 10.0, acc="s"))


def test_insufficient_funds_changes_nothing() -> None:
    a = Account("a", INSTS, pre_balance=5_000)
    before = a.to_qifi()
    # 2 lots @ 3500 need 7000 margin + 7 fee > 5000
    with pytest.raises(InsufficientFunds):
        a.on_order(o(RB, B, OPEN, 2, 3500))
    assert a.to_qifi() == before
    with pytest.raises(InvalidOrder):
        a.on_order(o(RB, B, OPEN, 1, 3500, acc="other"))
    with pytest.raises(InvalidOrder):
        a.on_order(o(RB, B, OPEN, 1, None, pt=PriceType.MARKET))   # no price, no last price


def test_cancel_releases_frozen_close_volume_and_cash() -> None:
    a = Account("a", INSTS, pre_balance=1_000_000)
    o1 = o(RB, B, OPEN, 5, 3500)
    a.on_order(o1)
    a.on_trade(fill(o1, 5, 3500))
    o2 = o(RB, S, CT, 5, 3600)
    a.on_order(o2)
    a.on_trade(fill(o2, 2, 3600))
    pos = a.positions["SHFE.rb2510"]
    assert (pos.long_today.volume, pos.long_today.frozen) == (3, 3)
    assert a.on_cancel(o2.order_id)
    assert pos.long_today.frozen == 0 and a.frozen_commission == 0     # QIFIAccount kept it frozen
    assert not a.on_cancel(o2.order_id)                                 # idempotent
    o3 = o(RB, S, CT, 3, 3600)
    a.on_order(o3)                                                      # the 3 lots are closable again
    assert a.on_reject(o3.order_id) and pos.long_today.frozen == 0
    # open order cancelled: cash freeze released
    o4 = o(RB, B, OPEN, 1, 3500)
    a.on_order(o4)
    a.on_cancel(o4.order_id)
    assert (a.frozen_margin, a.frozen_commission) == (0, 0)


def test_cancel_with_traded_keeps_reservation_for_late_fills() -> None:
    a = Account("a", INSTS, pre_balance=1_000_000)
    o1 = o(RB, B, OPEN, 5, 3500)
    a.on_order(o1)
    a.on_cancel(o1.order_id, traded=2)              # executor: cancelled, 2 traded (trade not here yet)
    assert a.frozen_margin == approx(2 * 3500 * 10 * 0.1)   # 7000 kept for the 2 pending lots
    assert a.working_order_ids == []
    a.on_trade(fill(o1, 2, 3500))
    assert (a.frozen_margin, a.frozen_commission) == (0, 0)
    assert a.positions["SHFE.rb2510"].long_today.volume == 2
    # a late fill on an order released without 'traded' still applies (a fill is a fact)
    o2 = o(RB, S, CT, 2, 3510)
    a.on_order(o2)
    a.on_cancel(o2.order_id)
    a.on_trade(fill(o2, 1, 3510))
    assert a.positions["SHFE.rb2510"].long_today.volume == 1
    with pytest.raises(UnknownOrderError):
        a.on_trade(fill(o(RB, B, OPEN, 1, 1.0), 1, 1.0))


def test_trade_must_match_order_and_overfill_refused() -> None:
    a = Account("a", INSTS, pre_balance=1_000_000)
    o1 = o(RB, B, OPEN, 1, 3500)
    a.on_order(o1)
    with pytest.raises(AccountError):
        a.on_trade(fill(o1, 2, 3500))


def test_settlement_expires_working_orders_and_needs_prices() -> None:
    a = Account("a", INSTS, pre_balance=1_000_000)
    o1 = o(RB, B, OPEN, 1, 3500)
    a.on_order(o1)
    a.on_trade(fill(o1, 1, 3500))
    o2 = o(RB, B, OPEN, 1, 3400)
    a.on_order(o2)
    assert a.settle({"SHFE.rb2510": 3450}) == [o2.order_id]
    assert (a.frozen_margin, a.frozen_commission, a.working_order_ids) == (0, 0, [])
    b = Account("b", INSTS, pre_balance=1_000_000)
    from qaaccount import Position
    b.positions["SHFE.rb2510"] = p = Position(RB)
    p.long_his.add(1, 35000.0)
    with pytest.raises(AccountError, match="settlement price"):
        b.settle({})


def test_qifi_shape_and_roundtrip() -> None:
    a = Account("a", INSTS, pre_balance=1_000_000, trading_day="2025-06-03")
    o1 = o(RB, B, OPEN, 3, 3500)
    a.on_order(o1)
    a.on_trade(fill(o1, 2, 3490, tid="T1"))
    o2 = o(RB, S, CT, 1, 3600)
    a.on_order(o2)
    a.on_price("SHFE", "rb2510", 3510)
    doc = a.to_qifi()
    acc = doc["accounts"]
    for k in ("user_id", "balance", "static_balance", "available", "margin", "frozen_margin", "frozen_commission",
              "frozen_premium", "position_profit", "close_profit", "commission", "premium", "risk_ratio", "deposit",
              "withdraw", "pre_balance"):
        assert k in acc
    assert acc["balance"] == approx(acc["static_balance"] + acc["close_profit"] - acc["commission"]
                                    - acc["premium"] + acc["position_profit"])
    assert acc["available"] == approx(acc["balance"] - acc["margin"] - acc["frozen_margin"]
                                      - acc["frozen_commission"] - acc["frozen_premium"])
    p = doc["positions"]["SHFE.rb2510"]
    assert (p["volume_long_today"], p["volume_long_his"], p["volume_long"], p["volume_long_frozen_today"]) == (2, 0, 2, 1)
    assert p["open_price_long"] == approx(3490) and p["position_profit"] == approx(400)
    assert doc["orders"][o1.order_id]["volume_left"] == 1 and doc["trades"]["T1"]["volume"] == 2
    b = Account.from_qifi(doc, INSTS)
    assert b.to_qifi() == doc
    assert not b.on_trade(fill(o1, 2, 3490, tid="T1"))          # trade ids survive the reload
    b.on_trade(fill(o1, 1, 3500))
    b.on_cancel(o2.order_id)
    assert (b.frozen_margin, b.frozen_commission) == (0, 0)


def test_deposit_withdraw() -> None:
    a = Account("a", INSTS, pre_balance=1000)
    a.deposit_cash(500)
    assert a.static_balance == 1500
    with pytest.raises(InsufficientFunds):
        a.withdraw_cash(2000)
    a.withdraw_cash(1500)
    assert a.balance == 0


def test_round_down_to_lot() -> None:
    assert [round_down_to_lot(v, 100) for v in (0, 99.99, 100, 250, 299.9999999999)] == [0, 0, 100, 200, 300]
    assert round_down_to_lot(3.0000000001 * 1, 1) == 3 and round_down_to_lot(-5, 1) == 0
    assert RB.fee(FeeKind.OPEN, 3500, 2) == approx(7.0) and RB.margin(3500, 2) == approx(7000)
    assert Exchange.SHFE in {RB.exchange}
