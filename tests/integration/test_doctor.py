from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "handlers.doctor", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_doctor_all_good_after_declare(amqp_url: str, mongo_url: str, topology) -> None:
    r = _doctor({"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url}, "--namespace", topology.namespace)
    assert "exchange 't-" in r.stdout
    assert "[FAIL] exchange" not in r.stdout, r.stdout
    assert "MongoDB" in r.stdout


def test_doctor_reports_missing_exchanges_with_fix(amqp_url: str, mongo_url: str, namespace: str) -> None:
    r = _doctor({"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url}, "--namespace", namespace)
    assert r.returncode == 1
    assert f"exchange '{namespace}qaorder' (topic) does not exist" in r.stdout
    assert "qaflow declare" in r.stdout


def test_doctor_wrong_password_exits_3(amqp_url: str, mongo_url: str) -> None:
    bad = amqp_url.replace("guest:guest", "guest:wrong")
    r = _doctor({"QA_AMQP_URL": bad, "QA_MONGO_URL": mongo_url})
    assert r.returncode == 3
    assert "refused the credentials" in r.stdout and "wrong" not in r.stdout + r.stderr
