"""History + live bar merging and incremental indicators for one instrument/frequency. Pure, no I/O.

The barhandler keeps one :class:`BarSeries` per subscription (exchange, symbol, frequency):

* :meth:`BarSeries.add_history` merges bars read from MongoDB (our ``bars`` collection and
  QUANTAXIS's ``future_min``/``stock_min``/``*_day``; :func:`merge_sources` gives ours the
  win where both hold a label). A label already in the series is never replaced by history.
* :meth:`BarSeries.on_bar` takes a live bar from ``qa.bar`` (``final=True``) or ``qa.rtbar``
  (``final=False``) and returns the closed bar to emit downstream, or ``None``.

Rules (each has a unit test in ``tests/unit/qamarket_history``):

* **Closed bars are emitted exactly once.** A closed bar whose message id was seen before (the
  tickhandler re-publishes a bar with the same id ``bar.<freq>.<EX>.<symbol>.<label>`` after a
  crash) is a duplicate; so is one whose label already arrived live under another id. Both are
  dropped and counted (``dup_id``, ``dup_label``).
* A closed bar whose label came from history only replaces it (same bar, fresher data) and is
  emitted only if its label is after ``emit_after`` -- the newest label stored in MongoDB when
  the subscription started, so bars that were history already are not emitted as "new".
* **Gaps**: a closed bar older than the newest closed one but missing from the series (it was
  lost or delayed) is inserted in label order and emitted (``gap_filled``); indicators are then
  recomputed from the start of the series. A closed bar whose label jumps past the expected next
  label (when a ``next_label`` function is given) is accepted and counted in ``gaps``.
* **Realtime bars** replace the in-progress bar. One whose label is at or before the newest
  closed label is stale and ignored (``rt_after_close``: a realtime update that arrives after
  the close of its label). One older than the in-progress bar's label, or of the same label
  but fewer ticks (``tick_count``, then ``ts``), is out of order and ignored (``rt_out_of_order``).
  A closed bar at or after the in-progress label clears the in-progress bar.
* The series keeps at most ``max_bars`` closed bars (oldest dropped); the seen-id memory is
  bounded too.

Indicators (:func:`parse_indicator`: ``MA(20)``, ``EMA12``, ``MACD``, ``MACD(12,26,9)``, ``RSI(14)``,
``ATR(14)``, ``BOLL(20,2)``) are computed with :mod:`qamarket.indicators` over the closed bars,
incrementally as bars are appended; each output is a *column* aligned with the closed bars:
``MA(20)``; ``MACD(12,26,9).dif/.dea/.hist``; ``BOLL(20,2).up/.mid/.down``. ``None`` while warming up.
The value for the in-progress bar is computed on a copy of the indicator state, never stored.
"""
from __future__ import annotations

import bisect
import copy
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .indicators import ATR, BOLL, EMA, MA, MACD, RSI
from .models import Bar

__all__ = ["IndicatorSpec", "parse_indicator", "parse_indicators", "split_indicator_list", "merge_sources",
           "BarSeries", "INDICATOR_NAMES"]


# ------------------------------------------------------------------------------------------ indicators
@dataclass(frozen=True)
class IndicatorSpec:
    name: str  # MA, EMA, MACD, RSI, ATR, BOLL
    params: tuple[float, ...]

    @property
    def canonical(self) -> str:
        return f"{self.name}({','.join(_fmt_param(p) for p in self.params)})"

    @property
    def columns(self) -> tuple[str, ...]:
        c = self.canonical
        if self.name == "MACD":
            return (f"{c}.dif", f"{c}.dea", f"{c}.hist")
        if self.name == "BOLL":
            return (f"{c}.up", f"{c}.mid", f"{c}.down")
        return (c,)

    def make(self) -> Any:
        p = self.params
        if self.name == "MA":
            return MA(int(p[0]))
        if self.name == "EMA":
            return EMA(int(p[0]))
        if self.name == "MACD":
            return MACD(int(p[0]), int(p[1]), int(p[2]))
        if self.name == "RSI":
            return RSI(int(p[0]))
        if self.name == "ATR":
            return ATR(int(p[0]))
        return BOLL(int(p[0]), float(p[1]))


def _fmt_param(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else repr(float(p))


# name -> (defaults, how many params may be given, which are integers)
_INDICATORS: dict[str, tuple[tuple[float, ...], int]] = {
    "MA": ((5,), 1), "EMA": ((12,), 1), "MACD": ((12, 26, 9), 3), "RSI": ((14,), 1), "ATR": ((14,), 1),
    "BOLL": ((20, 2), 2),
}
INDICATOR_NAMES = tuple(_INDICATORS)
_SPEC = re.compile(r"^\s*([A-Za-z]+)\s*(?:\(\s*([^)]*)\)|[:\s]?\s*(\d+))?\s*$")
MAX_PERIOD = 10_000


def parse_indicator(text: str) -> IndicatorSpec:
    """``"MA(20)"``, ``"ma20"``, ``"MA:20"``, ``"MACD"``, ``"BOLL(20,2.5)"`` -> :class:`IndicatorSpec`.

    Raises ``ValueError`` naming the text and what is wrong.
    """
    m = _SPEC.match(text or "")
    if not m:
        raise ValueError(f"indicator {text!r}: expected NAME or NAME(params), e.g. MA(20), MACD(12,26,9)")
    name = m.group(1).upper()
    if name not in _INDICATORS:
        raise ValueError(f"indicator {text!r}: unknown name {name!r} (known: {', '.join(INDICATOR_NAMES)})")
    defaults, max_n = _INDICATORS[name]
    raw = m.group(2) if m.group(2) is not None else m.group(3)
    given: list[float] = []
    if raw is not None and raw.strip():
        for part in raw.split(","):
            try:
                given.append(float(part))
            except ValueError:
                raise ValueError(f"indicator {text!r}: parameter {part.strip()!r} is not a number") from None
    if len(given) > max_n:
        raise ValueError(f"indicator {text!r}: {name} takes at most {max_n} parameter(s)")
    params = tuple(given) + defaults[len(given):]
    periods = params[:1] if name == "BOLL" else params
    for p in periods:
        if not float(p).is_integer() or not 1 <= p <= MAX_PERIOD:
            raise ValueError(f"indicator {text!r}: period {_fmt_param(p)} must be an integer in 1..{MAX_PERIOD}")
    if name == "BOLL" and not 0 < params[1] <= 100:
        raise ValueError(f"indicator {text!r}: width {params[1]} must be in (0, 100]")
    return IndicatorSpec(name, tuple(float(p) for p in params))


def split_indicator_list(text: str) -> list[str]:
    """``"MA(5),MACD(12,26,9) RSI"`` -> ``["MA(5)", "MACD(12,26,9)", "RSI"]`` (commas inside () kept)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if depth == 0 and (ch == "," or ch.isspace() or ch == ";"):
            if cur.strip():
                out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_indicators(texts: Iterable[str]) -> list[IndicatorSpec]:
    """Parse and de-duplicate (by canonical name), keeping order."""
    out: dict[str, IndicatorSpec] = {}
    for t in texts:
        s = parse_indicator(t)
        out.setdefault(s.canonical, s)
    return list(out.values())


def _values(spec: IndicatorSpec, ind: Any) -> tuple[float | None, ...]:
    v = ind.value
    n = len(spec.columns)
    if v is None:
        return (None,) * n
    if n == 1:
        return (float(v),)
    return tuple(float(x) for x in v)


class _IndicatorState:
    __slots__ = ("spec", "ind", "columns")

    def __init__(self, spec: IndicatorSpec, bars: Sequence[Bar]) -> None:
        self.spec = spec
        self.ind = spec.make()
        self.columns: list[list[float | None]] = [[] for _ in spec.columns]
        for b in bars:
            self.push(b)

    def push(self, bar: Bar) -> tuple[float | None, ...]:
        self.ind.update(bar)
        vals = _values(self.spec, self.ind)
        for col, v in zip(self.columns, vals):
            col.append(v)
        return vals

    def peek(self, bar: Bar) -> tuple[float | None, ...]:
        """The values if ``bar`` were the next closed bar; the state is not changed."""
        ind = copy.deepcopy(self.ind)
        ind.update(bar)
        return _values(self.spec, ind)

    def trim(self, n: int) -> None:
        for col in self.columns:
            del col[:n]


# ------------------------------------------------------------------------------------------ merging
def _market(b: Bar) -> tuple[float, ...]:
    return (b.open, b.high, b.low, b.close, b.volume, b.turnover, b.open_interest)


def merge_sources(*sources: Iterable[Bar]) -> list[Bar]:
    """Bars of one series from several sources, by label; the *first* source that has a label wins
    (pass ours before QUANTAXIS's). Sorted by label."""
    out: dict[int, Bar] = {}
    for src in sources:
        for b in src:
            out.setdefault(b.datetime, b)
    return [out[k] for k in sorted(out)]


class BarSeries:
    """The merged closed bars, the in-progress bar and the indicators of one (exchange, symbol, freq)."""

    def __init__(self, exchange: str, symbol: str, freq: str, *, max_bars: int = 20_000,
                 emit_after: int | None = None, id_memory: int = 4096,
                 next_label: Callable[[int], int | None] | None = None) -> None:
        self.exchange, self.symbol, self.freq = exchange, symbol, freq
        self.max_bars = max_bars
        self.emit_after = emit_after if emit_after is not None else -(1 << 62)
        self.next_label = next_label
        self.current: Bar | None = None
        self.stats: Counter[str] = Counter()
        self._labels: list[int] = []
        self._bars: list[Bar] = []
        self._live: set[int] = set()  # labels whose closed bar arrived live
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._id_memory = id_memory
        self._ind: dict[str, _IndicatorState] = {}  # cleared when a bar is inserted before the end
        self._specs: dict[str, IndicatorSpec] = {}

    # ---------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self._bars)

    @property
    def closed(self) -> list[Bar]:
        return list(self._bars)

    @property
    def first_label(self) -> int | None:
        return self._labels[0] if self._labels else None

    @property
    def last_label(self) -> int | None:
        return self._labels[-1] if self._labels else None

    def _range(self, count: int | None, start: int | None, end: int | None) -> tuple[int, int]:
        lo = 0 if start is None else bisect.bisect_left(self._labels, start)
        hi = len(self._labels) if end is None else bisect.bisect_right(self._labels, end)
        if count is not None:
            lo = max(lo, hi - count)
        return lo, hi

    def select(self, count: int | None = None, start: int | None = None, end: int | None = None,
               include_current: bool = False) -> list[Bar]:
        """Closed bars with ``start <= label <= end``, the newest ``count`` of them, oldest first;
        then the in-progress bar if asked and it falls in the range."""
        lo, hi = self._range(count, start, end)
        out = self._bars[lo:hi]
        cur = self._current_in(start, end) if include_current else None
        if cur is not None:
            out.append(cur)
            if count is not None and len(out) > count:
                out = out[1:]
        return out

    def _current_in(self, start: int | None, end: int | None) -> Bar | None:
        c = self.current
        if c is None or (start is not None and c.datetime < start) or (end is not None and c.datetime > end):
            return None
        return c

    def indicator_columns(self, specs: Sequence[IndicatorSpec], count: int | None = None, start: int | None = None,
                          end: int | None = None, include_current: bool = False) -> dict[str, list[float | None]]:
        """Indicator columns aligned with :meth:`select` called with the same arguments."""
        lo, hi = self._range(count, start, end)
        cur = self._current_in(start, end) if include_current else None
        drop_first = cur is not None and count is not None and (hi - lo) + 1 > count
        out: dict[str, list[float | None]] = {}
        for spec in specs:
            st = self._state(spec)
            extra = st.peek(cur) if cur is not None else None
            for i, name in enumerate(spec.columns):
                col = st.columns[i][lo:hi]
                if extra is not None:
                    col.append(extra[i])
                    if drop_first:
                        col = col[1:]
                out[name] = col
        return out

    def tracked(self) -> list[IndicatorSpec]:
        """The indicators kept up to date (each one asked for so far)."""
        return list(self._specs.values())

    def latest_indicators(self, specs: Sequence[IndicatorSpec] | None = None) -> dict[str, float | None]:
        """Each column's value at the newest closed bar (of ``specs``, or of every tracked indicator)."""
        out: dict[str, float | None] = {}
        for spec in self.tracked() if specs is None else specs:
            st = self._state(spec)
            for i, name in enumerate(spec.columns):
                out[name] = st.columns[i][-1] if st.columns[i] else None
        return out

    def _state(self, spec: IndicatorSpec) -> _IndicatorState:
        st = self._ind.get(spec.canonical)
        if st is None:
            self._specs.setdefault(spec.canonical, spec)
            st = self._ind[spec.canonical] = _IndicatorState(spec, self._bars)
        return st

    def track(self, specs: Iterable[IndicatorSpec]) -> None:
        """Keep these indicators up to date from now on (computed over the whole series now)."""
        for s in specs:
            self._state(s)

    # ---------------------------------------------------------------------------------- writing
    def _insert(self, bar: Bar) -> bool:
        """Insert or replace ``bar`` by label; True if it was appended at the end (indicators follow)."""
        lab = bar.datetime
        if not self._labels or lab > self._labels[-1]:
            self._labels.append(lab)
            self._bars.append(bar)
            for st in self._ind.values():
                st.push(bar)
            self._trim()
            return True
        i = bisect.bisect_left(self._labels, lab)
        if i < len(self._labels) and self._labels[i] == lab:
            old, self._bars[i] = self._bars[i], bar
            if _market(old) != _market(bar):
                self._ind.clear()  # recomputed on the next use
        else:
            self._labels.insert(i, lab)
            self._bars.insert(i, bar)
            self._ind.clear()
            self._trim()
        return False

    def _trim(self) -> None:
        extra = len(self._bars) - self.max_bars
        if extra > 0:
            for lab in self._labels[:extra]:
                self._live.discard(lab)
            del self._labels[:extra]
            del self._bars[:extra]
            for st in self._ind.values():
                st.trim(extra)

    def add_history(self, bars: Iterable[Bar]) -> int:
        """Merge closed history bars; a label already present (history or live) is kept as is.
        Returns the number of bars added."""
        added = 0
        new = sorted((b for b in bars if b.final), key=lambda b: b.datetime)
        for b in new:
            i = bisect.bisect_left(self._labels, b.datetime)
            if i < len(self._labels) and self._labels[i] == b.datetime:
                continue
            self._insert(b)
            added += 1
        cur = self.current
        if cur is not None and self._labels and cur.datetime <= self._labels[-1]:
            self.current = None
        return added

    def on_bar(self, bar: Bar, message_id: str | None = None) -> Bar | None:
        """A live bar: closed ones return the bar to emit (or None for a duplicate); realtime ones None."""
        if bar.final:
            return self.on_closed(bar, message_id)
        self.on_realtime(bar)
        return None

    def on_closed(self, bar: Bar, message_id: str | None = None) -> Bar | None:
        if message_id:
            if message_id in self._ids:
                self.stats["dup_id"] += 1
                return None
            self._ids[message_id] = None
            while len(self._ids) > self._id_memory:
                self._ids.popitem(last=False)
        lab = bar.datetime
        if lab in self._live:
            self.stats["dup_label"] += 1
            return None
        last = self._labels[-1] if self._labels else None
        i = bisect.bisect_left(self._labels, lab)
        present = i < len(self._labels) and self._labels[i] == lab
        if last is not None and lab > last and self.next_label is not None:
            expected = self.next_label(last)
            if expected is not None and lab > expected:
                self.stats["gaps"] += 1
        self._insert(bar)
        self._live.add(lab)
        cur = self.current
        if cur is not None and cur.datetime <= lab:
            self.current = None
        if lab > self.emit_after:
            self.emit_after = lab
            self.stats["emitted"] += 1
            return bar
        if not present:
            self.stats["gap_filled"] += 1
            self.stats["emitted"] += 1
            return bar
        self.stats["history_confirmed"] += 1
        return None

    def on_realtime(self, bar: Bar) -> bool:
        """Replace the in-progress bar; False if ``bar`` is stale or out of order (ignored)."""
        lab = bar.datetime
        if self._labels and lab <= self._labels[-1]:
            self.stats["rt_after_close"] += 1
            return False
        cur = self.current
        if cur is not None:
            if lab < cur.datetime or (lab == cur.datetime and (bar.tick_count, bar.ts) < (cur.tick_count, cur.ts)):
                self.stats["rt_out_of_order"] += 1
                return False
        self.current = bar
        self.stats["rt"] += 1
        return True
