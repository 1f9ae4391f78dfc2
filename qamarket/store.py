"""MongoDB storage of market data: bucketed, idempotent ticks and upserted closed bars.

Used by the tickhandler (sync pymongo inside a pika consumer loop) and by the
barhandler / web (reads; :class:`AsyncBarStore` for motor).

Tick layout (collection ``ticks``): one *chunk* document per instrument per write call
-------------------------------------------------------------------------------------
::

    {_id: "SHFE.rb2512.1740992400500.1234.0",   # EXCHANGE.symbol.<key of the first tick>
     ex: "SHFE", sym: "rb2512", ins: "SHFE.rb2512",
     td: "20250303", src: "ctp",                 # uniform inside a chunk (a change splits it)
     n: 100, f: 1,                               # tick count, row format version
     t0: 1740992400500, v0: 1234.0, s0: 0,       # key (datetime ms, cumulative volume, seq) of the first tick
     t1: 1740992449500, v1: 1901.0, s1: 0,       # ... and of the last tick
     c: "zstd",                                  # payload codec ("zlib" when absent: older chunks)
     z: Binary(zstd(msgpack([[row], ...])))}     # rows in ROW_FIELDS order

Why a compressed binary and not BSON arrays: on nx-27017 the cost of a write is per
*value* and per byte, not per document (it re-encodes each BSON value to JSON in
Python): 100 ticks as columnar or row BSON arrays stored only ~14k ticks/s, no better
than one document per tick, while the same 100 ticks as compressed msgpack (~40-50 B/tick) store
at several hundred thousand ticks/s. The codec is zstd level 1 (the ``zstandard`` package):
on 1,000-tick chunks it compressed 3.2x faster than zlib level 1 (0.74 against 2.37 µs per
tick) into 33 % fewer bytes (47 against 70 B/tick); in the batched tickhandler the zlib call
was the largest single cost of the writer thread. Chunks written before (no ``c``) are zlib
and stay readable. Real MongoDB's own time-series collections also
keep buckets as compressed binary columns. Measured figures: ``benchmarks/bench_store.py``.

Idempotency: a tick's *key* is ``(datetime, volume, seq)`` (ms, cumulative volume,
per-source sequence). Per instrument the store keeps a monotone high-water mark, the
key of the last stored tick, loaded from the collection (:meth:`TickStore.load_watermarks`,
or lazily per instrument). A write keeps only ticks whose key is above the running mark,
in arrival order, so the set of stored ticks does not depend on how a feed is cut into
batches, and a replayed or redelivered batch stores nothing twice. The chunk ``_id`` is
the key of its first tick: writing the same chunk twice (a retry after a lost reply, two
writers) fails with 11000, which is taken as "already stored" after re-reading that
chunk's end key; any ticks past it are written as a new chunk. The watermark only
advances after the server acknowledged the chunk, and any other error forgets the marks
of the instruments involved (they are re-read on the next write), so a crash between the
write and the ack loses nothing and a redelivery duplicates nothing.

Consequence (documented limit): two ticks with the same ``datetime`` *and* the same
cumulative ``volume`` and ``seq`` are the same tick; a feed that sends two distinct
snapshots in one millisecond without a trade (CZCE's whole-second stamps) must give them
distinct ``seq`` or distinct milliseconds (the cleaner's job), or the second is dropped.
A tick older than the mark (late, out of order) is dropped and counted in ``skipped``.

A chunk never spans more than :data:`MAX_CHUNK_SPAN_MS` of time, so a range read asks
for ``t0`` in ``[start - MAX_CHUNK_SPAN_MS, end]`` (bounded by the index) and ``t1 >= start``.
"""
from __future__ import annotations

import logging
import operator
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby, islice
from typing import Any

import msgspec
import zstandard
from bson import Binary
from pymongo import ASCENDING, DESCENDING, IndexModel, ReplaceOne
from pymongo.errors import BulkWriteError, PyMongoError

from .models import Bar, Tick
from .sessions import to_ms

__all__ = [
    "ROW_FIELDS", "FORMAT", "MAX_CHUNK_SPAN_MS", "MAX_CHUNK_TICKS", "TickKey", "StoreError", "WriteResult",
    "tick_key", "filter_new", "group_by_instrument", "split_chunks", "chunk_id", "encode_chunk",
    "decode_chunk", "chunk_end_key", "TickStore", "BarStore", "AsyncBarStore", "bar_id", "bar_to_doc",
    "doc_to_bar", "ensure_indexes",
]

log = logging.getLogger(__name__)

#: Row layout, format 1: every per-tick field of :class:`Tick` except the chunk-level ones
#: (symbol, exchange, trading_day, source) and the message envelope (version, id, ts, which a
#: read-back Tick gets afresh). Never reorder: add a new format instead.
ROW_FIELDS: tuple[str, ...] = (
    "datetime", "last_price", "volume", "turnover", "open_interest", "last_volume",
    "open_price", "high_price", "low_price", "pre_close", "pre_settlement", "limit_up", "limit_down",
    "bid_price_1", "bid_price_2", "bid_price_3", "bid_price_4", "bid_price_5",
    "bid_volume_1", "bid_volume_2", "bid_volume_3", "bid_volume_4", "bid_volume_5",
    "ask_price_1", "ask_price_2", "ask_price_3", "ask_price_4", "ask_price_5",
    "ask_volume_1", "ask_volume_2", "ask_volume_3", "ask_volume_4", "ask_volume_5",
    "seq",
)
CHUNK_FIELDS: tuple[str, ...] = ("symbol", "exchange", "trading_day", "source")
ENVELOPE_FIELDS: tuple[str, ...] = ("version", "id", "ts")
FORMAT = 1
MAX_CHUNK_SPAN_MS = 600_000  # 10 min; readers rely on it, never raise it without migrating
MAX_CHUNK_TICKS = 2_000  # ~80 kB compressed, far below the 16 MB document limit
CODEC = "zstd"  # of new chunks; "zlib" (level 1) is what a chunk without "c" holds
ZSTD_LEVEL = 1

TickKey = tuple[int, float, int]  # (datetime ms, cumulative volume, seq)

_row_of = operator.attrgetter(*ROW_FIELDS)
_key_of = operator.attrgetter("datetime", "volume", "seq")
_dt_of = operator.attrgetter("datetime")
_day_of = operator.attrgetter("trading_day")
_src_of = operator.attrgetter("source")
_inst_of = operator.attrgetter("exchange", "symbol")
_lt = operator.lt
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
_zstd = threading.local()   # zstandard's (de)compressors must not be shared between threads


def _compress(data: bytes) -> bytes:
    c = getattr(_zstd, "c", None)
    if c is None:
        c = _zstd.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c.compress(data)  # type: ignore[no-any-return]


def _decompress(doc: Mapping[str, Any]) -> bytes:
    codec = doc.get("c", "zlib")
    if codec == "zstd":
        d = getattr(_zstd, "d", None)
        if d is None:
            d = _zstd.d = zstandard.ZstdDecompressor()
        return d.decompress(doc["z"])  # type: ignore[no-any-return]
    if codec == "zlib":
        return zlib.decompress(doc["z"])
    raise StoreError(f"chunk {doc.get('_id')!r} has payload codec {codec!r}; this code reads zstd and zlib")


class StoreError(RuntimeError):
    """A write failed for a reason other than "already stored"; nothing was acknowledged for it."""


# ------------------------------------------------------------------------------------------ pure helpers
def tick_key(t: Tick) -> TickKey:
    return (t.datetime, t.volume, t.seq)


def group_by_instrument(ticks: Iterable[Tick]) -> dict[tuple[str, str], list[Tick]]:
    """``{(exchange, symbol): [ticks in arrival order]}``, instruments in order of first appearance."""
    out: dict[tuple[str, str], list[Tick]] = {}
    # Ticks come in runs of one instrument (a TickBatch, a consumer batch): take them run by run.
    for k, run in groupby(ticks, _inst_of):
        lst = out.get(k)
        if lst is None:
            out[k] = list(run)
        else:
            lst.extend(run)
    return out


def filter_new(ticks: Sequence[Tick], mark: TickKey | None) -> tuple[list[Tick], TickKey | None]:
    """Ticks whose key is above the running high-water mark, in order, and the new mark.

    A running-max filter: the result for a feed does not depend on how it is cut into
    batches (``filter_new(a+b, m) == filter_new(a, m) + filter_new(b, mark_after_a)``).
    """
    if ticks:
        # Fast paths (the common case: a clean feed, keys strictly increasing and above the mark),
        # checked in C: strictly increasing times (one int a tick: time is the key's first part),
        # else strictly increasing keys (several ticks in one ms); the running filter below otherwise.
        dts = list(map(_dt_of, ticks))
        if (mark is None or _key_of(ticks[0]) > mark) and all(map(_lt, dts, islice(dts, 1, None))):
            return list(ticks), _key_of(ticks[-1])
        keys = list(map(_key_of, ticks))
        if (mark is None or keys[0] > mark) and all(map(_lt, keys, islice(keys, 1, None))):
            return list(ticks), keys[-1]
    out: list[Tick] = []
    for t in ticks:
        k = (t.datetime, t.volume, t.seq)
        if mark is None or k > mark:
            out.append(t)
            mark = k
    return out, mark


def split_chunks(ticks: Sequence[Tick], max_ticks: int = MAX_CHUNK_TICKS,
                 max_span_ms: int = MAX_CHUNK_SPAN_MS) -> list[list[Tick]]:
    """Cut one instrument's ordered ticks into chunks: at most ``max_ticks`` ticks, at most
    ``max_span_ms`` from first to last, one ``trading_day`` and one ``source`` per chunk."""
    if max_span_ms > MAX_CHUNK_SPAN_MS:
        raise ValueError(f"max_span_ms={max_span_ms} exceeds MAX_CHUNK_SPAN_MS={MAX_CHUNK_SPAN_MS}, which readers rely on")
    if not ticks:
        return []
    # Fast path: everything fits one chunk (checked in C; the loop below cuts otherwise).
    a = ticks[0]
    n = len(ticks)
    if (n <= max_ticks and max(map(_dt_of, ticks)) - a.datetime <= max_span_ms
            and list(map(_day_of, ticks)).count(a.trading_day) == n and list(map(_src_of, ticks)).count(a.source) == n):
        return [list(ticks)]
    chunks: list[list[Tick]] = []
    cur: list[Tick] = []
    t0 = 0
    td = src = ""
    for t in ticks:
        if cur and (len(cur) >= max_ticks or t.datetime - t0 > max_span_ms or t.trading_day != td or t.source != src):
            chunks.append(cur)
            cur = []
        if not cur:
            t0, td, src = t.datetime, t.trading_day, t.source
        cur.append(t)
    if cur:
        chunks.append(cur)
    return chunks


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def chunk_id(exchange: str, symbol: str, first: TickKey) -> str:
    """Deterministic chunk ``_id`` from the key of its first tick: ``"SHFE.rb2512.<ms>.<volume>.<seq>"``.

    The volume and seq are part of it because two chunks may start in the same millisecond
    (several ticks per ms, or one-tick chunks); with the ms alone the second would look
    "already stored" and be lost.
    """
    return f"{exchange}.{symbol}.{first[0]}.{_num(first[1])}.{first[2]}"


def encode_chunk(ticks: Sequence[Tick]) -> dict[str, Any]:
    """The chunk document of ticks of one instrument (same trading_day and source), in key order."""
    a, b = ticks[0], ticks[-1]
    payload = _compress(_enc.encode([_row_of(t) for t in ticks]))
    return {
        "_id": chunk_id(a.exchange, a.symbol, (a.datetime, a.volume, a.seq)),
        "ex": a.exchange, "sym": a.symbol, "ins": f"{a.exchange}.{a.symbol}",
        "td": a.trading_day, "src": a.source, "n": len(ticks), "f": FORMAT,
        "t0": a.datetime, "v0": float(a.volume), "s0": a.seq,
        "t1": b.datetime, "v1": float(b.volume), "s1": b.seq,
        "c": CODEC, "z": Binary(payload),
    }


def chunk_end_key(doc: Mapping[str, Any]) -> TickKey:
    return (int(doc["t1"]), float(doc["v1"]), int(doc["s1"]))


def chunk_start_key(doc: Mapping[str, Any]) -> TickKey:
    return (int(doc["t0"]), float(doc["v0"]), int(doc["s0"]))


def decode_rows(doc: Mapping[str, Any]) -> list[list[Any]]:
    """The raw rows (``ROW_FIELDS`` order) of a chunk document."""
    if doc.get("f", FORMAT) != FORMAT:
        raise StoreError(f"chunk {doc.get('_id')!r} has row format {doc.get('f')!r}; this code reads format {FORMAT}")
    return _dec.decode(_decompress(doc))  # type: ignore[no-any-return]


def decode_chunk(doc: Mapping[str, Any]) -> list[Tick]:
    """The Tick objects of a chunk document, in stored order."""
    rows = decode_rows(doc)
    common = {"symbol": doc["sym"], "exchange": doc["ex"], "trading_day": doc.get("td", ""), "source": doc.get("src", "")}
    f = ROW_FIELDS
    return [Tick(**common, **dict(zip(f, r))) for r in rows]


# ------------------------------------------------------------------------------------------ indexes
def ensure_indexes(coll: Any, models: Sequence[IndexModel]) -> None:
    """Create indexes by *key*, not by name: nx-27017 ignores requested names (it makes its own),
    and a real MongoDB refuses the same key under a second name. So an index whose key already
    exists under any name is left alone, and nothing here ever refers to an index by name."""
    have = {tuple((k, int(d)) for k, d in spec["key"]) for spec in coll.index_information().values()}
    todo = [m for m in models if tuple((k, int(d)) for k, d in m.document["key"].items()) not in have]
    if todo:
        coll.create_indexes(todo)


TICK_INDEXES = [
    # range reads and per-instrument last chunk; t1 in the key lets MongoDB filter t1 >= start on the index
    IndexModel([("ex", ASCENDING), ("sym", ASCENDING), ("t0", ASCENDING), ("t1", ASCENDING)], name="qaflow_ticks_by_instrument_time"),
    # load_watermarks(since=...): only the recent chunks
    IndexModel([("t1", ASCENDING)], name="qaflow_ticks_by_end"),
]


# ------------------------------------------------------------------------------------------ TickStore
@dataclass
class WriteResult:
    """Outcome of one :meth:`TickStore.write`. ``new`` are the ticks persisted by this call, in order
    per instrument: feed them (and only them) to the aggregator."""

    stored: int = 0
    skipped: int = 0  # at or below the mark: replayed, redelivered, duplicate or late
    chunks: int = 0
    already_stored: int = 0  # chunks found present (11000) and re-checked
    new: list[Tick] = field(default_factory=list)


_HEAD = {"z": 0}  # projection: chunk header only


class TickStore:
    """Sync (pymongo) tick store. One writer per instrument (the tick queue is sharded by key).

    ``db`` is a ``pymongo.database.Database``. No I/O in the constructor except index creation
    (``create_indexes=False`` to skip it).
    """

    def __init__(self, db: Any, collection: str = "ticks", *, max_chunk_ticks: int = MAX_CHUNK_TICKS,
                 max_span_ms: int = MAX_CHUNK_SPAN_MS, create_indexes: bool = True) -> None:
        if max_span_ms > MAX_CHUNK_SPAN_MS:
            raise ValueError(f"max_span_ms must be <= {MAX_CHUNK_SPAN_MS}")
        self.coll = db[collection]
        self.max_chunk_ticks = max_chunk_ticks
        self.max_span_ms = max_span_ms
        self._marks: dict[tuple[str, str], TickKey | None] = {}
        self._complete = False  # True after a full load_watermarks(): unknown instrument = nothing stored
        if create_indexes:
            ensure_indexes(self.coll, TICK_INDEXES)

    # ---- watermarks
    def load_watermarks(self, since: int | Any = None) -> dict[tuple[str, str], TickKey]:
        """Load, for each instrument, the key of its last stored tick. With ``since`` (ms or
        datetime), only chunks ending at or after it are read (cheap on a large collection);
        instruments not seen then are looked up on their first write."""
        pipeline: list[dict[str, Any]] = []
        if since is not None:
            pipeline.append({"$match": {"t1": {"$gte": to_ms(since)}}})
        pipeline += [
            {"$sort": {"t1": -1, "v1": -1, "s1": -1}},
            {"$group": {"_id": "$ins", "ex": {"$first": "$ex"}, "sym": {"$first": "$sym"},
                        "t1": {"$first": "$t1"}, "v1": {"$first": "$v1"}, "s1": {"$first": "$s1"}}},
        ]
        marks: dict[tuple[str, str], TickKey] = {}
        for d in self.coll.aggregate(pipeline, allowDiskUse=True):
            marks[(d["ex"], d["sym"])] = chunk_end_key(d)
        self._marks = dict(marks)
        self._complete = since is None
        return marks

    def watermark(self, exchange: str, symbol: str) -> TickKey | None:
        """The key of the last stored tick of an instrument (looked up if not known yet)."""
        inst = (exchange, symbol)
        if inst not in self._marks:
            self._marks[inst] = None if self._complete else self._lookup_mark(exchange, symbol)
        return self._marks[inst]

    def _last_chunks(self, exchange: str, symbol: str, projection: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """The chunk(s) with the greatest t0 of an instrument (two index-bounded queries on MongoDB)."""
        top = self.coll.find_one({"ex": exchange, "sym": symbol}, {"t0": 1}, sort=[("t0", DESCENDING)])
        if top is None:
            return []
        return list(self.coll.find({"ex": exchange, "sym": symbol, "t0": top["t0"]}, projection))

    def _lookup_mark(self, exchange: str, symbol: str) -> TickKey | None:
        docs = self._last_chunks(exchange, symbol, _HEAD)
        return max((chunk_end_key(d) for d in docs), default=None)

    def forget(self, exchange: str | None = None, symbol: str | None = None) -> None:
        """Drop cached marks (all, or one instrument's): they are re-read from the collection on next use."""
        if exchange is None:
            self._marks.clear()
        else:
            self._marks.pop((exchange, symbol or ""), None)
        self._complete = False

    # ---- write
    def write(self, ticks: Iterable[Tick]) -> WriteResult:
        """Persist one consumer batch; return what was new. Safe to call again with the same or an
        overlapping batch. Raises :class:`StoreError` or a ``PyMongoError`` if anything could not
        be written; then do not ack the batch (its redelivery is safe)."""
        res = WriteResult()
        pending: list[tuple[tuple[str, str], dict[str, Any], list[Tick]]] = []
        for inst, lst in group_by_instrument(ticks).items():
            new, _ = filter_new(lst, self.watermark(*inst))
            res.skipped += len(lst) - len(new)
            for ch in split_chunks(new, self.max_chunk_ticks, self.max_span_ms):
                pending.append((inst, encode_chunk(ch), ch))
        for _round in range(4):
            if not pending:
                break
            pending = self._insert(pending, res)
        if pending:
            for inst, _, _ in pending:
                self.forget(*inst)
            raise StoreError(f"{len(pending)} chunk(s) still conflicting after re-checks: {[d['_id'] for _, d, _ in pending][:5]}")
        return res

    def write_late(self, ticks: Iterable[Tick]) -> WriteResult:
        """Persist *redelivered* ticks at or below the watermark that are not stored yet.

        When a consumer of a shard stops or dies, RabbitMQ requeues what it had received but
        not acknowledged, and the next consumer may already have stored newer ticks of the same
        instruments: those requeued ticks arrive late. :meth:`write` would skip them as replays;
        this looks each one up in the chunks covering its time and stores the missing ones in
        chunks of their own (reads merge overlapping chunks back into order). Slower than
        :meth:`write`: use it only for redeliveries.
        """
        res = WriteResult()
        pending: list[tuple[tuple[str, str], dict[str, Any], list[Tick]]] = []
        for (ex, sym), lst in group_by_instrument(ticks).items():
            lo, hi = min(t.datetime for t in lst), max(t.datetime for t in lst)
            have = {tick_key(t) for doc in self.chunks(ex, sym, lo, hi) for t in decode_chunk(doc)}
            missing: dict[TickKey, Tick] = {}
            for t in lst:
                k = tick_key(t)
                if k not in have:
                    missing.setdefault(k, t)
            res.skipped += len(lst) - len(missing)
            todo = [missing[k] for k in sorted(missing)]
            for ch in split_chunks(todo, self.max_chunk_ticks, self.max_span_ms):
                pending.append(((ex, sym), encode_chunk(ch), ch))
        if pending:
            try:
                self.coll.insert_many([d for _, d, _ in pending], ordered=False)
                failed: set[int] = set()
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(e.get("code") != 11000 for e in errors) or exc.details.get("writeConcernErrors"):
                    raise StoreError(f"late ticks not written: {errors[:1]}") from exc
                failed = {e["index"] for e in errors}  # 11000: a concurrent redelivery stored the same chunk
            for i, (_inst, _doc, ch) in enumerate(pending):
                if i in failed:
                    res.already_stored += 1
                    continue
                res.stored += len(ch)
                res.chunks += 1
                res.new.extend(ch)
        return res

    def _insert(self, pending: list[tuple[tuple[str, str], dict[str, Any], list[Tick]]],
                res: WriteResult) -> list[tuple[tuple[str, str], dict[str, Any], list[Tick]]]:
        failed: dict[int, dict[str, Any]] = {}
        try:
            self.coll.insert_many([d for _, d, _ in pending], ordered=False)
        except BulkWriteError as exc:
            failed = {e["index"]: e for e in exc.details.get("writeErrors", [])}
            if exc.details.get("writeConcernErrors"):
                for inst, _, _ in pending:
                    self.forget(*inst)
                raise StoreError(f"write concern error: {exc.details['writeConcernErrors'][:1]}") from exc
        except PyMongoError:
            for inst, _, _ in pending:  # unknown which chunks landed: re-read the marks next time
                self.forget(*inst)
            raise
        retry: list[tuple[tuple[str, str], dict[str, Any], list[Tick]]] = []
        other: list[str] = []
        broken: set[tuple[str, str]] = set()
        for i, (inst, doc, ch) in enumerate(pending):
            err = failed.get(i)
            if inst in broken:
                continue
            if err is None:
                self._advance(inst, chunk_end_key(doc))
                res.stored += len(ch)
                res.chunks += 1
                res.new.extend(ch)
            elif err.get("code") == 11000:
                res.already_stored += 1
                have = self.coll.find_one({"_id": doc["_id"]}, _HEAD)
                if have is None:  # vanished since: just try again
                    retry.append((inst, doc, ch))
                    continue
                end = chunk_end_key(have)
                self._advance(inst, end)
                rest = [t for t in ch if (t.datetime, t.volume, t.seq) > end]
                res.skipped += len(ch) - len(rest)
                retry.extend((inst, encode_chunk(c), c) for c in split_chunks(rest, self.max_chunk_ticks, self.max_span_ms))
            else:
                broken.add(inst)
                other.append(f"{doc['_id']}: {err.get('code')} {err.get('errmsg')}")
        for inst in broken:
            self.forget(*inst)
        if other:
            raise StoreError(f"{len(other)} chunk(s) not written: {other[:3]}")
        return retry

    def _advance(self, inst: tuple[str, str], key: TickKey) -> None:
        cur = self._marks.get(inst)
        if cur is None or key > cur:
            self._marks[inst] = key

    # ---- reads
    def _range_query(self, exchange: str, symbol: str, start: int | None, end: int | None) -> dict[str, Any]:
        q: dict[str, Any] = {"ex": exchange, "sym": symbol}
        t0: dict[str, int] = {}
        if start is not None:
            t0["$gte"] = start - MAX_CHUNK_SPAN_MS
            q["t1"] = {"$gte": start}
        if end is not None:
            t0["$lte"] = end
        if t0:
            q["t0"] = t0
        return q

    def chunks(self, exchange: str, symbol: str, start: int | Any = None, end: int | Any = None) -> list[dict[str, Any]]:
        """The chunk documents overlapping ``[start, end]``, in key order."""
        s = None if start is None else to_ms(start)
        e = None if end is None else to_ms(end)
        docs = list(self.coll.find(self._range_query(exchange, symbol, s, e)).sort("t0", ASCENDING))
        docs.sort(key=chunk_start_key)
        return docs

    def ticks(self, exchange: str, symbol: str, start: int | Any = None, end: int | Any = None) -> list[Tick]:
        """Stored ticks with ``start <= datetime <= end`` (ms or datetime; None = open), in order."""
        s = None if start is None else to_ms(start)
        e = None if end is None else to_ms(end)
        out: list[Tick] = []
        for doc in self.chunks(exchange, symbol, s, e):
            ts = decode_chunk(doc)
            if (s is None or doc["t0"] >= s) and (e is None or doc["t1"] <= e):
                out.extend(ts)
            else:
                out.extend(t for t in ts if (s is None or t.datetime >= s) and (e is None or t.datetime <= e))
        # Chunks of late ticks (write_late) overlap others: merge back into key order (nearly sorted: cheap).
        if any(tick_key(a) > tick_key(b) for a, b in zip(out, out[1:])):
            out.sort(key=tick_key)
        return out

    def iter_ticks(self, exchange: str, symbol: str, start: int | Any = None, end: int | Any = None) -> Iterator[Tick]:
        yield from self.ticks(exchange, symbol, start, end)

    def last_tick(self, exchange: str, symbol: str) -> Tick | None:
        docs = self._last_chunks(exchange, symbol, None)
        if not docs:
            return None
        return decode_chunk(max(docs, key=chunk_end_key))[-1]

    def instruments(self) -> list[tuple[str, str]]:
        return sorted((d["ex"], d["sym"]) for d in self.coll.aggregate(
            [{"$group": {"_id": "$ins", "ex": {"$first": "$ex"}, "sym": {"$first": "$sym"}}}]))


# ------------------------------------------------------------------------------------------ bars
BAR_FIELDS: tuple[str, ...] = tuple(f for f in Bar.__struct_fields__ if f not in ENVELOPE_FIELDS)

BAR_INDEXES = [
    IndexModel([("exchange", ASCENDING), ("symbol", ASCENDING), ("freq", ASCENDING), ("datetime", ASCENDING)],
               name="qaflow_bars_by_instrument_time"),
]


def bar_id(freq: str, exchange: str, symbol: str, label_ms: int) -> str:
    return f"{freq}.{exchange}.{symbol}.{label_ms}"


def bar_to_doc(b: Bar) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": bar_id(b.freq, b.exchange, b.symbol, b.datetime)}
    for f in BAR_FIELDS:
        doc[f] = getattr(b, f)
    return doc


def doc_to_bar(doc: Mapping[str, Any]) -> Bar:
    kw = {f: doc[f] for f in BAR_FIELDS if f in doc}
    kw["final"] = bool(kw.get("final", True))  # nx-27017 may hand back a stored boolean as 1
    for f in ("datetime", "tick_count", "prev"):  # the driver may hand back bson.Int64, which msgspec cannot encode
        if kw.get(f) is not None:
            kw[f] = int(kw[f])
    return Bar(**kw)


def _bar_query(exchange: str, symbol: str, freq: str, start: Any, end: Any) -> dict[str, Any]:
    q: dict[str, Any] = {"exchange": exchange, "symbol": symbol, "freq": freq}
    rng: dict[str, int] = {}
    if start is not None:
        rng["$gte"] = to_ms(start)
    if end is not None:
        rng["$lte"] = to_ms(end)
    if rng:
        q["datetime"] = rng
    return q


def _bar_ops(bars: Iterable[Bar], include_partial: bool) -> list[ReplaceOne]:
    # The replacement carries the _id: nx-27017 does not take it from the filter on an upsert
    # (it inserts an ObjectId instead); MongoDB accepts an _id equal to the filter's.
    return [ReplaceOne({"_id": d["_id"]}, d, upsert=True)
            for d in (bar_to_doc(b) for b in bars if include_partial or b.final)]


class BarStore:
    """Sync (pymongo) store of bars; ``_id = "<freq>.<EXCHANGE>.<symbol>.<label ms>"`` (label = bar start)."""

    def __init__(self, db: Any, collection: str = "bars", *, create_indexes: bool = True) -> None:
        self.coll = db[collection]
        if create_indexes:
            ensure_indexes(self.coll, BAR_INDEXES)

    def write(self, bars: Iterable[Bar], *, include_partial: bool = False) -> int:
        """Upsert bars (only ``final`` ones unless ``include_partial``); a repeat changes nothing.
        Returns the number of bars sent."""
        ops = _bar_ops(bars, include_partial)
        if ops:
            self.coll.bulk_write(ops, ordered=False)
        return len(ops)

    def bars(self, exchange: str, symbol: str, freq: str, start: Any = None, end: Any = None,
             count: int | None = None) -> list[Bar]:
        """Bars with ``start <= label <= end``, oldest first; with ``count`` the newest ``count`` of them."""
        q = _bar_query(exchange, symbol, freq, start, end)
        if count is not None:
            docs = list(self.coll.find(q).sort("datetime", DESCENDING).limit(count))
            docs.reverse()
        else:
            docs = list(self.coll.find(q).sort("datetime", ASCENDING))
        return [doc_to_bar(d) for d in docs]

    def last_bar(self, exchange: str, symbol: str, freq: str) -> Bar | None:
        got = self.bars(exchange, symbol, freq, count=1)
        return got[0] if got else None


class AsyncBarStore:
    """The same as :class:`BarStore` over motor (``AsyncIOMotorDatabase``), for the barhandler / web."""

    def __init__(self, db: Any, collection: str = "bars") -> None:
        self.coll = db[collection]

    async def create_indexes(self) -> None:
        info = await self.coll.index_information()
        have = {tuple((k, int(d)) for k, d in spec["key"]) for spec in info.values()}
        todo = [m for m in BAR_INDEXES if tuple((k, int(d)) for k, d in m.document["key"].items()) not in have]
        if todo:
            await self.coll.create_indexes(todo)

    async def write(self, bars: Iterable[Bar], *, include_partial: bool = False) -> int:
        ops = _bar_ops(bars, include_partial)
        if ops:
            await self.coll.bulk_write(ops, ordered=False)
        return len(ops)

    async def bars(self, exchange: str, symbol: str, freq: str, start: Any = None, end: Any = None,
                   count: int | None = None) -> list[Bar]:
        q = _bar_query(exchange, symbol, freq, start, end)
        if count is not None:
            docs = await self.coll.find(q).sort("datetime", DESCENDING).limit(count).to_list(None)
            docs.reverse()
        else:
            docs = await self.coll.find(q).sort("datetime", ASCENDING).to_list(None)
        return [doc_to_bar(d) for d in docs]

    async def last_bar(self, exchange: str, symbol: str, freq: str) -> Bar | None:
        got = await self.bars(exchange, symbol, freq, count=1)
        return got[0] if got else None
