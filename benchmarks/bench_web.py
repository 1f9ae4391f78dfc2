"""Web daemon: 100 WebSocket clients x 50 instruments at 2,000 ticks/s, diffs vs full quotes.

    python -m benchmarks.bench_web [seconds_per_phase]     # live, default 10 s per phase
    python -m benchmarks.bench_web --intrinsic             # bytes only, no I/O, 3 s

Live: the daemon (``python -m handlers.web``) runs as a real subprocess in its own namespace;
a publisher process sends ticks with pika (2,000/s over 200 instruments, price moving on 60 %,
volume / amount / time / level-1 volumes on every tick, high / low only on a new extreme) and
``QA_BENCH_WEB_CLIENTS`` (100) tornado WebSocket clients in ``QA_BENCH_WEB_PROCS`` (2) processes
each subscribe to 50 of the 200 instruments. Phases (``QA_BENCH_WEB_PHASES``): ``diff``,
``full`` (``"mode": "full"``: each changed instrument sent whole, the baseline), then both with
permessage-deflate. Figures: delivered-update latency p50/p99 (tick publish -> client receipt
of the batch holding it, on the *oldest* tick of every batch, so batching delay is included),
bytes per client per second as written by the server to the sockets (``/metrics``) and as read
by the clients, their ratio (goal >= 5x), server CPU, clients dropped.

Intrinsic: the same code and feed for one client without sockets (see :func:`intrinsic`): what
the server must write when nothing saturates -- the reference for the ratio.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_CLIENTS = int(os.environ.get("QA_BENCH_WEB_CLIENTS", "100"))
N_INSTRUMENTS = 200
PER_CLIENT = 50
RATE = 2000
CLIENT_PROCS = int(os.environ.get("QA_BENCH_WEB_PROCS", "2"))     # client processes (one Python process cannot read 100 sockets at this rate)
DEPTH = int(os.environ.get("QA_BENCH_WEB_DEPTH", "1"))
# (mode, permessage-deflate) phases, in this order, against one daemon
PHASES = [(m, d) for d in (False, True) for m in ("diff", "full")]
if os.environ.get("QA_BENCH_WEB_PHASES"):      # e.g. "diff,full,diff+deflate"
    PHASES = [(p.split("+")[0], p.endswith("+deflate")) for p in os.environ["QA_BENCH_WEB_PHASES"].split(",")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class Feed:
    """A plausible tick stream: random-walk prices, cumulative volume, moving book."""

    def __init__(self, symbols: list[str]) -> None:
        self.rng = random.Random(7)
        self.state = {s: {"p": 3000.0 + 10 * i, "v": 0.0, "oi": 10000.0, "n": 0} for i, s in enumerate(symbols)}
        for st in self.state.values():
            st["hi"] = st["lo"] = st["p"]

    def tick(self, sym: str) -> Any:
        from qamarket.models import Tick

        st, r = self.state[sym], self.rng
        st["n"] += 1
        if r.random() < 0.6:
            st["p"] += r.choice((-1.0, 1.0))
        st["v"] += r.randint(1, 20)
        if r.random() < 0.3:
            st["oi"] += r.randint(-5, 5)
        p = st["p"]
        # the day's high / low move only on a new extreme (the old feed moved them with every price
        # change, +-20 around it: 2 fields ~60 % of ticks that no real feed sends)
        st["hi"], st["lo"] = max(st["hi"], p), min(st["lo"], p)
        if DEPTH == 1:   # CTP level 1: levels 2-5 stay empty (the common futures feed)
            lv = {"bid_price_1": p - 1, "ask_price_1": p + 1, "bid_volume_1": float(r.randint(1, 50)),
                  "ask_volume_1": float(r.randint(1, 50))}
        else:            # 5 levels, all moving with the price (SHFE/INE L2): the worst case for diffs
            lv = {f"bid_price_{i}": p - i for i in range(1, 6)} | {f"ask_price_{i}": p + i for i in range(1, 6)}
            lv |= {f"bid_volume_{i}": float(r.randint(1, 50)) if (i == 1 or r.random() < 0.3) else 10.0
                   for i in range(1, 6)}
            lv |= {f"ask_volume_{i}": float(r.randint(1, 50)) if (i == 1 or r.random() < 0.3) else 10.0
                   for i in range(1, 6)}
        return Tick(symbol=sym, exchange="SHFE", datetime=1740992400000 + 500 * st["n"], last_price=p,
                    volume=st["v"], turnover=st["v"] * p * 10, open_interest=st["oi"], high_price=st["hi"],
                    low_price=st["lo"], open_price=3000.0, pre_close=3000.0, pre_settlement=3000.0, limit_up=3300.0,
                    limit_down=2700.0, trading_day="20250303", **lv)


def _publisher(url: str, exchange: str, symbols: list[str], stop: threading.Event, counter: list[int]) -> None:
    import pika

    from qapubsub import keys
    from qapubsub.messages import encode

    feed = Feed(symbols)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    i = 0
    t0 = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - t0) * RATE)
        while i < due:
            sym = symbols[i % len(symbols)]
            ch.basic_publish(exchange, keys.tick_key("SHFE", sym), encode(feed.tick(sym)))
            i += 1
        counter[0] = i
        conn.sleep(0.005)
    conn.close()


def intrinsic(seconds: float = 10.0, depth: int | None = None) -> dict[str, Any]:
    """Bytes per client per second at the offered load, with no client or CPU in the way: the
    daemon's own code (QuoteBook, ClientState batching at 100 ms, rtn_data, the msgspec encoder)
    fed the benchmark's ticks for one client's 50 instruments, and each message deflated the way
    tornado's permessage-deflate does it (zlib level 6, 32 KiB window kept across messages,
    Z_SYNC_FLUSH minus its 4-byte tail). ``per_tick_full``: a naive server that sends each tick's
    full quote at once (no batching, no coalescing)."""
    import zlib

    from handlers.web import _json
    from handlers.webdiff import ClientState, QuoteBook, quote_of, rtn_data

    global DEPTH
    saved, DEPTH = DEPTH, depth or DEPTH
    try:
        symbols = [f"bn{i:03d}" for i in range(N_INSTRUMENTS)]
        mine = {f"SHFE.{s}" for s in random.Random(1).sample(symbols, PER_CLIENT)}
        feed, book = Feed(symbols), QuoteBook()
        n_ticks = int(seconds * RATE)
        dt = 1.0 / RATE
        modes = {m: {"st": ClientState(), "raw": 0, "wire": 0, "msgs": 0,
                     "z": zlib.compressobj(6, zlib.DEFLATED, -15, 8)} for m in ("diff", "full", "per_tick_full")}

        def send(m: dict[str, Any], msg: dict[str, Any]) -> None:
            data = _json.encode(msg)
            m["raw"] += len(data)
            m["wire"] += len(m["z"].compress(data) + m["z"].flush(zlib.Z_SYNC_FLUSH)) - 4
            m["msgs"] += 1

        for i in range(n_ticks):
            now = i * dt
            sym = symbols[i % len(symbols)]
            key = f"SHFE.{sym}"
            t = feed.tick(sym)
            changed = book.update(key, quote_of(t))
            if key in mine and changed and i >= len(symbols):     # the first round is the snapshot
                origin = 1741234567890123456 + i
                modes["diff"]["st"].add({"quotes": {key: changed}}, now, changes=len(changed), origin_ns=origin)
                modes["full"]["st"].add({"quotes": {key: dict(book.quotes[key])}}, now, changes=len(changed),
                                        origin_ns=origin)
                send(modes["per_tick_full"], rtn_data({"quotes": {key: dict(book.quotes[key])}}, origin))
            for name in ("diff", "full"):
                st = modes[name]["st"]
                got = st.take(now)
                if got is not None:
                    send(modes[name], rtn_data(*got))
                    st.written()
        span = n_ticks * dt
        out = {name: {"bytes_per_client_s": m["raw"] / span, "deflated_bytes_per_client_s": m["wire"] / span,
                      "msgs_per_client_s": m["msgs"] / span} for name, m in modes.items()}
        d, f, naive = out["diff"], out["full"], out["per_tick_full"]
        out["ratio_plain"] = f["bytes_per_client_s"] / d["bytes_per_client_s"]
        out["ratio_deflate"] = f["deflated_bytes_per_client_s"] / d["deflated_bytes_per_client_s"]
        out["ratio_per_tick_full_vs_diff_plain"] = naive["bytes_per_client_s"] / d["bytes_per_client_s"]
        out["ratio_full_plain_vs_diff_deflate"] = f["bytes_per_client_s"] / d["deflated_bytes_per_client_s"]
        return out
    finally:
        DEPTH = saved


async def _run_mode(port: int, subs: list[list[str]], mode: str, deflate: bool, seconds: float,
                    ready: Any = None) -> dict[str, Any]:
    from tornado.websocket import websocket_connect

    lat: list[float] = []
    nbytes = [0] * len(subs)
    msgs = [0] * len(subs)
    closed: list[str] = []
    measuring = [False]
    conns = []
    for ins in subs:
        ws = await websocket_connect(f"ws://127.0.0.1:{port}/ws", max_message_size=16 << 20,
                                     compression_options={} if deflate else None)
        await ws.write_message(json.dumps({"aid": "subscribe_quote", "ins_list": ",".join(ins), "mode": mode}))
        conns.append(ws)

    async def reader(k: int, ws: Any) -> None:
        while True:
            raw = await ws.read_message()
            if raw is None:
                closed.append(f"{ws.close_code} {ws.close_reason}")
                return
            if not measuring[0]:
                continue
            now = time.time_ns()
            nbytes[k] += len(raw)
            msgs[k] += 1
            if raw.startswith('{"aid":"rtn_data"'):
                o = raw.rfind('"origin_ns":')
                if o > 0:
                    lat.append((now - int(raw[o + 12:raw.index("}", o)])) / 1e6)

    tasks = [asyncio.create_task(reader(k, ws)) for k, ws in enumerate(conns)]
    await asyncio.sleep(3.0)            # warm-up: snapshots, bindings
    measuring[0] = True
    if ready is not None:
        ready.put("measuring")
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    measuring[0] = False
    dt = time.monotonic() - t0
    for ws in conns:
        ws.close()
    await asyncio.sleep(0.5)
    for t in tasks:
        t.cancel()
    total = sum(nbytes)
    return {"bytes_per_client_s": total / len(subs) / dt, "msgs_per_client_s": sum(msgs) / len(subs) / dt,
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "max_ms": max(lat) if lat else float("nan"),
            "batches": len(lat), "closed_by_server": len([c for c in closed if not c.startswith("None")]),
            "seconds": dt}


def _client_proc(port: int, subs: list[list[str]], mode: str, deflate: bool, seconds: float, q: Any,
                 ready: Any) -> None:
    q.put(asyncio.run(_run_mode(port, subs, mode, deflate, seconds, ready)))


def _publisher_proc(url: str, exchange: str, symbols: list[str], stop: Any, counter: Any) -> None:
    box = [0]
    ev = threading.Event()

    def watch() -> None:
        stop.wait()
        ev.set()

    threading.Thread(target=watch, daemon=True).start()
    t = threading.Thread(target=_publisher, args=(url, exchange, symbols, ev, box), daemon=True)
    t.start()
    while t.is_alive():
        counter.value = box[0]
        t.join(0.2)
    counter.value = box[0]


def _server_counters(port: int) -> dict[tuple[str, ...], float]:
    """``qaflow_web_ws_bytes_sent_total`` / ``_ws_wire_bytes_sent_total`` by labels, from /metrics."""
    import re

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, ...], float] = {}
    for m in re.finditer(r'^(qaflow_web_ws_(?:wire_)?bytes_sent_total)\{([^}]*)\} (\S+)$', text, re.M):
        labels = tuple(sorted(m.group(2).split(",")))
        out[(m.group(1), *labels)] = float(m.group(3))
    return out


def _run_split(port: int, subs: list[list[str]], mode: str, deflate: bool, seconds: float) -> dict[str, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q, ready = ctx.Queue(), ctx.Queue()
    chunks = [subs[i::CLIENT_PROCS] for i in range(CLIENT_PROCS)]
    procs = [ctx.Process(target=_client_proc, args=(port, c, mode, deflate, seconds, q, ready)) for c in chunks]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    c0, t0 = _server_counters(port), time.monotonic()
    time.sleep(max(1.0, seconds - 0.5))
    c1, t1 = _server_counters(port), time.monotonic()
    outs = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    n = [len(c) for c in chunks]
    tot = sum(n)
    label = (f'mode="{mode}"',)
    wire = ("qaflow_web_ws_wire_bytes_sent_total", f'deflate="{int(deflate)}"', f'mode="{mode}"')
    srv_json = c1.get(("qaflow_web_ws_bytes_sent_total", *label), 0) - c0.get(("qaflow_web_ws_bytes_sent_total", *label), 0)
    srv_wire = c1.get(wire, 0) - c0.get(wire, 0)
    return {"bytes_per_client_s": sum(o["bytes_per_client_s"] * k for o, k in zip(outs, n)) / tot,
            "server_json_bytes_per_client_s": srv_json / tot / (t1 - t0),
            "server_wire_bytes_per_client_s": srv_wire / tot / (t1 - t0),
            "msgs_per_client_s": sum(o["msgs_per_client_s"] * k for o, k in zip(outs, n)) / tot,
            "p50_ms": max(o["p50_ms"] for o in outs), "p99_ms": max(o["p99_ms"] for o in outs),
            "max_ms": max(o["max_ms"] for o in outs), "batches": sum(o["batches"] for o in outs),
            "closed_by_server": sum(o["closed_by_server"] for o in outs), "seconds": outs[0]["seconds"]}


def run(seconds: float = 25.0) -> dict[str, Any]:
    from qapubsub.topology import Topology
    from tests import daemons

    url = (os.environ.get("QA_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F").split(",")[0]
    ns = f"bench-web-{uuid.uuid4().hex[:6]}."
    topo = Topology(ns)
    symbols = [f"bn{i:03d}" for i in range(N_INSTRUMENTS)]
    rng = random.Random(1)
    subs = [[f"SHFE.{s}" for s in rng.sample(symbols, PER_CLIENT)] for _ in range(N_CLIENTS)]
    port = _free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_web_{port}.log"
    env = {"QA_NAMESPACE": ns, "QA_AMQP_URL": url, "QA_WEB_TOKENS": "", "QA_WEB_TOKEN": "", "QA_LOG_LEVEL": "WARNING"}
    proc = daemons.start("handlers.web", "--port", str(port), env=env, log=log)
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    stop = ctx.Event()
    published = ctx.Value("q", 0)
    results: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"web daemon did not start: {log.read_text()[-1500:]}") from None
                time.sleep(0.2)
        pub = ctx.Process(target=_publisher_proc, args=(url, topo.tick, symbols, stop, published), daemon=True)
        pub.start()
        for mode, deflate in PHASES:
            cpu0, p0, t0 = _cpu_seconds(proc.pid), published.value, time.monotonic()
            r = results[f"{mode}{'+deflate' if deflate else ''}"] = _run_split(port, subs, mode, deflate, seconds)
            dt = time.monotonic() - t0
            r["server_cpu_pct"] = 100 * (_cpu_seconds(proc.pid) - cpu0) / dt
            r["ticks_per_s"] = (published.value - p0) / dt
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        dropped = next((float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("qaflow_web_dropped_clients_total")), 0.0)
    finally:
        stop.set()
        daemons.stop(proc)
        try:
            import pika

            c = pika.BlockingConnection(pika.URLParameters(url))
            ch = c.channel()
            for ex in topo.exchanges:
                ch.exchange_delete(ex.name)
            c.close()
        except Exception:  # noqa: BLE001
            pass
        log.unlink(missing_ok=True)  # read above if the daemon failed to start; nothing left in /tmp
    ref = intrinsic()
    live: dict[str, Any] = {}
    for plain, defl, key in (("diff", "diff+deflate", "diff"), ("full", "full+deflate", "full")):
        if plain in results:
            live[key] = results[plain]["server_wire_bytes_per_client_s"]
        if defl in results:
            live[key + "+deflate"] = results[defl]["server_wire_bytes_per_client_s"]

    def ratio(a: str, b: str) -> float:
        return round(live[a] / live[b], 2) if live.get(a) and live.get(b) else float("nan")

    d = results.get("diff", {})
    figures = [
        {"name": "web_update_latency_p99_ms", "value": round(d.get("p99_ms", float("nan")), 1), "unit": "ms",
         "note": "diff mode, oldest tick of each batch, publish -> client; batching (<=100 ms) included"},
        {"name": "web_update_latency_p50_ms", "value": round(d.get("p50_ms", float("nan")), 1), "unit": "ms"},
        {"name": "web_bytes_per_client_s_diff", "value": round(live.get("diff", float("nan"))), "unit": "B/s",
         "note": "written by the server per client (socket bytes)"},
        {"name": "web_bytes_per_client_s_full", "value": round(live.get("full", float("nan"))), "unit": "B/s",
         "baseline": True},
        {"name": "web_diff_vs_full_bytes_ratio", "value": ratio("full", "diff"), "unit": "x", "goal": ">= 5",
         "note": "live, no compression in either mode"},
        {"name": "web_diff_vs_full_bytes_ratio_deflate", "value": ratio("full+deflate", "diff+deflate"), "unit": "x",
         "note": "live, permessage-deflate in both modes"},
        {"name": "web_diff_vs_full_bytes_ratio_intrinsic", "value": round(ref["ratio_plain"], 2), "unit": "x",
         "note": "same code and feed without clients or CPU in the way (unsaturated reference)"},
        {"name": "web_diff_vs_full_bytes_ratio_intrinsic_deflate", "value": round(ref["ratio_deflate"], 2), "unit": "x"},
        {"name": "web_full_latency_p99_ms", "value": round(results.get("full", {}).get("p99_ms", float("nan")), 1),
         "unit": "ms"},
        {"name": "web_server_cpu_pct_diff", "value": round(d.get("server_cpu_pct", float("nan"))), "unit": "%"},
        {"name": "web_dropped_clients", "value": dropped, "unit": "clients"},
    ]
    return {"figures": figures, "detail": results, "intrinsic": ref, "load_average": os.getloadavg(),
            "setup": {"depth": DEPTH, "client_procs": CLIENT_PROCS, "clients": N_CLIENTS, "instruments": N_INSTRUMENTS,
                      "per_client": PER_CLIENT, "rate": RATE, "phases": PHASES}}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--intrinsic":
        print(json.dumps({"depth1": intrinsic(), "depth5": intrinsic(depth=5)}, indent=2))
        raise SystemExit(0)
    out = run(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
    print(json.dumps(out, indent=2))
