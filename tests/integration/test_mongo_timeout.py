"""A MongoDB server that stops answering must not stall a daemon for good (qapubsub.settings.mongo_client)."""
from __future__ import annotations

import time

import pymongo
import pymongo.errors
import pytest

from qapubsub import settings as qs
from tests.tcpproxy import TCPProxy

pytestmark = pytest.mark.integration


def test_a_silent_server_ends_in_a_network_timeout_not_a_hang(mongo_url: str, monkeypatch) -> None:
    host_port = mongo_url.split("://", 1)[1].split("/", 1)[0]
    port = int(host_port.rsplit(":", 1)[1])
    monkeypatch.setattr(qs, "MONGO_SOCKET_TIMEOUT_MS", 1500)
    with TCPProxy("127.0.0.1", port) as proxy:
        url = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
        client = qs.mongo_client(url, server_selection_ms=3000)
        try:
            coll = client["t_mongo_timeout"]["c"]
            coll.insert_one({"x": 1})            # the connection is up and answering
            proxy.hold()                         # now it stays open and answers nothing
            t0 = time.monotonic()
            with pytest.raises(pymongo.errors.NetworkTimeout):
                coll.insert_one({"x": 2})
            assert time.monotonic() - t0 < 10    # without a socket timeout pymongo waits forever
            proxy.release()
        finally:
            client.drop_database("t_mongo_timeout")
            client.close()


def test_the_url_can_set_its_own_socket_timeout() -> None:
    s = qs.Settings(mongo_url="mongodb://127.0.0.1:1/?directConnection=true&socketTimeoutMS=1234")
    client = qs.mongo_client(s)
    try:
        assert client.options.pool_options.socket_timeout == pytest.approx(1.234)
    finally:
        client.close()
    client = qs.mongo_client(qs.Settings(mongo_url="mongodb://127.0.0.1:1/?directConnection=true"))
    try:
        assert client.options.pool_options.socket_timeout == pytest.approx(qs.MONGO_SOCKET_TIMEOUT_MS / 1000)
        assert client.options.server_selection_timeout == pytest.approx(5.0)
    finally:
        client.close()
