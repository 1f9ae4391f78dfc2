from __future__ import annotations

import sys

from qamarket.cleaning import TickCleaner
from qamarket.models import spec_for
from qamarket.sessions import Calendar

from .helpers import MON, at, tick


def test_drop_reasons_are_counted() -> None:
    c = TickCleaner(spec_for("rb2510"), max_age_ms=5_000)
    now = at(MON, 9, 0, 10)
    assert c.check(tick(at(MON, 9, 0, 1), 0.0, 1), now) == "bad_price"
    assert c.check(tick(at(MON, 9, 0, 1), sys.float_info.max, 1), now) == "bad_price"
    assert c.check(tick(at(MON, 9, 0, 1), float("nan"), 1), now) == "bad_price"
    first = tick(at(MON, 9, 0, 6), 10, 1, high_price=sys.float_info.max)
    assert c.clean(first, now) is first
    assert first.high_price == 0.0  # unset DBL_MAX normalised
    assert c.check(tick(at(MON, 9, 0, 6), 10, 1), now) == "duplicate"
    assert c.check(tick(at(MON, 9, 0, 5), 10, 2), now) == "out_of_order"
    assert c.check(tick(at(MON, 9, 0, 6), 10, 0.5), now) == "out_of_order"
    assert c.check(tick(at(MON, 9, 0, 6), 10, 3), now) is None  # same time, new volume: kept
    assert c.check(tick(at(MON, 9, 0, 7), 10, 4), at(MON, 9, 0, 13)) == "stale"
    assert c.check(tick(at(MON, 12, 0, 0), 10, 5), at(MON, 12, 0, 0)) == "outside_session"
    assert c.check(tick(at((2025, 3, 8), 10, 0), 10, 5), at((2025, 3, 8), 10, 0)) == "outside_session"
    assert c.check(tick(at(MON, 13, 30, 0, 500), 10, 5), at(MON, 13, 30, 1)) is None
    assert c.clean(tick(at(MON, 13, 30, 0, 500), 0, 5)) == "bad_price"
    assert dict(c.dropped) == {"bad_price": 4, "duplicate": 1, "out_of_order": 2, "stale": 1, "outside_session": 2}
    assert c.kept == 3


def test_session_checks_per_exchange_and_clock() -> None:
    clock_now = [at(MON, 9, 30, 1)]
    c = TickCleaner(spec_for("IF2512"), max_age_ms=1_000, clock=lambda: clock_now[0])
    assert c.check(tick(at(MON, 9, 0, 0), 4000, 1, symbol="IF2512", exchange="CFFEX"), at(MON, 9, 0, 0)) == "outside_session"
    assert c.check(tick(at(MON, 9, 29, 0), 4000, 1, symbol="IF2512", exchange="CFFEX")) == "stale"
    assert c.check(tick(at(MON, 9, 30, 0, 500), 4000, 1, symbol="IF2512", exchange="CFFEX")) is None
    s = TickCleaner(spec_for("600000", "SSE"))
    assert s.check(tick(at(MON, 9, 20), 10, 1, symbol="600000", exchange="SSE")) is None  # opening auction
    assert s.check(tick(at(MON, 21, 0), 10, 2, symbol="600000", exchange="SSE")) == "outside_session"
    h = TickCleaner(spec_for("m2509"), calendar=Calendar(holidays=["20250303"]))
    assert h.check(tick(at(MON, 9, 30), 3000, 1, symbol="m2509", exchange="DCE")) == "outside_session"
    n = TickCleaner(spec_for("SR601"))
    assert n.check(tick(at(MON, 22, 59), 6000, 1, symbol="SR601", exchange="CZCE")) is None
    assert n.check(tick(at(MON, 23, 30), 6000, 2, symbol="SR601", exchange="CZCE")) == "outside_session"


def test_decoded_ticks_are_normalised_whichever_decoder_path_they_took() -> None:
    """TickDecoder: bodies without an unset price decode as CheckedTick (the cleaner skips the
    per-tick check); a body with one is decoded plainly and the cleaner normalises it."""
    from qamarket.models import CheckedTick, TickBatch, TickDecoder
    from qapubsub.messages import decode, encode

    dec = TickDecoder(plain_for=1)
    c = TickCleaner(spec_for("rb2510"))
    unset = sys.float_info.max
    bodies = [encode(tick(at(MON, 9, 0, 1), 10, 1, high_price=3600.0)),
              encode(tick(at(MON, 9, 0, 2), 10, 2, limit_up=unset, bid_price_4=unset)),
              encode(tick(at(MON, 9, 0, 3), 10, 3, ask_price_5=3700.0)),  # plain_for=1: still plain
              encode(TickBatch(symbol="rb2510", exchange="SHFE", ticks=[tick(at(MON, 9, 0, 4), 10, 4, pre_close=3400.0)]))]
    got = [decode(b, dec) for b in bodies]  # the consumers' entry point
    assert [type(m).__name__ for m in got] == ["CheckedTick", "Tick", "Tick", "CheckedTickBatch"]
    ticks = [*got[:3], *got[3].ticks]
    assert type(ticks[3]) is CheckedTick
    assert [c.check(t) for t in ticks] == [None] * 4
    assert (ticks[0].high_price, ticks[1].limit_up, ticks[1].bid_price_4, ticks[2].ask_price_5, ticks[3].pre_close) == (
        3600.0, 0.0, 0.0, 3700.0, 3400.0)
