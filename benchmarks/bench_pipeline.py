"""Tick pipeline benchmark: RandomSource -> RabbitMQ -> tickhandler (real subprocess) -> MongoDB + bars.

``run(quick=False) -> dict`` (wired into ``make bench`` as ``pipeline``); ``python -m
benchmarks.bench_pipeline [--quick] [--profile]`` prints the table. Needs ``QA_AMQP_URL`` and
``QA_MONGO_URL``. Every run uses a uuid namespace (``bpl<hex>.``: its own qa.tick / qa.rtbar /
qa.tickhandler ...) and a uuid MongoDB database, all deleted afterwards.

Figures (see docs/benchmarks.md, "Tick pipeline"):

1. ``pipeline.single_tick``: seeded RandomSource ticks (22 default instruments, in session),
   one tick per message, published by ``qapubsub.sync.StreamPublisher`` (confirms) to the
   namespaced ``qa.tick`` (-> ``qa.tick.shards`` -> ``qa.tickhandler.0``, as the topology declares
   it); ``python -m handlers.tickhandler`` cleans, stores, aggregates and
   publishes bars. End = arrival (on ``qa.bar``, monitored by a separate process) of the
   closed 1-min bar of the warm-up instrument (not in the stream; see below), closed by a
   *sentinel* tick of that instrument one minute later sent after the stream: the queue is
   FIFO and a closed bar is published only after its ticks and every earlier tick are
   stored, so all ticks are then in MongoDB. (Realtime bars are sent before their ticks are
   stored: not a valid end.) Rate = ticks / (end - first publish). Zero loss is checked
   afterwards: sum of the chunks' ``n`` in MongoDB == ticks sent - ticks the tickhandler
   reports as dropped (its shutdown log line), and dropped must be 0. Baseline:
   ``raw_pipe``: the same bodies, plain pika producer process -> broker -> plain pika
   consumer process (auto-ack), rate = messages / (last received - first published).
   Several ``--batch-size/--prefetch`` settings are tried; the best is reported.
2. ``pipeline.rtbar_latency_5k``: ticks paced at 5,000/s, send time of every tick recorded by
   the producer; every realtime bar's arrival recorded by the qa.rtbar monitor; latency =
   arrival - send time of the newest tick in the bar (the ``tick_count``-th tick of that
   instrument in the bar's minute, checked against the bar's close). p50/p99/max after 1 s
   warm-up. Baseline: raw pika one hop at 5,000 msg/s in the same run (``bench_transport``'s
   ``latency_step`` with ``pub_raw``/``con_raw``). Two settings are tried (defaults, and a short
   ``--batch-wait`` with a small prefetch); the better p99 is reported.
3. ``pipeline.batched_100``: TickBatch messages of 100 ticks of one instrument
   (``RandomSource.batches``), ticks/s end to end with zero loss. Baseline: the raw pipe
   carrying the same TickBatch bodies (ticks/s). ``pipeline.batched_100_2shards``: the same
   stream over two tickhandler processes (``--shards 2``, ``qa.tick.shards`` spreads the
   instruments); the end is when MongoDB holds every tick (see :func:`pipeline_run`).
4. ``pipeline.rss_5000_instruments``: VmRSS of the tickhandler before and after 5,000
   distinct instruments (futures months of every product + SSE stocks 600000..) have ~5 ticks
   each; also VmHWM.

Before every measured stream the producer sends one warm-up tick (an extra instrument) and
waits 1.5 s: the tickhandler opens its bar publishers' channels on its first bars, a one-off cost
reported apart as ``first_bar_after_start_ms``.

With ``profile=True`` one extra single-tick run is made under ``python -m cProfile`` and the top
costs of the tickhandler are returned in ``details.profile``.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench_transport import Proc

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
START = "2025-03-03 09:01:00"  # a Monday, day session open for every futures product
MEM_START = "2025-03-03 09:35:00"  # futures, CFFEX and SSE stocks all in continuous trading
SEED = 20250303
CONFIGS_FULL = ((1000, 4000), (250, 1000), (2000, 8000), (4000, 16000))  # (--batch-size, --prefetch)
CONFIGS_QUICK = ((1000, 4000), (2000, 8000))
BATCHED_CONFIGS = ((100, 400), (300, 1200))  # messages of 100 ticks: (--batch-size, --prefetch)
LATENCY_CONFIGS = ((1000, 4000, None), (1000, 1000, 0.005))  # (--batch-size, --prefetch, --batch-wait)
WARMUP_S = 1.5  # a warm-up tick, then this pause, before the measured stream  # messages of 100 ticks: (--batch-size, --prefetch)


def _url() -> str:
    return (os.environ.get("QA_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F").split(",")[0]


def _mongo_url() -> str:
    url = os.environ.get("QA_MONGO_URL")
    if not url:
        raise RuntimeError("QA_MONGO_URL is not set (source .qaflow/servers.env)")
    return url


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------------------------ data
def _extra_tick(ticks: list[Any], *, first: bool, year: int) -> tuple[str, Any]:
    """A tick of an instrument not in ``ticks``, of the same product (same sessions) as the first/last futures tick."""
    import msgspec

    from brokers.random_source import contract_code
    from qamarket.models import STOCK_EXCHANGES, spec_for

    it = ticks if first else reversed(ticks)
    ref = next(t for t in it if t.exchange not in STOCK_EXCHANGES)
    product = spec_for(ref.symbol, ref.exchange).product
    symbols = {t.symbol for t in ticks}
    for y in (year, year - 3, year - 4):
        sym = contract_code(product, ref.exchange, y, 12)
        if sym not in symbols:
            return f"{ref.exchange}.{sym}", msgspec.structs.replace(ref, symbol=sym, seq=1)
    raise RuntimeError("no free extra symbol")


def _closing_tick(t: Any) -> Any:
    """The first in-session tick of ``t``'s instrument one or more minutes later (closes ``t``'s 1-min bar)."""
    import msgspec

    from qamarket.cleaning import TickCleaner
    from qamarket.models import DEFAULT_REGISTRY

    spec = DEFAULT_REGISTRY.get(t.symbol, t.exchange)
    for minutes in range(1, 240):
        c = TickCleaner(spec)
        c.check(t)
        nxt = msgspec.structs.replace(t, datetime=t.datetime + minutes * 60_000, volume=t.volume + 1, seq=t.seq + 1)
        if c.check(nxt) is None:
            return nxt
    raise RuntimeError(f"no later in-session minute for {t.exchange}.{t.symbol}")


def write_data(path: Path, ticks: list[Any], *, batch: int = 1, with_sentinel: bool = True) -> dict[str, Any]:
    """Pickle routing keys + JSON bodies (one tick, or TickBatch of ``batch``) for the workers."""
    from brokers.random_source import batch_ticks
    from qapubsub import keys as qkeys
    from qapubsub.messages import encode
    from qamarket.models import TickBatch

    if batch == 1:
        k = [qkeys.tick_key(t.exchange, t.symbol) for t in ticks]
        bodies = [encode(t) for t in ticks]
    else:
        msgs = list(batch_ticks(ticks, batch))
        k = [qkeys.tick_key(m.exchange, m.symbol) for m in msgs]
        bodies = [encode(m) for m in msgs]
    data: dict[str, Any] = {"keys": k, "bodies": bodies, "ticks": len(ticks)}
    if with_sentinel:
        # the warm-up tick (an extra instrument, sent first) and, after the stream, the sentinel: a tick
        # of the same instrument one minute later. It closes the warm-up's 1-min bar, which the
        # tickhandler publishes on qa.bar only after every earlier tick is stored. (The same instrument,
        # so its closed bars are not in the take-over hold a new instrument gets on first sight.)
        name, wt = _extra_tick(ticks, first=True, year=2030)
        ex, sym = name.split(".", 1)
        st = _closing_tick(wt)
        wrap = (lambda t: TickBatch(symbol=sym, exchange=ex, ticks=[t])) if batch > 1 else (lambda t: t)
        data.update(warmup=name, warmup_key=qkeys.tick_key(ex, sym), warmup_body=encode(wrap(wt)),
                    sentinel=name, sentinel_key=qkeys.tick_key(ex, sym), sentinel_body=encode(wrap(st)))
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"messages": len(bodies), "ticks": len(ticks), "sentinel": data.get("sentinel"), "warmup": data.get("warmup"),
            "body_bytes_median": int(statistics.median(len(b) for b in bodies))}


def gen_ticks(n: int, *, start: str = START, instruments: list[tuple[str, str]] | None = None,
              seed: int = SEED) -> list[Any]:
    from brokers.random_source import RandomSource

    return list(RandomSource(seed=seed, instruments=instruments, start=start).ticks(n))


def many_instruments(n: int = 5000) -> list[tuple[str, str]]:
    """``n`` distinct instruments: 12 contract months of every futures product, then SSE stocks 600000.."""
    from brokers.random_source import contract_code
    from qamarket.models import DEFAULT_REGISTRY

    out: list[tuple[str, str]] = []
    for product in DEFAULT_REGISTRY.products():
        spec = DEFAULT_REGISTRY.get(contract_code(product, "SHFE", 2025, 5))
        for i in range(12):
            y, m = divmod(2025 * 12 + 3 + i, 12)
            out.append((spec.exchange, contract_code(product, spec.exchange, y, m + 1)))
    code = 600000
    while len(out) < n:
        out.append(("SSE", str(code)))
        code += 1
    return out[:n]


# ------------------------------------------------------------------------------ broker / mongo
def _amqp(fn: Callable[[Any], Any]) -> Any:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(_url()))
    try:
        return fn(conn.channel())
    finally:
        if conn.is_open:
            conn.close()


class RawPipe:
    """uuid topic exchange + classic queue bound to ``#`` (deleted by :meth:`close`)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.exchange = self.queue = f"bench-pl-{tag}"

        def setup(ch: Any) -> None:
            ch.exchange_declare(self.exchange, "topic", durable=False)
            ch.queue_declare(self.queue, durable=False)
            ch.queue_bind(self.queue, self.exchange, "#")
        _amqp(setup)

    def purge(self) -> None:
        _amqp(lambda ch: ch.queue_purge(self.queue))

    def close(self) -> None:
        def f(ch: Any) -> None:
            ch.queue_delete(self.queue)
            ch.exchange_delete(self.exchange)
        _amqp(f)


def _worker(role: str, **kw: Any) -> Proc:
    cmd = [PY, "-m", "benchmarks.bench_pipeline_worker", role, "--url", _url()]
    for k, v in kw.items():
        if v is not None and v is not False:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return Proc(cmd)


def raw_pipe(pipe: RawPipe, data: Path, count: int, ack: str = "auto") -> dict[str, Any]:
    pipe.purge()
    con = _worker("raw_con", queue=pipe.queue, count=count, ack=ack, timeout=120)
    servers = _server_pids()
    try:
        con.wait_ready()
        scpu0 = {k: _proc_cpu(v) for k, v in servers.items()}
        pr = _worker("raw_pub", exchange=pipe.exchange, data=data).result(150)
        cr = con.result(150)
        scpu = {f"{k}_cpu_s": round(_proc_cpu(v) - scpu0[k], 2) for k, v in servers.items()}
    finally:
        con.kill()
        pipe.purge()
    if not cr.get("complete"):
        raise RuntimeError(f"raw pipe lost messages: {cr.get('received')} of {count}")
    secs = cr["t_last"] - pr["t_start"]
    return {"messages": count, "seconds": round(secs, 3), "rate": count / secs, "publish_rate": pr["rate"],
            "consumer_cpu_s": cr.get("cpu_s"), "producer_cpu_s": pr.get("cpu_s"), **scpu, "loadavg": _load()}


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def _server_pids() -> dict[str, int]:
    """PIDs of the broker (beam.smp) and of the MongoDB-wire server on QA_MONGO_URL's port, to read their CPU
    time (read-only: /proc/<pid>/stat). Both are shared with other users of the machine."""
    import urllib.parse

    port = str(urllib.parse.urlsplit(os.environ.get("QA_MONGO_URL", "")).port or "")
    out: dict[str, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode(errors="replace")
        if "beam.smp" in text and "rabbit" in text:
            out.setdefault("broker", int(d))
        elif "nx-27017" in text and port and port in text:
            out.setdefault("mongo", int(d))
    return out


def _proc_mem(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) / 1024.0  # MB
    except OSError:
        pass
    return out


class Pipeline:
    """One namespaced topology + MongoDB database + ``shards`` tickhandler subprocesses (shard 0..N-1)."""

    def __init__(self, batch_size: int, prefetch: int, batch_wait: float | None = None,
                 profile_to: Path | None = None, tmp: Path | None = None, shards: int = 1) -> None:
        from qapubsub.topology import Topology

        tag = uuid.uuid4().hex[:10]
        self.ns = f"bpl{tag}."
        self.db_name = f"bench_pl_{tag}"
        self.topo = Topology(self.ns)
        self.tmp = tmp or Path(tempfile.gettempdir())
        self.shards = shards
        self.log_paths = [self.tmp / f"tickhandler-{tag}-{i}.log" for i in range(shards)]
        self.args = {"batch_size": batch_size, "prefetch": prefetch, "batch_wait": batch_wait, "shards": shards}
        queues = [self.topo.tick_queue(i) for i in range(shards)]
        _amqp(lambda ch: self.topo.declare_sync(ch, queues=(self.topo.dead_letters, *queues)))
        env = {**os.environ, "QA_NAMESPACE": self.ns, "QA_MONGO_DB": self.db_name, "QA_TICK_SHARDS": str(shards),
               "PYTHONUNBUFFERED": "1"}
        cmd = [PY, "-m", "handlers.tickhandler", "--batch-size", str(batch_size), "--prefetch", str(prefetch),
               "--shards", str(shards)]
        if batch_wait is not None:
            cmd += ["--batch-wait", str(batch_wait)]
        if profile_to is not None:
            # ``python -m cProfile -m handlers.tickhandler`` breaks run_module("__main__"): call the same
            # entry point (handlers.cli.run_module) under cProfile.run instead
            code = ("import cProfile; from handlers import cli; "
                    f"cProfile.run('cli.run_module(\"handlers.tickhandler\", None, \"qaflow tickhandler\")', "
                    f"{str(profile_to)!r})")
            cmd = [PY, "-c", code, *cmd[3:]]
        self._logs = [open(lp, "w") for lp in self.log_paths]  # noqa: SIM115 - closed in close()
        self.procs = [subprocess.Popen([*cmd, "--shard", str(i)], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=ROOT, env=env)
                      for i, log in enumerate(self._logs)]
        self.summary: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, text in zip(self.procs, self.logs()):
                if p.poll() is not None:
                    raise RuntimeError(f"tickhandler exited ({p.returncode}): {text[-800:]}")
            if all(": consuming" in text for text in self.logs()):
                return
            time.sleep(0.05)
        raise RuntimeError(f"tickhandler not consuming after {timeout} s: {self.log()[-800:]}")

    def logs(self) -> list[str]:
        out = []
        for lp in self.log_paths:
            try:
                out.append(lp.read_text())
            except OSError:
                out.append("")
        return out

    def log(self) -> str:
        return "\n".join(self.logs())

    def cpu(self) -> float:
        return sum(_proc_cpu(p.pid) for p in self.procs)

    def mem(self) -> dict[str, float]:
        """VmRSS / VmHWM of the tickhandler (summed over the shards)."""
        out: dict[str, float] = {}
        for p in self.procs:
            for k, v in _proc_mem(p.pid).items():
                out[k] = out.get(k, 0.0) + v
        return out

    def stop(self) -> dict[str, Any]:
        """SIGTERM (drain, exit 0) and parse the shutdown summaries (counts, dropped; summed over the shards)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # our own children, by their handles
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        counts: dict[str, int] = {}
        dropped: dict[str, int] = {}
        errors: list[str] = []
        for text in self.logs():
            m = re.search(r"tickhandler stopped: (\{.*?\}); dropped (\{.*?\})\s*$", text, re.M)
            if m:
                for into, part in ((counts, m.group(1)), (dropped, m.group(2))):
                    for k, v in ast.literal_eval(part).items():
                        into[k] = into.get(k, 0) + v
            errors += [ln for ln in text.splitlines() if " ERROR " in ln or " WARNING " in ln]
        self.summary = {"counts": counts, "dropped": dropped}
        codes = [p.returncode for p in self.procs]
        self.summary["returncode"] = codes[0] if len(codes) == 1 else codes
        if errors:
            self.summary["log_problems"] = errors[:5]
        return self.summary

    def stored(self) -> dict[str, int]:
        import pymongo

        client = pymongo.MongoClient(_mongo_url(), serverSelectionTimeoutMS=5000)
        try:
            db = client[self.db_name]
            n = 0
            for d in db.ticks.find({}, {"n": 1, "_id": 0}):
                n += int(d.get("n", 0))
            return {"ticks": n, "chunks": db.ticks.estimated_document_count(),
                    "bars": db.bars.estimated_document_count()}
        finally:
            client.close()

    def close(self) -> None:
        import pymongo

        if any(p.poll() is None for p in self.procs):
            self.stop()
        for log in self._logs:
            log.close()
        try:
            client = pymongo.MongoClient(_mongo_url(), serverSelectionTimeoutMS=5000)
            client.drop_database(self.db_name)
            client.close()
        except Exception:  # noqa: BLE001
            pass

        def f(ch: Any) -> None:
            for q in (*(self.topo.tick_queue(i) for i in range(self.shards)), self.topo.dead_letters):
                ch.queue_delete(q.name)
            for ex in self.topo.exchanges:
                ch.exchange_delete(ex.name)
        try:
            _amqp(f)
        except Exception:  # noqa: BLE001
            pass
        for lp in self.log_paths:
            try:
                lp.unlink()
            except OSError:
                pass


def pipeline_run(data: Path, meta: dict[str, Any], batch_size: int, prefetch: int, *, rate: float | None = None,
                 batch_wait: float | None = None, profile_to: Path | None = None, tmp: Path,
                 keep_rtbars: bool = False, warmup: float = WARMUP_S, shards: int = 1) -> dict[str, Any]:
    """Publish ``data`` through a fresh tickhandler (``shards`` of them); returns rate, loss check, CPU,
    RSS (and rtbar records).

    With several shards the sentinel's closed bar says only that *its* shard is done: the end is
    then the first moment after it at which MongoDB holds every tick (polled every 50 ms, from
    the sentinel on, so the polling does not load the run itself).
    """
    pl = Pipeline(batch_size, prefetch, batch_wait, profile_to, tmp, shards=shards)
    tag = uuid.uuid4().hex[:8]
    rt_out = tmp / f"rtbars-{tag}.json"
    send_out = tmp / f"sends-{tag}.json"
    mon: Proc | None = None
    try:
        pl.wait_ready()
        mem0 = pl.mem()
        mon = _worker("rtbar_con", exchange=pl.topo.rtbar, bar_exchange=pl.topo.bar, sentinel=meta["sentinel"],
                      timeout=150, out=rt_out)
        mon.wait_ready()
        servers = _server_pids()
        cpu0 = pl.cpu()
        scpu0 = {k: _proc_cpu(v) for k, v in servers.items()}
        pub = _worker("tick_pub", exchange=pl.topo.tick, data=data, rate=rate, warmup=warmup,
                      out=send_out if keep_rtbars else None)
        pr = pub.result(200)
        mr = mon.result(200)
        t_end = mr.get("t_sentinel")
        if shards > 1 and t_end is not None:
            want = meta["ticks"] + 1 + (1 if pr.get("t_warmup") else 0)  # + the sentinel (+ the warm-up tick)
            deadline = time.monotonic() + 60
            while pl.stored()["ticks"] < want:
                if time.monotonic() > deadline:
                    break  # reported as loss below
                time.sleep(0.05)
                t_end = time.time()
        cpu1 = pl.cpu()
        scpu1 = {k: _proc_cpu(v) for k, v in servers.items()}
        mem1 = pl.mem()
        if not mr.get("sentinel_seen"):
            raise RuntimeError(f"sentinel bar not seen within the timeout; tickhandler log: {pl.log()[-600:]}")
        summary = pl.stop()
        stored = pl.stored()
        ticks = meta["ticks"]
        dropped = sum((summary.get("dropped") or {}).values())
        stored_stream = stored["ticks"] - 1 - (1 if pr.get("t_warmup") else 0)  # minus the sentinel (+ warm-up)
        rtbars = json.loads(rt_out.read_text())
        wsym = meta.get("warmup")
        warm_arr = [r[6] for r in rtbars if wsym and f"{r[0]}.{r[1]}" == wsym]
        first_bar_ms = round((min(warm_arr) / 1e9 - pr["t_warmup"]) * 1000, 1) if warm_arr and pr.get("t_warmup") else None
        rtbars = [r for r in rtbars if not (wsym and f"{r[0]}.{r[1]}" == wsym)]
        secs = t_end - pr["t_start"]
        out: dict[str, Any] = {
            "batch_size": batch_size, "prefetch": prefetch, "batch_wait": batch_wait, "shards": shards,
            "offered_rate": rate,
            "ticks": ticks, "messages": meta["messages"], "seconds": round(secs, 3),
            "rate": ticks / secs, "publish_rate": pr["rate"], "stored": stored_stream, "dropped": dropped,
            "zero_loss": stored_stream == ticks and dropped == 0,
            "chunks": stored["chunks"], "bars_stored": stored["bars"], "rtbars_seen": len(rtbars),
            "first_bar_after_start_ms": first_bar_ms,
            "tickhandler_cpu_s": round(cpu1 - cpu0, 3), "tickhandler_cpu_us_per_tick": round((cpu1 - cpu0) / ticks * 1e6, 2),
            "producer_cpu_s": round(pr.get("cpu_s") or 0.0, 3),
            "broker_cpu_s": round(scpu1["broker"] - scpu0["broker"], 2) if "broker" in servers else None,
            "mongo_cpu_s": round(scpu1["mongo"] - scpu0["mongo"], 2) if "mongo" in servers else None,
            "rss_start_mb": mem0.get("VmRSS"), "rss_end_mb": mem1.get("VmRSS"), "hwm_mb": mem1.get("VmHWM"),
            "tickhandler_summary": summary,
        }
        if keep_rtbars:
            out["rtbar_records"] = rtbars
            out["send_ns"] = json.loads(send_out.read_text())
        return out
    finally:
        if mon is not None:
            mon.kill()
        pl.close()
        for p in (rt_out, send_out):
            try:
                p.unlink()
            except OSError:
                pass


# ------------------------------------------------------------------------------ latency
def rtbar_latency(ticks: list[Any], sends: list[int], rtbars: list[list[Any]], warmup_s: float = 1.0) -> dict[str, Any]:
    """Latency of every realtime 1-min bar: arrival - send time of the newest tick it holds."""
    by_inst: dict[tuple[str, str], list[tuple[int, float, int]]] = {}
    for t, s in zip(ticks, sends):
        by_inst.setdefault((t.exchange, t.symbol), []).append((t.datetime, t.last_price, s))
    for v in by_inst.values():
        v.sort(key=lambda x: x[0])
    import bisect

    t_first = sends[0] if sends else 0
    lat: list[int] = []
    unmatched = 0
    for ex, sym, freq, label, count, close, arr in rtbars:
        if freq != "1min":
            continue
        lst = by_inst.get((ex, sym))
        if not lst:
            unmatched += 1
            continue
        i = bisect.bisect_left(lst, (label,)) + count - 1
        if i >= len(lst) or lst[i][0] >= label + 60_000 or lst[i][1] != close:
            unmatched += 1
            continue
        sent = lst[i][2]
        if sent - t_first < warmup_s * 1e9:
            continue
        lat.append(arr - sent)
    lat.sort()

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6, 3) if lat else None
    return {"bars": len(lat), "unmatched": unmatched, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] / 1e6, 3) if lat else None}


# ------------------------------------------------------------------------------ profile
def profile_top(path: Path, n: int = 25) -> list[dict[str, Any]]:
    import pstats

    st = pstats.Stats(str(path))
    total = st.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"func": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3), "tot_pct": round(100 * tt / total, 1) if total else None})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:n]


def profile_cum(path: Path, names: tuple[str, ...]) -> dict[str, float]:
    """Cumulative time of selected functions (by substring of file:func), as % of the profiled total."""
    import pstats

    st = pstats.Stats(str(path))
    total = st.total_tt  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        key = f"{Path(file).name}:{func}"
        for want in names:
            if key.endswith(want):
                out[want] = round(max(out.get(want, 0.0), 100 * ct / total), 1)
    out["_total_s"] = round(total, 3)
    return out


# ------------------------------------------------------------------------------ figures
def figure(name: str, value: float | None, unit: str, *, baseline_name: str | None = None,
           baseline: float | None = None, goal: str | None = None, met: bool | None = None,
           higher_is_better: bool = True, note: str = "") -> dict[str, Any]:
    ratio = round(value / baseline, 3) if value is not None and baseline else None
    return {"name": name, "value": None if value is None else round(value, 3), "unit": unit,
            "baseline_name": baseline_name, "baseline": None if baseline is None else round(baseline, 3),
            "ratio": ratio, "goal": goal, "met": met, "higher_is_better": higher_is_better, "note": note}


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
            if k not in ("rtbar_records", "send_ns")}


def run(quick: bool = False, profile: bool | None = None) -> dict[str, Any]:
    """All four measurements; ~3.5 min (``quick``: ~1 min, no tuning sweep, no profile)."""
    t_begin = time.monotonic()
    profile = (not quick) if profile is None else profile
    errors: dict[str, str] = {}
    details: dict[str, Any] = {"loadavg_start": _load(), "quick": quick}
    n_single = 25_000 if quick else 50_000
    n_lat_s = 3.0 if quick else 8.0
    n_batched = 100_000 if quick else 400_000
    repeats = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    single, batched = tmp / "single.pkl", tmp / "batched.pkl"
    lat_data, mem_data = tmp / "latency.pkl", tmp / "mem.pkl"
    figures: list[dict[str, Any]] = []
    pipe = RawPipe()

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - one failing scenario must not stop the others
            errors[name] = f"{type(exc).__name__}: {exc}"[:800]
            return None

    try:
        t = time.monotonic()
        ticks = gen_ticks(max(n_single, int(5_000 * n_lat_s)))
        details["single_data"] = meta_single = write_data(single, ticks[:n_single])
        lat_ticks = ticks[:int(5_000 * n_lat_s)]
        details["latency_data"] = meta_lat = write_data(lat_data, lat_ticks)
        bticks = gen_ticks(n_batched, seed=SEED + 1)
        details["batched_data"] = meta_b = write_data(batched, bticks, batch=100)
        del bticks
        details["data_seconds"] = round(time.monotonic() - t, 1)

        # 1. one tick per message: raw pipe and tickhandler, interleaved ------------------------
        raw_runs: list[dict[str, Any]] = []
        sweep: list[dict[str, Any]] = []
        configs = CONFIGS_QUICK if quick else CONFIGS_FULL
        for i, (bs, pf) in enumerate(configs):
            if i < repeats:
                r = attempt(f"raw_pipe_{i}", lambda: raw_pipe(pipe, single, meta_single["messages"]))
                if r:
                    raw_runs.append(r)
            r = attempt(f"single_{bs}_{pf}", lambda: pipeline_run(single, meta_single, bs, pf, tmp=tmp))
            if r:
                sweep.append(r)
        ok = [r for r in sweep if r["zero_loss"]]
        best_cfg = max(ok or sweep, key=lambda r: r["rate"]) if sweep else None
        best_runs: list[dict[str, Any]] = []
        if best_cfg:
            best_runs.append(best_cfg)
            for i in range(repeats - 1):
                if len(raw_runs) < repeats:
                    r = attempt(f"raw_pipe_extra_{i}", lambda: raw_pipe(pipe, single, meta_single["messages"]))
                    if r:
                        raw_runs.append(r)
                r = attempt(f"single_best_repeat_{i}", lambda: pipeline_run(
                    single, meta_single, best_cfg["batch_size"], best_cfg["prefetch"], tmp=tmp))
                if r:
                    best_runs.append(r)
        raw_rate = _median([r["rate"] for r in raw_runs])
        details["raw_pipe_runs"] = raw_runs
        details["single_sweep"] = [_strip(r) for r in sweep]
        details["single_best_runs"] = [_strip(r) for r in best_runs]
        if best_runs:
            rate = _median([r["rate"] for r in best_runs])
            zero = all(r["zero_loss"] for r in best_runs)
            figures.append(figure(
                "pipeline.single_tick.ticks_per_s", rate, "ticks/s", baseline_name="raw pika pipe (msg/s, same bodies)",
                baseline=raw_rate, goal=">= 0.8x raw pipe, zero loss",
                met=bool(raw_rate and rate >= 0.8 * raw_rate and zero),
                note=f"best --batch-size {best_cfg['batch_size']} --prefetch {best_cfg['prefetch']}; "  # type: ignore[index]
                     f"median of {len(best_runs)}; zero loss: {zero}; tickhandler CPU "
                     f"{_median([r['tickhandler_cpu_us_per_tick'] for r in best_runs])} us/tick"))
        figures.append(figure("raw_pipe.single_tick.msg_per_s", raw_rate, "msg/s",
                              note=f"plain pika producer -> broker -> consumer (auto-ack), median of {len(raw_runs)}"))

        # 2. latency at 5k/s ----------------------------------------------------------------------
        def lat(bs: int, pf: int, bw: float | None) -> dict[str, Any]:
            r = pipeline_run(lat_data, meta_lat, bs, pf, batch_wait=bw, rate=5_000, tmp=tmp, keep_rtbars=True)
            r["latency"] = rtbar_latency(lat_ticks, r["send_ns"], r["rtbar_records"])
            return r
        lat_runs = []
        for bs, pf, bw in (LATENCY_CONFIGS[:1] if quick else LATENCY_CONFIGS):
            r = attempt(f"latency_5k_{bs}_{pf}_{bw}", lambda: lat(bs, pf, bw))
            if r:
                lat_runs.append(r)
        details["latency_runs"] = [_strip(r) for r in lat_runs]

        def raw_lat() -> dict[str, Any]:
            from benchmarks import bench_transport as bt

            br = bt.Broker()
            try:
                return bt.latency_step(br, "pub_raw", "con_raw", 5_000)
            finally:
                br.close()
        raw_l = attempt("raw_latency_5k", raw_lat)
        details["raw_latency_5k"] = raw_l
        lr = min(lat_runs, key=lambda r: r["latency"]["p99_ms"] or 1e9) if lat_runs else None
        if lr:
            L = lr["latency"]
            figures.append(figure("pipeline.rtbar_latency_5k.p99_ms", L["p99_ms"], "ms",
                                  baseline_name="raw pika one hop p99 at 5k msg/s (ms)",
                                  baseline=(raw_l or {}).get("p99_ms"), goal="<= 50 ms",
                                  met=L["p99_ms"] is not None and L["p99_ms"] <= 50 and lr["zero_loss"],
                                  higher_is_better=False,
                                  note=f"--batch-size {lr['batch_size']} --prefetch {lr['prefetch']} --batch-wait "
                                       f"{lr['batch_wait'] or 0.02}; p50 {L['p50_ms']} ms, max {L['max_ms']} ms over {L['bars']} rtbars "
                                       f"({L['unmatched']} unmatched); achieved {lr['publish_rate']:.0f} ticks/s; "
                                       f"zero loss: {lr['zero_loss']}"))

        # 3. batched: TickBatch of 100 -----------------------------------------------------------
        braw = attempt("raw_pipe_batched", lambda: raw_pipe(pipe, batched, meta_b["messages"]))
        bruns: list[dict[str, Any]] = []
        for bs, pf in (BATCHED_CONFIGS[:1] if quick else BATCHED_CONFIGS):
            r = attempt(f"batched_{bs}_{pf}", lambda: pipeline_run(batched, meta_b, bs, pf, tmp=tmp))
            if r:
                bruns.append(r)
        # the same stream over two tickhandler shards (the design's horizontal scale: one process per core)
        sruns: list[dict[str, Any]] = []
        for bs, pf in BATCHED_CONFIGS[:1]:
            r = attempt(f"batched_{bs}_{pf}_2shards", lambda: pipeline_run(batched, meta_b, bs, pf, tmp=tmp, shards=2))
            if r:
                sruns.append(r)
        details["raw_pipe_batched"] = braw
        details["batched_runs"] = [_strip(r) for r in bruns]
        details["batched_2shards_runs"] = [_strip(r) for r in sruns]
        braw_ticks = braw["rate"] * meta_b["ticks"] / meta_b["messages"] if braw else None
        for name, runs, how in (("pipeline.batched_100.ticks_per_s", bruns, "one tickhandler"),
                                ("pipeline.batched_100_2shards.ticks_per_s", sruns, "two tickhandler shards")):
            if not runs:
                continue
            okb = [r for r in runs if r["zero_loss"]] or runs
            b = max(okb, key=lambda r: r["rate"])
            figures.append(figure(
                name, b["rate"], "ticks/s",
                baseline_name="raw pika pipe, same TickBatch bodies (ticks/s)", baseline=braw_ticks,
                goal=">= 100,000 ticks/s, zero loss", met=b["rate"] >= 100_000 and b["zero_loss"],
                note=f"{how}, --batch-size {b['batch_size']} --prefetch {b['prefetch']} (messages of 100 ticks); "
                     f"zero loss: {b['zero_loss']}; tickhandler CPU {b['tickhandler_cpu_us_per_tick']} us/tick"))

        # 4. RSS with 5,000 instruments -----------------------------------------------------------
        def mem() -> dict[str, Any]:
            inst = many_instruments(5000)
            mt = gen_ticks(25_000, start=MEM_START, instruments=inst, seed=SEED + 2)
            meta = write_data(mem_data, mt)
            meta["instruments_with_ticks"] = len({(t.exchange, t.symbol) for t in mt})
            r = pipeline_run(mem_data, meta, 1000, 4000, tmp=tmp)
            r["data"] = meta
            return r
        mr = attempt("rss_5000", mem)
        if mr:
            details["rss_run"] = _strip(mr)
            figures.append(figure(
                "pipeline.rss_5000_instruments.end_mb", mr["rss_end_mb"], "MB",
                baseline_name="RSS at start (MB)", baseline=mr["rss_start_mb"], goal="<= 300 MB",
                met=mr["rss_end_mb"] is not None and mr["rss_end_mb"] <= 300, higher_is_better=False,
                note=f"{mr['data']['instruments_with_ticks']} instruments, {mr['ticks']} ticks one per message; "
                     f"peak (VmHWM) {mr['hwm_mb']} MB; zero loss: {mr['zero_loss']}"))

        # profile of the tickhandler (one tick per message, best settings) -------------------------
        if profile and best_cfg and time.monotonic() - t_begin < 200:
            prof = tmp / "tickhandler.prof"

            def prof_run() -> dict[str, Any]:
                r = pipeline_run(single, meta_single, best_cfg["batch_size"], best_cfg["prefetch"],
                                 profile_to=prof, tmp=tmp)
                return {"run": _strip(r), "top_tottime": profile_top(prof),
                        "cumulative_pct": profile_cum(prof, (
                            "batch.py:_on_message", "batch.py:_flush_batch", "tickhandler.py:handle",
                            "store.py:write", "tickhandler.py:_emit", "tickhandler.py:publish",
                            "sync.py:publish", "sync.py:flush", "sync.py:_drain", "sync.py:_finish",
                            "batch.py:_finish", "aggregation.py:on_tick", "cleaning.py:check",
                            "messages.py:decode", "tickhandler.py:on_timer", "store.py:_insert",
                            "blocking_connection.py:process_data_events"))}
            pr = attempt("profile", prof_run)
            if pr:
                details["profile"] = pr
    finally:
        attempt("cleanup_raw_pipe", pipe.close)
        for p in tmp.iterdir():
            try:
                p.unlink()
            except OSError:
                pass
        try:
            tmp.rmdir()
        except OSError:
            pass
    details["loadavg_end"] = _load()
    details["wall_seconds"] = round(time.monotonic() - t_begin, 1)
    return {"figures": figures, "details": details, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.run import table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", default=None)
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    res = run(quick=a.quick, profile=a.profile)
    res["status"] = "ok"
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    d = res["details"]
    print(f"load average {d['loadavg_start']} -> {d['loadavg_end']}; {d['wall_seconds']} s")
    print(table({"pipeline": res}))
    if "profile" in d:
        print("\ntickhandler profile (cumulative % of profiled time):", d["profile"]["cumulative_pct"])
        for r in d["profile"]["top_tottime"][:15]:
            print(f"  {r['tot_pct']:5.1f}%  {r['tottime_s']:7.3f}s  {r['calls']:>9}  {r['func']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
