"""Per-account pre-trade risk configuration: one section per rule, each with ``enabled``.

Loaded strictly from a dict or JSON (:meth:`RiskConfig.from_dict`, :meth:`RiskConfig.from_json`):
an unknown key anywhere is an error whose message names the key and where it is
(``unknown field `max_volumee` - at `$.volume```), a wrong type or an out-of-range value
likewise. A limit set to ``None`` (or omitted) is not checked; ``enabled: false`` turns the
whole rule off.

Times are seconds in the config (``window_s``) and exchange-local epoch milliseconds at run
time (the ``now`` the engine is given, the same number :mod:`qamarket.sessions` uses).
"""
from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec

__all__ = [
    "RiskConfigError", "StateRuleConfig", "SessionRuleConfig", "VolumeRuleConfig", "PriceRuleConfig",
    "PositionRuleConfig", "FundsRuleConfig", "ExposureRuleConfig", "FlowRuleConfig", "RiskConfig",
]

PosInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class RiskConfigError(ValueError):
    """A risk configuration that cannot be used; ``str()`` names the key and the reason."""


class _Section(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True

    def _finite(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{n} must be finite, got {v!r}")


class StateRuleConfig(_Section, frozen=True):
    """Halted accounts reject everything; reduce-only accounts (after a force-close) only
    accept closing orders that reduce an existing position."""


class SessionRuleConfig(_Section, frozen=True):
    """No orders outside the instrument's trading sessions (:func:`qamarket.sessions.is_trading`)."""

    allow_auction: bool = True        # call auctions (08:55-09:00, 09:15-09:25 ...) accept orders


class VolumeRuleConfig(_Section, frozen=True):
    check_lot: bool = True            # opens/buys: multiple of lot_size; stock sells: odd lot only for the odd remainder
    max_volume: PosInt | None = None  # per order, > max fails
    max_value: PosFloat | None = None  # price * volume * multiplier per order, > max fails

    def __post_init__(self) -> None:
        self._finite("max_value")


class PriceRuleConfig(_Section, frozen=True):
    check_limits: bool = True         # limit_down <= price <= limit_up (when the quote has them)
    check_tick: bool = True           # price is a multiple of price_tick
    band_pct: PosFloat | None = None  # |price - last_price| <= last_price * band_pct / 100
    require_quote: bool = False       # reject when limits/band are on and there is no quote

    def __post_init__(self) -> None:
        self._finite("band_pct")


class PositionRuleConfig(_Section, frozen=True):
    """Closes need enough closable volume (T+1 for stocks, CLOSETODAY/CLOSEYESTERDAY on SHFE/INE,
    frozen volume of working closes subtracted)."""

    count_own_working: bool = True    # also subtract close orders this engine accepted (account may lag)


class FundsRuleConfig(_Section, frozen=True):
    reserve: NonNegFloat = 0.0        # cash that must stay available after the order

    def __post_init__(self) -> None:
        self._finite("reserve")


class ExposureRuleConfig(_Section, frozen=True):
    """Applies to opening orders only (closes reduce gross exposure and are never blocked here).
    Position = held + working opens accepted by this engine + this order."""

    max_position_lots: PosInt | None = None       # per instrument and side (long or short)
    max_position_value: PosFloat | None = None    # per instrument and side, lots * price * multiplier
    max_account_lots: PosInt | None = None        # all instruments, long + short
    max_account_value: PosFloat | None = None     # all instruments, long value + short value
    max_net_value: PosFloat | None = None         # |long value - short value| after the order

    def __post_init__(self) -> None:
        self._finite("max_position_value", "max_account_value", "max_net_value")


class FlowRuleConfig(_Section, frozen=True):
    max_orders_per_window: PosInt | None = None   # sliding window per account
    window_s: PosFloat = 1.0
    max_active_orders: PosInt | None = None       # working orders per account
    max_daily_orders: PosInt | None = None        # per account per trading day
    max_daily_orders_per_instrument: PosInt | None = None
    max_daily_cancels: PosInt | None = None       # per account; new orders refused once reached
    max_cancels_per_instrument: PosInt | None = None  # per trading day; new orders on it refused once reached
    max_daily_trades: PosInt | None = None        # fills per account per trading day
    max_daily_trades_per_instrument: PosInt | None = None
    max_cancel_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None  # cancels / orders today
    cancel_ratio_min_orders: NonNegInt = 0        # ratio only enforced from this many orders on
    max_cancels_per_window: PosInt | None = None  # check_cancel: sliding window per account
    duplicate_window_s: PosFloat | None = None    # identical orders within this window ...
    max_duplicates: PosInt = 1                    # ... at most this many (the next identical one fails)

    def __post_init__(self) -> None:
        self._finite("window_s", "duplicate_window_s", "max_cancel_ratio")


class RiskConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Risk configuration of one account. ``enabled: false`` turns every rule off."""

    enabled: bool = True
    state: StateRuleConfig = StateRuleConfig()
    session: SessionRuleConfig = SessionRuleConfig()
    volume: VolumeRuleConfig = VolumeRuleConfig()
    price: PriceRuleConfig = PriceRuleConfig()
    position: PositionRuleConfig = PositionRuleConfig()
    funds: FundsRuleConfig = FundsRuleConfig()
    exposure: ExposureRuleConfig = ExposureRuleConfig()
    flow: FlowRuleConfig = FlowRuleConfig()

    @classmethod
    def from_dict(cls, data: Any) -> RiskConfig:
        try:
            return msgspec.convert(data, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise RiskConfigError(f"invalid risk config: {exc}") from None
        except ValueError as exc:
            raise RiskConfigError(f"invalid risk config: {exc}") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> RiskConfig:
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.ValidationError as exc:
            raise RiskConfigError(f"invalid risk config: {exc}") from None
        except msgspec.DecodeError as exc:
            raise RiskConfigError(f"risk config is not valid JSON: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def all_off(cls) -> RiskConfig:
        return cls(enabled=False)


def load_configs(data: Any) -> dict[str, RiskConfig]:
    """``{"account": {...config...}, ...}`` -> configs; errors name the account."""
    if not isinstance(data, dict):
        raise RiskConfigError("risk configs must be an object keyed by account")
    out: dict[str, RiskConfig] = {}
    for account, cfg in data.items():
        try:
            out[str(account)] = RiskConfig.from_dict(cfg)
        except RiskConfigError as exc:
            raise RiskConfigError(f"account {account!r}: {exc}") from None
    return out
