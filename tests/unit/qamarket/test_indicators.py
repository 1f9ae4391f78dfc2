from __future__ import annotations

import random


from qamarket.indicators import ATR, BOLL, EMA, MA, MACD, RSI
from qamarket.models import Bar

import pandas as pd  # noqa: E402 - a test dependency (setup.py extras "test")
import numpy as np  # noqa: E402


def _bars(n: int = 300, seed: int = 3) -> list[Bar]:
    rnd = random.Random(seed)
    out, c = [], 3500.0
    for i in range(n):
        o = c
        c = max(1.0, c + rnd.gauss(0, 5))
        h = max(o, c) + abs(rnd.gauss(0, 3))
        lo = min(o, c) - abs(rnd.gauss(0, 3))
        out.append(Bar(symbol="rb2510", exchange="SHFE", freq="1min", datetime=i * 60_000, trading_day="20250303",
                       open=o, high=h, low=lo, close=c))
    return out


BARS = _bars()
CLOSE = pd.Series([b.close for b in BARS])
HIGH = pd.Series([b.high for b in BARS])
LOW = pd.Series([b.low for b in BARS])


def _run(ind, xs):  # type: ignore[no-untyped-def]
    return [ind.update(x) for x in xs]


def _cmp(ours, ref, start: int) -> None:  # type: ignore[no-untyped-def]
    assert all(v is None for v in ours[:start])
    np.testing.assert_allclose(np.array(ours[start:], dtype=float), np.asarray(ref)[start:], rtol=1e-9, atol=1e-9)


def test_ma() -> None:
    _cmp(_run(MA(20), BARS), CLOSE.rolling(20).mean(), 19)


def test_ema() -> None:
    _cmp(_run(EMA(12), BARS), CLOSE.ewm(span=12, adjust=False).mean(), 11)


def test_macd() -> None:
    ours = _run(MACD(12, 26, 9), BARS)
    dif = CLOSE.ewm(span=12, adjust=False).mean() - CLOSE.ewm(span=26, adjust=False).mean()
    dea = dif.ewm(span=9, adjust=False).mean()
    hist = 2 * (dif - dea)
    assert all(v is None for v in ours[:25])
    got = np.array([v for v in ours[25:]])
    np.testing.assert_allclose(got, np.c_[dif, dea, hist][25:], rtol=1e-9, atol=1e-9)


def _wilder(s, n: int):  # type: ignore[no-untyped-def]
    """Wilder smoothing seeded by the mean of the first n values, via pandas ewm(alpha=1/n)."""
    seed = s.iloc[:n].mean()
    tail = pd.concat([pd.Series([seed]), s.iloc[n:]], ignore_index=True)
    sm = tail.ewm(alpha=1 / n, adjust=False).mean()
    return pd.concat([pd.Series([np.nan] * (n - 1)), sm], ignore_index=True)


def test_rsi_wilder() -> None:
    n = 14
    d = CLOSE.diff().iloc[1:].reset_index(drop=True)
    ag = _wilder(d.clip(lower=0), n)
    al = _wilder((-d).clip(lower=0), n)
    rsi = 100 - 100 / (1 + ag / al)
    ref = pd.concat([pd.Series([np.nan]), rsi], ignore_index=True)
    _cmp(_run(RSI(n), BARS), ref, n)


def test_atr_wilder() -> None:
    n = 14
    pc = CLOSE.shift(1)
    tr = pd.concat([HIGH - LOW, (HIGH - pc).abs(), (LOW - pc).abs()], axis=1).max(axis=1)
    _cmp(_run(ATR(n), BARS), _wilder(tr, n), n - 1)


def test_boll() -> None:
    ours = _run(BOLL(20, 2.0), BARS)
    mid = CLOSE.rolling(20).mean()
    sd = CLOSE.rolling(20).std(ddof=0)
    assert all(v is None for v in ours[:19])
    np.testing.assert_allclose(np.array(ours[19:]), np.c_[mid + 2 * sd, mid, mid - 2 * sd][19:], rtol=1e-9)
    assert BOLL(20).update(1.0) is None
