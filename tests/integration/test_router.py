"""The order router against the real broker and the MongoDB-wire server.

Executors are simulated by the accounts' exec queues (``topology.exec_queue(account)``);
the router runs in a thread with its own connection, or as a real subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from qaorder.models import ForceClose, Halt, Order, Release, Resume
from qaorder.routing import FollowerRule, Sizing
from qaorder.store import OrderStore
from qapubsub import keys
from qapubsub.settings import Settings
from qapubsub.topology import Queue, Topology, declare_queue_sync
from tests.helpers import risk_url, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _risk_identity(env: "Env") -> tuple[str, str]:
    """(URL, user) of the risk identity: the ``qarisk`` user of QA_RISK_AMQP_URL when it can log
    in; else guest standing in as the configured risk user (the check is the same: RabbitMQ
    verifies ``user_id`` against the connection's user, and the router compares it with
    ``settings.risk_user``)."""
    import warnings

    url = risk_url()
    if url:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
            return url, "qarisk"
        except pika.exceptions.AMQPError as exc:
            warnings.warn(f"QA_RISK_AMQP_URL cannot log in ({type(exc).__name__}); guest stands in as the risk user",
                          stacklevel=2)
    env.settings = Settings(amqp_urls=env.settings.amqp_urls, mongo_url=env.mongo_url, mongo_db=env.db.name,
                            namespace=env.topo.namespace, risk_user="guest")
    return env.amqp_url, "guest"


class Env:
    def __init__(self, amqp_url: str, mongo_url: str, db: Any, topo: Topology) -> None:
        self.amqp_url, self.mongo_url, self.db, self.topo = amqp_url, mongo_url, db, topo
        self.store = OrderStore(db)
        self.settings = Settings(amqp_urls=(amqp_url,), mongo_url=mongo_url, mongo_db=db.name,
                                 namespace=topo.namespace, risk_user="qarisk")
        self.conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.reports = declare_queue_sync(self.ch, Queue("", durable=False, exclusive=True, auto_delete=True))
        self.ch.queue_bind(self.reports, topo.report, keys.reports_of("*", "reject"))
        self.router: Any = None
        self.thread: threading.Thread | None = None

    # executors -------------------------------------------------------------------------
    def executor(self, *accounts: str) -> None:
        for a in accounts:
            declare_queue_sync(self.ch, self.topo.exec_queue(a))

    def get_all(self, queue: str) -> list[tuple[Any, dict[str, Any]]]:
        out = []
        while True:
            m, p, b = self.ch.basic_get(queue, auto_ack=True)
            if m is None:
                return out
            out.append((p, json.loads(b)))

    def collect(self, queue: str, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        wait_for(lambda: (got.extend(b for _p, b in self.get_all(queue)) or len(got) >= n), timeout,
                 what=f"{n} messages on {queue}")
        return got

    def exec_msgs(self, account: str, n: int) -> list[dict[str, Any]]:
        return self.collect(self.topo.exec_queue(account).name, n)

    # publishing --------------------------------------------------------------------------
    def publish(self, exchange: str, key: str, body: Any, **props: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        props.setdefault("message_id", uuid.uuid4().hex)
        self.ch.basic_publish(exchange, key, data, pika.BasicProperties(delivery_mode=2, **props))

    def order(self, account: str, oid: str, **kw: Any) -> dict[str, Any]:
        d = {"schema": "qa.order", "order_id": oid, "account": account, "symbol": "rb2512", "exchange": "SHFE",
             "direction": "BUY", "offset": "OPEN", "price_type": "LIMIT", "price": 3900.0, "volume": 1}
        d.update(kw)
        self.publish(self.topo.order, keys.order_key(account), d)
        return d

    # router ------------------------------------------------------------------------------
    def start(self, before: Any = None, **kw: Any) -> Any:
        """Run a router in a thread (``before(router)`` first: a test's fault injection)."""
        from handlers.router import Router

        self.router = Router(self.settings, self.topo, self.db, **kw)
        if before is not None:
            before(self.router)
        self.thread = threading.Thread(target=self.router.run, daemon=True)
        self.thread.start()
        wait_for(self.router.consumer.ready.is_set, 10, what="router consuming")
        return self.router

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            assert self.thread is not None
            self.thread.join(15)
            assert not self.thread.is_alive()
            self.router.connection.close()
            self.router = None


@pytest.fixture
def env(amqp_url: str, mongo_url: str, mongo_db: Any, topology: Topology) -> Iterator[Env]:
    e = Env(amqp_url, mongo_url, mongo_db, topology)
    try:
        yield e
    finally:
        e.stop()
        if e.conn.is_open:
            e.conn.close()


def test_native_and_qatrader_orders_reach_the_account_exec_key(env: Env) -> None:
    env.db["accounts"].insert_one({"_id": "acc1", "accounts": {"balance": 1e6}, "positions": {}})
    env.executor("acc1", "acc2")
    env.start()
    env.order("acc1", "n-1")
    qatrader = {"topic": "sendorder", "account_cookie": "acc1", "code": "rb2512", "exchange_id": "SHFE",
                "order_direction": "SELL", "order_offset": "OPEN", "price": 3901, "volume": 2, "order_id": "q-1"}
    env.publish(env.topo.qapubsub_order, "acc1", qatrader)      # QAPUBSUB publisher_routing, direct exchange
    msgs = env.exec_msgs("acc1", 2)
    assert {m["order_id"] for m in msgs} == {"n-1", "q-1"}
    q = next(m for m in msgs if m["order_id"] == "q-1")
    assert (q["direction"], q["offset"], q["volume"], q["price"]) == ("SELL", "OPEN", 2, 3901.0)
    assert env.get_all(env.topo.exec_queue("acc2").name) == []
    # marked behind the batch, by the writer thread
    wait_for(lambda: env.store.get_order("q-1")["state"] == "routed", 10, what="q-1 marked routed")


def test_group_fan_out_copy_trade_reverse_lot_rounding_and_cancel_propagation(env: Env) -> None:
    env.store.set_group("g1", ["a1", "a2"])
    env.store.add_rule(FollowerRule(rule_id="r1", leader="g1", follower="f1", sizing=Sizing.RATIO, ratio=0.5,
                                    reverse=True))
    env.executor("a1", "a2", "f1")
    env.start()
    env.order("g1", "G-1", volume=3)
    a1, a2, f1 = env.exec_msgs("a1", 1), env.exec_msgs("a2", 1), env.exec_msgs("f1", 1)
    assert a1[0]["order_id"] == "G-1/g/a1" and a1[0]["volume"] == 3 and a1[0]["direction"] == "BUY"
    assert a2[0]["order_id"] == "G-1/g/a2"
    assert f1[0]["volume"] == 1 and f1[0]["direction"] == "SELL" and f1[0]["offset"] == "OPEN"   # 1.5 -> 1 lot
    # the batch's audit document is written after its children are published (the writer thread)
    wait_for(lambda: {"group", "follow"} <= {d["action"] for d in env.store.audit_of(parent_id="G-1")}, 10,
             what="the group and follow decisions audited")
    env.publish(env.topo.order, "g1", {"schema": "qa.cancel", "order_id": "G-1", "account": "g1"})
    for acc in ("a1", "a2", "f1"):
        c = env.exec_msgs(acc, 1)[0]
        assert c["schema"] == "qa.cancel" and c["order_id"] == f"G-1/{'f' if acc == 'f1' else 'g'}/{acc}"


def test_follower_rule_added_with_the_cli_takes_effect_on_the_running_router(env: Env) -> None:
    env.executor("L", "F")
    env.start()
    env.order("L", "o-1", volume=4)
    assert env.exec_msgs("L", 1)[0]["order_id"] == "o-1"
    cli_env = {**os.environ, "QA_MONGO_URL": env.mongo_url, "QA_MONGO_DB": env.db.name}
    out = subprocess.run([sys.executable, "-m", "handlers.follow", "add", "--leader", "L", "--follower", "F",
                          "--fixed", "2", "--reverse"], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    rule_id = out.stdout.strip()
    listed = subprocess.run([sys.executable, "-m", "handlers.follow", "list"], cwd=ROOT, env=cli_env,
                            capture_output=True, text=True, timeout=30)
    assert rule_id in listed.stdout and "fixed 2" in listed.stdout
    env.order("L", "o-2", volume=4)
    f = env.exec_msgs("F", 1)[0]
    assert (f["order_id"], f["volume"], f["direction"]) == ("o-2/f/F", 2, "SELL")
    assert env.get_all(env.topo.exec_queue("F").name) == []  # o-1 was not copied


def test_the_same_order_delivered_twice_is_placed_once(env: Env) -> None:
    env.store.add_rule(FollowerRule(rule_id="r", leader="acc", follower="fol", ratio=2.0))
    env.executor("acc", "fol")
    env.start()
    env.order("acc", "dup-1")
    env.order("acc", "dup-1")
    wait_for(lambda: env.store.audit_of(parent_id="dup-1", action="duplicate"), 10, what="duplicate audited")
    env.order("acc", "after")                       # a marker: everything before it was handled
    acc = env.exec_msgs("acc", 2)
    assert [m["order_id"] for m in acc] == ["dup-1", "after"]
    fol = env.exec_msgs("fol", 2)
    assert [m["order_id"] for m in fol] == ["dup-1/f/fol", "after/f/fol"]
    assert fol[0]["volume"] == 2


def test_a_planned_order_is_resumed_with_the_same_message_ids(env: Env) -> None:
    """Crash between planning and confirming: the redelivery publishes the stored bodies."""
    from handlers.router import Router

    env.executor("acc")
    router = Router(env.settings, env.topo, env.db)
    body = json.dumps({"schema": "qa.order", "order_id": "p-1", "account": "acc",
                       "symbol": "rb2512", "exchange": "SHFE", "direction": "BUY",
                       "offset": "OPEN", "price_type": "LIMIT", "price": 1.0, "volume": 1})
    child = router._child_entry(Order(order_id="p-1", id="m-fixed", account="acc", symbol="rb2512",  # noqa: SLF001
                                      exchange="SHFE", direction="BUY", offset="OPEN", price_type="LIMIT",
                                      price=1.0, volume=1), "acc")
    env.db["orders"].insert_one({"_id": "p-1", "state": "planned", "routing_key": "acc", "children": [child]})
    router.connection.close()
    env.start()
    env.publish(env.topo.order, "acc", body.encode())
    props, msg = wait_for(lambda: env.get_all(env.topo.exec_queue("acc").name), 10, what="resumed child")[0]
    assert props.message_id == "m-fixed" and msg["order_id"] == "p-1"
    wait_for(lambda: env.store.get_order("p-1")["state"] == "routed", 10, what="routed")


def test_malformed_orders_are_dead_lettered_with_the_reason_and_a_reject_report(env: Env) -> None:
    env.executor("acc")
    env.start()
    bad = {"schema": "qa.order", "order_id": "b-1", "account": "acc", "symbol": "rb2512", "exchange": "SHFE",
           "direction": "BUY", "offset": "OPEN", "price_type": "LIMIT", "volume": 1}          # no price
    env.publish(env.topo.order, "acc", bad)
    env.publish(env.topo.order, "acc", {"topic": "sendorder", "account_cookie": "acc", "exchange_id": "SHFE",
                                        "order_direction": "BUY", "order_offset": "OPEN", "price": 1, "volume": 1,
                                        "order_id": "b-2"})                                     # no code
    env.publish(env.topo.order, "acc", b"{not json")
    got: list[Any] = []

    def dead_letters() -> list[Any]:
        while True:
            m, p, _b = env.ch.basic_get(env.topo.dead_letters.name, auto_ack=True)
            if m is None:
                return got
            got.append(p.headers["x-qa-error"])
    wait_for(lambda: len(dead_letters()) >= 3, 10, what="3 dead letters")
    assert any(r.startswith("price") for r in got) and any(r.startswith("code") for r in got)
    reports = env.collect(env.reports, 3)
    fields = {r["field"] for r in reports}
    assert {"price", "code"} <= fields
    assert all(r["schema"] == "qa.reject" for r in reports)
    env.order("acc", "good")                                    # the daemon kept running
    assert env.exec_msgs("acc", 1)[0]["order_id"] == "good"


def _force_close_setup(env: Env) -> None:
    from qamarket.models import Tick
    from qamarket.store import TickStore

    env.db["accounts"].insert_one({"_id": "acc", "accounts": {"balance": 1e6}, "positions": {"SHFE.rb2512": {
        "exchange_id": "SHFE", "instrument_id": "rb2512", "volume_long_today": 0, "volume_long_his": 2,
        "volume_short_today": 1, "volume_short_his": 0}}})
    TickStore(env.db).write([Tick(symbol="rb2512", exchange="SHFE", datetime=1_740_992_400_500, last_price=3900.0,
                                  trading_day="20250303", limit_up=4100.0, limit_down=3700.0,
                                  bid_price_1=3899.0, ask_price_1=3901.0)])


def _risk_publish(env: Env, cmd: Any, url: str, user_id: str | None) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(env.topo.risk, keys.risk_key(cmd.account), __import__("msgspec").json.encode(cmd),
                         pika.BasicProperties(delivery_mode=2, message_id=cmd.command_id, user_id=user_id),
                         mandatory=True)
    finally:
        conn.close()


def test_force_close_from_the_risk_identity_cancels_flattens_and_blocks_opens(env: Env) -> None:
    url, user = _risk_identity(env)
    _force_close_setup(env)
    env.executor("acc")
    env.start()
    env.order("acc", "w-1")                                     # a working order
    assert env.exec_msgs("acc", 1)[0]["order_id"] == "w-1"
    _risk_publish(env, ForceClose(command_id="fc-1", account="acc", reason="margin", operator="desk"), url, user)
    msgs = env.exec_msgs("acc", 3)
    assert msgs[0]["schema"] == "qa.cancel" and msgs[0]["order_id"] == "w-1"
    closes = {(m["direction"], m["offset"], m["volume"], m["price"]) for m in msgs[1:]}
    assert closes == {("SELL", "CLOSEYESTERDAY", 2, 3700.0), ("BUY", "CLOSETODAY", 1, 4100.0)}
    assert env.db["account_state"].find_one({"_id": "acc"})["reduce_only"]
    env.order("acc", "open-after")                              # refused: reduce-only
    env.order("acc", "close-after", direction="SELL", offset="CLOSE")
    assert env.exec_msgs("acc", 1)[0]["order_id"] == "close-after"
    rep = env.collect(env.reports, 1)
    assert rep[0]["order_id"] == "open-after" and rep[0]["field"] == "offset"
    # idempotent by command id: the same command again does nothing
    _risk_publish(env, ForceClose(command_id="fc-1", account="acc", reason="margin", operator="desk"), url, user)
    _risk_publish(env, Release(command_id="rel-1", account="acc", operator="desk"), url, user)
    wait_for(lambda: not env.db["account_state"].find_one({"_id": "acc"})["reduce_only"], 10, what="release")
    env.order("acc", "open-again")
    assert [m["order_id"] for m in env.exec_msgs("acc", 1)] == ["open-again"]


def test_force_close_from_guest_is_refused_audited_and_dead_lettered(env: Env) -> None:
    _force_close_setup(env)
    env.executor("acc")
    env.start()
    _risk_publish(env, ForceClose(command_id="fc-g", account="acc", reason="x", operator="me"), env.amqp_url, None)
    _risk_publish(env, ForceClose(command_id="fc-g2", account="acc", reason="x", operator="me"), env.amqp_url, "guest")
    wait_for(lambda: len(env.store.audit_of(action="refused")) == 2, 10, what="2 refusals audited")
    errors: list[str] = []

    def dead() -> list[str]:
        m, p, _b = env.ch.basic_get(env.topo.dead_letters.name, auto_ack=True)
        if m is not None:
            errors.append(p.headers["x-qa-error"])
        return errors
    wait_for(lambda: len(dead()) >= 2, 10, what="dead letters")
    assert all("not the risk identity" in e for e in errors)
    assert env.get_all(env.topo.exec_queue("acc").name) == []
    assert env.db["account_state"].find_one({"_id": "acc"}) is None


def test_halt_refuses_every_order_until_resume_and_is_refused_from_guest(env: Env) -> None:
    url, user = _risk_identity(env)
    env.executor("acc")
    env.start()
    env.order("acc", "w-1")                                     # a working order
    assert env.exec_msgs("acc", 1)[0]["order_id"] == "w-1"
    _risk_publish(env, Halt(command_id="h-g", account="acc", reason="x", operator="me"), env.amqp_url, None)
    wait_for(lambda: len(env.store.audit_of(action="refused")) == 1, 10, what="the foreign halt refused")
    ref = env.collect(env.reports, 1)
    assert ref[0]["order_id"] == "h-g" and ref[0]["field"] == "user_id"
    assert env.db["account_state"].find_one({"_id": "acc"}) is None
    _risk_publish(env, Halt(command_id="h-1", account="acc", reason="investigating", operator="desk"), url, user)
    wait_for(lambda: (env.db["account_state"].find_one({"_id": "acc"}) or {}).get("halted"), 10, what="halted")
    env.order("acc", "open-h")
    env.order("acc", "close-h", direction="SELL", offset="CLOSE")   # closing orders are refused too
    rep = env.collect(env.reports, 2)
    assert sorted(r["order_id"] for r in rep) == ["close-h", "open-h"]
    assert all(r["field"] == "account" and "halted by h-1" in r["reason"] for r in rep)
    env.publish(env.topo.order, keys.order_key("acc"), {"schema": "qa.cancel", "order_id": "w-1", "account": "acc"})
    msgs = env.exec_msgs("acc", 1)                              # a cancel passes
    assert msgs[0]["schema"] == "qa.cancel" and msgs[0]["order_id"] == "w-1"
    env.stop()                                                  # a router started now reads the halt
    env.start()
    env.order("acc", "open-h2")
    assert env.collect(env.reports, 1)[0]["order_id"] == "open-h2"
    _risk_publish(env, Halt(command_id="h-1", account="acc", reason="investigating", operator="desk"), url, user)
    _risk_publish(env, Resume(command_id="r-1", account="acc", operator="desk", reason="cleared"), url, user)
    wait_for(lambda: not env.db["account_state"].find_one({"_id": "acc"})["halted"], 10, what="resumed")
    env.order("acc", "open-after")
    assert [m["order_id"] for m in env.exec_msgs("acc", 1)] == ["open-after"]
    assert len(env.store.audit_of(action="halt")) == 1          # the same command twice: applied once
    assert len(env.store.audit_of(action="halt_lifted")) == 1
    assert env.get_all(env.topo.exec_queue("acc").name) == []   # nothing of the refused orders went out


def test_force_close_sent_while_the_router_is_down_runs_when_it_starts_and_sigterm_exits_0(env: Env) -> None:
    url, user = _risk_identity(env)
    _force_close_setup(env)
    env.executor("acc")
    # the router is not running: the command waits in the durable quorum queue
    declare_queue_sync(env.ch, env.topo.router_risk)
    _risk_publish(env, ForceClose(command_id="fc-down", account="acc", reason="loss", operator="desk"), url, user)
    sub_env = {**os.environ, "QA_AMQP_URL": env.amqp_url, "QA_MONGO_URL": env.mongo_url, "QA_MONGO_DB": env.db.name,
               "QA_NAMESPACE": env.topo.namespace, "QA_RISK_USER": user}
    proc = subprocess.Popen([sys.executable, "-m", "handlers.router"], cwd=ROOT, env=sub_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        msgs = env.exec_msgs("acc", 2)
        assert {(m["direction"], m["offset"]) for m in msgs} == {("SELL", "CLOSEYESTERDAY"), ("BUY", "CLOSETODAY")}
        env.order("acc", "x-open")
        wait_for(lambda: env.collect(env.reports, 1), 10, what="reduce-only reject report")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else rc


# batches ---------------------------------------------------------------------------------------
def _orders_in_one_batch(env: Env, bodies: list[dict[str, Any]], **kw: Any) -> Any:
    """Publish the orders while the router is not consuming, then start it: one prefetch, one batch
    (``batch_wait``: even if the first read brings only some of them)."""
    kw.setdefault("batch_wait", 0.3)
    declare_queue_sync(env.ch, env.topo.router_orders.with_bindings())
    env.ch.queue_bind(env.topo.router_orders.name, env.topo.order, "#")
    for b in bodies:
        env.publish(env.topo.order, keys.order_key(b["account"]), b)
    return env.start(**kw)


def _body(account: str, oid: str, **kw: Any) -> dict[str, Any]:
    d = {"schema": "qa.order", "order_id": oid, "account": account, "symbol": "rb2512", "exchange": "SHFE",
         "direction": "BUY", "offset": "OPEN", "price_type": "LIMIT", "price": 3900.0, "volume": 1}
    d.update(kw)
    return d


def test_a_batch_with_the_same_order_id_twice_places_it_once(env: Env) -> None:
    env.store.add_rule(FollowerRule(rule_id="r", leader="acc", follower="fol", ratio=1.0))
    env.executor("acc", "fol")
    router = _orders_in_one_batch(env, [_body("acc", "b-1"), _body("acc", "dup"), _body("acc", "dup"),
                                        _body("acc", "b-2")])
    wait_for(lambda: env.store.audit_of(parent_id="dup", action="duplicate"), 10, what="duplicate audited")
    assert [m["order_id"] for m in env.exec_msgs("acc", 3)] == ["b-1", "dup", "b-2"]
    assert [m["order_id"] for m in env.exec_msgs("fol", 3)] == ["b-1/f/fol", "dup/f/fol", "b-2/f/fol"]
    assert env.get_all(env.topo.exec_queue("acc").name) == []
    assert router.consumer.counts["batches"] <= 2 and router.counts["duplicates"] == 1
    wait_for(lambda: all(env.store.get_order(i)["state"] == "routed" for i in ("b-1", "dup", "b-2")), 10,
             what="marked routed (after the audit, in the same write)")


def test_a_returned_child_inside_a_batch_becomes_a_reject_report_for_that_child_only(env: Env) -> None:
    env.store.add_rule(FollowerRule(rule_id="r", leader="acc", follower="ghost", ratio=1.0))  # no exec queue
    env.executor("acc")
    _orders_in_one_batch(env, [_body("acc", "r-1"), _body("acc", "r-2")])
    assert [m["order_id"] for m in env.exec_msgs("acc", 2)] == ["r-1", "r-2"]
    reps = env.collect(env.reports, 2)
    assert sorted(r["order_id"] for r in reps) == ["r-1/f/ghost", "r-2/f/ghost"]
    assert all(r["field"] == "account" and "no executor" in r["reason"] for r in reps)
    wait_for(lambda: env.store.get_order("r-2")["state"] == "routed", 10, what="routed")
    doc = env.store.get_order("r-1")
    ghost = next(c for c in doc["children"] if c["account"] == "ghost")
    leader = next(c for c in doc["children"] if c["account"] == "acc")
    assert ghost["confirmed"] and "no executor" in ghost["error"] and not leader["error"]
    assert env.db["child_orders"].find_one({"_id": "r-1/f/ghost"})["status"] == "REJECTED"
    assert env.db["child_orders"].find_one({"_id": "r-1"}) is None       # accepted: only in the plan


def test_a_crash_between_plan_insert_and_publish_resumes_with_the_same_ids(env: Env) -> None:
    """The router dies right after the batch's insert_many: nothing published, nothing acked. The
    next router publishes exactly the planned children, with the planned message ids, once."""
    from handlers.router import Router

    env.store.add_rule(FollowerRule(rule_id="r", leader="acc", follower="fol", ratio=1.0))
    env.executor("acc", "fol")

    class Crash(BaseException):
        pass

    declare_queue_sync(env.ch, env.topo.router_orders.with_bindings())
    env.ch.queue_bind(env.topo.router_orders.name, env.topo.order, "#")
    for b in (_body("acc", "c-3"), _body("acc", "c-4")):           # waiting: one batch
        env.publish(env.topo.order, "acc", b)
    # batch_wait: both orders in the one batch even if the first read brings only one of them
    r1 = Router(env.settings, env.topo, env.db, batch_wait=0.5)

    def boom(*_a: Any, **_k: Any) -> None:
        raise Crash("killed after the plan insert")
    r1._publish_records = boom  # type: ignore[method-assign]  # noqa: SLF001
    t = threading.Thread(target=lambda: pytest.raises(Crash, r1.run), daemon=True)
    t.start()
    wait_for(lambda: env.store.get_order("c-4") is not None, 10, what="plans inserted")
    t.join(10)
    planned = {oid: [c["message_id"] for c in env.store.get_order(oid)["children"]] for oid in ("c-3", "c-4")}
    assert all(env.store.get_order(o)["state"] == "planned" for o in planned)
    assert env.get_all(env.topo.exec_queue("acc").name) == []             # nothing went out
    r1.connection.close()                                                 # the crash: unacked -> redelivered
    env.start()
    acc = [(p.message_id, b["order_id"]) for p, b in wait_for(
        lambda: (lambda g: g if len(g) >= 2 else None)(env.get_all(env.topo.exec_queue("acc").name)), 10,
        what="resumed children")]
    fol = env.collect(env.topo.exec_queue("fol").name, 2)
    assert sorted(acc) == sorted((planned[o][0], o) for o in planned)
    assert sorted(m["order_id"] for m in fol) == ["c-3/f/fol", "c-4/f/fol"]
    wait_for(lambda: all(env.store.get_order(o)["state"] == "routed" for o in planned), 10, what="routed")
    assert not env.store.audit_of(parent_id="c-3", action="duplicate")
    env.order("acc", "c-3")                                               # once more: a duplicate now
    wait_for(lambda: env.store.audit_of(parent_id="c-3", action="duplicate"), 10, what="duplicate")
    assert env.get_all(env.topo.exec_queue("acc").name) == []


def test_force_close_then_opening_orders_in_the_next_batch_are_refused(env: Env) -> None:
    """The risk queue is drained before a batch: a force-close waiting there blocks every opening
    order of the batch, including ones delivered before it; closes pass."""
    url, user = _risk_identity(env)
    _force_close_setup(env)
    env.executor("acc")
    declare_queue_sync(env.ch, env.topo.router_risk)
    _risk_publish(env, ForceClose(command_id="fc-b", account="acc", reason="margin", operator="desk"), url, user)
    _orders_in_one_batch(env, [_body("acc", "o-open"), _body("acc", "o-close", direction="SELL", offset="CLOSE")])
    msgs = env.exec_msgs("acc", 3)
    ids = [m["order_id"] for m in msgs]
    assert "o-open" not in ids and ids[-1] == "o-close"
    rep = env.collect(env.reports, 1)
    assert rep[0]["order_id"] == "o-open" and rep[0]["field"] == "offset"


# the writes after the confirms (writer thread) and the pushed risk queue ------------------------
@pytest.mark.parametrize("failing", ["audit_batches", "finish_many"])
def test_marks_failing_after_the_publish_requeue_the_batch_which_resumes_once(env: Env, failing: str) -> None:
    """The audit document and the ``routed`` mark are written after the confirms, on the writer
    thread. When that write fails the batch is requeued: the redelivery publishes the same child
    (same message id) again, audits the decisions only if their document is missing, and marks
    the plan."""
    from pymongo.errors import OperationFailure

    env.executor("acc")
    router = env.start()
    real = getattr(router.store, failing)
    calls: list[int] = []

    def fail_once(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OperationFailure(f"injected: {failing} failed")
        return real(*a, **kw)

    setattr(router.store, failing, fail_once)
    env.order("acc", "w-1")
    wait_for(lambda: (env.store.get_order("w-1") or {}).get("state") == "routed", 15, what="routed after the retry")
    sent = env.get_all(env.topo.exec_queue("acc").name)
    assert [b["order_id"] for _p, b in sent] == ["w-1", "w-1"]          # published again, same child ...
    assert sent[0][0].message_id == sent[1][0].message_id                # ... with the same message id
    assert len(env.store.audit_of(parent_id="w-1", action="direct")) == 1   # the decision, once
    assert len(env.store.audit_of(parent_id="w-1", action="resume")) == 1


def test_a_duplicate_delivered_while_the_first_is_being_marked_is_not_placed_again(env: Env) -> None:
    """The stored plan still says ``planned`` while its batch's marks wait on the writer thread;
    a second delivery of the order then must not be taken for a resume."""
    env.executor("acc")
    router = env.start()
    release = threading.Event()
    real = router.store.finish_many

    def held(*a: Any, **kw: Any) -> Any:
        release.wait(15)
        return real(*a, **kw)

    router.store.finish_many = held
    try:
        env.order("acc", "h-1")
        wait_for(lambda: router.counts["orders"] == 1, 10, what="h-1 routed")
        env.order("acc", "h-1")
        wait_for(lambda: router.counts["duplicates"] == 1, 10, what="the second delivery seen as a duplicate")
        assert env.store.get_order("h-1")["state"] == "planned"          # the marks had not landed
    finally:
        release.set()
    wait_for(lambda: env.store.get_order("h-1")["state"] == "routed", 10, what="routed")
    assert [b["order_id"] for _p, b in env.get_all(env.topo.exec_queue("acc").name)] == ["h-1"]
    wait_for(lambda: env.store.audit_of(parent_id="h-1", action="duplicate"), 10, what="the duplicate audited")


def test_a_failed_risk_command_is_retried_before_the_ones_after_it(env: Env) -> None:
    """Risk commands are pushed to the router. One that fails is requeued together with every
    command after it, in order: a release queued right behind a force-close still ends the
    account released, not reduce-only."""
    url, user = _risk_identity(env)
    _force_close_setup(env)
    env.executor("acc")
    declare_queue_sync(env.ch, env.topo.router_risk)
    _risk_publish(env, ForceClose(command_id="fc-r", account="acc", reason="margin", operator="desk"), url, user)
    _risk_publish(env, Release(command_id="rel-r", account="acc", operator="desk"), url, user)
    calls: list[int] = []

    def inject(router: Any) -> None:      # both commands are in the router's inbox when the first fails
        real = router._on_force_close   # noqa: SLF001

        def fail_once(cmd: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected: force-close failed")
            real(cmd)

        router._on_force_close = fail_once   # noqa: SLF001

    env.start(before=inject)
    wait_for(lambda: env.store.get_processed("release:rel-r") is not None, 15, what="the release handled")
    assert len(calls) == 2                                               # the force-close, failed then done
    assert env.store.get_processed("forceclose:fc-r")["state"] == "done"
    assert not env.db["account_state"].find_one({"_id": "acc"})["reduce_only"]
