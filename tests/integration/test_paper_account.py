"""Paper executor + account daemon as real subprocesses, on the real broker and nx-27017.

Hand-computed figures (SHFE.rb2512: multiplier 10, margin 10 %, fees 0.01 % of turnover):
fills 2 @ 3899 and 1 @ 3898 -> cost 77 980 + 38 980 = 116 960; margin 11 696;
commission 11.696; marked at 3899: position profit 3899*3*10 - 116 960 = 10;
balance 1 000 000 - 11.696 + 10 = 999 998.304.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from qaaccount.store import AccountStore, InstrumentTable
from qamarket.models import Tick
from qaorder.models import Cancel, Direction, Offset, Order, PriceType
from qapubsub import keys
from qapubsub.messages import encode
from qapubsub.topology import Topology
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY = "SHFE.rb2512"


# helpers -----------------------------------------------------------------------------------
class Procs:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp, self.procs = env, tmp, []  # type: ignore[var-annotated]

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.procs.append((p, log))
        return p

    def log(self, p: subprocess.Popen[bytes]) -> str:
        for q, f in self.procs:
            if q is p:
                return Path(f.name).read_text()
        return ""

    def stop_all(self) -> None:
        for p, f in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGUSR1)
                time.sleep(0.5)  # let faulthandler write the stacks (diagnostics only)
                p.kill()
                p.wait(10)
            f.close()
            sys.stderr.write(f"---- {' '.join(p.args[2:])} (exit {p.returncode})\n{Path(f.name).read_text()[-4000:]}\n")


@pytest.fixture
def procs(amqp_url: str, mongo_url: str, mongo_db: Any, namespace: str, topology: Topology,
          tmp_path: Path) -> Iterator[Procs]:
    env = dict(os.environ, QA_AMQP_URL=amqp_url, QA_MONGO_URL=mongo_url, QA_MONGO_DB=mongo_db.name,
               QA_NAMESPACE=namespace, QA_LOG_LEVEL=os.environ.get("QA_TEST_LOG_LEVEL", "INFO"), PYTHONPATH=str(ROOT))
    pr = Procs(env, tmp_path)
    yield pr
    pr.stop_all()


class Bus:
    """The test's own connection: publish orders/ticks, collect everything on qa.report."""

    def __init__(self, amqp_url: str, topo: Topology) -> None:
        self.topo = topo
        self.conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.q = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.q, topo.report, routing_key=keys.reports_of("A", "*"))
        self.seen: list[tuple[str, str, dict[str, Any]]] = []   # (routing key, message id, body)

    def publish(self, exchange: str, key: str, msg: Any) -> None:
        props = pika.BasicProperties(message_id=msg.id, type=msg.schema, content_type="application/json",
                                     delivery_mode=2)
        self.ch.basic_publish(exchange, key, encode(msg), props)

    def order(self, oid: str, volume: int, price: float | None = 3900.0, pt: str = "LIMIT") -> Order:
        o = Order(order_id=oid, account="A", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
                  offset=Offset.OPEN, price_type=PriceType(pt), price=price, volume=volume)
        self.publish(self.topo.exec, keys.exec_key("A"), o)
        return o

    def cancel(self, oid: str) -> None:
        self.publish(self.topo.exec, keys.exec_key("A"), Cancel(order_id=oid, account="A"))

    def tick(self, ask: float, ask_volume: float, last: float = 3899.0) -> None:
        t = Tick(symbol="rb2512", exchange="SHFE", datetime=1_740_992_400_500, last_price=last,
                 bid_price_1=ask - 1, bid_volume_1=10, ask_price_1=ask, ask_volume_1=ask_volume,
                 limit_up=4200, limit_down=3600)
        self.publish(self.topo.tick, keys.tick_key("SHFE", "rb2512"), t)

    def drain(self) -> list[tuple[str, str, dict[str, Any]]]:
        while True:
            method, props, body = self.ch.basic_get(self.q, auto_ack=True)
            if method is None:
                return self.seen
            self.seen.append((method.routing_key, props.message_id, json.loads(body)))

    def reports(self, kind: str) -> list[dict[str, Any]]:
        return [b for k, _, b in self.drain() if k.endswith("." + kind)]

    def trades(self) -> list[dict[str, Any]]:
        return self.reports("trade")

    def status(self, oid: str) -> list[str]:
        return [b["status"] for b in self.reports("order") if b["order_id"] == oid]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def bus(amqp_url: str, topology: Topology) -> Iterator[Bus]:
    b = Bus(amqp_url, topology)
    yield b
    b.close()


def consumers(amqp_url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def start_executor(procs: Procs, amqp_url: str, topo: Topology) -> subprocess.Popen[bytes]:
    p = procs.start("handlers.broker", "sim", "--account", "A")
    wait_for(lambda: p.poll() is not None or consumers(amqp_url, topo.exec_queue("A").name) >= 1, 20,
             what="the executor consuming its exec queue")
    assert p.poll() is None, procs.log(p)
    wait_for(lambda: "sim executor ready" in procs.log(p), 20, what="executor ready")
    return p


def terminate(p: subprocess.Popen[bytes], procs: Procs) -> None:
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0, procs.log(p)


# tests ------------------------------------------------------------------------------------------
def test_executor_and_account_daemon_end_to_end(procs: Procs, bus: Bus, mongo_db: Any, amqp_url: str,
                                                topology: Topology) -> None:
    store = AccountStore(mongo_db)
    InstrumentTable(mongo_db).configure(KEY, margin_rate=0.1, open_ratio=0.0001)
    store.open("A", 1_000_000)
    ex = start_executor(procs, amqp_url, topology)
    acct = procs.start("handlers.account")
    wait_for(lambda: consumers(amqp_url, topology.account_reports.name) >= 1, 20, what="account daemon consuming")
    wait_for(lambda: "account daemon ready" in procs.log(acct), 20, what="account daemon ready")

    # a limit buy is accepted; the account freezes margin + commission of the whole order
    bus.order("o1", 5, 3900)
    wait_for(lambda: "NOTTRADED" in bus.status("o1"), what="NOTTRADED")
    doc = wait_for(lambda: (d := store.doc("A")) and "o1" in d["frozen"] and d, what="o1 frozen")
    assert doc["accounts"]["frozen_margin"] == pytest.approx(3900 * 5 * 10 * 0.1)
    assert doc["accounts"]["frozen_commission"] == pytest.approx(3900 * 5 * 10 * 0.0001)

    bus.tick(ask=3901, ask_volume=50)            # does not cross
    bus.tick(ask=3899, ask_volume=2)             # partial fill, limited by the ask volume
    wait_for(lambda: len(bus.trades()) == 1, what="first fill")
    bus.tick(ask=3898, ask_volume=1)
    wait_for(lambda: len(bus.trades()) == 2, what="second fill")
    t1, t2 = bus.trades()
    assert [(t["trade_id"], t["price"], t["volume"]) for t in (t1, t2)] == [("o1-1", 3899, 2), ("o1-2", 3898, 1)]
    bus.cancel("o1")
    wait_for(lambda: "CANCELLED" in bus.status("o1"), what="CANCELLED")
    assert bus.status("o1") == ["NOTTRADED", "PARTTRADED", "PARTTRADED", "CANCELLED"]

    def settled() -> dict[str, Any] | None:
        d = store.doc("A")
        return d if d and not d["frozen"] and len(d["trades"]) == 2 else None

    doc = wait_for(settled, what="account with both fills and nothing frozen")
    a, p = doc["accounts"], doc["positions"][KEY]
    assert (p["volume_long_today"], p["volume_long_his"], p["volume_short"]) == (3, 0, 0)
    assert a["margin"] == pytest.approx(11_696.0)
    assert a["commission"] == pytest.approx(11.696)
    assert a["frozen_margin"] == 0 and a["frozen_commission"] == 0
    assert a["position_profit"] == pytest.approx(10.0)
    assert a["balance"] == pytest.approx(999_998.304)
    assert a["available"] == pytest.approx(999_998.304 - 11_696.0)

    # a redelivered trade counts once; o2 after it proves it was processed (one FIFO queue)
    body = json.dumps(t1).encode()
    bus.ch.basic_publish(topology.report, keys.report_key("A", "trade"), body,
                         pika.BasicProperties(message_id="o1-1", type="qa.trade", delivery_mode=2))
    # forged: an order published to qa.report (as a status key) and a fill published to qa.exec
    forged_order = Order(order_id="o9", account="A", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
                         offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3900.0, volume=50)
    bus.publish(topology.report, keys.report_key("A", "order"), forged_order)
    forged_fill = {**t1, "trade_id": "o1-9", "volume": 7}
    bus.ch.basic_publish(topology.exec, keys.exec_key("A"), json.dumps(forged_fill).encode(),
                         pika.BasicProperties(message_id="o1-9", type="qa.trade", delivery_mode=2))
    bus.order("o2", 1, 3700)
    wait_for(lambda: "o2" in (store.doc("A") or {}).get("frozen", {}), what="o2 frozen")
    d = store.doc("A")
    assert "o9" not in d["frozen"] and len(d["trades"]) == 2, "a forged order or fill was applied"
    dead = []
    while (got := bus.ch.basic_get(topology.dead_letters.name, auto_ack=True))[0] is not None:
        dead.append(got[1].headers.get("x-qa-error", ""))
    assert sum("only accepted from" in r for r in dead) >= 2, dead
    assert d["accounts"]["commission"] == pytest.approx(11.696)
    assert d["positions"][KEY]["volume_long"] == 3
    assert d["accounts"]["frozen_margin"] == pytest.approx(3700 * 10 * 0.1)
    bus.cancel("o2")                             # released on cancel
    wait_for(lambda: not (store.doc("A") or {}).get("frozen", {"x": 1}), what="o2 released")
    assert store.doc("A")["accounts"]["available"] == pytest.approx(999_998.304 - 11_696.0)

    # a snapshot of the account went out on qa.report <account>.account
    wait_for(lambda: any(k == "A.account" for k, _, _ in bus.drain()), what="AccountSnapshot")

    terminate(ex, procs)
    terminate(acct, procs)
    # the daemon restarts from MongoDB with the same figures
    acc, _ = store.load("A")  # type: ignore[misc]
    assert acc.balance == pytest.approx(999_998.304) and acc.commission == pytest.approx(11.696)


def test_kill_9_after_fills_no_duplicate_no_lost_fill(procs: Procs, bus: Bus, mongo_db: Any, amqp_url: str,
                                                      topology: Topology) -> None:
    ex = start_executor(procs, amqp_url, topology)
    bus.order("k1", 5, 3900)
    wait_for(lambda: "NOTTRADED" in bus.status("k1"), what="NOTTRADED")
    bus.tick(ask=3900, ask_volume=2)
    wait_for(lambda: len(bus.trades()) == 1, what="first fill")
    # the fill is persisted and its outbox cleared once confirmed
    wait_for(lambda: (d := mongo_db["sim_orders"].find_one({"_id": "k1"})) and d["traded"] == 2 and not d["outbox"],
             what="fill persisted")
    ex.kill()
    ex.wait(10)

    ex = start_executor(procs, amqp_url, topology)
    bus.order("k1", 5, 3900)                     # redelivered order: not placed twice
    bus.tick(ask=3900, ask_volume=10)
    wait_for(lambda: "ALLTRADED" in bus.status("k1"), what="ALLTRADED after restart")
    trades = bus.trades()
    assert [(t["trade_id"], t["volume"]) for t in trades] == [("k1-1", 2), ("k1-2", 3)]
    assert bus.status("k1") == ["NOTTRADED", "PARTTRADED", "ALLTRADED"]
    ids = [mid for _, mid, _ in bus.drain()]
    assert len(ids) == len(set(ids))
    terminate(ex, procs)
    d = mongo_db["sim_orders"].find_one({"_id": "k1"})
    assert (d["status"], d["traded"], d["fills"]) == ("ALLTRADED", 5, 2)


def test_limit_band_and_market_order_through_the_executor(procs: Procs, bus: Bus, amqp_url: str,
                                                          topology: Topology) -> None:
    ex = start_executor(procs, amqp_url, topology)
    bus.order("m0", 1, 3900)                     # binds the instrument's ticks
    wait_for(lambda: "NOTTRADED" in bus.status("m0"), what="m0 accepted")
    bus.tick(ask=3950, ask_volume=3)             # a quote with limits 3600..4200
    bus.order("up", 1, 4300)                     # above limit-up
    wait_for(lambda: "REJECTED" in bus.status("up"), what="limit-up reject")
    rej = [b for b in bus.reports("order") if b["order_id"] == "up"][-1]
    assert "limit band" in rej["reason"]
    bus.order("mk", 5, None, pt="MARKET")        # fills 3 at the ask, the rest cancelled
    wait_for(lambda: "CANCELLED" in bus.status("mk"), what="market order done")
    assert [(t["price"], t["volume"]) for t in bus.trades() if t["order_id"] == "mk"] == [(3950, 3)]
    terminate(ex, procs)


def test_show_and_settle_commands(mongo_db: Any, mongo_url: str, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from handlers import account as cmd
    from handlers.cli import run_module

    monkeypatch.setenv("QA_MONGO_URL", mongo_url)
    monkeypatch.setenv("QA_MONGO_DB", mongo_db.name)
    assert run_module("handlers.account", ["open", "--account", "S", "--cash", "500000"], "qaflow account") == 0
    assert run_module("handlers.account", ["open", "--account", "S", "--cash", "1"], "qaflow account") == 1
    assert run_module("handlers.account", ["settle", "--account", "S", "--next-day", "20250103"],
                      "qaflow account") == 0
    capsys.readouterr()
    assert run_module("handlers.account", ["show", "--account", "S"], "qaflow account") == 0
    out = capsys.readouterr().out
    assert "account S" in out and "500,000.00" in out and "20250103" in out
    assert run_module("handlers.account", ["show", "--json"], "qaflow account") == 0
    [doc] = json.loads(capsys.readouterr().out)
    assert doc["accounts"]["pre_balance"] == 500_000 and doc["rev"] == 2
    assert cmd.render(doc)
