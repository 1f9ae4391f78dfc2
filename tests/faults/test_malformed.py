"""Malformed, truncated, oversized, wrong-schema and wrong-type messages (hypothesis-generated)
to every exchange a daemon consumes, and QATrader orders with missing fields, while the whole
platform runs: each one is in the dead-letter queue with a reason, every daemon keeps running
and still does its work afterwards."""
from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, given, settings

from qapubsub import handling, keys
from qapubsub.messages import encode
from tests.faults.conftest import LEADER, Platform, Row, queue_depth, seed_db
from tests.faults.generators import TARGETS, bad_message
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
EXAMPLES = 120


@pytest.fixture
def fault_amqp_url(amqp_url: str) -> str:
    return amqp_url


def _generate(n: int) -> list[tuple[str, Any, bytes]]:
    out: list[tuple[str, Any, bytes]] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bad_message())
    def collect(m: tuple[str, Any, bytes]) -> None:
        out.append(m)

    collect()
    # every target and every kind at least once, whatever hypothesis drew
    from tests.faults.generators import QATRADER, QATRADER_REQUIRED

    import json
    for t in TARGETS:
        out.append(("truncated", t, json.dumps(t.valid).encode()[:-3]))
        out.append(("wrong-schema", t, json.dumps(t.wrong_schema).encode()))
    for f in QATRADER_REQUIRED:
        qt = next(t for t in TARGETS if t.name == "qapubsub_order")
        out.append(("missing-field", qt, json.dumps({k: v for k, v in QATRADER.items() if k != f}).encode()))
    return out


def test_bad_messages_to_every_exchange_are_dead_lettered_with_a_reason_and_no_daemon_dies(
        fault_amqp_url: str, mongo_url: str, mongo_db: Any, fault_topology: Any, risk_url: str,
        tmp_path: Path) -> None:
    t_start = time.monotonic()
    topo = fault_topology
    seed_db(mongo_db)
    plat = Platform(amqp_url=fault_amqp_url, mongo_url=mongo_url, db_name=mongo_db.name,
                    namespace=topo.namespace, tmp=tmp_path, risk_url=risk_url)
    try:
        plat.up()
        # the executor and the account daemon bind their live tick queues to what they hold:
        # give them a working order so qa.tick reaches their consumers too
        from tests.faults.generators import ORDER
        import msgspec
        conn = pika.BlockingConnection(pika.URLParameters(fault_amqp_url))
        ch = conn.channel()
        ch.confirm_delivery()
        first = msgspec.structs.replace(ORDER, order_id=f"warm-{uuid.uuid4().hex[:6]}", price=3000.0)
        ch.basic_publish(topo.order, keys.order_key(LEADER), encode(first),
                         pika.BasicProperties(message_id=first.id, delivery_mode=2), mandatory=True)
        wait_for(lambda: mongo_db.sim_orders.find_one({"_id": first.order_id}), 20, what="warm-up order placed")

        bad = _generate(EXAMPLES)
        sent: dict[str, tuple[str, str, str]] = {}
        for kind, target, body in bad:
            mid = f"fz-{uuid.uuid4().hex[:12]}"
            exchange = getattr(topo, target.name)
            ch.basic_publish(exchange, target.key, body, pika.BasicProperties(message_id=mid, delivery_mode=2),
                             mandatory=True)
            sent[mid] = (kind, exchange, target.key)
        # after the storm: a good order is still routed, copied and placed
        good = msgspec.structs.replace(ORDER, order_id=f"after-{uuid.uuid4().hex[:6]}", price=3000.0)
        ch.basic_publish(topo.order, keys.order_key(LEADER), encode(good),
                         pika.BasicProperties(message_id=good.id, delivery_mode=2), mandatory=True)
        wait_for(lambda: len([d for d in mongo_db.sim_orders.find({}, {"_id": 1})
                                     if str(d["_id"]).startswith(good.order_id)]) >= 2, 60,
                 what="the good order after the fuzz placed for the leader and its follower")

        dead: dict[str, list[dict[str, Any]]] = defaultdict(list)

        def collect() -> bool:
            while True:
                m, props, _body = ch.basic_get(topo.dead_letters.name, auto_ack=True)
                if m is None:
                    break
                if props.message_id in sent:
                    dead[props.message_id].append(dict(props.headers or {}))
            return set(sent) <= set(dead)

        try:
            wait_for(collect, 60, 0.2, "every bad message in the dead-letter queue")
        except AssertionError:
            pass
        missing = {m: sent[m] for m in sent if m not in dead}
        no_reason = [m for m, hs in dead.items() if not all(h.get(handling.ERROR_HEADER) for h in hs)]
        conn.close()
        alive = plat.dead()
        by_kind = Counter(k for k, _e, _r in sent.values())
        logs = plat.all_logs()
        tracebacks = {n: l.count("Traceback") for n, l in logs.items() if "Traceback" in l}
        Row("malformed x%d to 10 targets (%s)" % (len(sent), ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))),
            in_flight=len(sent), lost=len(missing), duplicated=0, recovery_s=0.0,
            detail=f"dead={alive or 'none'}; tracebacks={tracebacks or 'none'}",
            duration_s=round(time.monotonic() - t_start, 1)).save()
        assert not missing, f"{len(missing)} bad messages not dead-lettered, e.g. {list(missing.values())[:10]}"
        assert not no_reason, f"dead-lettered without {handling.ERROR_HEADER}: {no_reason[:5]}"
        assert not alive, f"daemons died: {alive}"
        assert queue_depth(fault_amqp_url, topo.router_orders.name) == 0
    finally:
        codes = plat.stop()
    assert all(c == 0 for c in codes.values()), (codes, {n: plat.log(n)[-2000:] for n, c in codes.items() if c})
