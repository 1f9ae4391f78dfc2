"""``qaflow tickhandler``: ticks in, clean -> persist -> realtime and closed bars out.

One process consumes the durable tick queue in batches (:class:`qapubsub.batch.BatchConsumer`)
and works on two threads. The consumer's thread, for every batch:

1. cleans each tick (:class:`qamarket.cleaning.TickCleaner`: bad/unset prices, duplicates,
   out-of-order, outside the instrument's sessions), counting each drop reason;
2. aggregates the kept ticks (:class:`qamarket.aggregation.Aggregator`) and publishes the
   realtime bars to ``qa.rtbar`` at once (throttled to one per 500 ms per instrument by the
   aggregator; transient, not waited for: a preview, sent *before* its ticks are stored);
3. hands a job to the writer thread and goes on with the next batch.

The writer thread, job after job in order (several waiting jobs as one):

4. persists the ticks (:class:`qamarket.store.TickStore`, bucketed and idempotent);
5. publishes the closed bars to ``qa.bar`` with a deterministic message id
   ``bar.<freq>.<EX>.<symbol>.<label>`` (confirmed), then upserts them
   (:class:`qamarket.store.BarStore`);
6. then the batch is acknowledged (by the consumer's thread, strictly in order: see
   ``pipeline_depth`` in :mod:`qapubsub.batch`).

So a closed bar on the bus means its ticks, and every tick before them, are in MongoDB; a
realtime bar does not wait for MongoDB (measured: p50 tick -> realtime bar went from ~50 ms
to ~13 ms at 5,000 ticks/s). A failed write fails its job and every job after it; those
batches are requeued and the instruments concerned rebuilt from the store before the next
batch (:class:`TickPipeline`).

Between batches a timer closes bars whose minute is over although no later tick came
(QARealtimeCollector's ``:00`` defect). The timer's clock is the feed's: the newest tick
time plus the wall time since it arrived, so a replay or a simulated feed closes its
bars on its own time line (``--clock wall`` uses China Standard Time instead).

Before its first batch (after a restart, or when a standby instance of a shard takes
over) the aggregator is rebuilt from the stored ticks of each instrument's current trading
day; bars already stored are not published again. When a shard changes hands, RabbitMQ
redelivers what the previous instance had received but not acknowledged *after* newer
ticks: such redelivered, now out-of-order ticks are stored if missing
(:meth:`TickStore.write_late`) and their instruments' bars rebuilt from the store, so the
bars still open include them. A bar already closed and published before they arrived is
not changed (its volume is right, from the cumulative volume; a high or low seen only in
the late ticks is missed). To make that rare, the closed bars of an instrument this process
has just started handling are held for ``--takeover-hold`` seconds (2 by default): the
requeued ticks arrive within that time and the bars are rebuilt with them before anything
is published. A crash between
publishing a bar and acknowledging the batch can publish that bar a second time, with
the same message id: consumers deduplicate by it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import msgspec

from qamarket.aggregation import Aggregator
from qamarket.cleaning import DUPLICATE, OUT_OF_ORDER, TickCleaner
from qamarket.models import DEFAULT_REGISTRY, Bar, Tick, TickBatch, TickDecoder, UnknownInstrument
from qamarket.sessions import to_ms
from qapubsub import keys
from qapubsub.coalesce import CoalescingWriter
from qapubsub.handling import Transient
from qapubsub.settings import Settings, mongo_client
from qapubsub.topology import Topology, tick_shards_from_env

log = logging.getLogger(__name__)

ALL_FREQS = ("1min", "5min", "15min", "30min", "60min", "1day")
CHINA = dt.timezone(dt.timedelta(hours=8))


def bar_message_id(bar: Bar) -> str:
    return f"bar.{bar.freq}.{bar.exchange}.{bar.symbol}.{bar.datetime}"


class FeedClock:
    """Exchange-local ms: the newest tick time seen plus the wall time elapsed since it came."""

    def __init__(self, mode: str = "feed") -> None:
        self.mode = mode
        self._feed_ms: int | None = None
        self._seen_at = 0.0

    def saw(self, tick_ms: int) -> None:
        if self._feed_ms is None or tick_ms > self._feed_ms:
            self._feed_ms, self._seen_at = tick_ms, time.monotonic()

    def now(self) -> int | None:
        if self.mode == "wall":
            return to_ms(dt.datetime.now(CHINA).replace(tzinfo=None))
        if self._feed_ms is None:
            return None
        return self._feed_ms + int((time.monotonic() - self._seen_at) * 1000)


class _Job:
    """What the writer does for one batch (or a timer): store the ticks, publish the closed bars, store them."""

    __slots__ = ("ticks", "closed", "instruments", "rejected", "future", "queued_at")

    def __init__(self, ticks: list[Tick], closed: list[Bar], instruments: set[tuple[str, str]],
                 rejected: dict[int, str] | None = None) -> None:
        self.ticks = ticks
        self.closed = closed
        self.instruments = instruments
        self.rejected = rejected or {}
        self.future: Future[dict[int, str]] = Future()
        self.queued_at = time.monotonic()


def _job_ticks(job: _Job) -> int:
    return len(job.ticks)


class TickPipeline:
    """The tickhandler's work, independent of how batches arrive (tests drive it directly).

    :meth:`submit` does the consumer thread's part of a batch at once -- clean, aggregate,
    publish the realtime bars -- and hands a job to the writer: store the kept ticks, then
    publish the closed bars (confirmed) and upsert them. It returns a future that is done when
    the job is, whose result is ``{delivery_tag: reason}`` to dead-letter. With
    ``background=True`` the jobs run on a writer thread (:class:`qapubsub.coalesce.CoalescingWriter`); without, inside
    :meth:`submit` (:meth:`handle` = submit and wait).

    Failure: any error (a write, a publish, or in :meth:`submit` itself) marks the
    instruments of the failed job and of every job after it *dirty* and fails those jobs; the
    consumer requeues their batches. Before the next batch the dirty instruments are
    forgotten -- aggregator, cleaner, watermark, what was published -- and rebuilt from the
    store when they are next seen (:meth:`recover`, the same path as a restart), so the
    requeued ticks are judged against what is really stored and no bar is built twice from
    one tick.
    """

    def __init__(self, tick_store: Any, bar_store: Any, publish_bars: Any, *, freqs: Sequence[str] = ALL_FREQS,
                 realtime: Sequence[str] = ("1min",), clock: FeedClock | None = None, timer_grace_ms: int = 1000,
                 check_sessions: bool = True, takeover_hold: float = 2.0, background: bool = False,
                 writer_idle: Any = None, write_wait: float = 0.0) -> None:
        self.ticks = tick_store
        self.bars = bar_store
        # (closed: list[Bar], realtime: list[Bar]) -> None. Called with realtime bars only on the consumer's
        # thread (not waited for) and with closed bars only from the writer (confirmed on return).
        self.publish_bars = publish_bars
        self.freqs = tuple(dict.fromkeys(("1min", *freqs)))
        self.agg = Aggregator(freqs=self.freqs, realtime=tuple(realtime))
        self.clock = clock or FeedClock()
        self.timer_grace_ms = timer_grace_ms
        self.check_sessions = check_sessions
        self.cleaners: dict[tuple[str, str], TickCleaner] = {}
        self.dropped: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._published_upto: dict[tuple[str, str, str], int] = {}  # closed bars at or before: handed to a job
        self._recovered: set[tuple[str, str]] = set()
        self.takeover_hold = takeover_hold
        self._hold_until: dict[tuple[str, str], float] = {}  # instrument -> monotonic end of its hold
        self._held: dict[tuple[str, str], list[Bar]] = {}
        self._closed: list[Bar] = []  # closed bars for the next job
        self._last_batch_at = 0.0  # monotonic time of the last batch: the timer closes bars only after a lull
        self._marks_loaded = False
        self._lock = threading.Lock()
        self._broken: BaseException | None = None  # a job failed: later jobs fail too until reset
        self._dirty: set[tuple[str, str]] = set()  # instruments to rebuild from the store
        # The writer thread coalesces the jobs queued behind a slow write: jobs of fewer than 5,000
        # ticks wait up to ``write_wait`` (from when the first was queued) for more to join them, so
        # small batches -- cut short for the realtime bars' latency -- still make few, full MongoDB
        # documents; only the closed bars and the acks wait for it.
        self._writer: CoalescingWriter[_Job] | None = CoalescingWriter(
            self._run_jobs, name="tickhandler-writer", linger=write_wait, size=_job_ticks, fill=5_000,
            max_size=50_000, on_idle=writer_idle) if background else None

    # recovery ----------------------------------------------------------------------------------
    def recover(self, exchange: str, symbol: str) -> int:
        """Rebuild one instrument's bars from its stored ticks of the current trading day.

        Done the first time this process sees the instrument (after a start, when it takes
        over a shard, or after a failure made it dirty), never for instruments it does not
        handle: with several shards the store holds every shard's instruments, and rebuilding
        those here would let this process's timer close bars it does not own. Closed bars not
        in the bar store yet go with the next job. Returns the ticks replayed. The writer must
        have no job holding this instrument's ticks (and none at all the first time).
        """
        self._recovered.add((exchange, symbol))
        if self.takeover_hold > 0 and (exchange, symbol) not in self._hold_until:
            # Hold this instrument's closed bars a moment: what a previous instance of the shard had
            # received but not acknowledged is redelivered *after* newer ticks, and must be in them.
            self._hold_until[(exchange, symbol)] = time.monotonic() + self.takeover_hold
        if not self._marks_loaded:
            # One aggregate for every instrument instead of a query per instrument on first sight.
            self.ticks.load_watermarks()
            self._marks_loaded = True
        if self.ticks.watermark(exchange, symbol) is None:
            return 0  # nothing stored for it: nothing to rebuild
        last = self.ticks.last_tick(exchange, symbol)
        if last is None:
            return 0
        for freq in self.freqs:
            bar = self.bars.last_bar(exchange, symbol, freq)
            if bar is not None:
                self._published_upto[(exchange, symbol, freq)] = bar.datetime
        todays = self.ticks.ticks(exchange, symbol, start=self._day_start(last))
        cleaner = self._cleaner(last)
        for t in todays:
            if cleaner is not None and cleaner.check(t) is None:
                self._select(self.agg.on_tick(t))
                self.clock.saw(t.datetime)
        if todays:
            log.info("rebuilt %s.%s bars from %d stored ticks", exchange, symbol, len(todays))
        return len(todays)

    def _forget(self, exchange: str, symbol: str) -> None:
        """Drop everything held in memory about an instrument; it is rebuilt from the store on next sight."""
        key = (exchange, symbol)
        self.agg.forget(symbol)
        self.cleaners.pop(key, None)
        self._recovered.discard(key)
        self._held.pop(key, None)
        for freq in self.freqs:
            self._published_upto.pop((exchange, symbol, freq), None)
        self.ticks.forget(exchange, symbol)

    @staticmethod
    def _day_start(t: Tick) -> int:
        # The trading day starts with the night session of the business day before it: go back far
        # enough (the evening before, 18:00) and let the store's range do the rest.
        day = dt.datetime.strptime(t.trading_day, "%Y%m%d") if t.trading_day else t.dt.replace(hour=0, minute=0)
        prev = day - dt.timedelta(days=3 if day.weekday() == 0 else 1)
        return to_ms(prev.replace(hour=18, minute=0, second=0, microsecond=0))

    # the batch ----------------------------------------------------------------------------------
    def _cleaner(self, t: Tick) -> TickCleaner | None:
        key = (t.exchange, t.symbol)
        c = self.cleaners.get(key)
        if c is None:
            try:
                spec = DEFAULT_REGISTRY.get(t.symbol, t.exchange)
            except UnknownInstrument:
                return None
            c = self.cleaners[key] = TickCleaner(spec, check_sessions=self.check_sessions)
        return c

    def handle(self, items: Sequence[tuple[Tick | TickBatch, Any]]) -> dict[int, str]:
        """:meth:`submit` and wait: returns ``{delivery_tag: reason}`` to dead-letter, or raises."""
        return self.submit(items).result()

    def submit(self, items: Sequence[tuple[Tick | TickBatch, Any]]) -> Future[dict[int, str]]:
        """Clean, aggregate, publish the realtime bars; hand the rest to the writer (see the class doc)."""
        self._last_batch_at = time.monotonic()
        if self._broken is not None:
            cause = self._broken
            self._reset()
            if self._writer is not None:
                # Batches handed over after the failed one may still be in flight: the consumer requeues
                # them with this one before anything more is handled.
                raise Transient(f"an earlier batch was not stored ({cause}); instruments rebuilt from the store")
        elif self._dirty:
            self._reset()
        touched: set[tuple[str, str]] = set()
        try:
            return self._submit(items, touched)
        except BaseException:
            with self._lock:
                self._dirty |= touched
            raise

    def _submit(self, items: Sequence[tuple[Tick | TickBatch, Any]], touched: set[tuple[str, str]]) -> Future[dict[int, str]]:
        self._release_holds()
        # Instruments seen for the first time are rebuilt from the store first, and only now (not
        # at start): a standby instance of a shard gets its first batch when it takes over, and must
        # start from what its predecessor stored.
        fresh = []
        for payload, _delivery in items:
            key = (payload.exchange, payload.symbol)
            touched.add(key)
            if key not in self._recovered:
                fresh.append(key)
        if fresh:
            if not self._marks_loaded:
                # The first batch loads every watermark: nothing may be writing meanwhile. Later, an
                # instrument seen for the first time has no job in flight (a forgotten one was waited
                # for when it was forgotten): its rebuild only reads, the writer goes on.
                self._wait_idle()
            for key in dict.fromkeys(fresh):
                if key not in self._recovered:
                    self.recover(*key)
        rejected: dict[int, str] = {}
        kept: list[Tick] = []
        late: list[Tick] = []  # redelivered after newer ticks of the instrument: stored if missing
        received = 0
        dropped = self.dropped
        keep = kept.append
        cur_ex = cur_sym = None
        cleaner: TickCleaner | None = None
        check: Any = None
        for payload, delivery in items:
            ticks = payload.ticks if isinstance(payload, TickBatch) else (payload,)
            received += len(ticks)
            redelivered = delivery.redelivered
            for t in ticks:
                # A TickBatch holds one instrument's ticks: look its cleaner up once per run of them.
                if t.symbol != cur_sym or t.exchange != cur_ex:
                    cleaner = self._cleaner(t)
                    if cleaner is None:
                        cur_ex = cur_sym = None
                        rejected[delivery.delivery_tag] = f"unknown instrument {t.exchange}.{t.symbol}: no spec, no sessions"
                        break
                    cur_ex, cur_sym, check = t.exchange, t.symbol, cleaner.check
                reason = check(t)
                if reason is None:
                    keep(t)
                elif redelivered and reason in (OUT_OF_ORDER, DUPLICATE):
                    late.append(t)
                else:
                    dropped[reason] += 1
        self.counts["received"] += received
        if late:
            bars = self._store_with_late(kept, late)
            kept = []
        else:
            bars = self._aggregate(kept)
        realtime = [b for b in bars if not b.final]
        if realtime:
            try:
                self.publish_bars((), realtime)  # a preview: sent before its ticks are stored
            except Exception as exc:
                raise Transient(f"realtime bar publish: {type(exc).__name__}: {exc}") from exc
            self.counts["bars_realtime"] += len(realtime)
        self._select(bars)
        return self._enqueue(kept, touched, rejected)

    def _store_with_late(self, kept: list[Tick], late: list[Tick]) -> list[Bar]:
        """Redelivered ticks older than what was handled since: store the batch at once (not in the
        background), store the late ticks that are missing, rebuild their instruments from the store."""
        self._wait_idle()
        if self._broken is not None:
            raise Transient(f"an earlier batch was not stored: {self._broken}")
        try:
            result = self.ticks.write(kept)
            late_result = self.ticks.write_late(late)
        except Exception as exc:  # pymongo errors: the database is down or refused the write
            raise Transient(f"tick store: {type(exc).__name__}: {exc}") from exc
        self.counts["stored"] += result.stored
        self.counts["stored_late"] += late_result.stored
        self.counts["skipped_stored"] += result.skipped + late_result.skipped
        # Rebuild those instruments with the late ticks in place: bars still open or still held get
        # them; bars already published stay as they were (their ids are final).
        rebuilt = {(t.exchange, t.symbol) for t in late_result.new}
        for ex, sym in rebuilt:
            self._forget(ex, sym)
            self.recover(ex, sym)  # replays what was just stored, this batch's ticks included
        return self._aggregate([t for t in result.new if (t.exchange, t.symbol) not in rebuilt])

    def _aggregate(self, new: Sequence[Tick]) -> list[Bar]:
        """Feed kept ticks to their instruments' aggregators.

        They come grouped by instrument (a ``TickBatch`` holds one instrument): the aggregator is
        looked up once per run and the feed clock moved once per run (its last tick is its newest).
        """
        bars: list[Bar] = []
        extend = bars.extend
        i, n = 0, len(new)
        while i < n:
            first = new[i]
            sym, ex = first.symbol, first.exchange
            try:
                on_tick = self.agg.get(sym, ex).on_tick
            except UnknownInstrument:  # not reached: the cleaner rejects instruments without a spec
                on_tick = self.agg.on_tick
            newest = first.datetime
            while i < n:
                t = new[i]
                if t.symbol != sym or t.exchange != ex:
                    break
                r = on_tick(t)
                if r:
                    extend(r)
                i += 1
            self.clock.saw(max(newest, new[i - 1].datetime))
        return bars

    def on_timer(self) -> None:
        """Between batches: release holds, close bars whose time is over although no tick came."""
        if self._broken is not None:
            return  # the next batch resets (and requeues what was in flight); bars close after it
        if self._dirty:
            self._reset()
        self._release_holds()
        now = self.clock.now()
        # The timer is for a *silent* feed. While batches keep coming (a backlog being worked
        # through, or a stall of this process) the feed clock runs ahead of the ticks still queued:
        # closing by it would cut bars short. Then the next tick closes the bar instead.
        quiet = time.monotonic() - self._last_batch_at >= self.timer_grace_ms / 1000
        if now is not None and quiet:
            self._select(self.agg.on_timer(now - self.timer_grace_ms))
        if self._closed:
            self._enqueue([], {(b.exchange, b.symbol) for b in self._closed})

    def flush(self) -> None:
        """Stopping: release every hold, publish and store what is pending (a restart would redo it anyway)."""
        if self._broken is None:
            self._release_holds(now=float("inf"))
            if self._closed:
                self._enqueue([], {(b.exchange, b.symbol) for b in self._closed})
        self._wait_idle()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _release_holds(self, now: float | None = None) -> None:
        if not self._hold_until:
            return
        now = time.monotonic() if now is None else now
        for key in [k for k, until in self._hold_until.items() if until <= now]:
            del self._hold_until[key]
            self._select(self._held.pop(key, []))

    def _select(self, bars: Sequence[Bar]) -> None:
        """Closed bars not handed to a job before go to the next one; an instrument still in its
        take-over hold keeps them in ``_held``. Realtime bars are skipped."""
        for b in bars:
            if not b.final:
                continue
            key = (b.exchange, b.symbol)
            upto = self._published_upto.get((b.exchange, b.symbol, b.freq))
            if upto is not None and b.datetime <= upto:
                continue  # published before (a restart, or a rebuild)
            if key in self._hold_until:
                self._held.setdefault(key, []).append(b)
                continue
            # prev: the series' last closed bar handed to a job, so that a consumer can tell it missed one
            self._closed.append(msgspec.structs.replace(b, id=bar_message_id(b), prev=upto))
            self._published_upto[(b.exchange, b.symbol, b.freq)] = b.datetime

    # the writer's side --------------------------------------------------------------------------
    def _enqueue(self, ticks: list[Tick], instruments: set[tuple[str, str]],
                 rejected: dict[int, str] | None = None) -> Future[dict[int, str]]:
        closed, self._closed = self._closed, []
        job = _Job(ticks, closed, instruments | {(b.exchange, b.symbol) for b in closed}, rejected)
        if self._writer is not None:
            self._writer.put(job)
        else:
            self._run_jobs([job])
        return job.future

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Store the jobs' ticks (one write), publish their closed bars (one confirm wait), store those.

        Publishing before storing means a crash in between makes the restart publish the bar
        again (same id, consumers deduplicate) instead of never. Never raises: the outcome is
        in each job's future.
        """
        with self._lock:
            broken = self._broken
            if broken is not None:
                for job in jobs:
                    self._dirty |= job.instruments
        if broken is not None:
            err = Transient(f"not stored: an earlier batch failed ({broken})")
            for job in jobs:
                job.future.set_exception(err)
            return
        step = "tick store"
        try:
            ticks = jobs[0].ticks if len(jobs) == 1 else [t for job in jobs for t in job.ticks]
            if ticks:
                result = self.ticks.write(ticks)
                self.counts["stored"] += result.stored
                if result.skipped:
                    self.counts["skipped_stored"] += result.skipped
            closed = jobs[0].closed if len(jobs) == 1 else [b for job in jobs for b in job.closed]
            if closed:
                step = "bar publish"
                self.publish_bars(closed, ())
                self.counts["bars_closed"] += len(closed)
                step = "bar store"
                self.bars.write(closed)
        except Exception as exc:  # noqa: BLE001 - pymongo / AMQP errors: the batches are requeued
            failure = Transient(f"{step}: {type(exc).__name__}: {exc}")
            with self._lock:
                self._broken = failure
                for job in jobs:
                    self._dirty |= job.instruments
            log.warning("%s failed for %d batch(es): %s", step, len(jobs), exc)
            for job in jobs:
                job.future.set_exception(failure)
            return
        for job in jobs:
            job.future.set_result(job.rejected)

    def _wait_idle(self) -> None:
        if self._writer is not None:
            self._writer.wait_idle()

    def _reset(self) -> None:
        """After a failure: wait for the writer, forget the dirty instruments (rebuilt on next sight)."""
        self._wait_idle()
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            self._broken = None
        self._closed = [b for b in self._closed if (b.exchange, b.symbol) not in dirty]
        for ex, sym in dirty:
            self._forget(ex, sym)
        if dirty:
            log.warning("rebuilding %d instrument(s) from the store after a failure", len(dirty))


def make_bar_publisher(connection: Any, topology: Topology, realtime_connection: Any = None) -> Any:
    """``publish(closed, realtime)``. Closed bars: persistent, confirmed on return, on ``connection``
    (the writer thread's). Realtime bars: transient, confirms not waited for (a lost realtime
    update is replaced 500 ms later), on ``realtime_connection`` (the consumer thread's; default
    ``connection``). Each connection is used by one thread only.

    ``connection`` should not be the consumer's: on the consumer's socket a confirm would
    queue behind up to ``--prefetch`` deliveries (measured: most of a batch's time).
    """
    from qapubsub.sync import StreamPublisher

    rt_conn = realtime_connection or connection
    closed_pub = StreamPublisher(connection, topology=topology, persistent=True, batch_size=1000)
    rt_pub = StreamPublisher(rt_conn, topology=topology, persistent=False, batch_size=5000)

    def publish(closed: Sequence[Bar], realtime: Sequence[Bar]) -> None:
        if realtime:
            for b in realtime:
                rt_pub.publish(topology.rtbar, keys.bar_key(b.freq, b.exchange, b.symbol), b)
            rt_conn.blocking.process_data_events(0)  # send them now, read confirms
        if closed:
            for b in closed:
                closed_pub.publish(topology.bar, keys.bar_key(b.freq, b.exchange, b.symbol), b)
            closed_pub.flush()

    return publish


def _tick_batch_consumer(*args: Any, max_batch_ticks: int, **kwargs: Any) -> Any:
    """A :class:`qapubsub.batch.BatchConsumer` whose batches are also cut at ``max_batch_ticks`` ticks.

    ``--batch-size`` counts messages; with ``TickBatch`` feeds (100+ ticks per message) that alone
    would make batches of 100,000 ticks (seconds of work, megabytes held unacknowledged).
    RabbitMQ has no byte-sized prefetch (``prefetch_size`` is not implemented), so size
    ``--prefetch`` for batched feeds in messages: about 4x ``max_batch_ticks`` / ticks per message.
    """
    from qapubsub.batch import BatchConsumer

    class TickBatchConsumer(BatchConsumer):
        _batch_ticks = 0

        def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
            super()._on_message(ch, method, props, body)
            b = self._batch
            if b and b[-1][1].delivery_tag == method.delivery_tag:
                p = b[-1][0]
                n = len(p.ticks) if isinstance(p, TickBatch) else 1
                self._batch_ticks = n if len(b) == 1 else self._batch_ticks + n
                if self._batch_ticks >= max_batch_ticks:
                    self._flush_batch()

    return TickBatchConsumer(*args, **kwargs)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--freqs", default=",".join(ALL_FREQS), help="bar frequencies (1min always)")
    parser.add_argument("--realtime", default="1min", help="frequencies with realtime updates on qa.rtbar")
    parser.add_argument("--batch-size", type=int, default=1000, help="messages per batch (default 1000)")
    parser.add_argument("--batch-ticks", type=int, default=30_000,
                        help="also cut a batch at this many ticks (TickBatch messages hold many; default 30000)")
    parser.add_argument("--batch-wait", type=float, default=0.01,
                        help="seconds to wait to fill a batch (default 0.01; the realtime bars' p50 latency is about "
                             "half of it plus ~8 ms; smaller batches cost more CPU and MongoDB documents per tick)")
    parser.add_argument("--prefetch", type=int, default=4000)
    parser.add_argument("--pipeline-depth", type=int, default=16,
                        help="batches handed to the writer thread and not yet stored (default 16; 0: store each "
                             "batch before taking the next)")
    parser.add_argument("--write-wait", type=float, default=0.05,
                        help="seconds the writer thread lets batches gather into one MongoDB write (default 0.05; "
                             "delays closed bars and acks, not realtime bars)")
    parser.add_argument("--clock", choices=("feed", "wall"), default="feed",
                        help="timer clock for closing bars without a later tick (default: the feed's time)")
    parser.add_argument("--no-session-check", action="store_true", help="keep ticks outside trading sessions")
    parser.add_argument("--takeover-hold", type=float, default=2.0,
                        help="seconds to hold the closed bars of an instrument this process just took over "
                             "(default 2; 0 disables)")
    parser.add_argument("--shard", type=int, default=0,
                        help="which tick shard this instance consumes (default 0); a second instance of the same "
                             "shard stands by and takes over when the first stops")
    parser.add_argument("--shards", type=int, default=None,
                        help="how many shards the ticks are spread over (default QA_TICK_SHARDS or 1); every "
                             "instance declares all of them so no shard's ticks are lost while it is down")


def build(settings: Settings, args: argparse.Namespace) -> tuple[Any, TickPipeline]:

    from qamarket.store import BarStore, TickStore
    from qapubsub.settings import ConfigError
    from qapubsub.sync import Connection

    # bad options and settings first, before anything connects
    shards = args.shards if args.shards is not None else tick_shards_from_env()
    if shards < 1 or not 0 <= args.shard < shards:
        raise ConfigError(f"--shard {args.shard} is not one of the {shards} shard(s) (--shards / QA_TICK_SHARDS)")
    freqs = [f.strip() for f in args.freqs.split(",") if f.strip()]
    unknown = sorted(set(freqs) - set(ALL_FREQS))
    if unknown:
        raise ConfigError(f"--freqs: unknown frequency {', '.join(unknown)} (use {', '.join(ALL_FREQS)})")
    if args.pipeline_depth < 0:
        raise ConfigError(f"--pipeline-depth {args.pipeline_depth}: must be 0 or more")
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    db = mongo_client(settings)[settings.mongo_db]
    conn = Connection(settings, client_name="qaflow-tickhandler")
    # The writer thread owns bar_conn (closed bars); the consumer's thread publishes realtime bars on conn.
    bar_conn = Connection(settings, client_name="qaflow-tickhandler-bars")

    def writer_idle() -> None:
        if bar_conn.is_open:
            bar_conn.blocking.process_data_events(0)  # heartbeats of the bar connection

    pipeline = TickPipeline(TickStore(db), BarStore(db), make_bar_publisher(bar_conn, topo, realtime_connection=conn),
                            freqs=freqs, realtime=[f.strip() for f in args.realtime.split(",") if f.strip()],
                            clock=FeedClock(args.clock), check_sessions=not args.no_session_check,
                            takeover_hold=args.takeover_hold, background=True, writer_idle=writer_idle,
                            write_wait=max(0.0, args.write_wait))
    topo.declare_sync(conn.channel(), queues=[topo.tick_queue(i) for i in range(shards)])
    consumer = _tick_batch_consumer(conn, topo.tick_queue(args.shard), pipeline.submit, message_type=TickDecoder(),
                                    max_batch_ticks=max(1, args.batch_ticks), topology=topo,
                                    batch_size=args.batch_size, batch_wait=args.batch_wait, prefetch=args.prefetch,
                                    pipeline_depth=args.pipeline_depth, on_idle=pipeline.on_timer, idle_interval=0.1,
                                    on_stop=pipeline.flush)
    return consumer, pipeline


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    consumer, pipeline = build(settings, args)
    log.info("tickhandler consuming %s", consumer.queue_name)
    # Everything imported and built so far lives as long as the process: keep it out of the cyclic
    # collector's full passes (measured: a 37 ms gen-2 pause in the middle of the tick stream).
    gc.freeze()
    try:
        code = consumer.run_until_signal()
    finally:
        pipeline.close()
    log.info("tickhandler stopped: %s; dropped %s", dict(pipeline.counts), dict(pipeline.dropped))
    return code


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow tickhandler"))
