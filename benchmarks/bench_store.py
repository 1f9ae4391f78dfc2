"""TickStore (bucketed, compressed msgpack chunks) against one document per tick, in the same run.

``run() -> dict`` (wired into ``make bench``); ``python -m benchmarks.bench_store`` prints it.
Needs ``QA_MONGO_URL`` (the MongoDB-wire server); uses a throw-away database, dropped after.

Figures (ticks/s, wall clock, client and server on the same 2-core machine):
- ``baseline_*``: plain ``insert_many`` of one document per tick (all fields as BSON), and
  reading them back into Tick objects.
- ``store_write_100_per_msg``: a consumer batch = 10 TickBatch messages of 100 ticks of one
  instrument each (one ``write`` per batch).
- ``store_write_1_per_msg_<K>inst``: a consumer batch = 100 messages of one tick each, spread
  over K instruments (K chunks per write), for K = 10 and 100.
- ``pipeline_*``: decode JSON + clean + persist + aggregate (1min+5min), the tickhandler's work
  minus AMQP.
- ``store_read``: ``TickStore.ticks`` of everything written, into Tick objects.
"""
from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any

from qamarket.models import Tick
from qamarket.sessions import ms_of
from qamarket.store import ENVELOPE_FIELDS, TickStore

T0 = ms_of(2025, 3, 3, 9, 0, 0)
SYMBOLS = ["rb2512", "hc2512", "cu2512", "al2512", "zn2512", "ni2512", "au2512", "ag2512", "ru2512", "fu2512"]


def make_feed(n: int, n_inst: int, seed: int = 1) -> list[Tick]:
    """``n`` ticks round-robin over ``n_inst`` SHFE instruments, 500 ms apart per instrument."""
    rnd = random.Random(seed)
    syms = [SYMBOLS[i % len(SYMBOLS)][:2] + str(2501 + i // len(SYMBOLS)) for i in range(n_inst)]
    vol = [0.0] * n_inst
    price = [3500.0] * n_inst
    out = []
    for i in range(n):
        k = i % n_inst
        vol[k] += rnd.randint(0, 5)
        price[k] += rnd.choice((-1.0, 0.0, 0.0, 1.0))
        p = price[k]
        out.append(Tick(
            symbol=syms[k], exchange="SHFE", datetime=T0 + 500 * (i // n_inst), last_price=p, trading_day="20250303",
            volume=vol[k], turnover=vol[k] * p * 10, open_interest=200000.0 + (i // 7), last_volume=1.0,
            open_price=3490.0, high_price=3600.0, low_price=3400.0, pre_close=3495.0, pre_settlement=3496.0,
            limit_up=3800.0, limit_down=3200.0,
            bid_price_1=p - 1, bid_price_2=p - 2, bid_price_3=p - 3, bid_price_4=p - 4, bid_price_5=p - 5,
            bid_volume_1=float(rnd.randint(1, 500)), bid_volume_2=float(rnd.randint(1, 500)),
            bid_volume_3=float(rnd.randint(1, 500)), bid_volume_4=float(rnd.randint(1, 500)),
            bid_volume_5=float(rnd.randint(1, 500)),
            ask_price_1=p + 1, ask_price_2=p + 2, ask_price_3=p + 3, ask_price_4=p + 4, ask_price_5=p + 5,
            ask_volume_1=float(rnd.randint(1, 500)), ask_volume_2=float(rnd.randint(1, 500)),
            ask_volume_3=float(rnd.randint(1, 500)), ask_volume_4=float(rnd.randint(1, 500)),
            ask_volume_5=float(rnd.randint(1, 500)), source="ctp", seq=i + 1,
        ))
    return out


def _doc(t: Tick) -> dict[str, Any]:
    return {f: getattr(t, f) for f in Tick.__struct_fields__ if f not in ENVELOPE_FIELDS}


def _rate(n: int, fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    r = fn()
    return n / (time.perf_counter() - t), r


def _batches(ticks: list[Tick], size: int) -> list[list[Tick]]:
    return [ticks[i:i + size] for i in range(0, len(ticks), size)]


def _by_message(ticks: list[Tick], per_msg: int) -> list[list[Tick]]:
    """Group a round-robin feed into per-instrument messages of ``per_msg`` ticks (TickBatch-like)."""
    per: dict[str, list[Tick]] = {}
    for t in ticks:
        per.setdefault(t.symbol, []).append(t)
    msgs = [lst[i:i + per_msg] for lst in per.values() for i in range(0, len(lst), per_msg)]
    msgs.sort(key=lambda m: m[0].datetime)
    return msgs


def _pipeline(db: Any, ticks: list[Tick], per_msg: int, msgs_per_batch: int) -> float | str:
    """decode JSON + clean + persist + aggregate, per consumer batch, as the tickhandler does."""
    try:
        import msgspec

        from qamarket.aggregation import Aggregator
        from qamarket.cleaning import TickCleaner
        from qamarket.models import TickBatch, spec_for
    except ImportError as exc:  # a sibling module not there yet
        return f"n/a ({exc})"
    if per_msg == 1:
        bodies = [msgspec.json.encode(t) for t in ticks]
        dec: Any = msgspec.json.Decoder(Tick)
    else:
        bodies = [msgspec.json.encode(TickBatch(symbol=m[0].symbol, exchange=m[0].exchange, ticks=m))
                  for m in _by_message(ticks, per_msg)]
        dec = msgspec.json.Decoder(TickBatch)
    store = TickStore(db, "pipe_%d" % per_msg)
    store.load_watermarks()
    agg = Aggregator(freqs=("1min", "5min"), realtime=())
    cleaners: dict[str, Any] = {}

    def go() -> None:
        for i in range(0, len(bodies), msgs_per_batch):
            batch: list[Tick] = []
            for b in bodies[i:i + msgs_per_batch]:
                m = dec.decode(b)
                batch.extend([m] if per_msg == 1 else m.ticks)
            kept = []
            for t in batch:
                c = cleaners.get(t.symbol)
                if c is None:
                    c = cleaners[t.symbol] = TickCleaner(spec_for(t.symbol, t.exchange))
                r = c.clean(t, t.datetime)
                if not isinstance(r, str):
                    kept.append(r)
            for t in store.write(kept).new:
                agg.on_tick(t)
        agg.flush()

    try:
        rate, _ = _rate(len(ticks), go)
    except Exception as exc:  # noqa: BLE001 - report, do not break the bench run
        return f"n/a ({type(exc).__name__}: {exc})"
    return round(rate)


def run(n: int | None = None) -> dict[str, Any]:
    import pymongo

    n = n or int(os.environ.get("QA_BENCH_STORE_TICKS", "20000"))
    url = os.environ.get("QA_TEST_MONGO_URL") or os.environ.get("QA_MONGO_URL") or "mongodb://127.0.0.1:27017/"
    client = pymongo.MongoClient(url)
    db = client[f"bench_store_{uuid.uuid4().hex[:8]}"]
    bdb = client[f"bench_store_base_{uuid.uuid4().hex[:8]}"]  # own database: nx-27017 has one SQLite file per database
    out: dict[str, Any] = {"ticks": n}
    try:
        feed10 = make_feed(n, 10)
        # -- baseline: one document per tick
        docs = [_doc(t) for t in feed10]
        base = bdb.baseline
        base.create_index([("exchange", 1), ("symbol", 1), ("datetime", 1)])
        out["baseline_write_per_tick_doc"], _ = _rate(n, lambda: [base.insert_many(b, ordered=False)
                                                                 for b in _batches(docs, 1000)])
        out["baseline_read_per_tick_doc"], _ = _rate(n, lambda: [
            Tick(**{k: v for k, v in d.items() if k != "_id"}) for d in base.find({"exchange": "SHFE"})])
        # -- ours, 100 ticks per message, 10 messages per consumer batch
        store = TickStore(db, "ticks100")
        msgs = _by_message(feed10, 100)
        out["store_write_100_per_msg"], _ = _rate(n, lambda: [store.write([t for m in msgs[i:i + 10] for t in m])
                                                             for i in range(0, len(msgs), 10)])
        out["store_docs_100_per_msg"] = store.coll.estimated_document_count()
        out["store_replay_100_per_msg"], _ = _rate(n, lambda: [store.write(m) for m in msgs])
        # -- ours, one tick per message, 100 messages per consumer batch
        for k in (10, 100):
            feed = feed10 if k == 10 else make_feed(n, k, seed=2)
            s = TickStore(db, f"ticks1_{k}")
            out[f"store_write_1_per_msg_{k}inst"], _ = _rate(n, lambda: [s.write(b) for b in _batches(feed, 100)])
            if k == 100:  # many instruments: a bigger consumer batch keeps chunks fat
                s = TickStore(db, "ticks1_100_b1000")
                out["store_write_1_per_msg_100inst_batch1000"], _ = _rate(
                    n, lambda: [s.write(b) for b in _batches(feed, 1000)])
        # -- reads
        syms = sorted({t.symbol for t in feed10})
        r, got = _rate(n, lambda: [store.ticks("SHFE", sym) for sym in syms])
        assert sum(map(len, got)) == n, "read back a different number of ticks"
        out["store_read"] = r
        out["store_last_tick_per_s"], _ = _rate(10, lambda: [store.last_tick("SHFE", syms[0]) for _ in range(10)])
        # -- the tickhandler's work minus AMQP
        out["pipeline_100_per_msg"] = _pipeline(db, feed10, 100, 10)
        out["pipeline_1_per_msg"] = _pipeline(db, feed10, 1, 100)
    finally:
        client.drop_database(db.name)
        client.drop_database(bdb.name)
        client.close()
    for k, v in list(out.items()):
        if isinstance(v, float):
            out[k] = round(v)
    bw, br = out["baseline_write_per_tick_doc"], out["baseline_read_per_tick_doc"]
    out["ratio_write_100_per_msg"] = round(out["store_write_100_per_msg"] / bw, 1)
    out["ratio_write_1_per_msg_10inst"] = round(out["store_write_1_per_msg_10inst"] / bw, 1)
    out["ratio_write_1_per_msg_100inst"] = round(out["store_write_1_per_msg_100inst"] / bw, 1)
    out["ratio_read"] = round(out["store_read"] / br, 1)
    out["unit"] = "ticks/s unless named otherwise"
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
