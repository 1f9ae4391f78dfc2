"""Hypothesis generators of bad messages for every exchange a daemon consumes.

Kinds: ``garbage`` (random bytes), ``truncated`` (a valid message cut short), ``oversized``
(0.5-3 MB of JSON that is not a message), ``wrong-schema`` (a valid message of a schema the
exchange's consumers do not take), ``wrong-type`` (a valid message with one field of the wrong
JSON type), ``missing-field`` (QATrader orders without a required field).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st

from qamarket.models import Bar, Tick
from qaorder.models import (AccountSnapshot, Direction, Exchange, ForceClose, Offset, Order, OrderStatus,
                            OrderStatusReport, PriceType, Trade)


@dataclass(frozen=True)
class Target:
    name: str          # a Topology attribute
    key: str           # routing key that reaches a consumer
    valid: dict[str, Any]
    wrong_schema: dict[str, Any]
    no_wrong_type: frozenset[str] = frozenset()


def _d(msg: Any) -> dict[str, Any]:
    return json.loads(msgspec.json.encode(msg))


TICK = Tick(symbol="rb2605", exchange="SHFE", datetime=1_741_050_000_000, last_price=3900.0, bid_price_1=3899.0,
            ask_price_1=3901.0, bid_volume_1=5, ask_volume_1=5, volume=100)
BAR = Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=1_741_050_000_000, trading_day="20250304",
          open=3900.0, high=3901.0, low=3899.0, close=3900.0, volume=10)
ORDER = Order(order_id="fz-order", account="L", symbol="rb2605", exchange=Exchange.SHFE, direction=Direction.BUY,
              offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3900.0, volume=1)
QATRADER = {"topic": "sendorder", "account_cookie": "L", "strategy_id": "fz", "code": "rb2605", "exchange_id": "SHFE",
            "order_direction": "BUY", "order_offset": "OPEN", "price": 3900.0, "volume": 1, "order_id": "fz-qat",
            "order_time": "2025-03-04 09:30:00"}
QATRADER_REQUIRED = ("topic", "account_cookie", "code", "exchange_id", "order_direction", "order_offset", "price",
                     "volume")
FORCE = ForceClose(command_id="fz-fc", account="L", reason="fuzz", operator="fuzz")
STATUS = OrderStatusReport(order_id="fz-o", account="L", status=OrderStatus.ALLTRADED, traded=1, volume=1)
TRADE = Trade(trade_id="fz-t", order_id="fz-o", account="L", symbol="rb2605", exchange=Exchange.SHFE,
              direction=Direction.BUY, offset=Offset.OPEN, price=3900.0, volume=1, trade_time=1_741_050_000_000)
SNAP = AccountSnapshot(account_cookie="L", trading_day="20250304", accounts={"balance": 1.0}, positions={})

TARGETS: tuple[Target, ...] = (
    Target("tick", "SHFE.rb2605", _d(TICK), _d(BAR)),
    Target("bar", "1min.SHFE.rb2605", _d(BAR), _d(TICK)),
    Target("rtbar", "1min.SHFE.rb2605", {**_d(BAR), "final": False}, _d(TICK)),
    Target("order", "L", _d(ORDER), _d(TICK)),
    # QATrader: order_time/order_id/strategy_id have legitimate alternative types (epoch numbers ...)
    Target("qapubsub_order", "L", QATRADER, _d(TICK), frozenset({"order_time", "order_id", "strategy_id"})),
    Target("risk", "L", _d(FORCE), _d(TICK)),
    Target("exec", "L", _d(ORDER), _d(TICK)),
    Target("report", "L.order", _d(STATUS), _d(TICK)),
    Target("report", "L.trade", _d(TRADE), _d(TICK)),
    Target("report", "L.account", _d(SNAP), _d(TICK)),
)


def _wrong(value: Any) -> Any:
    if isinstance(value, bool):
        return "not-a-bool"
    if isinstance(value, str):
        return 12345
    if isinstance(value, (int, float)):
        return "not-a-number"
    return "not-a-container"


@st.composite
def bad_message(draw: st.DrawFn) -> tuple[str, Target, bytes]:
    """(kind, target, body) -- never a message any consumer of the target would accept."""
    t = draw(st.sampled_from(TARGETS))
    kinds = ["garbage", "truncated", "wrong-schema", "wrong-type", "oversized"]
    if t.name == "qapubsub_order":
        kinds.append("missing-field")
    kind = draw(st.sampled_from(kinds))
    valid = json.dumps(t.valid).encode()
    if kind == "garbage":
        body = draw(st.binary(min_size=0, max_size=300).filter(lambda b: not b.strip().startswith((b"{", b"["))))
    elif kind == "truncated":
        body = valid[:draw(st.integers(min_value=0, max_value=len(valid) - 1))]
    elif kind == "oversized":
        n = draw(st.integers(min_value=500_000, max_value=3_000_000))
        body = draw(st.sampled_from([b"[" + b"1," * (n // 2) + b"1]", b'{"schema": "' + b"x" * n + b'"}',
                                     valid[:-1] + b', "pad": [' + b"0," * (n // 2) + b"0"]))
    elif kind == "wrong-schema":
        body = json.dumps(t.wrong_schema).encode()
    elif kind == "wrong-type":
        fields = sorted(k for k, v in t.valid.items() if k not in ("schema", *t.no_wrong_type) and v is not None)
        f = draw(st.sampled_from(fields))
        body = json.dumps({**t.valid, f: _wrong(t.valid[f])}).encode()
    else:  # missing-field
        f = draw(st.sampled_from(QATRADER_REQUIRED))
        body = json.dumps({k: v for k, v in t.valid.items() if k != f}).encode()
    return kind, t, body
