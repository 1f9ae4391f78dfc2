"""Per-instrument tick cleaning: keep a tick or name why it is dropped. Pure, no I/O.

Drop reasons (counted in :attr:`TickCleaner.dropped`, a ``Counter`` ready for a
Prometheus counter labelled by reason):

``bad_price``        last price zero, negative, NaN or CTP's unset ``DBL_MAX``
``duplicate``        the same snapshot as the previous kept tick (time, price, cumulative
                     volume/turnover, open interest, best bid/ask) — a re-sent tick
``out_of_order``     older than the previous kept tick, or same time with a lower
                     cumulative volume
``stale``            older than ``max_age_ms`` against the clock passed in (``now``)
``outside_session``  not in a trading or auction phase of the instrument, or on a day
                     without a session (weekend, injected holiday)

Kept ticks are normalised in place when ``normalize=True``: other price fields holding
CTP's unset ``DBL_MAX`` (open/high/low, limits, deeper book levels) become ``0.0``.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final

from .models import PRICE_FIELDS, UNSET_PRICE, CheckedTick, InstrumentSpec, Tick
from .sessions import END_GRACE_MS, MS_MIN, Calendar, DEFAULT_CALENDAR, Phase, template

BAD_PRICE: Final = "bad_price"
DUPLICATE: Final = "duplicate"
OUT_OF_ORDER: Final = "out_of_order"
STALE: Final = "stale"
OUTSIDE_SESSION: Final = "outside_session"
REASONS: tuple[str, ...] = (BAD_PRICE, DUPLICATE, OUT_OF_ORDER, STALE, OUTSIDE_SESSION)

_price_values = __import__("operator").attrgetter(*PRICE_FIELDS)


def _key(t: Tick) -> tuple[object, ...]:
    return (t.datetime, t.last_price, t.volume, t.turnover, t.open_interest,
            t.bid_price_1, t.ask_price_1, t.bid_volume_1, t.ask_volume_1)


class TickCleaner:
    """Cleaner for one instrument.

    ``max_age_ms``: drop a tick older than this against ``now`` (given to :meth:`check`,
    else taken from ``clock``; both exchange-local epoch ms); ``None`` disables the check.
    ``check_sessions``: drop ticks outside the instrument's sessions.
    """

    def __init__(
        self,
        spec: InstrumentSpec,
        *,
        max_age_ms: int | None = None,
        clock: Callable[[], int] | None = None,
        calendar: Calendar | None = None,
        check_sessions: bool = True,
        normalize: bool = True,
    ) -> None:
        self.spec = spec
        self._tpl = template(spec)
        self.max_age_ms = max_age_ms
        self.clock = clock
        self.calendar = calendar or DEFAULT_CALENDAR
        self.check_sessions = check_sessions
        self.normalize = normalize
        self.dropped: Counter[str] = Counter({r: 0 for r in REASONS})
        self.kept = 0
        self._last: Tick | None = None
        self._last_key: tuple[object, ...] | None = None
        self._day_ok: dict[int, bool] = {}
        self._ok_minute = -1  # a minute (epoch ms // 60000) known to be in session (pure: template + calendar)

    def check(self, tick: Tick, now: int | None = None) -> str | None:
        """``None`` if ``tick`` is kept (and becomes the reference for the next), else the drop reason.

        Hot path (the common case: valid price, newer than the last kept tick, in the same minute
        as the last tick that passed the session check, nothing to normalise): a handful of
        attribute reads and no session lookup; everything else goes through :meth:`_reason`.
        """
        p = tick.last_price
        t = tick.datetime
        last = self._last
        if (0.0 < p < UNSET_PRICE and last is not None and t > last.datetime and self.max_age_ms is None
                and (not self.check_sessions or t // MS_MIN == self._ok_minute)):
            reason = None
        else:
            reason = self._reason(tick, now)
            if reason is not None:
                self.dropped[reason] += 1
                return reason
        self.kept += 1
        self._last = tick
        if self.normalize and type(tick) is not CheckedTick:  # a CheckedTick has no unset price
            # Normalising would change bid/ask_price_1 (part of the duplicate key): keep the key of the
            # tick as received. Otherwise the key is read from ``_last`` only when needed (same ms).
            vals = _price_values(tick)
            if not (max(vals) < UNSET_PRICE):  # an unset price (or a NaN: checked field by field)
                self._last_key = _key(tick) if (tick.bid_price_1 >= UNSET_PRICE or tick.ask_price_1 >= UNSET_PRICE) else None
                for f, v in zip(PRICE_FIELDS, vals):
                    if v >= UNSET_PRICE:
                        setattr(tick, f, 0.0)
                return None
        self._last_key = None
        return None

    def check_many(self, ticks: Sequence[Tick]) -> list[str | None]:
        """:meth:`check` of every tick, in order (one call per batch of one instrument)."""
        check = self.check
        return [check(t) for t in ticks]

    def clean(self, tick: Tick, now: int | None = None) -> Tick | str:
        """The tick if kept, else the drop reason (a ``str``)."""
        reason = self.check(tick, now)
        return tick if reason is None else reason

    def _reason(self, tick: Tick, now: int | None) -> str | None:
        p = tick.last_price
        if not (0.0 < p < UNSET_PRICE) or math.isnan(p):
            return BAD_PRICE
        t = tick.datetime
        last = self._last
        if last is not None:
            if t < last.datetime:
                return OUT_OF_ORDER
            if t == last.datetime:
                if _key(tick) == (self._last_key or _key(last)):
                    return DUPLICATE
                if tick.volume < last.volume:
                    return OUT_OF_ORDER
        if self.max_age_ms is not None:
            if now is None and self.clock is not None:
                now = self.clock()
            if now is not None and now - t > self.max_age_ms:
                return STALE
        if self.check_sessions:
            minute = t // MS_MIN
            if minute != self._ok_minute:
                mod = minute % 1440
                tpl = self._tpl
                if tpl.phase[mod] is Phase.CLOSED:
                    if not (tpl.grace_end[mod] and t % MS_MIN < END_GRACE_MS):
                        return OUTSIDE_SESSION
                    grace = True  # only the first END_GRACE_MS of this minute pass: do not cache it
                else:
                    grace = False
                hour_key = t // 3_600_000
                ok = self._day_ok.get(hour_key)
                if ok is None:
                    if len(self._day_ok) > 1024:
                        self._day_ok.clear()
                    ok = self._day_ok[hour_key] = self.calendar.is_session_day(t)
                if not ok:
                    return OUTSIDE_SESSION
                if not grace:
                    self._ok_minute = minute  # every tick of this minute is in session: skip the lookup
        return None

    def save(self) -> tuple[Any, Any]:
        """The reference state (last kept tick), to :meth:`restore` if the batch it was checked in fails."""
        return self._last, self._last_key

    def restore(self, state: tuple[Any, Any]) -> None:
        self._last, self._last_key = state

    def reset(self) -> None:
        """Forget the reference tick (e.g. after a reconnect that replays the day)."""
        self._last = None
        self._last_key = None
