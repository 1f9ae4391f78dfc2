"""µs per pre-trade risk check, all rules on vs all rules off.

    python -m benchmarks.bench_risk [n_orders]

One account, five instruments (SHFE rb/au, CFFEX IF, DCE m, an SSE stock), positions
on each, every limit of every rule set (none reached, so every rule runs to its end),
orders built before timing (opens and closes, LIMIT and MARKET), the clock advancing 1 ms
per order inside the 10:00 day session. Figures:

* ``check_all_on_us``: :meth:`RiskEngine.check` with every rule on;
* ``check_all_off_us``: the same orders with ``enabled: false`` (the call's floor);
* ``cycle_all_on_us``: check + ``on_order_accepted`` + ``on_order_done`` (what the router
  does for an order that is dispatched and finishes).

Best of ``repeat`` passes each (single thread; the machine's other load adds noise).
"""
from __future__ import annotations

import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qaaccount.account import Bucket, Position  # noqa: E402
from qaaccount.instruments import Instruments, future, stock  # noqa: E402
from qamarket.models import Tick  # noqa: E402
from qamarket.sessions import ms_of  # noqa: E402
from qaorder.models import Direction, Exchange, Offset, Order, PriceType  # noqa: E402
from qarisk import AccountSnapshot, MarketSnapshot, RiskConfig, RiskEngine  # noqa: E402

ALL_ON = {
    "state": {"enabled": True},
    "session": {"enabled": True},
    "volume": {"max_volume": 1000, "max_value": 1e9},
    "price": {"band_pct": 8.0, "require_quote": True},
    "position": {"enabled": True},
    "funds": {"reserve": 1000.0},
    "exposure": {"max_position_lots": 100_000, "max_position_value": 1e12, "max_account_lots": 1_000_000,
                 "max_account_value": 1e13, "max_net_value": 1e13},
    "flow": {"max_orders_per_window": 1_000_000, "window_s": 1.0, "max_active_orders": 1_000_000,
             "max_daily_orders": 10_000_000, "max_daily_orders_per_instrument": 10_000_000,
             "max_daily_cancels": 1_000_000, "max_cancels_per_instrument": 1_000_000,
             "max_daily_trades": 1_000_000, "max_daily_trades_per_instrument": 1_000_000,
             "max_cancel_ratio": 0.99, "cancel_ratio_min_orders": 0, "duplicate_window_s": 0.5, "max_duplicates": 1000},
}


def _setup() -> tuple[Instruments, MarketSnapshot, AccountSnapshot, list[tuple[str, str, float, float]]]:
    insts = Instruments([
        future("rb2510", "SHFE", multiplier=10, price_tick=1, margin_rate=0.1, open_ratio=0.0001),
        future("au2512", "SHFE", multiplier=1000, price_tick=0.02, margin_rate=0.08, open_per_lot=10),
        future("IF2509", "CFFEX", multiplier=300, price_tick=0.2, margin_rate=0.12, open_ratio=0.000023),
        future("m2509", "DCE", multiplier=10, price_tick=1, margin_rate=0.1, open_per_lot=1.5),
        stock("600000", "SSE"),
    ])
    specs = [("rb2510", "SHFE", 3500.0, 1.0), ("au2512", "SHFE", 600.0, 0.02), ("IF2509", "CFFEX", 4000.0, 0.2),
             ("m2509", "DCE", 3000.0, 1.0), ("600000", "SSE", 10.0, 0.01)]
    t0 = ms_of(2025, 3, 3, 10, 0)
    quotes = {f"{ex}.{s}": Tick(symbol=s, exchange=ex, datetime=t0, last_price=p, limit_up=round(p * 1.1, 2),  # type: ignore[arg-type]
                                limit_down=round(p * 0.9, 2)) for s, ex, p, _ in specs}
    market = MarketSnapshot(instruments=insts, quotes=quotes)
    positions = {}
    for s, ex, _p, _t in specs:
        inst = insts[f"{ex}.{s}"]
        positions[inst.key] = Position(inst, long_today=Bucket(500, 0), long_his=Bucket(50_000, 100),
                                       short_today=Bucket(300, 0), short_his=Bucket(40_000, 0))
    acc = AccountSnapshot(available=1e12, positions=positions, long_value=5e8, short_value=3e8, gross_lots=450_000)
    return insts, market, acc, specs


def _orders(n: int, specs: list[tuple[str, str, float, float]]) -> list[Order]:
    out = []
    for i in range(n):
        s, ex, p, tick = specs[i % len(specs)]
        stock_ = ex == "SSE"
        k = i // len(specs)
        close = k % 3 == 2
        if stock_:
            d, off, vol = (Direction.SELL, Offset.CLOSE, 100) if close else (Direction.BUY, Offset.OPEN, 200)
        else:
            d = Direction.BUY if k % 2 else Direction.SELL
            off = (Offset.CLOSETODAY if ex == "SHFE" and k % 4 == 2 else Offset.CLOSE) if close else Offset.OPEN
            vol = 1 + k % 5
        market_ = (k % 7 == 3) and not stock_
        price = None if market_ else round(p + tick * ((k % 11) - 5), 6)
        out.append(Order(order_id=f"b{i}", account="acc", symbol=s, exchange=Exchange(ex), direction=d, offset=off,
                         price_type=PriceType.MARKET if market_ else PriceType.LIMIT, price=price, volume=vol))
    return out


def _time_check(engine: RiskEngine, orders: list[Order], acc: Any, market: Any, t0: int) -> tuple[float, int]:
    check = engine.check
    ok = 0
    gc.disable()
    try:
        start = time.perf_counter_ns()
        now = t0
        for o in orders:
            if check(o, acc, market, now).ok:
                ok += 1
            now += 1
        el = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return el / len(orders) / 1000, ok


def _time_cycle(engine: RiskEngine, orders: list[Order], acc: Any, market: Any, t0: int) -> tuple[float, int]:
    check, accept, done = engine.check, engine.on_order_accepted, engine.on_order_done
    ok = 0
    gc.disable()
    try:
        start = time.perf_counter_ns()
        now = t0
        for o in orders:
            if check(o, acc, market, now).ok:
                accept(o, now, market)
                done(o.order_id)
                ok += 1
            now += 1
        el = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return el / len(orders) / 1000, ok


def run(n_orders: int = 20_000, repeat: int = 5) -> dict[str, Any]:
    _insts, market, acc, specs = _setup()
    orders = _orders(n_orders, specs)
    t0 = ms_of(2025, 3, 3, 10, 0)
    on = RiskConfig.from_dict(ALL_ON)
    off = RiskConfig.all_off()
    res: dict[str, Any] = {"n_orders": n_orders, "repeat": repeat, "python": platform.python_version(),
                           "machine": platform.machine()}
    best_on = best_off = best_cycle = float("inf")
    for _ in range(repeat):
        us, ok = _time_check(RiskEngine({"acc": on}), orders, acc, market, t0)
        if ok != n_orders:
            e = RiskEngine({"acc": on})
            bad = next(e.check(o, acc, market, t0 + i) for i, o in enumerate(orders)
                       if not e.check(o, acc, market, t0 + i).ok)
            raise AssertionError(f"benchmark orders must all pass; {ok}/{n_orders}: {bad}")
        best_on = min(best_on, us)
        best_off = min(best_off, _time_check(RiskEngine({"acc": off}), orders, acc, market, t0)[0])
        us, ok = _time_cycle(RiskEngine({"acc": on}), orders, acc, market, t0)
        assert ok == n_orders, ok
        best_cycle = min(best_cycle, us)
    res.update(check_all_on_us=round(best_on, 3), check_all_off_us=round(best_off, 3),
               cycle_all_on_us=round(best_cycle, 3), goal_us=20.0, meets_goal=best_on <= 20.0)
    return res


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 20_000
    res = run(n)
    print(json.dumps(res, indent=2))
    print(f"risk check, all rules on : {res['check_all_on_us']:.2f} µs/order (goal <= {res['goal_us']:.0f})")
    print(f"risk check, all rules off: {res['check_all_off_us']:.2f} µs/order")
    print(f"check + accept + done    : {res['cycle_all_on_us']:.2f} µs/order")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
