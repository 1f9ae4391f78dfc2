"""Trading sessions of Chinese futures and stock exchanges — pure, table driven.

Time representation
-------------------
Every timestamp here is an ``int``: milliseconds since 1970-01-01 00:00 of the
*exchange-local wall clock* (China Standard Time, UTC+8, no daylight saving), the
same number that :attr:`qamarket.models.Tick.datetime` carries. So
``ms // 60_000 % 1440`` is the minute of the local day and ``ms // 86_400_000`` the
local calendar day number; no time-zone work happens in the hot path. Functions that
take a time also accept a :class:`datetime.datetime` (naive = exchange local; aware =
converted to UTC+8).

Session model
-------------
A :class:`SessionTemplate` is a tuple of continuous *segments* in minutes of the day
(a night segment that crosses midnight has ``end > 1440``, e.g. 21:00–02:30 is
``(1260, 1590)``), plus pre-open call *auctions* whose ticks are folded into the bar
of the segment that starts when the auction ends (08:55–09:00 -> the 09:00 bar).
A tick stamped in the first :data:`END_GRACE_MS` of a segment's end minute
(``10:15:00.000``–``10:15:00.999``, CTP's closing snapshot) belongs to the segment's
last minute.

Bars
----
Bars are labelled by their start. An N-minute bar is the intersection of the
clock-aligned bucket ``[k*N, (k+1)*N)`` with one segment, so no bar spans a break:
with N=30 the day session gives 09:00, 09:30, 10:00 (ends 10:15), 10:30, 11:00,
13:30, 14:00, 14:30. A bar's *close time* (:func:`bar_close_time`) is its end, plus
:data:`END_GRACE_MS` when it ends a segment: the moment a timer may declare it final.
The daily bar's label is 00:00 of its trading day; it closes at the end of the day
session (15:00, or 15:15 for treasury futures).
"""
from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Iterable
from typing import Any

MS_MIN = 60_000
MS_DAY = 86_400_000
END_GRACE_MS = 1_000
_UTC8 = _dt.timezone(_dt.timedelta(hours=8))
_EPOCH_ORD = _dt.date(1970, 1, 1).toordinal()

FREQS: tuple[str, ...] = ("1min", "5min", "15min", "30min", "60min", "1day")
FREQ_MINUTES: dict[str, int] = {"1min": 1, "5min": 5, "15min": 15, "30min": 30, "60min": 60}
NIGHT_FROM_MIN = 18 * 60  # a tick at/after 18:00 belongs to the next trading day
EARLY_UNTIL_MIN = 6 * 60  # a tick before 06:00 continues the previous evening's night session


class Phase(str, enum.Enum):
    """Market phase of a timestamp. Truthy unless ``CLOSED``."""

    CLOSED = "CLOSED"
    AUCTION = "AUCTION"
    CONTINUOUS = "CONTINUOUS"

    def __bool__(self) -> bool:
        return self is not Phase.CLOSED


def hm(text: str) -> int:
    """``"21:00" -> 1260`` (minutes of the day)."""
    h, m = text.split(":")
    return int(h) * 60 + int(m)


class SessionTemplate:
    """Segments and auctions of one kind of instrument, with per-minute lookup tables."""

    __slots__ = (
        "name", "segments", "auctions", "inner_auctions", "day_close_min",
        "phase", "label_delta", "close_delta", "grace_end", "n_label_delta", "n_close_delta",
    )

    def __init__(
        self,
        name: str,
        segments: Iterable[tuple[str, str]],
        auctions: Iterable[tuple[str, str]] = (),
        inner_auctions: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.name = name
        segs = []
        for a, b in segments:
            s, e = hm(a), hm(b)
            if e <= s:
                e += 1440
            segs.append((s, e))
        self.segments: tuple[tuple[int, int], ...] = tuple(sorted(segs))
        self.auctions: tuple[tuple[int, int], ...] = tuple((hm(a), hm(b)) for a, b in auctions)
        self.inner_auctions: tuple[tuple[int, int], ...] = tuple((hm(a), hm(b)) for a, b in inner_auctions)
        day_ends = [e for s, e in self.segments if s < NIGHT_FROM_MIN]
        self.day_close_min = max(day_ends) if day_ends else max(e for _, e in self.segments)

        phase = [Phase.CLOSED] * 1440
        label_delta: list[int | None] = [None] * 1440  # minutes to add to floor(minute) for the 1-min label
        close_delta = [0] * 1440  # ms from a 1-min label to its close time (indexed by label minute)
        grace_end = [False] * 1440  # minute-of-day that ends a segment and is itself closed
        for s, e in self.segments:
            for m in range(s, e):
                mod = m % 1440
                phase[mod] = Phase.CONTINUOUS
                label_delta[mod] = 0
                close_delta[mod] = MS_MIN + (END_GRACE_MS if m == e - 1 else 0)
        for s, e in self.segments:
            if phase[e % 1440] is Phase.CLOSED:
                grace_end[e % 1440] = True
        for s, e in self.auctions:
            for m in range(s, e):
                if phase[m % 1440] is Phase.CLOSED:
                    phase[m % 1440] = Phase.AUCTION
                    label_delta[m % 1440] = e - m
        for s, e in self.inner_auctions:
            for m in range(s, e):
                if phase[m % 1440] is Phase.CONTINUOUS:
                    phase[m % 1440] = Phase.AUCTION
        self.phase = phase
        self.label_delta = label_delta
        self.close_delta = close_delta
        self.grace_end = grace_end

        # N-minute tables, indexed by the minute-of-day of a 1-min label.
        self.n_label_delta: dict[str, list[int]] = {}
        self.n_close_delta: dict[str, list[int]] = {}
        for freq, n in FREQ_MINUTES.items():
            ld = [0] * 1440
            cd = [0] * 1440
            for s, e in self.segments:
                for m in range(s, e):
                    bucket = m - (m % n)
                    lab = max(bucket, s)
                    end = min(bucket + n, e)
                    ld[m % 1440] = lab - m
                    cd[m % 1440] = (end - lab) * MS_MIN + (END_GRACE_MS if end == e else 0)
            self.n_label_delta[freq] = ld
            self.n_close_delta[freq] = cd

    def __repr__(self) -> str:
        def f(m: int) -> str:
            return f"{m // 60 % 24:02d}:{m % 60:02d}"

        segs = ", ".join(f"{f(s)}-{f(e)}" for s, e in self.segments)
        return f"SessionTemplate({self.name!r}: {segs})"

    @property
    def has_night(self) -> bool:
        return any(s >= NIGHT_FROM_MIN for s, _ in self.segments)


_FUT_DAY = [("09:00", "10:15"), ("10:30", "11:30"), ("13:30", "15:00")]
_FUT_AUCTIONS = [("08:55", "09:00"), ("20:55", "21:00")]

TEMPLATES: dict[str, SessionTemplate] = {
    t.name: t
    for t in (
        SessionTemplate("FUT_DAY", _FUT_DAY, _FUT_AUCTIONS[:1]),
        SessionTemplate("FUT_NIGHT_2300", [("21:00", "23:00"), *_FUT_DAY], _FUT_AUCTIONS),
        SessionTemplate("FUT_NIGHT_0100", [("21:00", "01:00"), *_FUT_DAY], _FUT_AUCTIONS),
        SessionTemplate("FUT_NIGHT_0230", [("21:00", "02:30"), *_FUT_DAY], _FUT_AUCTIONS),
        SessionTemplate("CFFEX_INDEX", [("09:30", "11:30"), ("13:00", "15:00")], [("09:25", "09:30")]),
        SessionTemplate("CFFEX_BOND", [("09:30", "11:30"), ("13:00", "15:15")], [("09:25", "09:30")]),
        # 09:15-09:25 opening call auction, 09:25-09:30 its result is shown: both fold into 09:30.
        SessionTemplate("STOCK", [("09:30", "11:30"), ("13:00", "15:00")], [("09:15", "09:30")], [("14:57", "15:00")]),
    )
}


def template(x: Any) -> SessionTemplate:
    """A template from a :class:`SessionTemplate`, an object with a ``session`` name (InstrumentSpec) or a name."""
    if isinstance(x, SessionTemplate):
        return x
    name = x if isinstance(x, str) else getattr(x, "session", None)
    try:
        return TEMPLATES[name]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"unknown session template {name!r}; known: {', '.join(TEMPLATES)}") from None


# ---------------------------------------------------------------------------------------- time helpers
def to_ms(t: int | _dt.datetime) -> int:
    """Exchange-local epoch milliseconds of an int (returned as is) or a datetime (naive = local)."""
    if isinstance(t, int):
        return t
    if t.tzinfo is not None:
        t = t.astimezone(_UTC8).replace(tzinfo=None)
    return ((t.toordinal() - _EPOCH_ORD) * 86_400 + t.hour * 3600 + t.minute * 60 + t.second) * 1000 + t.microsecond // 1000


def from_ms(ms: int) -> _dt.datetime:
    """Naive exchange-local datetime of local epoch milliseconds."""
    return _dt.datetime(1970, 1, 1) + _dt.timedelta(milliseconds=ms)


def ms_of(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, ms: int = 0) -> int:
    return to_ms(_dt.datetime(year, month, day, hour, minute, second, ms * 1000))


def day_ms(yyyymmdd: str) -> int:
    """Local epoch ms of 00:00 of a ``YYYYMMDD`` day."""
    d = _dt.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8]))
    return (d.toordinal() - _EPOCH_ORD) * MS_DAY


def _yyyymmdd(day_no: int) -> str:
    d = _dt.date.fromordinal(_EPOCH_ORD + day_no)
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


# ---------------------------------------------------------------------------------------- calendar
class Calendar:
    """Business days: Monday–Friday minus ``holidays`` (``YYYYMMDD`` strings, injectable)."""

    def __init__(self, holidays: Iterable[str] = ()) -> None:
        self.holidays = frozenset(str(h) for h in holidays)
        self._td_cache: dict[tuple[int, int], str] = {}

    def is_business_day_no(self, day_no: int) -> bool:
        return (day_no + 3) % 7 < 5 and _yyyymmdd(day_no) not in self.holidays  # 1970-01-01 was a Thursday

    def is_business_day(self, yyyymmdd: str) -> bool:
        return self.is_business_day_no(day_ms(yyyymmdd) // MS_DAY)

    def next_business_day_no(self, day_no: int) -> int:
        day_no += 1
        while not self.is_business_day_no(day_no):
            day_no += 1
        return day_no

    def trading_day(self, t: int | _dt.datetime) -> str:
        """The trading day a tick at ``t`` belongs to.

        Night (>= 18:00): the next business day (Friday night -> Monday); after midnight
        (< 06:00): the next business day after the previous calendar day (Saturday 01:00
        -> Monday); otherwise the calendar day itself.
        """
        t = to_ms(t)
        day_no, rem = divmod(t, MS_DAY)
        mod = rem // MS_MIN
        kind = 1 if mod >= NIGHT_FROM_MIN else (2 if mod < EARLY_UNTIL_MIN else 0)
        key = (day_no, kind)
        td = self._td_cache.get(key)
        if td is None:
            if kind == 1:
                td = _yyyymmdd(self.next_business_day_no(day_no))
            elif kind == 2:
                td = _yyyymmdd(self.next_business_day_no(day_no - 1))
            else:
                td = _yyyymmdd(day_no)
            if len(self._td_cache) > 4096:
                self._td_cache.clear()
            self._td_cache[key] = td
        return td

    def is_session_day(self, t: int | _dt.datetime) -> bool:
        """Whether a session can run at ``t`` at all (weekend/holiday filter).

        Day ticks need a business day; night ticks a business evening (the night session
        before the next business day); post-midnight ticks a business previous day.
        """
        t = to_ms(t)
        day_no, rem = divmod(t, MS_DAY)
        mod = rem // MS_MIN
        if mod < EARLY_UNTIL_MIN:
            return self.is_business_day_no(day_no - 1)
        return self.is_business_day_no(day_no)


DEFAULT_CALENDAR = Calendar()


# ---------------------------------------------------------------------------------------- queries
def phase(spec: Any, t: int | _dt.datetime) -> Phase:
    """:class:`Phase` of ``t`` for an instrument (time of day only; see :meth:`Calendar.is_session_day`)."""
    tpl = template(spec)
    t = to_ms(t)
    mod = t // MS_MIN % 1440
    p = tpl.phase[mod]
    if p is Phase.CLOSED and tpl.grace_end[mod] and t % MS_MIN < END_GRACE_MS:
        return Phase.CONTINUOUS
    return p


def is_trading(spec: Any, t: int | _dt.datetime, calendar: Calendar | None = None) -> Phase:
    """Phase of ``t`` on a session day: ``CONTINUOUS``/``AUCTION`` (truthy) or ``CLOSED`` (falsy)."""
    cal = calendar or DEFAULT_CALENDAR
    if not cal.is_session_day(t):
        return Phase.CLOSED
    return phase(spec, t)


def trading_day(spec: Any, t: int | _dt.datetime, calendar: Calendar | None = None) -> str:
    """``YYYYMMDD`` trading day of ``t`` (night ticks belong to the next business day)."""
    return (calendar or DEFAULT_CALENDAR).trading_day(t)


def minute_label(tpl: SessionTemplate, t: int) -> int | None:
    """1-min bar label (local ms) of a tick at ``t``, or ``None`` outside sessions. Auctions fold forward."""
    mod = t // MS_MIN % 1440
    d = tpl.label_delta[mod]
    floor = t - t % MS_MIN
    if d is None:
        if tpl.grace_end[mod] and t - floor < END_GRACE_MS:
            return floor - MS_MIN
        return None
    return floor + d * MS_MIN


def bar_label(spec: Any, t: int | _dt.datetime, freq: str = "1min", calendar: Calendar | None = None) -> int | None:
    """Label (start, local ms) of the ``freq`` bar a tick at ``t`` belongs to; ``None`` outside sessions.

    For ``1day`` the label is 00:00 of the trading day.
    """
    tpl = template(spec)
    t = to_ms(t)
    lab = minute_label(tpl, t)
    if lab is None:
        return None
    if freq == "1min":
        return lab
    if freq == "1day":
        return day_ms((calendar or DEFAULT_CALENDAR).trading_day(t))
    try:
        return lab + tpl.n_label_delta[freq][lab // MS_MIN % 1440] * MS_MIN
    except KeyError:
        raise ValueError(f"unknown frequency {freq!r}; known: {', '.join(FREQS)}") from None


def bar_close_time(spec: Any, label: int, freq: str = "1min") -> int:
    """When the ``freq`` bar labelled ``label`` ends and a timer may close it (local ms).

    The end of the bar, plus :data:`END_GRACE_MS` when the bar ends a session segment
    (break, lunch, session end). For ``1day`` (label = 00:00 of the trading day): the end
    of the day session plus the grace.
    """
    tpl = template(spec)
    if freq == "1min":
        return label + tpl.close_delta[label // MS_MIN % 1440]
    if freq == "1day":
        return label + tpl.day_close_min * MS_MIN + END_GRACE_MS
    return label + tpl.n_close_delta[freq][label // MS_MIN % 1440]


def bar_end(spec: Any, label: int, freq: str = "1min") -> int:
    """End (exclusive, local ms) of the bar, without the grace."""
    c = bar_close_time(spec, label, freq)
    return c - END_GRACE_MS if c % MS_MIN == END_GRACE_MS else c
