"""The QAPUBSUB facade: QAPUBSUB's call shapes and exchange declarations, on the robust core."""
from __future__ import annotations

import json
import threading
from typing import Any

import pika
import pytest

from qapubsub import compat
from qapubsub.management import Management
from qapubsub.topology import Topology
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

LOCAL = {"host": "127.0.0.1", "port": 5672, "user": "guest", "password": "guest"}


def test_routing_round_trip_with_qapubsub_call_shapes(amqp_url: str, topology: Topology) -> None:
    got: list[tuple[str, bytes, str | None]] = []

    class Sub(compat.subscriber_routing):
        def callback(self, chan: Any, method_frame: Any, header_frame: Any, body: bytes) -> None:
            got.append((method_frame.routing_key, body, header_frame.content_type))

    # QAFlow's own contract exchange for QAPUBSUB orders: direct and non-durable, as QAPUBSUB declares it.
    sub = Sub(exchange=topology.qapubsub_order, routing_key="acc1", **LOCAL)
    sub.add_sub(topology.qapubsub_order, "acc2")
    t = threading.Thread(target=sub.start, daemon=True)
    t.start()
    try:
        assert sub.ready.wait(10)
        p = compat.publisher_routing(exchange=topology.qapubsub_order, **LOCAL)
        order = {"topic": "sendorder", "account_cookie": "acc1", "code": "rb2512", "volume": 1}
        p.pub(json.dumps(order), routing_key="acc1")
        p.pub(order, routing_key="acc2")
        p.pub("to nobody", routing_key="acc9")  # not mandatory, as QAPUBSUB: dropped, no error
        wait_for(lambda: len(got) == 2, what="both orders")
        assert got[0] == ("acc1", json.dumps(order).encode(), "text/plain")
        assert got[1][0] == "acc2" and json.loads(got[1][1]) == order and got[1][2] == "application/json"
        p.exit()
    finally:
        sub.stop()
        t.join(10)
        sub.connection.close()
    assert not t.is_alive()


@pytest.mark.parametrize(("cls", "kind"), [(compat.publisher, "fanout"), (compat.publisher_routing, "direct"),
                                           (compat.publisher_topic, "topic")])
def test_exchange_types_equal_qapubsub(amqp_url: str, namespace: str, topology: Topology, amqp_channel,
                                       cls: type, kind: str) -> None:
    name = f"{namespace}compat.{kind}"
    p = cls(exchange=name, **LOCAL)
    p.exit()
    ex = Management(amqp_url).exchanges()[name]
    assert (ex["type"], ex["durable"]) == (kind, False)
    # QAPUBSUB's own declaration on the same name must still be accepted (no PRECONDITION_FAILED).
    amqp_channel.exchange_declare(exchange=name, exchange_type=kind, passive=False, durable=False, auto_delete=False)


def test_fanout_and_topic_subscribers(amqp_url: str, topology: Topology) -> None:
    fan: list[bytes] = []
    top: list[str] = []
    s1 = compat.subscriber(exchange=f"{topology.namespace}compat.fan", **LOCAL)
    s1.callback = lambda ch, m, p, body: fan.append(body)  # type: ignore[method-assign]
    s2 = compat.subscriber_topic(exchange=f"{topology.namespace}compat.top", routing_key="SHFE.*", **LOCAL)
    s2.callback = lambda ch, m, p, body: top.append(m.routing_key)  # type: ignore[method-assign]
    threads = [threading.Thread(target=s.start, daemon=True) for s in (s1, s2)]
    for t in threads:
        t.start()
    try:
        assert s1.ready.wait(10) and s2.ready.wait(10)
        compat.publisher(exchange=f"{topology.namespace}compat.fan", **LOCAL).pub("tick")
        pt = compat.publisher_topic(exchange=f"{topology.namespace}compat.top", **LOCAL)
        pt.pub("x", routing_key="SHFE.rb2512")
        pt.pub("y", routing_key="DCE.m2601")
        pt.pub("z", routing_key="SHFE.cu2512")
        wait_for(lambda: fan == [b"tick"] and top == ["SHFE.rb2512", "SHFE.cu2512"], what="fanout and topic")
    finally:
        for s in (s1, s2):
            s.stop()
        for t in threads:
            t.join(10)
        for s in (s1, s2):
            s.connection.close()


def test_urls_follow_qapubsub_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compat.amqp_url(host="10.0.0.5") == ("amqp://admin:admin@10.0.0.5:5672/%2F",)
    monkeypatch.setenv("QA_AMQP_URL", "amqp://u:p@127.0.0.1:5673/%2F")
    assert compat.amqp_url() == ("amqp://u:p@127.0.0.1:5673/%2F",)
    assert pika.URLParameters(compat.amqp_url(vhost="qa")[0]).virtual_host == "qa"
