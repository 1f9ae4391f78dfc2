"""The whole platform end to end, every daemon a real subprocess (issue: strategy runtime, web, make run).

Random ticks -> tickhandler -> barhandler -> the MA-cross strategy on demo1 and demo2 -> router (demo3
copies demo1 at 0.5) -> paper executor -> account daemon; a WebSocket client gets a full quote then
diffs; the risk desk force-closes demo2 and it ends flat; SIGTERM stops every daemon with exit 0.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from brokers.random_source import RandomSource
from handlers.stack import Stack, default_daemons
from qaaccount.store import AccountStore
from qaorder.routing import FollowerRule, Sizing
from qaorder.store import OrderStore
from qapubsub.sync import Connection, StreamPublisher
from qapubsub.topology import Topology
from tests.daemons import ROOT
from tests.helpers import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ACCOUNTS = ("demo1", "demo2", "demo3")


def _long(db: Any, account: str) -> float:
    pos = ((db.accounts.find_one({"_id": account}) or {}).get("positions") or {}).get("SHFE.rb2605") or {}
    return float(pos.get("volume_long_today", 0) + pos.get("volume_long_his", 0)
                 - pos.get("volume_short_today", 0) - pos.get("volume_short_his", 0))


async def _quotes(port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(f"ws://127.0.0.1:{port}/ws")
    ws.write_message(json.dumps({"aid": "subscribe_quote", "ins_list": "rb2605"}))
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < deadline:
        msg = json.loads(await asyncio.wait_for(ws.read_message(), 20))
        if msg.get("aid") == "rtn_data":
            got.append(msg["data"][0]["quotes"]["SHFE.rb2605"])
    ws.close()
    assert len(got) == 2, got
    return got[0], got[1]


def test_full_stack(amqp_url: str, mongo_url: str, topology: Topology, mongo_db, tmp_path: Path) -> None:
    risk_url = os.environ.get("QA_RISK_AMQP_URL")
    if not risk_url:
        pytest.fail("QA_RISK_AMQP_URL is not set: `make test` sets up the risk-desk identity", pytrace=False)
    port = free_port()
    env = {"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_NAMESPACE": topology.namespace,
           "QA_MONGO_DB": mongo_db.name, "QA_WEB_TOKEN": "e2e-token", "QA_RISK_AMQP_URL": risk_url}
    accounts = AccountStore(mongo_db)
    for name in ACCOUNTS:
        accounts.open(name, 1_000_000.0)
    OrderStore(mongo_db).add_rule(FollowerRule(rule_id="copy", leader="demo1", follower="demo3",
                                               sizing=Sizing.RATIO, ratio=0.5))
    conn = Connection(urls=[amqp_url])
    topology.declare_sync(conn.channel(), queues=[*topology.platform_queues,
                                                  *(topology.exec_queue(a) for a in ACCOUNTS)])
    stack = Stack(state=tmp_path / "state", env=env)
    for d in default_daemons(ACCOUNTS, ("demo1", "demo2"), port):
        stack.start(d)
    stop = threading.Event()

    def stream() -> None:
        c = Connection(urls=[amqp_url])
        src = RandomSource(seed=5, instruments=["SHFE.rb2605", "DCE.i2605"], start="2025-03-04 09:00:00")
        src.publish(StreamPublisher(c, topology=topology), rate=300, stop=stop, install_signals=False)
        c.close()

    codes: dict[str, int | None] = {}
    try:
        ch = conn.channel()
        wait_for(lambda: all(ch.queue_declare(q, passive=True).method.consumer_count >= 1 for q in (
            topology.tickhandler.name, topology.router_orders.name, topology.history_requests.name,
            *(topology.exec_queue(a).name for a in ACCOUNTS))) and not stack.dead(), timeout=90,
            what="every daemon consuming")
        threading.Thread(target=stream, daemon=True).start()

        # the strategy trades both accounts; the follower copies demo1's orders at half size
        def strategy_plans() -> list[dict[str, Any]]:
            return [d for d in mongo_db.orders.find({}) if str(d["_id"]).startswith("ma-demo-")]

        wait_for(lambda: {d["routing_key"] for d in strategy_plans()} >= {"demo1", "demo2"}, timeout=120,
                 what="strategy orders for demo1 and demo2")
        demo1_plan = next(d for d in strategy_plans() if d["routing_key"] == "demo1")
        kids = {c["account"]: json.loads(c["body"]) for c in demo1_plan["children"]}
        assert kids["demo3"]["volume"] == kids["demo1"]["volume"] // 2 and kids["demo3"]["direction"] == \
            kids["demo1"]["direction"]
        wait_for(lambda: _long(mongo_db, "demo1") != 0 and _long(mongo_db, "demo3") != 0, timeout=60,
                 what="fills in demo1 and its follower demo3")

        # accounts in MongoDB match the executor's fills
        def consistent() -> bool:
            for name in ACCOUNTS:
                doc = mongo_db.accounts.find_one({"_id": name}) or {}
                net = sum((t["volume"] if t["direction"] == "BUY" else -t["volume"])
                          for t in (doc.get("trades") or {}).values())
                filled = sum(o.get("traded", 0) * (1 if o["order"]["direction"] == "BUY" else -1)
                             for o in mongo_db.sim_orders.find({"account": name}))
                if not (net == _long(mongo_db, name) == filled):
                    return False
            return True

        wait_for(consistent, timeout=30, what="account positions = their trades = the executor's fills")

        # the WebSocket: a full quote first, then only the changed fields
        full, diff = asyncio.run(_quotes(port))
        assert len(full) > 30 and 0 < len(diff) < len(full) and "last_price" in full

        # the risk desk flattens demo2 and keeps it reduce-only
        r = subprocess.run([sys.executable, "-m", "handlers.cli", "risk", "force-close", "--account", "demo2",
                            "--reason", "e2e"], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: mongo_db.account_state.find_one({"_id": "demo2", "reduce_only": {"$in": [True, 1]}}),
                 timeout=30, what="demo2 reduce-only")
        wait_for(lambda: _long(mongo_db, "demo2") == 0, timeout=60, what="demo2 flat after the force-close")
        assert not stack.dead(), stack.dead()
    finally:
        stop.set()
        codes = stack.stop()
        conn.close()
    assert codes == {name: 0 for name in codes} and len(codes) == 8, codes
