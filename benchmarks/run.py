"""Run every benchmark module and write one JSON file (``make bench``).

    python -m benchmarks.run --out benchmarks/results/latest.json [--only transport]

To add a benchmark, append ``(name, module, function)`` to :data:`BENCHMARKS`; the function
takes no argument and returns a dict with a ``figures`` list (each: name, value, unit,
baseline, ratio, ...). A module that is missing is reported as skipped; one that raises is
reported with its error, and the others still run.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCHMARKS: list[tuple[str, str, str]] = [
    ("transport", "benchmarks.bench_transport", "run"),
    ("aggregation", "benchmarks.bench_aggregation", "run"),
    ("store", "benchmarks.bench_store", "run"),
    ("risk", "benchmarks.bench_risk", "run"),
    ("web", "benchmarks.bench_web", "run"),
    ("orders", "benchmarks.bench_orders", "run"),
    ("pipeline", "benchmarks.bench_pipeline", "run"),
]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pika": _version("pika"),
        "aio-pika": _version("aio-pika"),
        "aiormq": _version("aiormq"),
        "msgspec": _version("msgspec"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    url = (os.environ.get("QA_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F").split(",")[0]
    try:
        from qapubsub.management import Management

        ov = Management(url).get("/api/overview")
        info["rabbitmq"] = ov.get("rabbitmq_version")
        info["erlang"] = ov.get("erlang_version")
    except Exception as exc:  # noqa: BLE001
        info["rabbitmq"] = None
        info["rabbitmq_error"] = str(exc)[:300]
    return info


def run_one(name: str, module: str, function: str) -> dict[str, Any]:
    t0 = time.monotonic()
    if importlib.util.find_spec(module) is None:
        return {"status": "skipped", "reason": f"module {module} does not exist", "figures": []}
    try:
        fn = getattr(importlib.import_module(module), function)
        out = fn()
        result = dict(out) if isinstance(out, dict) else {"figures": out}
        result.setdefault("figures", [])
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - isolate each module (KeyboardInterrupt re-raised below)
        if isinstance(exc, KeyboardInterrupt):
            raise
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:], "figures": []}
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    return result


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def table(results: dict[str, Any]) -> str:
    rows = [("benchmark", "figure", "value", "unit", "baseline", "ratio", "goal", "met")]
    for bname, res in results.items():
        if res.get("status") != "ok":
            rows.append((bname, f"[{res.get('status')}] {res.get('reason') or res.get('error', '')}"[:100],
                         "", "", "", "", "", ""))
            continue
        for f in res.get("figures", []):
            rows.append((bname, f.get("name", "?"), _fmt(f.get("value")), f.get("unit", ""), _fmt(f.get("baseline")),
                         _fmt(f.get("ratio")), f.get("goal") or "", _fmt(f.get("met")) if f.get("goal") else ""))
        for k, v in (res.get("errors") or {}).items():
            rows.append((bname, f"(error) {k}: {v}"[:110], "", "", "", "", "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/latest.json")
    p.add_argument("--only", action="append", help="run only these benchmark names (repeatable)")
    a = p.parse_args(argv)
    report: dict[str, Any] = {"machine": machine_info(), "benchmarks": {}}
    for name, module, function in BENCHMARKS:
        if a.only and name not in a.only:
            continue
        print(f"[bench] {name} ({module}.{function}) ...", flush=True)
        report["benchmarks"][name] = run_one(name, module, function)
        print(f"[bench] {name}: {report['benchmarks'][name]['status']} "
              f"in {report['benchmarks'][name]['wall_seconds']} s", flush=True)
    try:
        report["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    m = report["machine"]
    print(f"\nmachine: {m['nproc']} cores, Python {m['python']}, pika {m['pika']}, aio-pika {m['aio-pika']}, "
          f"RabbitMQ {m.get('rabbitmq')}")
    print(table(report["benchmarks"]))
    print(f"\nwritten to {out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
