"""Read QUANTAXIS's own bar collections (where a user has them) as QAFlow :class:`Bar` s.

Collections and fields, as QUANTAXIS's savers write them (QASU/save_tdx.py, read back by
QAFetch/QAQuery.py):

- ``stock_min`` / ``future_min`` (type ``"1min" | "5min" | "15min" | "30min" | "60min"``):
  ``code``, ``open``, ``high``, ``low``, ``close``, ``datetime`` (``"YYYY-MM-DD HH:MM:SS"``,
  exchange-local), ``date`` (``"YYYY-MM-DD"``), ``date_stamp``, ``time_stamp`` (epoch seconds),
  ``type``; stocks ``vol`` and ``amount``; futures ``trade`` (volume), ``position`` (open
  interest), ``amount``, ``price``.
- ``stock_day`` / ``future_day``: the same without ``datetime``/``time_stamp``/``type``,
  ``date`` being the (trading) day.

Labels: QUANTAXIS (TDX) minute bars are labelled by their **end** (a stock's first 1-min
bar is ``09:31:00``, a future's night session starts with ``21:01:00``); QAFlow labels a bar
by its **start**. The start is ``end - N min``, moved forward to the first trading minute
of the session segment that holds the bar's last minute when ``end - N min`` falls in a
break (so a stock's 13:30 30-min bar starts 13:00, not 11:30-ish; a future's 10:45 bar
after the 10:15-10:30 break starts 10:30). Where the instrument has no session spec the
plain ``end - N min`` is used. Daily bars get label 00:00 of ``date``, as our ``1day`` bars.
Volumes are passed through as stored (QUANTAXIS stock ``vol`` units depend on its source).
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from typing import Any

from .models import Bar, spec_for
from .sessions import MS_MIN, day_ms, minute_label, template, to_ms, trading_day

__all__ = ["MIN_FREQS", "stock_exchange_of", "min_doc_to_bar", "day_doc_to_bar", "fetch_min_bars", "fetch_day_bars"]

MIN_FREQS = {"1min": 1, "5min": 5, "15min": 15, "30min": 30, "60min": 60}


def stock_exchange_of(code: str) -> str:
    """``600000 -> SSE``, ``000001``/``300750`` -> ``SZSE``, ``430047``/``830799``/``920xxx`` -> ``BSE``."""
    if code.startswith(("92", "4", "8")):
        return "BSE"
    if code.startswith(("6", "9", "5")):
        return "SSE"
    return "SZSE"


def _parse_local(text: str) -> int:
    return to_ms(_dt.datetime.fromisoformat(str(text)[:19]))


def start_of(end_ms: int, minutes: int, spec: Any | None) -> int:
    """Start label of a bar that QUANTAXIS labelled ``end_ms`` (see module doc)."""
    nominal = end_ms - minutes * MS_MIN
    if spec is None:
        return nominal
    tpl = template(spec)
    m = end_ms - MS_MIN  # the bar's last minute
    if minute_label(tpl, m) != m:
        return nominal
    while m - MS_MIN >= nominal and minute_label(tpl, m - MS_MIN) == m - MS_MIN:
        m -= MS_MIN
    return m


def _spec(symbol: str, exchange: str) -> Any | None:
    try:
        return spec_for(symbol, exchange)
    except LookupError:
        return None


def _f(doc: Mapping[str, Any], *names: str) -> float:
    for n in names:
        v = doc.get(n)
        if v is not None:
            return float(v)
    return 0.0


def min_doc_to_bar(doc: Mapping[str, Any], *, symbol: str | None = None, exchange: str | None = None,
                   freq: str | None = None) -> Bar:
    """A ``stock_min`` / ``future_min`` document -> a final :class:`Bar` labelled by its start."""
    code = str(doc["code"])
    freq = freq or str(doc.get("type", "1min"))
    if freq not in MIN_FREQS:
        raise ValueError(f"unknown QUANTAXIS minute type {freq!r}; known: {', '.join(MIN_FREQS)}")
    future = "trade" in doc or "position" in doc
    sym = symbol or code
    ex = exchange or (stock_exchange_of(code) if not future else spec_for(sym).exchange)
    spec = _spec(sym, ex)
    end = _parse_local(doc["datetime"])
    label = start_of(end, MIN_FREQS[freq], spec)
    td = ""
    if spec is not None:
        try:
            td = trading_day(spec, label)
        except Exception:  # noqa: BLE001 - outside our calendar: fall back to the stored date
            td = ""
    if not td:
        td = str(doc.get("date") or doc["datetime"])[:10].replace("-", "")
    return Bar(
        symbol=sym, exchange=ex, freq=freq, datetime=label, trading_day=td,  # type: ignore[arg-type]
        open=float(doc["open"]), high=float(doc["high"]), low=float(doc["low"]), close=float(doc["close"]),
        volume=_f(doc, "trade", "vol", "volume"), turnover=_f(doc, "amount"), open_interest=_f(doc, "position"),
        final=True,
    )


def day_doc_to_bar(doc: Mapping[str, Any], *, symbol: str | None = None, exchange: str | None = None) -> Bar:
    """A ``stock_day`` / ``future_day`` document -> a ``1day`` :class:`Bar` (label 00:00 of ``date``)."""
    code = str(doc["code"])
    future = "trade" in doc or "position" in doc
    sym = symbol or code
    ex = exchange or (stock_exchange_of(code) if not future else spec_for(sym).exchange)
    td = str(doc["date"])[:10].replace("-", "")
    return Bar(
        symbol=sym, exchange=ex, freq="1day", datetime=day_ms(td), trading_day=td,  # type: ignore[arg-type]
        open=float(doc["open"]), high=float(doc["high"]), low=float(doc["low"]), close=float(doc["close"]),
        volume=_f(doc, "trade", "vol", "volume"), turnover=_f(doc, "amount"), open_interest=_f(doc, "position"),
        final=True,
    )


def _codes(symbol: str) -> list[str]:
    return list(dict.fromkeys([symbol, symbol.upper(), symbol.lower()]))


def _fmt(ms: int) -> str:
    return (_dt.datetime(1970, 1, 1) + _dt.timedelta(milliseconds=ms)).strftime("%Y-%m-%d %H:%M:%S")


def _collection(market: str, kind: str) -> str:
    if market not in ("stock", "future"):
        raise ValueError(f"market must be 'stock' or 'future', not {market!r}")
    return f"{market}_{kind}"


def fetch_min_bars(db: Any, symbol: str, freq: str = "1min", start: Any = None, end: Any = None, *,
                   market: str = "future", exchange: str | None = None) -> list[Bar]:
    """Bars of ``symbol`` from QUANTAXIS's ``future_min``/``stock_min`` whose *start* label is in
    ``[start, end]`` (ms or datetime, exchange-local), oldest first. ``db`` is the pymongo
    database QUANTAXIS writes (``quantaxis`` by default)."""
    if freq not in MIN_FREQS:
        raise ValueError(f"unknown frequency {freq!r}; QUANTAXIS stores {', '.join(MIN_FREQS)}")
    q: dict[str, Any] = {"code": {"$in": _codes(symbol)}, "type": freq}
    rng: dict[str, str] = {}
    s = None if start is None else to_ms(start)
    e = None if end is None else to_ms(end)
    if s is not None:
        rng["$gt"] = _fmt(s)  # a bar starting at s ends after s
    if e is not None:
        rng["$lte"] = _fmt(e + MIN_FREQS[freq] * MS_MIN)
    if rng:
        q["datetime"] = rng  # "YYYY-MM-DD HH:MM:SS" strings order like the times
    ex = exchange or (stock_exchange_of(symbol) if market == "stock" else None)
    bars = [min_doc_to_bar(d, symbol=symbol, exchange=ex, freq=freq)
            for d in db[_collection(market, "min")].find(q, {"_id": 0})]
    return _dedup_sorted(b for b in bars if (s is None or b.datetime >= s) and (e is None or b.datetime <= e))


def fetch_day_bars(db: Any, symbol: str, start: Any = None, end: Any = None, *, market: str = "future",
                   exchange: str | None = None) -> list[Bar]:
    """``1day`` bars from QUANTAXIS's ``future_day``/``stock_day``; ``start``/``end`` as
    ``YYYY-MM-DD`` / ``YYYYMMDD`` strings, datetimes or ms; oldest first."""
    q: dict[str, Any] = {"code": {"$in": _codes(symbol)}}
    rng: dict[str, str] = {}
    if start is not None:
        rng["$gte"] = _day_text(start)
    if end is not None:
        rng["$lte"] = _day_text(end)
    if rng:
        q["date"] = rng
    ex = exchange or (stock_exchange_of(symbol) if market == "stock" else None)
    return _dedup_sorted(day_doc_to_bar(d, symbol=symbol, exchange=ex)
                         for d in db[_collection(market, "day")].find(q, {"_id": 0}))


def _day_text(x: Any) -> str:
    if isinstance(x, str):
        d = x.replace("-", "")[:8]
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}"
    return _fmt(to_ms(x))[:10]


def _dedup_sorted(bars: Iterable[Bar]) -> list[Bar]:
    """Sorted by label; QUANTAXIS collections often hold a bar twice (re-runs of the saver): keep the last."""
    out: dict[int, Bar] = {}
    for b in bars:
        out[b.datetime] = b
    return [out[k] for k in sorted(out)]

