"""The CTP executor through the real RabbitMQ and the MongoDB-wire server.

Order on the account's exec queue -> OrderRequest recorded by the vn.py gateway stand-in ->
REAL vn.py OrderData/TradeData through a REAL EventEngine -> OrderStatusReport + Trade on
qa.report, exactly once; then a restart on the same MongoDB finds the order by its
vt_orderid and a replay of the counter's events publishes nothing twice.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pika
import pytest

pytest.importorskip("vnpy.trader.object", reason="vn.py not installed (see docs/brokers.md)")

from brokers.ctp.settings import CtpSettings  # noqa: E402
from brokers.ctp.td import CtpExecutor  # noqa: E402
from brokers.ctp.td_store import MongoStore  # noqa: E402
from qaorder.models import Cancel, Direction, Offset, Order, PriceType  # noqa: E402
from qapubsub import keys  # noqa: E402
from qapubsub.messages import encode  # noqa: E402
from qapubsub.settings import Settings  # noqa: E402
from qapubsub.sync import Connection, Consumer, Publisher  # noqa: E402
from qapubsub.topology import Topology  # noqa: E402
from tests.unit.brokers_ctp_td.gateway import ENV, SimCtpGateway, Status, wait_for  # noqa: E402

pytestmark = pytest.mark.integration


class Bus:
    def __init__(self, amqp_url: str, topo: Topology) -> None:
        self.topo = topo
        self.conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.q = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.q, topo.report, routing_key=keys.reports_of("A", "*"))
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def send(self, msg: Any) -> None:
        props = pika.BasicProperties(message_id=msg.id, type=msg.schema, content_type="application/json",
                                     delivery_mode=2)
        self.ch.basic_publish(self.topo.exec, keys.exec_key("A"), encode(msg), props)

    def drain(self) -> list[tuple[str, str, dict[str, Any]]]:
        while True:
            method, props, body = self.ch.basic_get(self.q, auto_ack=True)
            if method is None:
                return self.seen
            self.seen.append((method.routing_key, props.message_id, json.loads(body)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [b for k, _, b in self.drain() if k == f"A.{kind}"]


def start_executor(amqp_url: str, topo: Topology, db: Any,
                   run_in_thread: Callable[[object], threading.Thread]) -> tuple[CtpExecutor, Consumer]:
    amqp = Settings.from_env({"QA_AMQP_URL": amqp_url})
    ex = CtpExecutor(CtpSettings.from_env(ENV), "A", MongoStore(db), topology=topo, gateway_class=SimCtpGateway)
    ex.start(lambda: Publisher(Connection(amqp, client_name="test-ctp-reports"), topology=topo))
    assert wait_for(ex.ready.is_set)
    conn = Connection(amqp, client_name="test-ctp-exec")
    pub = Publisher(conn, topology=topo)

    def on_exec(msg: Any, _d: Any) -> None:
        (ex.on_order if isinstance(msg, Order) else ex.on_cancel)(msg, pub)

    consumer = Consumer(conn, topo.exec_queue("A"), on_exec, message_type=Order | Cancel, topology=topo, prefetch=10)
    run_in_thread(consumer)
    assert wait_for(consumer.ready.is_set, 10)
    return ex, consumer


def test_order_to_fill_exactly_once_and_after_restart(amqp_url: str, topology: Topology, mongo_db: Any,
                                                     run_in_thread: Callable[[object], threading.Thread]) -> None:
    bus = Bus(amqp_url, topology)
    ex, consumer = start_executor(amqp_url, topology, mongo_db, run_in_thread)
    o = Order(order_id="ctp-it-1", account="A", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
              offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3900.0, volume=3)
    bus.send(o)
    gw: SimCtpGateway = ex.gateway
    assert wait_for(lambda: len(gw.requests) == 1, 10)
    vt = next(iter(gw.orders))
    gw.update(vt, Status.NOTTRADED)
    gw.fill(vt, 1, 3899.0, "   9001")
    gw.update(vt, Status.PARTTRADED, 1)
    assert ex.drain(10)
    assert wait_for(lambda: len(bus.of("trade")) == 1 and len(bus.of("order")) == 3, 10)
    doc = mongo_db["ctp_orders"].find_one({"_id": "ctp-it-1"})
    assert doc["legs"][0]["vt_orderid"] == vt and doc["sent"] == "SENT" and doc["outbox"] == []

    # restart: a new executor on the same MongoDB; the counter filled the rest meanwhile
    consumer.stop()
    ex.stop()
    at_counter, trades = dict(gw.orders), list(gw.trades)
    ex2, _ = start_executor(amqp_url, topology, mongo_db, run_in_thread)
    gw2: SimCtpGateway = ex2.gateway
    gw2.orders.update(at_counter)
    gw2.trades.extend(trades)
    gw2.fill(vt, 2, 3898.0, "   9002", push=False)
    gw2.update(vt, Status.ALLTRADED, 3, push=False)
    gw2.disconnect()
    gw2.login()                   # CTP replays the day's orders and trades
    bus.send(o)                   # and the order is redelivered: not sent again
    assert ex2.drain(10)
    assert wait_for(lambda: len(bus.of("trade")) == 2, 10)
    ex2.drain(2)
    seen = bus.drain()
    assert [b["trade_id"] for _, _, b in seen if b["schema"] == "qa.trade"] == ["ctp-it-1-SHFE-9001",
                                                                                 "ctp-it-1-SHFE-9002"]
    assert [b["status"] for _, _, b in seen if b["schema"] == "qa.order_status"] == [
        "SUBMITTING", "NOTTRADED", "PARTTRADED", "ALLTRADED"]
    ids = [mid for _, mid, _ in seen]
    assert len(ids) == len(set(ids)), "a report was published twice"
    assert gw2.requests == []
    ex2.stop()
