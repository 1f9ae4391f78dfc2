from __future__ import annotations

import pytest

from qaorder.models import Direction, Order, OrderRejected, PriceType


def test_order_built_with_strings_gets_enums() -> None:
    o = Order(order_id="o1", account="a", symbol="rb2512", exchange="SHFE", direction="BUY", offset="OPEN",
              price_type="MARKET", price=None, volume=1)
    assert o.direction is Direction.BUY and o.price_type is PriceType.MARKET


def test_order_built_with_a_bad_enum_string_names_the_field() -> None:
    with pytest.raises(OrderRejected) as err:
        Order(order_id="o1", account="a", symbol="rb2512", exchange="SHFE", direction="LONG", offset="OPEN",
              price_type="LIMIT", price=1.0, volume=1)
    assert err.value.field == "direction"
