from __future__ import annotations

import pytest

from qarisk import RiskConfig, RiskConfigError, load_configs


def test_defaults_all_rules_enabled() -> None:
    c = RiskConfig.from_dict({})
    assert c.enabled and all(getattr(c, r).enabled for r in
                             ("state", "session", "volume", "price", "position", "funds", "exposure", "flow"))


def test_loads_limits_and_ints_for_floats() -> None:
    c = RiskConfig.from_dict({"volume": {"max_volume": 10, "max_value": 1000000},
                              "flow": {"max_orders_per_window": 5, "window_s": 1, "duplicate_window_s": 2}})
    assert c.volume.max_volume == 10 and c.volume.max_value == 1e6 and c.flow.window_s == 1.0


@pytest.mark.parametrize("bad,needle", [
    ({"volume": {"max_volumee": 5}}, "max_volumee"),
    ({"flw": {}}, "flw"),
    ({"flow": {"enabled": True, "max_order_per_window": 1}}, "max_order_per_window"),
])
def test_unknown_key_is_an_error_naming_it(bad: dict, needle: str) -> None:
    with pytest.raises(RiskConfigError, match=needle):
        RiskConfig.from_dict(bad)


@pytest.mark.parametrize("bad,needle", [
    ({"flow": {"window_s": -1}}, "window_s"),
    ({"flow": {"window_s": float("inf")}}, "window_s"),
    ({"volume": {"max_volume": 0}}, "max_volume"),
    ({"volume": {"max_volume": "5"}}, "max_volume"),
    ({"price": {"band_pct": "x"}}, "band_pct"),
    ({"flow": {"max_cancel_ratio": 1.5}}, "max_cancel_ratio"),
    ({"funds": {"enabled": "yes"}}, "enabled"),
])
def test_bad_values_name_the_key(bad: dict, needle: str) -> None:
    with pytest.raises(RiskConfigError, match=needle):
        RiskConfig.from_dict(bad)


def test_json_roundtrip_and_unknown_key_in_json() -> None:
    c = RiskConfig.from_dict({"exposure": {"max_net_value": 5e6}})
    import msgspec
    assert RiskConfig.from_json(msgspec.json.encode(c)) == c
    assert RiskConfig.from_dict(c.to_dict()) == c
    with pytest.raises(RiskConfigError, match="reserv"):
        RiskConfig.from_json(b'{"funds": {"reserv": 1}}')
    with pytest.raises(RiskConfigError, match="not valid JSON"):
        RiskConfig.from_json(b"{")


def test_load_configs_names_the_account() -> None:
    assert set(load_configs({"a": {}, "b": {"enabled": False}})) == {"a", "b"}
    with pytest.raises(RiskConfigError, match=r"account 'b'.*typo"):
        load_configs({"a": {}, "b": {"typo": 1}})
