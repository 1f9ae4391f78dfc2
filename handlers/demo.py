"""``qaflow demo`` -- what ``make run`` shows: the platform working, live, on this machine.

It starts the daemons as real processes (tickhandler, barhandler, router, paper executor
for three accounts, account daemon, risk monitor, the example strategy, web; logs in
``.qaflow/logs``), opens three paper accounts with a copy-trade rule (``demo3`` follows
``demo1`` at half size), streams random-price ticks,
and then walks through the path a user cares about, printing each step:

first tick stored -> first closed bar -> an order to ``demo1`` (native JSON on
``qaorder``) -> the router copies it to ``demo2`` -> the paper executor fills both ->
the accounts show positions; a QATrader-format order on ``QAORDER_ROUTER`` is routed
too; an order with a missing price is rejected with the field named; the example strategy
(moving-average cross on rb2605 1-min bars, history from the barhandler) trades demo1 and
demo2; the dashboard answers.

Then a one-line summary every second until Ctrl-C (or ``--duration``): ticks/s, bars,
orders, fills, per-account PnL. Ctrl-C stops the source and SIGTERMs every daemon, which
drain and exit 0. The exit code is 0 only if every step happened and every daemon
exited 0.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from handlers.stack import Daemon, Stack, default_daemons

T = TypeVar("T")
ACCOUNTS = ("demo1", "demo2", "demo3")  # the strategy trades demo1 and demo2; demo3 copies demo1
INSTRUMENTS = ["SHFE.rb2605", "SHFE.cu2605", "DCE.i2605", "CZCE.SR605", "CFFEX.IF2606", "SSE.600000"]
RULE_ID = "demo-copy-demo1-demo3"
STEPS = 10


class StepFailed(RuntimeError):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def wait(what: str, cond: Callable[[], T | None], timeout: float, stack: Stack) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        dead = stack.dead()
        if dead:
            raise StepFailed(f"while waiting for {what}: daemon(s) exited {dead}; see .qaflow/logs/")
        if time.monotonic() > deadline:
            raise StepFailed(f"{what} did not happen within {timeout:.0f} s; see .qaflow/logs/")
        time.sleep(0.1)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds of live summary before stopping (default 0: until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=400.0, help="random ticks per second (default 400)")
    parser.add_argument("--seed", type=int, default=7)


def run(args: argparse.Namespace) -> int:  # noqa: C901 - a script of steps, read top to bottom
    from brokers.random_source import RandomSource
    from qaaccount.store import AccountExists, AccountStore
    from qamarket.store import TickStore
    from qaorder.models import Direction, Exchange, Offset, Order, PriceType
    from qaorder.routing import FollowerRule, Sizing
    from qaorder.store import OrderStore
    from qapubsub import keys
    from qapubsub.messages import new_id
    from qapubsub.settings import Settings, mongo_client, redact_url
    from qapubsub.sync import Connection, Publisher, StreamPublisher
    from qapubsub.topology import Topology
    from qamarket.sessions import to_ms

    if not os.environ.get("QA_LOG_LEVEL"):
        logging.getLogger().setLevel(logging.WARNING)  # the steps are the demo's output; daemons log to files
    settings = Settings.from_env()
    topo = Topology(settings.namespace)
    say(f"QAFlow demo -- broker {redact_url(settings.amqp_url)}, MongoDB {redact_url(settings.mongo_url)} "
        f"(database {settings.mongo_db})")
    client = mongo_client(settings)
    db = client[settings.mongo_db]
    conn = Connection(settings, client_name="qaflow-demo")
    topo.declare_sync(conn.channel(), queues=(*topo.platform_queues, *(topo.exec_queue(a) for a in ACCOUNTS)))
    say(f"[1/{STEPS}] topology declared: {len(topo.exchanges)} exchanges, platform queues, executor queues for "
        f"{', '.join(ACCOUNTS)}")

    accounts = AccountStore(db)
    for name, cash in zip(ACCOUNTS, (1_000_000.0, 1_000_000.0, 500_000.0)):
        try:
            accounts.open(name, cash)
            say(f"      opened paper account {name} with {cash:,.0f}")
        except AccountExists:
            say(f"      paper account {name} exists (kept from an earlier run)")
    orders = OrderStore(db)
    if RULE_ID not in {r.rule_id for r in orders.load_rules()}:
        orders.add_rule(FollowerRule(rule_id=RULE_ID, leader="demo1", follower="demo3", sizing=Sizing.RATIO,
                                     ratio=0.5))
    say("      copy-trade rule: demo3 follows demo1 at ratio 0.5 (qaflow follow list)")

    web_port = _web_port()
    token = os.environ.get("QA_WEB_TOKEN") or new_id()
    stack = Stack(env={"QA_WEB_TOKEN": token})
    daemons: list[Daemon] = default_daemons(ACCOUNTS, ("demo1", "demo2"), web_port)
    for d in daemons:
        p = stack.start(d)
        say(f"[2/{STEPS}] started {d.name:12} pid {p.pid:<7} log {stack.logs / (d.name + '.log')}")

    stop = threading.Event()
    interrupted = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        if interrupted.is_set():
            sys.exit(130)
        interrupted.set()
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    published = [0]
    # Continue after what an earlier run stored (the tick store would drop a replay of the same times).
    newest = db.ticks.find_one({}, {"t1": 1}, sort=[("t1", -1)])
    start_ms = int(newest["t1"]) + 60_000 if newest else to_ms(_dt.datetime(2025, 3, 4, 9, 0))
    ticks_before, bars_before = _tick_count(db), db.bars.count_documents({"freq": "1min"})

    def stream() -> None:
        src_conn = Connection(settings, client_name="qaflow-demo-source")
        pub = StreamPublisher(src_conn, topology=topo)
        src = RandomSource(seed=args.seed, instruments=INSTRUMENTS, start=start_ms)
        try:
            published[0] = src.publish(pub, rate=args.rate, stop=stop, install_signals=False)
        finally:
            src_conn.close()

    report_ch = conn.channel()
    rq = report_ch.queue_declare("", exclusive=True).method.queue
    report_ch.queue_bind(rq, topo.report, routing_key=keys.reports_of("*", "reject"))
    ticks = TickStore(db, create_indexes=False)
    ok = False
    codes: dict[str, int | None] = {}
    try:
        wait("the daemons to start consuming", lambda: _consumers_ready(conn, topo), 60, stack)
        source = threading.Thread(target=stream, name="random-source", daemon=True)
        source.start()
        say(f"[3/{STEPS}] random-price source streaming {len(INSTRUMENTS)} instruments at {args.rate:.0f} ticks/s")
        first = wait("the first stored ticks", lambda: _tick_count(db) - ticks_before, 30, stack)
        say(f"[4/{STEPS}] first ticks stored in MongoDB ({first} so far, in per-instrument chunks)")
        wait("the first closed bar", lambda: db.bars.count_documents({"freq": "1min"}) > bars_before, 60, stack)
        bar = db.bars.find_one({"freq": "1min"}, sort=[("datetime", -1)])
        say(f"[5/{STEPS}] first closed 1-min bar: {bar['exchange']}.{bar['symbol']} O {bar['open']} H {bar['high']} "
            f"L {bar['low']} C {bar['close']} V {bar['volume']:.0f}")

        last = wait("a quote for rb2605", lambda: ticks.last_tick("SHFE", "rb2605"), 30, stack)
        price = round(last.ask_price_1 + 2.0, 0)

        def long_rb(name: str) -> float:
            doc = db.accounts.find_one({"_id": name}) or {}
            pos = (doc.get("positions") or {}).get("SHFE.rb2605") or {}
            return float(pos.get("volume_long_today", 0) + pos.get("volume_long_his", 0))

        held = {name: long_rb(name) for name in ACCOUNTS}
        order = Order(order_id=f"demo-{new_id()}", account="demo1", symbol="rb2605", exchange=Exchange.SHFE,
                      direction=Direction.BUY, offset=Offset.OPEN, price_type=PriceType.LIMIT, price=price,
                      volume=4, strategy_id="demo")
        Publisher(conn, topology=topo).publish(topo.order, keys.order_key("demo1"), order)
        say(f"[6/{STEPS}] order {order.order_id}: demo1 BUY OPEN 4 rb2605 @ {price} published to qaorder")

        def filled() -> dict[str, float] | None:
            out = {name: long_rb(name) for name in ("demo1", "demo3")}
            return out if out["demo1"] >= held["demo1"] + 4 and out["demo3"] >= held["demo3"] + 2 else None

        got = wait("the fills of demo1 and its follower demo3", filled, 30, stack)
        got = {k: v - held[k] for k, v in got.items()}
        say(f"      filled: demo1 bought {got['demo1']:.0f}, demo3 bought {got['demo3']:.0f} (copy-trade at 0.5)")

        qatrader = {"topic": "sendorder", "account_cookie": "demo1", "strategy_id": "demo", "code": "rb2605",
                    "exchange_id": "SHFE", "order_direction": "SELL", "order_offset": "CLOSETODAY",
                    "price": round(last.bid_price_1 - 2.0, 0), "volume": 2, "order_id": f"qat-{new_id()}",
                    "order_time": time.strftime("%Y-%m-%d %H:%M:%S")}
        conn.channel().basic_publish(topo.qapubsub_order, "demo1", json.dumps(qatrader).encode())
        wait("the QATrader-format order to be routed",
             lambda: db.orders.find_one({"_id": qatrader["order_id"], "state": "routed"}), 30, stack)
        say(f"[7/{STEPS}] QATrader-format order {qatrader['order_id']} on QAORDER_ROUTER routed (SELL CLOSETODAY 2)")

        bad = {"schema": "qa.order", "order_id": f"bad-{new_id()}", "account": "demo1", "symbol": "rb2605",
               "exchange": "SHFE", "direction": "BUY", "offset": "OPEN", "price_type": "LIMIT", "volume": 1}
        conn.channel().basic_publish(topo.order, "demo1", json.dumps(bad).encode())

        def rejected() -> Any:
            m, _p, body = report_ch.basic_get(rq, auto_ack=True)
            return json.loads(body) if m else None

        rej = wait("the reject report of the bad order", rejected, 30, stack)
        say(f"[8/{STEPS}] order without a price rejected: field {rej.get('field')!r}: {rej.get('reason')} "
            f"(also in the dead-letter queue {topo.dead_letters.name})")
        strategy_orders = wait("the strategy's first orders (MA cross on rb2605 1-min bars)",
                               lambda: [d["_id"] for d in db.orders.find({}, {"_id": 1})
                                        if str(d["_id"]).startswith("ma-demo-")], 120, stack)
        say(f"[9/{STEPS}] strategy ma-demo (MA 3/8 cross) traded demo1 and demo2: {len(strategy_orders)} order(s), "
            f"e.g. {strategy_orders[0]}")
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/readyz", timeout=5) as resp:  # noqa: S310
            ready = resp.status
        say(f"[10/{STEPS}] dashboard ({'ready' if ready == 200 else ready}): http://127.0.0.1:{web_port}/"
            f"?token={token}")
        ok = True

        say("live (Ctrl-C to stop):" if not args.duration else f"live for {args.duration:.0f} s:")
        started = time.monotonic()
        last_count, last_t = _tick_count(db), time.monotonic()
        while not stop.is_set() and (not args.duration or time.monotonic() - started < args.duration):
            stop.wait(1.0)
            if stack.dead():
                raise StepFailed(f"daemon(s) exited {stack.dead()}; see .qaflow/logs/")
            n, t = _tick_count(db), time.monotonic()
            rate = (n - last_count) / max(t - last_t, 1e-6)
            last_count, last_t = n, t
            say("  " + _summary(db, rate))
    except StepFailed as exc:
        say(f"demo FAILED: {exc}")
        ok = False
    finally:
        stop.set()
        say("stopping: SIGTERM to every daemon ...")
        codes = stack.stop()
        for name, code in codes.items():
            say(f"  {name:12} exit {code}")
        conn.close()
        client.close()
    clean = all(c == 0 for c in codes.values())
    return 0 if ok and clean else 1


def _web_port() -> int:
    """QA_WEB_PORT, else 8010 if free, else any free loopback port."""
    import socket

    if os.environ.get("QA_WEB_PORT"):
        return int(os.environ["QA_WEB_PORT"])
    for port in (8010, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise StepFailed("no free port for the web service")


def _consumers_ready(conn: Any, topo: Any) -> bool:
    ch = conn.channel()
    try:
        for q in (topo.tickhandler.name, topo.router_orders.name, topo.account_reports.name,
                  topo.history_requests.name, *(topo.exec_queue(a).name for a in ACCOUNTS)):
            if ch.queue_declare(q, passive=True).method.consumer_count < 1:
                return False
        return True
    finally:
        ch.close()


def _tick_count(db: Any) -> int:
    rows = list(db.ticks.aggregate([{"$group": {"_id": None, "n": {"$sum": "$n"}}}]))
    return int(rows[0]["n"]) if rows else 0


def _summary(db: Any, rate: float) -> str:
    bars = db.bars.estimated_document_count()
    orders = db.orders.estimated_document_count()
    fills = sum(len((d.get("trades") or {})) for d in db.accounts.find({"_id": {"$in": list(ACCOUNTS)}},
                                                                       {"trades": 1}))
    pnl = []
    for d in db.accounts.find({"_id": {"$in": list(ACCOUNTS)}}, {"accounts": 1}):
        a = d.get("accounts") or {}
        pnl.append(f"{d['_id']} {a.get('balance', 0):,.0f} ({a.get('position_profit', 0):+,.0f})")
    return f"ticks/s {rate:6.0f} | bars {bars:5d} | orders {orders:3d} | fills {fills:3d} | " + " | ".join(pnl)
