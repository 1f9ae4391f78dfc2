"""``python -m brokers.ctp.md`` with the REAL CtpGateway and native CTP API, fronts on unused
loopback ports (never connected): starts, SIGTERM -> exit 0 quickly, the password never printed.

Needs the compiled vnpy_ctp and RabbitMQ (marker ``integration``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vnpy_ctp", reason="vnpy_ctp not installed (pip install 'qaflow[ctp]')")

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]


def test_sigterm_stops_the_real_gateway_process(amqp_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "QA_AMQP_URL": amqp_url,
           "QA_CTP_USERID": "u1", "QA_CTP_PASSWORD": "pw-never-printed", "QA_CTP_BROKER_ID": "9999",
           "QA_CTP_MD_FRONT": "tcp://127.0.0.1:9", "QA_CTP_TD_FRONT": "tcp://127.0.0.1:9", "QA_CTP_ENV": "test"}
    proc = subprocess.Popen([sys.executable, "-m", "brokers.ctp.md", "--symbols", "SHFE.rb2512"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        lines: list[str] = []
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "starting CTP market data" in line or not line:
                break
        assert any("starting CTP market data" in x for x in lines), "".join(lines)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert "CTP market data stopped" in text
    assert "pw-never-printed" not in text
