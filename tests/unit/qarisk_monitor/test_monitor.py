"""qarisk.monitor: every rule's breach / no-breach at its boundary, once per day, force-close ids."""
from __future__ import annotations

import pytest

from qarisk.config import RiskConfigError
from qarisk.monitor import AccountFigures, MonitorConfig, MonitorState, PositionFigures, RiskEvent, command_id, evaluate
from qarisk.store import apply_sets, parse_config


def fig(equity: float, *, static: float = 1_000_000.0, margin: float = 0.0, day: str = "20250303",
        positions: dict[str, PositionFigures] | None = None) -> AccountFigures:
    return AccountFigures(account="A", trading_day=day, equity=equity, static_balance=static, margin=margin,
                          positions=positions or {})


@pytest.mark.parametrize(("margin", "equity", "breach"), [
    (80_000.0, 100_000.0, False),      # exactly 80 %: at the limit passes
    (80_001.0, 100_000.0, True),       # just over
    (10.0, 0.0, True),                 # no equity left with margin held
    (0.0, -5.0, False),                # nothing held: no ratio
])
def test_risk_ratio_boundary(margin: float, equity: float, breach: bool) -> None:
    out = evaluate(MonitorConfig(max_risk_ratio=0.8), fig(equity, static=equity, margin=margin), MonitorState())
    assert [b.rule for b in out] == (["risk_ratio"] if breach else [])


@pytest.mark.parametrize(("equity", "breach"), [(995_000.0, False), (994_999.99, True)])
def test_daily_loss_boundary(equity: float, breach: bool) -> None:
    out = evaluate(MonitorConfig(max_daily_loss=5_000), fig(equity), MonitorState())
    assert [b.rule for b in out] == (["daily_loss"] if breach else [])
    if breach:
        assert out[0].value == pytest.approx(5_000.01) and out[0].limit == 5_000


def test_drawdown_from_the_days_high_water_mark() -> None:
    cfg, st = MonitorConfig(max_drawdown=3_000), MonitorState()
    assert evaluate(cfg, fig(1_010_000), st) == [] and st.high_water == 1_010_000
    assert evaluate(cfg, fig(1_007_000), st) == []                 # exactly 3 000 below: passes
    [b] = evaluate(cfg, fig(1_006_999), st)
    assert b.rule == "drawdown" and b.value == pytest.approx(3_001)
    assert st.high_water == 1_010_000                              # the mark stays at the high


def test_high_water_starts_at_the_static_balance_and_resets_on_a_new_day() -> None:
    cfg, st = MonitorConfig(max_drawdown=1_000), MonitorState()
    [b] = evaluate(cfg, fig(998_999), st)                          # below the day's start: a drawdown too
    assert b.rule == "drawdown"
    assert evaluate(cfg, fig(998_999), st) == []                   # fires once per day
    out = evaluate(cfg, fig(998_999, static=998_999, day="20250304"), st)
    assert out == [] and st.trading_day == "20250304" and st.high_water == 998_999 and not st.fired


@pytest.mark.parametrize(("price", "breach"), [(3_850.0, False), (3_849.0, True)])
def test_instrument_loss_boundary_per_instrument(price: float, breach: bool) -> None:
    # long 10 lots rb (multiplier 10) bought at 3 900: cost 390 000; at 3 850 the loss is 5 000
    p = PositionFigures(volume_long=10, cost_long=390_000.0, last_price=3_900.0)
    f = fig(1_000_000, positions={"SHFE.rb2512": p, "DCE.m2509": PositionFigures(volume_short=1, cost_short=30_000)})
    assert f.remark("SHFE.rb2512", price, 10.0)
    cfg = MonitorConfig(max_instrument_loss=5_000, force_close_on=("instrument_loss",))
    out = evaluate(cfg, f, MonitorState())
    assert [(b.rule, b.symbol, b.force_close) for b in out] == ([("instrument_loss", "SHFE.rb2512", True)] if breach
                                                                else [])
    assert f.equity == pytest.approx(1_000_000 + (price - 3_900) * 100)


def test_remark_moves_equity_by_the_profit_change_and_ignores_unheld_or_bad_prices() -> None:
    p = PositionFigures(volume_short=2, cost_short=78_000.0, last_price=3_900, position_profit=0.0)
    f = fig(1_000_000, positions={"SHFE.rb2512": p})
    assert f.remark("SHFE.rb2512", 3_950, 10.0) and f.equity == pytest.approx(999_000)
    assert not f.remark("SHFE.hc2512", 3_000, 10.0)
    assert not f.remark("SHFE.rb2512", float("nan"), 10.0)


def test_disabled_or_unset_rules_never_breach() -> None:
    bad = fig(1.0, margin=1e9)
    assert evaluate(MonitorConfig(), bad, MonitorState()) == []
    assert evaluate(MonitorConfig(enabled=False, max_daily_loss=1), bad, MonitorState()) == []


def test_force_close_only_for_listed_rules_and_deterministic_ids() -> None:
    cfg = MonitorConfig(max_daily_loss=100, max_drawdown=100, force_close_on=("daily_loss",))
    out = evaluate(cfg, fig(999_000), MonitorState())
    assert {(b.rule, b.force_close) for b in out} == {("daily_loss", True), ("drawdown", False)}
    fc = next(b for b in out if b.force_close)
    assert fc.command_id == command_id("A", "20250303", "daily_loss") == "auto-A-20250303-daily_loss"
    again = evaluate(cfg, fig(999_000), MonitorState())          # a restarted monitor without state
    assert next(b for b in again if b.force_close).command_id == fc.command_id
    ev = RiskEvent.of(fc)
    assert ev.action == "force_close" and ev.command_id == fc.command_id and ev.rule == "daily_loss"
    assert command_id("A", "20250303", "instrument_loss", "SHFE.rb2512") == "auto-A-20250303-instrument_loss-SHFE_rb2512"


def test_state_round_trips_through_a_document() -> None:
    st = MonitorState("20250303", 1_000_500.0, {"drawdown", "instrument_loss:SHFE.rb2512"})
    assert MonitorState.from_doc(st.to_doc()) == st
    assert MonitorState.from_doc(None) == MonitorState()


def test_figures_from_a_qifi_document() -> None:
    doc = {"account_cookie": "A", "trading_day": "20250303",
           "accounts": {"pre_balance": 1e6, "deposit": 0, "withdraw": 0, "balance": 999_000, "margin": 39_000},
           "positions": {"SHFE.rb2512": {"volume_long": 10, "volume_short": 0, "position_cost_long": 390_000,
                                         "position_cost_short": 0, "last_price": 3_800, "position_profit": -10_000},
                         "SHFE.hc2512": {"volume_long": 0, "volume_short": 0}}}
    f = AccountFigures.from_qifi(doc)
    assert (f.account, f.static_balance, f.equity, f.margin) == ("A", 1e6, 999_000, 39_000)
    assert list(f.positions) == ["SHFE.rb2512"] and f.positions["SHFE.rb2512"].position_profit == -10_000


def test_config_validation_names_the_bad_key() -> None:
    with pytest.raises(RiskConfigError, match="max_volumee"):
        parse_config({"volume": {"max_volumee": 1}})
    with pytest.raises(RiskConfigError, match="monitor"):
        parse_config({"monitor": {"max_daily_los": 1}})
    with pytest.raises(RiskConfigError, match="unknown rule 'nope'"):
        parse_config({"monitor": {"force_close_on": ["nope"]}})
    with pytest.raises(RiskConfigError, match="unknown key `fund`"):
        apply_sets({}, ["fund.enabled=false"])
    with pytest.raises(RiskConfigError, match="unknown key `funds.enabledd`"):
        apply_sets({}, ["funds.enabledd=false"])
    d = apply_sets({}, ["funds.enabled=false", "volume.max_volume=5", "monitor.max_daily_loss=5000",
                        "monitor.force_close_on=daily_loss,drawdown", "session.enabled=false"])
    cfg = parse_config(d)
    assert not cfg.rules.funds.enabled and cfg.rules.volume.max_volume == 5
    assert cfg.monitor.max_daily_loss == 5000 and cfg.monitor.force_close_on == ("daily_loss", "drawdown")
    with pytest.raises(RiskConfigError, match="max_volume"):
        parse_config(apply_sets({}, ["volume.max_volume=0"]))
