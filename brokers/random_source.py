"""Random-price tick source, in the spirit of QUANTAXIS's ``RandomPrice`` / QARealtimeCollector's mock feed.

Many instruments at once -- futures of the instrument registry with their real price
ticks and a plausible price level each, plus a few SSE/SZSE stocks -- move on a seeded
random walk counted in *whole price ticks*, so every price is on the exchange's grid.

What a tick looks like
----------------------
* ``datetime``: exchange-local epoch ms (see :mod:`qamarket.sessions`) from a *simulated
  clock* that starts at any local time and advances in steps of ``interval_ms`` (500 ms,
  CTP's snapshot rate). Each step, every instrument whose session is in continuous
  trading at that minute (night sessions, the 10:15-10:30 break, lunch, weekends and
  ``calendar`` holidays all respected; call auctions are not simulated) emits a tick with
  probability ``activity``, stamped inside the step. Outside every session the clock
  jumps to the next minute in which some instrument trades.
* ``volume`` / ``turnover`` are cumulative per trading day (CTP semantics; futures
  volume in lots and turnover = price x lots x multiplier, stocks volume in shares and
  turnover in CNY) and restart at the first tick of a new trading day (a night session
  opens the next trading day). ``open_interest`` (futures only) carries across days.
* ``pre_settlement`` / ``pre_close`` are the previous trading day's last price (the
  starting level on the first day); ``limit_up`` / ``limit_down`` are pre_settlement
  +-``limit_pct`` snapped *inwards* to the tick grid; the last price never leaves them.
* Five levels of bid/ask around the last price with random volumes (levels that would
  cross a limit are 0, as at a limit-locked market).

Determinism: the same ``seed``, instruments, ``start`` and parameters give the same
market fields (every field except the envelope's ``id`` and ``ts``, which stay unique
per message so downstream idempotency never drops a second run). Use
:func:`market_fields` to compare.

Example::

    src = RandomSource(seed=7, start="2025-03-03 20:59:00")
    for tick in src.ticks(1000):           # no I/O: benchmarks, tests
        ...
    src.publish(StreamPublisher(conn, topology=topo), n=10_000, rate=2_000, batch=10)

Measured here (2 cores, shared): ~30-40k ticks/s generated on one core, above the ~17k
msg/s one AMQP connection carries one tick per message; with ``batch`` the generator is
the limit.
"""
from __future__ import annotations

import datetime as _dt
import heapq
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from qamarket.models import FUTURES_EXCHANGES, STOCK_EXCHANGES, InstrumentSpec, Tick, TickBatch, spec_for
from qamarket.sessions import MS_MIN, Calendar, DEFAULT_CALENDAR, Phase, template, to_ms

log = logging.getLogger(__name__)

SOURCE_NAME = "random"

#: Plausible price levels per product (2025-ish). Products not listed start at 2000 ticks.
PRICE_LEVELS: dict[str, float] = {
    "rb": 3300, "hc": 3400, "bu": 3500, "ru": 15000, "fu": 3000, "sp": 5800, "br": 12000, "cu": 78000,
    "al": 20500, "zn": 23000, "pb": 17000, "ni": 125000, "sn": 260000, "ss": 13000, "ao": 3200,
    "au": 680.0, "ag": 8000, "wr": 3600, "sc": 520.0, "bc": 70000, "lu": 3600, "nr": 13000, "ec": 1500.0,
    "i": 780, "j": 1500, "jm": 1000, "m": 2900, "y": 7800, "p": 8500, "c": 2200, "cs": 2600, "a": 4000,
    "b": 3600, "l": 7500, "v": 5000, "pp": 7200, "eg": 4400, "eb": 7800, "pg": 4500, "rr": 3500,
    "jd": 3500, "lh": 14000, "MA": 2500, "TA": 4800, "SR": 5900, "CF": 13500, "RM": 2500, "OI": 9000,
    "FG": 1200, "SA": 1400, "ZC": 700, "PF": 7000, "CY": 20000, "PX": 6800, "SH": 2500, "AP": 7500,
    "CJ": 10000, "UR": 1800, "SF": 6000, "SM": 6200, "PK": 8500, "IF": 3900.0, "IH": 2700.0,
    "IC": 5800.0, "IM": 6200.0, "T": 108.5, "TF": 106.0, "TS": 102.5, "TL": 118.0, "si": 9500, "lc": 75000,
}
#: A few stocks: (exchange, code, price level).
DEFAULT_STOCKS: tuple[tuple[str, str, float], ...] = (
    ("SSE", "600000", 10.50), ("SSE", "600519", 1580.00), ("SZSE", "000001", 11.20), ("SZSE", "300750", 250.00),
)
#: Futures products of the default set (one contract each).
DEFAULT_PRODUCTS: tuple[str, ...] = (
    "rb", "hc", "cu", "al", "au", "ag", "sc", "i", "m", "p", "MA", "TA", "SR", "CF", "IF", "IC", "T", "lc",
)


def _decimals(step: float) -> int:
    s = f"{step:.10f}".rstrip("0")
    return len(s.split(".")[1]) if "." in s else 0


def contract_code(product: str, exchange: str, year: int, month: int) -> str:
    """``("rb","SHFE",2026,1) -> "rb2601"``; CZCE uses three digits: ``("SR","CZCE",2026,1) -> "SR601"``."""
    return f"{product}{year % 10}{month:02d}" if exchange == "CZCE" else f"{product}{year % 100:02d}{month:02d}"


def default_instruments(start: int | _dt.datetime | str | None = None, *, stocks: bool = True) -> list[tuple[str, str]]:
    """The default ``(exchange, symbol)`` set: one contract ~2 months out per product, plus a few stocks."""
    d = from_any(start) if start is not None else now_local_ms()
    day = _dt.datetime(1970, 1, 1) + _dt.timedelta(milliseconds=d)
    y, m = divmod(day.year * 12 + day.month - 1 + 2, 12)
    out = []
    for product in DEFAULT_PRODUCTS:
        spec = spec_for(contract_code(product, "SHFE", y, m + 1))  # only the root matters for the lookup
        out.append((spec.exchange, contract_code(product, spec.exchange, y, m + 1)))
    if stocks:
        out += [(ex, code) for ex, code, _ in DEFAULT_STOCKS]
    return out


def now_local_ms() -> int:
    """Now, as exchange-local epoch ms."""
    return to_ms(_dt.datetime.now(_dt.timezone.utc))


def from_any(t: int | _dt.datetime | str) -> int:
    """Local epoch ms of an int, a datetime (naive = local) or ``"YYYY-MM-DD[ HH:MM[:SS[.fff]]]"``."""
    if isinstance(t, str):
        return to_ms(_dt.datetime.fromisoformat(t.strip()))
    return to_ms(t)


def parse_instrument(text: str | tuple[str, str]) -> tuple[str, str]:
    """``"SHFE.rb2601"``, ``"rb2601.SHFE"`` (vn.py's vt_symbol), ``("SHFE","rb2601")`` or ``"rb2601"`` -> (exchange, symbol)."""
    if isinstance(text, tuple):
        return text[0].upper(), text[1]
    if "." in text:
        a, b = text.split(".", 1)
        if a.upper() in FUTURES_EXCHANGES | STOCK_EXCHANGES:
            return a.upper(), b
        if b.upper() in FUTURES_EXCHANGES | STOCK_EXCHANGES:
            return b.upper(), a
        raise ValueError(f"instrument {text!r}: neither part is an exchange")
    return spec_for(text).exchange, text


def market_fields(tick: Tick) -> tuple[Any, ...]:
    """Every field of a tick except the envelope's ``id`` and ``ts`` (for comparing runs)."""
    return tuple(getattr(tick, f) for f in tick.__struct_fields__ if f not in ("id", "ts"))


def _limit_pct(spec: InstrumentSpec, symbol: str) -> float:
    if spec.exchange in STOCK_EXCHANGES:
        if spec.exchange == "BSE":
            return 0.30
        return 0.20 if symbol.startswith(("300", "301", "688", "689")) else 0.10
    if spec.session == "CFFEX_INDEX":
        return 0.10
    if spec.session == "CFFEX_BOND":
        return 0.02
    return 0.07


@dataclass
class _Instrument:
    exchange: str
    symbol: str
    spec: InstrumentSpec
    tick_size: float
    ndigits: int
    lot: int
    multiplier: float
    is_stock: bool
    limit_pct: float
    sigma: float  # std-dev of one tick's move, in price ticks
    p: int  # last price, in ticks
    anchor: int  # pre_settlement / pre_close, in ticks
    up: int = 0
    down: int = 0
    trading_day: str = ""
    open_: int = 0
    high: int = 0
    low: int = 0
    volume: float = 0.0
    turnover: float = 0.0
    oi: float = 0.0
    seq: int = 0
    cache: dict[int, float] | None = None

    def px(self, ticks: int) -> float:
        c = self.cache
        if c is None:
            c = self.cache = {}
        v = c.get(ticks)
        if v is None:
            v = c[ticks] = round(ticks * self.tick_size, self.ndigits)
        return v


class RandomSource:
    """A deterministic, seeded multi-instrument tick generator (no I/O).

    ``instruments``: ``"SHFE.rb2601"`` / ``"rb2601.SHFE"`` / ``(exchange, symbol)`` / a bare
    futures symbol; default :func:`default_instruments`. ``start``: local start time (int ms,
    naive datetime or ISO string; default now). ``prices`` overrides a starting level by
    symbol or product. ``vol`` is the std-dev of one tick's move as a fraction of price.
    """

    def __init__(self, seed: int = 0, instruments: Sequence[str | tuple[str, str]] | None = None, *,
                 start: int | _dt.datetime | str | None = None, interval_ms: int = 500, activity: float = 0.8,
                 vol: float = 0.0002, limit_pct: float | None = None, prices: dict[str, float] | None = None,
                 calendar: Calendar | None = None, source: str = SOURCE_NAME) -> None:
        if interval_ms < 1:
            raise ValueError("interval_ms must be >= 1")
        if not 0.0 < activity <= 1.0:
            raise ValueError("activity must be in (0, 1]")
        self.seed = seed
        self.rng = random.Random(seed)
        self.start = from_any(start) if start is not None else now_local_ms()
        self.interval_ms = interval_ms
        self.activity = activity
        self.calendar = calendar or DEFAULT_CALENDAR
        self.source = source
        prices = prices or {}
        stock_levels = {code: lvl for _, code, lvl in DEFAULT_STOCKS}
        pairs = [parse_instrument(i) for i in (instruments or default_instruments(self.start))]
        if not pairs:
            raise ValueError("RandomSource needs at least one instrument")
        self.instruments: list[_Instrument] = []
        for exchange, symbol in pairs:
            spec = spec_for(symbol, exchange)
            is_stock = exchange in STOCK_EXCHANGES
            level = prices.get(symbol) or prices.get(spec.product) or \
                (stock_levels.get(symbol, 10.0) if is_stock else PRICE_LEVELS.get(spec.product, 2000 * spec.price_tick))
            p = max(1, round(level / spec.price_tick))
            inst = _Instrument(
                exchange=exchange, symbol=symbol, spec=spec, tick_size=spec.price_tick,
                ndigits=_decimals(spec.price_tick), lot=spec.lot_size if is_stock else 1,
                multiplier=1.0 if is_stock else spec.multiplier, is_stock=is_stock,
                limit_pct=limit_pct if limit_pct is not None else _limit_pct(spec, symbol),
                sigma=p * vol, p=p, anchor=p,
                oi=0.0 if is_stock else float(self.rng.randrange(50_000, 400_000)),
            )
            self.instruments.append(inst)
        self._by_template: dict[str, list[int]] = {}
        for i, inst in enumerate(self.instruments):
            self._by_template.setdefault(inst.spec.session, []).append(i)
        self._t = self.start - self.start % interval_ms
        if self._t < self.start:
            self._t += interval_ms
        self._minute = -1
        self._active: list[_Instrument] = []
        self.generated = 0

    @property
    def now(self) -> int:
        """The simulated clock (local ms): the start of the next step."""
        return self._t

    # sessions -------------------------------------------------------------------------------
    def _active_at(self, minute: int) -> list[_Instrument]:
        t = minute * MS_MIN
        if not self.calendar.is_session_day(t):
            return []
        mod = minute % 1440
        out: list[int] = []
        for name, idx in self._by_template.items():
            if template(name).phase[mod] is Phase.CONTINUOUS:
                out.extend(idx)
        return [self.instruments[i] for i in sorted(out)]

    def _advance_to_session(self) -> None:
        minute = self._t // MS_MIN
        if minute == self._minute:
            return
        active = self._active_at(minute)
        jumped = 0
        while not active:
            minute += 1
            jumped += 1
            if jumped > 60 * 24 * 40:
                raise RuntimeError("no instrument trades within 40 days of the simulated clock: check the calendar")
            active = self._active_at(minute)
        if jumped:
            self._t = minute * MS_MIN
        self._minute = minute
        self._active = active

    # one tick ---------------------------------------------------------------------------------
    def _roll_day(self, inst: _Instrument, trading_day: str) -> None:
        if inst.trading_day:
            inst.anchor = inst.p  # previous day's last price becomes pre_close / pre_settlement
        inst.trading_day = trading_day
        inst.up = math.floor(inst.anchor * (1.0 + inst.limit_pct) + 1e-9)
        inst.down = max(1, math.ceil(inst.anchor * (1.0 - inst.limit_pct) - 1e-9))
        inst.p = min(max(inst.p, inst.down), inst.up)
        inst.volume = 0.0
        inst.turnover = 0.0
        inst.open_ = inst.high = inst.low = 0

    def _tick(self, inst: _Instrument, t: int) -> Tick:
        rng = self.rng
        td = self.calendar.trading_day(t)
        if td != inst.trading_day:
            self._roll_day(inst, td)
        # price: a random walk in whole ticks, clamped to the day's limits
        sigma = inst.sigma
        if sigma < 1.0:
            r = rng.random()
            step = (1 if r < sigma / 2 else -1) if r < sigma else 0
        else:
            step = round(rng.gauss(0.0, sigma))
        p = min(max(inst.p + step, inst.down), inst.up)
        inst.p = p
        if not inst.open_:
            inst.open_ = inst.high = inst.low = p
        elif p > inst.high:
            inst.high = p
        elif p < inst.low:
            inst.low = p
        price = inst.px(p)
        lots = rng.randint(1, 30)
        last_volume = float(lots * inst.lot)
        inst.volume += last_volume
        inst.turnover = round(inst.turnover + last_volume * price * inst.multiplier, 2)
        if not inst.is_stock:
            inst.oi = max(0.0, inst.oi + rng.randint(-lots, lots))
        # book: bid1/ask1 straddle (or touch) the last price; levels beyond a limit are empty
        bid1 = p - rng.randint(0, 1)
        ask1 = bid1 + 1
        bids = [bid1 - k for k in range(5)]
        asks = [ask1 + k for k in range(5)]
        bits = rng.getrandbits(80)  # ten 8-bit draws in one call: depth volumes 1..200 lots
        lot = inst.lot
        bv = [float(((bits >> (8 * k)) & 0xFF) % 200 * lot + lot) for k in range(5)]
        av = [float(((bits >> (8 * k + 40)) & 0xFF) % 200 * lot + lot) for k in range(5)]
        px = inst.px
        down, up = inst.down, inst.up
        if bids[4] >= down and asks[4] <= up:  # the usual case: no level touches a limit
            bp = [px(b) for b in bids]
            ap = [px(a) for a in asks]
        else:
            bp = [0.0] * 5
            ap = [0.0] * 5
            for k in range(5):
                if bids[k] >= down:
                    bp[k] = px(bids[k])
                else:
                    bv[k] = 0.0
                if asks[k] <= up:
                    ap[k] = px(asks[k])
                else:
                    av[k] = 0.0
        inst.seq += 1
        anchor = inst.px(inst.anchor)
        return Tick(
            symbol=inst.symbol, exchange=inst.exchange, datetime=t, last_price=price, trading_day=td,  # type: ignore[arg-type]
            volume=inst.volume, turnover=inst.turnover, open_interest=inst.oi, last_volume=last_volume,
            open_price=inst.px(inst.open_), high_price=inst.px(inst.high), low_price=inst.px(inst.low),
            pre_close=anchor, pre_settlement=0.0 if inst.is_stock else anchor,
            limit_up=inst.px(inst.up), limit_down=inst.px(inst.down),
            bid_price_1=bp[0], bid_price_2=bp[1], bid_price_3=bp[2], bid_price_4=bp[3], bid_price_5=bp[4],
            bid_volume_1=bv[0], bid_volume_2=bv[1], bid_volume_3=bv[2], bid_volume_4=bv[3], bid_volume_5=bv[4],
            ask_price_1=ap[0], ask_price_2=ap[1], ask_price_3=ap[2], ask_price_4=ap[3], ask_price_5=ap[4],
            ask_volume_1=av[0], ask_volume_2=av[1], ask_volume_3=av[2], ask_volume_4=av[3], ask_volume_5=av[4],
            source=self.source, seq=inst.seq,
        )

    # public generator API -----------------------------------------------------------------------
    def step(self) -> list[Tick]:
        """Advance the clock one step (skipping closed time) and return its ticks in time order."""
        self._advance_to_session()
        t0 = self._t
        rng = self.rng
        stamped: list[tuple[int, int, _Instrument]] = []
        for i, inst in enumerate(self._active):
            if rng.random() < self.activity:
                stamped.append((t0 + rng.randrange(self.interval_ms), i, inst))
        stamped.sort(key=lambda x: (x[0], x[1]))
        self._t = t0 + self.interval_ms
        out = []
        for t, _, inst in stamped:
            # a step that straddles a session end may stamp past it: keep only in-session ticks
            if t // MS_MIN != t0 // MS_MIN and template(inst.spec.session).phase[t // MS_MIN % 1440] is not Phase.CONTINUOUS:
                continue
            out.append(self._tick(inst, t))
        self.generated += len(out)
        return out

    def __iter__(self) -> Iterator[Tick]:
        while True:
            yield from self.step()

    def ticks(self, n: int | None = None) -> Iterator[Tick]:
        """The next ``n`` ticks (all instruments interleaved, time order); endless if ``n`` is None."""
        if n is None:
            yield from self
            return
        left = n
        while left > 0:
            for tick in self.step():
                yield tick
                left -= 1
                if left == 0:
                    return

    def batches(self, size: int, n: int | None = None) -> Iterator[TickBatch]:
        """:class:`TickBatch` messages of ``size`` ticks of one instrument, from the next ``n`` ticks.

        A batch is emitted when it is full; at the end (``n`` reached) partial batches are
        emitted too, so the batches hold exactly ``n`` ticks.
        """
        return batch_ticks(self.ticks(n), size)

    # publishing -----------------------------------------------------------------------------
    def publish(self, publisher: Any, n: int | None = None, rate: float | None = None,
                duration: float | None = None, *, batch: int = 1, speed: float | None = None,
                max_gap: float | None = None, exchange: str | None = None, stop: Any = None,
                install_signals: bool = True) -> int:
        """Publish ticks through a :class:`qapubsub.sync.StreamPublisher` until ``n`` ticks, ``duration``
        seconds, SIGTERM/SIGINT or ``stop.is_set()``; flush confirms; return the number of ticks published.

        ``rate``: ticks per second (paced); ``speed``: follow the simulated clock at ``speed`` x
        real time from the current simulated time (1.0 with the default ``start`` = now is a
        real-time feed, which waits for the session to open; ``max_gap`` caps a closed-market
        wait to that many seconds); neither: as fast as possible. ``batch`` > 1 sends
        :class:`TickBatch` messages of that many ticks of one instrument.
        """
        from .replay import publish_ticks

        return publish_ticks(publisher, self.ticks(n), exchange=exchange, batch=batch, rate=rate, speed=speed,
                             max_gap=max_gap, duration=duration, stop=stop, install_signals=install_signals,
                             origin_ms=self.now)


def batch_ticks(ticks: Iterable[Tick], size: int) -> Iterator[TickBatch]:
    """Group ticks per instrument into :class:`TickBatch` messages of ``size`` (partial ones at the end)."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    pending: dict[tuple[str, str], list[Tick]] = {}
    for tick in ticks:
        key = (tick.exchange, tick.symbol)
        buf = pending.get(key)
        if buf is None:
            buf = pending[key] = []
        buf.append(tick)
        if len(buf) >= size:
            del pending[key]
            yield TickBatch(symbol=tick.symbol, exchange=tick.exchange, ticks=buf)
    for (exchange, symbol), buf in pending.items():
        yield TickBatch(symbol=symbol, exchange=exchange, ticks=buf)  # type: ignore[arg-type]


def merge_by_time(*streams: Iterable[Tick]) -> Iterator[Tick]:
    """Merge time-ordered tick streams into one time-ordered stream."""
    return heapq.merge(*streams, key=lambda t: t.datetime)
