from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qaorder.models import Direction, Exchange, Offset, Order, OrderStatus, OrderStatusReport, PriceType, Trade
from qaorder.state import ORDER_STATE_TABLE, InvalidTransition, OrderBook, OrderEvent, UnknownOrder, next_status

S = OrderStatus


def order(volume: int = 10, oid: str = "o1") -> Order:
    return Order(order_id=oid, account="a", symbol="rb2510", exchange=Exchange.SHFE, direction=Direction.BUY,
                 offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3500.0, volume=volume)


def trade(tid: str, vol: int, price: float = 3500.0, oid: str = "o1") -> Trade:
    return Trade(trade_id=tid, order_id=oid, account="a", symbol="rb2510", exchange=Exchange.SHFE,
                 direction=Direction.BUY, offset=Offset.OPEN, price=price, volume=vol, trade_time=0)


def report(status: OrderStatus, traded: int = 0, oid: str = "o1", **kw: object) -> OrderStatusReport:
    return OrderStatusReport(order_id=oid, account="a", status=status, traded=traded, **kw)  # type: ignore[arg-type]


def book(volume: int = 10) -> OrderBook:
    b = OrderBook()
    b.add(order(volume))
    return b


def test_table_never_moves_terminal_statuses_backwards() -> None:
    for (st_, ev), nxt in ORDER_STATE_TABLE.items():
        if st_.is_terminal and nxt != st_:
            assert (st_, ev, nxt) == (S.CANCELLED, OrderEvent.FILLED, S.ALLTRADED)


def test_happy_path() -> None:
    b = book()
    assert b.on_report(report(S.NOTTRADED)).status is S.NOTTRADED
    a = b.on_trade(trade("t1", 4))
    assert (a.status, a.traded, a.changed) == (S.PARTTRADED, 4, True)
    a = b.on_trade(trade("t2", 6, price=3510.0))
    assert (a.status, a.traded) == (S.ALLTRADED, 10)
    st_ = b.get("o1")
    assert st_.avg_price == pytest.approx((4 * 3500 + 6 * 3510) / 10)  # 3506.0
    assert st_.left == 0 and not st_.is_working


def test_duplicate_trade_and_report_are_ignored() -> None:
    b = book()
    r = report(S.NOTTRADED)
    b.on_report(r)
    assert b.on_report(r).duplicate
    b.on_trade(trade("t1", 4))
    a = b.on_trade(trade("t1", 4))
    assert a.duplicate and not a.changed and a.traded == 4


def test_trade_before_ack_and_late_ack_does_not_go_backwards() -> None:
    b = book()
    assert b.on_trade(trade("t1", 3)).status is S.PARTTRADED       # fill before NOTTRADED
    a = b.on_report(report(S.NOTTRADED))                              # late ack
    assert a.status is S.PARTTRADED and not a.changed
    a = b.on_report(report(S.SUBMITTING))
    assert a.status is S.PARTTRADED


def test_late_nottraded_after_alltraded_and_traded_monotone() -> None:
    b = book()
    b.on_report(report(S.ALLTRADED, traded=10, avg_price=3500.0))
    assert b.get("o1").status is S.ALLTRADED
    a = b.on_report(report(S.PARTTRADED, traded=4))
    assert (a.status, a.traded, a.changed) == (S.ALLTRADED, 10, False)
    # the trades arriving after the ALLTRADED report still count once each, status stays
    b.on_trade(trade("t1", 4))
    a = b.on_trade(trade("t2", 6))
    assert (a.status, a.traded) == (S.ALLTRADED, 10)


def test_report_traded_counts_even_without_trades() -> None:
    b = book()
    a = b.on_report(report(S.NOTTRADED, traded=3))   # an ack that already carries a fill
    assert (a.status, a.traded) == (S.PARTTRADED, 3)


def test_cancel_flow_and_cancel_rejected_restores() -> None:
    b = book()
    b.on_report(report(S.NOTTRADED))
    assert b.request_cancel("o1").status is S.PENDING_CANCEL
    b.on_trade(trade("t1", 2))                                 # a fill while the cancel is pending
    assert b.get("o1").status is S.PENDING_CANCEL
    a = b.get("o1").cancel_rejected("too late")
    assert a.status is S.PARTTRADED                            # restored, with the fill accounted for
    b.request_cancel("o1")
    a = b.on_report(report(S.CANCELLED, traded=2))
    assert (a.status, a.traded) == (S.CANCELLED, 2)
    # a fill reported after the cancel report still counts (it happened before)
    b2 = book()
    b2.on_report(report(S.CANCELLED, traded=3))
    a = b2.on_trade(trade("t9", 3))
    assert (a.status, a.traded) == (S.CANCELLED, 3)


def test_cancel_after_alltraded_is_too_late_not_an_error() -> None:
    b = book()
    b.on_trade(trade("t1", 10))
    assert b.request_cancel("o1").status is S.ALLTRADED


def test_cancel_report_with_full_volume_means_alltraded() -> None:
    b = book()
    assert b.on_report(report(S.CANCELLED, traded=10)).status is S.ALLTRADED


def test_invalid_transitions() -> None:
    b = book()
    b.on_report(report(S.REJECTED, reason="no margin"))
    with pytest.raises(InvalidTransition):
        b.on_trade(trade("t1", 1))
    with pytest.raises(InvalidTransition):
        b.on_report(report(S.NOTTRADED))
    b2 = book()
    b2.on_trade(trade("t1", 10))
    # a cancel report contradicting 10 distinct fills: the fills are facts, the order stays ALLTRADED
    assert b2.on_report(report(S.CANCELLED, traded=3)).status is S.ALLTRADED
    with pytest.raises(InvalidTransition):
        next_status("x", S.ALLTRADED, OrderEvent.REJECTED)


def test_overfill_and_mismatch_rejected() -> None:
    b = book(5)
    b.on_trade(trade("t1", 4))
    with pytest.raises(InvalidTransition, match="over-fill"):
        b.on_trade(trade("t2", 2))
    assert b.get("o1").traded == 4
    with pytest.raises(InvalidTransition, match="over-fill"):
        b.on_report(report(S.PARTTRADED, traded=6))


def test_unknown_order_and_id_reuse() -> None:
    b = book()
    with pytest.raises(UnknownOrder):
        b.on_trade(trade("t1", 1, oid="nope"))
    st_, new = b.add(order())
    assert not new and st_ is b.get("o1")
    with pytest.raises(InvalidTransition):
        b.add(order(volume=3))


events = st.lists(st.one_of(
    st.tuples(st.just("trade"), st.integers(0, 6), st.integers(1, 3)),
    st.tuples(st.just("report"), st.sampled_from([S.SUBMITTING, S.NOTTRADED, S.PARTTRADED, S.PENDING_CANCEL]),
              st.integers(0, 10)),
    st.tuples(st.just("cancel"), st.just(0), st.just(0)),
), max_size=25)


@settings(max_examples=300, deadline=None)
@given(events)
def test_property_traded_monotone_and_status_never_backwards(evs: list[tuple[object, object, int]]) -> None:
    b = book(10)
    rank = {S.SUBMITTING: 0, S.NOTTRADED: 1, S.PARTTRADED: 2, S.PENDING_CANCEL: 2, S.ALLTRADED: 3,
            S.CANCELLED: 3, S.REJECTED: 3}
    prev_traded, prev_rank = 0, 0
    for kind, a, v in evs:
        try:
            if kind == "trade":
                b.on_trade(trade(f"t{a}", v))
            elif kind == "report":
                assert isinstance(a, OrderStatus)
                b.on_report(report(a, traded=v if a is not S.SUBMITTING else 0))
            else:
                b.request_cancel("o1")
        except InvalidTransition:
            pass
        s = b.get("o1")
        assert s.traded >= prev_traded and s.traded <= 10
        assert rank[s.status] >= prev_rank or (s.status is S.PARTTRADED and prev_rank == 2)
        if s.traded == 10:
            assert s.status is S.ALLTRADED
        prev_traded, prev_rank = s.traded, rank[s.status]
