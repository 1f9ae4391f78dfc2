"""The peer: QUANTAXIS QAPUBSUB 1.11, run in its own virtualenv.

Parent side (imported by benchmarks.bench_transport): :func:`ensure_venv` creates
``.qaflow/peer-venv`` if missing and installs the peer the only way that works here
(``pip install --no-deps quantaxis-pubsub==1.11 pika==1.0.0b1 click``, see INFRA.md);
it returns the venv's python, or raises :class:`PeerUnavailable` with the reason.

Worker side (run with the peer venv's python, imports only the stdlib and QAPUBSUB)::

    python benchmarks/peer_qapubsub.py pub|sub --host H --port P --user U --exchange EX ...

The password comes from the environment (``QAPUBSUB_PWD``), never from argv. QAPUBSUB's
defaults are admin/admin@localhost, so the parent always passes the bench's credentials.
Its publisher/subscriber declare their own *fanout, non-durable* exchange; the parent
passes a uuid-named exchange and deletes it afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".qaflow" / "peer-venv"
PEER_PKGS = ["quantaxis-pubsub==1.11", "pika==1.0.0b1", "click"]


class PeerUnavailable(RuntimeError):
    pass


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(timeout: float = 240.0) -> Path:
    py = venv_python()
    check = [str(py), "-c", "import QAPUBSUB.producer, QAPUBSUB.consumer, pika; print(pika.__version__)"]
    if py.exists() and subprocess.run(check, capture_output=True, timeout=60).returncode == 0:
        return py
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                            *PEER_PKGS], capture_output=True, text=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as exc:
        raise PeerUnavailable(f"cannot create {VENV}: {exc}") from None
    if r.returncode != 0:
        raise PeerUnavailable(f"pip install {' '.join(PEER_PKGS)} failed: {(r.stderr or r.stdout)[-800:]}")
    r = subprocess.run(check, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise PeerUnavailable(f"QAPUBSUB installed but does not import: {r.stderr[-800:]}")
    return py


def peer_version(py: Path) -> str:
    r = subprocess.run([str(py), "-m", "pip", "show", "quantaxis-pubsub"], capture_output=True, text=True, timeout=60)
    for line in r.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


# --------------------------------------------------------------------------- worker side
def _body(ts: int) -> bytes:
    # same shape and size (~200 bytes) as benchmarks.bench_transport_worker.BenchTick
    return (b'{"schema":"qa.tick","version":1,"id":"0123456789abcdef00000001","ts":%d,"exchange":"SHFE",'
            b'"symbol":"rb2512","last":3925.0,"bid1":3924.0,"ask1":3926.0,"bid_vol1":120,"ask_vol1":85,'
            b'"volume":1234567,"open_interest":2345678}' % ts)


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _pcts(lat: list[int]) -> dict[str, float]:
    if not lat:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    s = sorted(lat)
    return {"p50_ms": s[int(0.5 * len(s))] / 1e6, "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))] / 1e6,
            "max_ms": s[-1] / 1e6, "n": len(s)}


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["pub", "sub"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5672)
    p.add_argument("--user", default="guest")
    p.add_argument("--vhost", default="/")
    p.add_argument("--exchange", required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--wait-go", action="store_true")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    pwd = os.environ.get("QAPUBSUB_PWD", "guest")
    try:
        if a.role == "pub":
            from QAPUBSUB.producer import publisher

            pub = publisher(host=a.host, port=a.port, user=a.user, password=pwd, exchange=a.exchange, vhost=a.vhost)
            n = 0
            if a.rate:
                t0 = time.perf_counter()
                for i in range(a.count):
                    d = t0 + i / a.rate - time.perf_counter()
                    if d > 0:
                        time.sleep(d)
                    pub.pub(_body(time.time_ns()))
                    n += 1
            else:
                body = _body(time.time_ns())
                t0 = time.perf_counter()
                end = t0 + a.seconds
                while True:
                    for _ in range(100):
                        pub.pub(body)
                    n += 100
                    if time.perf_counter() >= end:
                        break
            elapsed = time.perf_counter() - t0
            pub.exit()
            _emit({"sent": n, "seconds": elapsed, "rate": n / elapsed})
            return 0

        from QAPUBSUB.consumer import subscriber

        sub = subscriber(host=a.host, port=a.port, user=a.user, password=pwd, exchange=a.exchange, vhost=a.vhost)
        state: dict[str, Any] = {"n": 0, "t0": None, "lat": []}

        def callback(chan: Any, method: Any, _props: Any, body: bytes, userdata: Any = None) -> None:
            if state["t0"] is None:
                state["t0"] = time.perf_counter()
            state["n"] += 1
            if a.latency and state["n"] > a.warmup:
                state["lat"].append(time.time_ns() - json.loads(body)["ts"])
            if state["n"] >= a.count:
                state["t1"] = time.perf_counter()
                chan.stop_consuming()

        sub.callback = callback  # QAPUBSUB's own subscribe(): basic_consume(auto_ack=True)
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        if a.wait_go:
            sys.stdin.readline()
        later = getattr(sub.connection, "call_later", None) or sub.connection.add_timeout  # pika 1.0.0b1
        later(a.timeout, sub.channel.stop_consuming)
        sub.subscribe()
        t1 = state.get("t1", time.perf_counter())
        out: dict[str, Any] = {"received": state["n"], "complete": state["n"] >= a.count}
        if state["t0"] is not None and state["n"] > 1:
            out["seconds"] = t1 - state["t0"]
            out["rate"] = (state["n"] - 1) / (t1 - state["t0"])
        if a.latency:
            out.update(_pcts(state["lat"]))
        sub.connection.close()
        _emit(out)
        return 0
    except Exception as exc:  # noqa: BLE001
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
