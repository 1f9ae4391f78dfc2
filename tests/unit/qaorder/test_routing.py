from __future__ import annotations

from dataclasses import dataclass

import pytest

from qaaccount.instruments import Instruments, future, stock
from qaorder.models import Cancel, Direction, Exchange, ForceClose, Offset, Order, PriceType
from qaorder.routing import FollowerRule, PriceMode, Sizing, child_id, plan_force_close, route, route_cancel

INSTS = Instruments([
    future("rb2510", "SHFE", multiplier=10, price_tick=1, margin_rate=0.1),
    future("m2509", "DCE", multiplier=10, price_tick=1, margin_rate=0.1),
    future("IF2509", "CFFEX", multiplier=300, price_tick=0.2, margin_rate=0.12),
    stock("600000", "SSE"),
])


def order(account: str = "leader", volume: int = 10, symbol: str = "rb2510", exchange: Exchange = Exchange.SHFE,
          direction: Direction = Direction.BUY, offset: Offset = Offset.OPEN, oid: str = "p1") -> Order:
    return Order(order_id=oid, account=account, symbol=symbol, exchange=exchange, direction=direction, offset=offset,
                 price_type=PriceType.LIMIT, price=3500.0, volume=volume)


def rule(follower: str = "f1", **kw: object) -> FollowerRule:
    return FollowerRule(rule_id=f"r-{follower}", leader=kw.pop("leader", "leader"), follower=follower, **kw)  # type: ignore[arg-type]


def test_direct_order_passes_through() -> None:
    o = order()
    d = route(o)
    assert d.children == [o] and not d.skipped and d.audit[0].action == "direct"


def test_group_expansion_is_deterministic() -> None:
    o = order(account="grp")
    d1 = route(o, groups={"grp": ["a1", "a2", "a1"]}, instruments=INSTS)
    d2 = route(o, groups={"grp": ["a1", "a2"]}, instruments=INSTS)
    assert [c.account for c in d1.children] == ["a1", "a2"]
    assert [c.order_id for c in d1.children] == [c.order_id for c in d2.children] == ["p1/g/a1", "p1/g/a2"]
    assert all(c.parent_id == "p1" and c.volume == 10 and c.source == "group" for c in d1.children)
    assert [c.id for c in d1.children] == [c.id for c in d2.children]    # envelope id stable too
    assert route(o, groups={"grp": []}).skipped[0].detail == "group has no members"


def test_copy_trade_ratio_fixed_equity() -> None:
    o = order(volume=10)
    rules = [rule("f1", sizing=Sizing.RATIO, ratio=0.35),        # 3.5 -> 3
             rule("f2", sizing=Sizing.FIXED, fixed_volume=2),    # 2
             rule("f3", sizing=Sizing.EQUITY)]                   # 10 * 250k/1M = 2.5 -> 2
    d = route(o, rules, equities={"leader": 1_000_000, "f3": 250_000}, instruments=INSTS)
    got = {c.account: c.volume for c in d.children}
    assert got == {"leader": 10, "f1": 3, "f2": 2, "f3": 2}
    f1 = next(c for c in d.children if c.account == "f1")
    assert f1.order_id == "p1/f/f1" and f1.parent_id == "p1" and f1.source == "copytrade"
    assert {a.rule_id for a in d.audit if a.action == "follow"} == {"r-f1", "r-f2", "r-f3"}


def test_equity_unknown_is_skipped_with_reason() -> None:
    d = route(order(), [rule("f3", sizing=Sizing.EQUITY)], equities={"leader": 1e6}, instruments=INSTS)
    assert len(d.children) == 1 and "equity" in d.skipped[0].detail and d.skipped[0].account == "f3"


def test_reverse_maps_direction_and_keeps_offset() -> None:
    d = route(order(direction=Direction.BUY, offset=Offset.OPEN), [rule(reverse=True)], instruments=INSTS)
    f = d.children[1]
    assert (f.direction, f.offset) == (Direction.SELL, Offset.OPEN)
    d = route(order(direction=Direction.SELL, offset=Offset.CLOSETODAY), [rule(reverse=True)], instruments=INSTS)
    f = d.children[1]
    assert (f.direction, f.offset) == (Direction.BUY, Offset.CLOSETODAY)


def test_lot_rounding_down_and_zero_skipped() -> None:
    o = order(symbol="600000", exchange=Exchange.SSE, volume=1000)
    d = route(o, [rule("f1", ratio=0.25), rule("f2", ratio=0.05)], instruments=INSTS)
    # f1: 250 shares -> 200 (lots of 100); f2: 50 -> 0 -> skipped
    assert {c.account: c.volume for c in d.children} == {"leader": 1000, "f1": 200}
    assert d.skipped[0].account == "f2" and "rounds down to 0" in d.skipped[0].detail


def test_instrument_filter_symbols_and_products() -> None:
    rules = [rule("f1", symbols=frozenset({"SHFE.rb2510"})), rule("f2", products=frozenset({"m"})),
             rule("f3", symbols=frozenset({"m2509"}))]
    d = route(order(), rules, instruments=INSTS)
    assert {c.account for c in d.children} == {"leader", "f1"}
    d = route(order(symbol="m2509", exchange=Exchange.DCE), rules, instruments=INSTS)
    assert {c.account for c in d.children} == {"leader", "f2", "f3"}
    assert {s.account for s in d.skipped} == {"f1"}


def test_max_volume_caps_then_rounds() -> None:
    d = route(order(volume=10), [rule("f1", ratio=2.0, max_volume=7)], instruments=INSTS)
    assert d.children[1].volume == 7
    d = route(order(symbol="600000", exchange=Exchange.SSE, volume=1000), [rule("f1", max_volume=250)],
              instruments=INSTS)
    assert d.children[1].volume == 200


def test_unknown_instrument_disabled_rule_other_leader_and_duplicate_follower() -> None:
    o = order(symbol="zz9999")
    assert "unknown" in route(o, [rule()], instruments=INSTS).skipped[0].detail
    d = route(order(), [rule("f1", enabled=False), rule("f2", leader="other"), rule("f3"),
                        FollowerRule(rule_id="dup", leader="leader", follower="f3", ratio=5)], instruments=INSTS)
    assert [c.account for c in d.children] == ["leader", "f3"]
    assert d.skipped[0].rule_id == "dup"


def test_group_leader_rule_follows_the_group_order() -> None:
    d = route(order(account="grp"), [rule("f1", leader="grp", ratio=0.5)], groups={"grp": ["a1"]},
              instruments=INSTS)
    assert [(c.account, c.order_id, c.volume) for c in d.children] == [("a1", "p1/g/a1", 10), ("f1", "p1/f/f1", 5)]


def test_follower_rule_validation() -> None:
    with pytest.raises(ValueError):
        FollowerRule(rule_id="x", leader="a", follower="a")
    with pytest.raises(ValueError):
        FollowerRule(rule_id="x", leader="a", follower="b", sizing=Sizing.FIXED)


def test_cancel_propagates_to_children() -> None:
    c = Cancel(order_id="p1", account="leader")
    out = route_cancel(c, [rule("f1"), rule("f2")])
    assert [(x.account, x.order_id) for x in out] == [("leader", "p1"), ("f1", "p1/f/f1"), ("f2", "p1/f/f2")]
    out = route_cancel(Cancel(order_id="p1", account="grp"), [], {"grp": ["a1", "a2"]})
    assert [x.order_id for x in out] == ["p1/g/a1", "p1/g/a2"]
    # recorded children win over the current rules
    out = route_cancel(c, [rule("f9")], children_of={"p1": [("leader", "p1"), ("f1", "p1/f/f1")]})
    assert [x.account for x in out] == ["leader", "f1"]


def test_child_id_is_bounded() -> None:
    cid = child_id("x" * 120, "f", "follower")
    assert len(cid) <= 128 and cid == child_id("x" * 120, "f", "follower")


@dataclass
class B:
    volume: int = 0


@dataclass
class Pos:
    exchange: str
    symbol: str
    long_today: int = 0
    long_his: int = 0
    short_today: int = 0
    short_his: int = 0

    def bucket(self, name: str) -> B:
        return B(getattr(self, name))


@dataclass
class Q:
    last_price: float
    bid_price_1: float
    ask_price_1: float
    limit_up: float
    limit_down: float


def test_force_close_plan() -> None:
    cmd = ForceClose(command_id="fc1", account="a", reason="margin call", operator="risk")
    positions = [Pos("SHFE", "rb2510", long_today=2, long_his=3), Pos("DCE", "m2509", short_today=1, short_his=4),
                 Pos("SSE", "600000", long_today=100, long_his=300), Pos("CFFEX", "IF2509", long_his=1)]
    working = [order(account="a", oid="w1"), order(account="other", oid="w2")]
    quotes = {"SHFE.rb2510": Q(3500, 3499, 3501, 3780, 3220), "DCE.m2509": Q(3000, 2999, 3001, 3210, 2790),
              "SSE.600000": Q(10.0, 9.99, 10.01, 11.0, 9.0)}
    plan = plan_force_close(cmd, positions, working, quotes, INSTS)
    assert [(c.order_id, c.account) for c in plan.cancels] == [("w1", "a")]
    got = {(o.symbol, o.direction, o.offset): (o.volume, o.price) for o in plan.orders}
    assert got == {
        ("rb2510", Direction.SELL, Offset.CLOSETODAY): (2, 3220),        # SHFE split, sells at limit-down
        ("rb2510", Direction.SELL, Offset.CLOSEYESTERDAY): (3, 3220),
        ("m2509", Direction.BUY, Offset.CLOSE): (5, 3210),               # DCE: one CLOSE, buys at limit-up
        ("600000", Direction.SELL, Offset.CLOSE): (300, 9.0),            # stocks: yesterday's only
    }
    assert all(o.reduce_only and o.parent_id == "fc1" and o.source == "forceclose" for o in plan.orders)
    details = " | ".join(s.detail for s in plan.skipped)
    assert "T+1" in details and "CFFEX.IF2509: no usable quote" in details
    again = plan_force_close(cmd, positions, working, quotes, INSTS)
    assert [o.order_id for o in again.orders] == [o.order_id for o in plan.orders]


def test_force_close_ticks_mode_and_symbol_filter() -> None:
    cmd = ForceClose(command_id="fc2", account="a", reason="r", operator="risk", symbols=["SHFE.rb2510"])
    positions = [Pos("SHFE", "rb2510", short_his=2), Pos("DCE", "m2509", long_his=1)]
    quotes = {"SHFE.rb2510": Q(3500, 3499, 3501, 3503, 3220), "DCE.m2509": Q(3000, 2999, 3001, 3210, 2790)}
    working = [order(account="a", oid="w1", symbol="m2509", exchange=Exchange.DCE)]
    plan = plan_force_close(cmd, positions, working, quotes, INSTS, mode=PriceMode.TICKS, ticks=5)
    assert plan.cancels == []                                     # w1 is on another instrument
    [o] = plan.orders
    # BUY to close the short: ask 3501 + 5 ticks = 3506, clamped to limit-up 3503
    assert (o.direction, o.offset, o.volume, o.price) == (Direction.BUY, Offset.CLOSEYESTERDAY, 2, 3503)
