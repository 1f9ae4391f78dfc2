"""Soak: the whole platform under a sustained tick load for ``--minutes`` (``make soak``, not in CI).

What it does (see docs/reliability.md, "## Soak"):

* **Rate**: unless ``--rate``/``SOAK_RATE`` is given, a quick in-run measurement of the tick pipeline's
  maximum first (``benchmarks.bench_pipeline.pipeline_run``: its own namespace, database and tickhandler,
  one tick per message, default ``--batch-size 1000 --prefetch 4000``, zero loss checked), target = 80 % of it.
* **Platform**: tickhandler, barhandler, router, paper executor, account, risk (as
  ``tests/faults/conftest.py::Platform`` starts them), plus the example strategy and the web daemon as
  ``handlers/stack.py::default_daemons`` has them; own uuid namespace (``soak<hex>.``) and database
  (``soak_<hex>``), logs under ``.qaflow/soak/<run>/``. Accounts L and F (F copies L) as in the fault
  suite, and demo1/demo2 for the strategy.
* **Load**: random-source ticks (22 default instruments) from a separate publisher process, paced at the
  target rate (confirmed; re-sent after a broker error); an order to L every second (the fault suite's
  ``Load`` order thread, with its force-close + release at the 12th order), copied to F.
* **Slow consumers**: a live queue bound to ``qa.tick`` (``#``, x-max-length ``--live-max``, drop-head) that
  nobody reads, and WebSocket clients of the web daemon that subscribe to every instrument and never read
  (a new one every minute; the web daemon must close them, 1013).
* **Samples** every 10 s: VmRSS of every daemon, depth of every queue of the namespace and every queue bound
  to one of its exchanges (management API), the broker's ``mem_used`` (``/api/nodes``).
* **Checks** at the end: ticks stored == clean ticks sent (count and an order-free hash of every market field),
  the tickhandler dropped none; the fault suite's ``check_orders_and_fills`` (orders routed once, each accepted
  child at its executor once, fills counted once, positions = net of fills); RSS flat (see ``RSS_*``); live
  queues never above their x-max-length; command queues drained; every daemon alive and exit 0 on SIGTERM.

``python scripts/soak.py --minutes 3 [--rate 6000] [--write docs/reliability.md]``; exit 1 if a check fails.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

START = "2025-03-04 09:00:00"     # a Tuesday, day session open
SEED = 20251121
SAMPLE_EVERY = 10.0
# RSS is "flat" when end (median of the last 3 samples) <= start (first sample after warm-up) + max(RSS_ABS_MB,
# RSS_REL * start). Why: a daemon's working set legitimately moves by its batch buffers (tickhandler: up to
# prefetch 4000 + batch 1000 decoded ticks of ~1 kB, i.e. ~5-8 MB), pymalloc arenas that are not returned, and the
# per-instrument state that fills as new trading days/minutes appear; a real leak of even 100 bytes per tick at
# ~8k ticks/s is +48 MB per minute, far outside this band after the first minutes.
RSS_ABS_MB, RSS_REL = 10.0, 0.15
ACCOUNTS_EXEC = ("L", "F", "demo1", "demo2")


def mb(kb: float | None) -> str:
    return "-" if kb is None else f"{kb:.1f}"


def vmrss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------ tick publisher
def tick_digest(t: Any) -> int:
    from brokers.random_source import market_fields

    return int.from_bytes(hashlib.blake2b(repr(market_fields(t)).encode(), digest_size=8).digest(), "little")


def publisher_main(args: argparse.Namespace) -> int:
    """Child process: publish ticks at ``--rate`` until SIGTERM or ``--seconds``; write the counts to ``--out``."""
    from brokers.random_source import RandomSource, default_instruments
    from qamarket.cleaning import TickCleaner
    from qamarket.models import DEFAULT_REGISTRY
    from qapubsub import keys
    from qapubsub.sync import Connection, StreamPublisher
    from qapubsub.topology import Topology

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    topo = Topology(args.namespace)
    inst = default_instruments(START)
    if ("SHFE", "rb2605") not in inst:
        inst.append(("SHFE", "rb2605"))
    it = RandomSource(seed=SEED, instruments=inst, start=START).ticks()
    url = args.url
    conn = Connection(urls=[url], client_name="soak-ticks")
    pub = StreamPublisher(conn, topology=topo, persistent=False)
    cleaners: dict[tuple[str, str], Any] = {}
    sent = clean = retries = 0
    digest = 0
    step = 0.05
    batch = max(1, int(round(args.rate * step)))
    t_start = time.monotonic()
    deadline = t_start + args.seconds
    next_t = t_start
    last_report = t_start
    out = Path(args.out)

    def report(final: bool) -> None:
        el = time.monotonic() - t_start
        out.write_text(json.dumps({"sent": sent, "clean": clean, "digest": digest, "retries": retries,
                                   "seconds": el, "rate": sent / el if el else 0.0, "final": final}))

    while not stop.is_set() and time.monotonic() < deadline:
        chunk = [next(it) for _ in range(batch)]
        for _attempt in range(300):
            try:
                for t in chunk:
                    pub.publish(topo.tick, keys.tick_key(t.exchange, t.symbol), t)
                pub.flush()
                break
            except Exception:  # noqa: BLE001 - broker error: the same ticks again (the tick store drops copies)
                retries += 1
                time.sleep(0.2)
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass
                conn = Connection(urls=[url], client_name="soak-ticks")
                pub = StreamPublisher(conn, topology=topo, persistent=False)
        else:
            raise SystemExit("ticks could not be published for 60 s")
        for t in chunk:
            key = (t.exchange, t.symbol)
            c = cleaners.get(key)
            if c is None:
                c = cleaners[key] = TickCleaner(DEFAULT_REGISTRY.get(t.symbol, t.exchange))
            if c.check(t) is None:
                clean += 1
                digest = (digest + tick_digest(t)) & 0xFFFFFFFFFFFFFFFF
        sent += len(chunk)
        next_t += step
        now = time.monotonic()
        if now - last_report > 5:
            report(False)
            last_report = now
        if next_t > now:
            time.sleep(next_t - now)
        elif now - next_t > 1.0:
            next_t = now          # behind by more than 1 s: do not burst to catch up
    report(True)
    conn.close()
    return 0


# ------------------------------------------------------------------------------------------ slow WebSocket client
class StalledWebSocket:
    """Connects to the web daemon, subscribes to quotes, then never reads (small receive buffer)."""

    def __init__(self, port: int, ins_list: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("web closed the WebSocket handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"no WebSocket upgrade: {head[:200]!r}")
        self._send(json.dumps({"aid": "subscribe_quote", "ins_list": ins_list}).encode())

    def _send(self, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def web_metric(port: int, name: str) -> float | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310 - loopback
            text = r.read().decode()
    except Exception:  # noqa: BLE001
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(rf"{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
            if m:
                total = (total or 0.0) + float(m.group(1))
    return total


# ------------------------------------------------------------------------------------------ broker sampling
class QueueSampler:
    def __init__(self, amqp_url: str, topo: Any) -> None:
        from qapubsub.management import Management

        self.m = Management(amqp_url)
        self.topo = topo

    def depths(self) -> dict[str, dict[str, Any]]:
        """Every queue of the namespace, and every queue bound to one of its exchanges (live queues are server-named)."""
        import urllib.parse

        qs = self.m.queues()
        vh = urllib.parse.quote(self.m.vhost, safe="")
        names = {n for n in qs if n.startswith(self.topo.namespace)}
        for ex in (self.topo.tick, self.topo.bar, self.topo.rtbar, self.topo.report, self.topo.order, self.topo.exec):
            try:
                for b in self.m.get(f"/api/exchanges/{vh}/{urllib.parse.quote(ex, safe='')}/bindings/source"):
                    if b.get("destination_type") == "queue":
                        names.add(b["destination"])
            except Exception:  # noqa: BLE001
                pass
        out = {}
        for n in names:
            q = qs.get(n)
            if q is not None:
                args = q.get("arguments") or {}
                out[n] = {"messages": int(q.get("messages") or 0), "max": args.get("x-max-length"),
                          "consumers": q.get("consumers")}
        return out

    def broker_mem_mb(self) -> float | None:
        try:
            nodes = self.m.get("/api/nodes?columns=name,mem_used")
            return sum(float(n.get("mem_used") or 0) for n in nodes) / 2**20
        except Exception:  # noqa: BLE001
            return None


# ------------------------------------------------------------------------------------------ the run
def measure_max(tmp: Path) -> dict[str, Any]:
    from benchmarks import bench_pipeline as bp

    ticks = bp.gen_ticks(40_000)
    data = tmp / "measure.pkl"
    meta = bp.write_data(data, ticks)
    r = bp.pipeline_run(data, meta, 1000, 4000, tmp=tmp)
    data.unlink(missing_ok=True)
    return {"rate": r["rate"], "zero_loss": r["zero_loss"], "ticks": r["ticks"], "seconds": r["seconds"]}


def soak(args: argparse.Namespace) -> int:  # noqa: C901 - a script of steps, read top to bottom
    import pika
    import pymongo

    import tests.faults.conftest as fc
    from qaaccount.store import AccountStore
    from qamarket.models import Tick
    from qamarket.store import TickStore
    from qapubsub import keys
    from qapubsub.messages import decode
    from qapubsub.topology import Binding, Topology, declare_queue_sync
    from handlers.stack import STRATEGY, default_daemons

    amqp_url = (os.environ.get("QA_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F").split(",")[0]
    mongo_url = os.environ["QA_MONGO_URL"]
    risk_url = fc._risk_url_default()
    tag = uuid.uuid4().hex[:10]
    ns, db_name = f"soak{tag}.", f"soak_{tag}"
    when = _dt.datetime.now(_dt.timezone.utc)
    logdir = ROOT / ".qaflow" / "soak" / f"{when:%Y%m%d-%H%M%S}-{tag}"
    logdir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"[soak] namespace {ns} database {db_name} logs {logdir.relative_to(ROOT)}", flush=True)

    measured: dict[str, Any] | None = None
    if args.rate:
        rate = float(args.rate)
    else:
        measured = measure_max(logdir)
        rate = 0.8 * measured["rate"]
        print(f"[soak] pipeline maximum measured now: {measured['rate']:.0f} ticks/s "
              f"(zero loss {measured['zero_loss']}); target 80 % = {rate:.0f} ticks/s", flush=True)

    topo = Topology(ns)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    topo.declare_sync(conn.channel(), queues=(*topo.platform_queues, *(topo.exec_queue(a) for a in ACCOUNTS_EXEC)))
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    db = client[db_name]
    fc.seed_db(db)
    for a in ("demo1", "demo2"):
        AccountStore(db).open(a, 1_000_000.0, trading_day="20250304")

    # the whole platform: the fault suite's Platform, with the executor of every account, the strategy and the web
    web_port = fc.free_port()
    strat_argv = ("handlers.strategy", *STRATEGY[1:2], "--accounts", "demo1,demo2", *STRATEGY[2:])
    strat_argv = tuple("ma-soak" if a == "ma-demo" else a for a in strat_argv)
    bars = next(d for d in default_daemons() if d.name == "barhandler").argv[1:]
    fc.DAEMONS.update({
        "barhandler": (("handlers.barhandler", *bars), "barhandler ready"),
        "executor": (("handlers.broker", "sim", *(x for a in ACCOUNTS_EXEC for x in ("--account", a))),
                     "sim executor ready"),
        "strategy": (strat_argv, "strategy ma-soak ready"),
        "web": (("handlers.web", "--port", str(web_port)), "web listening on"),
    })
    names = ("executor", "account", "tickhandler", "router", "barhandler", "risk", "strategy", "web")
    p = fc.Platform(amqp_url=amqp_url, mongo_url=mongo_url, db_name=db_name, namespace=ns, tmp=logdir,
                    risk_url=risk_url, daemons=names)
    mon = ExecReportMonitor(amqp_url, topo)
    pub_proc: subprocess.Popen[bytes] | None = None
    load: Any = None
    tap_stop = threading.Event()
    tap_queue: list[str] = []
    stalled: list[StalledWebSocket] = []
    exit_codes: dict[str, Any] = {}
    ok = False
    try:
        for n in names:
            p.start(n)
        for n in names:
            p.wait_ready(n, timeout=90)
        pids = {n: p.procs[n].pid for n in names}
        print(f"[soak] platform up: {pids}", flush=True)

        # slow consumer 1: a live queue on qa.tick that nobody reads (kept alive by this thread's heartbeats)
        stalled_q = declare_queue_sync(conn.channel(),
                                       topo.live_queue("", Binding(topo.tick, keys.ALL), max_length=args.live_max))
        # orders: the fault suite's order thread, every second, fed with the latest rb2605 tick
        load = fc.Load(p, topo, order_every=1.0)

        def tap() -> None:
            tc = pika.BlockingConnection(pika.URLParameters(amqp_url))
            ch = tc.channel()
            q = declare_queue_sync(ch, topo.live_queue("", Binding(topo.tick, keys.tick_key("SHFE", "rb2605")),
                                                       max_length=5))
            tap_queue.append(q)
            while not tap_stop.is_set():
                last = None
                while True:
                    m, _props, body = ch.basic_get(q, auto_ack=True)
                    if m is None:
                        break
                    last = body
                if last is not None:
                    t = decode(last, Tick)
                    with load._lock:
                        load.last["rb2605"] = t
                tc.sleep(0.3)
            tc.close()

        threading.Thread(target=tap, daemon=True, name="soak-tap").start()
        def orders() -> None:
            try:
                load._orders()
            except Exception as exc:  # noqa: BLE001
                load.errors.append(f"FATAL orders: {type(exc).__name__}: {exc}")

        threading.Thread(target=orders, daemon=True, name="soak-orders").start()

        seconds = args.minutes * 60
        out = logdir / "publisher.json"
        pub_proc = subprocess.Popen([sys.executable, __file__, "_publish", "--namespace", ns, "--url", amqp_url,
                                     "--rate", str(rate), "--seconds", str(seconds), "--out", str(out)],
                                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=open(logdir / "publisher.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        from brokers.random_source import default_instruments

        ins = ",".join(f"{e}.{s}" for e, s in default_instruments(START))
        sampler = QueueSampler(amqp_url, topo)
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        next_ws = t0 + 5
        ws_opened = 0
        samples_f = open(logdir / "samples.jsonl", "w")  # noqa: SIM115
        while True:
            now = time.monotonic()
            if now >= next_ws and now - t0 < seconds - 10:
                try:
                    stalled.append(StalledWebSocket(web_port, ins))
                    ws_opened += 1
                except Exception as exc:  # noqa: BLE001
                    print(f"[soak] stalled WebSocket client failed to connect: {exc}", flush=True)
                next_ws = now + 60
            mon.drain()
            pubst = json.loads(out.read_text()) if out.exists() else {}
            s = {"t": round(now - t0, 1), "rss": {n: vmrss_mb(pid) for n, pid in pids.items()},
                 "queues": sampler.depths(), "broker_mb": sampler.broker_mem_mb(), "sent": pubst.get("sent", 0),
                 "web_dropped": web_metric(web_port, "qaflow_web_dropped_clients"),
                 "web_clients": web_metric(web_port, "qaflow_web_ws_clients"), "loadavg": os.getloadavg()}
            samples.append(s)
            samples_f.write(json.dumps(s) + "\n")
            samples_f.flush()
            th = s["queues"].get(topo.tickhandler.name, {}).get("messages")
            print(f"[soak] t={s['t']:6.0f}s sent {s['sent']:>9} tickhandler queue {th} stalled live "
                  f"{s['queues'].get(stalled_q, {}).get('messages')} broker {s['broker_mb'] or 0:.0f} MB rss "
                  + " ".join(f"{n}={v:.0f}" for n, v in s["rss"].items() if v) + f" load {s['loadavg'][0]:.1f}",
                  flush=True)
            dead = p.dead()
            if dead:
                print(f"[soak] daemons exited: {dead}", flush=True)
                break
            if pub_proc.poll() is not None:
                break
            conn.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - now)))   # heartbeats of the stalled queue's owner
        if pub_proc.poll() is None:
            pub_proc.send_signal(signal.SIGTERM)
        pub_proc.wait(60)
        pubst = json.loads(out.read_text())
        load.stop_ev.set()
        tap_stop.set()
        last_load = samples[-1]
        print(f"[soak] load stopped: {pubst['sent']} ticks in {pubst['seconds']:.0f} s = {pubst['rate']:.0f}/s "
              f"(target {rate:.0f}), {len(load.orders)} orders", flush=True)

        # settle: every clean tick stored, every order handled, command queues drained
        def stored_n() -> int:
            rows = list(db.ticks.aggregate([{"$group": {"_id": None, "n": {"$sum": "$n"}}}]))
            return int(rows[0]["n"]) if rows else 0

        t_settle = time.monotonic()
        settle_problems = []
        try:
            fc.wait_for(lambda: stored_n() >= pubst["clean"], args.settle, 1.0, "every clean tick stored")
        except AssertionError as exc:
            settle_problems.append(str(exc))
        try:
            fc.wait_for(lambda: db.orders.count_documents({"_id": {"$in": load.orders},
                                                           "state": {"$in": ["routed", "rejected"]}})
                        == len(load.orders), 60, 0.5, "orders routed")
        except AssertionError as exc:
            settle_problems.append(str(exc))
        cmd_queues = [topo.tickhandler.name, topo.router_orders.name, topo.router_risk.name, topo.account_reports.name,
                      *(topo.exec_queue(a).name for a in ACCOUNTS_EXEC)]
        for q in cmd_queues:
            try:
                fc.wait_for(lambda q=q: fc.queue_depth(amqp_url, q) == 0, 60, 0.5, f"{q} drained")
            except AssertionError as exc:
                settle_problems.append(str(exc))
        conn.sleep(3)
        settle_s = time.monotonic() - t_settle
        final = {n: fc.queue_depth(amqp_url, q) for n, q in zip(cmd_queues, cmd_queues)}
        mon.drain()
        end_sample = {"rss": {n: vmrss_mb(pid) for n, pid in pids.items()}, "broker_mb": sampler.broker_mem_mb(),
                      "queues": sampler.depths()}
        dead = p.dead()
        exit_codes = p.stop()

        # ---- checks
        v = fc.Verdict()
        th_log = p.log("tickhandler")
        m = re.search(r"tickhandler stopped: (\{.*?\}); dropped (\{.*?\})", th_log)
        dropped = sum(eval(m.group(2)).values()) if m else None  # noqa: S307 - our own daemon's log line
        stored = stored_n()
        digest = 0
        store = TickStore(db, create_indexes=False)
        for ex, sym in store.instruments():
            for t in store.ticks(ex, sym):
                digest = (digest + tick_digest(t)) & 0xFFFFFFFFFFFFFFFF
        if stored != pubst["clean"]:
            v.fail(f"ticks: {stored} stored != {pubst['clean']} clean ticks sent",
                   max(0, pubst["clean"] - stored), max(0, stored - pubst["clean"]))
        elif digest != pubst["digest"]:
            v.fail("ticks: same count but the stored ticks differ from the sent ones (hash of market fields)")
        if dropped:
            v.fail(f"tickhandler reports {dropped} dropped ticks")
        strategy_orders = [d["_id"] for d in db.orders.find({"_id": {"$nin": load.orders}}, {"_id": 1})]
        fc.check_orders_and_fills(v, db, [*load.orders, *strategy_orders], mon)
        if dead:
            v.fail(f"daemons exited during the soak: {dead}")
        fatal = [e for e in load.errors if e.startswith("FATAL")]
        if fatal:
            v.fail(f"order load failed: {fatal}")
        bad_exit = {n: c for n, c in exit_codes.items() if c != 0}
        if bad_exit:
            v.fail(f"exit codes on SIGTERM: {bad_exit}")
        v.problems += settle_problems
        # RSS: first sample after warm-up vs median of the last three samples under load
        warm = min(args.warmup, seconds * 0.25)
        after = [s for s in samples if s["t"] >= warm] or samples
        rows = []
        for n in names:
            start = after[0]["rss"].get(n)
            tail = [s["rss"].get(n) for s in after[-3:] if s["rss"].get(n)]
            end = statistics.median(tail) if tail else None
            first = samples[0]["rss"].get(n)
            peak = max((s["rss"].get(n) or 0) for s in samples)
            flat = start is not None and end is not None and end <= start + max(RSS_ABS_MB, RSS_REL * start)
            if not flat:
                v.fail(f"{n}: RSS {mb(start)} -> {mb(end)} MB after warm-up (more than +max({RSS_ABS_MB:.0f} MB, "
                       f"{RSS_REL:.0%}))")
            rows.append((n, first, start, end, peak, end_sample["rss"].get(n)))
        # queues: live ones never above x-max-length; command queues drained at the end
        qmax: dict[str, int] = {}
        qlimit: dict[str, Any] = {}
        for s in samples:
            for qn, q in s["queues"].items():
                qmax[qn] = max(qmax.get(qn, 0), q["messages"])
                qlimit[qn] = q["max"]
                if q["max"] is not None and q["messages"] > q["max"]:
                    v.fail(f"queue {qn}: {q['messages']} > x-max-length {q['max']}")
        for qn, d in final.items():
            if d != 0:
                v.fail(f"command queue {qn} not drained: {d}")
        th_depths = [s["queues"].get(topo.tickhandler.name, {}).get("messages", 0) for s in samples]
        backlog_limit = max(10_000, rate * 10)
        if th_depths and th_depths[-1] > backlog_limit:
            v.fail(f"tickhandler backlog {th_depths[-1]} at the end of the load (> {backlog_limit:.0f}: rate above capacity)")
        if pubst["rate"] < 0.9 * rate:
            v.fail(f"target rate not reached: {pubst['rate']:.0f} of {rate:.0f} ticks/s ({pubst['rate'] / rate:.0%}; "
                   f"the publisher is paced, so the machine did not carry more)")
        web_dropped = samples[-1].get("web_dropped") or 0
        if ws_opened and web_dropped < max(1, ws_opened - 1):
            v.fail(f"web closed {web_dropped:.0f} of {ws_opened} stalled WebSocket clients")
        ok = not v.problems

        # ---- table
        minutes = pubst["seconds"] / 60
        label = {topo.tickhandler.name: "tickhandler input (durable, unbounded)", stalled_q: "stalled live queue (nobody reads)",
                 **{q: "the soak's rb2605 tap (order prices)" for q in tap_queue}}
        for qn in qmax:
            if qn.startswith(ns):
                label.setdefault(qn, qn[len(ns):])
            elif qlimit.get(qn) is not None:
                label.setdefault(qn, f"live queue {qn[:14]}.. (executor / web / account / risk)")
        lines = [
            f"Run of {when:%Y-%m-%d %H:%M} UTC on this machine (2 cores, shared; load average "
            f"{load0[0]:.1f} at start, {last_load['loadavg'][0]:.1f} at the end of the load), `SOAK_MINUTES="
            f"{args.minutes:g}`: **{minutes:.1f} min** of load, "
            + (f"target {rate:.0f} ticks/s = 80 % of {measured['rate']:.0f} ticks/s measured in the same run"
               if measured else f"target {rate:.0f} ticks/s (`SOAK_RATE`)")
            + f"; achieved **{pubst['rate']:.0f} ticks/s** ({pubst['sent']:,} ticks, 22+1 instruments), "
            f"{len(load.orders)} orders to L (copied to F) + {len(strategy_orders)} strategy orders, "
            f"{ws_opened} stalled WebSocket clients, settle {settle_s:.0f} s. Verdict: **{'PASS' if ok else 'FAIL'}**.",
            "",
            "| daemon | RSS first sample MB | RSS start (after warm-up) MB | RSS end MB | peak MB | after drain MB |",
            "|---|---:|---:|---:|---:|---:|",
            *(f"| {n} | {mb(a)} | {mb(b)} | {mb(c)} | {mb(d)} | {mb(e)} |" for n, a, b, c, d, e in rows),
            "",
            "| queue | x-max-length | max depth (10 s samples) | depth at the end |",
            "|---|---:|---:|---:|",
            *(f"| {label.get(qn, qn)} | {qlimit.get(qn) if qlimit.get(qn) is not None else 'none'} | {qmax[qn]:,} | "
              f"{end_sample['queues'].get(qn, {}).get('messages', 'gone')} |"
              for qn in sorted(qmax, key=lambda q: (q not in label or 'live queue' in label[q], label.get(q, q)))
              if qmax[qn] or qn.startswith(ns) or qn == stalled_q),
            "",
            "| broker | start | end of load | after drain |",
            "|---|---:|---:|---:|",
            f"| RabbitMQ mem_used MB (shared node) | {mb(after[0]['broker_mb'])} | {mb(last_load['broker_mb'])} | "
            f"{mb(end_sample['broker_mb'])} |",
            "",
            f"No loss: ticks stored {stored:,} == clean ticks sent {pubst['clean']:,} "
            f"({'hash equal' if digest == pubst['digest'] else 'HASH DIFFERS'}; tickhandler dropped {dropped}); "
            f"orders/fills ({len(load.orders) + len(strategy_orders)} orders, {v.lost} lost, {v.duplicated} duplicated, "
            f"{v.redelivered_same_id} same-id redeliveries); web closed {web_dropped:.0f} of {ws_opened} stalled clients; "
            f"exit codes {exit_codes}.",
        ]
        if v.problems:
            lines += ["", "Problems: " + "; ".join(v.problems[:12])]
        text = "\n".join(lines)
        print("\n" + text + "\n", flush=True)
        (logdir / "results.md").write_text(text + "\n")
        if args.write:
            write_section(Path(args.write), text)
        return 0 if ok else 1
    finally:
        tap_stop.set()
        if load is not None:
            load.stop_ev.set()
        if pub_proc is not None and pub_proc.poll() is None:
            pub_proc.kill()
            pub_proc.wait(10)
        for s in stalled:
            s.close()
        if not exit_codes:
            p.stop()
        cleanup(amqp_url, topo, ns, client, db_name, conn)


class ExecReportMonitor:
    """The fault suite's Monitor without the qa.bar queue (bars at soak rates are not kept), drained every sample."""

    def __init__(self, url: str, topo: Any) -> None:
        import pika

        self.url = url
        self.queues = {"exec": f"{topo.namespace}soak.exec", "report": f"{topo.namespace}soak.report"}
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        for kind, ex in (("exec", topo.exec), ("report", topo.report)):
            ch.queue_declare(self.queues[kind], durable=True)
            ch.queue_bind(self.queues[kind], ex, routing_key="#")
        conn.close()
        self.seen: dict[str, list[tuple[str, str, dict[str, Any]]]] = {"exec": [], "report": [], "bar": []}

    def drain(self) -> None:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        for kind, q in self.queues.items():
            while True:
                m, props, body = ch.basic_get(q, auto_ack=True)
                if m is None:
                    break
                b = json.loads(body)
                if b.get("schema") in ("qa.order", "qa.trade"):       # only what the checker reads
                    self.seen[kind].append((m.routing_key, props.message_id, b))
        conn.close()


def cleanup(amqp_url: str, topo: Any, ns: str, client: Any, db_name: str, conn: Any) -> None:
    import pika

    from qapubsub.management import Management

    try:
        if conn.is_open:
            conn.close()
    except Exception:  # noqa: BLE001
        pass
    try:
        m = Management(amqp_url)
        queues = [n for n in m.queues() if n.startswith(ns)]
        exchanges = [n for n in m.exchanges() if n.startswith(ns)]
        c = pika.BlockingConnection(pika.URLParameters(amqp_url))
        ch = c.channel()
        for q in {*queues, *(q.name for q in topo.platform_queues), *(topo.exec_queue(a).name for a in ACCOUNTS_EXEC)}:
            ch.queue_delete(q)
        for e in {*exchanges, *(e.name for e in topo.exchanges)}:
            ch.exchange_delete(e)
        c.close()
    except Exception as exc:  # noqa: BLE001
        print(f"[soak] broker cleanup incomplete: {exc}", flush=True)
    try:
        client.drop_database(db_name)
        client.close()
    except Exception as exc:  # noqa: BLE001
        print(f"[soak] database cleanup incomplete: {exc}", flush=True)
    print(f"[soak] deleted namespace {ns} and database {db_name}", flush=True)


BEGIN, END = "<!-- soak-table:begin -->", "<!-- soak-table:end -->"


def write_section(path: Path, text: str) -> None:
    doc = path.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n## Soak\n\n" + block + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_publish":
        ap = argparse.ArgumentParser()
        ap.add_argument("--namespace", required=True)
        ap.add_argument("--url", required=True)
        ap.add_argument("--rate", type=float, required=True)
        ap.add_argument("--seconds", type=float, required=True)
        ap.add_argument("--out", required=True)
        return publisher_main(ap.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES") or 10))
    ap.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE") or 0),
                    help="ticks/s (default: 80 %% of the pipeline maximum measured at the start)")
    ap.add_argument("--live-max", type=int, default=10_000, help="x-max-length of the stalled live tick queue")
    ap.add_argument("--warmup", type=float, default=60.0, help="s before the RSS start sample (at most 25 %% of the run)")
    ap.add_argument("--settle", type=float, default=180.0, help="s to wait for the backlog to be stored")
    ap.add_argument("--write", default=None, help="write the table into this Markdown file (## Soak)")
    return soak(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
