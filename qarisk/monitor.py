"""Live risk monitor: pure breach logic over account snapshots and ticks (no I/O).

The ``qaflow risk`` daemon (:mod:`handlers.risk`) feeds :func:`evaluate` with
:class:`AccountFigures` built from each QIFI ``AccountSnapshot`` (``qa.report``
``<account>.account``) and re-marked by ticks between snapshots (:meth:`AccountFigures.remark`).

Rules (each off when its limit is ``None``; a value *at* a limit passes, strictly over fails):

``risk_ratio``       ``margin / equity`` (equity = QIFI ``accounts.balance``) ``> max_risk_ratio``;
                     an equity ``<= 0`` with margin held is a breach.
``daily_loss``       ``static_balance - equity > max_daily_loss`` (static balance = QIFI
                     ``pre_balance + deposit - withdraw``: the day's starting equity).
``drawdown``         ``high_water - equity > max_drawdown`` where ``high_water`` is the
                     highest equity seen this trading day (starts at the static balance).
``instrument_loss``  for each instrument, ``-position_profit > max_instrument_loss``
                     (mark-to-market loss of the position held, per ``EXCHANGE.symbol``).

Each (rule, instrument) breaches at most once per trading day (:class:`MonitorState`
remembers what fired; a new trading day resets it and the high-water mark). A breach is
always a *warning* (a risk event); it is also a *force-close* when the rule is listed in
``force_close_on``: the whole account, or only the instrument for ``instrument_loss``.
The force-close ``command_id`` is deterministic (:func:`command_id`): a monitor restarted
on the same day issues the same id, which the router executes once.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from qapubsub.messages import Message

__all__ = ["MONITOR_RULES", "MonitorConfig", "PositionFigures", "AccountFigures", "MonitorState", "Breach",
           "RiskEvent", "evaluate", "command_id"]

MONITOR_RULES = ("risk_ratio", "daily_loss", "drawdown", "instrument_loss")

PosFloat = Annotated[float, msgspec.Meta(gt=0)]
Ratio = Annotated[float, msgspec.Meta(gt=0)]


class MonitorConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Per-account monitor thresholds (the ``monitor`` section of a stored risk config)."""

    enabled: bool = True
    max_risk_ratio: Ratio | None = None          # margin / equity, e.g. 0.8
    max_daily_loss: PosFloat | None = None       # currency, from the day's starting equity
    max_drawdown: PosFloat | None = None         # currency, from the day's high-water mark
    max_instrument_loss: PosFloat | None = None  # currency, per instrument position loss
    force_close_on: tuple[str, ...] = ()         # rules whose breach also force-closes

    def __post_init__(self) -> None:
        for n in ("max_risk_ratio", "max_daily_loss", "max_drawdown", "max_instrument_loss"):
            v = getattr(self, n)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{n} must be finite, got {v!r}")
        bad = [r for r in self.force_close_on if r not in MONITOR_RULES]
        if bad:
            raise ValueError(f"force_close_on: unknown rule {bad[0]!r} (known: {', '.join(MONITOR_RULES)})")


@dataclass(slots=True)
class PositionFigures:
    """One instrument of a snapshot: volumes, costs (``position_cost_*``) and the mark."""

    volume_long: int = 0
    volume_short: int = 0
    cost_long: float = 0.0       # position cost (price * volume * multiplier) of the long side
    cost_short: float = 0.0
    last_price: float = 0.0
    position_profit: float = 0.0

    def profit_at(self, price: float, multiplier: float) -> float:
        return (price * self.volume_long * multiplier - self.cost_long) + \
            (self.cost_short - price * self.volume_short * multiplier)


@dataclass(slots=True)
class AccountFigures:
    account: str
    trading_day: str
    equity: float                 # QIFI balance (marked to market)
    static_balance: float         # the day's starting equity
    margin: float
    positions: dict[str, PositionFigures] = field(default_factory=dict)

    @classmethod
    def from_qifi(cls, doc: Mapping[str, Any]) -> AccountFigures:
        a = doc.get("accounts") or {}
        static = a.get("static_balance")
        if static is None:
            static = float(a.get("pre_balance", 0.0)) + float(a.get("deposit", 0.0)) - float(a.get("withdraw", 0.0))
        pos = {}
        for key, p in (doc.get("positions") or {}).items():
            vl, vs = int(p.get("volume_long", 0) or 0), int(p.get("volume_short", 0) or 0)
            if not vl and not vs:
                continue
            pos[key] = PositionFigures(vl, vs, float(p.get("position_cost_long", 0.0) or 0.0),
                                       float(p.get("position_cost_short", 0.0) or 0.0),
                                       float(p.get("last_price", 0.0) or 0.0), float(p.get("position_profit", 0.0) or 0.0))
        return cls(account=str(doc.get("account_cookie") or doc.get("_id")), trading_day=str(doc.get("trading_day") or ""),
                   equity=float(a.get("balance", 0.0)), static_balance=float(static), margin=float(a.get("margin", 0.0)),
                   positions=pos)

    def remark(self, key: str, price: float, multiplier: float) -> bool:
        """Mark one instrument at ``price`` (a tick); equity moves by the profit change. True if held."""
        p = self.positions.get(key)
        if p is None or not (price > 0 and math.isfinite(price)):
            return False
        new = p.profit_at(price, multiplier)
        self.equity += new - p.position_profit
        p.position_profit = new
        p.last_price = price
        return True


@dataclass(slots=True)
class MonitorState:
    """What the monitor remembers of one account (persisted by the daemon)."""

    trading_day: str = ""
    high_water: float | None = None
    fired: set[str] = field(default_factory=set)      # "rule" or "rule:EXCHANGE.symbol"

    def to_doc(self) -> dict[str, Any]:
        return {"trading_day": self.trading_day, "high_water": self.high_water, "fired": sorted(self.fired)}

    @classmethod
    def from_doc(cls, d: Mapping[str, Any] | None) -> MonitorState:
        if not d:
            return cls()
        hw = d.get("high_water")
        return cls(str(d.get("trading_day") or ""), float(hw) if hw is not None else None, set(d.get("fired") or ()))


class Breach(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    trading_day: str
    rule: str
    reason: str
    value: float
    limit: float
    symbol: str | None = None          # "EXCHANGE.symbol" for instrument_loss
    force_close: bool = False

    @property
    def command_id(self) -> str:
        return command_id(self.account, self.trading_day, self.rule, self.symbol)


class RiskEvent(Message, tag="qa.risk_event"):
    """Published to ``qa.report`` ``<account>.risk`` for every breach (and audited)."""

    account: str
    trading_day: str
    rule: str
    reason: str
    value: float
    limit: float
    symbol: str | None = None
    action: str = "warn"               # "warn" | "force_close"
    command_id: str | None = None      # of the force-close issued, if any

    @classmethod
    def of(cls, b: Breach) -> RiskEvent:
        return cls(id=f"risk-{b.command_id}", account=b.account, trading_day=b.trading_day, rule=b.rule,
                   reason=b.reason, value=b.value, limit=b.limit, symbol=b.symbol,
                   action="force_close" if b.force_close else "warn",
                   command_id=b.command_id if b.force_close else None)


def command_id(account: str, trading_day: str, rule: str, symbol: str | None = None) -> str:
    """Deterministic force-close id: the same account, day, rule (and instrument) give the same id."""
    base = f"auto-{account}-{trading_day or 'noday'}-{rule}"
    if symbol:
        base += "-" + symbol.replace(".", "_")
    if len(base) > 120:
        base = base[:100] + "-" + hashlib.sha1(base.encode()).hexdigest()[:12]  # noqa: S324
    return "".join(c if not c.isspace() else "_" for c in base)


def _f(x: float) -> str:
    return f"{x:,.2f}"


def evaluate(cfg: MonitorConfig, fig: AccountFigures, state: MonitorState) -> list[Breach]:
    """Update ``state`` (day roll, high-water mark, what fired) and return the new breaches."""
    if fig.trading_day != state.trading_day:
        state.trading_day = fig.trading_day
        state.high_water = None
        state.fired = set()
    hw = max(state.high_water if state.high_water is not None else fig.static_balance, fig.static_balance, fig.equity)
    state.high_water = hw
    if not cfg.enabled:
        return []
    out: list[Breach] = []
    fc = set(cfg.force_close_on)

    def fire(rule: str, reason: str, value: float, limit: float, symbol: str | None = None) -> None:
        tag = f"{rule}:{symbol}" if symbol else rule
        if tag in state.fired:
            return
        state.fired.add(tag)
        out.append(Breach(account=fig.account, trading_day=fig.trading_day, rule=rule, reason=reason, value=value,
                          limit=limit, symbol=symbol, force_close=rule in fc))

    eq = fig.equity
    if cfg.max_risk_ratio is not None and fig.margin > 0:
        ratio = fig.margin / eq if eq > 0 else math.inf
        if ratio > cfg.max_risk_ratio + 1e-12:
            fire("risk_ratio", f"risk ratio margin/equity {_f(fig.margin)}/{_f(eq)} = "
                               f"{ratio:.2%} above {cfg.max_risk_ratio:.2%}", ratio, cfg.max_risk_ratio)
    if cfg.max_daily_loss is not None:
        loss = fig.static_balance - eq
        if loss > cfg.max_daily_loss + 1e-9:
            fire("daily_loss", f"loss today {_f(loss)} (equity {_f(eq)} from {_f(fig.static_balance)}) above the "
                               f"daily limit {_f(cfg.max_daily_loss)}", loss, cfg.max_daily_loss)
    if cfg.max_drawdown is not None:
        dd = hw - eq
        if dd > cfg.max_drawdown + 1e-9:
            fire("drawdown", f"drawdown {_f(dd)} from today's high-water mark {_f(hw)} above {_f(cfg.max_drawdown)}",
                 dd, cfg.max_drawdown)
    if cfg.max_instrument_loss is not None:
        for key in sorted(fig.positions):
            loss = -fig.positions[key].position_profit
            if loss > cfg.max_instrument_loss + 1e-9:
                fire("instrument_loss", f"{key} position loss {_f(loss)} above {_f(cfg.max_instrument_loss)}",
                     loss, cfg.max_instrument_loss, key)
    return out
