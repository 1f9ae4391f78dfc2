"""Security under a full run: force-close from any identity but the risk user is refused and
audited; no credential (the risk user's password from QA_RISK_AMQP_URL, the broker password)
in any daemon log, in MongoDB or in a dead-letter reason; credential files are private."""
from __future__ import annotations

import json
import os
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pika
import pytest

from qaorder.models import ForceClose
from qapubsub import keys
from qapubsub.messages import amqp_properties, encode
from tests.faults.conftest import LEADER, ROOT, Load, Platform, Row, seed_db
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def fault_amqp_url(amqp_url: str) -> str:
    return amqp_url


def _secrets(*urls: str) -> set[str]:
    out = set()
    for u in urls:
        pw = urllib.parse.urlsplit(u).password
        if pw and pw not in ("guest",) and len(pw) >= 6:   # "guest" is also the user name: not a secret
            out.update({pw, urllib.parse.quote(pw, safe="")})
    return out


def test_force_close_only_from_the_risk_identity_and_no_credentials_anywhere(
        fault_amqp_url: str, mongo_url: str, mongo_db: Any, fault_topology: Any, risk_url: str,
        tmp_path: Path) -> None:
    t0 = time.monotonic()
    topo = fault_topology
    seed_db(mongo_db)
    plat = Platform(amqp_url=fault_amqp_url, mongo_url=mongo_url, db_name=mongo_db.name, namespace=topo.namespace,
                    tmp=tmp_path, risk_url=risk_url)
    secrets = _secrets(risk_url, fault_amqp_url)
    assert secrets, "the risk identity has no password to look for"
    load = Load(plat, topo)
    try:
        plat.up()
        load.start()
        wait_for(lambda: len(load.force_closes) >= 1 and len(load.orders) >= 20, 60, 0.2, "a run with a force-close")
        # force-closes from other identities: guest with its own user_id, and with no user_id at all
        conn = pika.BlockingConnection(pika.URLParameters(fault_amqp_url))
        ch = conn.channel()
        ch.confirm_delivery()
        refused = []
        for uid in ("guest", None):
            fc = ForceClose(command_id=f"fc-not-risk-{uid}", account=LEADER, reason="x", operator="intruder")
            ch.basic_publish(topo.risk, keys.risk_key(LEADER), encode(fc),
                             pika.BasicProperties(user_id=uid, **amqp_properties(fc)), mandatory=True)
            refused.append(fc.command_id)
        for cid in refused:
            wait_for(lambda cid=cid: mongo_db.audit.find_one({"action": "refused", "parent_id": cid}), 20, 0.2,
                     f"force-close {cid} refused and audited")
            assert not mongo_db.processed.find_one({"_id": f"forceclose:{cid}"}), f"{cid} was executed"
        # the real one was executed
        assert mongo_db.processed.find_one({"_id": f"forceclose:{load.force_closes[0]}"})
        dead_reasons = []
        while True:
            m, props, _b = ch.basic_get(topo.dead_letters.name, auto_ack=True)
            if m is None:
                break
            dead_reasons.append(json.dumps(props.headers or {}, default=str))
        conn.close()
        # a risk CLI call with a wrong password must not echo it
        import subprocess
        import sys
        bad_pw = "wrong-" + os.urandom(6).hex()
        bad = dict(plat.env, QA_RISK_AMQP_URL=risk_url.replace(urllib.parse.urlsplit(risk_url).password or "", bad_pw))
        r = subprocess.run([sys.executable, "-m", "handlers.risk", "status", "--account", LEADER], cwd=ROOT, env=bad,
                           capture_output=True, text=True, timeout=60)
        load.stop()
    finally:
        load.stop_ev.set()
        codes = plat.stop()
    leaks = []
    for name, text in plat.all_logs().items():
        leaks += [f"log {name}" for s in secrets if s in text]
    for coll in mongo_db.list_collection_names():
        blob = json.dumps(list(mongo_db[coll].find({})), default=str)
        leaks += [f"MongoDB {coll}" for s in secrets if s in blob]
    leaks += ["dead-letter headers" for s in secrets for h in dead_reasons if s in h]
    leaks += ["risk CLI output" for s in (bad_pw, *secrets) if s in r.stdout + r.stderr]
    perms = []
    for f in (ROOT / ".qaflow" / "servers.env", ROOT / ".qaflow" / "risk.secret"):
        if f.exists() and f.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            perms.append(f"{f.name} mode {oct(f.stat().st_mode & 0o777)}")
    Row("security: foreign force-close x2, credential grep", in_flight=2, lost=0, duplicated=0,
        detail=f"refused+audited 2/2; leaks {leaks or 'none'}; file modes {perms or 'private'}; "
               f"{len(plat.all_logs())} logs, {len(mongo_db.list_collection_names())} collections scanned",
        duration_s=round(time.monotonic() - t0, 1)).save()
    assert not leaks, leaks
    assert not perms, perms
    assert all(c == 0 for c in codes.values()), codes
