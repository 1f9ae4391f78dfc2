"""Transport benchmark: our publishers/consumers against raw pika and QAPUBSUB 1.11.

Every figure comes from a producer and a consumer in SEPARATE processes
(``benchmarks.bench_transport_worker``, and ``benchmarks/peer_qapubsub.py`` in the peer's
own venv), on uuid-named exchanges and queues that are deleted afterwards. The baseline of
each figure is measured in the same run. ``run()`` returns a dict with a ``figures`` list
(name, value, unit, baseline, ratio, goal, met) and the raw step data; it takes about
1.5-2.5 minutes on 2 cores.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import peer_qapubsub

ROOT = Path(__file__).resolve().parent.parent
KEY = "SHFE.rb2512"
PUBLISH_SECONDS = 2.5
CONSUME_COUNT = 40_000
LATENCY_STEPS = (1_000, 2_000, 5_000, 10_000, 15_000, 20_000)
LATENCY_P99_LIMIT_MS = 10.0
STEP_SECONDS = {1_000: 3.0}
DEFAULT_STEP_SECONDS = 1.5
BUDGET_SECONDS = 170.0  # whole transport bench stays under 3 minutes


def _url() -> str:
    return (os.environ.get("QA_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F").split(",")[0]


# ------------------------------------------------------------------------------ processes
class Proc:
    """A worker process; stdout lines are collected by a thread (READY, then a JSON result)."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.stderr.append(line)
            del self.stderr[:-40]

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"worker not ready in {timeout} s: {''.join(self.stderr)[-500:]}") from None
            if line is None:
                raise RuntimeError(f"worker exited before READY: {''.join(self.stderr)[-800:]}")
            if line == "READY":
                return

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text)
        self.p.stdin.flush()

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"worker did not finish in {timeout} s") from None
        last: dict[str, Any] | None = None
        while True:
            try:
                line = self.lines.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("{"):
                last = json.loads(line)
        if last is None:
            raise RuntimeError(f"worker gave no result (rc={self.p.returncode}): {''.join(self.stderr)[-800:]}")
        if "error" in last:
            raise RuntimeError(last["error"])
        return last

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()  # only our own child, by its handle
            self.p.wait(5)


def _worker(role: str, **kw: Any) -> Proc:
    cmd = [sys.executable, "-m", "benchmarks.bench_transport_worker", role, "--url", _url()]
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not None and v is not False:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return Proc(cmd)


class Peer:
    def __init__(self, py: Path) -> None:
        self.py = py
        parts = urllib.parse.urlsplit(_url())
        self.base = ["--host", parts.hostname or "127.0.0.1", "--port", str(parts.port or 5672),
                     "--user", urllib.parse.unquote(parts.username or "guest"),
                     "--vhost", urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"]
        self.env = {"QAPUBSUB_PWD": urllib.parse.unquote(parts.password or "guest")}

    def proc(self, role: str, **kw: Any) -> Proc:
        cmd = [str(self.py), str(ROOT / "benchmarks" / "peer_qapubsub.py"), role, *self.base]
        for k, v in kw.items():
            if v is True:
                cmd.append(f"--{k.replace('_', '-')}")
            elif v is not None and v is not False:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        return Proc(cmd, env=self.env)


# ------------------------------------------------------------------------------ broker
class Broker:
    """uuid-named exchange + queue, declared and deleted by the parent (pika).

    Each operation uses a fresh short-lived connection: the parent sits idle for long
    stretches while its workers run, and an idle BlockingConnection misses heartbeats.
    """

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.exchange = f"bench-{tag}"
        self.queue = f"bench-{tag}"
        self.peer_exchange = f"bench-peer-{tag}"
        self.peer_queue = f"bench-peer-{tag}"

        def setup(ch: Any) -> None:
            ch.exchange_declare(self.exchange, "topic", durable=False)
            ch.queue_declare(self.queue, durable=False)
            ch.queue_bind(self.queue, self.exchange, KEY)
            # as QAPUBSUB declares it: fanout, non-durable, not auto-delete
            ch.exchange_declare(self.peer_exchange, "fanout", durable=False, auto_delete=False)
        self._do(setup)

    @staticmethod
    def _do(fn: Callable[[Any], None]) -> None:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(_url()))
        try:
            fn(conn.channel())
        finally:
            if conn.is_open:
                conn.close()

    def purge(self) -> None:
        self._do(lambda ch: ch.queue_purge(self.queue))

    def peer_queue_bound(self) -> None:
        def f(ch: Any) -> None:
            ch.queue_declare(self.peer_queue, durable=False)
            ch.queue_bind(self.peer_queue, self.peer_exchange, "")
        self._do(f)

    def peer_queue_delete(self) -> None:
        self._do(lambda ch: ch.queue_delete(self.peer_queue))

    def close(self) -> None:
        def f(ch: Any) -> None:
            for q in (self.queue, self.peer_queue):
                ch.queue_delete(q)
            for ex in (self.exchange, self.peer_exchange):
                ch.exchange_delete(ex)
        self._do(f)


# ------------------------------------------------------------------------------ scenarios
def publish_rate(b: Broker, role: str) -> dict[str, Any]:
    b.purge()
    try:
        return _worker(role, exchange=b.exchange, key=KEY, seconds=PUBLISH_SECONDS).result(PUBLISH_SECONDS + 40)
    finally:
        b.purge()


def consume_rate(b: Broker, role: str) -> dict[str, Any]:
    b.purge()
    try:
        _worker("pub_raw", exchange=b.exchange, key=KEY, count=CONSUME_COUNT, seconds=60).result(60)
        return _worker(role, queue=b.queue, count=CONSUME_COUNT, timeout=40).result(60)
    finally:
        b.purge()


def latency_step(b: Broker, pub_role: str, con_role: str, rate: int) -> dict[str, Any]:
    seconds = STEP_SECONDS.get(rate, DEFAULT_STEP_SECONDS)
    count = int(rate * seconds)
    b.purge()
    try:
        con = _worker(con_role, queue=b.queue, count=count, latency=True, warmup=min(200, count // 20),
                      timeout=seconds + 10)
        con.wait_ready()
        pub = _worker(pub_role, exchange=b.exchange, key=KEY, count=count, rate=rate)
        pr = pub.result(seconds + 30)
        cr = con.result(seconds + 30)
    finally:
        b.purge()
    return _step(rate, pr, cr)


def _step(rate: int, pr: dict[str, Any], cr: dict[str, Any]) -> dict[str, Any]:
    achieved = pr.get("rate", 0.0)
    ok = bool(cr.get("complete")) and achieved >= 0.9 * rate and cr.get("p99_ms", 1e9) <= LATENCY_P99_LIMIT_MS
    return {"offered": rate, "achieved": round(achieved, 1), "p50_ms": cr.get("p50_ms"), "p99_ms": cr.get("p99_ms"),
            "max_ms": cr.get("max_ms"), "received": cr.get("received"), "sustained": ok}


def latency_sweep(step: Callable[[int], dict[str, Any]], deadline: float) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    best = 0
    for rate in LATENCY_STEPS:
        if rate > 1_000 and time.monotonic() > deadline:
            steps.append({"offered": rate, "skipped": "time budget"})
            break
        try:
            s = step(rate)
        except Exception as exc:  # noqa: BLE001
            steps.append({"offered": rate, "error": str(exc)[:300], "sustained": False})
            break
        steps.append(s)
        if not s["sustained"]:
            break
        best = rate
    return {"steps": steps, "max_rate_p99_10ms": best,
            "at_1k": next((s for s in steps if s.get("offered") == 1_000 and "p99_ms" in s), None)}


def peer_publish(b: Broker, peer: Peer) -> dict[str, Any]:
    b.peer_queue_bound()
    try:
        return peer.proc("pub", exchange=b.peer_exchange, seconds=PUBLISH_SECONDS).result(PUBLISH_SECONDS + 40)
    finally:
        b.peer_queue_delete()


def peer_consume(b: Broker, peer: Peer) -> dict[str, Any]:
    sub = peer.proc("sub", exchange=b.peer_exchange, count=CONSUME_COUNT, wait_go=True, timeout=40)
    sub.wait_ready()
    _worker("pub_raw", exchange=b.peer_exchange, key=KEY, count=CONSUME_COUNT, seconds=60).result(60)
    sub.send("go\n")
    return sub.result(60)


def peer_latency_step(b: Broker, peer: Peer, rate: int) -> dict[str, Any]:
    seconds = STEP_SECONDS.get(rate, DEFAULT_STEP_SECONDS)
    count = int(rate * seconds)
    sub = peer.proc("sub", exchange=b.peer_exchange, count=count, latency=True, warmup=min(200, count // 20),
                    timeout=seconds + 10)
    sub.wait_ready()
    pr = peer.proc("pub", exchange=b.peer_exchange, count=count, rate=rate).result(seconds + 30)
    return _step(rate, pr, sub.result(seconds + 30))


# ------------------------------------------------------------------------------ figures
def figure(name: str, value: float | None, unit: str, *, baseline_name: str | None = None,
           baseline: float | None = None, goal: str | None = None, higher_is_better: bool = True,
           met: bool | None = None, note: str = "") -> dict[str, Any]:
    ratio = round(value / baseline, 3) if value is not None and baseline else None
    return {"name": name, "value": None if value is None else round(value, 3), "unit": unit,
            "baseline_name": baseline_name, "baseline": None if baseline is None else round(baseline, 3),
            "ratio": ratio, "goal": goal, "met": met, "higher_is_better": higher_is_better, "note": note}


def _try(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one failing scenario must not stop the others
        errors[name] = f"{type(exc).__name__}: {exc}"[:800]
        return None


def run() -> dict[str, Any]:
    t_start = time.monotonic()
    deadline = t_start + BUDGET_SECONDS - 45  # leave room for the peer's sweep
    errors: dict[str, str] = {}
    raw: dict[str, Any] = {}
    b = Broker()
    sync_available = importlib.util.find_spec("qapubsub.sync") is not None
    try:
        # 1. publish
        raw["publish_raw"] = _try(errors, "publish_raw", lambda: publish_rate(b, "pub_raw"))
        raw["publish_aio"] = _try(errors, "publish_aio", lambda: publish_rate(b, "pub_aio"))
        if sync_available:
            raw["publish_sync"] = _try(errors, "publish_sync", lambda: publish_rate(b, "pub_sync"))
        # 2. consume
        raw["consume_raw"] = _try(errors, "consume_raw", lambda: consume_rate(b, "con_raw"))
        raw["consume_aio"] = _try(errors, "consume_aio", lambda: consume_rate(b, "con_aio"))
        if sync_available:
            raw["consume_sync"] = _try(errors, "consume_sync", lambda: consume_rate(b, "con_sync"))
        # 3. latency
        raw["latency_raw"] = latency_sweep(lambda r: latency_step(b, "pub_raw", "con_raw", r), deadline - 30)
        raw["latency_aio"] = latency_sweep(lambda r: latency_step(b, "pub_aio", "con_aio", r), deadline - 15)
        if sync_available:
            raw["latency_sync"] = latency_sweep(lambda r: latency_step(b, "pub_sync", "con_sync", r), deadline)
        # 4. the peer
        peer: Peer | None = None
        try:
            py = peer_qapubsub.ensure_venv()
            peer = Peer(py)
            raw["peer_version"] = peer_qapubsub.peer_version(py)
        except Exception as exc:  # noqa: BLE001
            errors["peer_install"] = f"{type(exc).__name__}: {exc}"[:800]
        if peer is not None:
            raw["publish_peer"] = _try(errors, "publish_peer", lambda: peer_publish(b, peer))
            raw["consume_peer"] = _try(errors, "consume_peer", lambda: peer_consume(b, peer))
            raw["latency_peer"] = latency_sweep(lambda r: peer_latency_step(b, peer, r),
                                                t_start + BUDGET_SECONDS - 10)
    finally:
        b.close()

    def rate(k: str) -> float | None:
        v = raw.get(k)
        return v.get("rate") if isinstance(v, dict) else None

    figs: list[dict[str, Any]] = []
    pr = rate("publish_raw")
    figs.append(figure("publish.raw_pika_no_confirms", pr, "msg/s", note="baseline: BlockingConnection, transient, no confirms"))
    figs.append(figure("publish.qapubsub_aio_batched_confirms", rate("publish_aio"), "msg/s",
                       baseline_name="publish.raw_pika_no_confirms", baseline=pr, goal="ratio >= 0.8",
                       met=_ratio_met(rate("publish_aio"), pr, 0.8), note="MarketDataPublisher, 500 confirms in flight"))
    if sync_available:
        figs.append(figure("publish.qapubsub_sync_batched_confirms", rate("publish_sync"), "msg/s",
                           baseline_name="publish.raw_pika_no_confirms", baseline=pr, goal="ratio >= 0.8",
                           met=_ratio_met(rate("publish_sync"), pr, 0.8)))
    else:
        figs.append(figure("publish.qapubsub_sync_batched_confirms", None, "msg/s", baseline_name="publish.raw_pika_no_confirms",
                           baseline=pr, goal="ratio >= 0.8", note="HOOK: qapubsub/sync.py not present when run"))
    figs.append(figure("publish.qapubsub_1.11_peer", rate("publish_peer"), "msg/s",
                       baseline_name="publish.raw_pika_no_confirms", baseline=pr, note="transient, no confirms"))
    cr = rate("consume_raw")
    figs.append(figure("consume.raw_pika_auto_ack", cr, "msg/s", note=f"baseline: drain {CONSUME_COUNT} queued"))
    figs.append(figure("consume.qapubsub_aio_batched_ack", rate("consume_aio"), "msg/s",
                       baseline_name="consume.raw_pika_auto_ack", baseline=cr, goal="ratio >= 0.8",
                       met=_ratio_met(rate("consume_aio"), cr, 0.8),
                       note="Consumer: msgspec decode, manual ack, prefetch 4000, multiple-ack every 500"))
    if sync_available:
        figs.append(figure("consume.qapubsub_sync_batched_ack", rate("consume_sync"), "msg/s",
                           baseline_name="consume.raw_pika_auto_ack", baseline=cr, goal="ratio >= 0.8",
                           met=_ratio_met(rate("consume_sync"), cr, 0.8)))
    else:
        figs.append(figure("consume.qapubsub_sync_batched_ack", None, "msg/s", baseline_name="consume.raw_pika_auto_ack",
                           baseline=cr, goal="ratio >= 0.8", note="HOOK: qapubsub/sync.py not present when run"))
    figs.append(figure("consume.qapubsub_1.11_peer", rate("consume_peer"), "msg/s",
                       baseline_name="consume.raw_pika_auto_ack", baseline=cr, note="auto-ack"))

    def at1k(k: str, field: str) -> float | None:
        v = raw.get(k) or {}
        s = v.get("at_1k") or {}
        return s.get(field)

    def best(k: str) -> float | None:
        v = raw.get(k)
        return float(v["max_rate_p99_10ms"]) if isinstance(v, dict) and "max_rate_p99_10ms" in v else None

    for field in ("p50_ms", "p99_ms"):
        base = at1k("latency_raw", field)
        figs.append(figure(f"latency_1k.{field}.raw_pika", base, "ms", higher_is_better=False,
                           goal="p99 <= 1 ms" if field == "p99_ms" else None,
                           met=None if field == "p50_ms" or base is None else base <= 1.0))
        for who, k in OURS_AND_PEER:
            v = at1k(k, field)
            ours = who != "qapubsub_1.11_peer"
            figs.append(figure(f"latency_1k.{field}.{who}", v, "ms", baseline_name=f"latency_1k.{field}.raw_pika",
                               baseline=base, higher_is_better=False,
                               goal="p99 <= 1 ms" if field == "p99_ms" and ours else None,
                               met=(v <= 1.0) if field == "p99_ms" and ours and v is not None else None,
                               note="" if k in raw else "not measured"))
    base = best("latency_raw")
    figs.append(figure("max_rate_p99_le_10ms.raw_pika", base, "msg/s", note=f"steps {LATENCY_STEPS}"))
    for who, k in OURS_AND_PEER:
        figs.append(figure(f"max_rate_p99_le_10ms.{who}", best(k), "msg/s", baseline_name="max_rate_p99_le_10ms.raw_pika",
                           baseline=base))
    if not sync_available:
        errors.setdefault("sync", "qapubsub/sync.py not present: sync figures not measured (hook in "
                                  "benchmarks/bench_transport_worker.py pub_sync/con_sync)")
    return {"figures": figs, "details": raw, "errors": errors, "seconds": round(time.monotonic() - t_start, 1),
            "message_bytes": _body_size()}


OURS_AND_PEER = (("qapubsub_sync", "latency_sync"), ("qapubsub_aio", "latency_aio"),
                 ("qapubsub_1.11_peer", "latency_peer"))


def _ratio_met(v: float | None, base: float | None, goal: float) -> bool | None:
    if v is None or not base:
        return None
    return v / base >= goal


def _body_size() -> int:
    from benchmarks.bench_transport_worker import tick_body

    return len(tick_body())


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
