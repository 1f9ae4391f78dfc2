"""The account daemon applies a message only from where its type is sent (pure: no I/O)."""
from __future__ import annotations

from handlers.account import source_error
from qaorder.models import Cancel, Direction, Offset, Order, OrderStatus, OrderStatusReport, PriceType, Trade
from qapubsub.topology import Topology

T = Topology("t-src.")
ORDER = Order(order_id="o1", account="A", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
              offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3900.0, volume=1)
TRADE = Trade(trade_id="o1-1", order_id="o1", account="A", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
              offset=Offset.OPEN, price=3900.0, volume=1, trade_time=1)
STATUS = OrderStatusReport(order_id="o1", account="A", status=OrderStatus.CANCELLED)


def test_each_type_is_accepted_from_its_own_exchange_and_key() -> None:
    assert source_error(ORDER, T.exec, "A", T) is None
    assert source_error(Cancel(order_id="o1", account="A"), T.exec, "A", T) is None
    assert source_error(TRADE, T.report, "A.trade", T) is None
    assert source_error(STATUS, T.report, "A.order", T) is None


def test_an_order_on_qa_report_a_trade_on_qa_exec_or_another_accounts_key_is_refused() -> None:
    why = source_error(ORDER, T.report, "A.order", T)
    assert why is not None and "'t-src.qa.report'" in why and "only accepted from 't-src.qa.exec' key 'A'" in why
    assert source_error(TRADE, T.exec, "A", T) is not None            # a forged fill
    assert source_error(TRADE, T.report, "B.trade", T) is not None    # A's trade under B's key
    assert source_error(STATUS, T.report, "A.trade", T) is not None   # a status report as a trade
    assert source_error(ORDER, T.exec, "B", T) is not None
