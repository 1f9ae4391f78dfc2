"""Each rule: accept and reject, boundaries at the limit and one tick/lot over."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qaaccount.account import Account
from qamarket.sessions import ms_of
from qarisk import ACCEPT, AccountSnapshot, MarketSnapshot, RiskConfig, RiskEngine, is_tick_multiple

from ._support import DCE_M, INSTRUMENTS, PF, RB, T0, account, engine, market, only, order, position, raw_order, tick


def rej(decision):  # noqa: ANN001, ANN201
    assert not decision.ok, decision
    r = decision.rejection
    return (r.rule, r.check)


# ------------------------------------------------------------------------ engine basics
def test_all_off_accepts_anything() -> None:
    e = RiskEngine({"acc": RiskConfig.all_off()})
    assert e.check(order(price=1.5, volume=10**6), None, market(), T0) is ACCEPT


def test_account_without_config_is_rejected_unless_default() -> None:
    e = RiskEngine({})
    assert rej(e.check(order(), account(), market(), T0)) == ("state", "no_config")
    e = RiskEngine(default=only("volume", max_volume=5))
    assert e.check(order(volume=5), account(), market(), T0).ok


def test_unknown_instrument_fails_closed() -> None:
    e = engine(only("price"))
    o = order(symbol="zz2501", exchange="SHFE")
    d = e.check(o, account(), market(), T0)
    assert rej(d) == ("instrument", "unknown") and "SHFE.zz2501" in d.rejection.reason


def test_rejection_is_structured_and_converts() -> None:
    e = engine(only("volume", max_volume=5))
    o = order(volume=6)
    r = e.check(o, account(), market(), T0).rejection
    assert (r.rule, r.check, r.limit, r.value) == ("volume", "max_volume", 5, 6)
    assert "6" in r.reason and "5" in r.reason
    err = r.to_order_rejected(o)
    assert err.field == "risk.volume.max_volume" and err.order_id == o.order_id and err.account == "acc"


def test_all_rejections_option_lists_every_failing_rule() -> None:
    cfg = RiskConfig.from_dict({"session": {"enabled": False}, "flow": {"enabled": False},
                                "volume": {"max_volume": 5}, "price": {"band_pct": 1}})
    e = engine(cfg)
    d = e.check(order(price=3600.5, volume=6), account(available=0.0), market(), T0, all_rejections=True)
    assert [(r.rule, r.check) for r in d.rejections] == [("volume", "max_volume"), ("price", "band"),
                                                          ("funds", "available")]
    # first only: the fixed order
    assert rej(e.check(order(price=3600.5, volume=6), account(available=0.0), market(), T0)) == ("volume", "max_volume")


# ------------------------------------------------------------------------ funds
def test_funds_futures_open_exact_boundary() -> None:
    e = engine(only("funds"))
    need = 3500 * 2 * 10 * 0.1 + 0.0001 * 3500 * 2 * 10   # margin + open fee
    assert e.check(order(volume=2), account(need), market(), T0).ok
    d = e.check(order(volume=2), account(need - 0.01), market(), T0)
    assert rej(d) == ("funds", "available") and d.rejection.value == pytest.approx(need)


def test_funds_per_lot_fee_and_reserve() -> None:
    e = engine(only("funds", reserve=1000))
    need = 4000 * 300 * 0.12 + 2.0
    assert e.check(order("IF2509", "CFFEX", price=4000.0), account(need + 1000), market(), T0).ok
    assert rej(e.check(order("IF2509", "CFFEX", price=4000.0), account(need + 999.99), market(), T0)) == (
        "funds", "available")


def test_funds_stock_buy_min_commission_and_transfer_fee() -> None:
    e = engine(only("funds"))
    t = 10.0 * 100
    need = t + 5.0 + 0.00001 * t    # commission 0.25 -> minimum 5
    o = order("600000", "SSE", price=10.0, volume=100)
    assert e.check(o, account(need), market(), T0).ok
    assert rej(e.check(o, account(need - 0.001), market(), T0)) == ("funds", "available")
    # a stock sell needs no cash
    s = order("600000", "SSE", "SELL", "CLOSE", price=10.0, volume=100)
    assert e.check(s, account(0.0), market(), T0).ok


def test_funds_futures_close_fee() -> None:
    e = engine(only("funds"))
    fee_today = 0.0002 * 3500 * 10
    o = order(direction="SELL", offset="CLOSETODAY")
    assert e.check(o, account(fee_today), market(), T0).ok
    assert rej(e.check(o, account(fee_today - 0.01), market(), T0)) == ("funds", "available")


def test_funds_market_order_valued_at_limit_up() -> None:
    e = engine(only("funds"))
    o = order(price=None, price_type="MARKET")
    need = 3675 * 10 * 0.1 + 0.0001 * 3675 * 10
    assert e.check(o, account(need), market(), T0).ok
    assert rej(e.check(o, account(need - 0.01), market(), T0)) == ("funds", "available")
    no_quote = MarketSnapshot(instruments=INSTRUMENTS, quotes={})
    assert rej(e.check(o, account(1e9), no_quote, T0)) == ("price", "no_reference_price")


# ------------------------------------------------------------------------ position
def test_position_close_needs_closable_volume_minus_frozen() -> None:
    e = engine(only("position"))
    acc = account(0, position(DCE_M, lt=2, lh=3, lh_f=1))
    assert e.check(order("m2509", "DCE", "SELL", "CLOSE", price=3000.0, volume=4), acc, market(), T0).ok
    d = e.check(order("m2509", "DCE", "SELL", "CLOSE", price=3000.0, volume=5), acc, market(), T0)
    assert rej(d) == ("position", "closable") and d.rejection.limit == 4
    # nothing held on the short side
    assert rej(e.check(order("m2509", "DCE", "BUY", "CLOSE", price=3000.0), acc, market(), T0)) == (
        "position", "closable")
    # no position at all
    assert rej(e.check(order("m2509", "DCE", "SELL", "CLOSE", price=3000.0), account(), market(), T0)) == (
        "position", "closable")


def test_position_shfe_closetoday_and_closeyesterday() -> None:
    e = engine(only("position"))
    acc = account(0, position(RB, lt=3, lh=2, lt_f=1))
    ct = lambda v: order(direction="SELL", offset="CLOSETODAY", volume=v)  # noqa: E731
    cy = lambda v: order(direction="SELL", offset="CLOSEYESTERDAY", volume=v)  # noqa: E731
    cl = lambda v: order(direction="SELL", offset="CLOSE", volume=v)  # noqa: E731
    assert e.check(ct(2), acc, market(), T0).ok
    assert rej(e.check(ct(3), acc, market(), T0)) == ("position", "closable")
    assert e.check(cy(2), acc, market(), T0).ok
    assert rej(e.check(cy(3), acc, market(), T0)) == ("position", "closable")
    d = e.check(cl(3), acc, market(), T0)   # SHFE CLOSE = yesterday's only
    assert rej(d) == ("position", "closable") and "CLOSETODAY" in d.rejection.reason


def test_position_stock_t_plus_1() -> None:
    e = engine(only("position"))
    acc = account(0, position(PF, lt=500, lh=200))
    sell = lambda v, off="CLOSE": order("600000", "SSE", "SELL", off, price=10.0, volume=v)  # noqa: E731
    assert e.check(sell(200), acc, market(), T0).ok
    d = e.check(sell(300), acc, market(), T0)
    assert rej(d) == ("position", "closable") and "T+1" in d.rejection.reason
    assert rej(e.check(sell(100, "CLOSETODAY"), acc, market(), T0)) == ("position", "t_plus_1")
    assert rej(e.check(sell(100, "OPEN"), acc, market(), T0)) == ("position", "short_selling")
    assert rej(e.check(order("600000", "SSE", "BUY", "CLOSE", price=10.0, volume=100), acc, market(), T0)) == (
        "position", "stock_offset")


def test_position_counts_own_working_closes_when_account_lags() -> None:
    e = engine(only("position"))
    acc = account(0, position(RB, lh=5))
    m = market()
    first = order(direction="SELL", offset="CLOSE", volume=3)
    assert e.check(first, acc, m, T0).ok
    e.on_order_accepted(first, T0, m)          # the account view has not frozen it yet
    assert e.check(order(direction="SELL", offset="CLOSE", volume=2), acc, m, T0).ok
    assert rej(e.check(order(direction="SELL", offset="CLOSE", volume=3), acc, m, T0)) == ("position", "closable")
    # once the account froze it too, it is not subtracted twice
    acc2 = account(0, position(RB, lh=5, lh_f=3))
    assert e.check(order(direction="SELL", offset="CLOSE", volume=2), acc2, m, T0).ok
    e.on_order_done(first.order_id)
    assert e.check(order(direction="SELL", offset="CLOSE", volume=5), acc, m, T0).ok


# ------------------------------------------------------------------------ price
def test_price_limits_inclusive_one_tick_over_fails() -> None:
    e = engine(only("price"))
    assert e.check(order(price=3675.0), account(), market(), T0).ok
    assert rej(e.check(order(price=3676.0), account(), market(), T0)) == ("price", "limit_up")
    assert e.check(order(price=3325.0), account(), market(), T0).ok
    assert rej(e.check(order(price=3324.0), account(), market(), T0)) == ("price", "limit_down")


def test_price_band_around_last() -> None:
    e = engine(only("price", band_pct=2.0))            # 3500 +- 70
    assert e.check(order(price=3570.0), account(), market(), T0).ok
    assert e.check(order(price=3430.0, direction="SELL"), account(), market(), T0).ok
    d = e.check(order(price=3571.0), account(), market(), T0)
    assert rej(d) == ("price", "band") and d.rejection.limit == pytest.approx(70.0)
    assert rej(e.check(order(price=3429.0), account(), market(), T0)) == ("price", "band")


def test_price_tick_multiple_float_safe() -> None:
    e = engine(only("price", check_limits=False))
    assert e.check(order("au2512", "SHFE", price=600.06), account(), market(), T0).ok     # 600.06/0.02 = 30002.999..
    assert e.check(order("IF2509", "CFFEX", price=4000.2 + 0.4), account(), market(), T0).ok
    assert rej(e.check(order("au2512", "SHFE", price=600.07), account(), market(), T0)) == ("price", "tick")
    assert rej(e.check(order(price=3500.5), account(), market(), T0)) == ("price", "tick")


def test_price_without_quote_passes_unless_required() -> None:
    nq = MarketSnapshot(instruments=INSTRUMENTS, quotes={})
    assert engine(only("price", band_pct=1.0)).check(order(), account(), nq, T0).ok
    assert rej(engine(only("price", require_quote=True)).check(order(), account(), nq, T0)) == ("price", "no_quote")


def test_price_ignores_ctp_unset_limits() -> None:
    m = market(**{"SHFE.rb2510": tick(up=1.7976931348623157e308, down=0.0)})
    assert engine(only("price")).check(order(price=9999.0), account(), m, T0).ok


TICKS = [Decimal(x) for x in ("0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5",
                              "10", "50")]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(TICKS), st.integers(1, 5_000_000), st.integers(0, 99))
def test_tick_check_agrees_with_decimal(tick_d: Decimal, n: int, hundredths: int) -> None:
    exact = tick_d * n + tick_d * hundredths / 100
    price = float(exact)
    expected = (Decimal(repr(price)) % tick_d) == 0
    assert is_tick_multiple(price, float(tick_d)) is expected


# ------------------------------------------------------------------------ volume
def test_volume_max_volume_and_value() -> None:
    e = engine(only("volume", max_volume=10, max_value=350_000))   # rb: 3500*10 per lot
    assert e.check(order(volume=10), account(), market(), T0).ok
    assert rej(e.check(order(volume=11), account(), market(), T0)) == ("volume", "max_volume")
    e2 = engine(only("volume", max_value=350_000))
    assert e2.check(order(volume=10), account(), market(), T0).ok
    d = e2.check(order(volume=10, price=3501.0), account(), market(), T0)
    assert rej(d) == ("volume", "max_value") and d.rejection.value == pytest.approx(350_100)


def test_volume_a_share_lots_and_odd_lot_sells() -> None:
    e = engine(only("volume"))
    buy = lambda v: order("600000", "SSE", price=10.0, volume=v)  # noqa: E731
    sell = lambda v: order("600000", "SSE", "SELL", "CLOSE", price=10.0, volume=v)  # noqa: E731
    assert e.check(buy(100), account(), market(), T0).ok
    assert e.check(buy(300), account(), market(), T0).ok
    assert rej(e.check(buy(150), account(), market(), T0)) == ("volume", "lot_size")
    assert rej(e.check(buy(99), account(), market(), T0)) == ("volume", "lot_size")
    acc = account(0, position(PF, lh=250))
    assert e.check(sell(250), acc, market(), T0).ok     # whole holding incl. the odd 50
    assert e.check(sell(50), acc, market(), T0).ok      # just the odd remainder
    assert e.check(sell(200), acc, market(), T0).ok     # round lots
    assert rej(e.check(sell(120), acc, market(), T0)) == ("volume", "odd_lot")
    assert rej(e.check(sell(30), account(0, position(PF, lh=300)), market(), T0)) == ("volume", "odd_lot")


# ------------------------------------------------------------------------ exposure
def test_exposure_position_lots_per_instrument_side() -> None:
    e = engine(only("exposure", max_position_lots=5))
    acc = account(0, position(RB, lt=2, lh=1, sh=5))
    m = market()
    assert e.check(order(volume=2), acc, m, T0).ok                      # long 3 + 2 = 5
    d = e.check(order(volume=3), acc, m, T0)
    assert rej(d) == ("exposure", "position_lots") and (d.rejection.limit, d.rejection.value) == (5, 6)
    assert rej(e.check(order(direction="SELL", volume=1), acc, m, T0)) == ("exposure", "position_lots")
    # closes are never blocked by exposure
    assert e.check(order(direction="BUY", offset="CLOSE", volume=5), acc, m, T0).ok
    # working opens count
    w = order(volume=2)
    e.on_order_accepted(w, T0, m)
    assert rej(e.check(order(volume=1), acc, m, T0)) == ("exposure", "position_lots")
    e.on_order_traded(w.order_id, 1)   # one filled: the view shows long 4, 1 still working
    acc2 = account(0, position(RB, lt=3, lh=1, sh=5))
    assert e.check(order(volume=1), acc2, m, T0).rejection.value == 6
    e.on_order_done(w.order_id)        # the rest cancelled: 4 held + 1 = 5
    assert e.check(order(volume=1), acc2, m, T0).ok


def test_exposure_position_value() -> None:
    e = engine(only("exposure", max_position_value=70_000))
    assert e.check(order(volume=2), account(), market(), T0).ok          # 2*3500*10
    assert rej(e.check(order(volume=2, price=3501.0), account(), market(), T0)) == ("exposure", "position_value")


def test_exposure_account_lots_value_and_net() -> None:
    m = market()
    e = engine(only("exposure", max_account_lots=10))
    assert e.check(order(volume=3), account(0, gross_lots=7), m, T0).ok
    assert rej(e.check(order(volume=4), account(0, gross_lots=7), m, T0)) == ("exposure", "account_lots")
    e = engine(only("exposure", max_account_value=1_000_000))
    acc = account(0, long_value=600_000.0, short_value=330_000.0)
    assert e.check(order(volume=2), acc, m, T0).ok                        # +70_000 = 1_000_000
    assert rej(e.check(order(volume=3), acc, m, T0)) == ("exposure", "account_value")
    e = engine(only("exposure", max_net_value=300_000))
    acc = account(0, long_value=600_000.0, short_value=335_000.0)        # net 265_000
    assert e.check(order(volume=1), acc, m, T0).ok                        # 300_000
    d = e.check(order(volume=2), acc, m, T0)
    assert rej(d) == ("exposure", "net_value") and d.rejection.value == pytest.approx(335_000)
    assert e.check(order(direction="SELL", volume=10), acc, m, T0).ok    # reduces net: 265k - 350k = -85k


def test_account_snapshot_from_qaaccount() -> None:
    acc = Account("acc", INSTRUMENTS, pre_balance=1_000_000.0)
    snap = AccountSnapshot.from_account(acc, {"SHFE.rb2510": 3500.0})
    assert snap.available == pytest.approx(1_000_000.0) and snap.gross_lots == 0
    e = engine(only("funds"))
    assert e.check(order(volume=10), snap, market(), T0).ok


# ------------------------------------------------------------------------ sessions
@pytest.mark.parametrize("when,ok", [
    (ms_of(2025, 3, 3, 9, 0, 0), True),
    (ms_of(2025, 3, 3, 10, 20, 0), False),    # 10:15-10:30 break
    (ms_of(2025, 3, 3, 12, 0, 0), False),     # lunch
    (ms_of(2025, 3, 3, 21, 30, 0), True),     # rb night session
    (ms_of(2025, 3, 3, 23, 30, 0), False),    # after rb's 23:00 close
    (ms_of(2025, 3, 3, 8, 57, 0), True),      # opening call auction
    (ms_of(2025, 3, 8, 10, 0, 0), False),     # Saturday
])
def test_session_futures(when: int, ok: bool) -> None:
    e = engine(only("session"))
    d = e.check(order(), account(), market(), when)
    assert d.ok is ok, d
    if not ok:
        assert rej(d) == ("session", "closed")


def test_session_stock_and_auction_switch() -> None:
    e = engine(only("session"))
    o = order("600000", "SSE", price=10.0, volume=100)
    assert e.check(o, account(), market(), ms_of(2025, 3, 3, 9, 31)).ok
    assert not e.check(o, account(), market(), ms_of(2025, 3, 3, 21, 0)).ok
    assert e.check(o, account(), market(), ms_of(2025, 3, 3, 9, 20)).ok
    e2 = engine(only("session", allow_auction=False))
    assert rej(e2.check(o, account(), market(), ms_of(2025, 3, 3, 9, 20))) == ("session", "auction")


def test_session_from_market_view_and_unknown() -> None:
    m = market()
    m.sessions = {"SHFE.rb2510": "FUT_DAY"}     # override: no night session
    e = engine(only("session"))
    assert not e.check(order(), account(), m, ms_of(2025, 3, 3, 21, 30)).ok
    from qaaccount.instruments import future
    from qaaccount.instruments import Instruments
    zz = future("zz2501", "SHFE", multiplier=1, price_tick=1, margin_rate=0.1)
    m2 = MarketSnapshot(instruments=Instruments([zz]))
    assert rej(e.check(order("zz2501"), account(), m2, T0)) == ("session", "unknown_session")


# ------------------------------------------------------------------------ state
def test_halted_rejects_everything() -> None:
    e = engine(only("state"))
    acc = account(0, position(RB, lh=5))
    e.halt("acc", "manual")
    assert rej(e.check(order(), acc, market(), T0)) == ("state", "halted")
    assert rej(e.check(order(direction="SELL", offset="CLOSE"), acc, market(), T0)) == ("state", "halted")
    e.resume("acc")
    assert e.check(order(), acc, market(), T0).ok


def test_reduce_only_after_force_close() -> None:
    e = engine(only("state"))
    acc = account(0, position(RB, lt=2, lh=3))
    e.force_close("acc", "margin call")
    d = e.check(order(), acc, market(), T0)
    assert rej(d) == ("state", "reduce_only") and "margin call" in d.rejection.reason
    assert e.check(order(direction="SELL", offset="CLOSE", volume=5), acc, market(), T0).ok
    assert rej(e.check(order(direction="SELL", offset="CLOSE", volume=6), acc, market(), T0)) == (
        "state", "reduce_only")
    assert rej(e.check(order(direction="BUY", offset="CLOSE", volume=1), acc, market(), T0)) == (
        "state", "reduce_only")                  # no short to reduce
    e.release("acc")
    assert e.check(order(), acc, market(), T0).ok


def test_orders_built_with_plain_strings_are_judged_like_enum_orders() -> None:
    cfg = RiskConfig.from_dict({"session": {"enabled": False}, "exposure": {"max_position_lots": 5}})
    acc = account(1e9, position(RB, lh=2, sh=1))
    m = market()
    for kw in [dict(direction="SELL", offset="CLOSE", volume=2), dict(direction="SELL", offset="CLOSE", volume=3),
               dict(direction="BUY", offset="CLOSE", volume=1), dict(direction="BUY", offset="CLOSE", volume=2),
               dict(direction="SELL", offset="OPEN", volume=4), dict(direction="SELL", offset="OPEN", volume=5),
               dict(direction="BUY", offset="CLOSETODAY", volume=1)]:
        a = engine(cfg).check(raw_order(**kw), acc, m, T0)
        b = engine(cfg).check(order(**kw), acc, m, T0)   # type: ignore[arg-type]
        assert (a.ok, a.rejection and a.rejection.check) == (b.ok, b.rejection and b.rejection.check), kw
