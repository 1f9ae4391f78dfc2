"""Raw-pika baseline processes for ``benchmarks.bench_orders`` (no QAFlow code on the hot path).

::

    python -m benchmarks.bench_orders_worker relay --url URL --in-queue Q --out-exchange X --out-key K
    python -m benchmarks.bench_orders_worker publish --url URL --exchange X --keys k1,k2 --count N [--gathered]

``relay``: consumes ``Q`` (manual ack, prefetch 50), republishes each body persistent to
``X``/``K`` on a confirm-mode ``BlockingChannel`` (one confirm per message, as the router's
``Publisher`` does), then acks. With ``--mongo-url/--mongo-db`` it first inserts one small
document per message (``insert_one``, ``_id`` = the message id: the write that the router's
plan and the executor's order state make before they publish). Prints ``READY``, runs until
stdin closes, prints a JSON line.

``publish``: publishes ``N`` persistent 400-byte bodies round-robin over the keys with
publisher confirms, one by one (``BlockingChannel.confirm_delivery``) or gathered
(``--gathered``: the async channel under the blocking one, a window of 500 in flight);
prints ``READY``, waits for a line on stdin, publishes, prints ``{"seconds": ..}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import pika


def relay(a: argparse.Namespace) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_qos(prefetch_count=50)
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    n = 0
    coll = None
    if a.mongo_url:
        import pymongo

        coll = pymongo.MongoClient(a.mongo_url, serverSelectionTimeoutMS=5000)[a.mongo_db]["relay"]

    def on_msg(c: object, method: object, p: object, body: bytes) -> None:
        nonlocal n
        if coll is not None:
            coll.insert_one({"_id": f"{getattr(p, 'message_id', None)}-{n}", "body": body})
        ch.basic_publish(a.out_exchange, a.out_key, body, props, mandatory=True)
        ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
        n += 1

    ch.basic_consume(a.in_queue, on_msg)
    stop = threading.Event()

    def watch() -> None:
        sys.stdin.read()
        stop.set()
        conn.add_callback_threadsafe(lambda: None)

    threading.Thread(target=watch, daemon=True).start()
    print("READY", flush=True)
    while not stop.is_set():
        conn.process_data_events(time_limit=0.1)
    conn.close()
    print(json.dumps({"relayed": n}), flush=True)


def publish(a: argparse.Namespace) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    keys = a.keys.split(",")
    body = b'{"schema":"qa.order","pad":"' + b"x" * 360 + b'"}'
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    print("READY", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    if not a.gathered:
        ch.confirm_delivery()
        for i in range(a.count):
            ch.basic_publish(a.exchange, keys[i % len(keys)], body, props, mandatory=True)
    else:
        impl = ch._impl  # noqa: SLF001 - gathered confirms, as qapubsub.sync.StreamPublisher does
        state = {"acked": 0, "ok": False}

        def on_confirm(frame: object) -> None:
            m = frame.method  # type: ignore[attr-defined]
            if m.multiple:
                state["acked"] = m.delivery_tag
            else:
                state["acked"] = max(state["acked"], m.delivery_tag)

        impl.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda _f: state.__setitem__("ok", True))
        while not state["ok"]:
            conn.process_data_events(time_limit=0.01)
        sent = 0
        while sent < a.count:
            while sent < a.count and sent - state["acked"] < 500:
                impl.basic_publish(a.exchange, keys[sent % len(keys)], body, props)
                sent += 1
                if sent % 20 == 0:
                    conn.process_data_events(0)
            conn.process_data_events(time_limit=0.001)
        while state["acked"] < a.count:
            conn.process_data_events(time_limit=0.001)
    dt = time.perf_counter() - t0
    conn.close()
    print(json.dumps({"seconds": dt, "count": a.count}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["relay", "publish"])
    p.add_argument("--url", required=True)
    p.add_argument("--in-queue")
    p.add_argument("--out-exchange")
    p.add_argument("--out-key")
    p.add_argument("--exchange")
    p.add_argument("--keys")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--gathered", action="store_true")
    p.add_argument("--mongo-url")
    p.add_argument("--mongo-db", default="bench_relay")
    a = p.parse_args()
    try:
        relay(a) if a.role == "relay" else publish(a)
    except Exception as exc:  # noqa: BLE001
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        raise


if __name__ == "__main__":
    main()
