"""Order-side messages: orders, cancels, risk commands and the reports that come back.

Every class is a :class:`qapubsub.messages.Message` (``schema``/``version``/``id``/``ts``
envelope). Commands are strict (``forbid_unknown_fields=True``): a misspelt or unknown
field is an error, and no order field that changes what is traded has a default.

Enum values on the wire are their stable upper-case names (``BUY``, ``CLOSETODAY``,
``ALLTRADED``), never display strings.

Cross-field rules (a LIMIT order needs a finite positive price, ...) run in
``__post_init__`` and raise :class:`OrderRejected`, which names the offending field; on
decode msgspec wraps it in a ``ValidationError`` whose ``__cause__`` is the
``OrderRejected`` (see :func:`qaorder.dialects.decode_order`).
"""
from __future__ import annotations

import enum
import math
from typing import Annotated, Any

import msgspec

from qapubsub.messages import Message

__all__ = [
    "Direction", "Offset", "PriceType", "OrderStatus", "Exchange", "FUTURE_EXCHANGES", "STOCK_EXCHANGES",
    "SPLIT_TODAY_EXCHANGES", "OrderRejected", "Order", "Cancel", "ForceClose", "Release", "Halt", "Resume",
    "OrderStatusReport",
    "Trade", "Reject", "AccountSnapshot", "AuditRecord", "COMMANDS", "REPORTS", "position_key",
]


class OrderRejected(ValueError):
    """An order/cancel that cannot be accepted. ``field`` names the offending field (``""``
    when the whole body is at fault); ``str()`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str, *, order_id: str | None = None, account: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.order_id = order_id
        self.account = account
        super().__init__(f"{field}: {reason}" if field else reason)


class Direction(str, enum.Enum):
    BUY = "BUY"
    SELL = "SELL"

    @property
    def opposite(self) -> Direction:
        return Direction.SELL if self is Direction.BUY else Direction.BUY

    @property
    def sign(self) -> int:
        return 1 if self is Direction.BUY else -1


class Offset(str, enum.Enum):
    OPEN = "OPEN"
    CLOSE = "CLOSE"
    CLOSETODAY = "CLOSETODAY"
    CLOSEYESTERDAY = "CLOSEYESTERDAY"

    @property
    def is_close(self) -> bool:
        return self is not Offset.OPEN


class PriceType(str, enum.Enum):
    LIMIT = "LIMIT"
    MARKET = "MARKET"
    FAK = "FAK"   # fill-and-kill (IOC) at a limit price
    FOK = "FOK"   # fill-or-kill at a limit price


class OrderStatus(str, enum.Enum):
    SUBMITTING = "SUBMITTING"
    NOTTRADED = "NOTTRADED"
    PARTTRADED = "PARTTRADED"
    ALLTRADED = "ALLTRADED"
    PENDING_CANCEL = "PENDING_CANCEL"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"

    @property
    def is_terminal(self) -> bool:
        return self in (OrderStatus.ALLTRADED, OrderStatus.CANCELLED, OrderStatus.REJECTED)


class Exchange(str, enum.Enum):
    SHFE = "SHFE"
    INE = "INE"
    DCE = "DCE"
    CZCE = "CZCE"
    CFFEX = "CFFEX"
    GFEX = "GFEX"
    SSE = "SSE"
    SZSE = "SZSE"
    BSE = "BSE"


FUTURE_EXCHANGES = frozenset({Exchange.SHFE, Exchange.INE, Exchange.DCE, Exchange.CZCE, Exchange.CFFEX, Exchange.GFEX})
STOCK_EXCHANGES = frozenset({Exchange.SSE, Exchange.SZSE, Exchange.BSE})
#: exchanges that keep today's and yesterday's positions apart (close-today must be explicit)
SPLIT_TODAY_EXCHANGES = frozenset({Exchange.SHFE, Exchange.INE})


def position_key(exchange: str | Exchange, symbol: str) -> str:
    """QIFI position key ``"EXCHANGE.symbol"``."""
    ex = exchange.value if isinstance(exchange, Exchange) else exchange
    return f"{ex}.{symbol}"


# Field types -------------------------------------------------------------------------
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^\S+$")]
#: an account or group: a routing-key word (no '.', '*', '#', white space)
Target = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[^.*#\s]+$")]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_\-]+$")]
Volume = Annotated[int, msgspec.Meta(gt=0)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=512)]
Required = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


def _finite_positive(field: str, value: float | None, **ids: Any) -> None:
    if value is None:
        raise OrderRejected(field, "missing", **ids)
    if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise OrderRejected(field, f"must be a finite number > 0, got {value!r}", **ids)


def _coerce_enums(msg: Any, fields: tuple[tuple[str, type[enum.Enum]], ...], **ids: Any) -> None:
    """Messages built in code (not decoded) keep plain strings in msgspec: turn them into the enums."""
    for name, enum_type in fields:
        value = getattr(msg, name)
        if not isinstance(value, enum_type):
            try:
                setattr(msg, name, enum_type(value))
            except ValueError:
                raise OrderRejected(name, f"{value!r} is not one of {', '.join(m.value for m in enum_type)}",
                                    **ids) from None


class Order(Message, tag="qa.order", forbid_unknown_fields=True):
    """A new order. ``account`` is the target: an account, or a group name the router expands.

    ``price`` is required (finite, > 0) for LIMIT/FAK/FOK; for MARKET it may be ``None`` or
    a protective limit. ``order_time`` is UTC nanoseconds when the sender made the order.
    """

    order_id: Id
    account: Target
    symbol: Symbol
    exchange: Exchange
    direction: Direction
    offset: Offset
    price_type: PriceType
    price: float | None
    volume: Volume
    strategy_id: Text = ""
    order_time: int | None = None
    parent_id: Id | None = None
    reduce_only: bool = False
    source: Text = "native"
    correlation_id: Id | None = None

    def __post_init__(self) -> None:
        ids = {"order_id": self.order_id, "account": self.account}
        _coerce_enums(self, (("exchange", Exchange), ("direction", Direction), ("offset", Offset),
                             ("price_type", PriceType)), **ids)
        if self.price_type is PriceType.MARKET:
            if self.price is not None:
                _finite_positive("price", self.price, **ids)
        else:
            _finite_positive("price", self.price, **ids)
        if self.reduce_only and self.offset is Offset.OPEN:
            raise OrderRejected("offset", "OPEN contradicts reduce_only", **ids)
        if self.order_time is not None and self.order_time < 0:
            raise OrderRejected("order_time", "must be >= 0 (UTC nanoseconds)", **ids)

    @property
    def key(self) -> str:
        return position_key(self.exchange, self.symbol)


class Cancel(Message, tag="qa.cancel", forbid_unknown_fields=True):
    order_id: Id
    account: Target
    reason: Text = ""
    correlation_id: Id | None = None


class ForceClose(Message, tag="qa.forceclose", forbid_unknown_fields=True):
    """Risk desk: cancel the account's working orders and flatten its positions.

    ``symbols`` (``"EXCHANGE.symbol"`` keys or bare symbols) limits it to some instruments;
    ``None`` means everything.
    """

    command_id: Id
    account: Target
    reason: Required
    operator: Required
    symbols: list[Annotated[str, msgspec.Meta(min_length=1, max_length=48)]] | None = None
    correlation_id: Id | None = None


class Release(Message, tag="qa.release", forbid_unknown_fields=True):
    """Risk desk: lift the trading block a ForceClose put on the account."""

    command_id: Id
    account: Target
    operator: Required
    reason: Text = ""
    correlation_id: Id | None = None


class Halt(Message, tag="qa.halt", forbid_unknown_fields=True):
    """Risk desk: refuse every new order of the account, opening or closing, until a Resume.

    Stricter than a ForceClose's reduce-only and independent of it: working orders stay
    working (cancels still pass), positions are not touched."""

    command_id: Id
    account: Target
    reason: Required
    operator: Required
    correlation_id: Id | None = None


class Resume(Message, tag="qa.resume", forbid_unknown_fields=True):
    """Risk desk: lift a Halt (a force-close's reduce-only, if any, stays until its Release)."""

    command_id: Id
    account: Target
    operator: Required
    reason: Text = ""
    correlation_id: Id | None = None


class OrderStatusReport(Message, tag="qa.order_status", forbid_unknown_fields=True):
    """An executor's view of an order. ``traded`` is cumulative; ``avg_price`` its mean price."""

    order_id: Id
    account: Target
    status: OrderStatus
    traded: NonNeg = 0
    avg_price: float = 0.0
    volume: NonNeg | None = None
    reason: Text = ""
    exchange_order_id: str | None = None
    symbol: Symbol | None = None
    exchange: Exchange | None = None


class Trade(Message, tag="qa.trade", forbid_unknown_fields=True):
    """One fill. ``commission`` ``None`` lets the account compute it from the fee table."""

    trade_id: Id
    order_id: Id
    account: Target
    symbol: Symbol
    exchange: Exchange
    direction: Direction
    offset: Offset
    price: float
    volume: Volume
    trade_time: int
    commission: float | None = None

    def __post_init__(self) -> None:
        _coerce_enums(self, (("exchange", Exchange), ("direction", Direction), ("offset", Offset)),
                      order_id=self.order_id, account=self.account)
        _finite_positive("price", self.price, order_id=self.order_id, account=self.account)
        if self.commission is not None and (not math.isfinite(self.commission) or self.commission < 0):
            raise OrderRejected("commission", "must be finite and >= 0", order_id=self.order_id, account=self.account)

    @property
    def key(self) -> str:
        return position_key(self.exchange, self.symbol)


class Reject(Message, tag="qa.reject", forbid_unknown_fields=True):
    """Report: an order/cancel/command was refused. ``field`` names the offending field."""

    account: str
    field: str
    reason: str
    order_id: str | None = None
    dialect: str = ""
    routing_key: str = ""

    @classmethod
    def from_error(cls, exc: OrderRejected, *, routing_key: str = "", dialect: str = "") -> Reject:
        return cls(account=exc.account or routing_key, field=exc.field, reason=exc.reason,
                   order_id=exc.order_id, dialect=dialect, routing_key=routing_key)


class AccountSnapshot(Message, tag="qa.account"):
    """A QIFI-shaped account document (see :meth:`qaaccount.account.Account.to_qifi`)."""

    account_cookie: str
    trading_day: str
    accounts: dict[str, Any]
    positions: dict[str, dict[str, Any]]
    orders: dict[str, dict[str, Any]] = {}
    trades: dict[str, dict[str, Any]] = {}
    frozen: dict[str, dict[str, Any]] = {}


class AuditRecord(msgspec.Struct, kw_only=True, frozen=True):
    """One routing decision, kept for the audit trail (``<account>.audit`` reports)."""

    action: str            # "direct" | "group" | "follow" | "skip" | "cancel" | "forceclose"
    parent_id: str
    account: str
    child_id: str | None = None
    rule_id: str | None = None
    detail: str = ""


COMMANDS = Order | Cancel
REPORTS = OrderStatusReport | Trade | Reject
