from __future__ import annotations

import pytest

from qapubsub.messages import DecodeError, decode, encode
from qamarket.models import Bar, InstrumentRegistry, InstrumentSpec, Tick, TickBatch, UnknownInstrument, product_of, spec_for
from qamarket.sessions import from_ms, ms_of, to_ms

from .helpers import MON, at, tick


def test_tick_round_trip_and_wire_shape() -> None:
    t = tick(at(MON, 9, 0, 0, 500), 3500.0, 10, bid_price_1=3499.0, trading_day="20250303")
    data = encode(t)
    assert b'"schema":"qa.tick"' in data and b'"datetime":1740992400500' in data
    back = decode(data, Tick)
    assert back == t
    assert back.dt.isoformat() == "2025-03-03T09:00:00.500000"
    assert back.vt_symbol == "rb2510.SHFE"


def test_exchange_is_validated_on_decode() -> None:
    bad = encode(tick(at(MON, 9, 0))).replace(b'"SHFE"', b'"NYSE"')
    with pytest.raises(DecodeError):
        decode(bad, Tick)


def test_integer_volume_decodes_into_float() -> None:
    data = encode(tick(at(MON, 9, 0), volume=12)).replace(b'"volume":12.0', b'"volume":12')
    assert decode(data, Tick).volume == 12.0


def test_batch_and_bar_round_trip() -> None:
    b = TickBatch(symbol="rb2510", exchange="SHFE", ticks=[tick(at(MON, 9, 0, s)) for s in range(3)])
    assert decode(encode(b), TickBatch) == b
    bar = Bar(symbol="rb2510", exchange="SHFE", freq="5min", datetime=at(MON, 9, 0), trading_day="20250303",
              open=1, high=2, low=0.5, close=1.5, volume=10, final=False)
    assert decode(encode(bar), Bar) == bar
    assert decode(encode(bar), Tick | Bar | TickBatch) == bar
    with pytest.raises(DecodeError):
        decode(encode(bar).replace(b'"5min"', b'"7min"'), Bar)


def test_local_ms_helpers() -> None:
    import datetime as dt

    ms = ms_of(2025, 3, 3, 21, 0, 0, 500)
    assert from_ms(ms) == dt.datetime(2025, 3, 3, 21, 0, 0, 500000)
    aware = dt.datetime(2025, 3, 3, 13, 0, 0, 500000, tzinfo=dt.timezone.utc)
    assert to_ms(aware) == ms


@pytest.mark.parametrize(
    "symbol,root", [("rb2512", "rb"), ("SR601", "SR"), ("IF2512", "IF"), ("i2509", "i"), ("600000", "STOCK")]
)
def test_product_of(symbol: str, root: str) -> None:
    assert product_of(symbol) == root


def test_registry() -> None:
    rb = spec_for("rb2512", "SHFE")
    assert (rb.product, rb.price_tick, rb.multiplier, rb.session) == ("rb", 1.0, 10.0, "FUT_NIGHT_2300")
    assert spec_for("SR601").exchange == "CZCE"
    assert spec_for("au2512").session == "FUT_NIGHT_0230"
    assert spec_for("cu2512").session == "FUT_NIGHT_0100"
    assert spec_for("IF2512").session == "CFFEX_INDEX"
    assert spec_for("T2512").session == "CFFEX_BOND"
    assert spec_for("RB2512").product == "rb"  # vendors that upper-case everything
    st = spec_for("600000", "SSE")
    assert (st.lot_size, st.price_tick, st.session) == (100, 0.01, "STOCK")
    assert spec_for("430047", "BSE").lot_size == 100
    for p in ("rb", "hc", "cu", "al", "zn", "au", "ag", "sc", "fu", "i", "j", "jm", "m", "y", "p", "c",
              "MA", "TA", "SR", "CF", "IF", "IH", "IC", "IM", "T"):
        assert spec_for(p + "2601").product == p
    with pytest.raises(UnknownInstrument):
        spec_for("zz2512")
    with pytest.raises(UnknownInstrument):
        spec_for("rb2512", "DCE")
    reg = InstrumentRegistry([])
    reg.register(InstrumentSpec(product="xx", exchange="GFEX", price_tick=1))
    assert reg.get("xx2601").exchange == "GFEX"


def test_tick_decoder_falls_back_for_unset_prices_and_reports_invalid_bodies() -> None:
    import sys

    from qamarket.models import CheckedTick, TickDecoder

    dec = TickDecoder(plain_for=2)
    plain = encode(tick(at(MON, 9, 0), 3500.0, 1))
    unset = encode(tick(at(MON, 9, 0), 3500.0, 1, limit_down=sys.float_info.max))
    assert type(dec.decode(plain)) is CheckedTick
    assert dec.decode(unset).limit_down == sys.float_info.max  # decoded as sent: the cleaner normalises it
    # the next plain_for bodies skip the checked decoder (a feed that leaves prices unset decodes once)
    assert [type(dec.decode(plain)) for _ in range(3)] == [Tick, Tick, CheckedTick]
    with pytest.raises(DecodeError, match="missing required field `last_price`"):
        decode(b'{"schema":"qa.tick","symbol":"rb2510","exchange":"SHFE","datetime":1}', dec)
    with pytest.raises(DecodeError, match="not valid JSON"):
        dec.decode(b"{nope")
    assert type(dec.decode(plain)) is CheckedTick  # an invalid body does not switch to plain decoding
