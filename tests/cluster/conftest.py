"""Fixtures for the cluster tests: the three-node cluster of ``scripts/cluster.py``.

These tests run only when ``QA_CLUSTER_AMQP_URLS`` is set (``make cluster-test`` sources
``.qaflow/cluster.env``, written by ``make cluster-up``): they kill and restart cluster nodes,
so a plain ``make test`` never runs them by accident while someone's cluster is up. Where the
cluster is not configured or not answering they are skipped, and they FAIL when
``QA_CLUSTER_TEST`` (or ``CI``) is set. Every test restores all three nodes afterwards and
deletes its own namespace.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import logging

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import cluster as cl  # noqa: E402  (scripts/cluster.py)

logging.getLogger("pika").setLevel(logging.CRITICAL)  # nodes go down on purpose here
RESULTS = ROOT / ".qaflow" / "cluster-results.json"


def _missing(why: str) -> None:
    msg = f"RabbitMQ cluster not available ({why}); run `make cluster-up` then `make cluster-test`"
    if os.environ.get("QA_CLUSTER_TEST") or os.environ.get("CI"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@dataclass
class Cluster:
    urls: list[str]
    mgmt_urls: list[str]
    nodes: list[Any]  # scripts/cluster.py Node
    events: list[str] = field(default_factory=list)

    def node(self, name: str) -> Any:
        return next(n for n in self.nodes if n.node == name or n.name == name)

    def url_of(self, name: str) -> str:
        return self.node(name).amqp_url

    def urls_from(self, first: str) -> str:
        """All node URLs, ``first`` first (a client connects to it and fails over to the others)."""
        f = self.url_of(first)
        return ",".join([f, *(u for u in self.urls if u != f)])

    def mgmt(self) -> Any:
        from qapubsub.management import Management

        return Management(self.urls[0], base_url=",".join(self.mgmt_urls))

    def queue(self, name: str) -> dict[str, Any]:
        import urllib.parse

        return dict(self.mgmt().get(f"/api/queues/%2F/{urllib.parse.quote(name, safe='')}"))

    def kill(self, name: str) -> None:
        cl.stop_node(self.node(name), kill=True)
        self.events.append(f"{time.time():.3f} kill -9 {name}")

    def stop(self, name: str) -> None:
        cl.stop_node(self.node(name))
        self.events.append(f"{time.time():.3f} stop {name}")

    def start(self, name: str) -> None:
        cl.start_node(self.node(name))
        self.events.append(f"{time.time():.3f} start {name}")

    def wait_members_online(self, queues: list[str], timeout: float = 90) -> None:
        """Every quorum queue in ``queues`` has all its members online (after a node came back)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok = all(set(q.get("online") or []) >= set(q.get("members") or [1]) and q.get("leader")
                         for q in (self.queue(n) for n in queues))
            except Exception:  # noqa: BLE001 - the management API of a restarting node
                ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"quorum members of {queues} not all online after {timeout} s")
            time.sleep(0.5)

    def restore(self) -> None:
        for n in self.nodes:
            if cl.node_pid(n) is None or not cl.amqp_ok(n.amqp_url):
                cl.start_node(n)


def record(test: str, **figures: Any) -> None:
    """Keep the figures of a run (pauses, counts) in .qaflow/cluster-results.json and print them."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[test] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))
    print(f"\n[cluster] {test}: {json.dumps(figures)}")


@pytest.fixture(scope="session")
def cluster_session() -> Cluster:
    urls = [u for u in os.environ.get("QA_CLUSTER_AMQP_URLS", "").split(",") if u]
    if not urls:
        _missing("QA_CLUSTER_AMQP_URLS is not set")
    nodes = cl.cluster_nodes()
    down = [n.node for n in nodes if not cl.amqp_ok(n.amqp_url)]
    if down:
        _missing(f"nodes not answering: {', '.join(down)}")
    mgmt = [u for u in os.environ.get("QA_CLUSTER_MANAGEMENT_URLS", "").split(",") if u] or [n.mgmt_url for n in nodes]
    return Cluster(urls, mgmt, nodes)


@pytest.fixture
def cluster(cluster_session: Cluster) -> Iterator[Cluster]:
    cluster_session.restore()
    cluster_session.events = []
    yield cluster_session
    cluster_session.restore()


@pytest.fixture(scope="session")
def mongo_url() -> str:
    import pymongo

    url = os.environ.get("QA_TEST_MONGO_URL") or os.environ.get("QA_MONGO_URL") or ""
    try:
        client = pymongo.MongoClient(url or "mongodb://127.0.0.1:27017/?directConnection=true",
                                     serverSelectionTimeoutMS=2000)
        client.admin.command("ping")
        client.close()
    except Exception as exc:  # noqa: BLE001
        _missing(f"MongoDB-wire server not reachable: {exc}")
    return url


@pytest.fixture
def mongo_db(mongo_url: str) -> Iterator[Any]:
    import pymongo

    client = pymongo.MongoClient(mongo_url)
    name = f"tc_{uuid.uuid4().hex[:10]}"
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


@pytest.fixture
def ctopo(cluster: Cluster) -> Iterator[Any]:
    """This test's namespace; everything with its prefix is deleted afterwards (over any live node)."""
    import pika

    from qapubsub.topology import Topology

    topo = Topology(f"tc-{uuid.uuid4().hex[:8]}.")
    yield topo
    cluster.restore()
    conn = pika.BlockingConnection(pika.URLParameters(cluster.urls[0]))
    try:
        ch = conn.channel()
        mgmt = cluster.mgmt()
        for name in list(mgmt.queues()):
            if name.startswith(topo.namespace):
                ch.queue_delete(name)
        for name in list(mgmt.exchanges()):
            if name.startswith(topo.namespace):
                ch.exchange_delete(name)
    finally:
        conn.close()
