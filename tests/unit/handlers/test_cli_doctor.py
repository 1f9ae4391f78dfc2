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


def test_qaflow_up_starts_one_tickhandler_per_shard(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A shard queue without its tickhandler would hold its instruments' ticks unhandled."""
    from handlers.stack import default_daemons
    from qapubsub.settings import ConfigError
    from qapubsub.topology import tick_shards_from_env

    def ticks(**kw: object) -> list[tuple[str, tuple[str, ...]]]:
        return [(d.name, d.argv) for d in default_daemons(**kw) if d.argv[0] == "tickhandler"]  # type: ignore[arg-type]

    monkeypatch.delenv("QA_TICK_SHARDS", raising=False)
    assert ticks() == [("tickhandler", ("tickhandler",))]
    monkeypatch.setenv("QA_TICK_SHARDS", "2")
    assert ticks() == [("tickhandler-0", ("tickhandler", "--shard", "0", "--shards", "2")),
                       ("tickhandler-1", ("tickhandler", "--shard", "1", "--shards", "2"))]
    assert len(ticks(tick_shards=3)) == 3
    for bad in ("two", "0"):
        with pytest.raises(ConfigError, match=f"QA_TICK_SHARDS='{bad}'"):
            tick_shards_from_env({"QA_TICK_SHARDS": bad})
    monkeypatch.setenv("QA_TICK_SHARDS", "two")
    assert cli.main(["tickhandler"]) == 2                    # a bad value names the variable, no traceback
    assert "QA_TICK_SHARDS='two'" in capsys.readouterr().err
    assert cli.main(["up", "--tick-shards", "0"]) == 2
    assert "--tick-shards 0" in capsys.readouterr().err
