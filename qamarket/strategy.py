"""Strategies: the base class users subclass, and the I/O-free engine that drives it.

A strategy looks like a vn.py ``CtaTemplate`` / QUANTAXIS ``QAStrategyCtaBase``::

    from qamarket.strategy import Strategy

    class Breakout(Strategy):
        parameters = {"window": 20, "volume": 1}     # overridable with --param window=30

        def on_init(self, history):                   # closed bars, oldest first (history + today)
            self.highs = [b.high for b in history]

        def on_bar(self, bar):                        # each new closed bar, once
            if bar.close > max(self.highs[-self.window:]):
                self.set_target_pos(self.volume, price=bar.close)
            self.highs.append(bar.high)

Everything here is pure: :class:`StrategyEngine` takes decoded messages (bars, ticks,
order-status reports, trades, account snapshots, QIFI documents) and appends what the
strategy wants to send (:class:`~qaorder.models.Order`, :class:`~qaorder.models.Cancel`)
to :attr:`StrategyEngine.outbox`; ``handlers/strategy.py`` wires it to RabbitMQ and MongoDB.

Guarantees the engine gives, without any I/O:

* each closed bar reaches ``on_bar`` once: repeated message ids and bars whose label is not
  newer than the last closed bar of that series (including the loaded history) are skipped;
* order ids are deterministic: ``<strategy>-<symbol>-<freq>-<label>-<target>-<n>`` (n counts
  orders per event and target), so a restart that replays the same bar sends the same ids and
  the router (idempotent by order id) does not place them twice;
* an exception in a callback is logged with the event and counted (``counts``); it never
  stops the engine unless ``halt_on_error`` (then :class:`StrategyHalted` is raised).
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from qaorder.models import (
    SPLIT_TODAY_EXCHANGES, STOCK_EXCHANGES, AccountSnapshot, Cancel, Direction, Exchange, Offset, Order,
    OrderStatus, OrderStatusReport, PriceType, Reject, Trade, position_key,
)

from .models import EXCHANGES, Bar, Tick

log = logging.getLogger(__name__)

__all__ = ["Strategy", "StrategyEngine", "Position", "Target", "StrategyHalted", "parse_instrument",
           "parse_params", "load_strategy_class", "order_id_for", "MAX_ORDER_ID"]

MAX_ORDER_ID = 128
_SEEN_IDS = 10_000  # message ids remembered for dedupe


class StrategyHalted(RuntimeError):
    """A callback raised and the engine runs with ``halt_on_error``."""


# ------------------------------------------------------------------------------------------ positions
@dataclass
class Position:
    """One instrument of one account: long/short, today/yesterday (QIFI buckets)."""

    exchange: str
    symbol: str
    long_today: int = 0
    long_his: int = 0
    short_today: int = 0
    short_his: int = 0

    @property
    def long(self) -> int:
        return self.long_today + self.long_his

    @property
    def short(self) -> int:
        return self.short_today + self.short_his

    @property
    def net(self) -> int:
        return self.long - self.short

    @classmethod
    def from_qifi(cls, key: str, doc: Mapping[str, Any]) -> Position:
        ex, _, sym = key.partition(".")
        ex = str(doc.get("exchange_id") or ex)
        sym = str(doc.get("instrument_id") or sym)

        def v(name: str) -> int:
            return int(doc.get(name) or 0)

        return cls(ex, sym, v("volume_long_today"), v("volume_long_his"), v("volume_short_today"),
                   v("volume_short_his"))

    def apply(self, direction: Direction, offset: Offset, volume: int) -> None:
        """A fill, as the QIFI account applies it (SHFE/INE ``CLOSE`` = yesterday's; else oldest first)."""
        if offset is Offset.OPEN:
            if direction is Direction.BUY:
                self.long_today += volume
            else:
                self.short_today += volume
            return
        side = "long" if direction is Direction.SELL else "short"
        if self.exchange in STOCK_EXCHANGES_S:
            order = [f"{side}_his", f"{side}_today"]
        elif offset is Offset.CLOSETODAY:
            order = [f"{side}_today"]
        elif offset is Offset.CLOSEYESTERDAY or self.exchange in SPLIT_TODAY_S:
            order = [f"{side}_his"]
        else:
            order = [f"{side}_his", f"{side}_today"]
        need = volume
        for name in order:
            take = min(need, getattr(self, name))
            setattr(self, name, getattr(self, name) - take)
            need -= take


SPLIT_TODAY_S = frozenset(e.value for e in SPLIT_TODAY_EXCHANGES)
STOCK_EXCHANGES_S = frozenset(e.value for e in STOCK_EXCHANGES)


class Book:
    """The positions of one account (``key`` ``"EXCHANGE.symbol"`` -> :class:`Position`)."""

    def __init__(self, account: str) -> None:
        self.account = account
        self.positions: dict[str, Position] = {}
        self.unconfirmed: OrderedDict[str, Trade] = OrderedDict()  # applied, not yet in a snapshot
        self.applied: set[str] = set()

    def get(self, exchange: str, symbol: str) -> Position:
        key = position_key(exchange, symbol)
        p = self.positions.get(key)
        if p is None:
            p = self.positions[key] = Position(exchange, symbol)
        return p

    def load(self, positions: Mapping[str, Mapping[str, Any]]) -> None:
        self.positions = {k: Position.from_qifi(k, d) for k, d in (positions or {}).items()}

    def on_trade(self, t: Trade) -> bool:
        if t.trade_id in self.applied:
            return False
        self.applied.add(t.trade_id)
        self.get(t.exchange.value, t.symbol).apply(t.direction, t.offset, t.volume)
        self.unconfirmed[t.trade_id] = t
        return True

    def on_snapshot(self, positions: Mapping[str, Mapping[str, Any]], trade_ids: Iterable[str]) -> None:
        """The account daemon's view; trades we applied that it has not seen yet are applied again on top."""
        self.load(positions)
        for tid in trade_ids:
            self.unconfirmed.pop(tid, None)
            self.applied.add(tid)
        for t in self.unconfirmed.values():
            self.get(t.exchange.value, t.symbol).apply(t.direction, t.offset, t.volume)


# ------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """Where orders go. ``accounts``: one order per account; ``group``: one order keyed by the group
    (the router fans it out to ``members``, whose reports the strategy follows)."""

    accounts: tuple[str, ...] = ()
    group: str | None = None
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.accounts) == bool(self.group):
            raise ValueError("bind a strategy to accounts or to a group (exactly one of them)")

    @property
    def books(self) -> tuple[str, ...]:
        """Routing keys orders are sent with (an account each, or the group)."""
        return self.accounts if self.accounts else (self.group,)  # type: ignore[return-value]

    @property
    def report_accounts(self) -> tuple[str, ...]:
        """Accounts whose reports and positions the strategy follows."""
        return self.accounts if self.accounts else self.members


@dataclass
class _Working:
    order: Order
    book: str
    traded: int = 0          # from trades applied to positions
    reported: int = 0        # cumulative traded in the last status report
    terminal: bool = False
    cancel_sent: bool = False

    @property
    def settled(self) -> bool:
        return self.terminal and self.traded >= self.reported


# ------------------------------------------------------------------------------------------ helpers
def parse_instrument(text: str) -> tuple[str, str]:
    """``"SHFE.rb2605" -> ("SHFE", "rb2605")``."""
    ex, _, sym = text.partition(".")
    ex = ex.upper()
    if ex not in EXCHANGES or not sym:
        raise ValueError(f"instrument {text!r}: expected EXCHANGE.symbol, e.g. SHFE.rb2605 "
                         f"(exchanges: {', '.join(EXCHANGES)})")
    return ex, sym


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """``["fast=5", "slow=20"] -> {"fast": 5, "slow": 20}`` (ints, floats, booleans, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--param {item!r}: expected name=value")
        out[key] = _value(val)
    return out


def load_strategy_class(spec: str) -> type[Strategy]:
    """``"qamarket.strategies.ma_cross:MaCross"`` -> the class."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"strategy {spec!r}: expected module:Class, e.g. qamarket.strategies.ma_cross:MaCross")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise ValueError(f"{spec} is not a qamarket.strategy.Strategy subclass")
    return obj


def order_id_for(strategy_id: str, label: str, book: str, n: int) -> str:
    """The deterministic order id (hashed when longer than 128 characters)."""
    oid = f"{strategy_id}-{label}-{book}-{n}"
    if len(oid) <= MAX_ORDER_ID and not any(c.isspace() for c in oid):
        return oid
    return f"{strategy_id[:40]}-h{hashlib.sha256(oid.encode()).hexdigest()[:40]}".replace(" ", "_")


def _parent_of(order_id: str) -> str:
    """A group child's id (``<parent>/g/<account>``) -> the parent's."""
    parent, sep, _ = order_id.partition("/g/")
    return parent if sep else order_id


# ------------------------------------------------------------------------------------------ the base class
class Strategy:
    """Subclass it and override the callbacks you need.

    Class attributes: ``parameters`` (defaults, set as attributes; ``--param`` overrides),
    ``wants_ticks`` / ``wants_realtime`` (subscribe to ticks / realtime bars),
    ``history_bars`` (bars asked for at start), ``indicators`` (asked from the barhandler;
    values of the last bar in :attr:`indicators_last`).
    """

    parameters: ClassVar[dict[str, Any]] = {}
    wants_ticks: ClassVar[bool] = False
    wants_realtime: ClassVar[bool] = False
    history_bars: ClassVar[int] = 500
    indicators: ClassVar[Sequence[str]] = ()

    def __init__(self, strategy_id: str | None = None, *, instruments: Sequence[str | tuple[str, str]] = ("SHFE.rb2605",),
                 freqs: Sequence[str] = ("1min",), params: Mapping[str, Any] | None = None) -> None:
        self.strategy_id = strategy_id or type(self).__name__.lower()
        self.instruments: list[tuple[str, str]] = [parse_instrument(i) if isinstance(i, str) else (i[0], i[1])
                                                   for i in instruments]
        if not self.instruments:
            raise ValueError("a strategy needs at least one instrument")
        self.freqs = list(freqs) or ["1min"]
        values = dict(type(self).parameters)
        unknown = set(params or {}) - set(values)
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} for {type(self).__name__} "
                             f"(known: {', '.join(sorted(values)) or 'none'})")
        for k, v in (params or {}).items():
            default = values[k]
            if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            elif default is not None and not isinstance(v, type(default)):
                raise ValueError(f"parameter {k}={v!r}: expected {type(default).__name__}")
            values[k] = v
        self.params = values
        for k, v in values.items():
            setattr(self, k, v)
        self.engine: StrategyEngine | None = None
        self.trading = False           # False during on_init: helpers refuse to send
        self.inited = False
        self.history: dict[tuple[str, str, str], list[Bar]] = {}
        self.indicators_last: dict[str, float | None] = {}

    # -- callbacks ----------------------------------------------------------------------------
    def on_init(self, history: list[Bar]) -> None:
        """Closed bars of the main series (first instrument, first frequency), oldest first.
        All series are in :attr:`history`. Orders cannot be sent here."""

    def on_start(self) -> None:
        """After ``on_init``, before the first live event; orders may be sent."""

    def on_bar(self, bar: Bar) -> None:
        """A new closed bar (``bar.symbol`` / ``bar.freq`` tell the series)."""

    def on_realtime_bar(self, bar: Bar) -> None:
        """The bar in progress (``final=False``), only with ``wants_realtime = True``."""

    def on_tick(self, tick: Tick) -> None:
        """A tick, only with ``wants_ticks = True``."""

    def on_order(self, report: OrderStatusReport) -> None:
        """Status of one of this strategy's orders (group orders: one report per member)."""

    def on_trade(self, trade: Trade) -> None:
        """A fill of one of this strategy's orders; :attr:`pos` already includes it."""

    def on_account(self, snapshot: AccountSnapshot) -> None:
        """An account snapshot of a bound account; positions are already updated from it."""

    def on_stop(self) -> None:
        """The process is stopping."""

    # -- state --------------------------------------------------------------------------------
    def _eng(self) -> StrategyEngine:
        if self.engine is None:
            raise RuntimeError("the strategy is not attached to an engine")
        return self.engine

    @property
    def symbol(self) -> str:
        return self.instruments[0][1]

    @property
    def exchange(self) -> str:
        return self.instruments[0][0]

    @property
    def pos(self) -> int:
        """Net position of the main instrument in the first bound account/group (vn.py's ``pos``)."""
        return self.get_pos()

    @property
    def positions(self) -> dict[str, dict[str, Position]]:
        """account -> ``"EXCHANGE.symbol"`` -> :class:`Position`, for every followed account."""
        return {a: dict(b.positions) for a, b in self._eng().books.items()}

    def get_pos(self, account: str | None = None, symbol: str | None = None) -> int:
        """Net position (long - short) of ``symbol`` (default: the main instrument) in ``account``
        (default: the first bound account; for a group, its first member)."""
        return self._eng().position(account, symbol).net

    def get_position(self, account: str | None = None, symbol: str | None = None) -> Position:
        return self._eng().position(account, symbol)

    def write_log(self, msg: str, *args: Any) -> None:
        log.info("[%s] " + msg, self.strategy_id, *args)

    # -- orders -------------------------------------------------------------------------------
    def send_order(self, direction: Direction | str, offset: Offset | str | None, price: float | None, volume: int, *,
                   symbol: str | None = None, price_type: PriceType | str = PriceType.LIMIT,
                   account: str | None = None) -> list[str]:
        """One order per bound account (or one to the group). ``offset=None`` closes automatically
        (split in close-yesterday / close-today where the exchange needs it). Returns order ids."""
        return self._eng().send(Direction(direction), None if offset is None else Offset(offset), price, volume,
                                symbol=symbol, price_type=PriceType(price_type), account=account)

    def buy(self, price: float | None, volume: int, **kw: Any) -> list[str]:
        """Open long."""
        return self.send_order(Direction.BUY, Offset.OPEN, price, volume, **kw)

    def sell(self, price: float | None, volume: int, **kw: Any) -> list[str]:
        """Close long (today/yesterday split as needed)."""
        return self.send_order(Direction.SELL, kw.pop("offset", None), price, volume, **kw)

    def short(self, price: float | None, volume: int, **kw: Any) -> list[str]:
        """Open short."""
        return self.send_order(Direction.SELL, Offset.OPEN, price, volume, **kw)

    def cover(self, price: float | None, volume: int, **kw: Any) -> list[str]:
        """Close short (today/yesterday split as needed)."""
        return self.send_order(Direction.BUY, kw.pop("offset", None), price, volume, **kw)

    def set_target_pos(self, target: int, price: float, *, symbol: str | None = None) -> list[str]:
        """Reach net position ``target`` in every bound account (or the group): working orders of
        the instrument that disagree are cancelled first, then (once they are final) the
        difference is sent, closing before opening. Returns the ids sent now."""
        return self._eng().set_target(int(target), price, symbol=symbol)

    def cancel(self, order_id: str) -> bool:
        """Cancel one of this strategy's working orders; False if unknown or already final."""
        return self._eng().cancel(order_id)

    def cancel_all(self) -> int:
        return self._eng().cancel_all()

    @property
    def working_orders(self) -> list[Order]:
        return [w.order for w in self._eng().working.values() if not w.terminal]


# ------------------------------------------------------------------------------------------ the engine
class StrategyEngine:
    """Feeds one strategy; pure. ``outbox`` collects ``(routing_key, Order | Cancel)`` to publish
    on ``qaorder``; the runtime pops them once confirmed (:meth:`pop_outbox`)."""

    def __init__(self, strategy: Strategy, target: Target, *, halt_on_error: bool = False,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.strategy = strategy
        self.target = target
        self.halt_on_error = halt_on_error
        self.clock = clock
        strategy.engine = self
        self.books: dict[str, Book] = {a: Book(a) for a in target.report_accounts}
        self.outbox: list[tuple[str, Order | Cancel]] = []
        self.working: dict[str, _Working] = {}
        self.sent_ids: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._last_closed: dict[tuple[str, str, str], int] = {}
        self._label = "init"
        self._seq: Counter[tuple[str, str]] = Counter()
        self._targets: dict[tuple[str, str], tuple[int, float, str]] = {}  # (book, key) -> (target, price, label)

    # -- positions ----------------------------------------------------------------------------
    def load_account(self, account: str, doc: Mapping[str, Any] | None) -> None:
        """A QIFI document from ``accounts`` (at start or after a reconnect)."""
        if account not in self.books or not doc:
            return
        self.books[account].load(doc.get("positions") or {})
        self.counts["accounts_loaded"] += 1

    def _book_account(self, account: str | None) -> str:
        if account is None:
            accs = self.target.report_accounts
            if not accs:
                raise LookupError(f"group {self.target.group!r} has no members")
            return accs[0]
        if account == self.target.group:
            return self._book_account(None)
        if account not in self.books:
            raise LookupError(f"account {account!r} is not bound to strategy {self.strategy.strategy_id!r}")
        return account

    def _instrument(self, symbol: str | None) -> tuple[str, str]:
        if symbol is None:
            return self.strategy.instruments[0]
        if "." in symbol:
            return parse_instrument(symbol)
        for ex, sym in self.strategy.instruments:
            if sym == symbol:
                return ex, sym
        raise LookupError(f"symbol {symbol!r} is not one of the strategy's instruments")

    def position(self, account: str | None = None, symbol: str | None = None) -> Position:
        acc = self._book_account(account)
        ex, sym = self._instrument(symbol)
        return self.books[acc].get(ex, sym)

    # -- calling the strategy -----------------------------------------------------------------
    def _call(self, name: str, fn: Callable[..., Any], arg: Any, what: str) -> None:
        self.counts[f"events.{name}"] += 1
        try:
            fn(arg) if arg is not _NOARG else fn()
        except StrategyHalted:
            raise
        except Exception as exc:  # noqa: BLE001 - counted and logged; the strategy keeps running
            self.counts["callback_errors"] += 1
            self.counts[f"callback_errors.{name}"] += 1
            text = f"{name}({what}) raised {type(exc).__name__}: {exc}"
            self.errors.append(text)
            del self.errors[:-100]
            log.exception("strategy %s: %s", self.strategy.strategy_id, text,
                          extra={"strategy_id": self.strategy.strategy_id, "event": what})
            if self.halt_on_error:
                raise StrategyHalted(text) from exc

    def init(self, history: Mapping[tuple[str, str, str], Sequence[Bar]]) -> None:
        """History per ``(exchange, symbol, freq)``: closed bars only reach ``on_init``; later bars at or
        before the last one are skipped when they come live."""
        s = self.strategy
        for key, bars in history.items():
            closed = [b for b in bars if b.final]
            s.history[key] = closed
            if closed:
                self._last_closed[key] = closed[-1].datetime
        main = (s.instruments[0][0], s.instruments[0][1], s.freqs[0])
        self._label = "init"
        self._call("on_init", s.on_init, s.history.get(main, []), f"{len(s.history.get(main, []))} bars")
        s.inited = True
        s.trading = True
        self._label = "start"
        self._call("on_start", s.on_start, _NOARG, "")

    def stop(self) -> None:
        self._label = "stop"
        self._call("on_stop", self.strategy.on_stop, _NOARG, "")

    def _seen_before(self, message_id: str | None) -> bool:
        if not message_id:
            return False
        if message_id in self._seen:
            return True
        self._seen[message_id] = None
        if len(self._seen) > _SEEN_IDS:
            self._seen.popitem(last=False)
        return False

    def on_bar(self, bar: Bar, message_id: str | None = None, indicators: Mapping[str, float | None] | None = None) -> bool:
        """A live bar (closed or realtime). True if the strategy was called."""
        key = (bar.exchange, bar.symbol, bar.freq)
        last = self._last_closed.get(key)
        s = self.strategy
        if not bar.final:
            if not s.wants_realtime or (last is not None and bar.datetime <= last):
                self.counts["rtbars_skipped"] += 1
                return False
            self._label = f"{bar.symbol}-{bar.freq}-{bar.datetime}-rt"
            self._call("on_realtime_bar", s.on_realtime_bar, bar, _describe(bar))
            return True
        if self._seen_before(message_id) or (last is not None and bar.datetime <= last):
            self.counts["bars_duplicate"] += 1
            return False
        self._last_closed[key] = bar.datetime
        self.counts["bars"] += 1
        if indicators is not None:
            s.indicators_last = dict(indicators)
        self._label = f"{bar.symbol}-{bar.freq}-{bar.datetime}"
        self._call("on_bar", s.on_bar, bar, _describe(bar))
        self._rebalance_all()
        return True

    def on_tick(self, tick: Tick) -> bool:
        if not self.strategy.wants_ticks:
            return False
        self._label = f"{tick.symbol}-tick-{tick.datetime}"
        self._call("on_tick", self.strategy.on_tick, tick, f"{tick.exchange}.{tick.symbol} {tick.datetime}")
        return True

    # -- reports ------------------------------------------------------------------------------
    def _ours(self, order_id: str) -> _Working | None:
        return self.working.get(order_id) or self.working.get(_parent_of(order_id))

    def on_report(self, msg: OrderStatusReport | Trade | Reject | AccountSnapshot) -> None:
        if isinstance(msg, AccountSnapshot):
            return self.on_snapshot(msg)
        if isinstance(msg, Trade):
            return self.on_trade(msg)
        if isinstance(msg, Reject):
            if not msg.order_id:
                return None
            w = self._ours(msg.order_id)
            if w is None:
                return None
            acc = msg.account if msg.account in self.books else w.order.account
            msg = OrderStatusReport(order_id=msg.order_id, account=acc, status=OrderStatus.REJECTED,
                                    reason=f"{msg.field}: {msg.reason}", symbol=w.order.symbol,
                                    exchange=w.order.exchange)
        return self.on_status(msg)

    def on_status(self, r: OrderStatusReport) -> None:
        w = self._ours(r.order_id)
        if w is None:
            self.counts["reports_other"] += 1
            return
        self.counts["reports"] += 1
        if r.order_id == w.order.order_id:  # direct order (group children: per member, see _group_done)
            w.reported = max(w.reported, r.traded)
            if r.status.is_terminal:
                w.terminal = True
        else:
            self._group_child(w, r)
        self._label = f"r-{r.id}"
        self._call("on_order", self.strategy.on_order, r, f"{r.order_id} {r.status.value}")
        self._after_report(w)

    def _group_child(self, w: _Working, r: OrderStatusReport) -> None:
        # a group order is settled when every member's child is; track it on the first member only
        # (the positions the target logic reads), the others just update their books via trades.
        lead = self.target.report_accounts[0] if self.target.report_accounts else None
        if r.account == lead:
            w.reported = max(w.reported, r.traded)
            if r.status.is_terminal:
                w.terminal = True

    def on_trade(self, t: Trade) -> None:
        book = self.books.get(t.account)
        if book is None or not book.on_trade(t):
            self.counts["trades_duplicate" if book is not None else "trades_other"] += 1
            return
        self.counts["trades"] += 1
        w = self._ours(t.order_id)
        if w is None:
            self.counts["trades_not_ours"] += 1
            return
        lead = self.target.report_accounts[0] if self.target.group else t.account
        if t.account == lead:
            w.traded += t.volume
        self._label = f"t-{t.trade_id}"
        self._call("on_trade", self.strategy.on_trade, t, f"{t.trade_id} {t.direction.value} {t.offset.value} "
                                                         f"{t.volume} {t.symbol} @ {t.price:g}")
        self._after_report(w)

    def on_snapshot(self, snap: AccountSnapshot) -> None:
        book = self.books.get(snap.account_cookie)
        if book is None:
            return
        book.on_snapshot(snap.positions, (snap.trades or {}).keys())
        self.counts["snapshots"] += 1
        self._label = f"a-{snap.id}"
        self._call("on_account", self.strategy.on_account, snap, snap.account_cookie)
        self._rebalance_all()

    def _after_report(self, w: _Working) -> None:
        if w.settled and self.working.pop(w.order.order_id, None) is not None:
            log.info("order %s done: %d of %d traded", w.order.order_id, w.traded, w.order.volume,
                     extra={"strategy_id": self.strategy.strategy_id})
        self._rebalance_all()

    # -- sending ------------------------------------------------------------------------------
    def _require_trading(self) -> None:
        if not self.strategy.trading:
            raise RuntimeError("orders cannot be sent during on_init (history is replayed, not traded)")

    def _next_id(self, book: str, label: str | None = None) -> str:
        label = label or self._label
        self._seq[(label, book)] += 1
        return order_id_for(self.strategy.strategy_id, label, book, self._seq[(label, book)])

    def _emit_order(self, book: str, ex: str, sym: str, direction: Direction, offset: Offset, price: float | None,
                    volume: int, price_type: PriceType, label: str | None = None) -> str | None:
        oid = self._next_id(book, label)
        if oid in self.sent_ids:
            self.counts["orders_duplicate"] += 1
            return None
        order = Order(order_id=oid, id=oid, account=book, symbol=sym, exchange=Exchange(ex), direction=direction,
                      offset=offset, price_type=price_type, price=price, volume=int(volume),
                      strategy_id=self.strategy.strategy_id, order_time=self.clock(), source="strategy")
        self.sent_ids.add(oid)
        self.working[oid] = _Working(order, book)
        self.outbox.append((book, order))
        self.counts["orders"] += 1
        log.info("order %s: %s %s %s %d %s.%s @ %s", oid, book, direction.value, offset.value, volume, ex, sym,
                 price, extra={"strategy_id": self.strategy.strategy_id, "order_id": oid, "account": book})
        return oid

    def _close_legs(self, book: str, ex: str, sym: str, direction: Direction, volume: int) -> list[tuple[Offset, int]]:
        """Offsets to close ``volume`` (SELL closes longs), from the book's position."""
        acc = self._book_account(book)
        p = self.books[acc].get(ex, sym)
        side = "long" if direction is Direction.SELL else "short"
        his = getattr(p, f"{side}_his")
        if ex in SPLIT_TODAY_S:
            legs = []
            a = min(volume, his)
            if a:
                legs.append((Offset.CLOSE, a))
            b = volume - a
            if b:
                legs.append((Offset.CLOSETODAY, b))
            return legs
        return [(Offset.CLOSE, volume)]

    def send(self, direction: Direction, offset: Offset | None, price: float | None, volume: int, *,
             symbol: str | None = None, price_type: PriceType = PriceType.LIMIT, account: str | None = None,
             label: str | None = None) -> list[str]:
        self._require_trading()
        if isinstance(volume, bool) or int(volume) != volume or volume <= 0:
            raise ValueError(f"volume must be a positive integer, got {volume!r}")
        if price is not None and (not math.isfinite(price) or price <= 0):
            raise ValueError(f"price must be a finite number > 0, got {price!r}")
        ex, sym = self._instrument(symbol)
        books = self.target.books if account is None else (account,)
        for b in books:
            if b not in self.target.books:
                raise LookupError(f"{b!r} is not bound to strategy {self.strategy.strategy_id!r}")
        ids = []
        for b in books:
            legs = [(offset, int(volume))] if offset is not None else self._close_legs(b, ex, sym, direction, int(volume))
            for off, v in legs:
                oid = self._emit_order(b, ex, sym, direction, off, price, v, price_type, label)
                if oid:
                    ids.append(oid)
        return ids

    def cancel(self, order_id: str) -> bool:
        w = self.working.get(order_id)
        if w is None or w.terminal or w.cancel_sent:
            return False
        w.cancel_sent = True
        self.outbox.append((w.book, Cancel(order_id=order_id, account=w.book, id=f"{order_id}/cancel",
                                           reason=f"strategy {self.strategy.strategy_id}")))
        self.counts["cancels"] += 1
        log.info("cancel %s (%s)", order_id, w.book, extra={"strategy_id": self.strategy.strategy_id,
                                                            "order_id": order_id, "account": w.book})
        return True

    def cancel_all(self) -> int:
        return sum(self.cancel(oid) for oid in list(self.working))

    # -- target position ----------------------------------------------------------------------
    def set_target(self, target: int, price: float, *, symbol: str | None = None) -> list[str]:
        self._require_trading()
        ex, sym = self._instrument(symbol)
        if target < 0 and ex in STOCK_EXCHANGES_S:
            raise ValueError(f"{ex}.{sym}: no short positions on a stock exchange")
        key = position_key(ex, sym)
        for b in self.target.books:
            self._targets[(b, key)] = (target, price, self._label)
        out: list[str] = []
        for b in self.target.books:
            out += self._rebalance(b, key)
        return out

    def _rebalance_all(self) -> None:
        if not self.strategy.trading:
            return
        for (b, key) in list(self._targets):
            self._rebalance(b, key)

    def _rebalance(self, book: str, key: str) -> list[str]:
        got = self._targets.get((book, key))
        if got is None:
            return []
        target, price, label = got
        ex, _, sym = key.partition(".")
        mine = [w for w in self.working.values() if w.book == book and w.order.key == key]
        pos = self.books[self._book_account(book)].get(ex, sym)
        if any(not w.terminal for w in mine):
            pending = sum(w.order.direction.sign * (w.order.volume - w.traded) for w in mine if not w.terminal)
            if pos.net + pending != target:
                for w in mine:  # a new target: take the old instruction back first
                    if not w.terminal:
                        self.cancel(w.order.order_id)
            return []
        if mine:  # final, but fills not all in yet: wait for the trades
            return []
        delta = target - pos.net
        if delta == 0:
            self._targets.pop((book, key), None)
            return []
        ids: list[str] = []
        if delta > 0:
            close = min(delta, pos.short)
            if close:
                ids += self.send(Direction.BUY, None, price, close, symbol=key, account=book, label=label)
            if delta - close:
                ids += self.send(Direction.BUY, Offset.OPEN, price, delta - close, symbol=key, account=book,
                                 label=label)
        else:
            close = min(-delta, pos.long)
            if close:
                ids += self.send(Direction.SELL, None, price, close, symbol=key, account=book, label=label)
            if -delta - close:
                ids += self.send(Direction.SELL, Offset.OPEN, price, -delta - close, symbol=key, account=book,
                                 label=label)
        return ids

    # -- the runtime's side -------------------------------------------------------------------
    def pop_outbox(self) -> list[tuple[str, Order | Cancel]]:
        out, self.outbox = self.outbox, []
        return out

    def stats(self) -> dict[str, int]:
        return dict(self.counts)


class _NoArg:
    pass


_NOARG: Any = _NoArg()


def _describe(bar: Bar) -> str:
    return f"{bar.freq}.{bar.exchange}.{bar.symbol} {bar.dt:%Y-%m-%d %H:%M} C {bar.close:g}"
