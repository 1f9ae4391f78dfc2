"""Pre-trade risk rules: pure, per-account, each switchable, with a structured verdict.

The order router calls :meth:`RiskEngine.check` before dispatching any child order and,
when it dispatches, :meth:`RiskEngine.on_order_accepted`; executor reports feed
:meth:`~RiskEngine.on_order_traded`, :meth:`~RiskEngine.on_order_done` and
:meth:`~RiskEngine.on_cancel`; the risk desk calls :meth:`~RiskEngine.force_close`,
:meth:`~RiskEngine.release`, :meth:`~RiskEngine.halt`, :meth:`~RiskEngine.resume`. No I/O;
the clock is injected: ``now`` is *exchange-local epoch milliseconds* (the number
:mod:`qamarket.sessions` and ``Tick.datetime`` use), e.g. ``sessions.ms_of(2025, 3, 3, 9, 1)``.

Rules run in this fixed order; the first rejection is returned (``all_rejections=True``
returns every one):

1. ``state``    halted account -> everything rejected; reduce-only (after a force-close)
                -> only closing orders on a side that holds at least the order's volume.
2. ``session``  outside the instrument's sessions (weekends/holidays of the calendar
                included) -> rejected; call auctions pass unless ``allow_auction=False``.
3. ``instrument`` the instrument is unknown to the market view -> rejected (fail closed).
4. ``volume``   lot size (opens/buys: multiple of ``lot_size``; stock sells: a multiple of
                the lot, or the odd part equal to the odd part of the sellable holding);
                ``volume <= max_volume``; ``price*volume*multiplier <= max_value``.
5. ``price``    ``limit_down <= price <= limit_up`` (when the quote has them), ``|price -
                last| <= last*band_pct/100``, price a multiple of ``price_tick`` (within
                ``1e-6`` tick, so float noise never rejects a good price).
6. ``position`` closes: closable = bucket volume - frozen (working closes) on the buckets
                the offset uses -- stocks: yesterday's only (T+1), no short selling, no
                CLOSETODAY; SHFE/INE: CLOSETODAY today's, CLOSE/CLOSEYESTERDAY yesterday's;
                other exchanges: CLOSETODAY today's, CLOSEYESTERDAY yesterday's, CLOSE both.
7. ``funds``    opens/stock buys: ``margin + fees <= available - reserve``
                (futures ``price*volume*multiplier*margin_rate + open fee``; stocks
                ``price*volume + max(commission, min_commission) + transfer fee``);
                futures closes: the close fee (the larger of close/close-today unless the
                offset says which) ``<= available - reserve``; stock sells: not checked.
8. ``exposure`` opens only: per instrument and side lots/value, account gross lots/value,
                ``|long value - short value|``, all *after* the order, counting held
                positions, working opens this engine accepted, and the order.
9. ``flow``     sliding-window order rate, active orders, daily orders (account and
                instrument), daily cancels (account and instrument), daily trades
                (account and instrument), cancel ratio, duplicate orders within a window.

Boundaries: a value *at* a limit passes, one tick/lot/order over fails. Counted limits
("at most N") reject the order that would be the N+1-th.

MARKET orders without a price are valued at the quote's ``limit_up`` (worst case for
funds) or else its ``last_price``; with neither they fail the ``price`` rule
(``no_reference_price``) when funds/exposure/value need a price.

Daily counters reset when the trading day changes: derived from ``now`` with the
calendar (night session -> the next trading day) and/or set by :meth:`on_trading_day`;
the day only moves forward.

Not thread-safe: one engine per router thread (the router is single threaded per queue).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from qamarket import sessions as _sessions
from qaorder.models import SPLIT_TODAY_EXCHANGES, Direction, Offset, Order, OrderRejected, PriceType

from .config import RiskConfig

__all__ = [
    "Rejection", "Decision", "ACCEPT", "RiskState", "RiskEngine", "AccountView", "MarketView", "QuoteView",
    "BucketView", "PositionView", "AccountSnapshot", "MarketSnapshot", "is_tick_multiple", "RULE_ORDER",
]

RULE_ORDER = ("state", "session", "instrument", "volume", "price", "position", "funds", "exposure", "flow")
TICK_EPS = 1e-6          # fraction of a tick tolerated as float noise
_UNSET = 1e300           # CTP marks unset prices with DBL_MAX
_MS_DAY = _sessions.MS_DAY
_SIX_H = 6 * 3_600_000
_EIGHTEEN_H = 18 * 3_600_000

_BUY = Direction.BUY
_OPEN = Offset.OPEN
_CLOSETODAY = Offset.CLOSETODAY
_CLOSEYESTERDAY = Offset.CLOSEYESTERDAY
_MARKET = PriceType.MARKET
_CONTINUOUS = _sessions.Phase.CONTINUOUS
_CLOSED = _sessions.Phase.CLOSED


# ============================================================================ inputs (protocols)
class QuoteView(Protocol):
    """What the price rule needs of a quote (``qamarket.models.Tick`` fits)."""

    last_price: float
    limit_up: float
    limit_down: float


class BucketView(Protocol):
    volume: int
    frozen: int


class PositionView(Protocol):
    """One instrument's position in four buckets (``qaaccount.account.Position`` fits)."""

    long_today: BucketView
    long_his: BucketView
    short_today: BucketView
    short_his: BucketView


class AccountView(Protocol):
    """What the rules read of an account; :class:`AccountSnapshot` builds one from a
    ``qaaccount.account.Account``. Values are marked at the last price."""

    available: float
    positions: Mapping[str, PositionView]   # by "EXCHANGE.symbol"
    long_value: float                       # sum of long lots * last price * multiplier
    short_value: float
    gross_lots: int                         # sum of long + short lots, all instruments


class MarketView(Protocol):
    """``instruments`` by key (``qaaccount.instruments.Instruments`` fits: multiplier,
    price_tick, lot_size, margin_rate, fee fields, ``is_stock``, ``exchange``); ``quotes``
    by key (Ticks); ``sessions`` by key: a :mod:`qamarket.sessions` template name, template
    or anything with ``.session`` (InstrumentSpec). A key missing from ``sessions`` falls
    back to :func:`qamarket.models.spec_for`."""

    instruments: Mapping[str, Any]
    quotes: Mapping[str, QuoteView]
    sessions: Mapping[str, Any]


@dataclass(slots=True)
class AccountSnapshot:
    """A plain :class:`AccountView`. Build it once per account change, not per check."""

    available: float
    positions: Mapping[str, Any] = field(default_factory=dict)
    long_value: float = 0.0
    short_value: float = 0.0
    gross_lots: int = 0

    @classmethod
    def from_account(cls, account: Any, prices: Mapping[str, float] | None = None) -> AccountSnapshot:
        """From a ``qaaccount.account.Account`` (positions by key, marked at ``prices`` or
        each position's ``last_price``). The positions are shared, not copied."""
        lv = sv = 0.0
        lots = 0
        for key, p in account.positions.items():
            lg = p.long_today.volume + p.long_his.volume
            sh = p.short_today.volume + p.short_his.volume
            lots += lg + sh
            px = (prices or {}).get(key, p.last_price) or 0.0
            m = p.inst.multiplier
            lv += lg * px * m
            sv += sh * px * m
        return cls(available=account.available, positions=account.positions, long_value=lv, short_value=sv,
                   gross_lots=lots)


@dataclass(slots=True)
class MarketSnapshot:
    """A plain :class:`MarketView`."""

    instruments: Mapping[str, Any]
    quotes: Mapping[str, Any] = field(default_factory=dict)
    sessions: Mapping[str, Any] = field(default_factory=dict)


_NO_POSITIONS: Mapping[str, Any] = {}


# ============================================================================ verdict
class Rejection(msgspec.Struct, frozen=True, gc=False):
    """Why an order was refused: ``rule`` (one of :data:`RULE_ORDER`), ``check`` (the
    specific limit, e.g. ``orders_per_window``), a sentence, and the limit and value."""

    rule: str
    check: str
    reason: str
    limit: float | None = None
    value: float | None = None

    def __str__(self) -> str:
        return f"risk.{self.rule}.{self.check}: {self.reason}"

    def to_order_rejected(self, order: Order) -> OrderRejected:
        """As the router's error type (``field`` = ``risk.<rule>.<check>``)."""
        return OrderRejected(f"risk.{self.rule}.{self.check}", self.reason, order_id=order.order_id,
                             account=order.account)


class Decision:
    """``ok`` and the rejections (empty when ok). Accepts are the shared :data:`ACCEPT`."""

    __slots__ = ("ok", "rejections")

    def __init__(self, ok: bool, rejections: tuple[Rejection, ...] = ()) -> None:
        self.ok = ok
        self.rejections = rejections

    def __bool__(self) -> bool:
        return self.ok

    @property
    def rejection(self) -> Rejection | None:
        return self.rejections[0] if self.rejections else None

    def __repr__(self) -> str:
        if self.ok:
            return "Decision(ok)"
        return f"Decision(rejected: {'; '.join(map(str, self.rejections))})"


ACCEPT = Decision(True)


def is_tick_multiple(price: float, tick: float) -> bool:
    """Whether ``price`` is a whole number of ``tick`` (float noise up to 1e-6 tick tolerated)."""
    n = round(price / tick)
    return abs(price - n * tick) <= tick * TICK_EPS


def _ev(x: Any) -> str:
    """An enum's value, or a str as is (orders built with plain strings compare equal too)."""
    return getattr(x, "value", x)  # type: ignore[no-any-return]


def _fmt(x: float) -> str:
    return f"{x:.10g}"


# ============================================================================ state
class _Working:
    __slots__ = ("key", "is_buy", "is_open", "cls", "left", "unit_value")

    def __init__(self, key: str, is_buy: bool, is_open: bool, cls: str, left: int, unit_value: float) -> None:
        self.key = key
        self.is_buy = is_buy
        self.is_open = is_open
        self.cls = cls            # close orders: "long:today" / "short:any" ...
        self.left = left
        self.unit_value = unit_value


@dataclass(slots=True, eq=False)
class RiskState:
    """Counters and flags of one account. Mutated only through the engine's hooks."""

    trading_day: str = ""
    halted: bool = False
    reduce_only: bool = False
    reason: str = ""
    # sliding windows: deques of local-ms timestamps
    order_times: deque[int] = field(default_factory=deque)
    cancel_times: deque[int] = field(default_factory=deque)
    # working orders accepted by this engine
    active: dict[str, _Working] = field(default_factory=dict)
    working_open: dict[str, list[int]] = field(default_factory=dict)    # key -> [long lots, short lots]
    working_close: dict[tuple[str, str], int] = field(default_factory=dict)  # (key, "long:his") -> lots
    working_open_lots: int = 0
    working_long_value: float = 0.0
    working_short_value: float = 0.0
    # daily counters (reset at the trading-day change)
    daily_orders: int = 0
    orders_by: dict[str, int] = field(default_factory=dict)
    daily_cancels: int = 0
    cancels_by: dict[str, int] = field(default_factory=dict)
    cancelled_ids: set[str] = field(default_factory=set)
    daily_trades: int = 0
    trades_by: dict[str, int] = field(default_factory=dict)
    trade_ids: set[str] = field(default_factory=set)
    # duplicate detection
    dup_counts: dict[tuple[Any, ...], int] = field(default_factory=dict)
    dup_queue: deque[tuple[int, tuple[Any, ...]]] = field(default_factory=deque)

    def reset_daily(self, day: str) -> None:
        self.trading_day = day
        self.daily_orders = 0
        self.orders_by.clear()
        self.daily_cancels = 0
        self.cancels_by.clear()
        self.cancelled_ids.clear()
        self.daily_trades = 0
        self.trades_by.clear()
        self.trade_ids.clear()


def _close_class(order: Order, inst: Any) -> str:
    """Which buckets a close takes: ``"<side>:today|his|any"`` (side = the position closed)."""
    side = "long" if order.direction != _BUY else "short"
    off = order.offset
    if inst is not None and inst.is_stock:
        return side + ":his"
    if off == _CLOSETODAY:
        return side + ":today"
    if off == _CLOSEYESTERDAY or order.exchange in SPLIT_TODAY_EXCHANGES:
        return side + ":his"
    return side + ":any"


def _dup_key(order: Order) -> tuple[Any, ...]:
    return (order.symbol, order.exchange, order.direction, order.offset, order.price_type, order.price, order.volume)


_Rule = Callable[..., "Rejection | None"]


class _Plan:
    """A config compiled for the hot path: the enabled rule functions and plain numbers."""

    __slots__ = ("cfg", "rules", "needs_inst", "needs_price", "window_ms", "cancel_window_ms", "dup_ms",
                 "band", "reserve", "allow_auction")

    def __init__(self, cfg: RiskConfig, engine: RiskEngine) -> None:
        self.cfg = cfg
        rules: list[_Rule] = []
        if cfg.enabled:
            table: list[tuple[str, Any, _Rule]] = [
                ("state", cfg.state, engine._r_state), ("session", cfg.session, engine._r_session),
                ("volume", cfg.volume, engine._r_volume), ("price", cfg.price, engine._r_price),
                ("position", cfg.position, engine._r_position), ("funds", cfg.funds, engine._r_funds),
                ("exposure", cfg.exposure, engine._r_exposure), ("flow", cfg.flow, engine._r_flow),
            ]
            rules = [fn for _name, section, fn in table if section.enabled]
        self.rules = tuple(rules)
        self.needs_inst = cfg.enabled and any(
            s.enabled for s in (cfg.volume, cfg.price, cfg.position, cfg.funds, cfg.exposure))
        f = cfg.flow
        self.needs_price = cfg.enabled and (cfg.funds.enabled or (cfg.exposure.enabled and any(
            x is not None for x in (cfg.exposure.max_position_value, cfg.exposure.max_account_value,
                                    cfg.exposure.max_net_value))) or (cfg.volume.enabled and cfg.volume.max_value is not None))
        self.window_ms = int(round(f.window_s * 1000))
        self.cancel_window_ms = self.window_ms
        self.dup_ms = int(round(f.duplicate_window_s * 1000)) if f.duplicate_window_s is not None else 0
        self.band = cfg.price.band_pct / 100.0 if cfg.price.band_pct is not None else None
        self.reserve = cfg.funds.reserve
        self.allow_auction = cfg.session.allow_auction


# ============================================================================ engine
class RiskEngine:
    """Pre-trade checks for many accounts.

    ``configs`` by account; ``default`` for accounts without one (``None``: such orders
    are rejected, rule ``state``, check ``no_config``). ``calendar`` gives weekends,
    holidays and trading days (default :data:`qamarket.sessions.DEFAULT_CALENDAR`).
    """

    def __init__(self, configs: Mapping[str, RiskConfig] | None = None, *, default: RiskConfig | None = None,
                 calendar: _sessions.Calendar | None = None) -> None:
        self.calendar = calendar or _sessions.DEFAULT_CALENDAR
        self._plans: dict[str, _Plan] = {}
        self._default = _Plan(default, self) if default is not None else None
        self._states: dict[str, RiskState] = {}
        self._order_account: dict[str, tuple[str, str]] = {}   # order id -> (account, key)
        self._tpl_cache: dict[str, Any] = {}
        self._phase_cache: dict[str, tuple[int, Any]] = {}
        self._td_lo = 1
        self._td_hi = 0
        self._td = ""
        self._forced_day = ""
        for account, cfg in (configs or {}).items():
            self.configure(account, cfg)

    # ------------------------------------------------------------------ configuration / state
    def configure(self, account: str, config: RiskConfig) -> None:
        """Set (or replace) an account's config; its counters are kept."""
        self._plans[account] = _Plan(config, self)

    def config(self, account: str) -> RiskConfig | None:
        p = self._plans.get(account) or self._default
        return p.cfg if p is not None else None

    def state(self, account: str) -> RiskState:
        st = self._states.get(account)
        if st is None:
            st = self._states[account] = RiskState(trading_day=self._forced_day)
        return st

    def force_close(self, account: str, reason: str = "force-close") -> None:
        """After a force-close: only orders that reduce a position pass until :meth:`release`."""
        st = self.state(account)
        st.reduce_only = True
        st.reason = reason

    def release(self, account: str) -> None:
        st = self.state(account)
        st.reduce_only = False
        if not st.halted:
            st.reason = ""

    def halt(self, account: str, reason: str = "halted") -> None:
        st = self.state(account)
        st.halted = True
        st.reason = reason

    def resume(self, account: str) -> None:
        st = self.state(account)
        st.halted = False
        if not st.reduce_only:
            st.reason = ""

    # ------------------------------------------------------------------ trading day
    def _day_of(self, now: int) -> str:
        if self._td_lo <= now < self._td_hi:
            return self._td
        day0 = now - now % _MS_DAY
        rem = now - day0
        if rem < _SIX_H:
            lo, hi = day0, day0 + _SIX_H
        elif rem < _EIGHTEEN_H:
            lo, hi = day0 + _SIX_H, day0 + _EIGHTEEN_H
        else:
            lo, hi = day0 + _EIGHTEEN_H, day0 + _MS_DAY
        td = self.calendar.trading_day(now)
        if td < self._forced_day:
            td = self._forced_day
        self._td_lo, self._td_hi, self._td = lo, hi, td
        return td

    def on_trading_day(self, day: str) -> None:
        """A new trading day (``YYYYMMDD``) began: daily counters of every account reset.
        Days only move forward: an older day than the current one is ignored."""
        if day <= self._forced_day:
            return
        self._forced_day = day
        if self._td < day:
            self._td = day
        for st in self._states.values():
            if st.trading_day < day:
                st.reset_daily(day)
        # forget finished orders of earlier days (late fills of them no longer count)
        live = {oid for st in self._states.values() for oid in st.active}
        self._order_account = {oid: r for oid, r in self._order_account.items() if oid in live}

    def _roll(self, st: RiskState, now: int) -> None:
        day = self._day_of(now)
        if st.trading_day < day:
            st.reset_daily(day)

    # ------------------------------------------------------------------ the check
    def check(self, order: Order, account: AccountView | None, market: MarketView, now: int, *,
              all_rejections: bool = False) -> Decision:
        """Run the account's enabled rules on ``order``; the first rejection (or all of them)."""
        plan = self._plans.get(order.account) or self._default
        if plan is None:
            return Decision(False, (Rejection("state", "no_config", f"no risk config for account {order.account!r}"),))
        rules = plan.rules
        if not rules:
            return ACCEPT
        st = self._states.get(order.account)
        if st is None:
            st = self.state(order.account)
        # trading-day roll (two comparisons unless the 6 h segment changed)
        if not (self._td_lo <= now < self._td_hi) or st.trading_day != self._td:
            self._roll(st, now)

        key = order.key
        inst = market.instruments.get(key)
        if inst is None and plan.needs_inst:   # nothing else can be judged without it
            return Decision(False, (Rejection("instrument", "unknown", f"unknown instrument {key}"),))
        quote = market.quotes.get(key)
        price = order.price
        if price is None and plan.needs_price and quote is not None:
            lu = quote.limit_up
            price = lu if 0 < lu < _UNSET else (quote.last_price if 0 < quote.last_price < _UNSET else None)
        pos = account.positions.get(key) if account is not None else None

        if not all_rejections:
            for rule in rules:
                rej = rule(order, key, inst, quote, price, pos, account, market, plan, st, now)
                if rej is not None:
                    return Decision(False, (rej,))
            return ACCEPT
        out = []
        for rule in rules:
            rej = rule(order, key, inst, quote, price, pos, account, market, plan, st, now)
            if rej is not None:
                out.append(rej)
        return Decision(False, tuple(out)) if out else ACCEPT

    # ------------------------------------------------------------------ rules
    # Every rule: (order, key, inst, quote, price, pos, account, market, plan, state, now) -> Rejection | None

    def _r_state(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                 account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        if st.halted:
            return Rejection("state", "halted", f"account {order.account} is halted ({st.reason})")
        if st.reduce_only:
            if order.offset == _OPEN:
                return Rejection("state", "reduce_only",
                                 f"account {order.account} is reduce-only ({st.reason}): opening orders refused")
            held = 0
            if pos is not None:
                if order.direction == _BUY:
                    held = pos.short_today.volume + pos.short_his.volume
                else:
                    held = pos.long_today.volume + pos.long_his.volume
            if order.volume > held:
                side = "short" if order.direction == _BUY else "long"
                return Rejection("state", "reduce_only",
                                 f"account {order.account} is reduce-only ({st.reason}): {order.volume} exceeds "
                                 f"the {held} {side} held in {key}", limit=held, value=order.volume)
        return None

    def _r_session(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                   account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        tpl = self._tpl_cache.get(key)
        if tpl is None:
            tpl = self._template(order, key, market)
            if tpl is None:
                return Rejection("session", "unknown_session", f"no trading session known for {key}")
        sec = now // 1000
        cached = self._phase_cache.get(tpl.name)
        if cached is not None and cached[0] == sec:
            ph = cached[1]
        else:
            ph = _sessions.is_trading(tpl, now, self.calendar)
            self._phase_cache[tpl.name] = (sec, ph)
        if ph is _CONTINUOUS:
            return None
        if ph is _CLOSED:
            return Rejection("session", "closed",
                             f"{key} is not trading at {_sessions.from_ms(now):%Y-%m-%d %H:%M:%S} ({tpl.name})")
        if not plan.allow_auction:
            return Rejection("session", "auction", f"{key} is in a call auction and auction orders are off")
        return None

    def _template(self, order: Order, key: str, market: Any) -> Any:
        src = getattr(market, "sessions", None)
        spec = src.get(key) if src is not None else None
        if spec is None:
            from qamarket.models import UnknownInstrument, spec_for
            try:
                spec = spec_for(order.symbol, _ev(order.exchange))
            except UnknownInstrument:
                return None
        try:
            tpl = _sessions.template(spec)
        except ValueError:
            return None
        self._tpl_cache[key] = tpl
        return tpl

    def _r_volume(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                  account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        c = plan.cfg.volume
        v = order.volume
        if c.max_volume is not None and v > c.max_volume:
            return Rejection("volume", "max_volume", f"volume {v} exceeds the per-order maximum {c.max_volume}",
                             limit=c.max_volume, value=v)
        if c.check_lot:
            lot = inst.lot_size
            if lot > 1 and v % lot:
                if inst.is_stock and order.direction != _BUY:
                    # stock sell: an odd lot only to clear the odd part of the sellable holding
                    holding = pos.long_his.volume - pos.long_his.frozen if pos is not None else 0
                    if v % lot != holding % lot:
                        return Rejection("volume", "odd_lot",
                                         f"odd lot {v % lot} can only sell the odd part of the holding "
                                         f"({holding % lot} of {holding} sellable)", limit=holding % lot, value=v % lot)
                elif order.offset == _OPEN or inst.is_stock:
                    return Rejection("volume", "lot_size", f"volume {v} is not a multiple of the lot size {lot}",
                                     limit=lot, value=v)
        if c.max_value is not None:
            if price is None:
                return Rejection("price", "no_reference_price", f"no price to value the MARKET order on {key}")
            value = price * v * inst.multiplier
            if value > c.max_value * (1 + 1e-12):
                return Rejection("volume", "max_value",
                                 f"order value {_fmt(value)} exceeds the per-order maximum {_fmt(c.max_value)}",
                                 limit=c.max_value, value=value)
        return None

    def _r_price(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                 account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        p = order.price
        c = plan.cfg.price
        if p is None:       # MARKET without a protective price: nothing to check here
            if plan.needs_price and price is None:
                return Rejection("price", "no_reference_price", f"no quote to value the MARKET order on {key}")
            return None
        tick = inst.price_tick
        eps = tick * TICK_EPS
        if quote is None:
            if c.require_quote and (c.check_limits or plan.band is not None):
                return Rejection("price", "no_quote", f"no quote for {key} to check the price against")
        else:
            if c.check_limits:
                lu = quote.limit_up
                if 0 < lu < _UNSET and p > lu + eps:
                    return Rejection("price", "limit_up", f"price {_fmt(p)} above the limit-up {_fmt(lu)}",
                                     limit=lu, value=p)
                ld = quote.limit_down
                if 0 < ld < _UNSET and p < ld - eps:
                    return Rejection("price", "limit_down", f"price {_fmt(p)} below the limit-down {_fmt(ld)}",
                                     limit=ld, value=p)
            band = plan.band
            if band is not None:
                last = quote.last_price
                if 0 < last < _UNSET:
                    dev = abs(p - last)
                    lim = last * band
                    if dev > lim + eps:
                        return Rejection("price", "band",
                                         f"price {_fmt(p)} is {_fmt(dev / last * 100)}% from the last price "
                                         f"{_fmt(last)}, band {_fmt(band * 100)}%", limit=lim, value=dev)
                elif c.require_quote:
                    return Rejection("price", "no_quote", f"no last price for {key} to check the band against")
        if c.check_tick:
            n = round(p / tick)
            if abs(p - n * tick) > eps:
                return Rejection("price", "tick", f"price {_fmt(p)} is not a multiple of the tick {_fmt(tick)}",
                                 limit=tick, value=p)
        return None

    def _r_position(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                    account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        off = order.offset
        buy = order.direction == _BUY
        if inst.is_stock:
            if buy and off != _OPEN:
                return Rejection("position", "stock_offset", "a stock BUY must be OPEN")
            if not buy:
                if off == _OPEN:
                    return Rejection("position", "short_selling", f"no short selling of {key}")
                if off == _CLOSETODAY:
                    return Rejection("position", "t_plus_1", "T+1: shares bought today cannot be sold (CLOSETODAY)")
        if off == _OPEN:
            return None
        cls = _close_class(order, inst)
        side, _, which = cls.partition(":")
        if pos is None:
            avail = 0
            vol_today = 0
        else:
            if side == "long":
                t, h = pos.long_today, pos.long_his
            else:
                t, h = pos.short_today, pos.short_his
            vol_today = t.volume
            own = st.working_close if plan.cfg.position.count_own_working else None
            if which == "today":
                fr = t.frozen
                if own:
                    fr = max(fr, own.get((key, cls), 0))
                avail = t.volume - fr
            elif which == "his":
                fr = h.frozen
                if own:
                    fr = max(fr, own.get((key, cls), 0))
                avail = h.volume - fr
            else:
                fr = t.frozen + h.frozen
                if own:
                    fr = max(fr, own.get((key, cls), 0) + own.get((key, side + ":today"), 0)
                             + own.get((key, side + ":his"), 0))
                avail = t.volume + h.volume - fr
        if order.volume > avail:
            hint = ""
            if vol_today and inst.is_stock:
                hint = f"; {vol_today} bought today are not sellable until the next trading day (T+1)"
            elif vol_today and which == "his" and order.exchange in SPLIT_TODAY_EXCHANGES:
                hint = f"; today's {vol_today} need CLOSETODAY on {_ev(order.exchange)}"
            return Rejection("position", "closable",
                             f"{_ev(off)} {order.volume} {side} {key}: only {max(avail, 0)} closable"
                             f" ({which} position, frozen by working closes subtracted){hint}",
                             limit=max(avail, 0), value=order.volume)
        return None

    def _r_funds(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                 account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        if account is None:
            return Rejection("funds", "no_account", f"no account view for {order.account}")
        if price is None:
            return Rejection("price", "no_reference_price", f"no price to value the MARKET order on {key}")
        v = order.volume
        t = price * v * inst.multiplier
        off = order.offset
        if inst.is_stock:
            if order.direction != _BUY:
                return None
            comm = inst.commission_ratio * t
            if comm < inst.min_commission:
                comm = inst.min_commission
            need = t + comm + inst.transfer_fee_ratio * t
            what = "cost"
        elif off == _OPEN:
            need = t * inst.margin_rate + inst.open_ratio * t + inst.open_per_lot * v
            what = "margin + fees"
        else:
            fc = inst.close_ratio * t + inst.close_per_lot * v
            ft = inst.close_today_ratio * t + inst.close_today_per_lot * v
            need = ft if off == _CLOSETODAY else fc if off == _CLOSEYESTERDAY else (fc if fc > ft else ft)
            what = "close fees"
        have = account.available - plan.reserve
        if need > have + 1e-9:
            return Rejection("funds", "available",
                             f"{order.order_id} needs {need:.2f} ({what}), available {account.available:.2f}"
                             + (f" minus reserve {plan.reserve:.2f}" if plan.reserve else ""),
                             limit=have, value=need)
        return None

    def _r_exposure(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                    account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        if order.offset != _OPEN:
            return None
        c = plan.cfg.exposure
        v = order.volume
        buy = order.direction == _BUY
        mult = inst.multiplier
        if c.max_position_lots is not None or c.max_position_value is not None:
            held = 0
            if pos is not None:
                held = (pos.long_today.volume + pos.long_his.volume) if buy else (
                    pos.short_today.volume + pos.short_his.volume)
            w = st.working_open.get(key)
            if w is not None:
                held += w[0] if buy else w[1]
            lots = held + v
            side = "long" if buy else "short"
            if c.max_position_lots is not None and lots > c.max_position_lots:
                return Rejection("exposure", "position_lots",
                                 f"{side} {key} would be {lots} lots, maximum {c.max_position_lots}",
                                 limit=c.max_position_lots, value=lots)
            if c.max_position_value is not None:
                if price is None:
                    return Rejection("price", "no_reference_price", f"no price to value {key}")
                val = lots * price * mult
                if val > c.max_position_value * (1 + 1e-12):
                    return Rejection("exposure", "position_value",
                                     f"{side} {key} would be worth {_fmt(val)}, maximum {_fmt(c.max_position_value)}",
                                     limit=c.max_position_value, value=val)
        if c.max_account_lots is not None:
            lots = (account.gross_lots if account is not None else 0) + st.working_open_lots + v
            if lots > c.max_account_lots:
                return Rejection("exposure", "account_lots",
                                 f"account {order.account} would hold {lots} lots, maximum {c.max_account_lots}",
                                 limit=c.max_account_lots, value=lots)
        if c.max_account_value is not None or c.max_net_value is not None:
            if price is None:
                return Rejection("price", "no_reference_price", f"no price to value {key}")
            ov = price * v * mult
            lv = (account.long_value if account is not None else 0.0) + st.working_long_value
            sv = (account.short_value if account is not None else 0.0) + st.working_short_value
            if buy:
                lv += ov
            else:
                sv += ov
            if c.max_account_value is not None and lv + sv > c.max_account_value * (1 + 1e-12):
                return Rejection("exposure", "account_value",
                                 f"account {order.account} gross value would be {_fmt(lv + sv)}, "
                                 f"maximum {_fmt(c.max_account_value)}", limit=c.max_account_value, value=lv + sv)
            if c.max_net_value is not None and abs(lv - sv) > c.max_net_value * (1 + 1e-12):
                return Rejection("exposure", "net_value",
                                 f"account {order.account} net value would be {_fmt(lv - sv)}, "
                                 f"maximum |net| {_fmt(c.max_net_value)}", limit=c.max_net_value, value=abs(lv - sv))
        return None

    def _r_flow(self, order: Order, key: str, inst: Any, quote: Any, price: float | None, pos: Any,
                account: Any, market: Any, plan: _Plan, st: RiskState, now: int) -> Rejection | None:
        c = plan.cfg.flow
        if c.max_orders_per_window is not None:
            q = st.order_times
            edge = now - plan.window_ms
            while q and q[0] <= edge:
                q.popleft()
            if len(q) >= c.max_orders_per_window:
                return Rejection("flow", "orders_per_window",
                                 f"{len(q)} orders in the last {c.window_s:g} s, maximum {c.max_orders_per_window}",
                                 limit=c.max_orders_per_window, value=len(q) + 1)
        if c.max_active_orders is not None and len(st.active) >= c.max_active_orders:
            return Rejection("flow", "active_orders",
                             f"{len(st.active)} working orders, maximum {c.max_active_orders}",
                             limit=c.max_active_orders, value=len(st.active) + 1)
        if c.max_daily_orders is not None and st.daily_orders >= c.max_daily_orders:
            return Rejection("flow", "daily_orders",
                             f"{st.daily_orders} orders today ({st.trading_day}), maximum {c.max_daily_orders}",
                             limit=c.max_daily_orders, value=st.daily_orders + 1)
        if c.max_daily_orders_per_instrument is not None:
            n = st.orders_by.get(key, 0)
            if n >= c.max_daily_orders_per_instrument:
                return Rejection("flow", "daily_orders_instrument",
                                 f"{n} orders on {key} today, maximum {c.max_daily_orders_per_instrument}",
                                 limit=c.max_daily_orders_per_instrument, value=n + 1)
        if c.max_daily_cancels is not None and st.daily_cancels >= c.max_daily_cancels:
            return Rejection("flow", "daily_cancels",
                             f"{st.daily_cancels} cancels today, maximum {c.max_daily_cancels}: new orders refused",
                             limit=c.max_daily_cancels, value=st.daily_cancels)
        if c.max_cancels_per_instrument is not None:
            n = st.cancels_by.get(key, 0)
            if n >= c.max_cancels_per_instrument:
                return Rejection("flow", "cancels_instrument",
                                 f"{n} cancels on {key} today, maximum {c.max_cancels_per_instrument}: "
                                 f"new orders on it refused", limit=c.max_cancels_per_instrument, value=n)
        if c.max_daily_trades is not None and st.daily_trades >= c.max_daily_trades:
            return Rejection("flow", "daily_trades", f"{st.daily_trades} trades today, maximum {c.max_daily_trades}",
                             limit=c.max_daily_trades, value=st.daily_trades)
        if c.max_daily_trades_per_instrument is not None:
            n = st.trades_by.get(key, 0)
            if n >= c.max_daily_trades_per_instrument:
                return Rejection("flow", "daily_trades_instrument",
                                 f"{n} trades on {key} today, maximum {c.max_daily_trades_per_instrument}",
                                 limit=c.max_daily_trades_per_instrument, value=n)
        if c.max_cancel_ratio is not None and st.daily_orders and st.daily_orders >= c.cancel_ratio_min_orders:
            ratio = st.daily_cancels / st.daily_orders
            if ratio > c.max_cancel_ratio + 1e-12:
                return Rejection("flow", "cancel_ratio",
                                 f"cancel ratio {st.daily_cancels}/{st.daily_orders} = {ratio:.1%} today, "
                                 f"maximum {c.max_cancel_ratio:.1%}", limit=c.max_cancel_ratio, value=ratio)
        if plan.dup_ms:
            q2 = st.dup_queue
            counts = st.dup_counts
            edge = now - plan.dup_ms
            while q2 and q2[0][0] <= edge:
                _, k = q2.popleft()
                n = counts[k] - 1
                if n:
                    counts[k] = n
                else:
                    del counts[k]
            if counts:
                n = counts.get(_dup_key(order), 0)
                if n >= c.max_duplicates:
                    return Rejection("flow", "duplicate",
                                     f"{n} identical order(s) ({_ev(order.direction)} {_ev(order.offset)} "
                                     f"{order.volume} {key} @ {order.price}) in the last {c.duplicate_window_s:g} s",
                                     limit=c.max_duplicates, value=n + 1)
        return None

    # ------------------------------------------------------------------ cancels
    def check_cancel(self, account: str, now: int) -> Decision:
        """May ``account`` send a cancel now? (``max_cancels_per_window``, sliding.) Record it
        with :meth:`on_cancel_sent` when sent."""
        plan = self._plans.get(account) or self._default
        if plan is None or not plan.cfg.enabled or not plan.cfg.flow.enabled:
            return ACCEPT
        lim = plan.cfg.flow.max_cancels_per_window
        if lim is None:
            return ACCEPT
        st = self.state(account)
        q = st.cancel_times
        edge = now - plan.cancel_window_ms
        while q and q[0] <= edge:
            q.popleft()
        if len(q) >= lim:
            return Decision(False, (Rejection("flow", "cancels_per_window",
                                              f"{len(q)} cancels in the last {plan.cfg.flow.window_s:g} s, "
                                              f"maximum {lim}", limit=lim, value=len(q) + 1),))
        return ACCEPT

    def on_cancel_sent(self, account: str, now: int) -> None:
        self.state(account).cancel_times.append(now)

    # ------------------------------------------------------------------ hooks
    def on_order_accepted(self, order: Order, now: int, market: MarketView | None = None) -> None:
        """The router dispatched ``order``: count it (window, daily, duplicates, working).
        ``market`` (its instruments) lets working opens be valued and stock closes classed."""
        st = self.state(order.account)
        self._roll(st, now)
        if order.order_id in self._order_account:
            return
        plan = self._plans.get(order.account) or self._default
        key = order.key
        st.order_times.append(now)
        st.daily_orders += 1
        st.orders_by[key] = st.orders_by.get(key, 0) + 1
        if plan is not None and plan.dup_ms:
            k = _dup_key(order)
            st.dup_queue.append((now, k))
            st.dup_counts[k] = st.dup_counts.get(k, 0) + 1
        self._add_working(st, order, order.volume, market)

    def restore_working(self, order: Order, left: int, market: MarketView | None = None) -> None:
        """After a restart: ``order`` was dispatched earlier and still has ``left`` lots working
        (from the account's frozen orders). It counts toward working orders, working opens and
        closes and exposure again; the daily and window counters are restored apart and are not
        counted a second time. Idempotent by order id."""
        if left <= 0 or order.order_id in self._order_account:
            return
        self._add_working(self.state(order.account), order, left, market)

    def _add_working(self, st: RiskState, order: Order, volume: int, market: MarketView | None) -> None:
        key = order.key
        inst = market.instruments.get(key) if market is not None else None
        buy = order.direction == _BUY
        if order.offset == _OPEN:
            unit = 0.0
            if inst is not None:
                px = order.price
                if px is None and market is not None:
                    q = market.quotes.get(key)
                    px = q.limit_up if q is not None and 0 < q.limit_up < _UNSET else (
                        q.last_price if q is not None else None)
                unit = (px or 0.0) * inst.multiplier
            w = _Working(key, buy, True, "", volume, unit)
            lots = st.working_open.setdefault(key, [0, 0])
            lots[0 if buy else 1] += volume
            st.working_open_lots += volume
            if buy:
                st.working_long_value += unit * volume
            else:
                st.working_short_value += unit * volume
        else:
            if inst is None and _ev(order.exchange) in ("SSE", "SZSE", "BSE"):
                cls = ("long" if not buy else "short") + ":his"
            else:
                cls = _close_class(order, inst)
            w = _Working(key, buy, False, cls, volume, 0.0)
            ck = (key, cls)
            st.working_close[ck] = st.working_close.get(ck, 0) + volume
        st.active[order.order_id] = w
        self._order_account[order.order_id] = (order.account, key)

    def _release(self, st: RiskState, w: _Working, volume: int) -> None:
        if volume <= 0:
            return
        if w.is_open:
            lots = st.working_open.get(w.key)
            if lots is not None:
                i = 0 if w.is_buy else 1
                lots[i] = max(0, lots[i] - volume)
                if not lots[0] and not lots[1]:
                    del st.working_open[w.key]
            st.working_open_lots = max(0, st.working_open_lots - volume)
            if w.is_buy:
                st.working_long_value = max(0.0, st.working_long_value - w.unit_value * volume)
            else:
                st.working_short_value = max(0.0, st.working_short_value - w.unit_value * volume)
        else:
            ck = (w.key, w.cls)
            n = st.working_close.get(ck, 0) - volume
            if n > 0:
                st.working_close[ck] = n
            else:
                st.working_close.pop(ck, None)
        w.left -= volume

    def on_order_traded(self, order_id: str, volume: int, trade_id: str | None = None) -> None:
        """A fill of ``volume``: the working volume shrinks (the account's position grows)
        and the daily trade counters count it (once per ``trade_id`` when given)."""
        ref = self._order_account.get(order_id)
        if ref is None:
            return
        st = self.state(ref[0])
        if trade_id is not None:
            if trade_id in st.trade_ids:
                return
            st.trade_ids.add(trade_id)
        st.daily_trades += 1
        st.trades_by[ref[1]] = st.trades_by.get(ref[1], 0) + 1
        w = st.active.get(order_id)
        if w is not None:
            self._release(st, w, min(volume, w.left))
            if w.left <= 0:
                del st.active[order_id]

    def on_order_done(self, order_id: str) -> None:
        """The order reached a terminal state (all traded, cancelled, rejected, expired)."""
        ref = self._order_account.get(order_id)
        if ref is None:
            return
        st = self.state(ref[0])
        w = st.active.pop(order_id, None)
        if w is not None:
            self._release(st, w, w.left)

    def on_cancel(self, order_id: str, now: int, *, account: str | None = None, key: str | None = None) -> None:
        """A cancel of ``order_id`` was confirmed: count it once per order id (daily, per
        instrument) and end the order. ``account``/``key`` are needed only for orders this
        engine never saw accepted."""
        ref = self._order_account.get(order_id)
        acc = ref[0] if ref is not None else account
        if acc is None:
            return
        st = self.state(acc)
        self._roll(st, now)
        k = ref[1] if ref is not None else key
        if order_id not in st.cancelled_ids:
            st.cancelled_ids.add(order_id)
            st.daily_cancels += 1
            if k is not None:
                st.cancels_by[k] = st.cancels_by.get(k, 0) + 1
        self.on_order_done(order_id)

    def forget(self, order_id: str) -> None:
        """Drop the id -> account mapping of a finished order (memory of long-running routers)."""
        ref = self._order_account.pop(order_id, None)
        if ref is not None:
            st = self._states.get(ref[0])
            if st is not None:
                st.active.pop(order_id, None)
