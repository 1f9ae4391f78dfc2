"""The pika transport against the real broker: confirms, reconnects, dead-letters, SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pika
import pytest

from qapubsub.handling import ATTEMPTS_HEADER, ERROR_HEADER, ORIGINAL_ROUTING_KEY_HEADER, Reject
from qapubsub.messages import Message
from qapubsub.sync import Connection, Consumer, Delivery, Publisher, StreamPublisher, Unroutable
from qapubsub.topology import Binding, Topology, declare_queue_sync
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


class Ping(Message, tag="t.ping", forbid_unknown_fields=True):
    n: int


def _count(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def _drain(channel: Any, queue: str) -> list[tuple[Any, bytes]]:
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((props, body))


def _dead_letters(channel: Any, topo: Topology, n: int) -> list[tuple[Any, bytes]]:
    wait_for(lambda: _count(channel, topo.dead_letters.name) >= n, what=f"{n} dead letter(s)")
    return _drain(channel, topo.dead_letters.name)


def test_one_publish_gives_exactly_one_delivery(amqp_url: str, topology: Topology, run_in_thread) -> None:
    # Fail-over: the first URL refuses, the second is the broker.
    conn = Connection(urls=["amqp://guest:guest@127.0.0.1:1/%2F", amqp_url])
    pub = Publisher(conn, topology=topology)
    got: list[tuple[int, str | None]] = []
    q = topology.command_queue(topology.name("t.once"), Binding(topology.exec, "acc1"))
    consumer = Consumer(Connection(urls=[amqp_url]), q, lambda m, d: got.append((m.n, d.message_id)),
                        message_type=Ping, topology=topology)
    run_in_thread(consumer)
    assert consumer.ready.wait(10)
    mid = pub.publish(topology.exec, "acc1", Ping(n=1))
    # FIFO: every copy of the first publish would arrive before this sentinel.
    pub.publish(topology.exec, "acc1", Ping(n=2))
    wait_for(lambda: any(n == 2 for n, _ in got), what="the sentinel")
    assert [g for g in got if g[0] == 1] == [(1, mid)]
    assert conn.url == amqp_url
    conn.close()


def test_stream_publisher_confirms_every_message(amqp_url: str, topology: Topology, amqp_channel) -> None:
    q = topology.durable_queue(topology.name("t.stream"), Binding(topology.tick, "SHFE.*"))
    declare_queue_sync(amqp_channel, q)
    conn = Connection(urls=[amqp_url])
    sp = StreamPublisher(conn, topology=topology, batch_size=100)
    n = sp.publish_many((topology.tick, "SHFE.rb2512", Ping(n=i)) for i in range(1000))
    assert n == 1000 and sp.confirmed == 1000 and not sp._pending
    assert _count(amqp_channel, q.name) == 1000
    conn.close()


def test_unroutable_command_raises(amqp_url: str, topology: Topology) -> None:
    conn = Connection(urls=[amqp_url])
    pub = Publisher(conn, topology=topology)
    with pytest.raises(Unroutable) as err:
        pub.publish(topology.exec, "nobody-listens", Ping(n=1))
    assert topology.exec in str(err.value) and "nobody-listens" in str(err.value)
    assert err.value.exchange == topology.exec and err.value.routing_key == "nobody-listens"
    conn.close()


def test_malformed_message_is_dead_lettered_and_consumer_goes_on(amqp_url: str, topology: Topology,
                                                                 amqp_channel, run_in_thread) -> None:
    conn = Connection(urls=[amqp_url])
    pub = Publisher(conn, topology=topology)
    got: list[int] = []

    def handler(m: Ping, d: Delivery) -> None:
        if m.n == 13:
            raise Reject("unlucky number")
        got.append(m.n)

    q = topology.durable_queue(topology.name("t.bad"), Binding(topology.exec, "acc3"))
    consumer = Consumer(Connection(urls=[amqp_url]), q, handler, message_type=Ping, topology=topology)
    run_in_thread(consumer)
    assert consumer.ready.wait(10)
    pub.publish(topology.exec, "acc3", b"{not json")
    pub.publish(topology.exec, "acc3", b'{"schema": "t.ping", "n": 1, "extra": 5}')
    pub.publish(topology.exec, "acc3", Ping(n=13))
    pub.publish(topology.exec, "acc3", Ping(n=2))
    wait_for(lambda: got == [2], what="the good message")
    dead = _dead_letters(amqp_channel, topology, 3)
    reasons = [props.headers[ERROR_HEADER] for props, _ in dead]
    assert [body for _, body in dead][0] == b"{not json"
    assert "JSON" in reasons[0] and "extra" in reasons[1] and reasons[2] == "unlucky number"
    assert all(props.headers[ORIGINAL_ROUTING_KEY_HEADER] == "acc3" for props, _ in dead)
    wait_for(lambda: _count(amqp_channel, q.name) == 0, what="source queue drained")
    conn.close()


def test_handler_error_is_retried_then_dead_lettered(amqp_url: str, topology: Topology, amqp_channel,
                                                     run_in_thread) -> None:
    conn = Connection(urls=[amqp_url])
    pub = Publisher(conn, topology=topology)
    calls: list[int] = []

    def handler(m: Ping, d: Delivery) -> None:
        calls.append(m.n)
        if m.n == 1:
            raise ValueError("boom")

    q = topology.durable_queue(topology.name("t.retry"), Binding(topology.exec, "acc4"))
    consumer = Consumer(Connection(urls=[amqp_url]), q, handler, message_type=Ping, topology=topology,
                        max_attempts=3)
    run_in_thread(consumer)
    assert consumer.ready.wait(10)
    mid = pub.publish(topology.exec, "acc4", Ping(n=1))
    (props, body), = _dead_letters(amqp_channel, topology, 1)
    assert calls.count(1) == 3
    assert props.headers[ERROR_HEADER] == "ValueError: boom" and props.headers[ATTEMPTS_HEADER] == 3
    assert props.message_id == mid
    pub.publish(topology.exec, "acc4", Ping(n=2))
    wait_for(lambda: 2 in calls, what="the next message")
    conn.close()


def test_consumer_cancelled_by_broker_consumes_again(amqp_url: str, topology: Topology, amqp_channel,
                                                    run_in_thread) -> None:
    conn = Connection(urls=[amqp_url])
    pub = Publisher(conn, topology=topology)
    got: list[int] = []
    q = topology.durable_queue(topology.name("t.cancel"), Binding(topology.exec, "acc5"))
    consumer = Consumer(Connection(urls=[amqp_url]), q, lambda m, d: got.append(m.n), message_type=Ping,
                        topology=topology)
    run_in_thread(consumer)
    assert consumer.ready.wait(10)
    amqp_channel.queue_delete(q.name)
    wait_for(lambda: consumer.counts["restored"] >= 1 and consumer.ready.is_set(), what="re-consume")
    pub.publish(topology.exec, "acc5", Ping(n=1))
    wait_for(lambda: got == [1], what="delivery after the queue was re-declared")
    conn.close()


def test_on_idle_runs_on_the_consumers_thread_between_deliveries(amqp_url: str, topology: Topology,
                                                                  run_in_thread) -> None:
    conn = Connection(urls=[amqp_url])
    pub = Publisher(conn, topology=topology)
    idle: list[int] = []
    handled: list[int] = []
    q = topology.durable_queue(topology.name("t.idle"), Binding(topology.exec, "acc6"))
    consumer = Consumer(Connection(urls=[amqp_url]), q, lambda m, d: handled.append(threading.get_ident()),
                        message_type=Ping, topology=topology, on_idle=lambda: idle.append(threading.get_ident()),
                        idle_interval=0.05)
    run_in_thread(consumer)
    assert consumer.ready.wait(10)
    wait_for(lambda: len(idle) >= 3, what="on_idle called while no message comes")
    pub.publish(topology.exec, "acc6", Ping(n=1))
    wait_for(lambda: handled, what="the delivery")
    n = len(idle)
    wait_for(lambda: len(idle) > n, what="on_idle after the delivery")
    assert set(idle) == set(handled) == {consumer._thread}  # one thread: it may use the consumer's connection
    conn.close()


def test_late_binding_survives_connection_cut_and_broker_restart(amqp_url: str, restartable_topology: Topology,
                                                                 proxy, restart_broker, run_in_thread) -> None:
    topology = restartable_topology
    via_proxy = proxy.url(amqp_url)
    pub_conn = Connection(urls=[amqp_url])
    pub = Publisher(pub_conn, topology=topology)
    durable: list[tuple[int, bool]] = []
    live: list[int] = []
    in_handler, gate = threading.Event(), threading.Event()

    def durable_handler(m: Ping, d: Delivery) -> None:
        if m.n == 2 and not d.redelivered:
            in_handler.set()
            gate.wait(10)
        durable.append((m.n, d.redelivered))

    dq = topology.durable_queue(topology.name("t.durable"), Binding(topology.tick, "A.init"))
    lq = topology.live_queue(topology.name("t.live"), Binding(topology.tick, "A.init"))
    c1 = Consumer(Connection(urls=[via_proxy]), dq, durable_handler, message_type=Ping, topology=topology)
    c2 = Consumer(Connection(urls=[via_proxy]), lq, lambda m, d: live.append(m.n), message_type=Ping,
                  topology=topology)
    run_in_thread(c1)
    run_in_thread(c2)
    assert c1.ready.wait(10) and c2.ready.wait(10)
    c1.bind(topology.tick, "B.late")  # added after start, from another thread
    c2.bind(topology.tick, "B.late")

    pub.publish(topology.tick, "B.late", Ping(n=1))
    wait_for(lambda: (1, False) in durable and 1 in live, what="first message on the late binding")

    pub.publish(topology.tick, "B.late", Ping(n=2))
    assert in_handler.wait(10)
    assert proxy.cut() > 0  # the TCP connections die while message 2 is in the handler, unacked
    gate.set()
    wait_for(lambda: (2, True) in durable, what="in-flight message redelivered")
    wait_for(lambda: c2.ready.is_set() and c2.connection.reconnects >= 1, what="live consumer back")
    pub.publish(topology.tick, "B.late", Ping(n=3))
    wait_for(lambda: (3, False) in durable and 3 in live, what="late binding after the cut")

    restart_broker()
    # a live queue is exclusive: it exists again only once its consumer is back
    wait_for(lambda: c1.counts["restored"] >= 2 and c2.counts["restored"] >= 2 and c1.ready.is_set()
             and c2.ready.is_set(), timeout=20, what="both consumers restored after the restart")
    pub.publish(topology.tick, "B.late", Ping(n=4))  # the publisher reconnects by itself
    wait_for(lambda: 4 in [n for n, _ in durable] and 4 in live, timeout=20, what="late binding after a restart")
    assert sorted({n for n, _ in durable}) == [1, 2, 3, 4] and {1, 3, 4} <= set(live)
    assert c1.connection.reconnects >= 2 and c2.connection.reconnects >= 2
    check = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        wait_for(lambda: _count(check.channel(), dq.name) == 0, what="nothing left in the durable queue")
    finally:
        check.close()
    pub_conn.close()


def test_sigterm_drains_in_flight_message_and_exits_0(amqp_url: str, topology: Topology, amqp_channel,
                                                      tmp_path: Path) -> None:
    q = topology.durable_queue(topology.name("t.sigterm"), Binding(topology.exec, "acc6"))
    declare_queue_sync(amqp_channel, q)
    conn = Connection(urls=[amqp_url])
    pub = Publisher(conn, topology=topology)
    for n in (1, 2, 3):
        pub.publish(topology.exec, "acc6", Ping(n=n))
    log = tmp_path / "handled.txt"
    script = Path(__file__).with_name("consumer_proc.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(script), amqp_url, topology.namespace, q.name, str(log)], env=env)
    try:
        wait_for(lambda: log.exists() and "start 1" in log.read_text(), what="handler busy with message 1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log.read_text().split()
    assert log.read_text().splitlines() == ["start 1", "done 1"], lines
    # Message 1 was acked exactly once (not back in the queue); 2 and 3 were returned, not lost.
    left = sorted(int(body.split(b'"n":')[1].split(b",")[0].rstrip(b"}")) for _, body in _drain(amqp_channel, q.name))
    assert left == [2, 3]
    ok = amqp_channel.queue_declare(q.name, passive=True)
    assert ok.method.message_count == 0 and ok.method.consumer_count == 0
    conn.close()


def test_a_burst_goes_out_in_few_send_calls_and_arrives_intact(amqp_url: str, topology: Topology, amqp_channel) -> None:
    """pika sends each frame with its own send(); qapubsub joins what is buffered first (a message is
    three frames). With the pinned pika the patch must be in place, and every byte must still arrive."""
    from qapubsub import sync

    assert sync.PIKA_TUNED, "pika's transport layout changed: qapubsub.sync._tune_pika_transport"
    q = topology.durable_queue(topology.name("t.burst"), Binding(topology.exec, "burst"))
    declare_queue_sync(amqp_channel, q)
    conn = Connection(urls=[amqp_url])
    sp = StreamPublisher(conn, topology=topology, batch_size=1000, io_every=200)
    sp.publish(topology.exec, "burst", Ping(n=-1))   # opens the channel
    sp.flush()
    transport = conn.blocking._impl._transport  # noqa: SLF001 - count this connection's send() calls
    calls: list[int] = []
    send = transport._sigint_safe_send  # noqa: SLF001

    def counting(sock, data):  # noqa: ANN001, ANN202
        calls.append(len(data))
        return send(sock, data)

    transport._sigint_safe_send = counting  # noqa: SLF001
    try:
        for n in range(600):
            sp.publish(topology.exec, "burst", Ping(n=n))
        sp.flush()
    finally:
        del transport._sigint_safe_send
    assert len(calls) < 600, f"{len(calls)} send() calls for 600 messages (1,800 frames)"
    bodies = _drain(amqp_channel, q.name)
    from qapubsub.messages import decode

    assert [decode(b, Ping).n for _p, b in bodies] == [-1, *range(600)]
    amqp_channel.queue_delete(q.name)
    conn.close()


def test_an_idle_connection_outlives_its_heartbeat_timeout(amqp_url: str) -> None:
    """pika's heartbeat checker counts received bytes. qapubsub's receive path decodes frames
    itself, so it must count them too, or pika drops a healthy connection as dead at its first
    check (heartbeat + 5 s; with the default 60 s heartbeat a busy router lost its connection
    after 65 s and its batch in flight was redelivered)."""
    import time

    conn = Connection(urls=[amqp_url], heartbeat=1)
    try:
        blocking = conn.ensure()
        gen = conn.generation
        deadline = time.monotonic() + 8.0     # pika checks after 6 s: one check and a margin
        while time.monotonic() < deadline:
            blocking.process_data_events(time_limit=0.5)   # raises AMQPHeartbeatTimeout when dropped
        assert blocking.is_open and conn.generation == gen
    finally:
        conn.close()
