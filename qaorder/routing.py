"""Pure routing decisions: group fan-out, copy-trade, cancel propagation, force-close plans.

Nothing here does I/O; the router daemon feeds in the current groups, follower rules,
equities and instruments, publishes the children and records the audit trail.

Ids. A child's id is derived from its parent's id and its account
(:func:`child_id`), so a redelivered parent yields the same children and the
executors' idempotency (by order id) makes the redelivery harmless:

* group member:   ``<parent_id>/g/<account>``
* follower:       ``<parent_id>/f/<account>``
* force-close:    ``<command_id>/fc/<EXCHANGE.symbol>/<offset>``

(ids longer than 128 characters are shortened to a sha256 digest with the same prefix.)

Copy-trade rules match the routing key the order arrived with (an account, or a
group name). They are applied once: a follower's child does not trigger the
follower's own followers (no chains, so no loops).

Reverse copy-trade maps BUY<->SELL and keeps the offset: a leader opening a long
(BUY OPEN) makes the follower open a short (SELL OPEN); the leader closing that long
(SELL CLOSE) makes the follower close its short (BUY CLOSE). Because the follower's
position mirrors the leader's, the same offset is always consistent. The leader's
limit price is kept.
"""
from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from qaorder.models import (
    SPLIT_TODAY_EXCHANGES, STOCK_EXCHANGES, AuditRecord, Cancel, Direction, Exchange, ForceClose, Offset, Order,
    PriceType,
    position_key,
)

__all__ = ["Sizing", "FollowerRule", "RoutingDecision", "route", "route_cancel", "child_id", "PositionView",
           "QuoteView", "InstrumentView", "ForceClosePlan", "plan_force_close", "PriceMode"]


class InstrumentView(Protocol):
    """What routing needs of an instrument (``qaaccount.instruments.Instrument`` fits)."""

    @property
    def lot_size(self) -> int: ...

    @property
    def price_tick(self) -> float: ...


class QuoteView(Protocol):
    """What force-close pricing needs of a quote (``qamarket`` Tick fits)."""

    last_price: float
    bid_price_1: float
    ask_price_1: float
    limit_up: float
    limit_down: float


class PositionView(Protocol):
    """A position as force-close sees it (``qaaccount.account.Position`` fits)."""

    @property
    def exchange(self) -> str: ...

    @property
    def symbol(self) -> str: ...

    def bucket(self, name: str) -> object: ...


class Sizing(str, enum.Enum):
    RATIO = "RATIO"      # follower volume = leader volume * ratio
    FIXED = "FIXED"      # follower volume = fixed_volume
    EQUITY = "EQUITY"    # follower volume = leader volume * equity(follower) / equity(leader) * ratio


class FollowerRule(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    rule_id: str
    leader: str                      # the routing key followed (account or group)
    follower: str                    # the follower account
    sizing: Sizing = Sizing.RATIO
    ratio: float = 1.0
    fixed_volume: int = 0
    reverse: bool = False
    symbols: frozenset[str] | None = None    # "EXCHANGE.symbol" or bare symbols
    products: frozenset[str] | None = None   # product roots, e.g. "rb", "IF"
    max_volume: int | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.leader == self.follower:
            raise ValueError("a follower cannot follow itself")
        if self.sizing is Sizing.FIXED and self.fixed_volume <= 0:
            raise ValueError("FIXED sizing needs fixed_volume > 0")
        if self.sizing is not Sizing.FIXED and not (math.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError("ratio must be a finite number > 0")
        if self.max_volume is not None and self.max_volume <= 0:
            raise ValueError("max_volume must be > 0")

    def matches(self, order: Order) -> bool:
        if self.symbols is not None and order.symbol not in self.symbols and order.key not in self.symbols:
            return False
        if self.products is not None:
            root = "".join(ch for ch in order.symbol if ch.isalpha()) or order.symbol
            if root not in self.products and root.lower() not in {p.lower() for p in self.products}:
                return False
        return True


@dataclass
class RoutingDecision:
    children: list[Order] = field(default_factory=list)
    skipped: list[AuditRecord] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)


_MAX_ID = 128


def child_id(parent_id: str, kind: str, account: str) -> str:
    cid = f"{parent_id}/{kind}/{account}"
    if len(cid) <= _MAX_ID:
        return cid
    return f"h/{kind}/{hashlib.sha256(cid.encode()).hexdigest()}"


def _child(parent: Order, account: str, kind: str, **changes: object) -> Order:
    # the envelope id is the child id too: stable across redeliveries, unique per child
    cid = child_id(parent.order_id, kind, account)
    return msgspec.structs.replace(parent, order_id=cid, id=cid, account=account, parent_id=parent.order_id, **changes)


def _lot(order: Order, instruments: Mapping[str, InstrumentView] | None) -> int | None:
    if instruments is None:
        return None
    inst = instruments.get(order.key)
    return None if inst is None else int(inst.lot_size)


def route(order: Order, rules: Iterable[FollowerRule] = (), groups: Mapping[str, Sequence[str]] | None = None,
          equities: Mapping[str, float] | None = None,
          instruments: Mapping[str, InstrumentView] | None = None) -> RoutingDecision:
    """Children for one incoming order (``order.account`` is the routing key it came with).

    * a group target: one child per member, same volume, ``source="group"``;
    * an account target: the order itself;
    * plus one child per enabled follower rule whose ``leader`` is the routing key,
      sized, filtered, capped and rounded down to the lot size; a zero result is a
      skipped decision with its reason.
    """
    groups = groups or {}
    equities = equities or {}
    dec = RoutingDecision()
    target = order.account
    members = groups.get(target)
    if members is not None:
        seen: set[str] = set()
        for acc in members:
            if acc in seen:
                continue
            seen.add(acc)
            c = _child(order, acc, "g", source="group")
            dec.children.append(c)
            dec.audit.append(AuditRecord(action="group", parent_id=order.order_id, account=acc, child_id=c.order_id,
                                         detail=f"member of group {target}"))
        if not members:
            rec = AuditRecord(action="skip", parent_id=order.order_id, account=target, detail="group has no members")
            dec.skipped.append(rec)
            dec.audit.append(rec)
    else:
        dec.children.append(order)
        dec.audit.append(AuditRecord(action="direct", parent_id=order.order_id, account=target, child_id=order.order_id))

    followers_done: set[str] = set()
    for rule in rules:
        if not rule.enabled or rule.leader != target:
            continue

        def skip(reason: str, rule: FollowerRule = rule) -> None:
            rec = AuditRecord(action="skip", parent_id=order.order_id, account=rule.follower, rule_id=rule.rule_id,
                              detail=reason)
            dec.skipped.append(rec)
            dec.audit.append(rec)

        if rule.follower in followers_done:
            skip("another rule already sized this follower for this leader")
            continue
        followers_done.add(rule.follower)
        if not rule.matches(order):
            skip(f"{order.key} is outside the rule's instrument filter")
            continue
        if rule.sizing is Sizing.FIXED:
            raw: float = rule.fixed_volume
        elif rule.sizing is Sizing.RATIO:
            raw = order.volume * rule.ratio
        else:
            le, fe = equities.get(target), equities.get(rule.follower)
            if le is None or fe is None or not (le > 0) or not (fe >= 0):
                skip(f"equity unknown or not positive (leader {le!r}, follower {fe!r})")
                continue
            raw = order.volume * fe / le * rule.ratio
        capped = min(raw, rule.max_volume) if rule.max_volume is not None else raw
        lot = _lot(order, instruments)
        if lot is None:
            skip(f"instrument {order.key} unknown: cannot round to its lot size")
            continue
        vol = int(math.floor(capped / lot + 1e-9)) * lot if capped > 0 else 0
        if vol <= 0:
            skip(f"{raw:g} rounds down to 0 (lot size {lot}" + (f", max {rule.max_volume})" if rule.max_volume else ")"))
            continue
        changes: dict[str, object] = {"volume": vol, "source": "copytrade"}
        if rule.reverse:
            changes["direction"] = order.direction.opposite
        c = _child(order, rule.follower, "f", **changes)
        dec.children.append(c)
        dec.audit.append(AuditRecord(action="follow", parent_id=order.order_id, account=rule.follower,
                                     child_id=c.order_id, rule_id=rule.rule_id,
                                     detail=f"{rule.sizing.value} {raw:g} -> {vol}" + (" reversed" if rule.reverse else "")))
    return dec


def route_cancel(cancel: Cancel, rules: Iterable[FollowerRule] = (), groups: Mapping[str, Sequence[str]] | None = None,
                 children_of: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> list[Cancel]:
    """Cancels for every child of ``cancel.order_id``.

    With ``children_of`` (parent id -> [(account, child id)], from the order store) the
    recorded children are cancelled -- correct even if rules changed since. Without it,
    children are derived from the current groups and rules; a child that was skipped
    gets a harmless cancel of an unknown id.
    """
    groups = groups or {}
    pid, target = cancel.order_id, cancel.account
    pairs: list[tuple[str, str]]
    if children_of is not None and pid in children_of:
        pairs = list(children_of[pid])
    else:
        pairs = []
        if target in groups:
            pairs += [(acc, child_id(pid, "g", acc)) for acc in dict.fromkeys(groups[target])]
        else:
            pairs.append((target, pid))
        seen: set[str] = set()
        for r in rules:
            if r.enabled and r.leader == target and r.follower not in seen:
                seen.add(r.follower)
                pairs.append((r.follower, child_id(pid, "f", r.follower)))
    return [Cancel(order_id=cid, account=acc, reason=cancel.reason or f"cancel of {pid}",
                   correlation_id=cancel.correlation_id) for acc, cid in pairs]


# force-close ---------------------------------------------------------------------------
class PriceMode(str, enum.Enum):
    LIMIT_PRICE = "LIMIT_PRICE"   # sell at limit-down, buy at limit-up: always marketable
    TICKS = "TICKS"               # best opposite price -/+ N ticks, clamped to the limits


@dataclass
class ForceClosePlan:
    cancels: list[Cancel] = field(default_factory=list)
    orders: list[Order] = field(default_factory=list)
    skipped: list[AuditRecord] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)


def _wanted(cmd: ForceClose, exchange: str, symbol: str) -> bool:
    return cmd.symbols is None or symbol in cmd.symbols or position_key(exchange, symbol) in cmd.symbols


def _price(direction: Direction, quote: QuoteView | None, tick: float, mode: PriceMode, ticks: int) -> float | None:
    if quote is None:
        return None

    def ok(x: object) -> float | None:
        return float(x) if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else None  # type: ignore[arg-type]

    up, down = ok(getattr(quote, "limit_up", None)), ok(getattr(quote, "limit_down", None))
    if mode is PriceMode.LIMIT_PRICE:
        return up if direction is Direction.BUY else down
    best = ok(getattr(quote, "ask_price_1" if direction is Direction.BUY else "bid_price_1", None)) \
        or ok(getattr(quote, "last_price", None))
    if best is None:
        return None
    p = best + ticks * tick if direction is Direction.BUY else best - ticks * tick
    if up is not None:
        p = min(p, up)
    if down is not None:
        p = max(p, down)
    p = round(round(p / tick) * tick, 10)
    return p if p > 0 else None


def plan_force_close(cmd: ForceClose, positions: Iterable[PositionView], working: Iterable[Order],
                     quotes: Mapping[str, QuoteView], instruments: Mapping[str, InstrumentView], *,
                     mode: PriceMode = PriceMode.LIMIT_PRICE, ticks: int = 5, now_ns: int | None = None) -> ForceClosePlan:
    """Cancel every working order of the account (on the named instruments), then flatten.

    The plan's cancels must be acknowledged before its orders are sent (the positions
    they close may be frozen by the orders being cancelled); the daemon sequences that.
    Volumes are the full positions, frozen or not. SHFE/INE close today's positions with
    CLOSETODAY and yesterday's with CLOSEYESTERDAY; other futures exchanges use one CLOSE;
    stocks sell yesterday's shares only (today's are T+1 and reported as skipped).
    A position without a usable price is skipped with the reason, never priced by guess.
    """
    plan = ForceClosePlan()
    for o in working:
        if o.account != cmd.account or not _wanted(cmd, o.exchange.value, o.symbol):
            continue
        plan.cancels.append(Cancel(order_id=o.order_id, account=cmd.account, reason=f"force-close {cmd.command_id}: {cmd.reason}",
                                   correlation_id=cmd.command_id))
        plan.audit.append(AuditRecord(action="cancel", parent_id=cmd.command_id, account=cmd.account, child_id=o.order_id,
                                      detail=cmd.reason))
    for pos in positions:
        ex, sym = pos.exchange, pos.symbol
        if not _wanted(cmd, ex, sym):
            continue
        key = position_key(ex, sym)

        def vol(name: str, pos: PositionView = pos) -> int:
            return int(getattr(pos.bucket(name), "volume", 0))

        legs: list[tuple[Direction, Offset, int]] = []
        is_stock = ex in {e.value for e in STOCK_EXCHANGES}
        split = ex in {e.value for e in SPLIT_TODAY_EXCHANGES}
        for side, direction in (("long", Direction.SELL), ("short", Direction.BUY)):
            today, his = vol(f"{side}_today"), vol(f"{side}_his")
            if is_stock:
                if today:
                    rec = AuditRecord(action="skip", parent_id=cmd.command_id, account=cmd.account,
                                      detail=f"{key}: {today} bought today cannot be sold (T+1)")
                    plan.skipped.append(rec)
                    plan.audit.append(rec)
                if his:
                    legs.append((direction, Offset.CLOSE, his))
            elif split:
                if today:
                    legs.append((direction, Offset.CLOSETODAY, today))
                if his:
                    legs.append((direction, Offset.CLOSEYESTERDAY, his))
            elif today + his:
                legs.append((direction, Offset.CLOSE, today + his))
        if not legs:
            continue
        inst = instruments.get(key)
        if inst is None:
            rec = AuditRecord(action="skip", parent_id=cmd.command_id, account=cmd.account,
                              detail=f"{key}: instrument unknown (no price tick)")
            plan.skipped.append(rec)
            plan.audit.append(rec)
            continue
        for direction, offset, v in legs:
            price = _price(direction, quotes.get(key), float(inst.price_tick), mode, ticks)
            if price is None:
                rec = AuditRecord(action="skip", parent_id=cmd.command_id, account=cmd.account,
                                  detail=f"{key}: no usable quote to price a {direction.value} {offset.value} of {v}")
                plan.skipped.append(rec)
                plan.audit.append(rec)
                continue
            oid = child_id(cmd.command_id, "fc", f"{key}/{offset.value}/{direction.value}")
            o = Order(order_id=oid, id=oid, account=cmd.account, symbol=sym, exchange=Exchange(ex),
                      direction=direction, offset=offset, price_type=PriceType.LIMIT, price=price, volume=v,
                      strategy_id="qarisk", parent_id=cmd.command_id, reduce_only=True, source="forceclose",
                      correlation_id=cmd.command_id, order_time=now_ns)
            plan.orders.append(o)
            plan.audit.append(AuditRecord(action="forceclose", parent_id=cmd.command_id, account=cmd.account,
                                          child_id=oid, detail=f"{direction.value} {offset.value} {v} {key} @ {price:g}"))
    return plan
