from __future__ import annotations

import pytest

from handlers import cli
from handlers.doctor import FAIL, OK, check_exchanges
from qapubsub.topology import Topology


def test_typo_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctr"]) == 2
    err = capsys.readouterr().err
    assert "usage: qaflow" in err and "invalid choice: 'doctr'" in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    for name in cli.COMMANDS:
        assert cli.main([name, "--help"]) == 0
        assert f"qaflow {name}" in capsys.readouterr().out


def test_bad_config_exits_2_and_names_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QA_AMQP_URL", "http://nope")
    assert cli.main(["declare"]) == 2
    assert "QA_AMQP_URL" in capsys.readouterr().err


def test_doctor_names_wrong_type_missing_and_durability() -> None:
    topo = Topology()
    found = {ex.name: {"type": ex.type, "durable": ex.durable} for ex in topo.exchanges}
    found["qaorder"] = {"type": "direct", "durable": True}
    found["QAORDER_ROUTER"] = {"type": "direct", "durable": True}
    del found["qarisk"]
    checks = {c.what.split("'")[1]: c for c in check_exchanges(topo, found)}
    assert checks["qaorder"].status == FAIL and "'direct'" in checks["qaorder"].what and "'topic'" in checks["qaorder"].what
    assert checks["QAORDER_ROUTER"].status == FAIL and "non-durable" in checks["QAORDER_ROUTER"].what
    assert checks["qarisk"].status == FAIL and "qaflow declare" in checks["qarisk"].fix
    assert checks["qa.tick"].status == OK
