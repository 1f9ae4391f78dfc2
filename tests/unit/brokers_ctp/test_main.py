"""``python -m brokers.ctp.md``: exit codes for usage errors and an unreachable RabbitMQ (no vn.py needed)."""
from __future__ import annotations

import pytest

from brokers.ctp import md
from brokers.ctp.md import EXIT_CONNECT, EXIT_ERROR, EXIT_USAGE, main

from .conftest import ENV


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(__import__("os").environ):
        if k.startswith("QA_CTP_"):
            monkeypatch.delenv(k)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def test_missing_setting_exits_2_without_showing_the_password(env: None, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QA_CTP_BROKER_ID")
    assert main([]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "QA_CTP_BROKER_ID" in err and "s3cret-pw" not in err


def test_no_symbols_and_bad_symbol_exit_2(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QA_CTP_SYMBOLS")
    assert main([]) == EXIT_USAGE
    assert main(["--symbols", "SSE.600000"]) == EXIT_USAGE


def test_unreachable_rabbitmq_exits_3(env: None, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QA_AMQP_URL", "amqp://guest:pw-xyz@127.0.0.1:1/%2F")
    assert main(["--symbols", "SHFE.rb2512"]) == EXIT_CONNECT
    err = capsys.readouterr().err
    assert "cannot connect to RabbitMQ" in err and "pw-xyz" not in err


def test_missing_vnpy_exits_1_with_the_install_hint(env: None, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from brokers.ctp import vnpy_compat

    class Reachable:
        def __init__(self, *a: object, **k: object) -> None: ...

        def ensure(self) -> Reachable:
            return self

        def close(self) -> None: ...

    def missing(**_: object) -> None:
        raise vnpy_compat.VnpyMissing(f"vnpy_ctp is not installed; install it with: {vnpy_compat.INSTALL_HINT}")

    monkeypatch.setattr("qapubsub.sync.Connection", Reachable)
    monkeypatch.setattr(vnpy_compat, "load", missing)
    monkeypatch.setattr(md.CtpMarketData, "run_until_signal", lambda self: self.start())
    assert main(["--symbols", "SHFE.rb2512"]) == EXIT_ERROR
    assert "qaflow[ctp]" in capsys.readouterr().err
