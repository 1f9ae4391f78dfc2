"""qarisk end to end: the real paper executor, account daemon, router and risk monitor as
subprocesses on the real broker and the MongoDB-wire server.

Figures: SHFE.rb2512 (multiplier 10, margin 10 %, no fees). Long 5 bought at 3 900; a tick at
3 830 marks a loss of 5 * 10 * 70 = 3 500 > the daily limit of 3 000 -> the monitor force-closes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from qaaccount.store import AccountStore, InstrumentTable
from qamarket.models import Tick
from qamarket.store import TickStore
from qaorder.models import Direction, ForceClose, Offset, Order, PriceType
from qapubsub import keys
from qapubsub.messages import encode
from qapubsub.topology import Topology
from qarisk.store import RiskStore
from tests.helpers import risk_url as configured_risk_url
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY = "SHFE.rb2512"


@pytest.fixture
def risk_url() -> str:
    url = configured_risk_url()
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"the risk identity cannot log in: {type(exc).__name__}")
        pytest.skip(f"the risk identity (QA_RISK_AMQP_URL) cannot log in: {type(exc).__name__}")
    return url


class Procs:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp, self.procs = env, tmp, []  # type: ignore[var-annotated]

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.procs.append((p, log))
        return p

    def log(self, p: subprocess.Popen[bytes]) -> str:
        return next((Path(f.name).read_text() for q, f in self.procs if q is p), "")

    def stop_all(self) -> None:
        for p, f in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            f.close()
            sys.stderr.write(f"---- {' '.join(p.args[2:])} (exit {p.returncode})\n{Path(f.name).read_text()[-3000:]}\n")


@pytest.fixture
def procs(amqp_url: str, mongo_url: str, mongo_db: Any, namespace: str, topology: Topology, tmp_path: Path,
          risk_url: str) -> Iterator[Procs]:
    env = dict(os.environ, QA_AMQP_URL=amqp_url, QA_MONGO_URL=mongo_url, QA_MONGO_DB=mongo_db.name,
               QA_NAMESPACE=namespace, QA_RISK_AMQP_URL=risk_url, QA_RISK_USER="qarisk",
               QA_LOG_LEVEL=os.environ.get("QA_TEST_LOG_LEVEL", "INFO"), PYTHONPATH=str(ROOT))
    pr = Procs(env, tmp_path)
    yield pr
    pr.stop_all()


class Bus:
    def __init__(self, amqp_url: str, topo: Topology) -> None:
        self.topo = topo
        self.conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.q = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.q, topo.report, routing_key=keys.reports_of("A", "*"))
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def publish(self, exchange: str, key: str, msg: Any, user_id: str | None = None) -> None:
        self.ch.basic_publish(exchange, key, encode(msg), pika.BasicProperties(
            message_id=msg.id, type=msg.schema, content_type="application/json", delivery_mode=2, user_id=user_id))

    def order(self, oid: str, volume: int, price: float = 3900.0, direction: str = "BUY",
              offset: str = "OPEN") -> None:
        self.publish(self.topo.order, keys.order_key("A"), Order(
            order_id=oid, account="A", symbol="rb2512", exchange="SHFE", direction=Direction(direction),
            offset=Offset(offset), price_type=PriceType.LIMIT, price=price, volume=volume))

    def tick(self, last: float, bid: float, ask: float, volume: float = 50) -> None:
        self.publish(self.topo.tick, keys.tick_key("SHFE", "rb2512"), _tick(last, bid, ask, volume))

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        while True:
            m, _p, body = self.ch.basic_get(self.q, auto_ack=True)
            if m is None:
                return self.seen
            self.seen.append((m.routing_key, json.loads(body)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [b for k, b in self.drain() if k == f"A.{kind}"]


def _tick(last: float, bid: float, ask: float, volume: float = 50) -> Tick:
    return Tick(symbol="rb2512", exchange="SHFE", datetime=1_740_992_400_500, last_price=last, trading_day="20250303",
                bid_price_1=bid, bid_volume_1=volume, ask_price_1=ask, ask_volume_1=volume,
                limit_up=4200.0, limit_down=3600.0)


@pytest.fixture
def bus(amqp_url: str, topology: Topology) -> Iterator[Bus]:
    b = Bus(amqp_url, topology)
    yield b
    b.conn.close()


def consumers(amqp_url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def risk_cli(procs: Procs, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "handlers.risk", *args], cwd=ROOT, env=procs.env,
                          capture_output=True, text=True, timeout=60)


def test_monitor_force_closes_on_daily_loss_then_reduce_only_and_pre_trade_rules(
        procs: Procs, bus: Bus, mongo_db: Any, amqp_url: str, topology: Topology) -> None:
    accounts = AccountStore(mongo_db)
    InstrumentTable(mongo_db).configure(KEY, margin_rate=0.1)
    accounts.open("A", 1_000_000, trading_day="20250303")
    # the config from the CLI: a bad key is named, then the real one (session off: tests run at any hour)
    bad = risk_cli(procs, "config", "--account", "A", "--set", "volume.max_volumee=10")
    assert bad.returncode == 2 and "volume.max_volumee" in bad.stderr
    ok = risk_cli(procs, "config", "--account", "A", "--set", "session.enabled=false", "--set", "volume.max_volume=10",
                  "--set", "monitor.max_daily_loss=3000", "--set", "monitor.force_close_on=daily_loss")
    assert ok.returncode == 0, ok.stderr
    # the router prices force-closes from the stored last tick (limit-down 3600 for a sell)
    TickStore(mongo_db).write([_tick(3900.0, 3899.0, 3901.0)])

    ex = procs.start("handlers.broker", "sim", "--account", "A")
    wait_for(lambda: "sim executor ready" in procs.log(ex), 20, what="executor ready")
    acct = procs.start("handlers.account")
    wait_for(lambda: "account daemon ready" in procs.log(acct), 20, what="account daemon ready")
    router = procs.start("handlers.router")
    wait_for(lambda: consumers(amqp_url, topology.router_orders.name) >= 1, 20, what="router consuming")
    monitor = procs.start("handlers.risk")
    wait_for(lambda: "risk monitor started" in procs.log(monitor) and "consuming" in procs.log(monitor), 20,
             what="monitor consuming")

    # pre-trade: over the maximum volume -> a Reject naming the rule, nothing reaches the executor
    bus.order("big", 11)
    rej = wait_for(lambda: [r for r in bus.of("reject") if r["order_id"] == "big"], 15, what="max-volume reject")[0]
    assert rej["field"] == "risk.volume.max_volume" and "maximum 10" in rej["reason"]
    assert mongo_db["sim_orders"].find_one({"_id": "big"}) is None

    # a position is opened through the router and filled by the paper executor
    bus.order("o1", 5)
    wait_for(lambda: mongo_db["sim_orders"].find_one({"_id": "o1"}), 15, what="o1 at the executor")
    bus.tick(last=3900.0, bid=3899.0, ask=3900.0)
    wait_for(lambda: ((accounts.doc("A") or {}).get("positions", {}).get(KEY) or {}).get("volume_long") == 5, 20,
             what="long 5 in the account")
    assert not RiskStore(mongo_db).audit_of(action="warn")
    # prices move against it: 3 500 lost > 3 000 -> warn + automatic force-close as the risk identity
    TickStore(mongo_db).write([_tick(3830.0, 3829.0, 3831.0)])
    bus.tick(last=3830.0, bid=3829.0, ask=3831.0, volume=0)
    cid = "auto-A-20250303-daily_loss"
    ev = wait_for(lambda: bus.of("risk"), 20, what="risk event on A.risk")[0]
    assert (ev["rule"], ev["action"], ev["command_id"]) == ("daily_loss", "force_close", cid)
    wait_for(lambda: (mongo_db["processed"].find_one({"_id": f"forceclose:{cid}"}) or {}).get("state") == "done", 20,
             what="force-close executed by the router")
    assert mongo_db["account_state"].find_one({"_id": "A"})["reduce_only"]
    bus.tick(last=3830.0, bid=3829.0, ask=3831.0, volume=50)           # the closing sell fills at the bid
    wait_for(lambda: ((accounts.doc("A") or {}).get("positions", {}).get(KEY) or {}).get("volume_long") == 0, 20,
             what="account flat")
    # reduce-only: an opening order is rejected, naming the rule
    bus.order("o2", 1)
    rej = wait_for(lambda: [r for r in bus.of("reject") if r["order_id"] == "o2"], 15, what="reduce-only reject")[0]
    assert rej["field"] == "risk.state.reduce_only"
    # audit: the breach, the force-close issued, the router's execution; one of each
    rs = RiskStore(mongo_db)
    assert [d["_id"] for d in rs.audit_of(action="warn")] == [f"{cid}:warn"]
    assert [d["_id"] for d in rs.audit_of(action="forceclose")] == [f"{cid}:forceclose"]
    assert [d["rule"] for d in rs.audit_of(action="reject")] == ["volume", "state"]
    executed = [d for d in mongo_db["audit"].find({"action": "forceclose", "parent_id": cid})
                if d["detail"].startswith("accepted from qaflow-risk-monitor")]
    assert len(executed) == 1
    assert mongo_db["risk_monitor"].find_one({"_id": "A"})["fired"] == ["daily_loss"]

    # a force-close published by guest (not the risk identity) is refused and audited
    bus.publish(topology.risk, keys.risk_key("A"), ForceClose(command_id="fc-guest", account="A", reason="x",
                                                              operator="me"), user_id="guest")
    wait_for(lambda: list(mongo_db["audit"].find({"action": "refused", "parent_id": "fc-guest"})), 15,
             what="guest force-close refused")

    # status shows the state, the limits and the day's counters
    st = risk_cli(procs, "status", "--account", "A", "--json")
    assert st.returncode == 0, st.stderr
    [doc] = json.loads(st.stdout)
    assert doc["state"] == "reduce-only" and doc["limits"]["volume.max_volume"] == 10
    # o1 and its fill; the force-close's own orders are not counted against the account's limits
    wait_for(lambda: (d := mongo_db["risk_counters"].find_one({"_id": "A"})) and
             (d["daily_orders"], d["daily_trades"], d["active_orders"], bool(d["reduce_only"])) == (1, 1, 0, True), 10,
             what="counters saved")

    # release from the CLI (as the risk identity): opening allowed again
    rel = risk_cli(procs, "release", "--account", "A", "--reason", "reviewed")
    assert rel.returncode == 0, rel.stderr
    assert rel.stdout.strip().splitlines()[-1].startswith("rel-")
    wait_for(lambda: not mongo_db["account_state"].find_one({"_id": "A"})["reduce_only"], 15, what="released")
    bus.order("o3", 1, price=3800.0)
    wait_for(lambda: mongo_db["sim_orders"].find_one({"_id": "o3"}), 15, what="o3 at the executor")

    for p in (monitor, router, acct, ex):
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, procs.log(p)[-3000:]


def test_cli_force_close_while_the_router_is_down_runs_when_it_starts(procs: Procs, bus: Bus, mongo_db: Any,
                                                                     amqp_url: str, topology: Topology) -> None:
    mongo_db["accounts"].insert_one({"_id": "A", "accounts": {"balance": 1e6}, "positions": {KEY: {
        "exchange_id": "SHFE", "instrument_id": "rb2512", "volume_long_today": 0, "volume_long_his": 2,
        "volume_short_today": 0, "volume_short_his": 0}}})
    TickStore(mongo_db).write([_tick(3900.0, 3899.0, 3901.0)])
    ch = bus.ch
    from qapubsub.topology import declare_queue_sync

    declare_queue_sync(ch, topology.exec_queue("A"))
    declare_queue_sync(ch, topology.router_risk)
    out = risk_cli(procs, "force-close", "--account", "A", "--symbol", KEY, "--reason", "desk: margin call",
                   "--operator", "desk1")
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip().splitlines()[-1]
    assert cid.startswith("fc-") and "qarisk" in out.stdout and configured_risk_url().split("@")[0].split(":")[-1] not in out.stdout
    assert RiskStore(mongo_db).audit_of(action="forceclose", command_id=cid)
    no_id = risk_cli(procs, "force-close", "--account", "A", "--reason", "again")
    assert no_id.stdout.strip().splitlines()[-1] != cid                   # ids are unique
    router = procs.start("handlers.router")
    wait_for(lambda: (mongo_db["processed"].find_one({"_id": f"forceclose:{cid}"}) or {}).get("state") == "done", 20,
             what="the queued force-close executed")
    m, _p, body = wait_for(lambda: (r := ch.basic_get(topology.exec_queue("A").name, auto_ack=True))[0] and r, 10,
                           what="the closing order")
    o = json.loads(body)
    assert (o["direction"], o["offset"], o["volume"], o["price"]) == ("SELL", "CLOSEYESTERDAY", 2, 3600.0)
    router.send_signal(signal.SIGTERM)
    assert router.wait(30) == 0, procs.log(router)[-3000:]


def test_cli_halt_and_resume_through_the_router(procs: Procs, bus: Bus, mongo_db: Any, topology: Topology) -> None:
    from qapubsub.topology import declare_queue_sync

    declare_queue_sync(bus.ch, topology.exec_queue("A"))
    declare_queue_sync(bus.ch, topology.router_risk)
    assert risk_cli(procs, "halt", "--account", "A").returncode == 2              # a halt needs a reason
    out = risk_cli(procs, "halt", "--account", "A", "--reason", "desk: investigating", "--operator", "desk1")
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip().splitlines()[-1]
    assert cid.startswith("halt-") and RiskStore(mongo_db).audit_of(action="halt", command_id=cid)
    router = procs.start("handlers.router")
    wait_for(lambda: (mongo_db["processed"].find_one({"_id": f"halt:{cid}"}) or {}).get("state") == "done", 20,
             what="the queued halt executed")
    st = risk_cli(procs, "status", "--account", "A")
    assert st.returncode == 0 and f"account A: HALTED (command {cid}: desk: investigating)" in st.stdout
    out = risk_cli(procs, "resume", "--account", "A", "--reason", "cleared")
    assert out.returncode == 0, out.stderr
    rid = out.stdout.strip().splitlines()[-1]
    wait_for(lambda: (mongo_db["processed"].find_one({"_id": f"resume:{rid}"}) or {}).get("state") == "done", 20,
             what="the resume executed")
    assert "account A: NORMAL" in risk_cli(procs, "status", "--account", "A").stdout
    router.send_signal(signal.SIGTERM)
    assert router.wait(30) == 0, procs.log(router)[-3000:]


def test_cli_errors_are_clear(procs: Procs) -> None:
    env = {k: v for k, v in procs.env.items() if k not in ("QA_RISK_AMQP_URL", "QA_RISK_PASSWORD")}
    r = subprocess.run([sys.executable, "-m", "handlers.risk", "force-close", "--account", "A", "--reason", "x"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "QA_RISK_AMQP_URL" in r.stderr
    bad = dict(procs.env, QA_RISK_AMQP_URL="amqp://qarisk:wrong-secret@127.0.0.1:5672/%2F")
    r = subprocess.run([sys.executable, "-m", "handlers.risk", "release", "--account", "A"],
                       cwd=ROOT, env=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "refused the login" in r.stderr and "wrong-secret" not in r.stderr + r.stdout
    r = risk_cli(procs, "force-close", "--account", "A")
    assert r.returncode == 2 and "--reason" in r.stderr


def test_a_restarted_router_gate_knows_the_working_orders_again(mongo_db: Any, topology: Topology) -> None:
    """The gate restores working orders from the accounts' frozen orders (as the account daemon
    keeps them in MongoDB): a limit on working orders holds across a router restart."""
    from handlers.risk import RiskGate

    InstrumentTable(mongo_db).configure("SHFE.rb2512", margin_rate=0.1, open_ratio=0.0001)
    store = AccountStore(mongo_db)
    store.open("W", 1_000_000)
    acc, rev = store.load("W")  # type: ignore[misc]
    orders = [Order(order_id=f"w{i}", account="W", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
                    offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3900.0 + i, volume=2) for i in range(2)]
    for o in orders:
        assert acc.on_order(o)
    store.save(acc, rev)
    rules = {r: {"enabled": False} for r in ("state", "session", "volume", "price", "position", "funds", "exposure")}
    RiskStore(mongo_db).set_config("W", {**rules, "flow": {"enabled": True, "max_active_orders": 2}})
    gate = RiskGate(mongo_db, topology)
    st = gate.engine.state("W")
    assert sorted(st.active) == ["w0", "w1"] and st.working_open_lots == 4
    assert st.daily_orders == 0        # restored as working, not counted as new orders
    third = Order(order_id="w2", account="W", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
                  offset=Offset.OPEN, price_type=PriceType.LIMIT, price=3905.0, volume=1)
    decision = gate(third)
    assert decision is not None and not decision.ok and decision.rejection.check == "active_orders", decision
