"""Fault-suite fixtures: the whole platform as real subprocesses, a load (ticks + orders with
copy-trade and a force-close), private servers to break, and the exactly-once checks.

* ``platform``: tickhandler, barhandler, router, paper executor (accounts L and F, F copies L),
  account daemon, risk monitor -- ``python -m handlers.<name>`` with a log each, on the test's
  own namespace and database. ``kill9(name)`` / ``restart(name)`` by PID, never by name.
* ``Load``: a thread streaming random-source ticks (confirmed, re-sent after a broker error) and
  a thread streaming orders to ``qaorder`` (confirmed), a force-close as the risk identity in
  the middle and a release after it.
* ``Checker``: the guarantees after the fault (ticks stored once, closed bars stored and
  published once, each accepted child at its executor once, fills counted once, every daemon
  alive) and a :class:`Row` of the results table (``tests/faults/results.jsonl``).
* ``private_broker``: an extra standalone RabbitMQ node (``scripts/cluster.py node-up``, AMQP
  127.0.0.1:5691) for restarts; ``private_mongo``: an nx-27017 of our own, stopped and started
  by PID. The shared servers are never stopped.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.helpers import expected_after_cleaning as expected_ticks
from tests.helpers import free_port
from tests.helpers import risk_url as configured_risk_url
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("QA_FAULTS_RESULTS", ROOT / ".qaflow" / "faults" / "results.jsonl"))
INSTRUMENTS = ["SHFE.rb2605", "DCE.i2605", "CZCE.SR605"]
LEADER, FOLLOWER = "L", "F"
PRIVATE_NODE, PRIVATE_PORT = "rabbitf", 5691

# name -> (module argv, readiness line in its log, input queue attribute of Topology or None)
DAEMONS: dict[str, tuple[tuple[str, ...], str]] = {
    "tickhandler": (("handlers.tickhandler", "--batch-size", "200"), "tickhandler consuming"),
    "barhandler": (("handlers.barhandler", "--subscribe", "SHFE.rb2605:1min"), "barhandler ready"),
    "router": (("handlers.router",), "router started"),
    "executor": (("handlers.broker", "sim", "--account", LEADER, "--account", FOLLOWER), "sim executor ready"),
    "account": (("handlers.account",), "account daemon ready"),
    "risk": (("handlers.risk",), "risk monitor started"),
}


# results table --------------------------------------------------------------------------------
@dataclass
class Row:
    fault: str
    in_flight: int = 0
    lost: int = 0
    duplicated: int = 0
    recovery_s: float = 0.0
    redelivered_same_id: int = 0   # at-least-once copies with the same message id, deduplicated downstream
    detail: str = ""
    duration_s: float = 0.0

    def save(self) -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps({**asdict(self), "at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


# servers ---------------------------------------------------------------------------------------
def amqp_answers(url: str) -> bool:
    try:
        params = pika.URLParameters(url)
        params.socket_timeout = 1
        params.blocked_connection_timeout = 2
        pika.BlockingConnection(params).close()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def risk_url(amqp_url: str) -> str:
    url = configured_risk_url()
    if not url or not amqp_answers(url):
        if os.environ.get("CI"):
            pytest.fail("the risk identity (QA_RISK_AMQP_URL) cannot log in")
        pytest.skip("the risk identity (QA_RISK_AMQP_URL) cannot log in")
    return url


class PrivateBroker:
    """A standalone RabbitMQ node of our own (rabbitf@localhost, 127.0.0.1:5691)."""

    def __init__(self) -> None:
        self.url = f"amqp://guest:guest@127.0.0.1:{PRIVATE_PORT}/%2F"
        self.node = f"{PRIVATE_NODE}@localhost"
        self.risk_password = uuid.uuid4().hex
        self.risk_url = f"amqp://qarisk:{self.risk_password}@127.0.0.1:{PRIVATE_PORT}/%2F"

    def up(self) -> None:
        if not amqp_answers(self.url):
            r = subprocess.run([sys.executable, "scripts/cluster.py", "node-up", "--name", PRIVATE_NODE, "--port",
                                str(PRIVATE_PORT)], cwd=ROOT, capture_output=True, text=True, timeout=180)
            if r.returncode != 0 or not amqp_answers(self.url):
                pytest.skip(f"could not start a private RabbitMQ node: {r.stdout[-500:]} {r.stderr[-500:]}")
        # the risk identity on this node, with a fresh password each session
        self.ctl("add_user", "qarisk", self.risk_password, check=False)
        self.ctl("change_password", "qarisk", self.risk_password)
        self.ctl("set_permissions", "-p", "/", "qarisk", ".*", ".*", ".*")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["rabbitmqctl", "-n", self.node, *args], capture_output=True, text=True, timeout=90)
        if check and r.returncode != 0:
            raise AssertionError(f"rabbitmqctl {args[0]} failed: {r.stderr[-300:]}")
        return r

    def restart_app(self) -> float:
        """stop_app + start_app; returns seconds until AMQP answered again."""
        t0 = time.monotonic()
        self.ctl("stop_app")
        self.ctl("start_app")
        wait_for(lambda: amqp_answers(self.url), 60, 0.2, "private node answering after start_app")
        return time.monotonic() - t0

    def ensure_running(self) -> None:
        if not amqp_answers(self.url):
            self.ctl("start_app", check=False)
            wait_for(lambda: amqp_answers(self.url), 60, 0.2, "private node answering")


@pytest.fixture(scope="session")
def private_broker() -> Iterator[PrivateBroker]:
    if not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        pytest.skip("rabbitmq-server is not installed")
    b = PrivateBroker()
    b.up()
    yield b
    b.ensure_running()   # left up for the next run (node-down removes it: python scripts/cluster.py node-down --name rabbitf)


class PrivateMongo:
    """An nx-27017 of our own on a free port; stop()/start() by its PID only."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / "nx-data"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = tmp / "nx.log"
        self.url = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        exe = Path(sys.executable).with_name("nx-27017")
        # its own log and pid files too: by default nx-27017 writes /tmp/nx_27017.log and .pid
        self.proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "-p", str(self.port), "--data-dir", str(self.dir),
                                      "--log-file", str(self.log), "--pid-file", str(self.dir / "nx.pid")],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_for(self.answers, 30, 0.1, "private nx-27017 answering")
        return time.monotonic() - t0

    def answers(self) -> bool:
        import pymongo

        try:
            c = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=500)
            c.admin.command("ping")
            c.close()
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


@pytest.fixture
def private_mongo(tmp_path: Path) -> Iterator[PrivateMongo]:
    exe = Path(sys.executable).with_name("nx-27017")
    if not exe.exists():
        pytest.skip("nx-27017 is not installed in the virtualenv")
    m = PrivateMongo(tmp_path)
    m.start()
    yield m
    m.stop()


# the platform ----------------------------------------------------------------------------------
class Platform:
    def __init__(self, *, amqp_url: str, mongo_url: str, db_name: str, namespace: str, tmp: Path,
                 risk_url: str, daemons: tuple[str, ...] = tuple(DAEMONS), daemon_amqp_url: str | None = None) -> None:
        self.amqp_url, self.mongo_url, self.db_name, self.namespace = amqp_url, mongo_url, db_name, namespace
        self.tmp, self.risk_url = tmp, risk_url
        self.names = daemons
        self.env = dict(os.environ, QA_AMQP_URL=daemon_amqp_url or amqp_url, QA_MONGO_URL=mongo_url, QA_MONGO_DB=db_name,
                        QA_NAMESPACE=namespace, QA_RISK_AMQP_URL=risk_url, QA_RISK_USER="qarisk",
                        QA_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT))
        self.env.pop("QA_RISK_PASSWORD", None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.generation: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()

    def start(self, name: str) -> subprocess.Popen[bytes]:
        argv, _ready = DAEMONS[name]
        self.generation[name] += 1
        log = self.tmp / f"{name}.{self.generation[name]}.log"
        self.logs[name] = log
        out = open(log, "wb")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=self.env, stdout=out, stderr=out)
        out.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        try:
            return self.logs[name].read_text(errors="replace")
        except OSError:
            return ""

    def all_logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log"))}

    def ready(self, name: str) -> bool:
        return DAEMONS[name][1] in self.log(name)

    def wait_ready(self, name: str, timeout: float = 45) -> None:
        def ok() -> bool:
            p = self.procs[name]
            if p.poll() is not None:
                raise AssertionError(f"{name} exited {p.returncode} while starting:\n{self.log(name)[-3000:]}")
            return self.ready(name)

        wait_for(ok, timeout, 0.05, f"{name} ready")

    def up(self) -> None:
        order = [n for n in ("executor", "account", "tickhandler", "router", "barhandler", "risk") if n in self.names]
        for n in order:
            self.start(n)
        for n in order:
            self.wait_ready(n)

    def kill9(self, name: str) -> None:
        p = self.procs[name]
        assert p.poll() is None, f"{name} was not running:\n{self.log(name)[-2000:]}"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def restart(self, name: str) -> float:
        """Start ``name`` again; returns the seconds until it logged its readiness line."""
        t0 = time.monotonic()
        self.restarts[name] += 1
        self.start(name)
        self.wait_ready(name)
        return time.monotonic() - t0

    def dead(self) -> dict[str, int]:
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                codes[n] = None
        return codes


def queue_depth(url: str, queue: str) -> int:
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except Exception:  # noqa: BLE001
        return -1
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


# the load ---------------------------------------------------------------------------------------
class Load:
    """Ticks and orders while a fault happens. Everything it counts was confirmed by the broker."""

    def __init__(self, platform: Platform, topo: Any, *, tick_rate: float = 600.0, order_every: float = 0.15,
                 seed: int = 3, persistent_ticks: bool = False) -> None:
        self.p, self.topo = platform, topo
        self.persistent_ticks = persistent_ticks   # False: as `qaflow source` publishes (transient ticks)
        self.tick_rate, self.order_every, self.seed = tick_rate, order_every, seed
        self.stop_ev = threading.Event()
        self.ticks: list[Any] = []          # every tick confirmed (or re-sent until confirmed), in order
        self.last: dict[str, Any] = {}      # symbol -> last tick generated
        self.orders: list[str] = []         # order ids confirmed on qaorder
        self.force_closes: list[str] = []
        self.errors: list[str] = []
        self.publish_retries = 0
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # ticks
    def _ticks(self) -> None:
        from brokers.random_source import RandomSource
        from qapubsub import keys
        from qapubsub.sync import Connection, StreamPublisher

        src = RandomSource(seed=self.seed, instruments=INSTRUMENTS, start="2025-03-04 09:00:00")
        it = src.ticks()
        conn = Connection(urls=[self.p.amqp_url], client_name="faults-ticks")
        pub = StreamPublisher(conn, topology=self.topo, persistent=self.persistent_ticks)
        batch = max(1, int(self.tick_rate / 20))
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            chunk = [next(it) for _ in range(batch)]
            for _attempt in range(300):   # re-send until confirmed (a duplicate is dropped by the tick store)
                try:
                    for t in chunk:
                        pub.publish(self.topo.tick, keys.tick_key(t.exchange, t.symbol), t)
                    pub.flush()
                    break
                except Exception as exc:  # noqa: BLE001 - broker restarting / connection cut: send again
                    self.publish_retries += 1
                    self.errors.append(f"ticks: {type(exc).__name__}")
                    time.sleep(0.2)
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                    conn = Connection(urls=[self.p.amqp_url], client_name="faults-ticks")
                    pub = StreamPublisher(conn, topology=self.topo, persistent=self.persistent_ticks)
            else:
                raise AssertionError("ticks could not be published for 60 s")
            with self._lock:
                self.ticks.extend(chunk)
                for t in chunk:
                    self.last[t.symbol] = t
            time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))
        conn.close()

    # orders
    def _publish_cmd(self, conn_url: str, exchange: str, key: str, msg: Any, user_id: str | None = None) -> None:
        from qapubsub.messages import amqp_properties, encode

        for attempt in range(60):
            try:
                conn = pika.BlockingConnection(pika.URLParameters(conn_url))
                try:
                    ch = conn.channel()
                    ch.confirm_delivery()
                    props = amqp_properties(msg)
                    ch.basic_publish(exchange, key, encode(msg), pika.BasicProperties(user_id=user_id, **props),
                                     mandatory=True)
                    return
                finally:
                    if conn.is_open:
                        conn.close()
            except Exception as exc:  # noqa: BLE001 - same id again: the router is idempotent by id
                self.publish_retries += 1
                self.errors.append(f"cmd: {type(exc).__name__}")
                time.sleep(0.25)
        raise AssertionError(f"could not publish {msg!r}")

    def _orders(self) -> None:
        from qaorder.models import Direction, Exchange, ForceClose, Offset, Order, PriceType, Release
        from qapubsub import keys
        from qapubsub.messages import amqp_properties, encode

        conn = ch = None
        n = 0
        while not self.stop_ev.is_set():
            with self._lock:
                last = self.last.get("rb2605")
            if last is None:
                time.sleep(0.05)
                continue
            n += 1
            if n == 12:      # the force-close in the middle, as the risk identity, then a release
                cid = f"fc-{uuid.uuid4().hex[:8]}"
                self._publish_cmd(self.p.risk_url, self.topo.risk, keys.risk_key(LEADER),
                                  ForceClose(command_id=cid, account=LEADER, reason="fault suite", operator="faults"),
                                  user_id="qarisk")
                self.force_closes.append(cid)
                time.sleep(0.5)
                self._publish_cmd(self.p.risk_url, self.topo.risk, keys.risk_key(LEADER),
                                  Release(command_id=f"rel-{cid}", account=LEADER, operator="faults", reason="done"),
                                  user_id="qarisk")
                time.sleep(0.3)
            buy = n % 3 != 0
            o = Order(order_id=f"o{n:04d}-{uuid.uuid4().hex[:6]}", account=LEADER, symbol="rb2605",
                      exchange=Exchange.SHFE, direction=Direction.BUY if buy else Direction.SELL,
                      offset=Offset.OPEN if buy else Offset.CLOSE, price_type=PriceType.LIMIT,
                      price=(last.ask_price_1 + 5) if buy else (last.bid_price_1 - 5), volume=1 + n % 2,
                      strategy_id="faults")
            for _attempt in range(80):
                try:
                    if conn is None or not conn.is_open:
                        conn = pika.BlockingConnection(pika.URLParameters(self.p.amqp_url))
                        ch = conn.channel()
                        ch.confirm_delivery()
                    ch.basic_publish(self.topo.order, keys.order_key(LEADER), encode(o),  # type: ignore[union-attr]
                                     pika.BasicProperties(**amqp_properties(o)), mandatory=True)
                    break
                except Exception as exc:  # noqa: BLE001 - resend the same order id
                    self.publish_retries += 1
                    self.errors.append(f"orders: {type(exc).__name__}")
                    conn = None
                    time.sleep(0.25)
            else:
                raise AssertionError("orders could not be published for 20 s")
            self.orders.append(o.order_id)
            self.stop_ev.wait(self.order_every)
        if conn is not None and conn.is_open:
            conn.close()

    def start(self) -> Load:
        for target in (self._ticks, self._orders):
            def run(target: Any = target) -> None:
                try:
                    target()
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(f"FATAL {target.__name__}: {type(exc).__name__}: {exc}")
            t = threading.Thread(target=run, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self._threads:
            t.join(60)
        fatal = [e for e in self.errors if e.startswith("FATAL")]
        assert not fatal, fatal


# the checks -------------------------------------------------------------------------------------
class Monitor:
    """The test's own durable queues on qa.bar, qa.exec and qa.report (everything, counted after)."""

    def __init__(self, url: str, topo: Any) -> None:
        self.url, self.topo = url, topo
        self.queues = {"bar": f"{topo.namespace}faults.bar", "exec": f"{topo.namespace}faults.exec",
                       "report": f"{topo.namespace}faults.report"}
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        for kind, ex in (("bar", topo.bar), ("exec", topo.exec), ("report", topo.report)):
            ch.queue_declare(self.queues[kind], durable=True)
            ch.queue_bind(self.queues[kind], ex, routing_key="#")
        conn.close()
        self.seen: dict[str, list[tuple[str, str, dict[str, Any]]]] = defaultdict(list)

    def drain(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        for kind, q in self.queues.items():
            while True:
                m, props, body = ch.basic_get(q, auto_ack=True)
                if m is None:
                    break
                self.seen[kind].append((m.routing_key, props.message_id, json.loads(body)))
        conn.close()


def stored_ticks(db: Any) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
    from brokers.random_source import market_fields
    from qamarket.store import TickStore

    store = TickStore(db, create_indexes=False)
    return {(ex, sym): [market_fields(t) for t in store.ticks(ex, sym)] for ex, sym in store.instruments()}


@dataclass
class Verdict:
    lost: int = 0
    duplicated: int = 0
    redelivered_same_id: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, what: str, lost: int = 0, dup: int = 0) -> None:
        self.problems.append(what)
        self.lost += lost
        self.duplicated += dup


def settle(platform: Platform, topo: Any, load: Load, db: Any, timeout: float = 60,
           ticks_exact: bool = True) -> None:
    """Wait until the platform caught up: every tick stored, every order handled, queues empty."""
    exp = expected_ticks(load.ticks)
    total = sum(len(v) for v in exp.values())

    def ticks_done() -> bool:
        return sum(len(v) for v in stored_ticks(db).values()) >= total

    if ticks_exact:
        wait_for(ticks_done, timeout, 0.5, f"all {total} clean ticks stored")
    else:
        wait_for(lambda: queue_depth(platform.amqp_url, topo.tickhandler.name) == 0, timeout, 0.3, "ticks drained")

    def orders_done() -> bool:
        return db.orders.count_documents({"_id": {"$in": load.orders}, "state": {"$in": ["routed", "rejected"]}}) \
            == len(load.orders)

    wait_for(orders_done, timeout, 0.5, f"all {len(load.orders)} orders routed or rejected")
    for q in (topo.exec_queue(LEADER).name, topo.exec_queue(FOLLOWER).name, topo.account_reports.name):
        wait_for(lambda q=q: queue_depth(platform.amqp_url, q) == 0, timeout, 0.3, f"{q} drained")
    time.sleep(2.5)  # the last bars close on the feed clock's timer; last fills reach the accounts


def check_all(platform: Platform, topo: Any, load: Load, db: Any, mon: Monitor,
              tickhandler_killed: bool = False, transient_ticks_may_be_lost: bool = False,
              bar_confirms_may_be_lost: bool = False) -> Verdict:
    v = Verdict()
    # ticks: exactly the clean ticks, once
    exp, got = expected_ticks(load.ticks), stored_ticks(db)
    for key in set(exp) | set(got):
        e, g = Counter(exp.get(key, [])), Counter(got.get(key, []))
        lost, dup = sum((e - g).values()), sum((g - e).values())
        if lost and transient_ticks_may_be_lost and not dup:
            v.notes.append(f"ticks {key}: {lost} transient ticks dropped by the broker restart (never acked)")
        elif lost or dup:
            v.fail(f"ticks {key}: {lost} lost, {dup} extra", lost, dup)
    # closed bars: stored once (unique ids), published, every closed minute of stored ticks has its bar
    mon.drain()
    bars_bus = Counter(mid for _k, mid, _b in mon.seen["bar"])
    db_bar_ids = {f"bar.{b['freq']}.{b['exchange']}.{b['symbol']}.{b['datetime']}" for b in db.bars.find()}
    missing_bus = db_bar_ids - set(bars_bus)
    if missing_bus:
        v.fail(f"{len(missing_bus)} stored bars never published, e.g. {sorted(missing_bus)[:3]}", len(missing_bus))
    not_stored = set(bars_bus) - db_bar_ids
    if not_stored:
        v.fail(f"{len(not_stored)} published bars not stored", len(not_stored))
    same_id = sum(n - 1 for n in bars_bus.values() if n > 1)
    if same_id:
        v.redelivered_same_id += same_id
        v.notes.append(f"{same_id} closed bar(s) published again with the same message id")
        # A copy with the same id is the at-least-once contract (consumers deduplicate by message id):
        # after a crash, or when the connection dies between a publish and its confirm -- the publisher
        # cannot know the broker had it and sends it again. Contents must still be equal (checked below).
        if not (tickhandler_killed or bar_confirms_may_be_lost):
            v.fail(f"{same_id} closed bars published twice without a tickhandler crash", 0, same_id)
    contents: dict[str, set[str]] = defaultdict(set)
    for _k, mid, b in mon.seen["bar"]:
        contents[mid].add(json.dumps({k: b[k] for k in ("open", "high", "low", "close", "volume")}, sort_keys=True))
    differing = [m for m, c in contents.items() if len(c) > 1]
    if differing:
        v.fail(f"{len(differing)} bars published twice with different contents, e.g. {differing[:2]}", 0, len(differing))
    minutes: dict[tuple[str, str], set[int]] = defaultdict(set)
    for (ex, sym), rows in got.items():
        for r in rows:
            minutes[(ex, sym)].add(int(r[2]) // 60_000)        # market_fields: symbol, exchange, datetime, ...
    stored_1min: dict[tuple[str, str], set[int]] = defaultdict(set)
    for b in db.bars.find({"freq": "1min"}, {"exchange": 1, "symbol": 1, "datetime": 1}):
        stored_1min[(b["exchange"], b["symbol"])].add(int(b["datetime"]) // 60_000)
    for (ex, sym), mins in minutes.items():
        closed = sorted(mins)[:-2]   # the newest minutes may still be open
        have = stored_1min.get((sym, ex) if False else (str(ex), sym), set()) or stored_1min.get((ex, sym), set())
        # a session's closing tick belongs to the bar before it; an auction tick to the bar after it
        miss = [m for m in closed if not ({m - 1, m, m + 1} & have)]
        if miss:
            v.fail(f"{ex}.{sym}: {len(miss)} closed minutes without a stored 1min bar", len(miss))
    check_orders_and_fills(v, db, load.orders, mon)
    dead = {n: c for n, c in platform.dead().items()}
    if dead:
        v.fail(f"daemons exited: {dead}")
    return v


def check_orders_and_fills(v: Verdict, db: Any, orders: list[str], mon: Monitor) -> None:
    """Orders routed once, each accepted child at its executor once, fills counted once (``mon`` drained)."""
    # orders: every confirmed order handled once; every accepted child reached its executor once
    recs = {d["_id"]: d for d in db.orders.find({"_id": {"$in": list(orders)}})}
    lost_orders = [o for o in orders if o not in recs or recs[o].get("state") not in ("routed", "rejected")]
    if lost_orders:
        v.fail(f"{len(lost_orders)} orders not routed: {lost_orders[:3]}", len(lost_orders))
    accepted: dict[str, str] = {}   # child order id -> message id
    for rec in [*recs.values(), *db.processed.find({})]:
        # a plan marked routed/done had every child confirmed; only returned ones carry flags
        # (confirmed + error); the flags of the others are written only while a record is planned
        done = rec.get("state") in ("routed", "done")
        for c in rec.get("children", []):
            if (done or c.get("confirmed")) and not c.get("error") and c.get("kind", "order") == "order":
                accepted[c["order_id"]] = c["message_id"]
    routed_children = {c["order_id"] for r in recs.values() if r.get("state") == "routed"
                       for c in r.get("children", []) if not c.get("error")}
    if not routed_children <= set(accepted):
        v.fail("children of routed orders missing from the placement check below")
    v.notes.append(f"{len(accepted)} accepted children checked: once on qa.exec with the planned id, placed")
    exec_ids: dict[str, set[str]] = defaultdict(set)
    exec_copies: Counter[str] = Counter()
    for _k, mid, b in mon.seen["exec"]:
        if b.get("schema") == "qa.order":
            exec_ids[b["order_id"]].add(mid)
            exec_copies[b["order_id"]] += 1
    for oid, mid in accepted.items():
        if exec_ids.get(oid) != {mid}:
            v.fail(f"child {oid}: message ids on qa.exec {exec_ids.get(oid)} != planned {mid}",
                   0 if exec_ids.get(oid) else 1, 1 if len(exec_ids.get(oid, ())) > 1 else 0)
    v.redelivered_same_id += sum(n - 1 for n in exec_copies.values() if n > 1)
    sim = {d["_id"]: d for d in db.sim_orders.find({})}
    not_placed = [o for o in accepted if o not in sim]
    if not_placed:
        v.fail(f"{len(not_placed)} accepted children never placed at the executor: {not_placed[:3]}", len(not_placed))
    # fills: distinct trade ids on the bus == trades in the account documents; positions add up
    bus_trades: dict[str, dict[str, Any]] = {}
    trade_copies: Counter[str] = Counter()
    for _k, _mid, b in mon.seen["report"]:
        if b.get("schema") == "qa.trade":
            trade_copies[b["trade_id"]] += 1
            prev = bus_trades.setdefault(b["trade_id"], b)
            if (prev["volume"], prev["price"], prev["order_id"]) != (b["volume"], b["price"], b["order_id"]):
                v.fail(f"trade id {b['trade_id']} published twice with different fills", 0, 1)
    v.redelivered_same_id += sum(n - 1 for n in trade_copies.values() if n > 1)
    for acc in (LEADER, FOLLOWER):
        doc = db.accounts.find_one({"_id": acc}) or {}
        in_doc = set((doc.get("trades") or {}).keys())
        on_bus = {t for t, b in bus_trades.items() if b["account"] == acc}
        if on_bus - in_doc:
            v.fail(f"{acc}: {len(on_bus - in_doc)} fills not in the account", len(on_bus - in_doc))
        if in_doc - on_bus:
            v.notes.append(f"{acc}: {len(in_doc - on_bus)} account trades not seen on the bus")
        net = 0.0
        for b in bus_trades.values():
            if b["account"] == acc and b.get("symbol", "rb2605") == "rb2605":
                net += b["volume"] if b["direction"] == "BUY" else -b["volume"]
        pos = (doc.get("positions") or {}).get("SHFE.rb2605") or {}
        have = (pos.get("volume_long_today", 0) + pos.get("volume_long_his", 0)
                - pos.get("volume_short_today", 0) - pos.get("volume_short_his", 0))
        if abs(have - net) > 1e-9:
            v.fail(f"{acc}: position {have} != net of distinct fills {net} (a fill lost or counted twice)",
                   int(abs(have - net)) if have < net else 0, int(abs(have - net)) if have > net else 0)
        # the executor's own record: filled volume per order == fills on the bus
        for oid, d in sim.items():
            if d.get("account", acc) != acc:
                continue
    filled_sim: Counter[str] = Counter()
    for t in bus_trades.values():
        filled_sim[t["order_id"]] += t["volume"]
    for oid, d in sim.items():
        traded = float((d.get("order") or d).get("traded", d.get("traded", 0)) or 0)
        if traded and abs(traded - filled_sim.get(oid, 0)) > 1e-9:
            v.fail(f"sim order {oid}: traded {traded} != fills on the bus {filled_sim.get(oid, 0)}")


@pytest.fixture
def fault_topology(request: pytest.FixtureRequest, namespace: str) -> Iterator[Any]:
    """The platform topology on whichever broker the test runs (``fault_amqp_url`` fixture)."""
    from qapubsub.topology import Topology

    url = request.getfixturevalue("fault_amqp_url")
    topo = Topology(namespace)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    topo.declare_sync(conn.channel(), queues=(*topo.platform_queues, topo.exec_queue(LEADER), topo.exec_queue(FOLLOWER)))
    conn.close()
    yield topo
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    try:
        from qapubsub.management import Management, ManagementError

        mgmt_url = url.replace(":5691/", ":15691/") if ":5691/" in url else url
        names: list[str] = []
        exchanges: list[str] = []
        try:
            m = Management(mgmt_url)
            names = [n for n in m.queues() if n.startswith(namespace)]
            exchanges = [n for n in m.exchanges() if n.startswith(namespace)]
        except (ManagementError, Exception):  # noqa: BLE001
            pass
        for q in {*names, *(q.name for q in topo.platform_queues), topo.exec_queue(LEADER).name,
                  topo.exec_queue(FOLLOWER).name, *(f"{namespace}faults.{k}" for k in ("bar", "exec", "report"))}:
            ch.queue_delete(q)
        for e in {*exchanges, *(e.name for e in topo.exchanges)}:
            ch.exchange_delete(e)
    finally:
        conn.close()


def seed_db(db: Any) -> None:
    """Accounts L and F, F copies L at ratio 1, risk rules without the session check (tests run any hour)."""
    from qaaccount.store import AccountStore
    from qaorder.routing import FollowerRule, Sizing
    from qaorder.store import OrderStore
    from qarisk.store import DEFAULT_KEY, RiskStore

    accounts = AccountStore(db)
    accounts.open(LEADER, 10_000_000.0, trading_day="20250304")
    accounts.open(FOLLOWER, 10_000_000.0, trading_day="20250304")
    OrderStore(db).add_rule(FollowerRule(rule_id="faults-copy", leader=LEADER, follower=FOLLOWER,
                                         sizing=Sizing.RATIO, ratio=1.0))
    RiskStore(db).set_config(DEFAULT_KEY, {"session": {"enabled": False}})
