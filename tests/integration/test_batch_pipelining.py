"""BatchConsumer with batches in flight (``pipeline_depth``), against the real broker.

The handler returns futures and the test decides when each is done: a batch must be
acknowledged only once it *and every batch before it* are done, and a failed batch must
bring back every later batch in flight too.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest

from qapubsub.batch import BatchConsumer
from qapubsub.handling import Transient
from qapubsub.messages import Message
from qapubsub.sync import Connection, StreamPublisher
from qapubsub.topology import Binding, Topology
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


class Ping(Message, tag="t.pping", forbid_unknown_fields=True):
    n: int


def _depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def _consume(amqp_url: str, topology: Topology, q: Any, handler: Any, run_in_thread: Any,
             **kw: Any) -> tuple[BatchConsumer, Any]:
    """A BatchConsumer of Pings on ``q`` (prefetch 100), running in a thread: (consumer, thread)."""
    consumer = BatchConsumer(Connection(urls=[amqp_url]), q, handler, message_type=Ping, topology=topology,
                             prefetch=100, **kw)
    t = run_in_thread(consumer)
    assert consumer.ready.wait(10)
    return consumer, t


def _send(amqp_url: str, topology: Topology, key: str, n: int) -> StreamPublisher:
    """Pings 0..n-1 to qa.exec with ``key``, confirmed; returns the publisher (its connection to close)."""
    pub = StreamPublisher(Connection(urls=[amqp_url]), topology=topology)
    for i in range(n):
        pub.publish(topology.exec, key, Ping(n=i))
    pub.flush()
    return pub


def test_batches_are_acked_in_order_and_a_failure_brings_back_every_later_batch(
        amqp_url: str, topology: Topology, amqp_channel, run_in_thread) -> None:
    q = topology.durable_queue(topology.name("t.pipelined"), Binding(topology.exec, "pp"))
    lock = threading.Lock()
    handed: list[tuple[list[tuple[int, bool]], Future[Any]]] = []
    auto = threading.Event()   # later deliveries: done at once

    def handler(items):  # noqa: ANN001, ANN202
        fut: Future[Any] = Future()
        with lock:
            handed.append(([(m.n, d.redelivered) for m, d in items], fut))
        if auto.is_set():
            fut.set_result({})
        return fut

    consumer, _t = _consume(amqp_url, topology, q, handler, run_in_thread, batch_size=10, batch_wait=0.05,
                            pipeline_depth=3)
    pub = _send(amqp_url, topology, "pp", 30)
    wait_for(lambda: len(handed) == 3, what="three batches handed over")
    assert sorted(n for b, _f in handed for n, _r in b) == list(range(30))
    # batches 2 and 3 done, batch 1 not: nothing may be acknowledged yet
    handed[1][1].set_result({})
    handed[2][1].set_result({})
    auto.set()
    handed[0][1].set_exception(Transient("the store went away"))
    # so all 30 come back (had 2 or 3 been acked ahead of 1, their messages would be gone)
    wait_for(lambda: sum(1 for b, _f in handed[3:] for _n, r in b if r) >= 30, timeout=20,
             what="every message of the three batches redelivered")
    again = sorted(n for b, _f in handed[3:] for n, r in b if r)
    assert again == list(range(30))
    wait_for(lambda: consumer.counts["acked"] >= 30, what="the redelivered batches acknowledged")
    assert consumer.counts["aborted"] == 1 and consumer.counts["requeued"] == 30
    consumer.stop()
    wait_for(lambda: not consumer.ready.is_set(), what="consumer stopped")
    assert _depth(amqp_channel, q.name) == 0   # nothing left, nothing requeued at close: all acked
    amqp_channel.queue_delete(q.name)
    pub.connection.close()


def test_stopping_waits_for_the_batches_in_flight(amqp_url: str, topology: Topology, amqp_channel,
                                                  run_in_thread) -> None:
    q = topology.durable_queue(topology.name("t.pipelined.stop"), Binding(topology.exec, "ps"))
    handed: list[Future[Any]] = []

    def handler(items):  # noqa: ANN001, ANN202
        fut: Future[Any] = Future()
        handed.append(fut)
        return fut

    consumer, t = _consume(amqp_url, topology, q, handler, run_in_thread, batch_size=5, batch_wait=0.05,
                           pipeline_depth=4)
    pub = _send(amqp_url, topology, "ps", 10)
    wait_for(lambda: len(handed) == 2, what="two batches in flight")
    consumer.stop()
    assert t.is_alive()   # it cannot stop with work in flight ...
    threading.Timer(0.3, lambda: [f.set_result({}) for f in handed]).start()
    t.join(15)
    assert not t.is_alive()   # ... and stops once it is done, everything acked
    assert consumer.counts["acked"] == 10 and _depth(amqp_channel, q.name) == 0
    amqp_channel.queue_delete(q.name)
    pub.connection.close()


def test_a_poison_message_is_isolated_and_dead_lettered_with_batches_in_flight(
        amqp_url: str, topology: Topology, amqp_channel, run_in_thread) -> None:
    from qapubsub.errors import Backoff
    from qapubsub.handling import ERROR_HEADER

    q = topology.durable_queue(topology.name("t.pipelined.poison"), Binding(topology.exec, "pz"))
    handled: list[int] = []
    lock = threading.Lock()

    def handler(items):  # noqa: ANN001, ANN202
        if any(m.n == 13 for m, _d in items):
            raise ValueError("poison: n=13")
        fut: Future[Any] = Future()
        threading.Timer(0.01, lambda: (lock.acquire(), handled.extend(m.n for m, _d in items), lock.release(),
                                       fut.set_result({}))).start()
        return fut

    consumer, _t = _consume(amqp_url, topology, q, handler, run_in_thread, batch_size=5, batch_wait=0.02,
                            pipeline_depth=4, retry_backoff=Backoff(interval_start=0.01, interval_max=0.05))
    pub = _send(amqp_url, topology, "pz", 30)
    wait_for(lambda: _depth(amqp_channel, topology.dead_letters.name) >= 1, timeout=30, what="the poison dead-lettered")
    wait_for(lambda: consumer.counts["acked"] >= 30, timeout=20, what="everything acked or dead-lettered")
    with lock:
        assert sorted(set(handled)) == [n for n in range(30) if n != 13]
    method, props, body = amqp_channel.basic_get(topology.dead_letters.name, auto_ack=True)
    assert method is not None and "poison: n=13" in props.headers[ERROR_HEADER]
    assert _depth(amqp_channel, topology.dead_letters.name) == 0
    consumer.stop()
    amqp_channel.queue_delete(q.name)
    pub.connection.close()


def test_a_batch_that_fails_because_an_earlier_one_failed_is_requeued_with_it(
        amqp_url: str, topology: Topology, amqp_channel, run_in_thread) -> None:
    """The tickhandler refuses a batch while an earlier one is known not stored: the refused
    batch was already taken out of the collection, so the requeue of the earlier ones must
    not leave it unacked (the next multiple-ack would then cover it, unhandled)."""
    from qapubsub.errors import Backoff

    q = topology.durable_queue(topology.name("t.pipelined.after"), Binding(topology.exec, "pa"))
    lock = threading.Lock()
    calls: list[list[tuple[int, bool]]] = []
    first: list[Future[Any]] = []

    def handler(items):  # noqa: ANN001, ANN202
        with lock:
            calls.append([(m.n, d.redelivered) for m, d in items])
            n_calls = len(calls)
        if n_calls == 1:
            fut: Future[Any] = Future()
            first.append(fut)
            return fut
        if n_calls == 2:   # the first one's write fails now, and this one is refused because of it
            first[0].set_exception(Transient("the store went away"))
            raise Transient("an earlier batch was not stored")
        return {}

    consumer, _t = _consume(amqp_url, topology, q, handler, run_in_thread, batch_size=10, batch_wait=0.05,
                            pipeline_depth=3, retry_backoff=Backoff(interval_start=0.01, interval_max=0.05))
    pub = _send(amqp_url, topology, "pa", 20)

    def again() -> list[int]:
        with lock:
            return sorted(n for c in calls[2:] for n, r in c if r)

    wait_for(lambda: len(again()) >= 20, timeout=20, what="both batches redelivered")
    assert again() == list(range(20))
    with lock:
        assert sorted(n for c in calls[:2] for n, _r in c) == list(range(20))
    wait_for(lambda: consumer.counts["acked"] >= 20, what="the redelivered messages acknowledged")
    assert consumer.counts["requeued"] == 20
    consumer.stop()
    wait_for(lambda: not consumer.ready.is_set(), what="consumer stopped")
    assert _depth(amqp_channel, q.name) == 0
    amqp_channel.queue_delete(q.name)
    pub.connection.close()

