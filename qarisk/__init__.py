"""qarisk: pre-trade risk rules (pure), per-account configuration.

See :mod:`qarisk.rules` for the rules and their exact semantics, :mod:`qarisk.config`
for the configuration.
"""
from .config import (
    ExposureRuleConfig, FlowRuleConfig, FundsRuleConfig, PositionRuleConfig, PriceRuleConfig, RiskConfig,
    RiskConfigError, SessionRuleConfig, StateRuleConfig, VolumeRuleConfig, load_configs,
)
from .rules import (
    ACCEPT, RULE_ORDER, AccountSnapshot, AccountView, Decision, MarketSnapshot, MarketView, Rejection, RiskEngine,
    RiskState, is_tick_multiple,
)

__all__ = [
    "ACCEPT", "RULE_ORDER", "AccountSnapshot", "AccountView", "Decision", "MarketSnapshot", "MarketView",
    "Rejection", "RiskEngine", "RiskState", "is_tick_multiple", "RiskConfig", "RiskConfigError",
    "StateRuleConfig", "SessionRuleConfig", "VolumeRuleConfig", "PriceRuleConfig", "PositionRuleConfig",
    "FundsRuleConfig", "ExposureRuleConfig", "FlowRuleConfig", "load_configs",
]
