"""Ticks/s of qamarket's BarAggregator vs vn.py 4.5's BarGenerator on the same ticks (1-min + 5-min bars).

    python -m benchmarks.bench_aggregation [n_ticks]

Both run single threaded on one seeded tick stream (``rb`` on SHFE, a snapshot every
500 ms through day and night sessions, cumulative volume reset each trading day), built
before timing: ours as :class:`qamarket.models.Tick`, vn.py's as ``TickData``
(tz-aware datetimes, as vn.py's gateways make them) in a subprocess of a separate
virtualenv (``.qaflow/bench-venv-vnpy``, created on first use with ``pip install
vnpy==4.5.0``; ``--no-deps`` plus vn.py's few runtime imports as a fallback). vn.py's
``on_bar`` feeds ``update_bar`` as its strategies do. Best of ``repeat`` passes each.
When vn.py cannot be installed the result says why and holds only our figure.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VNPY_VENV = ROOT / ".qaflow" / "bench-venv-vnpy"
VNPY_VERSION = "4.5.0"

sys.path.insert(0, str(ROOT))

from qamarket.aggregation import BarAggregator  # noqa: E402
from qamarket.models import Tick  # noqa: E402
from qamarket.sessions import MS_DAY, MS_MIN, Calendar, ms_of  # noqa: E402

_SEGMENTS_DAY = [(9 * 60, 10 * 60 + 15), (10 * 60 + 30, 11 * 60 + 30), (13 * 60 + 30, 15 * 60)]
_SEGMENT_NIGHT = (21 * 60, 23 * 60)


def gen_rows(n_ticks: int, seed: int = 7) -> list[tuple[int, float, float, float, float, float, float, str]]:
    """(datetime_ms, last_price, volume, turnover, open_interest, day_high, day_low, trading_day) rows."""
    rnd = random.Random(seed)
    cal = Calendar()
    rows: list[tuple[int, float, float, float, float, float, float, str]] = []
    day0 = ms_of(2025, 3, 3)
    price, oi = 3500.0, 2_000_000.0
    vol = turn = 0.0
    hi = lo = price
    day = 0
    first = True
    while len(rows) < n_ticks:
        dstart = day0 + day * MS_DAY
        day += 1
        if not cal.is_business_day_no(dstart // MS_DAY):
            continue
        for s, e in [*_SEGMENTS_DAY, _SEGMENT_NIGHT]:
            if (s, e) == _SEGMENT_NIGHT or first:
                vol = turn = 0.0  # new trading day
                hi = lo = price
                first = False
            t = dstart + s * MS_MIN
            end = dstart + e * MS_MIN
            td = cal.trading_day(t)
            while t < end and len(rows) < n_ticks:
                price = max(1.0, price + rnd.choice((-1.0, 0.0, 0.0, 1.0)))
                dv = float(rnd.randint(0, 40))
                vol += dv
                turn += dv * price * 10
                oi += rnd.randint(-5, 5)
                hi = max(hi, price)
                lo = min(lo, price)
                rows.append((t, price, vol, turn, oi, hi, lo, td))
                t += 500
    return rows


def _ticks(rows: list[Any]) -> list[Tick]:
    return [
        Tick(symbol="rb2510", exchange="SHFE", datetime=t, last_price=p, volume=v, turnover=tu, open_interest=oi,
             high_price=h, low_price=lo, trading_day=td, source="bench")
        for t, p, v, tu, oi, h, lo, td in rows
    ]


def bench_ours(rows: list[Any], repeat: int = 3, realtime: bool = True) -> dict[str, Any]:
    ticks = _ticks(rows)
    best = float("inf")
    n_bars = 0
    for _ in range(repeat):
        agg = BarAggregator("rb2510", "SHFE", freqs=("1min", "5min"), realtime=("1min",) if realtime else ())
        on_tick = agg.on_tick
        bars = 0
        t0 = time.perf_counter()
        for tk in ticks:
            r = on_tick(tk)
            if r:
                bars += len(r)
        el = time.perf_counter() - t0
        best = min(best, el)
        n_bars = bars + len(agg.flush())
    return {"ticks_per_s": len(ticks) / best, "seconds": best, "bars_out": n_bars}


_VNPY_SCRIPT = r"""
import json, sys, time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo
from vnpy.trader.utility import BarGenerator
from vnpy.trader.object import TickData
from vnpy.trader.constant import Exchange
import vnpy
rows = json.load(open(sys.argv[1]))
repeat = int(sys.argv[2])
tz = ZoneInfo("Asia/Shanghai")
epoch = datetime(1970, 1, 1, tzinfo=tz)
ticks = [TickData(gateway_name="bench", symbol="rb2510", exchange=Exchange.SHFE,
                  datetime=epoch + timedelta(milliseconds=r[0]), last_price=r[1], volume=r[2], turnover=r[3],
                  open_interest=r[4], high_price=r[5], low_price=r[6]) for r in rows]
best = float("inf"); nbars = 0
for _ in range(repeat):
    counts = [0, 0]
    def on_window_bar(bar):
        counts[1] += 1
    bg = None
    def on_bar(bar):
        counts[0] += 1
        bg.update_bar(bar)
    bg = BarGenerator(on_bar, 5, on_window_bar)
    upd = bg.update_tick
    t0 = time.perf_counter()
    for tk in ticks:
        upd(tk)
    el = time.perf_counter() - t0
    best = min(best, el); nbars = counts[0] + counts[1]
print(json.dumps({"ticks_per_s": len(ticks) / best, "seconds": best, "bars_out": nbars,
                  "vnpy_version": vnpy.__version__, "python": sys.version.split()[0]}))
"""


def _vnpy_python() -> tuple[Path | None, str]:
    """The bench venv's python with vnpy importable, installing it if needed; (None, reason) otherwise."""
    py = VNPY_VENV / "bin" / "python"
    check = [str(py), "-c", "import vnpy.trader.utility, vnpy; print(vnpy.__version__)"]

    def ok() -> bool:
        if not py.exists():
            return False
        r = subprocess.run(check, capture_output=True, text=True, timeout=120)
        return r.returncode == 0 and r.stdout.strip() == VNPY_VERSION

    if ok():
        return py, ""
    log = []
    try:
        if not py.exists():
            VNPY_VENV.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "venv", str(VNPY_VENV)], check=True, capture_output=True, timeout=300)
        pip = [str(py), "-m", "pip", "install", "-q"]
        r = subprocess.run([*pip, f"vnpy=={VNPY_VERSION}"], capture_output=True, text=True, timeout=1200)
        log.append(r.stderr[-500:])
        if not ok():
            r = subprocess.run([*pip, "--no-deps", f"vnpy=={VNPY_VERSION}"], capture_output=True, text=True, timeout=600)
            log.append(r.stderr[-500:])
            # what vnpy.trader.utility imports at module level
            r = subprocess.run([*pip, "numpy", "pandas", "tzlocal", "loguru", "ta-lib", "deap", "tqdm", "PySide6"],
                               capture_output=True, text=True, timeout=1200)
            log.append(r.stderr[-500:])
    except (OSError, subprocess.SubprocessError) as exc:
        log.append(repr(exc))
    if ok():
        return py, ""
    return None, "vn.py could not be installed into " + str(VNPY_VENV) + ": " + " | ".join(x for x in log if x)


def bench_vnpy(rows: list[Any], repeat: int = 3) -> dict[str, Any]:
    py, why = _vnpy_python()
    if py is None:
        return {"error": why}
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "rows.json"
        data.write_text(json.dumps([r[:7] for r in rows]))
        script = Path(d) / "vnpy_bench.py"
        script.write_text(_VNPY_SCRIPT)
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
        r = subprocess.run([str(py), str(script), str(data), str(repeat)], capture_output=True, text=True,
                           timeout=300, env=env, cwd=d)
    if r.returncode != 0:
        return {"error": f"vn.py benchmark failed: {r.stderr[-800:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(n_ticks: int = 300_000, repeat: int = 3, seed: int = 7) -> dict[str, Any]:
    rows = gen_rows(n_ticks, seed)
    ours = bench_ours(rows, repeat)
    ours_nort = bench_ours(rows, repeat, realtime=False)
    vn = bench_vnpy(rows, repeat)
    result: dict[str, Any] = {
        "n_ticks": n_ticks,
        "python": sys.version.split()[0],
        "qamarket": ours,
        "qamarket_no_realtime": ours_nort,
        "vnpy_bargenerator": vn,
    }
    if "ticks_per_s" in vn:
        result["ratio"] = ours["ticks_per_s"] / vn["ticks_per_s"]
        result["ratio_no_realtime"] = ours_nort["ticks_per_s"] / vn["ticks_per_s"]
    else:
        result["ratio"] = None
        result["note"] = "vn.py not measured: " + vn.get("error", "?")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 300_000
    res = run(n)
    print(json.dumps(res, indent=2))
    out = ROOT / "benchmarks" / "results" / "bench_aggregation.json"
    try:
        out.write_text(json.dumps(res, indent=2))
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
