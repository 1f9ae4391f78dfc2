"""Flow limits with an injected clock (never wall-clock sleeps), daily resets."""
from __future__ import annotations

from qamarket.sessions import ms_of
from qarisk import RiskEngine

from ._support import T0, account, engine, market, only, order


def send(e: RiskEngine, now: int, **kw):  # noqa: ANN003, ANN201
    """check, and accept when it passes (what the router does)."""
    m = market()
    o = order(**kw)
    d = e.check(o, account(), m, now)
    if d.ok:
        e.on_order_accepted(o, now, m)
    return d, o


def test_sliding_window_burst() -> None:
    e = engine(only("flow", max_orders_per_window=5, window_s=1.0))
    first = T0 + 500          # not aligned to a second: a fixed bucket would reset at T0+1000
    for i in range(5):
        assert send(e, first + i * 10, price=3500.0 + i)[0].ok
    d, _ = send(e, first + 60, price=3600.0)
    assert not d.ok and (d.rejection.rule, d.rejection.check) == ("flow", "orders_per_window")
    assert d.rejection.limit == 5 and d.rejection.value == 6
    # T0+1000 would start a new fixed bucket; a sliding window still holds all 5
    assert not send(e, T0 + 1000)[0].ok
    assert not send(e, first + 999)[0].ok
    # 1.0 s after the first, exactly one more passes ...
    assert send(e, first + 1000, price=3601.0)[0].ok
    assert not send(e, first + 1001, price=3602.0)[0].ok
    # ... and the next one when the second leaves the window
    assert send(e, first + 1010, price=3603.0)[0].ok


def test_rejected_orders_do_not_fill_the_window() -> None:
    e = engine(only("flow", max_orders_per_window=2, window_s=1.0))
    assert send(e, T0)[0].ok and send(e, T0 + 1, price=3501.0)[0].ok
    for i in range(10):
        assert not send(e, T0 + 2 + i)[0].ok
    assert send(e, T0 + 1000)[0].ok


def test_max_active_orders() -> None:
    e = engine(only("flow", max_active_orders=2))
    _, a = send(e, T0)
    _, b = send(e, T0, price=3501.0)
    d, _ = send(e, T0, price=3502.0)
    assert d.rejection.check == "active_orders"
    e.on_order_done(a.order_id)
    assert send(e, T0, price=3503.0)[0].ok
    e.on_cancel(b.order_id, T0)
    assert send(e, T0, price=3504.0)[0].ok


def test_cancels_per_instrument_per_day_and_reset_at_trading_day_change() -> None:
    e = engine(only("flow", max_cancels_per_instrument=2))
    day_ms = ms_of(2025, 3, 3, 14, 0)
    orders = [send(e, day_ms, price=3500.0 + i)[1] for i in range(3)]
    e.on_cancel(orders[0].order_id, day_ms)
    e.on_cancel(orders[0].order_id, day_ms)            # same id twice counts once
    assert send(e, day_ms, price=3600.0)[0].ok          # 1 cancel
    e.on_cancel(orders[1].order_id, day_ms)             # 2 cancels = the limit
    d, _ = send(e, day_ms, price=3601.0)
    assert (d.rejection.check, d.rejection.limit, d.rejection.value) == ("cancels_instrument", 2, 2)
    assert send(e, day_ms, symbol="m2509", exchange="DCE", price=3000.0)[0].ok   # other instrument unaffected
    # 21:00 the same calendar day = the night session of the next trading day: counters reset
    night = ms_of(2025, 3, 3, 21, 0)
    assert e.state("acc").trading_day == "20250303"
    assert send(e, night, price=3602.0)[0].ok
    assert e.state("acc").trading_day == "20250304" and e.state("acc").daily_cancels == 0


def test_friday_night_belongs_to_monday() -> None:
    e = engine(only("flow", max_daily_orders=1))
    assert send(e, ms_of(2025, 3, 7, 14, 0))[0].ok           # Friday day session
    assert not send(e, ms_of(2025, 3, 7, 14, 1), price=3501.0)[0].ok
    assert send(e, ms_of(2025, 3, 7, 21, 5), price=3502.0)[0].ok   # Friday night -> Monday 20250310
    assert e.state("acc").trading_day == "20250310"
    assert not send(e, ms_of(2025, 3, 10, 9, 5), price=3503.0)[0].ok  # Monday morning: same trading day


def test_explicit_on_trading_day_resets_and_days_only_move_forward() -> None:
    e = engine(only("flow", max_daily_orders=1))
    t = ms_of(2025, 3, 3, 14, 0)
    assert send(e, t)[0].ok
    assert not send(e, t + 1, price=3501.0)[0].ok
    e.on_trading_day("20250304")
    assert send(e, t + 2, price=3502.0)[0].ok           # the clock says 0303, the day stays 0304
    assert e.state("acc").trading_day == "20250304"
    assert not send(e, t + 3, price=3503.0)[0].ok
    e.on_trading_day("20250303")                        # going back is ignored
    assert not send(e, t + 4, price=3504.0)[0].ok


def test_daily_orders_per_instrument_and_trades() -> None:
    e = engine(only("flow", max_daily_orders_per_instrument=2, max_daily_trades=2))
    _, a = send(e, T0)
    _, b = send(e, T0, price=3501.0)
    assert send(e, T0, price=3502.0)[0].rejection.check == "daily_orders_instrument"
    assert send(e, T0, symbol="m2509", exchange="DCE", price=3000.0)[0].ok
    e.on_order_traded(a.order_id, 1, "t1")
    e.on_order_traded(a.order_id, 1, "t1")              # duplicate report
    assert send(e, T0, symbol="m2509", exchange="DCE", price=3001.0)[0].ok
    e.on_order_traded(b.order_id, 1, "t2")
    assert send(e, T0, symbol="IF2509", exchange="CFFEX", price=4000.0)[0].rejection.check == "daily_trades"


def test_daily_cancels_and_cancel_ratio() -> None:
    e = engine(only("flow", max_cancel_ratio=0.5, cancel_ratio_min_orders=4))
    os_ = [send(e, T0, price=3500.0 + i)[1] for i in range(4)]
    for o in os_[:3]:
        e.on_cancel(o.order_id, T0)
    d, _ = send(e, T0, price=3600.0)                    # 3/4 = 75% > 50%
    assert d.rejection.check == "cancel_ratio" and d.rejection.value == 0.75
    e2 = engine(only("flow", max_cancel_ratio=0.5, cancel_ratio_min_orders=4))
    os_ = [send(e2, T0, price=3500.0 + i)[1] for i in range(4)]
    for o in os_[:2]:
        e2.on_cancel(o.order_id, T0)
    assert send(e2, T0, price=3600.0)[0].ok              # exactly 50% passes
    e3 = engine(only("flow", max_cancel_ratio=0.1, cancel_ratio_min_orders=4))
    o = send(e3, T0)[1]
    e3.on_cancel(o.order_id, T0)
    assert send(e3, T0, price=3601.0)[0].ok              # 1/1 but fewer than 4 orders: not enforced
    e4 = engine(only("flow", max_daily_cancels=1))
    o = send(e4, T0)[1]
    e4.on_cancel(o.order_id, T0)
    assert send(e4, T0, price=3602.0)[0].rejection.check == "daily_cancels"


def test_duplicate_orders_within_window() -> None:
    e = engine(only("flow", duplicate_window_s=2.0))
    assert send(e, T0)[0].ok
    d, _ = send(e, T0 + 1999)
    assert d.rejection.check == "duplicate"
    assert send(e, T0 + 100, price=3501.0)[0].ok          # different price
    assert send(e, T0 + 100, volume=2)[0].ok              # different volume
    assert send(e, T0 + 100, direction="SELL")[0].ok      # different direction
    assert send(e, T0 + 2000)[0].ok                       # window over
    e2 = engine(only("flow", duplicate_window_s=2.0, max_duplicates=2))
    assert send(e2, T0)[0].ok and send(e2, T0 + 1)[0].ok
    assert not send(e2, T0 + 2)[0].ok


def test_cancel_rate_window() -> None:
    e = engine(only("flow", max_cancels_per_window=2, window_s=1.0))
    for t in (T0, T0 + 10):
        assert e.check_cancel("acc", t).ok
        e.on_cancel_sent("acc", t)
    d = e.check_cancel("acc", T0 + 20)
    assert d.rejection.check == "cancels_per_window"
    assert e.check_cancel("acc", T0 + 1000).ok


def test_all_rules_on_accepts_a_normal_order_and_keeps_counting() -> None:
    from qarisk import RiskConfig
    cfg = RiskConfig.from_dict({
        "volume": {"max_volume": 100, "max_value": 1e7}, "price": {"band_pct": 5},
        "exposure": {"max_position_lots": 50, "max_position_value": 1e7, "max_account_lots": 500,
                     "max_account_value": 1e8, "max_net_value": 5e7},
        "flow": {"max_orders_per_window": 3, "max_active_orders": 100, "max_daily_orders": 1000,
                 "max_daily_orders_per_instrument": 500, "max_daily_cancels": 400, "max_cancels_per_instrument": 400,
                 "max_daily_trades": 1000, "max_cancel_ratio": 0.9, "duplicate_window_s": 1.0},
    })
    e = RiskEngine({"acc": cfg})
    m = market()
    for i in range(3):
        o = order(price=3500.0 + i)
        assert e.check(o, account(), m, T0 + i).ok
        e.on_order_accepted(o, T0 + i, m)
    assert e.check(order(price=3510.0), account(), m, T0 + 5).rejection.check == "orders_per_window"


def test_restored_working_orders_count_as_working_but_not_as_new_orders() -> None:
    """After a router restart the working orders come back (from the accounts' frozen orders):
    they fill the working-order limit again, a fill shrinks them, and the daily count is untouched."""
    e = engine(only("flow", max_active_orders=2, max_daily_orders=3))
    m = market()
    a, b = order(price=3500.0, volume=3), order(price=3501.0)
    e.restore_working(a, 2, m)           # 1 of its 3 lots was filled before the restart
    e.restore_working(b, 1, m)
    e.restore_working(b, 1, m)           # idempotent
    st = e.state("acc")
    assert len(st.active) == 2 and st.working_open_lots == 3 and st.daily_orders == 0
    d, _ = send(e, T0, price=3502.0)
    assert d.rejection.check == "active_orders"
    e.on_order_traded(a.order_id, 2, "a-2")   # its last 2 lots: no longer working
    assert st.working_open_lots == 1
    assert send(e, T0, price=3503.0)[0].ok and st.daily_orders == 1
    e.restore_working(order(price=3504.0), 0, m)   # nothing left: not working
    assert len(st.active) == 2
