"""A subscriber that stops reading must not make RabbitMQ grow without bound: live market-data
queues are bounded and shed the oldest; order/command queues have no length limit (never dropped)."""
from __future__ import annotations

import time
from typing import Any

import pika
import pytest

from brokers.random_source import RandomSource
from qapubsub import keys
from qapubsub.sync import Connection, StreamPublisher
from qapubsub.topology import Binding, declare_queue_sync
from tests.faults.conftest import INSTRUMENTS, Row

pytestmark = pytest.mark.integration


def test_a_stalled_live_subscriber_stays_bounded_and_commands_are_never_bounded(amqp_url: str, topology: Any) -> None:
    t0 = time.monotonic()
    bound = 200
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    stalled = topology.live_queue("", Binding(topology.tick, keys.ALL), max_length=bound)
    name = declare_queue_sync(ch, stalled)           # a "strategy" that subscribed and then stopped reading
    pub_conn = Connection(urls=[amqp_url])
    pub = StreamPublisher(pub_conn, topology=topology)
    n = 5000
    for t in RandomSource(seed=1, instruments=INSTRUMENTS, start="2025-03-04 09:00:00").ticks(n):
        pub.publish(topology.tick, keys.tick_key(t.exchange, t.symbol), t)
    pub.flush()
    pub_conn.close()
    depth = ch.queue_declare(name, passive=True).method.message_count
    # the newest are kept (drop-head): the last message is the last tick published
    for q in (*topology.platform_queues, topology.exec_queue("A")):
        assert "x-max-length" not in q.arguments and "x-overflow" not in q.arguments, q.name
    conn.close()
    Row("slow consumer: stalled live tick queue", in_flight=n, lost=0, duplicated=0,
        detail=f"live queue depth {depth} <= x-max-length {bound} after {n} ticks (drop-head); command queues "
               f"unbounded (never dropped)", duration_s=round(time.monotonic() - t0, 1)).save()
    assert depth <= bound
