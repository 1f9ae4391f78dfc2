"""Moving-average cross: long ``volume`` lots when the fast MA crosses above the slow one,
short ``volume`` lots when it crosses below (on closed bars of the main series).

::

    qaflow strategy qamarket.strategies.ma_cross:MaCross --accounts acc1,acc2 \\
        --symbol SHFE.rb2605 --freq 1min --param fast=5 slow=20 volume=2

Parameters: ``fast``, ``slow`` (bars), ``volume`` (lots, the size of the target position),
``slip`` (price ticks added to the close for a buy, taken off for a sell; the limit price),
``entry`` (``"cross"``: act only on a cross, and keep the position one has until the next
cross, also after a restart; ``"state"``: hold +volume while fast > slow and -volume while
fast < slow, from the first live bar on).

The target is re-asserted on every closed bar, so an order that was rejected or cancelled
is sent again (with a new deterministic id) on the next bar.
"""
from __future__ import annotations

from collections import deque

from qamarket.models import Bar, spec_for
from qamarket.strategy import Strategy


class MaCross(Strategy):
    parameters = {"fast": 5, "slow": 20, "volume": 1, "slip": 0.0, "entry": "cross"}
    history_bars = 200

    def on_init(self, history: list[Bar]) -> None:
        if not 0 < self.fast < self.slow:
            raise ValueError(f"need 0 < fast < slow, got fast={self.fast} slow={self.slow}")
        if self.volume <= 0:
            raise ValueError(f"volume must be > 0, got {self.volume}")
        if self.entry not in ("cross", "state"):
            raise ValueError(f"entry must be cross or state, got {self.entry!r}")
        self.closes: deque[float] = deque((b.close for b in history), maxlen=self.slow + 1)
        self.target: int | None = None
        try:
            self.tick = spec_for(self.symbol, self.exchange).price_tick
        except LookupError:
            self.tick = 0.0
        self.write_log("init with %d bars; fast=%d slow=%d volume=%d", len(history), self.fast, self.slow, self.volume)

    def _mas(self) -> tuple[float, float, float, float] | None:
        c = list(self.closes)
        if len(c) < self.slow + 1:
            return None
        f, s = self.fast, self.slow
        return (sum(c[-f:]) / f, sum(c[-s:]) / s, sum(c[-f - 1:-1]) / f, sum(c[-s - 1:-1]) / s)

    def on_bar(self, bar: Bar) -> None:
        if (bar.exchange, bar.symbol, bar.freq) != (self.exchange, self.symbol, self.freqs[0]):
            return
        self.closes.append(bar.close)
        mas = self._mas()
        if mas is None:
            return
        fast, slow, fast_prev, slow_prev = mas
        if self.entry == "state":
            if fast != slow:
                self.target = self.volume if fast > slow else -self.volume
        elif fast_prev <= slow_prev and fast > slow:
            self.target = self.volume
            self.write_log("golden cross at %s: fast %.4g > slow %.4g", bar.dt, fast, slow)
        elif fast_prev >= slow_prev and fast < slow:
            self.target = -self.volume
            self.write_log("death cross at %s: fast %.4g < slow %.4g", bar.dt, fast, slow)
        if self.target is None:
            return
        delta = self.target - self.pos
        price = bar.close + (self.slip * self.tick if delta > 0 else -self.slip * self.tick)
        self.set_target_pos(self.target, price=price)
