"""Pure helpers of qamarket.store: watermark filter, chunking, ids, encoding (no I/O)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qamarket.models import Tick
from qamarket.store import (
    CHUNK_FIELDS, ENVELOPE_FIELDS, MAX_CHUNK_SPAN_MS, ROW_FIELDS, chunk_id, decode_chunk, encode_chunk, filter_new,
    group_by_instrument, split_chunks, tick_key,
)

T0 = 1_740_992_400_000


def mk(dt: int, vol: float, seq: int = 0, sym: str = "rb2512", td: str = "20250303", src: str = "ctp", **kw: float) -> Tick:
    return Tick(symbol=sym, exchange="SHFE", datetime=dt, last_price=kw.pop("p", 1.0), volume=vol, seq=seq,
                trading_day=td, source=src, **kw)


def test_row_fields_cover_every_tick_field() -> None:
    assert set(ROW_FIELDS) | set(CHUNK_FIELDS) | set(ENVELOPE_FIELDS) == set(Tick.__struct_fields__)
    assert len(set(ROW_FIELDS)) == len(ROW_FIELDS)


keys = st.tuples(st.integers(0, 30), st.integers(0, 5), st.integers(0, 2))


@given(st.lists(keys, max_size=60), st.lists(st.integers(1, 60), max_size=8))
def test_filter_is_independent_of_batch_boundaries(raw: list[tuple[int, int, int]], cuts: list[int]) -> None:
    ticks = [mk(T0 + a, float(b), c) for a, b, c in raw]
    whole, mark_whole = filter_new(ticks, None)
    got: list[Tick] = []
    mark = None
    i = 0
    for c in cuts + [len(ticks)]:
        part, mark = filter_new(ticks[i:i + c], mark)
        got += part
        i += c
    part, mark = filter_new(ticks[i:], mark)
    got += part
    assert got == whole and mark == mark_whole
    ks = [tick_key(t) for t in whole]
    assert ks == sorted(set(ks))  # strictly increasing: nothing twice
    assert filter_new(ticks, mark_whole)[0] == []  # a replay stores nothing


def test_filter_keeps_same_ms_ticks_with_new_volume_or_seq() -> None:
    a, b, c, d = mk(T0, 1.0), mk(T0, 2.0), mk(T0, 2.0, 5), mk(T0, 2.0, 5)
    assert filter_new([a, b, c, d], None)[0] == [a, b, c]
    assert filter_new([a, b], (T0, 1.0, 0))[0] == [b]


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 3_000_000), st.sampled_from(["20250303", "20250304"]),
                          st.sampled_from(["ctp", "sina"])), max_size=80), st.integers(1, 7))
def test_split_chunks_bounds(raw: list[tuple[int, str, str]], max_ticks: int) -> None:
    ticks = [mk(T0 + dt, float(i), td=td, src=src) for i, (dt, td, src) in enumerate(sorted(raw))]
    chunks = split_chunks(ticks, max_ticks, MAX_CHUNK_SPAN_MS)
    assert [t for c in chunks for t in c] == ticks
    for c in chunks:
        assert 1 <= len(c) <= max_ticks
        assert c[-1].datetime - c[0].datetime <= MAX_CHUNK_SPAN_MS
        assert len({(t.trading_day, t.source) for t in c}) == 1


def test_chunk_ids_distinct_for_same_ms_starts() -> None:
    assert chunk_id("SHFE", "rb2512", (T0, 10.0, 0)) == f"SHFE.rb2512.{T0}.10.0"
    assert chunk_id("SHFE", "rb2512", (T0, 10.0, 0)) != chunk_id("SHFE", "rb2512", (T0, 11.0, 0))
    assert chunk_id("SHFE", "rb2512", (T0, 10.5, 3)) == f"SHFE.rb2512.{T0}.10.5.3"


finite = st.floats(allow_nan=False, allow_infinity=True, width=64)


@given(st.lists(st.tuples(finite, finite, st.integers(0, 2**62)), min_size=1, max_size=30))
def test_encode_decode_round_trip(vals: list[tuple[float, float, int]]) -> None:
    ticks = [mk(T0 + i, float(i), seq, p=p, bid_price_5=b, ask_volume_3=1e308)
             for i, (p, b, seq) in enumerate(vals)]
    doc = encode_chunk(ticks)
    assert doc["_id"] == chunk_id("SHFE", "rb2512", tick_key(ticks[0]))
    assert (doc["t0"], doc["t1"], doc["n"], doc["ins"]) == (T0, T0 + len(ticks) - 1, len(ticks), "SHFE.rb2512")
    doc["z"] = bytes(doc["z"])  # what a server hands back
    back = decode_chunk(doc)
    fields = [f for f in Tick.__struct_fields__ if f not in ENVELOPE_FIELDS]
    assert [[getattr(t, f) for f in fields] for t in back] == [[getattr(t, f) for f in fields] for t in ticks]


def test_chunks_are_zstd_and_older_zlib_chunks_stay_readable() -> None:
    """Chunks written before session 3 hold zlib(msgpack(rows)) and no codec field."""
    import zlib

    import msgspec
    import pytest

    from qamarket.store import StoreError, _row_of

    ticks = [mk(T0 + i, float(i), p=3900.0 + i) for i in range(50)]
    doc = encode_chunk(ticks)
    assert doc["c"] == "zstd" and bytes(doc["z"])[:4] == b"\x28\xb5\x2f\xfd"   # the zstd frame magic
    old = {k: v for k, v in doc.items() if k != "c"}
    old["z"] = zlib.compress(msgspec.msgpack.encode([_row_of(t) for t in ticks]), 1)
    assert [t.last_price for t in decode_chunk(old)] == [t.last_price for t in ticks]
    with pytest.raises(StoreError, match="payload codec 'lz9'"):
        decode_chunk({**doc, "c": "lz9"})


def test_group_by_instrument_keeps_arrival_order() -> None:
    a, b, c = mk(T0, 1.0), mk(T0, 1.0, sym="hc2512"), mk(T0 + 1, 2.0)
    assert group_by_instrument([a, b, c]) == {("SHFE", "rb2512"): [a, c], ("SHFE", "hc2512"): [b]}


def test_quantaxis_start_label() -> None:
    from qamarket.models import spec_for
    from qamarket.quantaxis import start_of, stock_exchange_of
    from qamarket.sessions import ms_of

    rb = spec_for("rb2512", "SHFE")
    assert start_of(ms_of(2025, 3, 3, 21, 1), 1, rb) == ms_of(2025, 3, 3, 21, 0)
    assert start_of(ms_of(2025, 3, 4, 10, 45), 30, rb) == ms_of(2025, 3, 4, 10, 30)  # after the 10:15 break
    assert start_of(ms_of(2025, 3, 4, 9, 5), 5, None) == ms_of(2025, 3, 4, 9, 0)
    assert [stock_exchange_of(c) for c in ("600000", "000001", "300750", "830799")] == ["SSE", "SZSE", "SZSE", "BSE"]


def test_filter_with_increasing_times_still_compares_the_first_key_with_the_mark() -> None:
    a, b = mk(T0 + 5, 9.0), mk(T0 + 6, 1.0)
    assert filter_new([a, b], (T0 + 5, 10.0, 0)) == ([b], tick_key(b))  # a: same ms, lower volume than the mark
    c = mk(T0 + 5, 11.0)
    assert filter_new([c, b], (T0 + 5, 10.0, 0)) == ([c, b], tick_key(b))


def test_group_by_instrument_merges_interleaved_runs() -> None:
    r1, h1, r2, h2, r3 = (mk(T0 + i, float(i), sym=s) for i, s in enumerate(["rb2512", "hc2512", "rb2512", "hc2512", "rb2512"]))
    assert group_by_instrument([r1, h1, r2, h2, r3]) == {("SHFE", "rb2512"): [r1, r2, r3], ("SHFE", "hc2512"): [h1, h2]}
    assert list(group_by_instrument(iter([h1, r1]))) == [("SHFE", "hc2512"), ("SHFE", "rb2512")]
