"""One side of a transport benchmark, run in its own process by benchmarks.bench_transport.

    python -m benchmarks.bench_transport_worker ROLE --url URL --exchange EX --key KEY --queue Q ...

Roles: ``pub_raw`` / ``pub_aio`` / ``pub_sync`` (publish for --seconds, or --count paced at
--rate with a timestamp in each body), ``con_raw`` / ``con_aio`` / ``con_sync`` (drain
--count messages, or measure latency with --latency). A consumer prints ``READY`` once it
consumes; every worker prints its result as one JSON line last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from qapubsub.messages import Message, encode


class BenchTick(Message, tag="qa.tick"):
    """An 18-field-ish tick, ~200 bytes of JSON."""

    exchange: str = "SHFE"
    symbol: str = "rb2512"
    last: float = 3925.0
    bid1: float = 3924.0
    ask1: float = 3926.0
    bid_vol1: int = 120
    ask_vol1: int = 85
    volume: int = 1234567
    open_interest: int = 2345678


def tick_body(ts: int | None = None) -> bytes:
    return encode(BenchTick(ts=ts if ts is not None else time.time_ns()))


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def _percentiles(lat_ns: list[int]) -> dict[str, float]:
    if not lat_ns:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "n": 0}
    s = sorted(lat_ns)
    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))] / 1e6
    return {"p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": s[-1] / 1e6, "n": len(s)}


class Pacer:
    """Sends message i at t0 + i/rate; sleeps only when ahead (sleep granularity ~0.1 ms)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.perf_counter()

    def delay(self, i: int) -> float:
        return self.t0 + i / self.rate - time.perf_counter()


# ----------------------------------------------------------------------------- raw pika
def pub_raw(a: argparse.Namespace) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=1)
    n = 0
    if a.rate:
        pacer = Pacer(a.rate)
        for i in range(a.count):
            d = pacer.delay(i)
            if d > 0:
                time.sleep(d)
            ch.basic_publish(a.exchange, a.key, tick_body(), props)
            n += 1
        elapsed = time.perf_counter() - pacer.t0
    else:
        body = tick_body()
        t0 = time.perf_counter()
        end = t0 + a.seconds
        while n < (a.count or 1 << 62):
            for _ in range(100):
                ch.basic_publish(a.exchange, a.key, body, props)
            n += 100
            if time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - t0
    conn.close()
    _emit({"sent": n, "seconds": elapsed, "rate": n / elapsed, "body_bytes": len(tick_body())})


def con_raw(a: argparse.Namespace) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    state: dict[str, Any] = {"n": 0, "t0": None, "lat": []}
    skip = a.warmup

    def on_msg(chan: Any, method: Any, props: Any, body: bytes) -> None:
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        state["n"] += 1
        if a.latency:
            now = time.time_ns()
            if state["n"] > skip:
                state["lat"].append(now - json.loads(body)["ts"])
        if state["n"] >= a.count:
            state["t1"] = time.perf_counter()
            chan.stop_consuming()

    ch.basic_consume(a.queue, on_msg, auto_ack=True)
    _ready()
    conn.call_later(a.timeout, ch.stop_consuming)
    ch.start_consuming()
    t1 = state.get("t1", time.perf_counter())
    conn.close()
    _finish_consumer(a, state["n"], state["t0"], t1, state["lat"])


def _finish_consumer(a: argparse.Namespace, n: int, t0: float | None, t1: float, lat: list[int]) -> None:
    out: dict[str, Any] = {"received": n, "complete": n >= a.count}
    if t0 is not None and n > 1:
        out["seconds"] = t1 - t0
        out["rate"] = (n - 1) / (t1 - t0) if t1 > t0 else float("nan")
    if a.latency:
        out.update(_percentiles(lat))
    _emit(out)


# ----------------------------------------------------------------------------- qapubsub.aio
async def _pub_aio(a: argparse.Namespace) -> None:
    from qapubsub.aio import Connection, MarketDataPublisher

    conn = await Connection([a.url], name="bench-pub-aio").start()
    pub = await MarketDataPublisher(conn, a.exchange, max_in_flight=a.in_flight).start()
    n = 0
    if a.rate:
        pacer = Pacer(a.rate)
        i = 0
        while i < a.count:
            d = pacer.delay(i)
            if d > 0:
                await asyncio.sleep(d)
            await pub.publish(a.key, BenchTick())
            i += 1
        await pub.flush()
        n = i
        elapsed = time.perf_counter() - pacer.t0
    else:
        tick = BenchTick()
        t0 = time.perf_counter()
        end = t0 + a.seconds
        while True:
            for _ in range(100):
                await pub.publish(a.key, tick)
            n += 100
            if time.perf_counter() >= end:
                break
        await pub.flush()  # every message confirmed is part of the figure
        elapsed = time.perf_counter() - t0
    await conn.close()
    _emit({"sent": n, "seconds": elapsed, "rate": n / elapsed, "confirmed": pub.published})


async def _con_aio(a: argparse.Namespace) -> None:
    from qapubsub.aio import Connection, Consumer, Delivery
    from qapubsub.topology import Queue

    conn = await Connection([a.url], name="bench-con-aio").start()
    state: dict[str, Any] = {"n": 0, "t0": None, "lat": []}
    done = asyncio.Event()
    skip = a.warmup

    async def handler(tick: BenchTick, d: Delivery) -> None:
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        state["n"] += 1
        if a.latency and state["n"] > skip:
            state["lat"].append(time.time_ns() - tick.ts)
        if state["n"] >= a.count:
            state["t1"] = time.perf_counter()
            done.set()

    q = Queue(a.queue, durable=False)  # already declared by the parent; same arguments
    consumer = await Consumer(conn, q, handler, type_=BenchTick, prefetch=a.prefetch, ack_every=a.ack_every).start()
    _ready()
    try:
        await asyncio.wait_for(done.wait(), a.timeout)
    except asyncio.TimeoutError:
        pass
    t1 = state.get("t1", time.perf_counter())
    await conn.close()
    out_n = state["n"]
    _finish_consumer(a, out_n, state["t0"], t1, state["lat"])
    del consumer


# ----------------------------------------------------------------------------- qapubsub.sync
# qapubsub.sync is written by another engineer; these drive its StreamPublisher and Consumer.
def pub_sync(a: argparse.Namespace) -> None:
    from qapubsub import sync

    conn = sync.Connection(urls=[a.url], client_name="bench-pub-sync")
    # paced (latency) runs hand every message to the socket at once (io_every=1); throughput
    # runs keep the publisher's default I/O batching
    pub = sync.StreamPublisher(conn, batch_size=a.in_flight, **({"io_every": 1} if a.rate else {}))
    n = 0
    if a.rate:
        pacer = Pacer(a.rate)
        for i in range(a.count):
            d = pacer.delay(i)
            if d > 0:
                time.sleep(d)
            pub.publish(a.exchange, a.key, BenchTick())
            n += 1
        pub.flush()
        elapsed = time.perf_counter() - pacer.t0
    else:
        tick = BenchTick()
        t0 = time.perf_counter()
        end = t0 + a.seconds
        while True:
            for _ in range(100):
                pub.publish(a.exchange, a.key, tick)
            n += 100
            if time.perf_counter() >= end:
                break
        pub.flush()
        elapsed = time.perf_counter() - t0
    conn.close()
    _emit({"sent": n, "seconds": elapsed, "rate": n / elapsed, "confirmed": getattr(pub, "confirmed", None)})


def con_sync(a: argparse.Namespace) -> None:
    import threading

    from qapubsub import sync
    from qapubsub.topology import Queue

    conn = sync.Connection(urls=[a.url], client_name="bench-con-sync")
    state: dict[str, Any] = {"n": 0, "t0": None, "lat": []}
    skip = a.warmup
    holder: dict[str, Any] = {}

    def handler(tick: BenchTick, d: Any) -> None:
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        state["n"] += 1
        if a.latency and state["n"] > skip:
            state["lat"].append(time.time_ns() - tick.ts)
        if state["n"] >= a.count:
            state["t1"] = time.perf_counter()
            holder["c"].stop()

    c = sync.Consumer(conn, Queue(a.queue, durable=False), handler, message_type=BenchTick, prefetch=a.prefetch,
                      ack_every=a.ack_every)
    holder["c"] = c

    def announce() -> None:
        if c.ready.wait(20):
            _ready()

    threading.Thread(target=announce, daemon=True).start()
    timer = threading.Timer(a.timeout, c.stop)
    timer.daemon = True
    timer.start()
    c.run()
    timer.cancel()
    t1 = state.get("t1", time.perf_counter())
    conn.close()
    _finish_consumer(a, state["n"], state["t0"], t1, state["lat"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role")
    p.add_argument("--url", required=True)
    p.add_argument("--exchange", default="")
    p.add_argument("--key", default="")
    p.add_argument("--queue", default="")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--prefetch", type=int, default=4000)
    p.add_argument("--ack-every", type=int, default=500)
    p.add_argument("--in-flight", type=int, default=500)
    a = p.parse_args(argv)
    try:
        if a.role == "pub_raw":
            pub_raw(a)
        elif a.role == "con_raw":
            con_raw(a)
        elif a.role == "pub_aio":
            asyncio.run(_pub_aio(a))
        elif a.role == "con_aio":
            asyncio.run(_con_aio(a))
        elif a.role == "pub_sync":
            pub_sync(a)
        elif a.role == "con_sync":
            con_sync(a)
        else:
            raise SystemExit(f"unknown role {a.role}")
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

