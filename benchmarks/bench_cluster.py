"""Scale-out benchmark on the three-node cluster of ``scripts/cluster.py`` (``make cluster-bench``).

``python -m benchmarks.bench_cluster [--quick] [--out FILE] [--skip-orders] [--skip-ticks]``. Needs
``QA_CLUSTER_AMQP_URLS`` / ``QA_CLUSTER_MANAGEMENT_URLS`` (``.qaflow/cluster.env``, written by ``make
cluster-up``), ``QA_AMQP_URL`` (the single default node, the baseline) and ``QA_MONGO_URL``. Every run
uses uuid namespaces and uuid MongoDB databases, all deleted afterwards; the shared default node is only
used for namespaced queues of its own.

1. **Tick pipeline, 1 / 2 / 3 tickhandler instances** (same run, same ticks): ``k`` shards
   (``--shards k --shard i``), shard queue ``i`` declared through node ``i`` (a classic queue lives on
   the node it is declared on) and tickhandler ``i`` connected first to node ``i``; the producer
   (``bench_pipeline_worker tick_pub``: ``StreamPublisher``, confirms gathered, one tick per message)
   publishes to ``qa.tick`` through node 1. Seeded RandomSource ticks over 60 futures instruments (so
   the consistent hash spreads them over the shards). End = the moment MongoDB holds every tick
   (sum of the chunks' ``n``, polled every 0.2 s); rate = ticks / (end - first publish). Zero loss:
   stored == sent and nothing dropped (each tickhandler's shutdown summary). Baseline in the same
   run: one tickhandler on the single default node. Then 1 and 3 instances again with *classic* shard
   queues (``use_shard_queue_kind``; the topology declares quorum ones, 3 replicas on the cluster): the
   price of node-loss tolerance for ticks.
2. **Order path p50/p99**: ``bench_orders``' latency measurement (``qaorder`` -> router -> ``qa.exec``
   -> sim executor -> first report, 200 orders/s offered) with the router and executor connected to the
   cluster (all three URLs, fail-over) against the same on the single default node, same run. On the
   cluster the command queues are quorum queues with 3 replicas (one Raft round trip per enqueue).

On one machine the three nodes, the daemons, the producer and MongoDB share the same cores, so this
measures the cost of clustering and how much sharding gains on *this* box, not the capacity of a
real three-machine cluster (see docs/scaling.md).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.bench_pipeline import _load, _mongo_url
from benchmarks.bench_pipeline import _url as _single_url

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _cluster_urls() -> tuple[list[str], list[str]]:
    env = dict(os.environ)
    f = ROOT / ".qaflow" / "cluster.env"
    if not env.get("QA_CLUSTER_AMQP_URLS") and f.exists():
        for line in f.read_text().splitlines():
            line = line.strip().removeprefix("export ").strip()
            if "=" in line:
                k, v = line.split("=", 1)
                env.setdefault(k, v.strip().strip("'\""))
    urls = [u for u in env.get("QA_CLUSTER_AMQP_URLS", "").split(",") if u]
    mgmt = [u for u in env.get("QA_CLUSTER_MANAGEMENT_URLS", "").split(",") if u]
    if not urls:
        raise RuntimeError("QA_CLUSTER_AMQP_URLS is not set: run `make cluster-up` (or use `make cluster-bench`)")
    return urls, mgmt




def _channel_do(url: str, fn: Any) -> Any:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return fn(conn.channel())
    finally:
        if conn.is_open:
            conn.close()


# ------------------------------------------------------------------------------ 1. ticks
def use_shard_queue_kind(kind: str | None) -> None:
    """Make ``Topology.tick_queue`` declare ``kind`` ("classic" or "quorum") shard queues in this process
    (benchmarks only: compares the two kinds on the real tick path without editing the topology)."""
    from qapubsub import topology as t

    orig = t.Topology.__dict__.get("_orig_tick_queue") or t.Topology.tick_queue
    t.Topology._orig_tick_queue = orig  # type: ignore[attr-defined]
    if kind is None:
        t.Topology.tick_queue = orig  # type: ignore[method-assign]
        return

    def tick_queue(self: t.Topology, shard: int) -> t.Queue:
        args: dict[str, Any] = {"x-dead-letter-exchange": self.dlx, "x-single-active-consumer": True}
        if kind == "quorum":
            args.update({"x-queue-type": "quorum", "x-delivery-limit": t.DELIVERY_LIMIT})
        return t.Queue(self.name(f"qa.tickhandler.{shard}"), arguments=args,
                       bindings=(t.Binding(self.tick_shards, "1"),))

    t.Topology.tick_queue = tick_queue  # type: ignore[method-assign]


def _tickhandler_cmd(queue_kind: str | None) -> list[str]:
    if queue_kind is None:
        return [PY, "-m", "handlers.tickhandler"]
    code = (f"import benchmarks.bench_cluster as b; b.use_shard_queue_kind({queue_kind!r}); "
            "from handlers import cli; raise SystemExit(cli.run_module('handlers.tickhandler', None, 'qaflow tickhandler'))")
    return [PY, "-c", code]


def tick_run(node_urls: list[str], k: int, data: Path, n_ticks: int, tmp: Path, *, batch_size: int = 1000,
             prefetch: int = 4000, timeout: float = 240, queue_kind: str | None = None) -> dict[str, Any]:
    """``k`` tickhandler shards over ``node_urls`` (shard i on node i mod len); returns rate and checks.
    ``queue_kind`` ("classic"/"quorum") overrides the topology's shard queue kind (None: as declared)."""
    import pymongo

    from benchmarks.bench_pipeline import _proc_cpu
    from benchmarks.bench_transport import Proc
    from qapubsub.topology import Topology

    use_shard_queue_kind(queue_kind)

    tag = uuid.uuid4().hex[:8]
    topo = Topology(f"bcl{tag}.")
    db_name = f"bench_cl_{tag}"
    url_of = lambda i: node_urls[i % len(node_urls)]  # noqa: E731
    first = lambda i: ",".join([url_of(i), *(u for u in node_urls if u != url_of(i))])  # noqa: E731
    client = pymongo.MongoClient(_mongo_url(), serverSelectionTimeoutMS=5000)
    procs: list[tuple[subprocess.Popen[bytes], Path, Any]] = []
    try:
        _channel_do(node_urls[0], lambda ch: topo.declare_sync(ch, queues=(topo.dead_letters,)))
        for i in range(k):
            _channel_do(url_of(i), lambda ch, i=i: topo.declare_sync(ch, queues=(topo.tick_queue(i),)))
        for i in range(k):
            log = tmp / f"tick-{tag}-{i}.log"
            f = open(log, "wb")  # noqa: SIM115 - closed below
            env = {**os.environ, "QA_AMQP_URL": first(i), "QA_MONGO_DB": db_name, "QA_NAMESPACE": topo.namespace,
                   "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
            p = subprocess.Popen([*_tickhandler_cmd(queue_kind), "--shards", str(k), "--shard", str(i),
                                  "--batch-size", str(batch_size), "--prefetch", str(prefetch)],
                                 cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            procs.append((p, log, f))
        deadline = time.monotonic() + 60
        while not all(": consuming" in log.read_text() for _p, log, _f in procs):
            for p, log, _f in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"tickhandler exited: {log.read_text()[-800:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("tickhandlers not consuming after 60 s")
            time.sleep(0.1)
        db = client[db_name]

        def stored() -> int:
            return sum(int(d.get("n", 0)) for d in db.ticks.find({}, {"n": 1, "_id": 0}))

        cpu0 = [_proc_cpu(p.pid) for p, _l, _f in procs]
        cmd = [PY, "-m", "benchmarks.bench_pipeline_worker", "tick_pub", "--url", node_urls[0],
               "--exchange", topo.tick, "--data", str(data)]
        pub = Proc(cmd)
        t_end = None
        deadline = time.monotonic() + timeout
        last, changed = 0, time.monotonic()
        while time.monotonic() < deadline:
            now = stored()
            if now != last:
                last, changed = now, time.monotonic()
            if last >= n_ticks:
                t_end = time.time()
                break
            if pub.p.poll() is not None and time.monotonic() - changed > 10:
                break  # published, and nothing stored for 10 s: incomplete (reported, not waited for)
            time.sleep(0.2)
        pr = pub.result(60)
        cpu1 = [_proc_cpu(p.pid) for p, _l, _f in procs]
        summaries = []
        for p, log, f in procs:
            p.send_signal(signal.SIGTERM)  # our own children, by handle
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            f.close()
            m = re.search(r"tickhandler stopped: (\{.*?\}); dropped (\{.*?\})\s*$", log.read_text(), re.M)
            summaries.append({"received": int(re.search(r"'received': (\d+)", m.group(1)).group(1)) if m else None,
                              "dropped": m.group(2) if m else None, "returncode": p.returncode})
        final = stored()
        secs = (t_end - pr["t_start"]) if t_end else None
        kind = "quorum" if topo.tick_queue(0).quorum else "classic"
        return {"instances": k, "nodes": len(node_urls), "queue_kind": kind, "ticks": n_ticks,
                "stored": final,
                "zero_loss": final == n_ticks and all(s["dropped"] in ("{}", None) for s in summaries),
                "seconds": round(secs, 3) if secs else None, "rate": round(n_ticks / secs) if secs else None,
                "publish_rate": round(pr["rate"]), "received_per_instance": [s["received"] for s in summaries],
                "tickhandler_cpu_s": [round(b - a, 2) for a, b in zip(cpu0, cpu1)],
                "complete": t_end is not None, "last_count": last, "loadavg": _load()}
    finally:
        for p, _log, f in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
            f.close()
        client.drop_database(db_name)
        client.close()

        def clean(ch: Any) -> None:
            for q in (topo.dead_letters, *(topo.tick_queue(i) for i in range(k))):
                ch.queue_delete(q.name)
            for ex in topo.exchanges:
                ch.exchange_delete(ex.name)
        for u in node_urls:  # any live node will do
            try:
                _channel_do(u, clean)
                break
            except Exception:  # noqa: BLE001
                continue


def ticks_part(quick: bool, tmp: Path) -> dict[str, Any]:
    from benchmarks.bench_pipeline import gen_ticks, many_instruments, write_data

    urls, _mgmt = _cluster_urls()
    n = 20_000 if quick else 60_000
    ticks = gen_ticks(n, instruments=many_instruments(60))
    data = tmp / "ticks.pkl"
    meta = write_data(data, ticks, with_sentinel=False)
    out: dict[str, Any] = {"ticks": n, "instruments": 60, "body_bytes_median": meta["body_bytes_median"]}
    out["single_node_1"] = tick_run([_single_url()], 1, data, n, tmp)
    for k in (1, 2, 3):
        out[f"cluster_{k}"] = tick_run(urls, k, data, n, tmp)
    # the same with classic shard queues (one node each, as before issue 9): what replication costs here
    for k in (1, 3):
        out[f"cluster_{k}_classic"] = tick_run(urls, k, data, n, tmp, queue_kind="classic")
    return out


# ------------------------------------------------------------------------------ 2. orders
def orders_part(quick: bool) -> dict[str, Any]:
    from benchmarks import bench_orders

    urls, mgmt = _cluster_urls()
    secs = 5.0 if quick else 15.0
    out: dict[str, Any] = {"offered_rate": bench_orders.RATE, "seconds": secs}
    saved = {k: os.environ.get(k) for k in ("QA_AMQP_URL", "QA_MANAGEMENT_URL")}
    for name, amqp, mgmt_url in (("single_node", _single_url(), None),
                                 ("cluster", ",".join(urls), ",".join(mgmt) or None)):
        os.environ["QA_AMQP_URL"] = amqp
        if mgmt_url:
            os.environ["QA_MANAGEMENT_URL"] = mgmt_url
        else:
            os.environ.pop("QA_MANAGEMENT_URL", None)
        b = bench_orders.Bench(quick)
        b.env["QA_AMQP_URL"] = amqp  # the daemons get every node (fail-over); the bench itself uses the first
        try:
            b.start_daemons()
            lat = b.latency(secs, bench_orders.RATE, f"{name}-lat")
            out[name] = {"reports": lat["reports"], "orders": lat["orders"], "total": lat["stages"]["total"],
                         "stages": lat["stages"], "loadavg": _load()}
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            errs = b.close()
            if errs:
                out[name]["cleanup_errors"] = errs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s, c = out.get("single_node", {}).get("total"), out.get("cluster", {}).get("total")
    if s and c and s.get("p99_ms") and c.get("p99_ms"):
        out["p99_cluster_over_single"] = round(c["p99_ms"] / s["p99_ms"], 2)
        out["p50_cluster_over_single"] = round(c["p50_ms"] / s["p50_ms"], 2)
    return out


def run(quick: bool = False, ticks: bool = True, orders: bool = True) -> dict[str, Any]:
    res: dict[str, Any] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "cpus": os.cpu_count(),
                           "loadavg_start": _load()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    if ticks:
        try:
            res["ticks"] = ticks_part(quick, tmp)
        except Exception as exc:  # noqa: BLE001
            res["ticks"] = {"error": f"{type(exc).__name__}: {exc}"}
    if orders:
        try:
            res["orders"] = orders_part(quick)
        except Exception as exc:  # noqa: BLE001
            res["orders"] = {"error": f"{type(exc).__name__}: {exc}"}
    return res


def table(res: dict[str, Any]) -> str:
    rows = ["| run | shard queues | ticks/s | zero loss | per instance | tickhandler CPU s |",
            "|---|---|---|---|---|---|"]
    t = res.get("ticks", {})
    for key in ("single_node_1", "cluster_1", "cluster_2", "cluster_3", "cluster_1_classic", "cluster_3_classic"):
        r = t.get(key)
        if r:
            rows.append(f"| {key} | {r.get('queue_kind')} | {r.get('rate')} | {r.get('zero_loss')} | "
                        f"{r.get('received_per_instance')} | "
                        f"{r.get('tickhandler_cpu_s')} |")
    o = res.get("orders", {})
    rows += ["", "| order path | p50 ms | p99 ms | max ms | reports |", "|---|---|---|---|---|"]
    for key in ("single_node", "cluster"):
        r = o.get(key, {})
        tot = r.get("total") or {}
        rows.append(f"| {key} | {tot.get('p50_ms')} | {tot.get('p99_ms')} | {tot.get('max_ms')} | "
                    f"{r.get('reports')}/{r.get('orders')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--skip-ticks", action="store_true")
    p.add_argument("--skip-orders", action="store_true")
    a = p.parse_args(argv)
    res = run(a.quick, ticks=not a.skip_ticks, orders=not a.skip_orders)
    text = json.dumps(res, indent=2, default=str)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
