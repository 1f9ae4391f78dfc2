from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qaorder.dialects import decode_order, derive_order_id, parse_order_time
from qaorder.models import Cancel, Direction, Exchange, Offset, Order, OrderRejected, PriceType, Reject
from qapubsub.messages import encode

QAT = {
    "topic": "sendorder", "account_cookie": "1010101", "strategy_id": "test", "code": "rb2510", "price": 3925.0,
    "order_direction": "SELL", "order_offset": "OPEN", "volume": 1, "order_time": "2025-06-03 09:30:00.123456",
    "exchange_id": "SHFE", "order_id": "o-1",
}


def qat(**kw: object) -> bytes:
    d = {**QAT, **kw}
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def rejected(body: bytes, key: str = "1010101") -> OrderRejected:
    with pytest.raises(OrderRejected) as ei:
        decode_order(body, key)
    return ei.value


def native(**kw: object) -> Order:
    base = dict(order_id="n-1", account="acc1", symbol="rb2510", exchange=Exchange.SHFE, direction=Direction.BUY,
                offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3500.0, volume=2)
    base.update(kw)
    return Order(**base)  # type: ignore[arg-type]


# --- native ---------------------------------------------------------------------------
def test_native_order_and_cancel_roundtrip() -> None:
    o = native()
    msg, dialect = decode_order(encode(o), "acc1")
    assert dialect == "native" and msg == o
    c = Cancel(order_id="n-1", account="acc1")
    msg2, _ = decode_order(encode(c), "acc1")
    assert msg2 == c


def test_native_enums_are_uppercase_names_on_the_wire() -> None:
    d = json.loads(encode(native()))
    assert d["schema"] == "qa.order" and d["direction"] == "BUY" and d["offset"] == "OPEN" and d["price_type"] == "LIMIT"


@pytest.mark.parametrize("field", ["order_id", "account", "symbol", "exchange", "direction", "offset", "price_type",
                                   "price", "volume"])
def test_native_missing_field_is_named(field: str) -> None:
    d = json.loads(encode(native()))
    del d[field]
    e = rejected(json.dumps(d).encode(), "acc1")
    assert e.field == field and e.reason == "missing"


@pytest.mark.parametrize("field,value", [
    ("volume", 0), ("volume", -1), ("volume", 1.5), ("volume", "1"), ("price", 0), ("price", -3.0), ("price", None),
    ("exchange", "NYSE"), ("exchange", "shfe"), ("direction", "LONG"), ("direction", "多"), ("offset", "OPENX"),
    ("price_type", "STOP"), ("symbol", "rb 2510"), ("order_id", ""), ("account", "a.b"),
])
def test_native_invalid_field_is_named(field: str, value: object) -> None:
    d = json.loads(encode(native()))
    d[field] = value
    e = rejected(json.dumps(d).encode(), "acc1")
    assert e.field == field, e


def test_native_nan_price_and_unknown_field() -> None:
    with pytest.raises(OrderRejected) as ei:
        native(price=float("nan"))
    assert ei.value.field == "price"
    d = json.loads(encode(native()))
    d["pricee"] = 1
    assert rejected(json.dumps(d).encode(), "acc1").field == "pricee"


def test_native_market_order_may_omit_price() -> None:
    o = native(price_type=PriceType.MARKET, price=None)
    assert decode_order(encode(o), "acc1")[0] == o


def test_native_account_must_match_routing_key() -> None:
    e = rejected(encode(native()), "acc2")
    assert e.field == "account" and "routing key" in e.reason


def test_body_errors() -> None:
    assert rejected(b"{not json").field == ""
    assert rejected(b"[1,2]").field == ""
    assert rejected(b'{"volume": 1}').field == "schema"
    assert rejected(json.dumps({**QAT, "schema": "qa.order"}).encode()).field == "topic"
    assert rejected(b'{"schema": "qa.bogus"}').field == "schema"


# --- QATrader -------------------------------------------------------------------------
def test_qatrader_sendorder_maps_every_field() -> None:
    o, dialect = decode_order(qat(), "1010101")
    assert dialect == "qatrader" and isinstance(o, Order)
    assert (o.order_id, o.account, o.symbol, o.exchange, o.direction, o.offset, o.price_type, o.price, o.volume,
            o.strategy_id, o.source) == ("o-1", "1010101", "rb2510", Exchange.SHFE, Direction.SELL, Offset.OPEN,
                                         PriceType.LIMIT, 3925.0, 1, "test", "qatrader")
    # 2025-06-03 09:30:00.123456 Beijing == 01:30:00.123456 UTC
    assert o.order_time == 1748914200_123456000


def test_qatrader_cancel() -> None:
    body = json.dumps({"topic": "cancel_order", "account_cookie": "1010101", "order_id": "o-1"}).encode()
    c, dialect = decode_order(body, "1010101")
    assert c == Cancel(order_id="o-1", account="1010101", id=c.id, ts=c.ts) and dialect == "qatrader"
    e = rejected(json.dumps({"topic": "cancel_order", "account_cookie": "1010101"}).encode())
    assert (e.field, e.reason) == ("order_id", "missing")


@pytest.mark.parametrize("value,direction,offset", [
    (1, Direction.BUY, None), (-1, Direction.SELL, None), (2, Direction.BUY, Offset.OPEN),
    (-2, Direction.SELL, Offset.OPEN), (3, Direction.BUY, Offset.CLOSE), (-3, Direction.SELL, Offset.CLOSE),
    (4, Direction.BUY, Offset.CLOSETODAY), (-4, Direction.SELL, Offset.CLOSETODAY), ("buy", Direction.BUY, None),
    ("SELL_CLOSETODAY", Direction.SELL, Offset.CLOSETODAY), ("BUY_OPEN", Direction.BUY, Offset.OPEN),
])
def test_qatrader_direction_values(value: object, direction: Direction, offset: Offset | None) -> None:
    if offset is None:
        o, _ = decode_order(qat(order_direction=value, order_offset="CLOSE"), "1010101")
        assert (o.direction, o.offset) == (direction, Offset.CLOSE)
    else:
        o, _ = decode_order(qat(order_direction=value, order_offset=...), "1010101")
        assert (o.direction, o.offset) == (direction, offset)
        o, _ = decode_order(qat(order_direction=value, order_offset=offset.value), "1010101")
        assert o.offset is offset


def test_qatrader_stock_offset_implied_but_futures_offset_required() -> None:
    o, _ = decode_order(qat(code="600000", exchange_id="sse", order_direction="BUY", order_offset=..., volume=100),
                        "1010101")
    assert (o.exchange, o.offset) == (Exchange.SSE, Offset.OPEN)
    o, _ = decode_order(qat(code="000001", exchange_id="szse", order_direction=-1, order_offset=..., volume=100),
                        "1010101")
    assert (o.direction, o.offset) == (Direction.SELL, Offset.CLOSE)
    e = rejected(qat(order_offset=...))
    assert (e.field, e.reason) == ("order_offset", "missing")


@pytest.mark.parametrize("field", ["account_cookie", "code", "price", "order_direction", "volume", "exchange_id"])
def test_qatrader_missing_field_named_never_defaulted(field: str) -> None:
    e = rejected(qat(**{field: ...}))
    assert (e.field, e.reason) == (field, "missing")
    e = rejected(qat(**{field: None}))
    assert e.field == field


@pytest.mark.parametrize("field,value", [
    ("price", 0), ("price", -1), ("price", "3925"), ("price", True),
    ("volume", 0), ("volume", 1.5), ("volume", "1"), ("volume", True), ("volume", -2),
    ("order_direction", 0), ("order_direction", 5), ("order_direction", 6), ("order_direction", "LONG"),
    ("order_direction", True), ("order_direction", 1.0),
    ("order_offset", "OPENED"), ("order_offset", 1), ("exchange_id", "NYMEX"), ("exchange_id", 1),
    ("code", "rb 1905"), ("code", ""), ("code", 1905), ("account_cookie", 1010101), ("account_cookie", ""),
    ("order_id", 123), ("order_id", "has space"), ("order_time", "yesterday"), ("order_time", True),
    ("strategy_id", 5), ("price_type", "STOP"),
])
def test_qatrader_invalid_field_named(field: str, value: object) -> None:
    e = rejected(json.dumps({**QAT, field: value}).encode())
    assert e.field == field, e


def test_qatrader_offset_conflicting_with_combined_direction() -> None:
    e = rejected(qat(order_direction="BUY_OPEN", order_offset="CLOSE"))
    assert e.field == "order_offset" and "contradicts" in e.reason


def test_qatrader_account_cookie_must_match_routing_key() -> None:
    e = rejected(qat(), "2020202")
    assert e.field == "account_cookie" and "routing key" in e.reason


def test_qatrader_unknown_topic_and_unknown_field() -> None:
    assert rejected(qat(topic="transfer")).field == "topic"
    assert rejected(qat(towards=1)).field == "towards"


def test_qatrader_without_order_id_gets_a_deterministic_id() -> None:
    body = qat(order_id=...)
    a, _ = decode_order(body, "1010101")
    b, _ = decode_order(body, "1010101")
    assert a.order_id == b.order_id == derive_order_id("1010101", body)
    c, _ = decode_order(qat(order_id=..., order_time="2025-06-03 09:30:01"), "1010101")
    assert c.order_id != a.order_id
    d, _ = decode_order(qat(order_id=False), "1010101")   # QATrader's "no id" value
    assert d.order_id.startswith("qat-")
    e = rejected(qat(order_id=..., order_time=...))
    assert e.field == "order_id"


def test_qatrader_price_type_extension_and_market() -> None:
    o, _ = decode_order(qat(price_type="FAK"), "1010101")
    assert o.price_type is PriceType.FAK
    o, _ = decode_order(qat(price_type="MARKET", price=...), "1010101")
    assert o.price is None


def test_reject_report_from_error() -> None:
    e = rejected(qat(price=...))
    r = Reject.from_error(e, routing_key="1010101", dialect="qatrader")
    assert (r.account, r.field, r.reason, r.order_id) == ("1010101", "price", "missing", "o-1")


def test_parse_order_time_forms() -> None:
    assert parse_order_time("2025-06-03 09:30:00") == 1748914200 * 10**9
    assert parse_order_time(1748914200) == 1748914200 * 10**9
    assert parse_order_time(1748914200123) == 1748914200123 * 10**6
    assert parse_order_time(1748914200123456789) == 1748914200123456789


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(QAT) + ["schema", "account", "symbol", "direction", "x"]),
                       json_values, max_size=12), st.booleans())
def test_decoder_fuzz_never_crashes(d: dict[str, object], with_topic: bool) -> None:
    if with_topic:
        d = {**d, "topic": "sendorder"}
    try:
        msg, _ = decode_order(json.dumps(d).encode(), "1010101")
    except OrderRejected as e:
        assert isinstance(e.field, str) and e.reason
    else:
        assert isinstance(msg, (Order, Cancel))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decoder_fuzz_bytes(b: bytes) -> None:
    try:
        decode_order(b, "k")
    except OrderRejected:
        pass
