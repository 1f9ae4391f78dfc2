"""One side of the tick-pipeline benchmark, run in its own process by ``benchmarks.bench_pipeline``.

    python -m benchmarks.bench_pipeline_worker ROLE --url URL [...]

Roles
-----
``raw_pub``   plain pika ``BlockingChannel.basic_publish`` (transient, no confirms) of the
              pre-encoded bodies in ``--data`` (a pickle written by the parent).
``raw_con``   plain pika consumer of ``--queue``: auto-ack, or manual multiple-ack every 100
              (``--ack multi``); stops after ``--count`` messages.
``tick_pub``  the project's producer side: :class:`qapubsub.sync.StreamPublisher` (confirms
              gathered), one message per item of ``--data`` (a Tick or a TickBatch body);
              ``--rate`` paces it (and records the send time of every tick, ``--out``).
``rtbar_con`` a consumer of the namespaced ``qa.rtbar`` exchange (own exclusive queue): records
              every realtime bar's arrival time; with ``--bar-exchange`` also bound to the
              closed 1-min bars and stops when the *closed* bar of ``--sentinel`` arrives (the
              sentinel tick goes last and closes that bar; the tick queue is FIFO and closed
              bars are published after their ticks and every earlier tick are stored, so at that
              moment every tick is in MongoDB; realtime bars go out before the write), or at
              ``--timeout``.

Every worker prints ``READY`` when it is ready (consumers) and one JSON result line last.
All times are ``time.time()`` (wall clock, comparable across processes).
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from typing import Any


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def _load(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - our own temp file


def _cpu() -> float:
    t = time.process_time()
    return t


# ----------------------------------------------------------------------------- raw pika
def raw_pub(a: argparse.Namespace) -> None:
    import pika

    data = _load(a.data)
    keys, bodies = data["keys"], data["bodies"]
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
    c0 = _cpu()
    t0 = time.time()
    pub = ch.basic_publish
    ex = a.exchange
    for k, b in zip(keys, bodies):
        pub(ex, k, b, props)
    t1 = time.time()
    conn.close()
    _emit({"sent": len(bodies), "t_start": t0, "t_end": t1, "rate": len(bodies) / (t1 - t0),
           "cpu_s": _cpu() - c0})


def raw_con(a: argparse.Namespace) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    st: dict[str, Any] = {"n": 0, "t_first": None, "t_last": None, "c0": None}
    auto = a.ack == "auto"
    if not auto:
        ch.basic_qos(prefetch_count=a.prefetch)

    def on_msg(chan: Any, method: Any, _props: Any, _body: bytes) -> None:
        n = st["n"] = st["n"] + 1
        if n == 1:
            st["t_first"] = time.time()
            st["c0"] = _cpu()
        if not auto and (n % 100 == 0 or n >= a.count):
            chan.basic_ack(method.delivery_tag, multiple=True)
        if n >= a.count:
            st["t_last"] = time.time()
            chan.stop_consuming()

    ch.basic_consume(a.queue, on_msg, auto_ack=auto)
    _ready()
    conn.call_later(a.timeout, ch.stop_consuming)
    ch.start_consuming()
    cpu = _cpu() - st["c0"] if st["c0"] is not None else None
    conn.close()
    _emit({"received": st["n"], "complete": st["n"] >= a.count, "t_first": st["t_first"],
           "t_last": st["t_last"] or time.time(), "cpu_s": cpu})


# ----------------------------------------------------------------------------- the project's publisher
def tick_pub(a: argparse.Namespace) -> None:
    from qapubsub import sync

    data = _load(a.data)
    keys, bodies = data["keys"], data["bodies"]
    conn = sync.Connection(urls=[a.url], client_name="bench-pipeline-pub")
    # paced (latency) runs hand every message to the socket at once (io_every=1)
    pub = sync.StreamPublisher(conn, batch_size=a.in_flight, **({"io_every": 1} if a.rate else {}))
    pub._channel()  # noqa: SLF001 - open the channel (confirm mode) before the clock starts
    t_warm = None
    if a.warmup and data.get("warmup_body") is not None:
        # one tick of an extra instrument first: the tickhandler opens its bar publishers' channels on its
        # first bars; the measured stream starts after that one-off cost (reported apart)
        t_warm = time.time()
        pub.publish(a.exchange, data["warmup_key"], data["warmup_body"])
        pub.flush()
        time.sleep(a.warmup)
    sends: list[int] = []
    c0 = _cpu()
    t0 = time.time()
    if a.rate:
        start = time.perf_counter()
        rate = a.rate
        for i, (k, b) in enumerate(zip(keys, bodies)):
            d = start + i / rate - time.perf_counter()
            if d > 0:
                time.sleep(d)
            sends.append(time.time_ns())
            pub.publish(a.exchange, k, b)
    else:
        for k, b in zip(keys, bodies):
            pub.publish(a.exchange, k, b)
    t_pub = time.time()
    pub.flush()
    t1 = time.time()
    cpu = _cpu() - c0
    # the sentinel (one message of an instrument not in the stream) goes last, after the flush
    if data.get("sentinel_body") is not None:
        pub.publish(a.exchange, data["sentinel_key"], data["sentinel_body"])
        pub.flush()
    conn.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(sends, f)
    _emit({"sent": len(bodies), "t_warmup": t_warm, "t_start": t0, "t_published": t_pub, "t_end": t1,
           "rate": len(bodies) / (t1 - t0), "cpu_s": cpu, "confirmed": pub.confirmed})


# ----------------------------------------------------------------------------- rtbar monitor
def rtbar_con(a: argparse.Namespace) -> None:
    import msgspec
    import pika

    from qamarket.models import Bar

    dec = msgspec.json.Decoder(Bar)
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(q, a.exchange, "#")
    if a.bar_exchange:
        ch.queue_bind(q, a.bar_exchange, "1min.#")
    sentinel = a.sentinel
    rec: list[tuple[str, str, str, int, int, float, int]] = []
    st: dict[str, Any] = {"t_sentinel": None}

    def on_msg(chan: Any, _method: Any, _props: Any, body: bytes) -> None:
        now = time.time_ns()
        b = dec.decode(body)
        if f"{b.exchange}.{b.symbol}" == sentinel and (b.final or not a.bar_exchange):
            # with --bar-exchange the end is the sentinel's *closed* bar: published after every earlier
            # tick was stored; else its first (realtime) bar
            st["t_sentinel"] = now / 1e9
            chan.stop_consuming()
            return
        if b.final:
            return
        rec.append((b.exchange, b.symbol, b.freq, b.datetime, b.tick_count, b.close, now))

    ch.basic_consume(q, on_msg, auto_ack=True)
    _ready()
    conn.call_later(a.timeout, ch.stop_consuming)
    ch.start_consuming()
    try:
        ch.queue_delete(q)
    except Exception:  # noqa: BLE001 - exclusive + auto-delete anyway
        pass
    conn.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f)
    _emit({"rtbars": len(rec), "t_sentinel": st["t_sentinel"], "sentinel_seen": st["t_sentinel"] is not None})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role")
    p.add_argument("--url", required=True)
    p.add_argument("--exchange", default="")
    p.add_argument("--bar-exchange", default="")
    p.add_argument("--queue", default="")
    p.add_argument("--data", default="")
    p.add_argument("--out", default="")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--ack", choices=("auto", "multi"), default="auto")
    p.add_argument("--prefetch", type=int, default=1000)
    p.add_argument("--in-flight", type=int, default=1000)
    p.add_argument("--sentinel", default="")
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    roles = {"raw_pub": raw_pub, "raw_con": raw_con, "tick_pub": tick_pub, "rtbar_con": rtbar_con}
    try:
        roles[a.role](a)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
