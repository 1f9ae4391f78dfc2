"""Router pieces that need no server: risk-hook answers, QIFI positions, rule documents."""
from __future__ import annotations

from handlers.router import _Instruments, _rejection
from qaorder.models import Direction, Exchange, Offset, Order, OrderRejected, PriceType
from qaorder.routing import FollowerRule, Sizing
from qaorder.store import QifiPosition, rule_from_doc, rule_to_doc

ORDER = Order(order_id="o1", account="a", symbol="rb2512", exchange=Exchange.SHFE, direction=Direction.BUY,
              offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3900.0, volume=1)


def test_risk_hook_answers() -> None:
    assert _rejection(None, ORDER) is None
    assert _rejection("too big", ORDER) == ("risk", "too big")
    assert _rejection(OrderRejected("volume", "over 10"), ORDER) == ("volume", "over 10")

    class Rej:
        def to_order_rejected(self, order: Order) -> OrderRejected:
            return OrderRejected("risk.size.max_volume", "over", order_id=order.order_id)

    assert _rejection(Rej(), ORDER) == ("risk.size.max_volume", "over")


def test_rule_document_round_trip_tolerates_integer_booleans() -> None:
    rule = FollowerRule(rule_id="r1", leader="L", follower="F", sizing=Sizing.FIXED, fixed_volume=2, reverse=True,
                        symbols=frozenset({"rb2512"}))
    doc = rule_to_doc(rule)
    assert doc["_id"] == "r1" and doc["symbols"] == ["rb2512"]
    doc["reverse"], doc["enabled"] = 1, 1          # how nx-27017 reads booleans back
    assert rule_from_doc(doc) == rule


def test_qifi_position_view_and_instruments() -> None:
    p = QifiPosition("SHFE.rb2512", {"volume_long_his": 2, "volume_short_today": 1})
    assert (p.exchange, p.symbol) == ("SHFE", "rb2512")
    assert p.bucket("long_his").volume == 2 and p.bucket("long_today").volume == 0
    inst = _Instruments()
    assert inst.get("SHFE.rb2512").lot_size >= 1
    assert inst.get("SHFE.zz9999") is None
