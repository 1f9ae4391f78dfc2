"""Replay recorded ticks (CSV files, the MongoDB tick store, any iterable) onto ``qa.tick``.

Sources: :func:`read_csv` / :func:`read_csvs` (files), :func:`ticks_from_mongo` (the tick
store of :mod:`qamarket.store`, several instruments merged by time), or any iterable of
:class:`Tick` handed to :func:`replay`.

Also home of what every tick source shares: the pacing schedule (:class:`Pacer`) and
the publish loop (:func:`publish_ticks`) that stops cleanly on SIGTERM/SIGINT.

CSV format
----------
A header row, then one tick per row. Columns are :class:`qamarket.models.Tick` field
names; only ``symbol``, ``exchange``, ``datetime`` and ``last_price`` are required (the
first two may instead be given to :func:`read_csv` as defaults, as vn.py writes one file
per instrument), every other field defaults to 0 / empty. Unknown columns are ignored
(logged once). Our header, in full::

    symbol,exchange,datetime,trading_day,last_price,volume,turnover,open_interest,last_volume,
    open_price,high_price,low_price,pre_close,pre_settlement,limit_up,limit_down,
    bid_price_1..5,bid_volume_1..5,ask_price_1..5,ask_volume_1..5,source,seq

(:data:`CSV_HEADER`; :func:`write_csv` writes it.) ``datetime`` is exchange-local
``YYYY-MM-DD HH:MM:SS[.fff[fff]]`` (``T`` as separator accepted), optionally with a UTC
offset (``+08:00``, as vn.py's tz-aware datetimes print; converted to exchange-local),
or an integer of local epoch milliseconds. ``trading_day`` empty -> derived from the
session calendar.

vn.py dialect: vn.py's ``TickData`` field names are ours, except ``gateway_name`` (->
``source``), ``vt_symbol`` (``rb2601.SHFE``, gives symbol and exchange), ``name`` and
``localtime`` (ignored), and ``exchange`` written as the enum (``Exchange.SHFE``) -- all
accepted. Rows must be in time order per file; several files are merged by time.

Pacing
------
``speed=None`` and ``rate=None``: as fast as possible. ``speed=x``: the gaps between
tick timestamps are reproduced divided by ``x`` (1.0 = real time); ``max_gap`` caps a
single gap (seconds of wall time) so a lunch break or a night does not stall a replay.
``rate=r``: r ticks per second whatever the timestamps. :class:`Pacer` computes the
schedule (seconds from the start for each tick); it is pure and tested as such.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from qamarket.models import EXCHANGES, Tick, TickBatch
from qamarket.sessions import DEFAULT_CALENDAR, to_ms
from qapubsub import keys

log = logging.getLogger(__name__)

REQUIRED = ("symbol", "exchange", "datetime", "last_price")
CSV_HEADER: tuple[str, ...] = tuple(f for f in Tick.__struct_fields__ if f not in ("version", "id", "ts"))
_FLOATS = frozenset(CSV_HEADER) - {"symbol", "exchange", "datetime", "trading_day", "source", "seq"}
#: vn.py column name -> ours (None: ignored)
VNPY_ALIASES: dict[str, str | None] = {"gateway_name": "source", "name": None, "localtime": None, "vt_symbol": "vt_symbol"}


class CsvFormatError(ValueError):
    """A CSV file or row that cannot be read; ``str()`` names the file, the line and the column."""


# ---------------------------------------------------------------------------------------------- CSV
def parse_datetime(text: str) -> int:
    """Local epoch ms of ``"2025-03-03 09:00:00.500"`` / ``"...+08:00"`` / ``"1740992400500"``."""
    s = text.strip()
    if s.isdigit():
        return int(s)
    try:
        return to_ms(_dt.datetime.fromisoformat(s))
    except ValueError:
        raise ValueError(f"datetime {text!r} is not YYYY-MM-DD HH:MM:SS.fff or epoch ms") from None


def _exchange(text: str) -> str:
    s = text.strip()
    if s.startswith("Exchange."):
        s = s[len("Exchange."):]
    s = s.upper()
    if s not in EXCHANGES:
        raise ValueError(f"exchange {text!r} is not one of {', '.join(EXCHANGES)}")
    return s


def _columns(header: Sequence[str], where: str) -> list[str | None]:
    cols: list[str | None] = []
    unknown = []
    for name in header:
        n = name.strip()
        if n in VNPY_ALIASES:
            cols.append(VNPY_ALIASES[n])
        elif n in CSV_HEADER:
            cols.append(n)
        else:
            cols.append(None)
            if n:
                unknown.append(n)
    if unknown:
        log.info("%s: ignoring unknown columns %s", where, ", ".join(unknown))
    return cols


def parse_csv(lines: Iterable[str], *, name: str = "<csv>", symbol: str | None = None, exchange: str | None = None,
              skip_bad_rows: bool = False) -> Iterator[Tick]:
    """Ticks from CSV text lines (our header or vn.py's). ``symbol``/``exchange``: defaults for absent columns.

    A bad row raises :class:`CsvFormatError` naming ``name:line`` and the column, or is logged
    and skipped with ``skip_bad_rows``.
    """
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        return
    cols = _columns(header, name)
    present = {c for c in cols if c}
    if "vt_symbol" in present:
        present |= {"symbol", "exchange"}
    defaults = {"symbol": symbol, "exchange": exchange}
    missing = [c for c in REQUIRED if c not in present and not defaults.get(c)]
    if missing:
        raise CsvFormatError(f"{name}: header lacks required column(s) {', '.join(missing)} "
                             f"(have: {', '.join(h for h in header)})")
    default_exchange = _exchange(exchange) if exchange else None
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(cols):
            err = CsvFormatError(f"{name}:{line}: {len(row)} values for {len(cols)} columns")
            if skip_bad_rows:
                log.warning("%s", err)
                continue
            raise err
        kw: dict[str, Any] = {}
        if symbol:
            kw["symbol"] = symbol
        if default_exchange:
            kw["exchange"] = default_exchange
        col = ""
        try:
            for col, value in zip(cols, row, strict=True):  # type: ignore[assignment]
                if col is None:
                    continue
                v = value.strip()
                if col in _FLOATS:
                    kw[col] = float(v) if v else 0.0
                elif col == "datetime":
                    kw[col] = parse_datetime(v)
                elif col == "exchange":
                    kw[col] = _exchange(v)
                elif col == "vt_symbol":
                    sym, _, ex = v.rpartition(".")
                    kw["symbol"], kw["exchange"] = sym, _exchange(ex)
                elif col == "seq":
                    kw[col] = int(v) if v else 0
                elif v or col in ("source", "trading_day"):
                    kw[col] = v
            col = "trading_day"
            if not kw.get("trading_day"):
                kw["trading_day"] = DEFAULT_CALENDAR.trading_day(kw["datetime"])
            col = "symbol"
            if not kw.get("symbol"):
                raise ValueError("empty symbol")
            yield Tick(**kw)
        except (ValueError, TypeError) as exc:
            err = CsvFormatError(f"{name}:{line}: column {col!r}: {exc}")
            if skip_bad_rows:
                log.warning("%s", err)
                continue
            raise err from None


def read_csv(path: str | os.PathLike[str], *, symbol: str | None = None, exchange: str | None = None,
             skip_bad_rows: bool = False) -> Iterator[Tick]:
    """Ticks of one CSV file, lazily (see the module doc for the format)."""
    p = Path(path)
    with p.open(newline="", encoding="utf-8-sig") as fh:
        yield from parse_csv(fh, name=str(p), symbol=symbol, exchange=exchange, skip_bad_rows=skip_bad_rows)


def read_csvs(paths: Sequence[str | os.PathLike[str]], **kw: Any) -> Iterator[Tick]:
    """Several time-ordered CSV files merged into one time-ordered stream."""
    from .random_source import merge_by_time

    if len(paths) == 1:
        return read_csv(paths[0], **kw)
    return merge_by_time(*(read_csv(p, **kw) for p in paths))


def write_csv(ticks: Iterable[Tick], out: io.TextIOBase | Any) -> int:
    """Write ticks with :data:`CSV_HEADER` (datetime as ``YYYY-MM-DD HH:MM:SS.fff``); returns the count."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_HEADER)
    n = 0
    for t in ticks:
        row = []
        for f in CSV_HEADER:
            v = getattr(t, f)
            if f == "datetime":
                v = t.dt.isoformat(sep=" ", timespec="milliseconds")
            row.append(v)
        w.writerow(row)
        n += 1
    return n


# ---------------------------------------------------------------------------------------- MongoDB
def ticks_from_store(store: Any, exchange: str, symbol: str, start: Any = None, end: Any = None) -> Iterator[Tick]:
    """Ticks of one instrument from a tick store with ``ticks(exchange, symbol, start, end)``
    (``qamarket.store.TickStore``); any object with that method works."""
    yield from store.ticks(exchange, symbol, start, end)


def ticks_from_mongo(db: Any, instruments: Sequence[str | tuple[str, str]], start: Any = None, end: Any = None, *,
                     collection: str = "ticks") -> Iterator[Tick]:
    """Ticks of several instruments (``"SHFE.rb2605"`` or ``(exchange, symbol)``) from the MongoDB tick
    store (:class:`qamarket.store.TickStore` on ``db``, a pymongo Database), merged by time."""
    from qamarket.store import TickStore

    from .random_source import merge_by_time, parse_instrument

    store = TickStore(db, collection, create_indexes=False)
    pairs = [parse_instrument(i) for i in instruments]
    return merge_by_time(*(ticks_from_store(store, ex, sym, start, end) for ex, sym in pairs))


# ------------------------------------------------------------------------------------------ pacing
class Pacer:
    """When each tick is due, in seconds from the start of a replay (pure; no clock inside).

    ``rate``: a fixed number of ticks per second. ``speed``: timestamps' gaps divided by
    ``speed``; a gap longer than ``max_gap`` seconds (after scaling) is shortened to it; a
    timestamp that goes backwards adds no delay. Neither: every tick is due at 0.
    ``origin_ms``: the simulated time of the start (the first tick is due after the gap from
    it, so a real-time source started before the open waits for the open); default: the
    first tick is due at 0.
    """

    def __init__(self, *, rate: float | None = None, speed: float | None = None, max_gap: float | None = None,
                 origin_ms: int | None = None) -> None:
        if rate is not None and speed is not None:
            raise ValueError("give rate or speed, not both")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0")
        if speed is not None and speed <= 0:
            raise ValueError("speed must be > 0")
        self.rate, self.speed, self.max_gap = rate, speed, max_gap
        self._count = 0
        self._last_ms: int | None = origin_ms
        self._offset = 0.0

    @property
    def paced(self) -> bool:
        return self.rate is not None or self.speed is not None

    def due(self, tick_ms: int) -> float:
        """Seconds after the start at which the next tick (stamped ``tick_ms``) is due."""
        if self.rate is not None:
            due = self._count / self.rate
        elif self.speed is not None:
            if self._last_ms is not None:
                gap = max(0.0, (tick_ms - self._last_ms) / 1000.0 / self.speed)
                if self.max_gap is not None:
                    gap = min(gap, self.max_gap)
                self._offset += gap
            if self._last_ms is None or tick_ms > self._last_ms:
                self._last_ms = tick_ms
            due = self._offset
        else:
            due = 0.0
        self._count += 1
        return due

    def schedule(self, tick_ms: Iterable[int]) -> list[float]:
        return [self.due(t) for t in tick_ms]


def schedule(tick_ms: Iterable[int], *, rate: float | None = None, speed: float | None = None,
             max_gap: float | None = None, origin_ms: int | None = None) -> list[float]:
    """Due times (s from the start) of ticks stamped ``tick_ms``: see :class:`Pacer`."""
    return Pacer(rate=rate, speed=speed, max_gap=max_gap, origin_ms=origin_ms).schedule(tick_ms)


# ------------------------------------------------------------------------------------- publishing
class StopFlag:
    """Set by SIGTERM/SIGINT (or :meth:`set`); a second signal exits at once (``os._exit(128+n)``)."""

    def __init__(self) -> None:
        self._set = False
        self._event = threading.Event()

    def set(self) -> None:
        self._set = True
        self._event.set()

    def is_set(self) -> bool:
        return self._set

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self._set:
            os._exit(128 + signum)
        log.info("signal %s: stopping after the tick in hand, flushing confirms", signal.Signals(signum).name)
        self._set = True  # no locks in a signal handler: the loop polls the flag


def _sleep_until(deadline: float, stop: Any, clock: Callable[[], float]) -> None:
    while not stop.is_set():
        left = deadline - clock()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def publish_ticks(publisher: Any, ticks: Iterable[Tick], *, exchange: str | None = None, batch: int = 1,
                  rate: float | None = None, speed: float | None = None, max_gap: float | None = None,
                  duration: float | None = None, stop: Any = None, install_signals: bool = True,
                  origin_ms: int | None = None, clock: Callable[[], float] = time.monotonic) -> int:
    """Publish ``ticks`` to ``exchange`` (default the publisher's ``topology.tick``) with keys
    ``keys.tick_key(exchange, symbol)``; paced by ``rate``/``speed`` (see :class:`Pacer`).

    Stops at the end of ``ticks``, after ``duration`` s, on SIGTERM/SIGINT (when
    ``install_signals`` and in the main thread) or when ``stop.is_set()``; then sends the
    partial batches, waits for every confirm (``publisher.flush()``) and returns the
    number of ticks published. ``batch`` > 1: :class:`TickBatch` messages of up to
    ``batch`` ticks of one instrument (a batch is sent when it is full; partial batches at
    the end), so a batch goes out when its last tick is due.
    """
    if exchange is None:
        topo = getattr(publisher, "topology", None)
        if topo is None:
            from qapubsub.topology import Topology

            topo = Topology()
        exchange = topo.tick
    flag = stop if stop is not None else StopFlag()
    previous: dict[int, Any] = {}
    if install_signals and threading.current_thread() is threading.main_thread() and hasattr(flag, "on_signal"):
        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, flag.on_signal)
    pacer = Pacer(rate=rate, speed=speed, max_gap=max_gap, origin_ms=origin_ms if speed is not None else None)
    pending: dict[tuple[str, str], list[Tick]] = {}
    published = 0
    t0 = clock()
    end = t0 + duration if duration is not None else None
    pub = publisher.publish

    def send_batch(ex: str, sym: str, buf: list[Tick]) -> None:
        pub(exchange, keys.tick_key(ex, sym), TickBatch(symbol=sym, exchange=ex, ticks=buf))  # type: ignore[arg-type]

    try:
        for tick in ticks:
            if flag.is_set():
                break
            if pacer.paced:
                due = t0 + pacer.due(tick.datetime)
                if end is not None and due > end:
                    break
                if due - clock() > 5.0:
                    log.info("next tick (%s %s) due in %.0f s: waiting like the market does (--max-gap caps it)",
                             tick.vt_symbol, tick.dt, due - clock())
                _sleep_until(due, flag, clock)
                if flag.is_set():
                    break
            if end is not None and clock() >= end:
                break
            if batch <= 1:
                pub(exchange, keys.tick_key(tick.exchange, tick.symbol), tick)
            else:
                k = (tick.exchange, tick.symbol)
                buf = pending.setdefault(k, [])
                buf.append(tick)
                if len(buf) >= batch:
                    del pending[k]
                    send_batch(tick.exchange, tick.symbol, buf)
            published += 1
        for (ex, sym), buf in pending.items():
            send_batch(ex, sym, buf)
        pending.clear()
        publisher.flush()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("published %d ticks", published, extra={"exchange": exchange, "confirmed": getattr(publisher, "confirmed", None)})
    return published


def replay(publisher: Any, ticks: Iterable[Tick], *, speed: float | None = 1.0, rate: float | None = None,
           max_gap: float | None = None, batch: int = 1, **kw: Any) -> int:
    """Replay any iterable of ticks (CSV, the tick store, a list): real speed by default,
    ``speed=x`` for x times, ``speed=None`` as fast as possible."""
    return publish_ticks(publisher, ticks, speed=speed if rate is None else None, rate=rate, max_gap=max_gap,
                         batch=batch, **kw)
