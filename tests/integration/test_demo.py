"""`make run`'s demo, end to end: real daemons, real broker, real MongoDB-wire server; run twice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemons import ROOT
from tests.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_walks_every_step_and_stops_cleanly_twice(amqp_url: str, mongo_url: str, topology, mongo_db,
                                                        tmp_path: Path) -> None:
    env = {**os.environ, "QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_NAMESPACE": topology.namespace,
           "QA_MONGO_DB": mongo_db.name, "QA_STATE_DIR": str(tmp_path / "state"), "QA_WEB_PORT": str(free_port())}
    for run in (1, 2):  # the second run continues on the first one's accounts and data
        r = subprocess.run([sys.executable, "-m", "handlers.cli", "demo", "--duration", "2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=240)
        out = r.stdout
        logs = "".join(f.read_text()[-2000:] for f in (tmp_path / "state" / "logs").glob("*.log"))
        assert r.returncode == 0, f"run {run}:\n{out}\n{r.stderr[-3000:]}\n{logs}"
        for step in range(1, 11):
            assert f"[{step}/10]" in out, f"run {run} missed step {step}:\n{out}"
        assert "demo1 bought 4, demo3 bought 2" in out
        assert "field 'price'" in out
        assert "strategy ma-demo" in out and "dashboard (ready)" in out
        assert out.count(" exit 0") == 8, out
    # demo3 copies demo1, the strategy's trades included: its fills are all copies of demo1's
    trades3 = (mongo_db.accounts.find_one({"_id": "demo3"}) or {}).get("trades") or {}
    assert trades3 and all("/f/demo3" in str(t.get("order_id", "")) for t in trades3.values()), trades3
