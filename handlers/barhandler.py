"""``qaflow barhandler``: history from MongoDB + live bars, merged; indicators; history requests.

For each subscription (exchange, symbol, frequency) -- given with ``--subscribe`` or added at
run time by the first history request for it -- the daemon

1. binds its own bounded live queue (``Topology.live_queue``: exclusive, ``x-max-length``,
   drop-head) to ``qa.bar`` and ``qa.rtbar`` with key ``<freq>.<EXCHANGE>.<symbol>``;
2. loads history: our ``bars`` collection (:class:`qamarket.store.BarStore`, which the
   tickhandler fills with today's closed bars too) and QUANTAXIS's ``future_min`` /
   ``stock_min`` / ``future_day`` / ``stock_day`` (:mod:`qamarket.quantaxis`) where the user
   has them; ours win on a label both hold;
3. merges the live stream into a :class:`qamarket.history.BarSeries` (dedupe by message id
   and label, realtime bar replaced on each update, stale realtime updates ignored) and keeps
   the subscribed indicators up to date;
4. emits each new closed bar once to exchange ``qa.ibar`` (same key) as a
   :class:`qamarket.rpc.IndicatorBar` with the series' indicator values and a deterministic
   message id ``ibar.<freq>.<EX>.<symbol>.<label>``. Bars the live queue shed under overload
   are not lost: a closed bar carries ``prev``, the label of the series' bar published before
   it; when that is newer than the series' newest bar, the bars in between are read from the
   bar store and emitted first, in order. A series that then goes quiet (the market pauses)
   would wait for its next bar to learn of a shed one: so when a series hears nothing for its
   bar's length + ``--quiet-check`` seconds, its closed bars newer than its newest are read from
   the store once (:meth:`BarService.check_quiet`).

History requests (:class:`qamarket.rpc.HistoryRequest`) arrive on ``qa.barhandler.history``
and are answered to ``reply_to`` with ``correlation_id``; a bad request gets an error reply
naming the field and is acknowledged (never retried). Two threads, one connection each:
the request consumer (main thread, ``run_until_signal``) and the live consumer.
SIGTERM: stop taking requests, finish the one in hand, stop the live consumer, exit 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any


from qamarket.history import BarSeries, IndicatorSpec, merge_sources, parse_indicators, split_indicator_list
from qamarket.models import EXCHANGES, FUTURES_EXCHANGES, Bar
from qamarket.rpc import BadRequest, HistoryReply, IndicatorBar, parse_request
from qamarket.sessions import FREQ_MINUTES
from qapubsub import keys
from qapubsub.messages import now_ns
from qapubsub.settings import ConfigError, Settings, mongo_client
from qapubsub.topology import Topology

log = logging.getLogger(__name__)

FREQS = ("1min", "5min", "15min", "30min", "60min", "1day")
_FREQ_SECONDS = {**{f: m * 60 for f, m in FREQ_MINUTES.items()}, "1day": 86_400}
SeriesKey = tuple[str, str, str]  # (exchange, symbol, freq)


def ibar_message_id(bar: Bar) -> str:
    return f"ibar.{bar.freq}.{bar.exchange}.{bar.symbol}.{bar.datetime}"


def parse_subscription(text: str) -> list[SeriesKey]:
    """``"SHFE.rb2605:1min,5min"`` -> ``[("SHFE", "rb2605", "1min"), ("SHFE", "rb2605", "5min")]``."""
    inst, _, freqs = text.partition(":")
    ex, _, sym = inst.partition(".")
    ex = ex.upper()
    if ex not in EXCHANGES or not sym:
        raise ConfigError(f"--subscribe {text!r}: expected EXCHANGE.symbol:freq[,freq], e.g. SHFE.rb2605:1min,5min "
                          f"(exchanges: {', '.join(EXCHANGES)})")
    out = []
    for f in (freqs or "1min").split(","):
        f = f.strip()
        if f not in FREQS:
            raise ConfigError(f"--subscribe {text!r}: unknown frequency {f!r} (use {', '.join(FREQS)})")
        try:
            keys.bar_key(f, ex, sym)
        except ValueError as exc:
            raise ConfigError(f"--subscribe {text!r}: {exc}") from None
        out.append((ex, sym, f))
    return out


class HistorySource:
    """Reads history of one series from our ``bars`` collection and, if given, QUANTAXIS's database."""

    def __init__(self, bar_store: Any, quantaxis_db: Any = None) -> None:
        self.bars = bar_store
        self.qa = quantaxis_db

    def last_label(self, ex: str, sym: str, freq: str) -> int | None:
        b = self.bars.last_bar(ex, sym, freq)
        return b.datetime if b is not None else None

    def load(self, ex: str, sym: str, freq: str, *, count: int | None = None, start: int | None = None,
             end: int | None = None) -> tuple[list[Bar], dict[str, int]]:
        """Merged bars (ours first), the newest ``count`` of ``[start, end]``; and how many came from where."""
        ours = self.bars.bars(ex, sym, freq, start, end, count)
        theirs = self._quantaxis(ex, sym, freq, count, start, end, ours)
        merged = merge_sources(ours, theirs)
        if count is not None:
            merged = merged[-count:]
        return merged, {"bars": len(ours), "quantaxis": len(theirs)}

    def _quantaxis(self, ex: str, sym: str, freq: str, count: int | None, start: int | None, end: int | None,
                   ours: Sequence[Bar]) -> list[Bar]:
        if self.qa is None:
            return []
        from qamarket import quantaxis

        market = "future" if ex in FUTURES_EXCHANGES else "stock"

        def fetch(s: int | None) -> list[Bar]:
            if freq == "1day":
                return quantaxis.fetch_day_bars(self.qa, sym, s, end, market=market, exchange=ex)
            return quantaxis.fetch_min_bars(self.qa, sym, freq, s, end, market=market, exchange=ex)

        if start is not None or count is None:
            return fetch(start)
        # count only: read a window back from the newest bar either side holds, widening it until enough.
        anchor = self._newest(market, sym, freq, ex)
        if ours:
            anchor = max(anchor or 0, ours[-1].datetime)
        if anchor is None:
            return []
        if end is not None:
            anchor = min(anchor, end)
        minutes = 240 if freq == "1day" else FREQ_MINUTES[freq]
        days = count * minutes / 200 * 1.5 + 4  # ~200-350 trading minutes a day, weekends, holidays
        got: list[Bar] = []
        for _ in range(6):
            got = fetch(anchor - int(days * 86_400_000))
            if len(got) >= count:
                break
            days *= 4
        return got

    def _newest(self, market: str, sym: str, freq: str, ex: str) -> int | None:
        from qamarket import quantaxis

        codes = list(dict.fromkeys([sym, sym.upper(), sym.lower()]))
        if freq == "1day":
            doc = self.qa[f"{market}_day"].find_one({"code": {"$in": codes}}, {"_id": 0}, sort=[("date", -1)])
            return quantaxis.day_doc_to_bar(doc, symbol=sym, exchange=ex).datetime if doc else None
        doc = self.qa[f"{market}_min"].find_one({"code": {"$in": codes}, "type": freq}, {"_id": 0},
                                                sort=[("datetime", -1)])
        return quantaxis.min_doc_to_bar(doc, symbol=sym, exchange=ex, freq=freq).datetime if doc else None


class BarService:
    """The barhandler's state and rules, independent of the transport (tests drive it directly).

    ``bind(key)`` makes the live queue receive the series' bars (called outside the lock);
    ``emit(bar, indicators)`` sends a new closed bar downstream.
    """

    def __init__(self, source: HistorySource, *, bind: Callable[[SeriesKey], None] = lambda k: None,
                 emit: Callable[[Bar, dict[str, float | None]], None] = lambda b, i: None,
                 history_bars: int = 1000, max_bars: int = 10_000, max_subscriptions: int = 1000,
                 default_indicators: Sequence[IndicatorSpec] = (), gap_wait: float = 1.0,
                 quiet_after: float = 5.0) -> None:
        self.source = source
        self.gap_wait = gap_wait
        self.quiet_after = quiet_after
        self.bind = bind
        self.emit = emit
        self.history_bars = history_bars
        self.max_bars = max_bars
        self.max_subscriptions = max_subscriptions
        self.default_indicators = list(default_indicators)
        self.series: dict[SeriesKey, BarSeries] = {}
        self.counts: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._sub_lock = threading.Lock()  # one subscription set-up at a time
        self._complete: set[SeriesKey] = set()  # all the history there is has been loaded
        self._heard: dict[SeriesKey, float] = {}  # monotonic time of the series' last live bar
        self._quiet_read: dict[SeriesKey, float] = {}  # the _heard time whose quiet period was looked up

    # subscriptions ------------------------------------------------------------------------------
    def subscribe(self, key: SeriesKey, indicators: Sequence[IndicatorSpec] = (), *, count: int | None = None,
                  start: int | None = None, end: int | None = None) -> tuple[BarSeries, dict[str, int]]:
        """The series of ``key``, created (bound, history loaded) if new, and with enough history for
        a request of ``count`` bars / from ``start``."""
        ex, sym, freq = key
        sources: dict[str, int] = {}
        with self._sub_lock:
            with self._lock:
                s = self.series.get(key)
            if s is None:
                if len(self.series) >= self.max_subscriptions:
                    raise BadRequest("symbol", f"the barhandler serves at most {self.max_subscriptions} "
                                               f"subscriptions (--max-subscriptions)")
                s = BarSeries(ex, sym, freq, max_bars=self.max_bars)
                with self._lock:
                    self.series[key] = s
                self.bind(key)  # bars published from now on reach the live queue
                # Bars stored before this point are history; later ones are emitted when they come live.
                last = self.source.last_label(ex, sym, freq)
                with self._lock:
                    if last is not None and last > s.emit_after:
                        s.emit_after = last
                    s.track(self.default_indicators)
                log.info("subscribed %s", keys.bar_key(freq, ex, sym))
                self.counts["subscriptions"] += 1
                want = max(count or 0, self.history_bars)
                sources = self._load(key, s, count=want, end=None)
            warm = _warmup(indicators)
            if count is not None and key not in self._complete and len(s) < min(count + warm, self.max_bars):
                sources = self._load(key, s, count=min(count + warm, self.max_bars), end=None)
            if start is not None and key not in self._complete and (s.first_label is None or start < s.first_label):
                upto = s.first_label - 1 if s.first_label is not None else end
                sources = self._load(key, s, start=start, end=upto, complete_if_short=False)
        with self._lock:
            s.track(indicators)
        return s, sources

    def _load(self, key: SeriesKey, s: BarSeries, *, count: int | None = None, start: int | None = None,
              end: int | None = None, complete_if_short: bool = True) -> dict[str, int]:
        bars, sources = self.source.load(*key, count=count, start=start, end=end)
        with self._lock:
            added = s.add_history(bars)
        if complete_if_short and count is not None and len(bars) < count:
            self._complete.add(key)
        sources["added"] = added
        self.counts["history_bars"] += added
        return sources

    # live ------------------------------------------------------------------------------------------
    def on_live(self, bar: Bar, message_id: str | None) -> Bar | None:
        """A bar from qa.bar / qa.rtbar; returns the closed bar emitted downstream, if any.

        A closed bar whose ``prev`` (the series' bar its publisher sent before it) is newer than
        the series' newest bar means bars were missed (the live queue sheds its oldest under
        overload): they are read from the bar store and emitted first, in order (see
        :meth:`_missed`)."""
        key = (bar.exchange, bar.symbol, bar.freq)
        with self._lock:
            s = self.series.get(key)
            if s is None:
                self.counts["unsubscribed"] += 1
                return None
            last = s.last_label
            self._heard[key] = time.monotonic()
        missed: list[Bar] = []
        if bar.final and bar.prev is not None and last is not None and last < bar.prev < bar.datetime:
            missed = self._missed(key, last + 1, bar.prev)
        return self._apply(s, missed, bar, message_id)

    def _apply(self, s: BarSeries, missed: list[Bar], bar: Bar | None, message_id: str | None = None) -> Bar | None:
        """Emit the ``missed`` closed bars read from the store, then handle ``bar`` (if any)."""
        emitted: list[tuple[Bar, dict[str, float | None]]] = []
        out = None
        with self._lock:
            for b in missed:
                got = s.on_closed(b)
                if got is not None:
                    self.counts["gap_emitted"] += 1
                    emitted.append((got, s.latest_indicators()))
            if bar is not None:
                out = s.on_bar(bar, message_id if bar.final else None)
                if out is not None:
                    emitted.append((out, s.latest_indicators()))
        for b, values in emitted:
            self.counts["emitted"] += 1
            self.emit(b, values)
        return out

    def check_quiet(self, now: float | None = None) -> int:
        """Series gone quiet: emit the closed bars newer than their newest that the store has.

        A series that heard nothing at all for its bar's length + ``quiet_after`` s since its last
        live bar should have had every bar it was building closed by then (the tickhandler closes
        bars by timer ~1 s after they end). If the live queue shed the last ones, no later bar's
        ``prev`` says so while the market is quiet: the store is read once per quiet period (no
        wait). Returns how many bars were emitted. Called on the live consumer's thread.
        """
        now = time.monotonic() if now is None else now
        due: list[tuple[SeriesKey, BarSeries, int, bool]] = []
        with self._lock:
            for key, s in self.series.items():
                heard = self._heard.get(key)
                if heard is None or self._quiet_read.get(key) == heard:
                    continue
                if now - heard < _FREQ_SECONDS[key[2]] + self.quiet_after:
                    continue
                self._quiet_read[key] = heard
                last, cur = s.last_label, s.current
                if last is not None or cur is not None:
                    due.append((key, s, last + 1 if last is not None else cur.datetime, cur is not None))  # type: ignore[union-attr]
        n = 0
        for key, s, start, in_progress in due:
            name = keys.bar_key(key[2], key[0], key[1])
            try:
                bars = self._closed_in_store(key, start, None)
            except Exception as exc:  # noqa: BLE001 - MongoDB down: look again after another quiet period
                log.warning("%s quiet; reading its newer bars from the store failed: %s", name, exc)
                with self._lock:
                    self._quiet_read.pop(key, None)
                    self._heard[key] = now
                continue
            self.counts["quiet_reads"] += 1
            if not bars:
                if in_progress:  # its bar in progress should be closed by now: the publisher is late or down
                    log.info("%s quiet with a bar in progress; its closed bar is not stored (yet)", name)
                continue
            before = self.counts["gap_emitted"]
            self._apply(s, bars, None)
            n += self.counts["gap_emitted"] - before
        self.counts["quiet_emitted"] += n
        return n

    def _missed(self, key: SeriesKey, start: int, end: int) -> list[Bar]:
        """The closed bars labelled ``start..end`` from the store. The publisher stores a closed bar
        right after publishing it, so the newest may not be there yet: read again until it is, for
        up to ``gap_wait`` s; then go on with what there is (counted, logged)."""
        deadline = time.monotonic() + self.gap_wait
        while True:
            bars = self._closed_in_store(key, start, end)
            if any(b.datetime == end for b in bars) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not any(b.datetime == end for b in bars):
            self.counts["gap_unfilled"] += 1
            log.warning("missed bars of %s up to %d not in the store after %.1f s; %d found",
                        keys.bar_key(key[2], key[0], key[1]), end, self.gap_wait, len(bars))
        self.counts["gaps"] += 1
        return bars

    def _closed_in_store(self, key: SeriesKey, start: int, end: int | None) -> list[Bar]:
        bars, _sources = self.source.load(*key, start=start, end=end)
        return [b for b in bars if b.final]

    # requests ------------------------------------------------------------------------------------
    def answer(self, body: bytes) -> HistoryReply | None:
        """The reply to a request body; ``None`` when it is past its deadline (nobody waits for it)."""
        try:
            req, specs = parse_request(body)
        except BadRequest as exc:
            self.counts["bad_requests"] += 1
            return HistoryReply(ok=False, error=str(exc), field=exc.field)
        if req.deadline and now_ns() > req.deadline:
            self.counts["expired_requests"] += 1
            return None
        try:
            if req.count is not None and req.count > self.max_bars:
                raise BadRequest("count", f"count {req.count} is more than the {self.max_bars} bars kept per "
                                          f"series (--max-bars)")
            key = (req.exchange, req.symbol, req.freq)
            s, sources = self.subscribe(key, specs, count=req.count, start=req.start, end=req.end)
            with self._lock:
                bars = s.select(req.count, req.start, req.end, req.include_current)
                cols = s.indicator_columns(specs, req.count, req.start, req.end, req.include_current)
        except BadRequest as exc:
            self.counts["bad_requests"] += 1
            return HistoryReply(ok=False, request_id=req.id, error=str(exc), field=exc.field)
        except Exception as exc:  # noqa: BLE001 - answer now rather than let the client time out
            log.exception("history request failed")
            self.counts["failed_requests"] += 1
            return HistoryReply(ok=False, request_id=req.id, error=f"{type(exc).__name__}: {exc}")
        self.counts["requests"] += 1
        return HistoryReply(ok=True, request_id=req.id, symbol=req.symbol, exchange=req.exchange, freq=req.freq,
                            bars=bars, indicators=cols, sources=sources)

    def stats(self) -> dict[str, int]:
        total: Counter[str] = Counter(self.counts)
        with self._lock:
            for s in self.series.values():
                total.update(s.stats)
        return dict(total)


def _warmup(specs: Sequence[IndicatorSpec]) -> int:
    return max((int(sum(p for p in s.params if p >= 1)) for s in specs), default=0)


# ------------------------------------------------------------------------------------------ the daemon
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--subscribe", nargs="*", default=[], metavar="EX.symbol:freq[,freq]",
                        help="series to follow from the start, e.g. SHFE.rb2605:1min,5min (more are added by requests)")
    parser.add_argument("--indicators", nargs="*", default=[], metavar="IND",
                        help="indicators kept for every series and sent with each emitted bar, e.g. MA(20) MACD RSI(14)")
    parser.add_argument("--history", type=int, default=1000, help="bars of history loaded per new series (1000)")
    parser.add_argument("--max-bars", type=int, default=10_000, help="bars kept in memory per series (10000)")
    parser.add_argument("--max-subscriptions", type=int, default=1000)
    parser.add_argument("--live-max-length", type=int, default=10_000, help="bound of the live queue (drop oldest)")
    parser.add_argument("--quiet-check", type=float, default=5.0, metavar="S",
                        help="a series with no live bar for its bar's length + S seconds reads its newer closed "
                             "bars from the store once (the live queue may have shed them; default 5)")
    parser.add_argument("--quantaxis-db", default=os.environ.get("QA_QUANTAXIS_DB", "quantaxis"),
                        help="QUANTAXIS database to read future_min/stock_min/*_day from ('' to disable; "
                             "default QA_QUANTAXIS_DB or quantaxis)")
    parser.add_argument("--quantaxis-url", default=os.environ.get("QA_QUANTAXIS_MONGO_URL"),
                        help="MongoDB URL of the QUANTAXIS database (default: QA_MONGO_URL)")
    parser.add_argument("--no-republish", action="store_true", help="do not emit merged bars to qa.ibar")


class BarHandler:
    """Wires the service to two consumers (requests, live bars) and a publisher."""

    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        from qamarket.store import BarStore
        from qapubsub.sync import Connection, Consumer, Publisher, StreamPublisher

        try:
            specs = parse_indicators([t for a in args.indicators for t in split_indicator_list(a)])
        except ValueError as exc:
            raise ConfigError(f"--indicators: {exc}") from None
        self.subscriptions = [k for text in args.subscribe for k in parse_subscription(text)]
        self.topo = topo = Topology(settings.namespace if args.namespace is None else args.namespace)
        client = mongo_client(settings)
        qa_db = None
        if args.quantaxis_db:
            qa_client = client if not args.quantaxis_url else mongo_client(args.quantaxis_url)
            qa_db = qa_client[args.quantaxis_db]
        source = HistorySource(BarStore(client[settings.mongo_db]), qa_db)

        self.req_conn = Connection(settings, client_name="qaflow-barhandler-requests")
        self.live_conn = Connection(settings, client_name="qaflow-barhandler-live")
        self.replies = Publisher(self.req_conn, mandatory=False, persistent=False, max_attempts=3)
        self.ibar_pub = None if args.no_republish else StreamPublisher(self.live_conn, topology=topo, batch_size=100)
        self.service = BarService(source, bind=self._bind, emit=self._emit, history_bars=args.history,
                                  max_bars=args.max_bars, max_subscriptions=args.max_subscriptions,
                                  default_indicators=specs, quiet_after=args.quiet_check)
        live_q = topo.live_queue(topo.name(f"qa.barhandler.live.{uuid.uuid4().hex[:8]}"),
                                 max_length=args.live_max_length)
        self.live = Consumer(self.live_conn, live_q, self._on_live, message_type=Bar, topology=topo,
                             prefetch=1000, ack_every=100, on_idle=self.service.check_quiet, idle_interval=1.0)
        self.requests = Consumer(self.req_conn, topo.history_requests, self._on_request, topology=topo, prefetch=8)

    def _bind(self, key: SeriesKey) -> None:
        ex, sym, freq = key
        k = keys.bar_key(freq, ex, sym)
        self.live.bind(self.topo.bar, k)
        self.live.bind(self.topo.rtbar, k)

    def _emit(self, bar: Bar, values: dict[str, float | None]) -> None:
        if self.ibar_pub is None:
            return
        msg = IndicatorBar(bar=bar, indicators=values, id=ibar_message_id(bar))
        self.ibar_pub.publish(self.topo.ibar, keys.bar_key(bar.freq, bar.exchange, bar.symbol), msg)
        self.ibar_pub.flush()

    def _on_live(self, bar: Bar, delivery: Any) -> None:
        self.service.on_live(bar, delivery.message_id)

    def _on_request(self, body: bytes, delivery: Any) -> None:
        reply = self.service.answer(body)
        props = delivery.properties
        if reply is None:
            return
        if not props.reply_to:
            log.warning("history request without reply_to: dropped", extra={"message_id": props.message_id})
            return
        if not reply.request_id:
            reply.request_id = props.correlation_id or props.message_id or ""
        try:
            self.replies.publish("", props.reply_to, reply, correlation_id=props.correlation_id)
        except Exception as exc:  # noqa: BLE001 - the client is gone; never retry a request
            log.warning("could not reply to %s: %s", props.reply_to, exc)

    def run(self) -> int:
        t = threading.Thread(target=self.live.run, name="barhandler-live", daemon=True)
        t.start()
        if not self.live.ready.wait(30):
            raise RuntimeError("the live consumer did not start within 30 s")
        for key in self.subscriptions:
            self.service.subscribe(key)
        log.info("barhandler ready: %d series, requests on %s", len(self.service.series),
                 self.topo.history_requests.name)
        try:
            code = self.requests.run_until_signal()
        finally:
            self.live.stop()
            t.join(15)
            if self.ibar_pub is not None:
                try:
                    self.ibar_pub.flush()
                except Exception:  # noqa: BLE001
                    pass
            self.live_conn.close()
        log.info("barhandler stopped: %s", self.service.stats())
        return code


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    handler = BarHandler(settings, args)

    def stop_while_starting(signum: int, _frame: Any) -> None:
        # Nothing consumed or promised yet: loading history can be abandoned.
        log.info("signal %s while starting: exiting", signal.Signals(signum).name)
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_while_starting)
    return handler.run()


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow barhandler"))
