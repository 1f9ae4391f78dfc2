"""Stock quote pollers: sina (``hq.sinajs.cn``) and tencent/qq (``qt.gtimg.cn``) -> :class:`Tick`.

As QAUTLRA-RS, easyquotation and many QUANTAXIS tools do: fetch a list of codes over
HTTP every few seconds, parse the JavaScript-ish text, publish the quotes that changed.
The parse functions are pure (GBK-decoded text in, ticks out) and tested on recorded
responses in ``tests/data/``; the poller does the I/O and is never run in tests.

Codes are ``sh600000`` (SSE), ``sz000001`` (SZSE), ``bj430047`` (BSE); a tick's
``symbol`` is the six digits and ``exchange`` the exchange. ``datetime`` is the
quote's exchange-local time, ``trading_day`` its date, ``source`` ``"sina"``/``"qq"``.

Units (both sources give the same tick for the same market):
``volume`` / ``bid_volume_n`` / ``ask_volume_n`` in **shares**; ``turnover`` in **CNY**.
sina already sends shares and CNY; qq sends volumes in lots of 100 shares (multiplied
by 100 here) and turnover in CNY in field 35 (its field 37 is in 10k CNY, used only when
35 is absent).

sina: ``var hq_str_sh600000="<32+ comma-separated fields>";`` (one per line;
``""`` for an unknown code). Positions (0-based)::

    0 name          1 open        2 pre_close   3 price (last)  4 high   5 low
    6 bid (=bid1)   7 ask (=ask1) 8 volume, shares              9 amount, CNY
    10 b1 volume  11 b1 price  12 b2 volume  13 b2 price ... 18 b5 volume  19 b5 price
    20 a1 volume  21 a1 price  ... 28 a5 volume  29 a5 price
    30 date YYYY-MM-DD         31 time HH:MM:SS            32 status ("00" normal,
    "03" suspended) -- later fields (if any) ignored

qq: ``v_sh600000="<~-separated fields>";`` Positions (0-based), as easyquotation reads them::

    0 market code   1 name   2 code   3 price (last)   4 pre_close   5 open
    6 volume, lots  7 outer (buy-side) volume, lots    8 inner (sell-side) volume, lots
    9 b1 price 10 b1 volume(lots) 11 b2 price 12 b2 volume ... 17 b5 price 18 b5 volume
    19 a1 price 20 a1 volume(lots) ... 27 a5 price 28 a5 volume
    29 recent trades   30 datetime YYYYMMDDHHMMSS   31 change   32 change %
    33 high   34 low   35 "price/volume(lots)/amount(CNY)"   36 volume, lots
    37 amount, 10k CNY   38 turnover rate %   39 P/E   ... 47 limit up   48 limit down

Suspended stocks (sina status ``03`` or a last price of 0 in either source -- also the
state before the first trade of the day) are skipped, their codes appended to
``skipped`` when given. A malformed line never stops the others: it is logged with its
line number and text and a :class:`QuoteLineError` is appended to ``errors`` when given
(``strict=True`` raises the first one after parsing every line, with the good ticks in
``.ticks``).
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qamarket.models import Tick
from qamarket.sessions import to_ms

log = logging.getLogger(__name__)

PREFIX_TO_EXCHANGE = {"sh": "SSE", "sz": "SZSE", "bj": "BSE"}
EXCHANGE_TO_PREFIX = {v: k for k, v in PREFIX_TO_EXCHANGE.items()}
SINA_URL = "https://hq.sinajs.cn/list={codes}"
SINA_REFERER = "https://finance.sina.com.cn/"
QQ_URL = "https://qt.gtimg.cn/q={codes}"
QQ_LOT = 100  # qq volumes are in lots of 100 shares

_SINA_LINE = re.compile(r'^\s*var\s+hq_str_(?P<code>[a-z]{2}\d{6})="(?P<body>[^"]*)";?\s*$')
_QQ_LINE = re.compile(r'^\s*v_(?P<code>[a-z]{2}\d{6})="(?P<body>[^"]*)";?\s*$')


class QuoteLineError(ValueError):
    """One line of a quote response could not be parsed; ``str()`` names the source, line and reason."""

    def __init__(self, source: str, lineno: int, line: str, reason: str) -> None:
        self.source, self.lineno, self.line, self.reason = source, lineno, line, reason
        shown = line if len(line) <= 120 else line[:117] + "..."
        super().__init__(f"{source} line {lineno}: {reason}: {shown!r}")


class QuoteParseError(ValueError):
    """``strict=True``: at least one line failed. ``.errors`` lists them, ``.ticks`` holds the good ones."""

    def __init__(self, errors: list[QuoteLineError], ticks: list[Tick]) -> None:
        self.errors, self.ticks = errors, ticks
        super().__init__(f"{len(errors)} malformed line(s); first: {errors[0]}")


def split_code(code: str) -> tuple[str, str]:
    """``"sh600000" -> ("SSE", "600000")``."""
    c = code.strip().lower()
    ex = PREFIX_TO_EXCHANGE.get(c[:2])
    if ex is None or len(c) != 8 or not c[2:].isdigit():
        raise ValueError(f"quote code {code!r} is not sh/sz/bj + six digits")
    return ex, c[2:]


def to_code(exchange: str, symbol: str) -> str:
    """``("SSE", "600000") -> "sh600000"``; a bare six-digit code guesses sh for 5/6/9, bj for 4/8, else sz."""
    if exchange:
        return EXCHANGE_TO_PREFIX[exchange.upper()] + symbol
    return ("sh" if symbol[0] in "569" else "bj" if symbol[0] in "48" else "sz") + symbol


def _f(fields: Sequence[str], i: int) -> float:
    v = fields[i].strip()
    return float(v) if v else 0.0


def _parse_lines(text: str, source: str, line_re: re.Pattern[str], parse_body: Callable[[str, str], Tick | None],
                 errors: list[QuoteLineError] | None, skipped: list[str] | None, strict: bool) -> list[Tick]:
    ticks: list[Tick] = []
    errs: list[QuoteLineError] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = line_re.match(line)
        if m is None:
            if source == "qq" and line.startswith("v_pv_none_match"):
                continue  # qq's answer for an unknown code
            prefix = "var hq_str_" if source == "sina" else "v_"
            reason = ("truncated or malformed (no closing quote, or a bad code)" if line.startswith(prefix)
                      else "not a quote line")
            errs.append(QuoteLineError(source, lineno, line, reason))
            continue
        code, body = m["code"], m["body"]
        if not body:  # unknown or delisted code: sina answers ""
            if skipped is not None:
                skipped.append(code)
            continue
        try:
            tick = parse_body(code, body)
        except (ValueError, IndexError) as exc:
            errs.append(QuoteLineError(source, lineno, line, f"{code}: {exc}"))
            continue
        if tick is None:
            if skipped is not None:
                skipped.append(code)
            continue
        ticks.append(tick)
    for e in errs:
        log.warning("%s", e, extra={"source": source})
    if errors is not None:
        errors.extend(errs)
    if strict and errs:
        raise QuoteParseError(errs, ticks)
    return ticks


# -------------------------------------------------------------------------------------------- sina
def _sina_body(code: str, body: str) -> Tick | None:
    f = body.split(",")
    if len(f) < 32:
        raise ValueError(f"{len(f)} fields, expected at least 32")
    exchange, symbol = split_code(code)
    status = f[32].strip() if len(f) > 32 else "00"
    price = _f(f, 3)
    if price <= 0 or status == "03":
        return None
    try:
        dt = to_ms(_parse_dt(f[30].strip(), f[31].strip()))
    except ValueError:
        raise ValueError(f"bad date/time {f[30]!r} {f[31]!r}") from None
    return _sina_tick(f, exchange, symbol, dt, price)


def _sina_tick(f: Sequence[str], exchange: str, symbol: str, dt: int, price: float) -> Tick:
    return Tick(
        symbol=symbol, exchange=exchange, datetime=dt, last_price=price,  # type: ignore[arg-type]
        trading_day=f[30].strip().replace("-", ""),
        volume=_f(f, 8), turnover=_f(f, 9),
        open_price=_f(f, 1), high_price=_f(f, 4), low_price=_f(f, 5), pre_close=_f(f, 2),
        bid_volume_1=_f(f, 10), bid_price_1=_f(f, 11), bid_volume_2=_f(f, 12), bid_price_2=_f(f, 13),
        bid_volume_3=_f(f, 14), bid_price_3=_f(f, 15), bid_volume_4=_f(f, 16), bid_price_4=_f(f, 17),
        bid_volume_5=_f(f, 18), bid_price_5=_f(f, 19),
        ask_volume_1=_f(f, 20), ask_price_1=_f(f, 21), ask_volume_2=_f(f, 22), ask_price_2=_f(f, 23),
        ask_volume_3=_f(f, 24), ask_price_3=_f(f, 25), ask_volume_4=_f(f, 26), ask_price_4=_f(f, 27),
        ask_volume_5=_f(f, 28), ask_price_5=_f(f, 29),
        source="sina",
    )


def _parse_dt(date: str, clock: str) -> _dt.datetime:
    return _dt.datetime.strptime(f"{date} {clock}", "%Y-%m-%d %H:%M:%S")


def parse_sina(text: str, *, errors: list[QuoteLineError] | None = None, skipped: list[str] | None = None,
               strict: bool = False) -> list[Tick]:
    """Ticks of a ``hq.sinajs.cn/list=...`` response (already decoded from GBK)."""
    return _parse_lines(text, "sina", _SINA_LINE, _sina_body, errors, skipped, strict)


# ---------------------------------------------------------------------------------------------- qq
def _qq_body(code: str, body: str) -> Tick | None:
    f = body.split("~")
    if len(f) < 49:
        raise ValueError(f"{len(f)} fields, expected at least 49")
    exchange, symbol = split_code(code)
    if f[2].strip() != symbol:
        raise ValueError(f"code field {f[2]!r} does not match {code}")
    price = _f(f, 3)
    if price <= 0:
        return None
    stamp = f[30].strip()
    if len(stamp) != 14 or not stamp.isdigit():
        raise ValueError(f"bad datetime {stamp!r} (expected YYYYMMDDHHMMSS)")
    dt = to_ms(_dt.datetime.strptime(stamp, "%Y%m%d%H%M%S"))
    volume = _f(f, 6) * QQ_LOT
    parts = f[35].split("/")
    if len(parts) == 3 and parts[2].strip():
        turnover = float(parts[2])
    else:
        turnover = _f(f, 37) * 10_000
    lots = [_f(f, i) * QQ_LOT for i in range(10, 29, 2)]  # b1..b5, a1..a5 volumes
    return Tick(
        symbol=symbol, exchange=exchange, datetime=dt, last_price=price,  # type: ignore[arg-type]
        trading_day=stamp[:8], volume=volume, turnover=turnover,
        open_price=_f(f, 5), high_price=_f(f, 33), low_price=_f(f, 34), pre_close=_f(f, 4),
        limit_up=_f(f, 47), limit_down=_f(f, 48),
        bid_price_1=_f(f, 9), bid_price_2=_f(f, 11), bid_price_3=_f(f, 13), bid_price_4=_f(f, 15),
        bid_price_5=_f(f, 17),
        bid_volume_1=lots[0], bid_volume_2=lots[1], bid_volume_3=lots[2], bid_volume_4=lots[3], bid_volume_5=lots[4],
        ask_price_1=_f(f, 19), ask_price_2=_f(f, 21), ask_price_3=_f(f, 23), ask_price_4=_f(f, 25),
        ask_price_5=_f(f, 27),
        ask_volume_1=lots[5], ask_volume_2=lots[6], ask_volume_3=lots[7], ask_volume_4=lots[8], ask_volume_5=lots[9],
        source="qq",
    )


def parse_qq(text: str, *, errors: list[QuoteLineError] | None = None, skipped: list[str] | None = None,
             strict: bool = False) -> list[Tick]:
    """Ticks of a ``qt.gtimg.cn/q=...`` response (already decoded from GBK). Volumes -> shares."""
    return _parse_lines(text, "qq", _QQ_LINE, _qq_body, errors, skipped, strict)


PARSERS: dict[str, Callable[..., list[Tick]]] = {"sina": parse_sina, "qq": parse_qq}


# ------------------------------------------------------------------------------------------ poller
def _key(t: Tick) -> tuple[Any, ...]:
    return (t.datetime, t.last_price, t.volume, t.bid_price_1, t.ask_price_1, t.bid_volume_1, t.ask_volume_1)


@dataclass
class ChangeFilter:
    """Lets a quote through only when it differs from the last one seen for its instrument (pure)."""

    last: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)

    def changed(self, ticks: Iterable[Tick]) -> list[Tick]:
        out = []
        for t in ticks:
            k = (t.exchange, t.symbol)
            sig = _key(t)
            if self.last.get(k) != sig:
                self.last[k] = sig
                out.append(t)
        return out


class QuotePoller:
    """Polls sina or qq every ``interval`` seconds and hands changed quotes to ``on_ticks``.

    ``codes``: ``sh600000``-style codes (or ``SSE.600000``). Requests carry the Referer that
    sina requires (without it sina answers 403 "Forbidden") and a browser User-Agent; up to
    ``chunk`` codes per request (sina takes ~800, qq ~60). Network errors are logged and the
    next round tries again. Never used in tests (no internet there).
    """

    def __init__(self, kind: str, codes: Sequence[str], on_ticks: Callable[[list[Tick]], Any], *,
                 interval: float = 3.0, timeout: float = 5.0, chunk: int | None = None,
                 opener: Callable[[urllib.request.Request, float], bytes] | None = None) -> None:
        if kind not in PARSERS:
            raise ValueError(f"unknown quote source {kind!r}; use sina or qq")
        self.kind = kind
        self.codes = [self._norm(c) for c in codes]
        if not self.codes:
            raise ValueError("no codes to poll")
        self.on_ticks = on_ticks
        self.interval = interval
        self.timeout = timeout
        self.chunk = chunk or (800 if kind == "sina" else 60)
        self.filter = ChangeFilter()
        self.opener = opener or self._open
        self._stop = threading.Event()
        self.rounds = 0
        self.published = 0

    @staticmethod
    def _norm(code: str) -> str:
        c = code.strip()
        if "." in c:
            from .random_source import parse_instrument

            ex, sym = parse_instrument(c)
            return to_code(ex, sym)
        if c[:2].lower() in PREFIX_TO_EXCHANGE:
            split_code(c)
            return c.lower()
        return to_code("", c)

    def urls(self) -> list[str]:
        tpl = SINA_URL if self.kind == "sina" else QQ_URL
        return [tpl.format(codes=",".join(self.codes[i:i + self.chunk])) for i in range(0, len(self.codes), self.chunk)]

    def request(self, url: str) -> urllib.request.Request:
        headers = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) QAFlow"}
        if self.kind == "sina":
            headers["Referer"] = SINA_REFERER
        return urllib.request.Request(url, headers=headers)

    @staticmethod
    def _open(req: urllib.request.Request, timeout: float) -> bytes:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - fixed https URLs
            return bytes(resp.read())

    def poll_once(self) -> list[Tick]:
        """One round: fetch, parse, keep the changed quotes, call ``on_ticks``; returns them."""
        parse = PARSERS[self.kind]
        ticks: list[Tick] = []
        for url in self.urls():
            try:
                body = self.opener(self.request(url), self.timeout)
            except OSError as exc:
                log.warning("%s fetch failed: %s", self.kind, exc, extra={"url": url})
                continue
            ticks += parse(body.decode("gbk", errors="replace"))
        changed = self.filter.changed(ticks)
        self.rounds += 1
        if changed:
            self.on_ticks(changed)
            self.published += len(changed)
        return changed

    def stop(self) -> None:
        self._stop.set()

    def run(self, stop: Any = None, rounds: int | None = None) -> int:
        """Poll until :meth:`stop` / ``stop.is_set()`` / ``rounds`` done; returns the quotes handed on."""
        stop = stop or self._stop
        n = 0
        while not stop.is_set() and not self._stop.is_set() and (rounds is None or n < rounds):
            started = time.monotonic()
            self.poll_once()
            n += 1
            while not stop.is_set() and not self._stop.is_set():
                left = self.interval - (time.monotonic() - started)
                if left <= 0:
                    break
                time.sleep(min(left, 0.1))
        return self.published
