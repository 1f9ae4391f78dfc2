"""`make run`'s demo, end to end: real daemons, real broker, real MongoDB-wire server; run twice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemons import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_walks_every_step_and_stops_cleanly_twice(amqp_url: str, mongo_url: str, topology, mongo_db,
                                                        tmp_path: Path) -> None:
    env = {**os.environ, "QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_NAMESPACE": topology.namespace,
           "QA_MONGO_DB": mongo_db.name, "QA_STATE_DIR": str(tmp_path / "state")}
    for run in (1, 2):  # the second run continues on the first one's accounts and data
        r = subprocess.run([sys.executable, "-m", "handlers.cli", "demo", "--duration", "2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=240)
        out = r.stdout
        logs = "".join(f.read_text()[-2000:] for f in (tmp_path / "state" / "logs").glob("*.log"))
        assert r.returncode == 0, f"run {run}:\n{out}\n{r.stderr[-3000:]}\n{logs}"
        for step in range(1, 9):
            assert f"[{step}/8]" in out, f"run {run} missed step {step}:\n{out}"
        assert "demo1 bought 4, demo2 bought 2" in out
        assert "field 'price'" in out
        assert out.count(" exit 0") == 4, out
    doc = mongo_db.accounts.find_one({"_id": "demo2"})
    assert doc["positions"]["SHFE.rb2605"]["volume_long_today"] + doc["positions"]["SHFE.rb2605"].get(
        "volume_long_his", 0) >= 2
