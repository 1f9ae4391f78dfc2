"""Strict decoding of what arrives on the ``qaorder`` exchange, in either dialect.

* **native**: our :class:`~qaorder.models.Order` / :class:`~qaorder.models.Cancel` JSON
  (has a ``schema`` field: ``"qa.order"`` or ``"qa.cancel"``).
* **qatrader**: QATrader's JSON (has a ``topic`` field: ``"sendorder"`` or
  ``"cancel_order"``), as QUANTAXIS strategies publish it with QAPUBSUB.

Anything missing or invalid raises :class:`~qaorder.models.OrderRejected` naming the field
(``OrderRejected(field="price", reason="missing")``). Nothing is ever defaulted: QATrader
itself filled a missing order with ``rb1905 @ 3925 BUY OPEN x1``.

Routing-key rule (both dialects): the routing key is the target. The body's target
(``account`` / ``account_cookie``) is required and must equal the routing key; a
mismatch is rejected on the body field (``account_cookie: does not match routing key``).
Why: QAPUBSUB's ``publisher_routing`` publishes with ``routing_key=account_cookie``, so a
difference means a bug on the sender's side, and guessing which of the two was meant
could send an order to the wrong account. A group order in QATrader's dialect therefore
carries the group name in ``account_cookie``.

QATrader mapping (see :data:`QATRADER_FIELDS` and the README table in the report):

==================  ====================  =============================================
QATrader            ours                  accepted
==================  ====================  =============================================
topic               message kind          ``sendorder`` -> Order, ``cancel_order`` -> Cancel
account_cookie      account               required, == routing key
code                symbol                required, ``[A-Za-z0-9_-]{1,32}``, case kept
exchange_id         exchange              required; SHFE INE DCE CZCE CFFEX GFEX SSE SZSE BSE,
                                          any case (QUANTAXIS writes ``sse``/``szse``)
order_direction     direction (+offset)   ``BUY``/``SELL`` or 1/-1; combined
                                          ``BUY_OPEN`` 2, ``BUY_CLOSE`` 3, ``BUY_CLOSETODAY`` 4,
                                          ``SELL_OPEN`` -2, ``SELL_CLOSE`` -3,
                                          ``SELL_CLOSETODAY`` -4 (QUANTAXIS ORDER_DIRECTION);
                                          any case; 0/5/6 (ASK/XDXR/OTHER) rejected
order_offset        offset                ``OPEN`` ``CLOSE`` ``CLOSETODAY`` ``CLOSEYESTERDAY``;
                                          required for futures unless implied by a combined
                                          direction (then must agree); optional for stocks
                                          (BUY->OPEN, SELL->CLOSE, as the OTG protocol says)
price               price                 required, finite number > 0 (LIMIT)
volume              volume                required, integer > 0 (``2.0`` accepted, ``2.5`` not)
order_id            order_id              string; if absent/false, derived from
                                          sha256(routing key + body) -- needs order_time
order_time          order_time            optional; ``"YYYY-MM-DD HH:MM:SS[.ffffff]"``
                                          (Beijing time) or epoch ns/ms/s number
strategy_id         strategy_id           optional string
price_type          price_type            optional extension; LIMIT if absent (the only
                                          kind QATrader's send path ever produced)
==================  ====================  =============================================
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import re
from typing import Any

import msgspec

from qaorder.models import (
    STOCK_EXCHANGES, Cancel, Direction, Exchange, Offset, Order, OrderRejected, PriceType,
)

__all__ = ["decode_order", "Dialect", "QATRADER_FIELDS", "QATRADER_DIRECTIONS", "derive_order_id",
           "parse_order_time"]


class Dialect:
    NATIVE = "native"
    QATRADER = "qatrader"


#: QUANTAXIS ORDER_DIRECTION (QAUtil/QAParameter.py): value -> (direction, implied offset)
QATRADER_DIRECTIONS: dict[int | str, tuple[Direction, Offset | None]] = {
    1: (Direction.BUY, None), -1: (Direction.SELL, None),
    2: (Direction.BUY, Offset.OPEN), -2: (Direction.SELL, Offset.OPEN),
    3: (Direction.BUY, Offset.CLOSE), -3: (Direction.SELL, Offset.CLOSE),
    4: (Direction.BUY, Offset.CLOSETODAY), -4: (Direction.SELL, Offset.CLOSETODAY),
    "BUY": (Direction.BUY, None), "SELL": (Direction.SELL, None),
    "BUY_OPEN": (Direction.BUY, Offset.OPEN), "SELL_OPEN": (Direction.SELL, Offset.OPEN),
    "BUY_CLOSE": (Direction.BUY, Offset.CLOSE), "SELL_CLOSE": (Direction.SELL, Offset.CLOSE),
    "BUY_CLOSETODAY": (Direction.BUY, Offset.CLOSETODAY), "SELL_CLOSETODAY": (Direction.SELL, Offset.CLOSETODAY),
}

QATRADER_FIELDS = {
    "sendorder": frozenset({"topic", "account_cookie", "strategy_id", "code", "price", "order_direction",
                            "order_offset", "volume", "order_time", "exchange_id", "order_id", "price_type"}),
    "cancel_order": frozenset({"topic", "account_cookie", "order_id", "strategy_id", "order_time"}),
}

_CST = _dt.timezone(_dt.timedelta(hours=8), "Asia/Shanghai")   # China has no DST
_SYMBOL = re.compile(r"^[A-Za-z0-9_\-]{1,32}$")
_ID = re.compile(r"^\S{1,128}$")
_MSGSPEC_FIELD = re.compile(r"`\$\.([A-Za-z_][A-Za-z0-9_]*)|field `([A-Za-z_][A-Za-z0-9_]*)`")
_body_decoder = msgspec.json.Decoder()
_native_decoder = msgspec.json.Decoder(Order | Cancel)


def decode_order(body: bytes | bytearray | memoryview | str, routing_key: str) -> tuple[Order | Cancel, str]:
    """Decode one body from the ``qaorder`` exchange. Returns ``(message, dialect)``.

    Raises :class:`OrderRejected` (``field``, ``reason``, and ``order_id``/``account``
    when they could be read) for anything that is not a valid order or cancel.
    """
    if isinstance(body, str):
        body = body.encode()
    raw = bytes(body)
    try:
        obj = _body_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise OrderRejected("", f"not valid JSON: {exc}", account=routing_key or None) from None
    if not isinstance(obj, dict):
        raise OrderRejected("", "body must be a JSON object", account=routing_key or None)
    ids = _ids(obj)
    has_schema, has_topic = "schema" in obj, "topic" in obj
    if has_schema and has_topic:
        raise OrderRejected("topic", "a body carries either 'schema' (native) or 'topic' (QATrader), not both", **ids)
    if has_topic:
        return _decode_qatrader(obj, raw, routing_key, ids), Dialect.QATRADER
    if not has_schema:
        raise OrderRejected("schema", "missing (native 'schema' or QATrader 'topic' expected)", **ids)
    return _decode_native(raw, routing_key, ids), Dialect.NATIVE


def _ids(obj: dict[str, Any]) -> dict[str, str | None]:
    oid = obj.get("order_id")
    acc = obj.get("account", obj.get("account_cookie"))
    return {"order_id": oid if isinstance(oid, str) and oid else None,
            "account": acc if isinstance(acc, str) and acc else None}


# native ------------------------------------------------------------------------------
def _decode_native(raw: bytes, routing_key: str, ids: dict[str, str | None]) -> Order | Cancel:
    try:
        msg = _native_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        cause = exc.__cause__
        if isinstance(cause, OrderRejected):
            raise cause from None
        text = str(exc)
        m = _MSGSPEC_FIELD.search(text)
        fld = (m.group(1) or m.group(2)) if m else ""
        reason = "missing" if text.startswith("Object missing required field") else text
        raise OrderRejected(fld, reason, **ids) from None
    except msgspec.DecodeError as exc:  # pragma: no cover - already parsed once
        raise OrderRejected("", f"not valid JSON: {exc}", **ids) from None
    if msg.account != routing_key:
        raise OrderRejected("account", f"{msg.account!r} does not match routing key {routing_key!r}",
                            order_id=msg.order_id, account=msg.account)
    return msg


# QATrader ----------------------------------------------------------------------------
def _need(obj: dict[str, Any], name: str, ids: dict[str, str | None]) -> Any:
    if name not in obj or obj[name] is None:
        raise OrderRejected(name, "missing", **ids)
    return obj[name]


def _string(obj: dict[str, Any], name: str, ids: dict[str, str | None], *, required: bool = True) -> str | None:
    if not required and obj.get(name) is None:
        return None
    v = _need(obj, name, ids)
    if not isinstance(v, str):
        raise OrderRejected(name, f"must be a string, got {type(v).__name__}", **ids)
    if not v:
        raise OrderRejected(name, "must not be empty", **ids)
    return v


def _decode_qatrader(obj: dict[str, Any], raw: bytes, routing_key: str, ids: dict[str, str | None]) -> Order | Cancel:
    topic = obj["topic"]
    if not isinstance(topic, str) or topic not in QATRADER_FIELDS:
        raise OrderRejected("topic", f"{topic!r} is not accepted here (sendorder, cancel_order)", **ids)
    unknown = sorted(set(obj) - QATRADER_FIELDS[topic])
    if unknown:
        raise OrderRejected(unknown[0], f"unknown field for topic {topic!r}", **ids)

    account = _string(obj, "account_cookie", ids)
    assert account is not None
    if account != routing_key:
        raise OrderRejected("account_cookie", f"{account!r} does not match routing key {routing_key!r}", **ids)

    order_id_v = obj.get("order_id")
    if order_id_v is False or order_id_v == "":
        order_id_v = None            # QATrader's "let the broker pick one"
    if order_id_v is not None and (not isinstance(order_id_v, str) or not _ID.match(order_id_v)):
        raise OrderRejected("order_id", "must be a non-empty string without white space (<= 128)", **ids)

    strategy_id = _string(obj, "strategy_id", ids, required=False) or ""
    order_time = parse_order_time(obj["order_time"], ids) if obj.get("order_time") is not None else None

    if topic == "cancel_order":
        if order_id_v is None:
            raise OrderRejected("order_id", "missing", **ids)
        return _build(Cancel, ids, order_id=order_id_v, account=account)

    symbol = _string(obj, "code", ids)
    assert symbol is not None
    if not _SYMBOL.match(symbol):
        raise OrderRejected("code", f"{symbol!r} is not an instrument code", **ids)

    exch_raw = _string(obj, "exchange_id", ids)
    assert exch_raw is not None
    try:
        exchange = Exchange(exch_raw.upper())
    except ValueError:
        raise OrderRejected("exchange_id", f"{exch_raw!r} is not one of {', '.join(e.value for e in Exchange)}", **ids) from None

    d_raw = _need(obj, "order_direction", ids)
    key: int | str
    if isinstance(d_raw, bool):
        raise OrderRejected("order_direction", "must be BUY/SELL (or a QUANTAXIS ORDER_DIRECTION), got a boolean", **ids)
    if isinstance(d_raw, int):
        key = d_raw
    elif isinstance(d_raw, str):
        key = d_raw.strip().upper()
    else:
        raise OrderRejected("order_direction", f"must be a string or an integer, got {type(d_raw).__name__}", **ids)
    if key not in QATRADER_DIRECTIONS:
        raise OrderRejected("order_direction", f"{d_raw!r} is not BUY/SELL or a QUANTAXIS ORDER_DIRECTION (±1..±4)", **ids)
    direction, implied = QATRADER_DIRECTIONS[key]

    offset: Offset | None = None
    o_raw = obj.get("order_offset")
    if o_raw is not None:
        if not isinstance(o_raw, str):
            raise OrderRejected("order_offset", f"must be a string, got {type(o_raw).__name__}", **ids)
        try:
            offset = Offset(o_raw.strip().upper())
        except ValueError:
            raise OrderRejected("order_offset", f"{o_raw!r} is not one of OPEN, CLOSE, CLOSETODAY, CLOSEYESTERDAY", **ids) from None
        if implied is not None and implied is not offset:
            raise OrderRejected("order_offset", f"{offset.value} contradicts order_direction {d_raw!r} ({implied.value})", **ids)
    elif implied is not None:
        offset = implied
    elif exchange in STOCK_EXCHANGES:
        offset = Offset.OPEN if direction is Direction.BUY else Offset.CLOSE   # stocks have no open/close
    else:
        raise OrderRejected("order_offset", "missing", **ids)

    price_type = PriceType.LIMIT
    pt_raw = obj.get("price_type")
    if pt_raw is not None:
        try:
            price_type = PriceType(str(pt_raw).upper()) if isinstance(pt_raw, str) else PriceType("?")
        except ValueError:
            raise OrderRejected("price_type", f"{pt_raw!r} is not one of LIMIT, MARKET, FAK, FOK", **ids) from None

    price_v = obj.get("price")
    if price_v is None:
        if price_type is not PriceType.MARKET:
            raise OrderRejected("price", "missing", **ids)
        price: float | None = None
    else:
        if isinstance(price_v, bool) or not isinstance(price_v, (int, float)):
            raise OrderRejected("price", f"must be a number, got {type(price_v).__name__}", **ids)
        price = float(price_v)
        if not math.isfinite(price) or price <= 0:
            raise OrderRejected("price", f"must be a finite number > 0, got {price_v!r}", **ids)

    vol_v = _need(obj, "volume", ids)
    if isinstance(vol_v, bool) or not isinstance(vol_v, (int, float)):
        raise OrderRejected("volume", f"must be an integer, got {type(vol_v).__name__}", **ids)
    if isinstance(vol_v, float):
        if not (math.isfinite(vol_v) and vol_v.is_integer()):
            raise OrderRejected("volume", f"must be an integer, got {vol_v!r}", **ids)
        vol_v = int(vol_v)
    if vol_v <= 0:
        raise OrderRejected("volume", f"must be > 0, got {vol_v}", **ids)

    if order_id_v is None:
        if order_time is None:
            raise OrderRejected("order_id", "missing (and no order_time to derive a redelivery-safe id from)", **ids)
        order_id_v = derive_order_id(routing_key, raw)
        ids = {**ids, "order_id": order_id_v}

    return _build(Order, ids, order_id=order_id_v, account=account, symbol=symbol, exchange=exchange,
                  direction=direction, offset=offset, price_type=price_type, price=price, volume=vol_v,
                  strategy_id=strategy_id, order_time=order_time, source=Dialect.QATRADER)


def _build(cls: Any, ids: dict[str, str | None], **fields: Any) -> Any:
    # msgspec.convert runs the Struct's own constraints (lengths, patterns) and __post_init__.
    data = {k: (v.value if hasattr(v, "value") and not isinstance(v, (int, float, str)) else v) for k, v in fields.items()}
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        if isinstance(exc.__cause__, OrderRejected):
            raise exc.__cause__ from None
        m = _MSGSPEC_FIELD.search(str(exc))
        ours = (m.group(1) or m.group(2)) if m else ""
        theirs = {"symbol": "code", "exchange": "exchange_id", "account": "account_cookie"}.get(ours, ours)
        raise OrderRejected(theirs, str(exc), **ids) from None


def derive_order_id(routing_key: str, body: bytes) -> str:
    """A deterministic id for a QATrader order without one: a redelivery gets the same id."""
    h = hashlib.sha256(routing_key.encode() + b"\n" + body).hexdigest()
    return f"qat-{h[:32]}"


def parse_order_time(v: Any, ids: dict[str, str | None] | None = None) -> int:
    """QATrader ``order_time`` -> UTC ns. Strings are Beijing time (``str(datetime.now())``)."""
    ids = ids or {}
    if isinstance(v, bool):
        raise OrderRejected("order_time", "must be a time string or a number", **ids)
    if isinstance(v, (int, float)):
        if not math.isfinite(v) or v < 0:
            raise OrderRejected("order_time", f"invalid epoch {v!r}", **ids)
        # seconds / milliseconds / nanoseconds by magnitude
        if v < 1e11:
            return int(v * 1_000_000_000)
        if v < 1e14:
            return int(v * 1_000_000)
        return int(v)
    if isinstance(v, str):
        s = v.strip().replace("_", ".")
        try:
            t = _dt.datetime.fromisoformat(s)
        except ValueError:
            raise OrderRejected("order_time", f"{v!r} is not 'YYYY-MM-DD HH:MM:SS[.ffffff]'", **ids) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=_CST)
        return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000
    raise OrderRejected("order_time", f"must be a time string or a number, got {type(v).__name__}", **ids)
