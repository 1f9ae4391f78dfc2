from __future__ import annotations

import pytest

from qapubsub.management import Management
from qapubsub.topology import Topology, TopologyMismatch

pytestmark = pytest.mark.integration


def test_declare_is_idempotent_and_types_are_right(amqp_url: str, topology: Topology, amqp_channel) -> None:
    topology.declare_sync(amqp_channel)  # second time: no error
    found = Management(amqp_url).exchanges()
    for ex in topology.exchanges:
        assert found[ex.name]["type"] == ex.type, ex.name
        assert found[ex.name]["durable"] == ex.durable, ex.name


def test_type_mismatch_fails_with_a_sentence(amqp_url: str, namespace: str, amqp_channel) -> None:
    topo = Topology(namespace)
    amqp_channel.exchange_declare(topo.order, "direct")
    try:
        with pytest.raises(TopologyMismatch) as err:
            topo.declare_sync(amqp_channel)
        assert topo.order in str(err.value) and "'direct'" in str(err.value) and "'topic'" in str(err.value)
    finally:
        import pika
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        conn.channel().exchange_delete(topo.order)
        ch = conn.channel()
        for ex in topo.exchanges:
            ch.exchange_delete(ex.name)
        conn.close()
