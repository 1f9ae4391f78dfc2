"""The strategy engine and the MA cross, without any I/O."""
from __future__ import annotations

import itertools
import logging

import pytest

from qamarket.models import Bar
from qamarket.sessions import ms_of
from qamarket.strategies.ma_cross import MaCross
from qamarket.strategy import (
    Position, Strategy, StrategyEngine, StrategyHalted, Target, load_strategy_class, order_id_for, parse_params,
)
from qaorder.models import (
    AccountSnapshot, Cancel, Direction, Offset, Order, OrderStatus, OrderStatusReport, Reject, Trade,
)

M = 60_000
T0 = ms_of(2025, 3, 4, 9, 0)
_trade_ids = itertools.count(1)


def bar(i: int, close: float, *, symbol: str = "rb2605", exchange: str = "SHFE", final: bool = True) -> Bar:
    return Bar(symbol=symbol, exchange=exchange, freq="1min", datetime=T0 + i * M, trading_day="20250304",  # type: ignore[arg-type]
               open=close, high=close, low=close, close=close, final=final)


def mid(b: Bar) -> str:
    return f"bar.{b.freq}.{b.exchange}.{b.symbol}.{b.datetime}"


def summary(outbox: list) -> list[tuple]:
    out = []
    for key, m in outbox:
        if isinstance(m, Order):
            out.append((key, m.direction.value, m.offset.value, m.volume, m.price))
        else:
            out.append((key, "CANCEL", m.order_id))
    return out


def fill(eng: StrategyEngine, o: Order, account: str | None = None, volume: int | None = None) -> None:
    acc = account or o.account
    oid = o.order_id if acc == o.account else f"{o.order_id}/g/{acc}"
    v = volume or o.volume
    eng.on_report(Trade(trade_id=f"T{next(_trade_ids)}", order_id=oid, account=acc, symbol=o.symbol,
                        exchange=o.exchange, direction=o.direction, offset=o.offset, price=o.price or 1.0, volume=v,
                        trade_time=0))
    eng.on_report(OrderStatusReport(order_id=oid, account=acc, status=OrderStatus.ALLTRADED, traded=v))


def ma_engine(accounts=("a1", "a2"), history=(10, 10, 10, 10), **params) -> StrategyEngine:
    s = MaCross("ma", instruments=["SHFE.rb2605"], params={"fast": 2, "slow": 3, "volume": 1, **params})
    eng = StrategyEngine(s, Target(accounts=tuple(accounts)), clock=lambda: 0)
    eng.init({("SHFE", "rb2605", "1min"): [bar(i, c) for i, c in enumerate(history)]})
    return eng


# ------------------------------------------------------------------------------------------ MA cross
def test_ma_cross_order_sequence_per_account() -> None:
    eng = ma_engine()
    assert eng.strategy.inited and not eng.outbox  # history is not traded
    eng.on_bar(b := bar(4, 11), mid(b))            # golden cross -> +1
    sent = eng.pop_outbox()
    assert summary(sent) == [("a1", "BUY", "OPEN", 1, 11.0), ("a2", "BUY", "OPEN", 1, 11.0)]
    o = sent[0][1]
    assert o.strategy_id == "ma" and o.id == o.order_id == f"ma-rb2605-1min-{T0 + 4 * M}-a1-1"
    for _, o in sent:
        fill(eng, o)
    assert eng.strategy.pos == 1 and eng.strategy.get_pos("a2") == 1
    eng.on_bar(b := bar(5, 12), mid(b))            # no cross, target already held
    assert eng.outbox == []
    eng.on_bar(b := bar(6, 8), mid(b))             # death cross -> -1: close today's (SHFE) then open short
    sent = eng.pop_outbox()
    assert summary(sent) == [("a1", "SELL", "CLOSETODAY", 1, 8.0), ("a1", "SELL", "OPEN", 1, 8.0),
                             ("a2", "SELL", "CLOSETODAY", 1, 8.0), ("a2", "SELL", "OPEN", 1, 8.0)]
    for _, o in sent:
        fill(eng, o)
    assert eng.strategy.pos == -1 and eng.strategy.get_position("a2").short_today == 1
    assert eng.stats()["orders"] == 6 and eng.stats()["trades"] == 6


def test_ma_cross_without_cross_does_nothing_and_state_mode_enters() -> None:
    eng = ma_engine(history=(10, 11, 12, 13))      # fast above slow already in history
    eng.on_bar(b := bar(4, 14), mid(b))
    assert eng.outbox == []                        # cross mode: waits for a cross
    eng = ma_engine(history=(10, 11, 12, 13), entry="state", volume=2, slip=1)
    eng.on_bar(b := bar(4, 14), mid(b))
    assert summary(eng.pop_outbox()) == [("a1", "BUY", "OPEN", 2, 15.0), ("a2", "BUY", "OPEN", 2, 15.0)]


def test_ma_cross_bad_parameters_are_callback_errors() -> None:
    eng = ma_engine(fast=5)  # fast >= slow: on_init raises -> counted, logged
    assert eng.stats()["callback_errors.on_init"] == 1


# ------------------------------------------------------------------------------------------ target position
class Manual(Strategy):
    parameters = {"n": 0}


def manual(target: Target, instrument: str = "SHFE.rb2605") -> StrategyEngine:
    eng = StrategyEngine(Manual("man", instruments=[instrument]), target, clock=lambda: 0)
    return eng


def qifi(key: str, **vols: int) -> dict:
    return {"positions": {key: {f"volume_{k}": v for k, v in vols.items()}}}


def test_target_with_existing_positions_splits_closes_on_shfe() -> None:
    eng = manual(Target(accounts=("a1",)))
    eng.load_account("a1", qifi("SHFE.rb2605", long_his=3, long_today=1))
    eng.init({})
    assert eng.strategy.pos == 4
    eng.strategy.set_target_pos(-2, price=3500)
    assert summary(eng.pop_outbox()) == [("a1", "SELL", "CLOSE", 3, 3500), ("a1", "SELL", "CLOSETODAY", 1, 3500),
                                         ("a1", "SELL", "OPEN", 2, 3500)]


def test_target_with_existing_positions_elsewhere_and_reductions() -> None:
    eng = manual(Target(accounts=("a1", "a2")), "DCE.i2605")
    eng.load_account("a1", qifi("DCE.i2605", long_his=3, long_today=1))
    eng.load_account("a2", qifi("DCE.i2605", short_his=2))
    eng.init({})
    eng.strategy.set_target_pos(1, price=800)
    assert summary(eng.pop_outbox()) == [("a1", "SELL", "CLOSE", 3, 800),          # 4 -> 1
                                         ("a2", "BUY", "CLOSE", 2, 800), ("a2", "BUY", "OPEN", 1, 800)]  # -2 -> 1
    eng.strategy.set_target_pos(1, price=800)   # working orders already reach it: nothing new
    assert eng.outbox == []


def test_new_target_cancels_working_orders_first_then_sends() -> None:
    eng = manual(Target(accounts=("a1",)))
    eng.init({})
    [oid] = eng.strategy.buy(3500, 2)
    eng.pop_outbox()
    eng.strategy.set_target_pos(-1, price=3490)
    assert summary(eng.pop_outbox()) == [("a1", "CANCEL", oid)]
    eng.strategy.set_target_pos(-1, price=3490)   # cancel already asked: not again
    assert eng.outbox == []
    eng.on_report(Trade(trade_id="p1", order_id=oid, account="a1", symbol="rb2605", exchange="SHFE",  # type: ignore[arg-type]
                        direction=Direction.BUY, offset=Offset.OPEN, price=3500, volume=1, trade_time=0))
    eng.on_report(OrderStatusReport(order_id=oid, account="a1", status=OrderStatus.PARTTRADED, traded=1))
    assert eng.outbox == []                      # partly filled, still working: wait
    eng.on_report(OrderStatusReport(order_id=oid, account="a1", status=OrderStatus.CANCELLED, traded=1))
    assert summary(eng.pop_outbox()) == [("a1", "SELL", "CLOSETODAY", 1, 3490), ("a1", "SELL", "OPEN", 1, 3490)]


def test_status_before_trade_waits_for_the_fill() -> None:
    eng = manual(Target(accounts=("a1",)))
    eng.init({})
    eng.strategy.set_target_pos(2, price=3500)
    [(_, o)] = eng.pop_outbox()
    eng.on_report(OrderStatusReport(order_id=o.order_id, account="a1", status=OrderStatus.ALLTRADED, traded=2))
    eng.strategy.set_target_pos(2, price=3500)
    assert eng.outbox == []                        # the trade is not in yet: no second buy
    eng.on_report(Trade(trade_id="x1", order_id=o.order_id, account="a1", symbol="rb2605", exchange="SHFE",  # type: ignore[arg-type]
                        direction=Direction.BUY, offset=Offset.OPEN, price=3500, volume=2, trade_time=0))
    assert eng.strategy.pos == 2 and eng.working == {} and eng.outbox == []


def test_rejected_order_is_retried_with_a_new_id_on_the_next_event() -> None:
    eng = manual(Target(accounts=("a1",)))
    eng.init({})
    eng.strategy.set_target_pos(1, price=3500)
    [(_, o)] = eng.pop_outbox()
    eng.on_report(Reject(account="a1", field="price", reason="outside limits", order_id=o.order_id))
    [(_, o2)] = eng.pop_outbox()
    assert o2.order_id != o.order_id and o2.order_id.endswith("-a1-2")


def test_group_target_one_order_members_positions() -> None:
    eng = manual(Target(group="g1", members=("m1", "m2")))
    eng.init({})
    [oid] = eng.strategy.short(3500, 3)
    [(key, o)] = eng.pop_outbox()
    assert key == "g1" and o.account == "g1" and o.direction is Direction.SELL and o.volume == 3
    fill(eng, o, "m1")
    fill(eng, o, "m2")
    assert eng.strategy.pos == -3 and eng.strategy.get_pos("m2") == -3 and eng.working == {}
    eng.strategy.set_target_pos(0, price=3400)
    assert summary(eng.pop_outbox()) == [("g1", "BUY", "CLOSETODAY", 3, 3400)]


def test_snapshot_replaces_positions_but_keeps_fills_it_has_not_seen() -> None:
    eng = manual(Target(accounts=("a1",)))
    eng.init({})
    eng.on_report(Trade(trade_id="x1", order_id="manual-1", account="a1", symbol="rb2605", exchange="SHFE",  # type: ignore[arg-type]
                        direction=Direction.BUY, offset=Offset.OPEN, price=3500, volume=2, trade_time=0))
    assert eng.strategy.pos == 2
    pos0 = {"SHFE.rb2605": {"volume_long_his": 5}}
    eng.on_report(AccountSnapshot(account_cookie="a1", trading_day="", accounts={}, positions=pos0))
    assert eng.strategy.pos == 7  # stale snapshot (without x1) + x1
    pos1 = {"SHFE.rb2605": {"volume_long_his": 5, "volume_long_today": 2}}
    eng.on_report(AccountSnapshot(account_cookie="a1", trading_day="", accounts={}, positions=pos1,
                                  trades={"x1": {}}))
    assert eng.strategy.pos == 7
    eng.on_report(Trade(trade_id="x1", order_id="manual-1", account="a1", symbol="rb2605", exchange="SHFE",  # type: ignore[arg-type]
                        direction=Direction.BUY, offset=Offset.OPEN, price=3500, volume=2, trade_time=0))
    assert eng.strategy.pos == 7  # redelivered trade: once


# ------------------------------------------------------------------------------------------ dedupe, ids
class Recorder(Strategy):
    wants_realtime = True

    def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.bars: list[int] = []
        self.rt: list[int] = []

    def on_bar(self, bar: Bar) -> None:
        self.bars.append(bar.datetime)

    def on_realtime_bar(self, bar: Bar) -> None:
        self.rt.append(bar.datetime)


def test_repeated_and_historical_bars_are_skipped() -> None:
    s = Recorder("rec")
    eng = StrategyEngine(s, Target(accounts=("a1",)))
    eng.init({("SHFE", "rb2605", "1min"): [bar(0, 1), bar(1, 1), bar(2, 1, final=False)]})
    assert eng.strategy.history[("SHFE", "rb2605", "1min")][-1].datetime == T0 + M  # in-progress bar left out
    seq = [bar(1, 1), bar(2, 1, final=False), bar(2, 1), bar(2, 1), bar(3, 1), bar(2, 1), bar(3, 1, final=False),
           bar(4, 1, final=False)]
    for b in seq:
        eng.on_bar(b, mid(b) if b.final else None)
    assert s.bars == [T0 + 2 * M, T0 + 3 * M]
    assert s.rt == [T0 + 2 * M, T0 + 4 * M]
    assert eng.stats()["bars_duplicate"] == 3
    # the same label by another message id (ibar vs bar) is still one bar
    assert not eng.on_bar(bar(3, 1), "ibar.1min.SHFE.rb2605.x")


def test_realtime_bars_only_when_asked() -> None:
    eng = manual(Target(accounts=("a1",)))
    eng.init({})
    assert not eng.on_bar(bar(0, 1, final=False))


def test_order_ids_are_deterministic_across_restarts() -> None:
    def run() -> list[str]:
        eng = ma_engine()
        ids = []
        for i, c in enumerate((11, 12, 8), start=4):
            b = bar(i, c)
            eng.on_bar(b, mid(b))
            for _, o in eng.pop_outbox():
                ids.append(o.order_id)
                fill(eng, o)
        return ids

    first = run()
    assert first == run() and len(first) == 6 and len(set(first)) == 6
    assert len(order_id_for("s" * 30, "x" * 90, "acc", 1)) <= 128


# ------------------------------------------------------------------------------------------ errors
class Boom(Strategy):
    def on_bar(self, bar: Bar) -> None:
        if bar.close < 0:
            raise ZeroDivisionError("boom")
        self.buy(bar.close, 1)


def test_callback_errors_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    eng = StrategyEngine(Boom("boom"), Target(accounts=("a1",)))
    eng.init({})
    with caplog.at_level(logging.ERROR):
        eng.on_bar(b := bar(1, -1), mid(b))
        eng.on_bar(b := bar(2, -1), mid(b))
    assert eng.stats()["callback_errors"] == 2 and eng.stats()["callback_errors.on_bar"] == 2
    assert "on_bar(1min.SHFE.rb2605 2025-03-04 09:01 C -1) raised ZeroDivisionError: boom" in caplog.text
    eng.on_bar(b := bar(3, 5), mid(b))        # keeps working
    assert len(eng.outbox) == 1


def test_halt_on_error() -> None:
    eng = StrategyEngine(Boom("boom"), Target(accounts=("a1",)), halt_on_error=True)
    eng.init({})
    with pytest.raises(StrategyHalted, match="boom"):
        eng.on_bar(bar(1, -1))


def test_no_orders_during_init() -> None:
    class Eager(Strategy):
        def on_init(self, history: list[Bar]) -> None:
            self.buy(1.0, 1)

    eng = StrategyEngine(Eager("e"), Target(accounts=("a1",)))
    eng.init({})
    assert eng.outbox == [] and eng.stats()["callback_errors.on_init"] == 1


# ------------------------------------------------------------------------------------------ small parts
def test_params_and_loading() -> None:
    assert parse_params(["fast=5", "slow=20", "x=1.5", "on=true", "name=abc"]) == \
        {"fast": 5, "slow": 20, "x": 1.5, "on": True, "name": "abc"}
    with pytest.raises(ValueError):
        parse_params(["fast"])
    with pytest.raises(ValueError, match="unknown parameter"):
        MaCross(params={"nope": 1})
    with pytest.raises(ValueError, match="expected int"):
        MaCross(params={"fast": "x"})
    assert MaCross(params={"slip": 2}).slip == 2.0
    assert load_strategy_class("qamarket.strategies.ma_cross:MaCross") is MaCross
    with pytest.raises(ValueError):
        load_strategy_class("qamarket.models:Bar")
    with pytest.raises(ValueError):
        Target()
    with pytest.raises(ValueError):
        Target(accounts=("a",), group="g")


def test_position_apply_rules() -> None:
    p = Position("SHFE", "rb2605", long_today=2, long_his=3)
    p.apply(Direction.SELL, Offset.CLOSE, 2)            # SHFE: CLOSE = yesterday's
    assert (p.long_today, p.long_his) == (2, 1)
    q = Position("DCE", "i2605", long_today=2, long_his=1)
    q.apply(Direction.SELL, Offset.CLOSE, 2)            # oldest first
    assert (q.long_today, q.long_his) == (1, 0)
    assert isinstance(Cancel(order_id="x", account="a"), Cancel)
