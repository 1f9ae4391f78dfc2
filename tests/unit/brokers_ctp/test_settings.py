"""CTP settings and symbols: pure, no vn.py needed."""
from __future__ import annotations

import pytest

from brokers.ctp.settings import CtpSettings, SettingsError, parse_symbols

ENV = {
    "QA_CTP_USERID": "u1", "QA_CTP_PASSWORD": "s3cret-pw", "QA_CTP_BROKER_ID": "9999",
    "QA_CTP_MD_FRONT": "tcp://180.168.146.187:10211", "QA_CTP_TD_FRONT": "tcp://180.168.146.187:10201",
    "QA_CTP_APP_ID": "simnow_client_test", "QA_CTP_AUTH_CODE": "0000000000000000",
    "QA_CTP_ENV": "test", "QA_CTP_SYMBOLS": "SHFE.rb2512, i2601.DCE",
}


def test_from_env_builds_the_vnpy_ctp_setting_dict() -> None:
    s = CtpSettings.from_env(ENV)
    assert s.symbols == (("SHFE", "rb2512"), ("DCE", "i2601"))
    assert s.vnpy_setting() == {
        "用户名": "u1", "密码": "s3cret-pw", "经纪商代码": "9999",
        "交易服务器": "tcp://180.168.146.187:10201", "行情服务器": "tcp://180.168.146.187:10211",
        "产品名称": "simnow_client_test", "授权编码": "0000000000000000", "柜台环境": "测试",
    }
    assert CtpSettings.from_env({**ENV, "QA_CTP_ENV": ""}).vnpy_setting()["柜台环境"] == "实盘"


def test_secrets_never_in_repr_or_describe() -> None:
    s = CtpSettings.from_env(ENV)
    assert "s3cret-pw" not in repr(s) and "0000000000000000" not in repr(s)
    d = s.describe()
    assert "s3cret-pw" not in str(d) and d["password"] == "***" and d["auth_code"] == "***"


def test_password_only_from_the_environment() -> None:
    with pytest.raises(SettingsError, match="QA_CTP_PASSWORD"):
        CtpSettings.from_env(ENV, password="x")


@pytest.mark.parametrize("missing", ["QA_CTP_USERID", "QA_CTP_PASSWORD", "QA_CTP_BROKER_ID", "QA_CTP_MD_FRONT",
                                     "QA_CTP_TD_FRONT"])
def test_missing_setting_is_named(missing: str) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(SettingsError) as err:
        CtpSettings.from_env(env)
    assert missing in str(err.value) and "s3cret-pw" not in str(err.value)


def test_bad_environment_and_queue_size() -> None:
    with pytest.raises(SettingsError, match="QA_CTP_ENV"):
        CtpSettings.from_env({**ENV, "QA_CTP_ENV": "prod"})
    with pytest.raises(SettingsError, match="QUEUE_SIZE"):
        CtpSettings.from_env({**ENV, "QA_CTP_QUEUE_SIZE": "many"})


def test_parse_symbols_both_orders_dedup() -> None:
    assert parse_symbols("SHFE.rb2512,rb2512.SHFE;CZCE.SR601 ine.sc2512") == (
        ("SHFE", "rb2512"), ("CZCE", "SR601"), ("INE", "sc2512"))
    assert parse_symbols(["CFFEX.IF2512"]) == (("CFFEX", "IF2512"),)
    assert parse_symbols("") == ()


@pytest.mark.parametrize("bad", ["rb2512", "XYZ.rb2512", "SHFE.", "SSE.600000", "SHFE.rb.2512"])
def test_parse_symbols_rejects(bad: str) -> None:
    with pytest.raises(SettingsError):
        parse_symbols(bad)


def test_docs_name_every_setting() -> None:
    import re
    from pathlib import Path

    import brokers.ctp.settings as mod

    root = Path(__file__).resolve().parents[3]
    source = Path(mod.__file__).read_text()
    names = {f"QA_CTP_{n}" for n in re.findall(r'get\("([A-Z_]+)"', source)} | {"QA_CTP_PASSWORD", "QA_CTP_AUTH_CODE"}
    doc = (root / "docs" / "brokers.md").read_text()
    assert not [n for n in sorted(names) if f"`{n}`" not in doc]
    for key in (mod.KEY_USERID, mod.KEY_PASSWORD, mod.KEY_BROKERID, mod.KEY_TD_FRONT, mod.KEY_MD_FRONT,
                mod.KEY_APPID, mod.KEY_AUTH_CODE, mod.KEY_ENVIRONMENT):
        assert f"`{key}`" in doc
