"""Incremental indicators, O(1) per update: MA, EMA, MACD, RSI (Wilder), ATR (Wilder), BOLL.

Each has ``update(x)`` (a :class:`~qamarket.models.Bar` — its ``close``, and for ATR its
high/low/close — or a float), returning the current value or ``None`` while warming up,
plus ``.value`` and ``.ready``. Feed closed bars only. Definitions (what the tests check
against pandas):

* ``MA(n)``: mean of the last n closes (``rolling(n).mean()``).
* ``EMA(n)``: ``ewm(span=n, adjust=False)`` seeded with the first close; ready after n.
* ``MACD(12, 26, 9)``: ``dif = EMA12 - EMA26``, ``dea = EMA9(dif)``, ``hist = 2 * (dif - dea)``
  (the Chinese-terminal convention; ``hist_factor=1`` for the TA-Lib one).
* ``RSI(n)``: Wilder: average gain/loss seeded by the mean of the first n changes, then
  ``avg = (avg * (n - 1) + x) / n``; 100 when there is no loss.
* ``ATR(n)``: Wilder smoothing of the true range, seeded by the mean of the first n TRs
  (the first TR is high - low).
* ``BOLL(n, k)``: ``mid = MA(n)``, ``up/down = mid ± k * std``, population std (ddof=0,
  as TA-Lib/vn.py) by default.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any


def _close(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else float(x.close)


class MA:
    __slots__ = ("n", "_buf", "_sum", "_k", "value")

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self._buf: deque[float] = deque()
        self._sum = 0.0
        self._k: float | None = None  # shift, for precision of the running sum
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, x: Any) -> float | None:
        c = _close(x)
        if self._k is None:
            self._k = c
        v = c - self._k
        self._buf.append(v)
        self._sum += v
        if len(self._buf) > self.n:
            self._sum -= self._buf.popleft()
        if len(self._buf) == self.n:
            self.value = self._k + self._sum / self.n
        return self.value


class EMA:
    __slots__ = ("n", "alpha", "_ema", "_count", "value")

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.alpha = 2.0 / (n + 1)
        self._ema: float | None = None
        self._count = 0
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, x: Any) -> float | None:
        c = _close(x)
        self._ema = c if self._ema is None else self._ema + self.alpha * (c - self._ema)
        self._count += 1
        if self._count >= self.n:
            self.value = self._ema
        return self.value

    @property
    def raw(self) -> float | None:
        """The EMA including the warm-up (pandas' ``ewm(adjust=False)`` from the first value)."""
        return self._ema


class MACD:
    __slots__ = ("fast", "slow", "signal", "hist_factor", "dif", "dea", "hist", "_sig_count")

    def __init__(self, fast: int = 12, slow: int = 26, signal: int = 9, hist_factor: float = 2.0) -> None:
        self.fast, self.slow = EMA(fast), EMA(slow)
        self.signal = EMA(signal)
        self.hist_factor = hist_factor
        self.dif: float | None = None
        self.dea: float | None = None
        self.hist: float | None = None

    @property
    def ready(self) -> bool:
        return self.hist is not None

    @property
    def value(self) -> tuple[float, float, float] | None:
        return None if self.hist is None else (self.dif, self.dea, self.hist)  # type: ignore[return-value]

    def update(self, x: Any) -> tuple[float, float, float] | None:
        c = _close(x)
        self.fast.update(c)
        self.slow.update(c)
        dif = self.fast.raw - self.slow.raw  # type: ignore[operator]
        self.signal.update(dif)
        if self.slow.ready:
            self.dif = dif
            self.dea = self.signal.raw
            self.hist = self.hist_factor * (dif - self.dea)  # type: ignore[operator]
        return self.value


class RSI:
    __slots__ = ("n", "_prev", "_gain", "_loss", "_count", "value")

    def __init__(self, n: int = 14) -> None:
        self.n = n
        self._prev: float | None = None
        self._gain = 0.0
        self._loss = 0.0
        self._count = 0
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, x: Any) -> float | None:
        c = _close(x)
        if self._prev is None:
            self._prev = c
            return None
        ch = c - self._prev
        self._prev = c
        g = ch if ch > 0 else 0.0
        lo = -ch if ch < 0 else 0.0
        n = self.n
        self._count += 1
        if self._count <= n:
            self._gain += g
            self._loss += lo
            if self._count < n:
                return None
            self._gain /= n
            self._loss /= n
        else:
            self._gain = (self._gain * (n - 1) + g) / n
            self._loss = (self._loss * (n - 1) + lo) / n
        if self._loss == 0.0:
            self.value = 100.0 if self._gain > 0 else 50.0
        else:
            self.value = 100.0 - 100.0 / (1.0 + self._gain / self._loss)
        return self.value


class ATR:
    __slots__ = ("n", "_prev_close", "_atr", "_count", "value")

    def __init__(self, n: int = 14) -> None:
        self.n = n
        self._prev_close: float | None = None
        self._atr = 0.0
        self._count = 0
        self.value: float | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def update(self, bar: Any) -> float | None:
        h, lo, c = float(bar.high), float(bar.low), float(bar.close)
        pc = self._prev_close
        tr = h - lo if pc is None else max(h - lo, abs(h - pc), abs(lo - pc))
        self._prev_close = c
        n = self.n
        self._count += 1
        if self._count <= n:
            self._atr += tr
            if self._count < n:
                return None
            self._atr /= n
        else:
            self._atr = (self._atr * (n - 1) + tr) / n
        self.value = self._atr
        return self.value


class BOLL:
    __slots__ = ("n", "k", "ddof", "_buf", "_sum", "_sq", "_shift", "mid", "up", "down")

    def __init__(self, n: int = 20, k: float = 2.0, ddof: int = 0) -> None:
        if n < 1 + ddof:
            raise ValueError("n too small")
        self.n, self.k, self.ddof = n, k, ddof
        self._buf: deque[float] = deque()
        self._sum = 0.0
        self._sq = 0.0
        self._shift: float | None = None
        self.mid: float | None = None
        self.up: float | None = None
        self.down: float | None = None

    @property
    def ready(self) -> bool:
        return self.mid is not None

    @property
    def value(self) -> tuple[float, float, float] | None:
        return None if self.mid is None else (self.up, self.mid, self.down)  # type: ignore[return-value]

    def update(self, x: Any) -> tuple[float, float, float] | None:
        c = _close(x)
        if self._shift is None:
            self._shift = c
        v = c - self._shift
        self._buf.append(v)
        self._sum += v
        self._sq += v * v
        if len(self._buf) > self.n:
            old = self._buf.popleft()
            self._sum -= old
            self._sq -= old * old
        if len(self._buf) == self.n:
            n = self.n
            mean = self._sum / n
            var = max(0.0, (self._sq - n * mean * mean) / (n - self.ddof))
            sd = math.sqrt(var)
            self.mid = self._shift + mean
            self.up = self.mid + self.k * sd
            self.down = self.mid - self.k * sd
        return self.value
