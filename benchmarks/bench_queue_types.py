"""Tick path cost of a quorum tick-shard queue vs the classic one, on one node (``QA_AMQP_URL``).

``python -m benchmarks.bench_queue_types [--n 30000] [--rounds 3]``. For each queue kind, a uuid-named
queue (deleted afterwards; never a shared queue) declared with the tick shard's arguments:

* ``classic``: durable classic, ``x-single-active-consumer``, ``x-dead-letter-exchange`` (today's
  ``Topology.tick_queue``);
* ``quorum``: ``x-queue-type=quorum``, ``x-single-active-consumer``, ``x-delivery-limit``, DLX.

A producer process publishes ``n`` 200-byte transient bodies through ``qapubsub.sync.StreamPublisher``
(confirms gathered, as the tick sources do); a consumer process (pika, prefetch 1000, multiple-ack every
200: the tickhandler's BatchConsumer shape) drains it. Rate = n / (last consumed - first published).
Kinds alternate inside every round (the shared broker is noisy); medians are reported. Also reported:
publish-only into the queue with no consumer (confirm cost) for each kind.

``--tick-path``: the same comparison on the real tick path (``benchmarks.bench_cluster.tick_run``: the
bench_pipeline producer -> ``qa.tick`` -> one shard -> ``python -m handlers.tickhandler`` -> MongoDB),
the shard queue declared classic or quorum (uuid namespace, deleted afterwards).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time
import uuid
from typing import Any

BODY = json.dumps({"schema": "qa.tick", "exchange": "SHFE", "symbol": "rb2512", "last_price": 3901.0,
                   "volume": 123456, "bid1": 3900.0, "ask1": 3902.0, "datetime": 1700000000000,
                   "pad": "x" * 40}).encode()


def _args(kind: str) -> dict[str, Any]:
    if kind == "classic":
        return {"x-single-active-consumer": True, "x-dead-letter-exchange": "bqt-none"}
    return {"x-queue-type": "quorum", "x-single-active-consumer": True, "x-delivery-limit": 10,
            "x-dead-letter-exchange": "bqt-none"}


def _producer(url: str, queue: str, n: int, start: Any, t_first: Any) -> None:
    from qapubsub.sync import Connection, StreamPublisher

    conn = Connection(urls=[url], client_name="bench-queue-types")
    pub = StreamPublisher(conn, batch_size=1000)
    start.wait()
    t_first.value = time.time()
    for _ in range(n):
        pub.publish("", queue, BODY)
    pub.flush()
    conn.close()


def _consumer(url: str, queue: str, n: int, ready: Any, t_last: Any) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    got = 0
    pending = 0

    def on(ch: Any, m: Any, _p: Any, _b: bytes) -> None:
        nonlocal got, pending
        got += 1
        pending += 1
        if pending >= 200 or got == n:
            ch.basic_ack(m.delivery_tag, multiple=True)
            pending = 0
        if got == n:
            t_last.value = time.time()
            ch.stop_consuming()

    ch.basic_consume(queue, on)
    ready.set()
    ch.start_consuming()
    conn.close()


def one(url: str, kind: str, n: int, consume: bool = True) -> float:
    import pika

    queue = f"bqt-{kind}-{uuid.uuid4().hex[:10]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, arguments=_args(kind))
    try:
        start, ready = mp.Event(), mp.Event()
        t_first, t_last = mp.Value("d", 0.0), mp.Value("d", 0.0)
        cons = None
        if consume:
            cons = mp.Process(target=_consumer, args=(url, queue, n, ready, t_last))
            cons.start()
            ready.wait(30)
        prod = mp.Process(target=_producer, args=(url, queue, n, start, t_first))
        prod.start()
        start.set()
        prod.join(300)
        if cons is not None:
            cons.join(300)
            return n / (t_last.value - t_first.value)
        return n / (time.time() - t_first.value)
    finally:
        ch.queue_delete(queue)
        conn.close()


def run(url: str, n: int = 30000, rounds: int = 3) -> dict[str, Any]:
    res: dict[str, dict[str, list[float]]] = {k: {"pipe": [], "publish_only": []} for k in ("classic", "quorum")}
    for r in range(rounds):
        for kind in (("classic", "quorum") if r % 2 == 0 else ("quorum", "classic")):
            res[kind]["pipe"].append(one(url, kind, n))
            res[kind]["publish_only"].append(one(url, kind, n, consume=False))
    out: dict[str, Any] = {"n": n, "rounds": rounds, "runs": res}
    for kind in res:
        out[kind] = {k: round(statistics.median(v)) for k, v in res[kind].items()}
    out["quorum_vs_classic"] = {k: round(out["quorum"][k] / out["classic"][k], 2) for k in ("pipe", "publish_only")}
    return out


def tick_path(url: str, n: int = 30000, rounds: int = 3) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from benchmarks.bench_cluster import tick_run
    from benchmarks.bench_pipeline import gen_ticks, many_instruments, write_data

    tmp = Path(tempfile.mkdtemp(prefix="bench-qt-"))
    data = tmp / "ticks.pkl"
    write_data(data, gen_ticks(n, instruments=many_instruments(60)), with_sentinel=False)
    res: dict[str, list[Any]] = {"classic": [], "quorum": []}
    for r in range(rounds):
        for kind in (("classic", "quorum") if r % 2 == 0 else ("quorum", "classic")):
            res[kind].append(tick_run([url], 1, data, n, tmp, queue_kind=kind))
    out: dict[str, Any] = {"n": n, "rounds": rounds,
                           "runs": {k: [(x["rate"], x["zero_loss"]) for x in v] for k, v in res.items()}}
    for k, v in res.items():
        out[k] = round(statistics.median(x["rate"] or 0 for x in v))
    out["quorum_vs_classic"] = round(out["quorum"] / out["classic"], 2) if out["classic"] else None
    return out


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--url", default=os.environ.get("QA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F").split(",")[0])
    p.add_argument("--tick-path", action="store_true", help="the real tickhandler path instead of a raw pipe")
    a = p.parse_args()
    print(json.dumps(tick_path(a.url, a.n, a.rounds) if a.tick_path else run(a.url, a.n, a.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
