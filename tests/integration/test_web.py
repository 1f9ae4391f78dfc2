"""The web daemon as a real subprocess against the real broker and MongoDB-wire server.

WebSocket quotes (full snapshot, then diffs), the account stream with token coverage,
REST reads, POST /api/orders (auth, published to qaorder), /readyz with MongoDB down,
and SIGTERM -> exit 0.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qamarket.models import Bar, Tick
from qapubsub import keys
from qapubsub.messages import encode
from tests import daemons
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

TOKENS = json.dumps({"tok-acc1-xxxxxxxx": ["acc1"], "tok-admin-xxxxxxx": "*"})
T0 = 1740992400500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Web:
    def __init__(self, proc: Any, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        return self.request("GET", path, token=token)

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()


def start_web(tmp_path: Path, env: dict[str, str], *extra: str) -> Web:
    port = free_port()
    log = tmp_path / f"web-{port}.log"
    proc = daemons.start("handlers.web", "--port", str(port), "--drop-after", "2", *extra, env=env, log=log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"web daemon exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(up, timeout=30, what="web daemon /healthz")
    return Web(proc, port, log)


@pytest.fixture
def web_env(topology: Any, mongo_db: Any, amqp_url: str, mongo_url: str) -> dict[str, str]:
    return {"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_MONGO_DB": mongo_db.name,
            "QA_NAMESPACE": topology.namespace, "QA_WEB_TOKENS": TOKENS, "QA_WEB_TOKEN": ""}


@pytest.fixture
def web(tmp_path: Path, web_env: dict[str, str]) -> Iterator[Web]:
    w = start_web(tmp_path, web_env)
    try:
        yield w
    finally:
        code = daemons.stop(w.proc)
        assert code == 0, f"web daemon exited {code} on SIGTERM: {w.log.read_text()[-2000:]}"


def tick(price: float, n: int = 0, symbol: str = "rb2605", exchange: str = "SHFE") -> Tick:
    return Tick(symbol=symbol, exchange=exchange, datetime=T0 + 500 * n, last_price=price, volume=10 + n,  # type: ignore[arg-type]
                bid_price_1=price - 1, ask_price_1=price + 1, bid_volume_1=3, ask_volume_1=4, trading_day="20250303")


async def ws_connect(web: Web, token: str | None = None) -> Any:
    from tornado.websocket import websocket_connect

    url = f"ws://127.0.0.1:{web.port}/ws" + (f"?token={token}" if token else "")
    return await websocket_connect(url)


async def recv(ws: Any, aid: str, timeout: float = 10.0) -> dict[str, Any]:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {aid} message within {timeout} s")
        raw = await asyncio.wait_for(ws.read_message(), left)
        if raw is None:
            raise AssertionError(f"socket closed while waiting for {aid}: {ws.close_code} {ws.close_reason}")
        msg = json.loads(raw)
        if msg.get("aid") == aid:
            return msg


async def test_ws_quotes_full_snapshot_then_diffs(web: Web, topology: Any, amqp_channel: Any) -> None:
    ws = await ws_connect(web)
    ws.write_message(json.dumps({"aid": "subscribe_quote", "ins_list": "rb2605,SHFE.au2606,zz9999"}))
    res = await recv(ws, "subscribe_quote_result")
    assert res["ins_list"] == ["SHFE.rb2605", "SHFE.au2606"]
    assert "zz9999" in res["ignored"]
    amqp_channel.basic_publish(topology.tick, keys.tick_key("SHFE", "rb2605"), encode(tick(3900)))
    first = await recv(ws, "rtn_data")
    q = first["data"][0]["quotes"]["SHFE.rb2605"]
    assert q["last_price"] == 3900 and q["bid_price1"] == 3899 and q["instrument_id"] == "SHFE.rb2605"
    assert len(q) > 30 and first["origin_ns"] > 0                     # the full quote
    amqp_channel.basic_publish(topology.tick, keys.tick_key("SHFE", "rb2605"), encode(tick(3901, 1)))
    second = await recv(ws, "rtn_data")
    assert second["data"][0]["quotes"]["SHFE.rb2605"] == {
        "last_price": 3901, "bid_price1": 3900, "ask_price1": 3902, "volume": 11,
        "datetime": "2025-03-03 09:00:01.000"}                          # only what changed
    # a tick of an instrument nobody subscribed is not even bound
    amqp_channel.basic_publish(topology.tick, keys.tick_key("DCE", "m2605"), encode(tick(3000, symbol="m2605",
                                                                                         exchange="DCE")))
    # a second client gets the current full quote at once (from the book)
    ws2 = await ws_connect(web)
    ws2.write_message(json.dumps({"aid": "subscribe_quote", "ins_list": ["rb2605"]}))
    snap = await recv(ws2, "rtn_data")
    assert snap["data"][0]["quotes"]["SHFE.rb2605"]["last_price"] == 3901
    assert len(snap["data"][0]["quotes"]["SHFE.rb2605"]) > 30
    ws.close()
    ws2.close()
    status, metrics = web.get("/metrics")
    assert status == 200 and "qaflow_web_consumed_total{stream=\"tick\"} 2.0" in metrics
    assert "DCE.m2605" not in metrics


async def test_account_stream_respects_token_coverage(web: Web, topology: Any, amqp_channel: Any,
                                                      mongo_db: Any) -> None:
    mongo_db["accounts"].insert_one({"_id": "acc1", "account_cookie": "acc1", "trading_day": "20250303",
                                     "accounts": {"balance": 1_000_000.0, "available": 990_000.0},
                                     "positions": {}, "orders": {}, "trades": {}})
    ws = await ws_connect(web)
    ws.write_message(json.dumps({"aid": "subscribe_account", "accounts": "acc1,acc2", "token": "tok-acc1-xxxxxxxx"}))
    res = await recv(ws, "subscribe_account_result")
    assert res["accounts"] == ["acc1"] and set(res["ignored"]) == {"acc2"}
    snap = await recv(ws, "rtn_data")
    assert snap["data"][0]["trade"]["acc1"]["accounts"]["balance"] == 1_000_000
    body = {"schema": "qa.order_status", "order_id": "o-1", "account": "acc1", "status": "NOTTRADED", "traded": 0}
    amqp_channel.basic_publish(topology.report, keys.report_key("acc1", "order"), json.dumps(body).encode())
    amqp_channel.basic_publish(topology.report, keys.report_key("acc2", "order"),
                               json.dumps({**body, "order_id": "o-2", "account": "acc2"}).encode())
    upd = await recv(ws, "rtn_data")
    assert upd["data"][0]["trade"] == {"acc1": {"orders": {"o-1": {"order_id": "o-1", "account": "acc1",
                                                                   "status": "NOTTRADED", "traded": 0}}}}
    # without a token nothing is covered (tokens are configured)
    ws2 = await ws_connect(web)
    ws2.write_message(json.dumps({"aid": "subscribe_account", "accounts": "acc1"}))
    res2 = await recv(ws2, "subscribe_account_result")
    assert res2["accounts"] == [] and res2["ignored"] == {"acc1": "no valid token"}
    ws.close()
    ws2.close()


def test_rest_endpoints_return_the_documents(web: Web, mongo_db: Any) -> None:
    from qamarket.store import BarStore

    mongo_db["accounts"].insert_one({"_id": "acc1", "account_cookie": "acc1", "trading_day": "20250303",
                                     "accounts": {"balance": 5.0}, "positions": {"SHFE.rb2605": {"volume_long": 2}},
                                     "orders": {"o1": {"order_id": "o1"}}, "trades": {}})
    mongo_db["accounts"].insert_one({"_id": "acc2", "account_cookie": "acc2", "accounts": {"balance": 7.0}})
    mongo_db["child_orders"].insert_one({"_id": "c1", "account": "acc1", "status": "NOTTRADED", "updated_ns": 1})
    mongo_db["orders"].insert_one({"_id": "p1", "routing_key": "acc1", "state": "routed", "received_ns": 1})
    child = {"symbol": "rb2605", "exchange": "SHFE", "direction": "BUY", "offset": "OPEN", "price": 3900.0, "volume": 1}
    mongo_db["orders"].insert_one({"_id": "p2", "routing_key": "lead", "state": "routed", "received_ns": 2,
                                   "children": [{"order_id": "p2/f/acc1", "account": "acc1",
                                                 "body": json.dumps(child)}]})
    mongo_db["follower_rules"].insert_one({"_id": "r-1", "rule_id": "r-1", "leader": "acc1", "follower": "acc2"})
    mongo_db["account_state"].insert_one({"_id": "acc1", "reduce_only": True, "reason": "margin"})
    BarStore(mongo_db).write([Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=T0 - 500 + 60_000 * i,
                                  trading_day="20250303", open=1, high=2, low=0.5, close=1.5) for i in range(5)])
    admin, acc1 = "tok-admin-xxxxxxx", "tok-acc1-xxxxxxxx"
    assert web.get("/api/accounts")[0] == 401                               # tokens configured: reads need one
    st, body = web.get("/api/accounts", acc1)
    assert st == 200 and [a["account"] for a in body["accounts"]] == ["acc1"]   # only what the token covers
    assert [a["account"] for a in web.get("/api/accounts", admin)[1]["accounts"]] == ["acc1", "acc2"]
    st, one = web.get("/api/accounts/acc1", acc1)
    assert st == 200 and one["positions"]["SHFE.rb2605"]["volume_long"] == 2 and "o1" in one["orders"]
    assert web.get("/api/accounts/acc2", acc1)[0] == 403
    assert web.get("/api/accounts/nope", admin)[0] == 404
    st, orders = web.get("/api/orders?account=acc1", acc1)
    assert st == 200 and {o["_id"] for o in orders["orders"]} == {"c1", "p2/f/acc1"}
    assert orders["incoming"][0]["_id"] == "p1"
    routed = next(o for o in orders["orders"] if o["_id"] == "p2/f/acc1")
    assert routed["status"] == "ROUTED" and routed["symbol"] == "rb2605" and routed["parent_id"] == "p2"
    st, bars = web.get("/api/bars?symbol=rb2605&exchange=SHFE&freq=1min&count=3", acc1)
    assert st == 200 and len(bars["bars"]) == 3 and bars["bars"][-1]["datetime"] == T0 - 500 + 4 * 60_000
    assert web.get("/api/bars?symbol=rb2605&count=2", acc1)[1]["exchange"] == "SHFE"   # exchange from the product
    assert web.get("/api/follow", acc1)[1]["rules"][0]["follower"] == "acc2"
    st, risk = web.get("/api/risk", admin)
    assert st == 200 and risk["account_state"][0]["reason"] == "margin"
    assert web.get("/readyz")[0] == 200
    assert web.get("/healthz")[1]["status"] == "alive"


def test_post_order_needs_a_covering_token_and_publishes_to_qaorder(web: Web, topology: Any,
                                                                   amqp_channel: Any) -> None:
    q = amqp_channel.queue_declare("", exclusive=True).method.queue
    amqp_channel.queue_bind(q, topology.order, routing_key=keys.order_key("acc1"))
    order = {"account": "acc1", "symbol": "rb2605", "exchange": "SHFE", "direction": "BUY", "offset": "OPEN",
             "price_type": "LIMIT", "price": 3900, "volume": 1}
    assert web.request("POST", "/api/orders", order)[0] == 401
    assert web.request("POST", "/api/orders", order, token="wrong-token-xxxx")[0] == 401
    assert web.request("POST", "/api/orders", {**order, "account": "acc9"}, token="tok-acc1-xxxxxxxx")[0] == 403
    st, bad = web.request("POST", "/api/orders", {**order, "volume": 0}, token="tok-acc1-xxxxxxxx")
    assert st == 400 and bad["field"] == "volume"
    st, bad = web.request("POST", "/api/orders", {k: v for k, v in order.items() if k != "price"},
                          token="tok-acc1-xxxxxxxx")
    assert st == 400 and bad["field"] == "price"                          # never defaulted
    st, ok = web.request("POST", "/api/orders", order, token="tok-acc1-xxxxxxxx")
    assert st == 202 and ok["status"] == "SENT"

    def got() -> Any:
        return amqp_channel.basic_get(q, auto_ack=True)[2]

    body = json.loads(wait_for(got, timeout=10, what="the order on qaorder"))
    assert body["order_id"] == ok["order_id"] and body["schema"] == "qa.order" and body["source"] == "web"
    assert body["price"] == 3900 and body["volume"] == 1
    assert amqp_channel.basic_get(q, auto_ack=True)[2] is None              # exactly one publish


def test_post_is_refused_without_configured_tokens(tmp_path: Path, web_env: dict[str, str]) -> None:
    w = start_web(tmp_path, {**web_env, "QA_WEB_TOKENS": ""})
    try:
        st, body = w.request("POST", "/api/orders", {"account": "acc1"}, token="anything-at-all")
        assert st == 403 and "no token is configured" in body["error"]
        assert w.get("/api/follow")[0] == 200                               # reads open (loopback)
    finally:
        assert daemons.stop(w.proc) == 0


def test_readyz_fails_when_mongo_is_unreachable(tmp_path: Path, web_env: dict[str, str]) -> None:
    dead = free_port()    # nothing listens there
    w = start_web(tmp_path, {**web_env, "QA_MONGO_URL": f"mongodb://127.0.0.1:{dead}/?directConnection=true"})
    try:
        st, body = w.get("/readyz")
        assert st == 503 and body["broker"] is True and body["mongo"] is False
        assert w.get("/healthz")[0] == 200
    finally:
        assert daemons.stop(w.proc) == 0


async def test_slow_client_is_dropped_and_memory_stays_bounded(tmp_path: Path, web_env: dict[str, str],
                                                              topology: Any, amqp_channel: Any) -> None:
    """A client that never reads: the server keeps one message in flight, coalesces the rest
    and closes the socket once the write has been stuck for --drop-after (2 s)."""
    import base64
    import os

    w = start_web(tmp_path, web_env, "--max-changes", "1")
    try:
        s = socket.create_connection(("127.0.0.1", w.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{w.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        s.recv(1024)
        payload = json.dumps({"aid": "subscribe_quote", "mode": "full",
                              "ins_list": ",".join(f"rb26{m:02d}" for m in range(1, 13))})
        mask = os.urandom(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload.encode()))
        s.sendall(bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big") + mask + data)
        time.sleep(0.5)
        n = 0
        deadline = time.monotonic() + 40
        while "dropped_clients_total 1.0" not in w.get("/metrics")[1]:
            assert time.monotonic() < deadline, "the slow client was never dropped"
            for i in range(400):
                n += 1
                amqp_channel.basic_publish(topology.tick, keys.tick_key("SHFE", f"rb26{n % 12 + 1:02d}"),
                                           encode(tick(3000 + n % 500, n, symbol=f"rb26{n % 12 + 1:02d}")))
            time.sleep(0.05)
        assert "too slow" in w.log.read_text()
        s.close()
        wait_for(lambda: "qaflow_web_ws_clients 0.0" in w.get("/metrics")[1], timeout=10, what="client removed")
    finally:
        assert daemons.stop(w.proc) == 0
