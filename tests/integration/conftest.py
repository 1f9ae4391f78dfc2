"""Fixtures for the sync transport tests: a TCP proxy that can cut connections, a broker
restart that always brings the node back, and consumers run in a thread and stopped after."""
from __future__ import annotations

import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

import pytest

from tests.tcpproxy import TCPProxy


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[TCPProxy]:
    parts = urllib.parse.urlsplit(amqp_url)
    with TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as p:
        yield p


def _amqp_answers(url: str) -> bool:
    import pika

    try:
        params = pika.URLParameters(url)
        params.socket_timeout = 1
        pika.BlockingConnection(params).close()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def restart_broker(amqp_url: str) -> Iterator[Callable[[], None]]:
    """Call it to stop_app/start_app the local node; it is started again whatever happens."""
    if urllib.parse.urlsplit(amqp_url).hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("broker restart only on the local node")
    stopped = False

    def restart() -> None:
        nonlocal stopped
        stopped = True
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not _amqp_answers(amqp_url):
            if time.monotonic() > deadline:
                raise AssertionError("RabbitMQ did not answer AMQP 30 s after start_app")
            time.sleep(0.2)
        stopped = False

    try:
        yield restart
    finally:
        if stopped or not _amqp_answers(amqp_url):
            subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=60)
            deadline = time.monotonic() + 30
            while not _amqp_answers(amqp_url) and time.monotonic() < deadline:
                time.sleep(0.2)


@pytest.fixture
def run_in_thread() -> Iterator[Callable[[object], threading.Thread]]:
    """Start ``consumer.run()`` in a thread; every started consumer is stopped and joined after the test."""
    started: list[tuple[object, threading.Thread]] = []
    errors: list[BaseException] = []

    def start(consumer: object) -> threading.Thread:
        def target() -> None:
            try:
                consumer.run()  # type: ignore[attr-defined]
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        t = threading.Thread(target=target, daemon=True)
        t.start()
        started.append((consumer, t))
        return t

    yield start
    for consumer, t in started:
        consumer.stop()  # type: ignore[attr-defined]
        t.join(15)
        assert not t.is_alive(), "consumer did not stop within 15 s"
        consumer.connection.close()  # type: ignore[attr-defined]
    assert not errors, f"consumer thread raised: {errors!r}"


@pytest.fixture
def restartable_topology(amqp_url: str, namespace: str) -> Iterator[object]:
    """Like ``topology`` but cleaned up over a fresh connection (its own may die in a broker restart)."""
    import pika

    from qapubsub.topology import Topology
    from tests.conftest import _delete_namespace

    topo = Topology(namespace)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    topo.declare_sync(conn.channel())
    conn.close()
    try:
        yield topo
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            _delete_namespace(conn, topo)
        finally:
            conn.close()
