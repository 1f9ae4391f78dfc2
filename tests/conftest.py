"""Shared fixtures.

Servers: ``QA_TEST_AMQP_URL`` / ``QA_TEST_MONGO_URL``, else ``QA_AMQP_URL`` / ``QA_MONGO_URL``
(``make test`` exports the ones its set-up found or started), else the local defaults.
Where a server is not reachable a test that needs it is skipped locally and FAILS when
``CI`` is set. Every test gets its own uuid-suffixed namespace and database, removed after.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from qapubsub.settings import DEFAULT_AMQP_URL, DEFAULT_MONGO_URL
from qapubsub.topology import Topology

IN_CI = bool(os.environ.get("CI"))

# The cluster suite has its own target, `make cluster-test` (three RabbitMQ nodes, it kills them):
# `make test` does not collect it.
collect_ignore = [] if os.environ.get("QA_CLUSTER_TEST") else ["cluster"]


def _missing(what: str, why: str) -> None:
    msg = f"{what} is not reachable ({why}); run `make test`, which starts one"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _amqp_url() -> str:
    return (os.environ.get("QA_TEST_AMQP_URL") or os.environ.get("QA_AMQP_URL") or DEFAULT_AMQP_URL).split(",")[0]


def _mongo_url() -> str:
    return os.environ.get("QA_TEST_MONGO_URL") or os.environ.get("QA_MONGO_URL") or DEFAULT_MONGO_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    import pika

    url = _amqp_url()
    try:
        params = pika.URLParameters(url)
        params.socket_timeout = 3
        pika.BlockingConnection(params).close()
    except Exception as exc:  # noqa: BLE001
        _missing("RabbitMQ", f"{type(exc).__name__}: {exc}")
    return url


@pytest.fixture(scope="session")
def mongo_url() -> str:
    import pymongo

    url = _mongo_url()
    try:
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=2000)
        client.admin.command("ping")
        client.close()
    except Exception as exc:  # noqa: BLE001
        _missing("MongoDB-wire server", f"{type(exc).__name__}: {exc}")
    return url


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:10]}."


@pytest.fixture
def amqp_channel(amqp_url: str) -> Iterator[object]:
    """A pika channel for the test's own inspection (not for the code under test)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


@pytest.fixture
def topology(amqp_url: str, namespace: str) -> Iterator[Topology]:
    """This test's own topology, declared on the real broker and deleted afterwards."""
    import pika

    topo = Topology(namespace)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    topo.declare_sync(conn.channel())
    try:
        yield topo
    finally:
        _delete_namespace(conn, topo)
        conn.close()


def _delete_namespace(conn: object, topo: Topology) -> None:
    """Delete every queue and exchange whose name starts with the test's namespace."""
    from qapubsub.management import Management, ManagementError

    ch = conn.channel()  # type: ignore[attr-defined]
    names: list[str] = [q.name for q in topo.platform_queues]
    exchanges: list[str] = [ex.name for ex in topo.exchanges]
    try:  # queues and exchanges made later by the test are found by their prefix
        mgmt = Management(_amqp_url())
        names += [n for n in mgmt.queues() if n.startswith(topo.namespace)]
        exchanges += [n for n in mgmt.exchanges() if n.startswith(topo.namespace)]
    except ManagementError:
        pass
    for name in dict.fromkeys(names):
        ch.queue_delete(name)
    for name in dict.fromkeys(exchanges):
        ch.exchange_delete(name)


@pytest.fixture
def mongo_db(mongo_url: str) -> Iterator[object]:
    """A fresh pymongo Database, dropped afterwards."""
    import pymongo

    client = pymongo.MongoClient(mongo_url)
    name = f"t_{uuid.uuid4().hex[:10]}"
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()
