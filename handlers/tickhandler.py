"""``qaflow tickhandler``: ticks in, clean -> persist -> realtime and closed bars out.

One process consumes the durable tick queue in batches (:class:`qapubsub.batch.BatchConsumer`)
and for every batch, in this order:

1. cleans each tick (:class:`qamarket.cleaning.TickCleaner`: bad/unset prices, duplicates,
   out-of-order, outside the instrument's sessions), counting each drop reason;
2. persists the kept ticks (:class:`qamarket.store.TickStore`, bucketed and idempotent:
   a redelivered or replayed tick is not stored twice and not aggregated twice);
3. aggregates the newly stored ticks (:class:`qamarket.aggregation.Aggregator`);
4. upserts the closed bars (:class:`qamarket.store.BarStore`) and publishes them to
   ``qa.bar`` with a deterministic message id ``bar.<freq>.<EX>.<symbol>.<label>``
   (confirmed), and the realtime bars to ``qa.rtbar`` (throttled to one per 500 ms per
   instrument by the aggregator);
5. only then acknowledges the batch.

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
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from qamarket.aggregation import Aggregator
from qamarket.cleaning import DUPLICATE, OUT_OF_ORDER, TickCleaner
from qamarket.models import DEFAULT_REGISTRY, Bar, Tick, TickBatch, UnknownInstrument
from qamarket.sessions import to_ms
from qapubsub import keys
from qapubsub.handling import Transient
from qapubsub.settings import Settings
from qapubsub.topology import Topology

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


class TickPipeline:
    """The tickhandler's work, independent of how batches arrive (tests drive it directly)."""

    def __init__(self, tick_store: Any, bar_store: Any, publish_bars: Any, *, freqs: Sequence[str] = ALL_FREQS,
                 realtime: Sequence[str] = ("1min",), clock: FeedClock | None = None, timer_grace_ms: int = 1000,
                 check_sessions: bool = True, takeover_hold: float = 2.0) -> None:
        self.ticks = tick_store
        self.bars = bar_store
        self.publish_bars = publish_bars  # (closed: list[Bar], realtime: list[Bar]) -> None, confirmed on return
        self.freqs = tuple(dict.fromkeys(("1min", *freqs)))
        self.agg = Aggregator(freqs=self.freqs, realtime=tuple(realtime))
        self.clock = clock or FeedClock()
        self.timer_grace_ms = timer_grace_ms
        self.check_sessions = check_sessions
        self.cleaners: dict[tuple[str, str], TickCleaner] = {}
        self.dropped: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._published_upto: dict[tuple[str, str, str], int] = {}  # bars at or before are stored
        self._recovered: set[tuple[str, str]] = set()
        self.takeover_hold = takeover_hold
        self._hold_until: dict[tuple[str, str], float] = {}  # instrument -> monotonic end of its hold
        self._held: dict[tuple[str, str], list[Bar]] = {}
        self._outbox: list[Bar] = []  # closed bars to publish (kept across a failed publish)
        self._last_batch_at = 0.0  # monotonic time of the last batch: the timer closes bars only after a lull
        self._marks_loaded = False
        self._unstored: list[Bar] = []  # published, not yet in the bar store

    # recovery ----------------------------------------------------------------------------------
    def recover(self, exchange: str, symbol: str) -> int:
        """Rebuild one instrument's bars from its stored ticks of the current trading day.

        Done the first time this process sees the instrument (after a start, or when it takes
        over a shard), never for instruments it does not handle: with several shards the store
        holds every shard's instruments, and rebuilding those here would let this process's
        timer close bars it does not own. Returns the ticks replayed.
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
                self._emit(self.agg.on_tick(t), replaying=True)
                self.clock.saw(t.datetime)
        if todays:
            log.info("rebuilt %s.%s bars from %d stored ticks", exchange, symbol, len(todays))
        return len(todays)

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
        """Clean, persist, aggregate, publish. Returns ``{delivery_tag: reason}`` to dead-letter.

        If anything fails, every cleaner touched is put back as it was, so the redelivered batch
        is judged exactly as this one was (else its ticks would be dropped as duplicates).
        """
        saved: dict[tuple[str, str], Any] = {}
        try:
            return self._handle(items, saved)
        except BaseException:
            for key, state in saved.items():
                cleaner = self.cleaners.get(key)
                if cleaner is not None:
                    cleaner.restore(state)
            raise

    def _handle(self, items: Sequence[tuple[Tick | TickBatch, Any]], saved: dict[tuple[str, str], Any]) -> dict[int, str]:
        self._last_batch_at = time.monotonic()
        self._release_holds()
        # Instruments seen for the first time are rebuilt from the store first, and only now (not
        # at start): a standby instance of a shard gets its first batch when it takes over, and must
        # start from what its predecessor stored.
        for payload, _delivery in items:
            key = (payload.exchange, payload.symbol)
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
                    key = (cur_ex, cur_sym)
                    if key not in saved:
                        saved[key] = cleaner.save()
                reason = check(t)
                if reason is None:
                    keep(t)
                elif redelivered and reason in (OUT_OF_ORDER, DUPLICATE):
                    late.append(t)
                else:
                    dropped[reason] += 1
        self.counts["received"] += received
        try:
            result = self.ticks.write(kept)
        except Exception as exc:  # pymongo errors: the database is down or refused the write
            raise Transient(f"tick store: {type(exc).__name__}: {exc}") from exc
        self.counts["stored"] += result.stored
        self.counts["skipped_stored"] += result.skipped
        if late:
            try:
                late_result = self.ticks.write_late(late)
            except Exception as exc:
                raise Transient(f"tick store (late ticks): {type(exc).__name__}: {exc}") from exc
            self.counts["stored_late"] += late_result.stored
            self.counts["skipped_stored"] += late_result.skipped
            # Rebuild those instruments with the late ticks in place: bars still open or still held
            # get them; bars already published stay as they were (their ids are final).
            for ex, sym in {(t.exchange, t.symbol) for t in late_result.new}:
                self.agg.forget(sym)
                self.cleaners.pop((ex, sym), None)
                self._held.pop((ex, sym), None)
                self.recover(ex, sym)
        self._emit(self._aggregate(result.new))
        return rejected

    def _aggregate(self, new: Sequence[Tick]) -> list[Bar]:
        """Feed the newly stored ticks to their instruments' aggregators.

        The store returns them grouped by instrument, each run in key order: the aggregator is
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
        self._release_holds()
        now = self.clock.now()
        # The timer is for a *silent* feed. While batches keep coming (a backlog being worked
        # through, or a stall of this process) the feed clock runs ahead of the ticks still queued:
        # closing by it would cut bars short. Then the next tick closes the bar instead.
        quiet = time.monotonic() - self._last_batch_at >= self.timer_grace_ms / 1000
        if now is not None and quiet:
            self._emit(self.agg.on_timer(now - self.timer_grace_ms))
        elif self._outbox or self._unstored:
            self._emit(())

    def flush(self) -> None:
        """Stopping: release every hold and publish what is pending (a restart would redo it anyway)."""
        self._release_holds(now=float("inf"))
        if self._outbox or self._unstored:
            self._emit(())

    def _release_holds(self, now: float | None = None) -> None:
        if not self._hold_until:
            return
        now = time.monotonic() if now is None else now
        for key in [k for k, until in self._hold_until.items() if until <= now]:
            del self._hold_until[key]
            self._emit(self._held.pop(key, []))

    def _emit(self, bars: Sequence[Bar], replaying: bool = False) -> None:
        """Closed bars: published (confirmed) first, then stored; realtime bars: published.

        Publishing before storing means a crash in between makes the restart publish the bar
        again (same id, consumers deduplicate) instead of never. Bars of an instrument still in
        its take-over hold wait in ``_held``.
        """
        realtime = []
        for b in bars:
            if not b.final:
                if not replaying:
                    realtime.append(b)
                continue
            key = (b.exchange, b.symbol)
            upto = self._published_upto.get((b.exchange, b.symbol, b.freq))
            if upto is not None and b.datetime <= upto:
                continue  # published before (a restart, or a rebuild)
            if key in self._hold_until:
                self._held.setdefault(key, []).append(b)
                continue
            self._outbox.append(msgspec.structs.replace(b, id=bar_message_id(b)))
            self._published_upto[(b.exchange, b.symbol, b.freq)] = b.datetime
        if self._outbox or realtime:
            try:
                self.publish_bars(self._outbox, realtime)
            except Exception as exc:  # the outbox is kept and published again with the next batch
                raise Transient(f"bar publish: {type(exc).__name__}: {exc}") from exc
            self.counts["bars_closed"] += len(self._outbox)
            self.counts["bars_realtime"] += len(realtime)
            self._unstored.extend(self._outbox)
            self._outbox = []
        if self._unstored:
            try:
                self.bars.write(self._unstored)
            except Exception as exc:
                raise Transient(f"bar store: {type(exc).__name__}: {exc}") from exc
            self._unstored = []


def make_bar_publisher(connection: Any, topology: Topology) -> Any:
    """Closed bars: persistent, confirmed before the batch is acknowledged. Realtime bars: transient,
    their confirms are not waited for (a lost realtime update is replaced 500 ms later).

    ``connection`` should not be the consumer's: on the consumer's socket a confirm would
    queue behind up to ``--prefetch`` deliveries (measured: most of a batch's time).
    """
    from qapubsub.sync import StreamPublisher

    closed_pub = StreamPublisher(connection, topology=topology, persistent=True, batch_size=1000)
    rt_pub = StreamPublisher(connection, topology=topology, persistent=False, batch_size=5000)

    def publish(closed: Sequence[Bar], realtime: Sequence[Bar]) -> None:
        for b in realtime:
            rt_pub.publish(topology.rtbar, keys.bar_key(b.freq, b.exchange, b.symbol), b)
        for b in closed:
            closed_pub.publish(topology.bar, keys.bar_key(b.freq, b.exchange, b.symbol), b)
        if closed:
            closed_pub.flush()
        else:
            connection.blocking.process_data_events(0)  # send the realtime bars now, read confirms

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


def _idle(pipeline: TickPipeline, bar_conn: Any) -> None:
    pipeline.on_timer()
    if bar_conn.is_open:
        bar_conn.blocking.process_data_events(0)  # heartbeats and confirms of the bar connection


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--freqs", default=",".join(ALL_FREQS), help="bar frequencies (1min always)")
    parser.add_argument("--realtime", default="1min", help="frequencies with realtime updates on qa.rtbar")
    parser.add_argument("--batch-size", type=int, default=1000, help="messages per batch (default 1000)")
    parser.add_argument("--batch-ticks", type=int, default=30_000,
                        help="also cut a batch at this many ticks (TickBatch messages hold many; default 30000)")
    parser.add_argument("--batch-wait", type=float, default=0.02,
                        help="seconds to wait to fill a batch (default 0.02; the realtime bars' p50 latency follows it: "
                             "0.005 halves it at ~1.6x the CPU per tick)")
    parser.add_argument("--prefetch", type=int, default=4000)
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
    import pymongo

    from qamarket.store import BarStore, TickStore
    from qapubsub.sync import Connection

    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    db = pymongo.MongoClient(settings.mongo_url, serverSelectionTimeoutMS=5000)[settings.mongo_db]
    conn = Connection(settings, client_name="qaflow-tickhandler")
    freqs = [f.strip() for f in args.freqs.split(",") if f.strip()]
    unknown = sorted(set(freqs) - set(ALL_FREQS))
    if unknown:
        from qapubsub.settings import ConfigError
        raise ConfigError(f"--freqs: unknown frequency {', '.join(unknown)} (use {', '.join(ALL_FREQS)})")
    bar_conn = Connection(settings, client_name="qaflow-tickhandler-bars")
    pipeline = TickPipeline(TickStore(db), BarStore(db), make_bar_publisher(bar_conn, topo), freqs=freqs,
                            realtime=[f.strip() for f in args.realtime.split(",") if f.strip()],
                            clock=FeedClock(args.clock), check_sessions=not args.no_session_check,
                            takeover_hold=args.takeover_hold)
    import os

    shards = args.shards if args.shards is not None else int(os.environ.get("QA_TICK_SHARDS", "1") or 1)
    if shards < 1 or not 0 <= args.shard < shards:
        from qapubsub.settings import ConfigError
        raise ConfigError(f"--shard {args.shard} is not one of the {shards} shard(s) (--shards / QA_TICK_SHARDS)")
    topo.declare_sync(conn.channel(), queues=[topo.tick_queue(i) for i in range(shards)])
    consumer = _tick_batch_consumer(conn, topo.tick_queue(args.shard), pipeline.handle, message_type=Tick | TickBatch,
                                    max_batch_ticks=max(1, args.batch_ticks),
                             topology=topo, batch_size=args.batch_size, batch_wait=args.batch_wait,
                             prefetch=args.prefetch, on_idle=lambda: _idle(pipeline, bar_conn), idle_interval=0.1,
                             on_stop=pipeline.flush)
    return consumer, pipeline


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    consumer, pipeline = build(settings, args)
    log.info("tickhandler consuming %s", consumer.queue_name)
    code = consumer.run_until_signal()
    log.info("tickhandler stopped: %s; dropped %s", dict(pipeline.counts), dict(pipeline.dropped))
    return code


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow tickhandler"))
