"""qapubsub.aio against the real broker: delivery guarantees, restore after a cut, dead-lettering."""
from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from qapubsub import handling
from qapubsub.aio import CommandPublisher, Connection, Consumer, Delivery, MarketDataPublisher, Unroutable
from qapubsub.management import Management
from qapubsub.messages import Message
from qapubsub.topology import Binding, Topology
from tests.helpers import await_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class TOrder(Message, tag="test.order", forbid_unknown_fields=True):
    account: str
    volume: int


class TTick(Message, tag="test.tick"):
    symbol: str
    price: float


@pytest.fixture
async def conn(amqp_url: str, topology: Topology) -> AsyncIterator[Connection]:
    c = Connection([amqp_url], name=f"{topology.namespace}aio-test")
    await c.start(timeout=15)
    await c.declare(topology, queues=())  # exchanges re-declared after a reconnect
    try:
        yield c
    finally:
        await c.close()


def _get_all(channel: Any, queue: str) -> list[tuple[Any, bytes]]:
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((props, body))


def _cut_connection(amqp_url: str, name: str) -> bool:
    """Force-close our client's connection from the broker side (management API)."""
    mgmt = Management(amqp_url)
    conns = mgmt.get("/api/connections?columns=name,client_properties")
    found = False
    for c in conns:
        if (c.get("client_properties") or {}).get("connection_name") == name:
            req = urllib.request.Request(
                f"{mgmt.base}/api/connections/{urllib.parse.quote(c['name'], safe='')}", method="DELETE",
                headers={"Authorization": mgmt._auth, "X-Reason": "test cuts the connection"})
            with urllib.request.urlopen(req, timeout=5):  # noqa: S310 - loopback management API
                found = True
    return found


async def test_one_confirmed_publish_gives_exactly_one_delivery(conn: Connection, topology: Topology) -> None:
    got: list[tuple[str, bool]] = []

    async def handler(order: TOrder, d: Delivery) -> None:
        got.append((order.id, d.redelivered))

    q = topology.command_queue(topology.name("aio.orders"), Binding(topology.order, "acc1"))
    consumer = await Consumer(conn, q, handler, type_=TOrder, prefetch=50).start()
    pub = await CommandPublisher(conn).start()
    sent = [TOrder(account="acc1", volume=i + 1) for i in range(30)]
    for o in sent:
        await pub.publish(topology.order, "acc1", o)
    sentinel = TOrder(account="acc1", volume=999)
    await pub.publish(topology.order, "acc1", sentinel)
    await await_for(lambda: any(i == sentinel.id for i, _ in got), timeout=10, what="the sentinel order")
    ids = [i for i, _ in got]
    assert ids == [o.id for o in sent] + [sentinel.id]  # each once, in order, nothing extra before the sentinel
    assert pub.published == 31 and pub.retries == 0
    await await_for(lambda: consumer.stats["acked"] == 31, timeout=5, what="all acked")


async def test_unroutable_command_raises(conn: Connection, topology: Topology) -> None:
    pub = await CommandPublisher(conn, attempts=2).start()
    with pytest.raises(Unroutable, match="nobody"):
        await pub.publish(topology.exec, "nobody", TOrder(account="nobody", volume=1))
    assert pub.published == 0
    # the channel is still usable afterwards
    q = topology.command_queue(topology.name("aio.exec.a1"), Binding(topology.exec, "a1"))
    await conn.declare(queues=[q])
    await pub.publish(topology.exec, "a1", TOrder(account="a1", volume=1))
    assert pub.published == 1


@pytest.mark.parametrize("cut", ["tcp", "broker"])
async def test_bind_after_start_survives_a_connection_cut_and_unacked_is_redelivered(
        cut: str, topology: Topology, amqp_url: str) -> None:
    """tcp: tests/tcpproxy.py breaks the sockets; broker: RabbitMQ force-closes the connection."""
    from tests.tcpproxy import TCPProxy

    parts = urllib.parse.urlsplit(amqp_url)
    with TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        url = proxy.url(amqp_url) if cut == "tcp" else amqp_url
        conn = await Connection([url], name=f"{topology.namespace}aio-cut").start(timeout=15)
        try:
            await _cut_scenario(conn, topology, amqp_url,
                                (lambda: proxy.cut() > 0) if cut == "tcp" else (lambda: _cut_connection(amqp_url, conn.name)))
        finally:
            await conn.close()


async def _cut_scenario(conn: Connection, topology: Topology, amqp_url: str, do_cut: Any) -> None:
    release = asyncio.Event()
    seen: list[tuple[str, bool]] = []

    async def handler(tick: TTick, d: Delivery) -> None:
        seen.append((tick.symbol, d.redelivered))
        if tick.symbol == "rb2512" and not d.redelivered:
            await release.wait()  # in flight, unacked, when the connection is cut

    q = topology.durable_queue(topology.name("aio.ticks"))  # no binding at start
    consumer = await Consumer(conn, q, handler, type_=TTick, prefetch=10, ack_every=5).start()
    await consumer.bind(topology.tick, "SHFE.rb2512")  # added after start
    pub = await CommandPublisher(conn).start()
    await pub.publish(topology.tick, "SHFE.rb2512", TTick(symbol="rb2512", price=3925.0), persistent=True)
    await await_for(lambda: seen == [("rb2512", False)], timeout=10, what="first delivery in flight")

    await await_for(do_cut, timeout=15, what="cutting our connection")
    await await_for(lambda: conn.reconnects >= 1 and conn.is_connected, timeout=15, what="reconnect")
    release.set()  # the old delivery's ack goes nowhere: its channel is gone

    await await_for(lambda: ("rb2512", True) in seen, timeout=10, what="redelivery of the unacked tick")
    # the late binding was restored: a mandatory publish on it routes (Unroutable otherwise)
    await pub.publish(topology.tick, "SHFE.rb2512", TTick(symbol="rb2512b", price=1.0), persistent=True)
    await await_for(lambda: ("rb2512b", False) in seen, timeout=10, what="tick after reconnect")
    await await_for(lambda: consumer.stats["acked"] >= 2, timeout=5, what="acks flushed")
    assert [s for s in seen if s[0] == "rb2512"] == [("rb2512", False), ("rb2512", True)]
    b = Management(amqp_url).get(
        f"/api/queues/%2F/{urllib.parse.quote(consumer.name, safe='')}/bindings")
    assert any(x["source"] == topology.tick and x["routing_key"] == "SHFE.rb2512" for x in b)


async def test_malformed_goes_to_dead_letters_with_reason_and_consumer_continues(
        conn: Connection, topology: Topology, amqp_channel: Any) -> None:
    good: list[str] = []

    async def handler(tick: TTick, d: Delivery) -> None:
        good.append(tick.symbol)

    q = topology.durable_queue(topology.name("aio.md"), Binding(topology.tick, "SHFE.*"))
    consumer = await Consumer(conn, q, handler, type_=TTick).start()
    md = await MarketDataPublisher(conn, topology.tick, max_in_flight=100).start()
    await md.publish("SHFE.bad", b"{not json", properties={"message_id": "bad-1"})
    await md.publish("SHFE.bad", b'{"schema":"test.tick","symbol":1}', properties={"message_id": "bad-2"})
    await md.publish("SHFE.ok", TTick(symbol="ok", price=1.0))
    await md.flush()
    await await_for(lambda: good == ["ok"], timeout=10, what="the valid tick after two malformed ones")
    dead: list[tuple[Any, bytes]] = []
    await await_for(lambda: dead.extend(_get_all(amqp_channel, topology.dead_letters.name)) or len(dead) >= 2,
                    timeout=10, what="two dead letters")
    by_id = {p.message_id: (p, b) for p, b in dead}
    assert by_id["bad-1"][1] == b"{not json"
    assert "not valid JSON" in by_id["bad-1"][0].headers[handling.ERROR_HEADER]
    assert "invalid message" in by_id["bad-2"][0].headers[handling.ERROR_HEADER]
    h = by_id["bad-2"][0].headers
    assert h[handling.QUEUE_HEADER] == q.name and h[handling.ORIGINAL_ROUTING_KEY_HEADER] == "SHFE.bad"
    assert consumer.stats["dead_lettered"] == 2


async def test_handler_error_is_retried_then_dead_lettered(conn: Connection, topology: Topology,
                                                           amqp_channel: Any) -> None:
    calls: list[str] = []

    async def handler(order: TOrder, d: Delivery) -> None:
        calls.append(order.account)
        if order.account == "poison":
            raise ValueError("cannot place this order")
        if order.account == "invalid":
            raise handling.Reject("volume over the limit")

    q = topology.command_queue(topology.name("aio.retry"), Binding(topology.order, "#"))
    consumer = await Consumer(conn, q, handler, type_=TOrder, max_attempts=3).start()
    pub = await CommandPublisher(conn).start()
    await pub.publish(topology.order, "poison", TOrder(account="poison", volume=1))
    await pub.publish(topology.order, "invalid", TOrder(account="invalid", volume=1))
    await pub.publish(topology.order, "fine", TOrder(account="fine", volume=1))
    await await_for(lambda: calls.count("poison") == 3 and "fine" in calls, timeout=10, what="3 tries, then next")
    dead: list[tuple[Any, bytes]] = []
    await await_for(lambda: dead.extend(_get_all(amqp_channel, topology.dead_letters.name)) or len(dead) >= 2,
                    timeout=10, what="two dead letters")
    reasons = {json.loads(b)["account"]: p.headers for p, b in dead}
    assert reasons["poison"][handling.ERROR_HEADER] == "ValueError: cannot place this order"
    assert reasons["poison"][handling.ATTEMPTS_HEADER] == 3
    assert reasons["invalid"][handling.ERROR_HEADER] == "volume over the limit"
    assert calls.count("invalid") == 1 and calls.count("fine") == 1
    assert consumer.stats["requeued"] == 2 and consumer.stats["dead_lettered"] == 2


async def test_fails_over_to_the_next_url(amqp_url: str, topology: Topology) -> None:
    parts = urllib.parse.urlsplit(amqp_url)
    dead_url = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:1"))
    from qapubsub.aio import Backoff
    c = Connection([dead_url, amqp_url], name=f"{topology.namespace}failover", backoff=Backoff(interval_start=0.05, interval_max=0.2))
    try:
        await c.start(timeout=10)
        assert c.url_index % 2 == 1
    finally:
        await c.close()

