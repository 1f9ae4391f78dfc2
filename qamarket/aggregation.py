"""Tick -> bar aggregation: realtime bars, closed 1-min bars, N-min and daily bars. Pure, no I/O.

:class:`BarAggregator` handles one instrument; :class:`Aggregator` routes many by symbol.
Both return, from every call, a sequence of :class:`~qamarket.models.Bar` (empty tuple
when nothing is due): closed bars (``final=True``) first, 1-min before N-min before daily,
then realtime updates (``final=False``).

Rules
-----
* Labels are bar starts, clock aligned within sessions (see :mod:`qamarket.sessions`);
  N-min bars never span a break. Auction ticks fold into the first bar of the session.
* A 1-min bar closes exactly once: when a tick of a later minute arrives, or when
  :meth:`BarAggregator.on_timer` is called with a time at or after the bar's close time
  (its end; + 1 s grace at a session/segment end). No ``:00`` tick is needed. An N-min
  bar closes with its last minute, when a tick of a later bucket arrives, or by timer;
  the daily bar on a trading-day change or by timer after the day session.
* A tick for a bar that is already closed is *late*: dropped and counted in ``stats``.
* Volume/turnover are deltas of the cumulative fields. Baseline: the first tick seen,
  and the tick after a cumulative decrease (counted as ``volume_reset``). On a new
  trading day the baseline is ``day_baseline``: ``"first_tick"`` (vn.py's rule: the
  first tick's cumulative is not counted), ``"zero"`` (count the day's cumulative from
  0) or ``"auto"`` (default: zero when the day's first tick is an auction tick — so
  the opening auction volume lands in the first bar — else the first tick).
* Between two ticks of one bar, a rise of the day's ``high_price`` (fall of
  ``low_price``) means a trade the snapshots missed: the bar's high (low) absorbs it.
* Realtime updates of the open bar are emitted at most once per ``rt_interval`` seconds
  of the injectable ``clock`` per instrument.

The hot path (a tick inside the open minute) touches only a few slotted attributes and
allocates nothing; everything else is in ``_slow``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .models import DEFAULT_REGISTRY, UNSET_PRICE, Bar, InstrumentRegistry, InstrumentSpec, Tick, UnknownInstrument
from .sessions import (
    DEFAULT_CALENDAR, END_GRACE_MS, FREQ_MINUTES, MS_MIN, Calendar, Phase, day_ms, template,
)

_EMPTY: tuple[Bar, ...] = ()
_UNSET = UNSET_PRICE


class _Acc:
    """An N-min or daily bar being built from closed 1-min bars."""

    __slots__ = ("freq", "label", "end", "close_at", "last_minute", "day", "open", "high", "low", "close",
                 "volume", "turnover", "oi", "count")

    def __init__(self, freq: str) -> None:
        self.freq = freq
        self.label = -1  # -1 = nothing open


class BarAggregator:
    """Bars of one instrument. ``freqs`` beyond ``"1min"`` (always produced): N-min and/or ``"1day"``."""

    __slots__ = (
        "symbol", "exchange", "spec", "stats", "_tpl", "_cal", "_accs", "_daily", "_rt_freqs", "_rt",
        "_clock", "_rt_interval", "_rt_next", "_day_baseline", "_timer_delay",
        "_start", "_end", "_label", "_open", "_day", "_o", "_h", "_l", "_last", "_count",
        "_vol0", "_to0", "_vacc", "_tacc", "_watermark", "_lab_delta", "_close_delta", "_grace_end",
    )

    def __init__(
        self,
        symbol: str,
        exchange: str,
        spec: InstrumentSpec | None = None,
        *,
        freqs: Iterable[str] = ("1min", "5min"),
        realtime: Iterable[str] = ("1min",),
        rt_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        calendar: Calendar | None = None,
        day_baseline: str = "auto",
        timer_delay_ms: int = 0,
    ) -> None:
        self.symbol = symbol
        self.exchange = exchange
        self.spec = spec or DEFAULT_REGISTRY.get(symbol, exchange)
        self._tpl = template(self.spec)
        self._cal = calendar or DEFAULT_CALENDAR
        freqs = tuple(freqs)
        for f in freqs:
            if f != "1min" and f != "1day" and f not in FREQ_MINUTES:
                raise ValueError(f"unknown frequency {f!r}")
        self._accs = [_Acc(f) for f in sorted({f for f in freqs if f in FREQ_MINUTES and f != "1min"},
                                              key=FREQ_MINUTES.__getitem__)]
        self._daily = _Acc("1day") if "1day" in freqs else None
        self._rt_freqs = tuple(realtime)
        for f in self._rt_freqs:
            if f != "1min" and f not in {a.freq for a in self._accs}:
                raise ValueError(f"realtime frequency {f!r} is not among the produced frequencies")
        self._rt = bool(self._rt_freqs)
        self._clock = clock
        self._rt_interval = rt_interval
        self._rt_next = float("-inf")
        if day_baseline not in ("auto", "zero", "first_tick"):
            raise ValueError("day_baseline must be 'auto', 'zero' or 'first_tick'")
        self._day_baseline = day_baseline
        self._timer_delay = timer_delay_ms
        self.stats: dict[str, int] = {"late": 0, "outside_session": 0, "volume_reset": 0}
        self._start = 0
        self._end = 0
        self._label = -1
        self._open = False
        self._day: str | None = None
        self._o = self._h = self._l = 0.0
        self._last: Tick | None = None
        self._count = 0
        self._vol0 = self._to0 = self._vacc = self._tacc = 0.0
        self._watermark = -(1 << 62)
        self._lab_delta = self._tpl.label_delta
        self._close_delta = self._tpl.close_delta
        self._grace_end = self._tpl.grace_end

    # ------------------------------------------------------------------------------------ hot path
    def on_tick(self, tick: Tick) -> Sequence[Bar]:
        """Feed one (cleaned) tick; returns the bars it completes or updates (often ``()``)."""
        t = tick.datetime
        if self._start <= t < self._end:
            last = self._last
            if tick.volume < last.volume:  # type: ignore[union-attr]
                return self._slow(tick, t)
            p = tick.last_price
            if p > self._h:
                self._h = p
            elif p < self._l:
                self._l = p
            hp = tick.high_price
            if hp > self._h and hp < _UNSET and last.high_price and hp > last.high_price:  # type: ignore[union-attr]
                self._h = hp
            lp = tick.low_price
            if lp < self._l and lp and lp < last.low_price:  # type: ignore[union-attr]
                self._l = lp
            self._last = tick
            self._count += 1
            if self._rt:
                now = self._clock()
                if now >= self._rt_next:
                    return self._realtime(now, [])
            return _EMPTY
        return self._slow(tick, t)

    # ------------------------------------------------------------------------------------ slow path
    def _slow(self, tick: Tick, t: int) -> Sequence[Bar]:
        mod = t // MS_MIN % 1440
        d = self._lab_delta[mod]
        floor = t - t % MS_MIN
        if d is None:
            if self._grace_end[mod] and t - floor < END_GRACE_MS:
                lab = floor - MS_MIN
            else:
                self.stats["outside_session"] += 1
                return _EMPTY
        else:
            lab = floor + d * MS_MIN
        last = self._last
        if lab == self._label and self._open:
            # same open bar: an auction tick before the label, or a cumulative reset
            self._absorb(tick, last)
            return self._maybe_rt([])
        close_at = lab + self._close_delta[lab // MS_MIN % 1440]
        if lab < self._label or close_at <= self._watermark:
            self.stats["late"] += 1
            return _EMPTY
        out: list[Bar] = []
        if self._open:
            self._close_minute(out)
        day = tick.trading_day or self._cal.trading_day(t)
        if day != self._day:
            for acc in self._accs:
                if acc.label >= 0:
                    self._close_acc(acc, out)
            if self._daily is not None and self._daily.label >= 0:
                self._close_acc(self._daily, out)
            mode = self._day_baseline
            if last is None or mode == "first_tick" or (
                mode == "auto" and self._tpl.phase[mod] is not Phase.AUCTION
            ):
                self._vol0 = tick.volume
                self._to0 = tick.turnover
            else:
                self._vol0 = 0.0
                self._to0 = 0.0
            self._day = day
        else:
            for acc in self._accs:
                if 0 <= acc.label and acc.end <= lab:
                    self._close_acc(acc, out)
            if tick.volume < last.volume:  # type: ignore[union-attr]
                self.stats["volume_reset"] += 1
                self._vol0 = tick.volume
                self._to0 = tick.turnover
            else:
                self._vol0 = last.volume  # type: ignore[union-attr]
                self._to0 = last.turnover  # type: ignore[union-attr]
        self._vacc = self._tacc = 0.0
        p = tick.last_price
        self._o = self._h = self._l = p
        self._label = self._start = lab
        self._end = close_at
        self._open = True
        self._last = tick
        self._count = 1
        return self._maybe_rt(out)

    def _absorb(self, tick: Tick, last: Any) -> None:
        p = tick.last_price
        if p > self._h:
            self._h = p
        if p < self._l:
            self._l = p
        if tick.volume < last.volume:
            self.stats["volume_reset"] += 1
            self._vacc += last.volume - self._vol0
            self._tacc += last.turnover - self._to0
            self._vol0 = tick.volume
            self._to0 = tick.turnover
        else:
            hp = tick.high_price
            if hp > self._h and hp < _UNSET and last.high_price and hp > last.high_price:
                self._h = hp
            lp = tick.low_price
            if lp < self._l and lp and lp < last.low_price:
                self._l = lp
        self._last = tick
        self._count += 1

    def _maybe_rt(self, out: list[Bar]) -> Sequence[Bar]:
        if self._rt and self._open:
            now = self._clock()
            if now >= self._rt_next:
                return self._realtime(now, out)
        return out or _EMPTY

    def _realtime(self, now: float, out: list[Bar]) -> list[Bar]:
        self._rt_next = now + self._rt_interval
        cur = self._minute_bar(False)
        for f in self._rt_freqs:
            if f == "1min":
                out.append(cur)
                continue
            acc = next(a for a in self._accs if a.freq == f)
            nlab = self._label + self._tpl.n_label_delta[f][self._label // MS_MIN % 1440] * MS_MIN
            if acc.label == nlab:
                out.append(Bar(
                    symbol=self.symbol, exchange=self.exchange, freq=f, datetime=nlab,  # type: ignore[arg-type]
                    trading_day=acc.day, open=acc.open, high=max(acc.high, cur.high), low=min(acc.low, cur.low),
                    close=cur.close, volume=acc.volume + cur.volume, turnover=acc.turnover + cur.turnover,
                    open_interest=cur.open_interest, final=False, tick_count=acc.count + cur.tick_count,
                ))
            else:
                out.append(Bar(
                    symbol=self.symbol, exchange=self.exchange, freq=f, datetime=nlab,  # type: ignore[arg-type]
                    trading_day=cur.trading_day, open=cur.open, high=cur.high, low=cur.low, close=cur.close,
                    volume=cur.volume, turnover=cur.turnover, open_interest=cur.open_interest, final=False,
                    tick_count=cur.tick_count,
                ))
        return out

    def _minute_bar(self, final: bool) -> Bar:
        last = self._last
        return Bar(
            symbol=self.symbol, exchange=self.exchange, freq="1min", datetime=self._label,  # type: ignore[arg-type]
            trading_day=self._day or "", open=self._o, high=self._h, low=self._l, close=last.last_price,  # type: ignore[union-attr]
            volume=last.volume - self._vol0 + self._vacc, turnover=last.turnover - self._to0 + self._tacc,  # type: ignore[union-attr]
            open_interest=last.open_interest, final=final, tick_count=self._count,  # type: ignore[union-attr]
        )

    def _close_minute(self, out: list[Bar]) -> None:
        bar = self._minute_bar(True)
        out.append(bar)
        self._open = False
        self._start = self._end = 0
        lab = self._label
        mod = lab // MS_MIN % 1440
        tpl = self._tpl
        for acc in self._accs:
            nlab = lab + tpl.n_label_delta[acc.freq][mod] * MS_MIN
            if acc.label != nlab:
                if acc.label >= 0:
                    self._close_acc(acc, out)
                ncd = tpl.n_close_delta[acc.freq][nlab // MS_MIN % 1440]
                self._start_acc(acc, bar, nlab, nlab + ncd)
            else:
                self._merge_acc(acc, bar)
            if lab == acc.last_minute:
                self._close_acc(acc, out)
        daily = self._daily
        if daily is not None:
            if daily.label >= 0 and daily.day == bar.trading_day:
                self._merge_acc(daily, bar)
            else:
                if daily.label >= 0:
                    self._close_acc(daily, out)
                dlab = day_ms(bar.trading_day)
                self._start_acc(daily, bar, dlab, dlab + tpl.day_close_min * MS_MIN + END_GRACE_MS)

    @staticmethod
    def _start_acc(acc: _Acc, bar: Bar, label: int, close_at: int) -> None:
        acc.label = label
        acc.close_at = close_at
        acc.end = close_at - END_GRACE_MS if close_at % MS_MIN == END_GRACE_MS else close_at
        acc.last_minute = acc.end - MS_MIN
        acc.day = bar.trading_day
        acc.open = bar.open
        acc.high = bar.high
        acc.low = bar.low
        acc.close = bar.close
        acc.volume = bar.volume
        acc.turnover = bar.turnover
        acc.oi = bar.open_interest
        acc.count = bar.tick_count

    @staticmethod
    def _merge_acc(acc: _Acc, bar: Bar) -> None:
        if bar.high > acc.high:
            acc.high = bar.high
        if bar.low < acc.low:
            acc.low = bar.low
        acc.close = bar.close
        acc.volume += bar.volume
        acc.turnover += bar.turnover
        acc.oi = bar.open_interest
        acc.count += bar.tick_count

    def _close_acc(self, acc: _Acc, out: list[Bar]) -> None:
        out.append(Bar(
            symbol=self.symbol, exchange=self.exchange, freq=acc.freq, datetime=acc.label,  # type: ignore[arg-type]
            trading_day=acc.day, open=acc.open, high=acc.high, low=acc.low, close=acc.close, volume=acc.volume,
            turnover=acc.turnover, open_interest=acc.oi, final=True, tick_count=acc.count,
        ))
        acc.label = -1

    # ------------------------------------------------------------------------------------ timer
    def on_timer(self, now: int) -> Sequence[Bar]:
        """Close every bar whose close time is ``<= now - timer_delay_ms`` (exchange-local ms).

        Afterwards a tick for any bar closing at or before that time is late.
        """
        now -= self._timer_delay
        if now > self._watermark:
            self._watermark = now
        out: list[Bar] = []
        if self._open and self._end <= now:
            self._close_minute(out)
        for acc in self._accs:
            if acc.label >= 0 and acc.close_at <= now:
                self._close_acc(acc, out)
        daily = self._daily
        if daily is not None and daily.label >= 0 and daily.close_at <= now:
            self._close_acc(daily, out)
        return out or _EMPTY

    def flush(self) -> Sequence[Bar]:
        """Close everything open now (end of a replay / shutdown), regardless of time."""
        out: list[Bar] = []
        if self._open:
            self._close_minute(out)
        for acc in self._accs:
            if acc.label >= 0:
                self._close_acc(acc, out)
        if self._daily is not None and self._daily.label >= 0:
            self._close_acc(self._daily, out)
        return out

    def current(self) -> Bar | None:
        """The open 1-min bar as a realtime (``final=False``) bar, or ``None``."""
        return self._minute_bar(False) if self._open else None


class Aggregator:
    """Many instruments: routes ticks by symbol to lazily created :class:`BarAggregator` s.

    Keyword arguments are passed to every :class:`BarAggregator`. Ticks of an instrument
    without a spec are counted in ``stats["unknown_instrument"]`` and dropped.
    """

    def __init__(self, registry: InstrumentRegistry | None = None, **kwargs: Any) -> None:
        self.registry = registry or DEFAULT_REGISTRY
        self._kwargs = kwargs
        self._aggs: dict[str, BarAggregator] = {}
        self.unknown = 0

    def get(self, symbol: str, exchange: str) -> BarAggregator:
        agg = self._aggs.get(symbol)
        if agg is None:
            agg = self._aggs[symbol] = BarAggregator(
                symbol, exchange, self.registry.get(symbol, exchange), **self._kwargs
            )
        return agg

    def forget(self, symbol: str) -> None:
        """Drop one instrument's state (its bars are then rebuilt from the ticks fed again)."""
        self._aggs.pop(symbol, None)

    def on_tick(self, tick: Tick) -> Sequence[Bar]:
        agg = self._aggs.get(tick.symbol)
        if agg is None:
            try:
                agg = self.get(tick.symbol, tick.exchange)
            except UnknownInstrument:
                self.unknown += 1
                return _EMPTY
        return agg.on_tick(tick)

    def on_timer(self, now: int) -> Sequence[Bar]:
        out: list[Bar] = []
        for agg in self._aggs.values():
            r = agg.on_timer(now)
            if r:
                out.extend(r)
        return out or _EMPTY

    def flush(self) -> list[Bar]:
        out: list[Bar] = []
        for agg in self._aggs.values():
            out.extend(agg.flush())
        return out

    @property
    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {"unknown_instrument": self.unknown}
        for agg in self._aggs.values():
            for k, v in agg.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def __len__(self) -> int:
        return len(self._aggs)
