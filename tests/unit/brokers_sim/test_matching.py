"""The paper matching engine, without I/O."""
from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from brokers.sim import Quote, SimBook, SimOrder, crossing
from qaorder.models import Cancel, Direction, Offset, Order, OrderStatus, OrderStatusReport, PriceType, Reject, Trade


def order(oid: str = "o1", *, direction: str = "BUY", pt: str = "LIMIT", price: float | None = 3900.0,
          volume: int = 5, account: str = "A") -> Order:
    return Order(order_id=oid, account=account, symbol="rb2512", exchange="SHFE", direction=Direction(direction),
                 offset=Offset.OPEN, price_type=PriceType(pt), price=price, volume=volume)


def quote(bid: float = 3899, bv: float = 10, ask: float = 3901, av: float = 10, up: float = 4200,
          down: float = 3600) -> Quote:
    return Quote("SHFE", "rb2512", bid, bv, ask, av, up, down, (bid + ask) / 2)


def book() -> SimBook:
    c = itertools.count(1)
    return SimBook("A", clock=lambda: next(c))


def statuses(events: list) -> list[str]:
    return [e.status.value for e in events if isinstance(e, OrderStatusReport)]


def trades(events: list) -> list[Trade]:
    return [e for e in events if isinstance(e, Trade)]


def test_limit_buy_waits_then_fills_at_ask_when_ask_crosses() -> None:
    b = book()
    ev = b.place(order(price=3900))
    assert statuses(ev) == ["NOTTRADED"]
    assert b.on_quote(quote(ask=3901)) == []
    ev = b.on_quote(quote(ask=3899.0, av=10))
    [t] = trades(ev)
    assert (t.price, t.volume, t.trade_id, t.id) == (3899.0, 5, "o1-1", "o1-1")
    assert statuses(ev) == ["ALLTRADED"]
    assert ev[-1].traded == 5 and ev[-1].avg_price == 3899.0


def test_limit_sell_fills_at_bid() -> None:
    b = book()
    b.place(order(direction="SELL", price=3900))
    ev = b.on_quote(quote(bid=3902, bv=3))
    assert [(t.price, t.volume) for t in trades(ev)] == [(3902, 3)]
    assert statuses(ev) == ["PARTTRADED"]


def test_partial_fills_limited_by_volume_then_cancel_rest() -> None:
    b = book()
    b.place(order(volume=5))
    ev1 = b.on_quote(quote(ask=3900, av=2))
    ev2 = b.on_quote(quote(ask=3899, av=1))
    assert [(t.trade_id, t.volume, t.price) for t in trades(ev1 + ev2)] == [("o1-1", 2, 3900), ("o1-2", 1, 3899)]
    assert statuses(ev2) == ["PARTTRADED"]
    ev = b.cancel(Cancel(order_id="o1", account="A"))
    assert statuses(ev) == ["CANCELLED"] and ev[0].traded == 3
    assert ev[0].avg_price == (2 * 3900 + 3899) / 3
    assert b.on_quote(quote(ask=3800, av=100)) == []        # cancelled: no more fills
    [rej] = b.cancel(Cancel(order_id="o1", account="A"))     # cancel again: refused, nothing changes
    assert isinstance(rej, Reject) and "CANCELLED" in rej.reason


def test_orders_share_the_quoted_volume() -> None:
    b = book()
    b.place(order("o1", volume=3))
    b.place(order("o2", volume=3))
    ev = b.on_quote(quote(ask=3900, av=4))
    assert [(t.order_id, t.volume) for t in trades(ev)] == [("o1", 3), ("o2", 1)]


def test_limit_band_rejects_and_never_fills_outside() -> None:
    b = book()
    b.on_quote(quote(up=3950, down=3850))
    ev = b.place(order(price=3960))
    assert statuses(ev) == ["REJECTED"] and "limit band" in ev[0].reason
    b.place(order("o2", price=3940))
    # an ask above limit-up (bad data) never produces a fill
    assert trades(b.on_quote(quote(ask=3960, av=5, up=3950, down=3850))) == []
    # an order that arrived before any quote is rejected on the first quote if outside
    b2 = book()
    b2.place(order(price=4300))
    assert statuses(b2.on_quote(quote(up=4200))) == ["REJECTED"]
    assert b2.orders["o1"].status is OrderStatus.REJECTED


def test_market_fills_best_level_then_cancels_rest() -> None:
    b = book()
    b.on_quote(quote(ask=3901, av=2))
    ev = b.place(order(pt="MARKET", price=None, volume=5))
    assert statuses(ev) == ["NOTTRADED", "PARTTRADED", "CANCELLED"]
    assert [(t.price, t.volume) for t in trades(ev)] == [(3901, 2)]


def test_market_without_quote_waits_for_first_quote_and_without_ask_is_rejected() -> None:
    b = book()
    assert statuses(b.place(order(pt="MARKET", price=None, volume=1))) == ["NOTTRADED"]
    ev = b.on_quote(quote(ask=3905, av=9))
    assert statuses(ev) == ["ALLTRADED"] and trades(ev)[0].price == 3905
    b.on_quote(quote(ask=0, av=0))
    assert statuses(b.place(order("o2", pt="MARKET", price=None))) == ["REJECTED"]


def test_fak_and_fok() -> None:
    b = book()
    b.on_quote(quote(ask=3900, av=3))
    ev = b.place(order("fak", pt="FAK", price=3900, volume=5))
    assert statuses(ev) == ["NOTTRADED", "PARTTRADED", "CANCELLED"] and trades(ev)[0].volume == 3
    ev = b.place(order("fok", pt="FOK", price=3900, volume=5))
    assert statuses(ev) == ["NOTTRADED", "CANCELLED"] and not trades(ev)
    ev = b.place(order("fok2", pt="FOK", price=3900, volume=3))
    assert statuses(ev) == ["NOTTRADED", "ALLTRADED"]


def test_same_order_id_is_never_placed_twice_and_wrong_account_rejected() -> None:
    b = book()
    assert b.place(order()) and b.place(order()) == []
    assert statuses(b.place(order("x", account="B"))) == ["REJECTED"]
    [r] = b.cancel(Cancel(order_id="nope", account="A"))
    assert isinstance(r, Reject)


def test_state_round_trips_through_a_document() -> None:
    b = book()
    b.place(order(volume=5))
    b.on_quote(quote(ask=3900, av=2))
    so = b.orders["o1"]
    again = SimOrder.from_doc(so.to_doc())
    assert again == so
    b2 = book()
    b2.orders["o1"] = again
    ev = b2.on_quote(quote(ask=3900, av=10))
    assert trades(ev)[0].trade_id == "o1-2"   # numbering continues after a restart


@given(st.lists(st.tuples(st.floats(3890, 3910), st.integers(0, 4)), max_size=30), st.integers(1, 20))
def test_never_overfills_and_prices_respect_the_limit(levels: list[tuple[float, int]], volume: int) -> None:
    b = book()
    b.place(order(volume=volume, price=3900))
    filled = 0
    for ask, av in levels:
        for t in trades(b.on_quote(quote(ask=ask, av=av))):
            assert t.price <= 3900
            filled += t.volume
    assert filled == b.orders["o1"].traded <= volume
    assert (b.orders["o1"].status is OrderStatus.ALLTRADED) == (filled == volume)


def test_crossing() -> None:
    assert crossing(Direction.BUY, 3900, quote(ask=3900, av=1)) == (3900, 1)
    assert crossing(Direction.BUY, 3900, quote(ask=3901)) is None
    assert crossing(Direction.SELL, None, quote(bid=3000, bv=1, down=3600)) is None   # below limit-down
