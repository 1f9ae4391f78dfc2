"""qaorder: order model, state machine, dialect decoding and (pure) routing decisions."""
from qaorder.dialects import Dialect, decode_order
from qaorder.models import (
    AccountSnapshot, AuditRecord, Cancel, Direction, Exchange, ForceClose, Halt, Offset, Order, OrderRejected,
    OrderStatus, OrderStatusReport, PriceType, Reject, Release, Resume, Trade, position_key,
)
from qaorder.routing import (
    FollowerRule, ForceClosePlan, PriceMode, RoutingDecision, Sizing, child_id, plan_force_close, route, route_cancel,
)
from qaorder.state import ORDER_STATE_TABLE, Applied, InvalidTransition, OrderBook, OrderEvent, OrderState, UnknownOrder

__all__ = [
    "AccountSnapshot", "Applied", "AuditRecord", "Cancel", "Dialect", "Direction", "Exchange", "FollowerRule",
    "ForceClose", "ForceClosePlan", "Halt", "InvalidTransition", "ORDER_STATE_TABLE", "Offset", "Order", "OrderBook",
    "OrderEvent", "OrderRejected", "OrderState", "OrderStatus", "OrderStatusReport", "PriceMode", "PriceType",
    "Reject", "Release", "Resume", "RoutingDecision", "Sizing", "Trade", "UnknownOrder", "child_id", "decode_order",
    "plan_force_close", "position_key", "route", "route_cancel",
]
