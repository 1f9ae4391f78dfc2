"""Infrastructure faults under load: the MongoDB-wire server stopped and started mid-batch, the
broker restarted (stop_app/start_app on a private node), TCP connections cut through a proxy."""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (Load, Monitor, Platform, PrivateBroker, PrivateMongo, Row, check_all,
                                   queue_depth, seed_db, settle)
from tests.helpers import wait_for
from tests.tcpproxy import TCPProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(plat: Platform, topo: Any, db: Any, mon: Monitor, load: Load, fault: Any, name: str,
         t_start: float, **check: Any) -> None:
    try:
        plat.up()
        load.start()
        wait_for(lambda: len(load.orders) >= 8 and db.sim_orders.estimated_document_count() >= 4, 30, 0.2,
                 "orders flowing to the executor")
        in_flight, recovery = fault()
        wait_for(lambda: len(load.force_closes) >= 1 and len(load.orders) >= 30, 90, 0.2, "the load after the fault")
        load.stop()
        settle(plat, topo, load, db, timeout=90, ticks_exact=not check.get("transient_ticks_may_be_lost"))
        v = check_all(plat, topo, load, db, mon, **check)
        Row(name, in_flight=in_flight, lost=v.lost, duplicated=v.duplicated, recovery_s=round(recovery, 2),
            redelivered_same_id=v.redelivered_same_id,
            detail=(f"{len(load.ticks)} ticks, {len(load.orders)} orders, client re-sends {load.publish_retries}; "
                    + "; ".join(v.problems + v.notes))[:500],
            duration_s=round(time.monotonic() - t_start, 1)).save()
        assert not v.problems, v.problems
        assert not plat.dead(), plat.dead()
    finally:
        load.stop_ev.set()
        codes = plat.stop()
    assert all(c == 0 for c in codes.values()), (codes, {n: plat.log(n)[-2500:] for n, c in codes.items() if c})


# MongoDB ---------------------------------------------------------------------------------------
@pytest.fixture
def fault_amqp_url(request: pytest.FixtureRequest) -> str:
    if "private_broker" in request.fixturenames:
        return request.getfixturevalue("private_broker").url  # type: ignore[no-any-return]
    return request.getfixturevalue("amqp_url")  # type: ignore[no-any-return]


def test_mongodb_stopped_and_restarted_mid_batch(fault_amqp_url: str, private_mongo: PrivateMongo,
                                                 fault_topology: Any, risk_url: str, tmp_path: Path) -> None:
    import pymongo

    t0 = time.monotonic()
    db = pymongo.MongoClient(private_mongo.url)["faults"]
    seed_db(db)
    mon = Monitor(fault_amqp_url, fault_topology)
    plat = Platform(amqp_url=fault_amqp_url, mongo_url=private_mongo.url, db_name="faults",
                    namespace=fault_topology.namespace, tmp=tmp_path, risk_url=risk_url)
    load = Load(plat, fault_topology)

    def fault() -> tuple[int, float]:
        from tests.faults.conftest import stored_ticks

        stored_before = sum(len(v) for v in stored_ticks(db).values())
        down_at = time.monotonic()
        private_mongo.stop(signal.SIGKILL)       # mid-batch: the tickhandler writes every ~50 ms
        time.sleep(3.0)
        in_flight = len(load.ticks) - stored_before   # ticks published but not stored when it came back
        private_mongo.start()
        wait_for(lambda: queue_depth(fault_amqp_url, fault_topology.tickhandler.name) < 200, 60, 0.1,
                 "the tickhandler caught up after MongoDB came back")
        return in_flight, time.monotonic() - down_at

    _run(plat, fault_topology, db, mon, load, fault, "MongoDB kill -9 + restart (3 s down)", t0)


# RabbitMQ restart (private node) --------------------------------------------------------------
def test_broker_restart_on_a_private_node(private_broker: PrivateBroker, fault_amqp_url: str, mongo_url: str,
                                          mongo_db: Any, fault_topology: Any, tmp_path: Path) -> None:
    t0 = time.monotonic()
    seed_db(mongo_db)
    mon = Monitor(fault_amqp_url, fault_topology)
    plat = Platform(amqp_url=fault_amqp_url, mongo_url=mongo_url, db_name=mongo_db.name,
                    namespace=fault_topology.namespace, tmp=tmp_path, risk_url=private_broker.risk_url)
    load = Load(plat, fault_topology)

    def fault() -> tuple[int, float]:
        t = time.monotonic()
        in_flight = sum(queue_depth(fault_amqp_url, q) for q in (fault_topology.tickhandler.name,
                                                                 fault_topology.router_orders.name))
        private_broker.restart_app()
        for name in plat.names:   # every daemon reconnected and consumes again
            wait_for(lambda name=name: plat.procs[name].poll() is None, 5, what=f"{name} alive")
        wait_for(lambda: all(queue_depth(fault_amqp_url, q) < 200 for q in (fault_topology.tickhandler.name,
                                                                           fault_topology.router_orders.name)),
                 90, 0.2, "caught up after the broker restart")
        return in_flight, time.monotonic() - t

    _run(plat, fault_topology, mongo_db, mon, load, fault, "RabbitMQ stop_app/start_app (private node)", t0,
         transient_ticks_may_be_lost=True)


# TCP cuts ---------------------------------------------------------------------------------------
def test_tcp_connections_cut_through_a_proxy(fault_amqp_url: str, mongo_url: str, mongo_db: Any,
                                            fault_topology: Any, risk_url: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    seed_db(mongo_db)
    mon = Monitor(fault_amqp_url, fault_topology)
    with TCPProxy("127.0.0.1", int(fault_amqp_url.rsplit(":", 1)[1].split("/")[0])) as proxy:
        plat = Platform(amqp_url=fault_amqp_url, mongo_url=mongo_url, db_name=mongo_db.name,
                        namespace=fault_topology.namespace, tmp=tmp_path, risk_url=risk_url,
                        daemon_amqp_url=proxy.url(fault_amqp_url))
        load = Load(plat, fault_topology)

        def fault() -> tuple[int, float]:
            t = time.monotonic()
            cut = 0
            for _ in range(3):
                cut += proxy.cut() // 2
                time.sleep(1.0)
            wait_for(lambda: proxy.connections >= cut // 3, 30, 0.1, "daemons reconnected")
            wait_for(lambda: all(queue_depth(fault_amqp_url, q) < 200 for q in (fault_topology.tickhandler.name,
                                                                               fault_topology.router_orders.name)),
                     60, 0.2, "caught up after the cuts")
            return cut, time.monotonic() - t

        # a cut between a closed bar's publish and its confirm makes the tickhandler send it again (same id)
        _run(plat, fault_topology, mongo_db, mon, load, fault, "TCP cut x3 of every daemon connection", t0,
             bar_confirms_may_be_lost=True)
