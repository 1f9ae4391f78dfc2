"""The order state machine: one table, one error, idempotent application of reports.

``ORDER_STATE_TABLE[(status, event)] -> next_status`` (nautilus_trader's
``_ORDER_STATE_TABLE`` shape). A pair that is not in the table is an
:class:`InvalidTransition`. The table also encodes what to do with late or repeated
reports: a stale event maps a status onto itself (e.g. a late NOTTRADED ack after
PARTTRADED keeps PARTTRADED), so status never moves backwards and duplicates are no-ops.

Reports arrive from executors over a broker that redelivers, and trades and status
reports travel on different paths, so :class:`OrderState` accepts them in any order:

* fills are de-duplicated by ``trade_id``; traded volume only grows;
* traded volume is ``max(sum of distinct fills, highest cumulative 'traded' reported)``;
* an over-fill (more traded than ordered) or a fill on a rejected order is an
  :class:`InvalidTransition` (a broker bug the account must not absorb).
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from qaorder.models import Order, OrderStatus, OrderStatusReport, Trade

__all__ = ["OrderEvent", "ORDER_STATE_TABLE", "InvalidTransition", "UnknownOrder", "Applied", "OrderState",
           "OrderBook", "next_status"]

S = OrderStatus


class OrderEvent(str, enum.Enum):
    SUBMITTED = "SUBMITTED"            # the executor says it is still submitting
    ACCEPTED = "ACCEPTED"              # NOTTRADED ack
    PART_FILLED = "PART_FILLED"        # a fill (or report) leaving volume open
    FILLED = "FILLED"                  # traded == volume
    CANCEL_REQUESTED = "CANCEL_REQUESTED"
    CANCEL_REJECTED = "CANCEL_REJECTED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"


E = OrderEvent
#: marker: go back to the status the order had before the cancel request
_RESTORE = "RESTORE"

ORDER_STATE_TABLE: dict[tuple[OrderStatus, OrderEvent], OrderStatus | str] = {
    # SUBMITTING: anything the executor says first is news
    (S.SUBMITTING, E.SUBMITTED): S.SUBMITTING,
    (S.SUBMITTING, E.ACCEPTED): S.NOTTRADED,
    (S.SUBMITTING, E.PART_FILLED): S.PARTTRADED,      # fill before the ack
    (S.SUBMITTING, E.FILLED): S.ALLTRADED,
    (S.SUBMITTING, E.CANCEL_REQUESTED): S.PENDING_CANCEL,
    (S.SUBMITTING, E.CANCELLED): S.CANCELLED,
    (S.SUBMITTING, E.REJECTED): S.REJECTED,
    # NOTTRADED
    (S.NOTTRADED, E.SUBMITTED): S.NOTTRADED,          # stale
    (S.NOTTRADED, E.ACCEPTED): S.NOTTRADED,           # duplicate
    (S.NOTTRADED, E.PART_FILLED): S.PARTTRADED,
    (S.NOTTRADED, E.FILLED): S.ALLTRADED,
    (S.NOTTRADED, E.CANCEL_REQUESTED): S.PENDING_CANCEL,
    (S.NOTTRADED, E.CANCELLED): S.CANCELLED,
    (S.NOTTRADED, E.REJECTED): S.REJECTED,            # exchange-side reject after the broker ack
    # PARTTRADED
    (S.PARTTRADED, E.SUBMITTED): S.PARTTRADED,        # stale
    (S.PARTTRADED, E.ACCEPTED): S.PARTTRADED,         # late ack: never backwards
    (S.PARTTRADED, E.PART_FILLED): S.PARTTRADED,
    (S.PARTTRADED, E.FILLED): S.ALLTRADED,
    (S.PARTTRADED, E.CANCEL_REQUESTED): S.PENDING_CANCEL,
    (S.PARTTRADED, E.CANCELLED): S.CANCELLED,         # rest cancelled, fills stay
    # PENDING_CANCEL: fills may still come in; the cancel may fail
    (S.PENDING_CANCEL, E.SUBMITTED): S.PENDING_CANCEL,
    (S.PENDING_CANCEL, E.ACCEPTED): S.PENDING_CANCEL,
    (S.PENDING_CANCEL, E.PART_FILLED): S.PENDING_CANCEL,
    (S.PENDING_CANCEL, E.FILLED): S.ALLTRADED,
    (S.PENDING_CANCEL, E.CANCEL_REQUESTED): S.PENDING_CANCEL,
    (S.PENDING_CANCEL, E.CANCEL_REJECTED): _RESTORE,
    (S.PENDING_CANCEL, E.CANCELLED): S.CANCELLED,
    (S.PENDING_CANCEL, E.REJECTED): S.REJECTED,
    # ALLTRADED: terminal; late reports are ignored, a cancel comes too late
    (S.ALLTRADED, E.SUBMITTED): S.ALLTRADED,
    (S.ALLTRADED, E.ACCEPTED): S.ALLTRADED,
    (S.ALLTRADED, E.PART_FILLED): S.ALLTRADED,
    (S.ALLTRADED, E.FILLED): S.ALLTRADED,
    (S.ALLTRADED, E.CANCEL_REQUESTED): S.ALLTRADED,
    (S.ALLTRADED, E.CANCEL_REJECTED): S.ALLTRADED,
    # CANCELLED: terminal; a fill that happened before the cancel may be reported after it
    (S.CANCELLED, E.SUBMITTED): S.CANCELLED,
    (S.CANCELLED, E.ACCEPTED): S.CANCELLED,
    (S.CANCELLED, E.PART_FILLED): S.CANCELLED,
    (S.CANCELLED, E.FILLED): S.ALLTRADED,             # a fill is a fact: if it completes the order, it was never cancelled
    (S.CANCELLED, E.CANCEL_REQUESTED): S.CANCELLED,
    (S.CANCELLED, E.CANCEL_REJECTED): S.CANCELLED,
    (S.CANCELLED, E.CANCELLED): S.CANCELLED,
    # REJECTED: terminal; nothing traded, so a fill is a contradiction (not in the table)
    (S.REJECTED, E.SUBMITTED): S.REJECTED,
    (S.REJECTED, E.CANCEL_REQUESTED): S.REJECTED,
    (S.REJECTED, E.CANCEL_REJECTED): S.REJECTED,
    (S.REJECTED, E.CANCELLED): S.REJECTED,
    (S.REJECTED, E.REJECTED): S.REJECTED,
}

#: which event a reported status stands for
_REPORT_EVENT = {
    S.SUBMITTING: E.SUBMITTED,
    S.NOTTRADED: E.ACCEPTED,
    S.PARTTRADED: E.PART_FILLED,
    S.ALLTRADED: E.FILLED,
    S.PENDING_CANCEL: E.CANCEL_REQUESTED,
    S.CANCELLED: E.CANCELLED,
    S.REJECTED: E.REJECTED,
}


class InvalidTransition(ValueError):
    """A (status, event) pair the table does not allow, or an impossible fill."""

    def __init__(self, order_id: str, status: OrderStatus, event: OrderEvent | str, detail: str = "") -> None:
        self.order_id = order_id
        self.status = status
        self.event = event
        ev = event.value if isinstance(event, OrderEvent) else event
        super().__init__(f"order {order_id}: {ev} is not allowed in status {status.value}" + (f" ({detail})" if detail else ""))


class UnknownOrder(KeyError):
    """A report for an order the book does not hold."""


def next_status(order_id: str, status: OrderStatus, event: OrderEvent) -> OrderStatus | str:
    try:
        return ORDER_STATE_TABLE[(status, event)]
    except KeyError:
        raise InvalidTransition(order_id, status, event) from None


@dataclass(frozen=True)
class Applied:
    """What applying one report did. ``changed`` is False for duplicates and stale reports."""

    order_id: str
    previous: OrderStatus
    status: OrderStatus
    traded: int
    changed: bool
    new_fill: Trade | None = None
    duplicate: bool = False


@dataclass
class OrderState:
    order: Order
    status: OrderStatus = OrderStatus.SUBMITTING
    fills: dict[str, Trade] = field(default_factory=dict)
    reported_traded: int = 0
    reported_avg_price: float = 0.0
    reason: str = ""
    _before_cancel: OrderStatus | None = None
    _seen_reports: set[str] = field(default_factory=set)

    # -- derived -------------------------------------------------------------
    @property
    def order_id(self) -> str:
        return self.order.order_id

    @property
    def volume(self) -> int:
        return self.order.volume

    @property
    def filled_by_trades(self) -> int:
        return sum(t.volume for t in self.fills.values())

    @property
    def traded(self) -> int:
        return max(self.filled_by_trades, self.reported_traded)

    @property
    def left(self) -> int:
        return self.volume - self.traded if not self.status.is_terminal else 0

    @property
    def avg_price(self) -> float:
        filled = self.filled_by_trades
        if filled and filled >= self.reported_traded:
            return sum(t.price * t.volume for t in self.fills.values()) / filled
        return self.reported_avg_price

    @property
    def is_working(self) -> bool:
        return not self.status.is_terminal

    # -- transitions ---------------------------------------------------------
    def _step(self, event: OrderEvent) -> OrderStatus:
        nxt = next_status(self.order_id, self.status, event)
        if nxt == _RESTORE:
            nxt = S.PARTTRADED if self.traded else (self._before_cancel or S.NOTTRADED)
        assert isinstance(nxt, OrderStatus)
        if nxt is S.PENDING_CANCEL and self.status is not S.PENDING_CANCEL:
            self._before_cancel = self.status
        return nxt

    def _fill_event(self, traded: int) -> OrderEvent:
        return E.FILLED if traded >= self.volume else E.PART_FILLED

    def _commit(self, previous: OrderStatus, status: OrderStatus, prev_traded: int, **kw: object) -> Applied:
        self.status = status
        changed = status is not previous or self.traded != prev_traded
        return Applied(self.order_id, previous, status, self.traded, changed, **kw)  # type: ignore[arg-type]

    def request_cancel(self) -> Applied:
        prev, prev_traded = self.status, self.traded
        return self._commit(prev, self._step(E.CANCEL_REQUESTED), prev_traded)

    def cancel_rejected(self, reason: str = "") -> Applied:
        prev, prev_traded = self.status, self.traded
        nxt = self._step(E.CANCEL_REJECTED)
        self.reason = reason or self.reason
        return self._commit(prev, nxt, prev_traded)

    def apply_trade(self, trade: Trade) -> Applied:
        if trade.order_id != self.order_id:
            raise InvalidTransition(self.order_id, self.status, E.PART_FILLED, f"trade {trade.trade_id} is for order {trade.order_id}")
        prev, prev_traded = self.status, self.traded
        if trade.trade_id in self.fills:
            return Applied(self.order_id, prev, prev, prev_traded, False, duplicate=True)
        if (trade.symbol, trade.exchange, trade.direction) != (self.order.symbol, self.order.exchange, self.order.direction):
            raise InvalidTransition(self.order_id, prev, E.PART_FILLED, f"trade {trade.trade_id} does not match the order's instrument/direction")
        filled = self.filled_by_trades + trade.volume
        if filled > self.volume:
            raise InvalidTransition(self.order_id, prev, E.PART_FILLED,
                                    f"over-fill: {filled} traded > {self.volume} ordered (trade {trade.trade_id})")
        nxt = self._step(self._fill_event(max(filled, self.reported_traded)))
        self.fills[trade.trade_id] = trade
        return self._commit(prev, nxt, prev_traded, new_fill=trade)

    def apply_report(self, report: OrderStatusReport) -> Applied:
        prev, prev_traded = self.status, self.traded
        if report.order_id != self.order_id:
            raise InvalidTransition(self.order_id, prev, _REPORT_EVENT[report.status], f"report is for order {report.order_id}")
        if report.id in self._seen_reports:
            return Applied(self.order_id, prev, prev, prev_traded, False, duplicate=True)
        if report.traded > self.volume:
            raise InvalidTransition(self.order_id, prev, _REPORT_EVENT[report.status],
                                    f"over-fill: report says {report.traded} traded > {self.volume} ordered")
        event = _REPORT_EVENT[report.status]
        # A fill-carrying report is judged by the volume, not by its label: a cancel report
        # with traded == volume means the order completed.
        traded = max(self.traded, report.traded)
        if traded >= self.volume and event is not E.REJECTED:
            event = E.FILLED
        elif event in (E.PART_FILLED, E.FILLED):
            event = self._fill_event(traded)
        elif event in (E.ACCEPTED, E.SUBMITTED) and traded > 0:
            event = E.PART_FILLED
        nxt = self._step(event)
        if report.traded > self.reported_traded:
            self.reported_traded = report.traded
            self.reported_avg_price = report.avg_price
        if report.reason:
            self.reason = report.reason
        self._seen_reports.add(report.id)
        return self._commit(prev, nxt, prev_traded)


class OrderBook:
    """All known orders of one router/account process, by ``order_id``."""

    def __init__(self) -> None:
        self._orders: dict[str, OrderState] = {}

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._orders

    def __len__(self) -> int:
        return len(self._orders)

    def __iter__(self) -> Iterator[OrderState]:
        return iter(self._orders.values())

    def get(self, order_id: str) -> OrderState:
        try:
            return self._orders[order_id]
        except KeyError:
            raise UnknownOrder(order_id) from None

    def add(self, order: Order) -> tuple[OrderState, bool]:
        """Register an order; a redelivered order (same id) returns the existing state and False.

        The same id with a different body is an error: ids must be unique per sender.
        """
        st = self._orders.get(order.order_id)
        if st is not None:
            if _order_fields(st.order) != _order_fields(order):
                raise InvalidTransition(order.order_id, st.status, "SUBMIT", "order id reused with a different order")
            return st, False
        st = self._orders[order.order_id] = OrderState(order)
        return st, True

    def on_trade(self, trade: Trade) -> Applied:
        return self.get(trade.order_id).apply_trade(trade)

    def on_report(self, report: OrderStatusReport) -> Applied:
        return self.get(report.order_id).apply_report(report)

    def request_cancel(self, order_id: str) -> Applied:
        return self.get(order_id).request_cancel()

    def working(self, account: str | None = None) -> list[OrderState]:
        return [s for s in self._orders.values() if s.is_working and (account is None or s.order.account == account)]

    def extend(self, orders: Iterable[Order]) -> None:
        for o in orders:
            self.add(o)


def _order_fields(o: Order) -> tuple[object, ...]:
    return (o.account, o.symbol, o.exchange, o.direction, o.offset, o.price_type, o.price, o.volume, o.parent_id)
