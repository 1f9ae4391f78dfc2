"""kill -9 each daemon in turn under load (random ticks, orders with a copy-trade follower, a
force-close and release in the middle), restart it, and prove the guarantees: every tick
stored once, every closed bar stored and published once, every accepted child at its
executor once, every fill counted once, every daemon running."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (FOLLOWER, LEADER, Load, Monitor, Platform, Row, check_all, queue_depth, seed_db,
                                   settle)
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAEMON_NAMES = ["tickhandler", "barhandler", "router", "executor", "account", "risk"]


@pytest.fixture
def fault_amqp_url(amqp_url: str) -> str:
    return amqp_url


def input_queue(topo: Any, name: str) -> str | None:
    return {"tickhandler": topo.tickhandler.name, "router": topo.router_orders.name,
            "executor": topo.exec_queue(LEADER).name, "account": topo.account_reports.name}.get(name)


@pytest.mark.parametrize("victim", DAEMON_NAMES)
def test_kill_9_and_restart_loses_nothing_and_places_nothing_twice(
        victim: str, fault_amqp_url: str, mongo_url: str, mongo_db: Any, fault_topology: Any, risk_url: str,
        tmp_path: Path) -> None:
    t_start = time.monotonic()
    topo = fault_topology
    seed_db(mongo_db)
    mon = Monitor(fault_amqp_url, topo)
    plat = Platform(amqp_url=fault_amqp_url, mongo_url=mongo_url, db_name=mongo_db.name, namespace=topo.namespace,
                    tmp=tmp_path, risk_url=risk_url)
    load = Load(plat, topo)
    try:
        plat.up()
        load.start()
        try:
            wait_for(lambda: len(load.orders) >= 8 and mongo_db.sim_orders.estimated_document_count() >= 4, 30, 0.2,
                     "orders flowing to the executor")
        except AssertionError as exc:
            states = [(d["_id"], d.get("state"), d.get("rejected")) for d in mongo_db.orders.find({})][:5]
            raise AssertionError(f"{exc}: {len(load.orders)} orders sent, errors {load.errors[-5:]}, {states}, "
                                 f"router log: {plat.log('router')[-1500:]}") from None
        q = input_queue(topo, victim)
        killed_at = time.monotonic()
        plat.kill9(victim)
        time.sleep(1.0)                 # down for a second while the load goes on
        in_flight = queue_depth(fault_amqp_url, q) if q else 0
        plat.restart(victim)
        if q:
            wait_for(lambda: queue_depth(fault_amqp_url, q) < max(50, in_flight // 4), 60, 0.1, f"{victim} caught up")
        recovery = time.monotonic() - killed_at
        wait_for(lambda: len(load.force_closes) >= 1 and len(load.orders) >= 30, 60, 0.2, "the load after the fault")
        load.stop()
        settle(plat, topo, load, mongo_db)
        v = check_all(plat, topo, load, mongo_db, mon, tickhandler_killed=victim == "tickhandler")
        fills = mongo_db.sim_orders.estimated_document_count()
        Row(f"kill -9 {victim}", in_flight=in_flight, lost=v.lost, duplicated=v.duplicated,
            recovery_s=round(recovery, 2), redelivered_same_id=v.redelivered_same_id,
            detail=(f"{len(load.ticks)} ticks, {len(load.orders)} orders + {len(load.force_closes)} force-close, "
                    f"{fills} executor orders; " + "; ".join(v.problems + v.notes))[:400],
            duration_s=round(time.monotonic() - t_start, 1)).save()
        assert not v.problems, v.problems
        assert not plat.dead(), plat.dead()
        assert (mongo_db.accounts.find_one({"_id": FOLLOWER}) or {}).get("trades"), "the follower never traded"
    finally:
        load.stop_ev.set()
        codes = plat.stop()
    assert all(c == 0 for c in codes.values()), (codes, {n: plat.log(n)[-2000:] for n, c in codes.items() if c})
