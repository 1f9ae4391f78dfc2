"""Market-data messages (:class:`Tick`, :class:`TickBatch`, :class:`Bar`) and instrument specs.

Field names follow vn.py's ``TickData`` / ctpbee / ARBIG (``last_price``, ``volume``,
``turnover``, ``open_interest``, ``bid_price_1`` ...), so a vn.py user reads them as is.

``datetime`` is an ``int``: milliseconds since 1970-01-01 00:00 of the *exchange-local
wall clock* (China Standard Time, no DST, so the number is unambiguous and monotonic),
e.g. ``2025-03-03 09:00:00.500`` -> ``1740992400500``. It is the fastest form to
encode/decode (an int costs nothing next to an ISO string or a ``datetime`` that the
decoder must parse) and to compute with: ``ms // 60_000`` is the minute, so the bar
aggregator never builds a ``datetime`` per tick. Use :attr:`Tick.dt` for a naive local
``datetime`` and :func:`qamarket.sessions.to_ms` to make the number. Measured figures are
in the module's report / ``benchmarks/bench_aggregation.py``.

Volumes and turnover are ``float`` as in vn.py (a JSON integer decodes into them too).
"""
from __future__ import annotations

import datetime as _dtm
import re
import sys
from typing import Annotated, Literal

import msgspec

from qapubsub.messages import BodyDecoder, Message, decode

from .sessions import from_ms

Exchange = Literal["SHFE", "DCE", "CZCE", "CFFEX", "INE", "GFEX", "SSE", "SZSE", "BSE"]
EXCHANGES: tuple[str, ...] = ("SHFE", "DCE", "CZCE", "CFFEX", "INE", "GFEX", "SSE", "SZSE", "BSE")
FUTURES_EXCHANGES = frozenset({"SHFE", "DCE", "CZCE", "CFFEX", "INE", "GFEX"})
STOCK_EXCHANGES = frozenset({"SSE", "SZSE", "BSE"})
Freq = Literal["1min", "5min", "15min", "30min", "60min", "1day"]

#: CTP marks an unset price field with DBL_MAX.
UNSET_PRICE = sys.float_info.max


class Tick(Message, tag="qa.tick", gc=False):
    """One market snapshot. Cumulative ``volume``/``turnover`` are per trading day (CTP semantics)."""

    symbol: str
    exchange: Exchange
    datetime: int  # exchange-local epoch milliseconds, see module doc
    last_price: float
    trading_day: str = ""  # YYYYMMDD; empty = derive from datetime and the session calendar
    volume: float = 0.0  # cumulative
    turnover: float = 0.0  # cumulative
    open_interest: float = 0.0
    last_volume: float = 0.0
    open_price: float = 0.0
    high_price: float = 0.0
    low_price: float = 0.0
    pre_close: float = 0.0
    pre_settlement: float = 0.0
    limit_up: float = 0.0
    limit_down: float = 0.0
    bid_price_1: float = 0.0
    bid_price_2: float = 0.0
    bid_price_3: float = 0.0
    bid_price_4: float = 0.0
    bid_price_5: float = 0.0
    bid_volume_1: float = 0.0
    bid_volume_2: float = 0.0
    bid_volume_3: float = 0.0
    bid_volume_4: float = 0.0
    bid_volume_5: float = 0.0
    ask_price_1: float = 0.0
    ask_price_2: float = 0.0
    ask_price_3: float = 0.0
    ask_price_4: float = 0.0
    ask_price_5: float = 0.0
    ask_volume_1: float = 0.0
    ask_volume_2: float = 0.0
    ask_volume_3: float = 0.0
    ask_volume_4: float = 0.0
    ask_volume_5: float = 0.0
    source: str = ""  # gateway / feed name (vn.py's gateway_name)
    seq: int = 0  # per-source sequence number, 0 = unknown

    @property
    def dt(self) -> _dtm.datetime:
        """Naive exchange-local datetime."""
        return from_ms(self.datetime)

    @property
    def vt_symbol(self) -> str:
        return f"{self.symbol}.{self.exchange}"


class TickBatch(Message, tag="qa.tickbatch", gc=False):
    """Many ticks of one instrument in one message (replay, backfill), in time order."""

    symbol: str
    exchange: Exchange
    ticks: list[Tick]


#: Price fields besides ``last_price`` that a feed may leave unset (CTP: ``DBL_MAX``); the cleaner
#: stores them as 0.0.
PRICE_FIELDS: tuple[str, ...] = (
    "open_price", "high_price", "low_price", "pre_close", "pre_settlement", "limit_up", "limit_down",
    *(f"{side}_price_{i}" for side in ("bid", "ask") for i in range(1, 6)),
)

_SetPrice = Annotated[float, msgspec.Meta(lt=UNSET_PRICE)]

#: A :class:`Tick` whose decoder checked (in C) that none of :data:`PRICE_FIELDS` is unset, so the
#: cleaner has nothing to normalise (it skips the per-tick check). Same fields, same ``qa.tick`` tag:
#: made only by :class:`TickDecoder`, everywhere else it is just a Tick.
CheckedTick = msgspec.defstruct("CheckedTick", [(f, _SetPrice, 0.0) for f in PRICE_FIELDS], bases=(Tick,),
                                module=__name__, gc=False)


class CheckedTickBatch(TickBatch, gc=False):
    """A :class:`TickBatch` of :data:`CheckedTick` (see :class:`TickDecoder`)."""

    ticks: list[CheckedTick]  # type: ignore[valid-type]


class TickDecoder(BodyDecoder):
    """Decodes a ``Tick | TickBatch`` body (the tickhandler's ``message_type``).

    It first decodes with the price fields constrained below ``UNSET_PRICE`` (a check inside the
    decoder, ~0.07 µs a tick), which gives :data:`CheckedTick` objects whose normalisation the
    cleaner skips (it was ~10 % of the tickhandler's CPU for batched feeds). A body with an unset
    price fails that check and is decoded again as plain ``Tick | TickBatch``, and so are the next
    ``plain_for`` bodies: a feed that leaves prices unset (raw CTP) pays the second decode about
    once in ``plain_for`` messages, not for every one. Invalid bodies raise the plain decoder's
    :class:`~qapubsub.messages.DecodeError`.
    """

    def __init__(self, plain_for: int = 1000) -> None:
        self.plain_for = plain_for
        self._plain_left = 0
        self._checked = msgspec.json.Decoder(CheckedTick | CheckedTickBatch)

    def decode(self, data: bytes | bytearray | memoryview | str) -> Tick | TickBatch:
        if self._plain_left:
            self._plain_left -= 1
            return decode(data, Tick | TickBatch)
        try:
            return self._checked.decode(data)  # type: ignore[no-any-return]
        except msgspec.DecodeError:
            pass  # an unset price (or an invalid body: the plain decoder raises and says why)
        msg: Tick | TickBatch = decode(data, Tick | TickBatch)
        self._plain_left = self.plain_for
        return msg


class Bar(Message, tag="qa.bar", gc=False):
    """A bar labelled by its start. ``final=False`` for a realtime update (open fixed)."""

    symbol: str
    exchange: Exchange
    freq: Freq
    datetime: int  # bar start (label), exchange-local epoch ms; 1day: 00:00 of trading_day
    trading_day: str
    open: float
    high: float
    low: float
    close: float
    volume: float = 0.0  # in the bar (delta of the cumulative)
    turnover: float = 0.0  # in the bar
    open_interest: float = 0.0  # at the last tick
    final: bool = True
    tick_count: int = 0
    # closed bars: the label of the closed bar of the same series the publisher sent before this one
    # (None: none since it started, or not known). A consumer whose newest bar is older missed some.
    prev: int | None = None

    @property
    def dt(self) -> _dtm.datetime:
        return from_ms(self.datetime)


# ------------------------------------------------------------------------------------------ instruments
class InstrumentSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Static facts of a product (futures root) or of a stock class."""

    product: str  # "rb", "SR", "IF"; "STOCK" for equities
    exchange: Exchange
    price_tick: float
    lot_size: int = 1  # minimum order quantity
    multiplier: float = 1.0  # contract size
    session: str = "FUT_DAY"  # a qamarket.sessions.TEMPLATES name
    name: str = ""


_ROOT = re.compile(r"^([A-Za-z]+)")


def product_of(symbol: str) -> str:
    """``"rb2512" -> "rb"``, ``"SR601" -> "SR"``, ``"IF2512" -> "IF"``; digits only (stocks) -> ``"STOCK"``."""
    m = _ROOT.match(symbol)
    return m.group(1) if m else "STOCK"


def _fut(exchange: str, session: str, rows: str) -> list[InstrumentSpec]:
    out = []
    for row in rows.split(";"):
        if not row.strip():
            continue
        product, tick, mult, *name = row.split()
        out.append(
            InstrumentSpec(
                product=product, exchange=exchange, price_tick=float(tick), multiplier=float(mult),  # type: ignore[arg-type]
                session=session, name=" ".join(name),
            )
        )
    return out


# product price_tick multiplier name  (checked against exchange contract specs, 2025; verify before trading)
_FUTURES: list[InstrumentSpec] = [
    *_fut("SHFE", "FUT_NIGHT_2300", "rb 1 10 rebar; hc 1 10 hot-rolled coil; bu 1 10 bitumen; ru 5 10 rubber;"
          "fu 1 10 fuel oil; sp 2 10 pulp; br 5 5 butadiene rubber"),
    *_fut("SHFE", "FUT_NIGHT_0100", "cu 10 5 copper; al 5 5 aluminium; zn 5 5 zinc; pb 5 5 lead; ni 10 1 nickel;"
          "sn 10 1 tin; ss 5 5 stainless steel; ao 1 20 alumina"),
    *_fut("SHFE", "FUT_NIGHT_0230", "au 0.02 1000 gold; ag 1 15 silver"),
    *_fut("SHFE", "FUT_DAY", "wr 1 10 wire rod"),
    *_fut("INE", "FUT_NIGHT_0230", "sc 0.1 1000 crude oil"),
    *_fut("INE", "FUT_NIGHT_0100", "bc 10 5 international copper"),
    *_fut("INE", "FUT_NIGHT_2300", "lu 1 10 low-sulphur fuel oil; nr 5 10 TSR20 rubber"),
    *_fut("INE", "FUT_DAY", "ec 0.1 50 container freight index"),
    *_fut("DCE", "FUT_NIGHT_2300", "i 0.5 100 iron ore; j 0.5 100 coke; jm 0.5 60 coking coal; m 1 10 soybean meal;"
          "y 2 10 soybean oil; p 2 10 palm oil; c 1 10 corn; cs 1 10 corn starch; a 1 10 soybean no.1;"
          "b 1 10 soybean no.2; l 1 5 LLDPE; v 1 5 PVC; pp 1 5 polypropylene; eg 1 10 ethylene glycol;"
          "eb 1 5 styrene; pg 1 20 LPG; rr 1 10 rice"),
    *_fut("DCE", "FUT_DAY", "jd 1 10 eggs; lh 5 16 live hogs"),
    *_fut("CZCE", "FUT_NIGHT_2300", "MA 1 10 methanol; TA 2 5 PTA; SR 1 10 sugar; CF 5 5 cotton; RM 1 10 rapeseed meal;"
          "OI 1 10 rapeseed oil; FG 1 20 glass; SA 1 20 soda ash; ZC 0.2 100 thermal coal; PF 2 5 polyester staple;"
          "CY 5 5 cotton yarn; PX 2 5 paraxylene; SH 1 30 caustic soda"),
    *_fut("CZCE", "FUT_DAY", "AP 1 10 apples; CJ 5 5 jujubes; UR 1 20 urea; SF 2 5 ferrosilicon; SM 2 5 silicomanganese;"
          "PK 2 5 peanuts"),
    *_fut("CFFEX", "CFFEX_INDEX", "IF 0.2 300 CSI 300; IH 0.2 300 SSE 50; IC 0.2 200 CSI 500; IM 0.2 200 CSI 1000"),
    *_fut("CFFEX", "CFFEX_BOND", "T 0.005 10000 10y treasury; TF 0.005 10000 5y treasury; TS 0.002 20000 2y treasury;"
          "TL 0.01 10000 30y treasury"),
    *_fut("GFEX", "FUT_DAY", "si 5 5 industrial silicon; lc 50 1 lithium carbonate"),
]
_STOCKS = {
    ex: InstrumentSpec(product="STOCK", exchange=ex, price_tick=0.01, lot_size=100, multiplier=1.0, session="STOCK",  # type: ignore[arg-type]
                       name=f"{ex} equity")
    for ex in ("SSE", "SZSE", "BSE")
}


class UnknownInstrument(LookupError):
    """No spec for a symbol; ``str()`` names it."""


class InstrumentRegistry:
    """Specs by product root (futures) and by exchange (stocks). ``register`` adds or replaces one."""

    def __init__(self, specs: list[InstrumentSpec] | None = None) -> None:
        self._by_product: dict[str, InstrumentSpec] = {}
        self._cache: dict[tuple[str, str | None], InstrumentSpec] = {}
        for s in _FUTURES if specs is None else specs:
            self.register(s)

    def register(self, spec: InstrumentSpec) -> None:
        self._by_product[spec.product] = spec
        self._cache.clear()

    def products(self) -> list[str]:
        return sorted(self._by_product)

    def get(self, symbol: str, exchange: str | None = None) -> InstrumentSpec:
        """The spec of ``symbol`` (``"rb2512"``, ``"SR601"``, ``"600000"``), raising :class:`UnknownInstrument`."""
        key = (symbol, exchange)
        spec = self._cache.get(key)
        if spec is not None:
            return spec
        if exchange in STOCK_EXCHANGES:
            spec = _STOCKS[exchange]
        else:
            root = product_of(symbol)
            spec = self._by_product.get(root) or self._by_product.get(root.lower()) or self._by_product.get(root.upper())
            if spec is None or (exchange is not None and spec.exchange != exchange):
                raise UnknownInstrument(f"no instrument spec for {symbol!r} on {exchange or 'any exchange'}")
        self._cache[key] = spec
        return spec


DEFAULT_REGISTRY = InstrumentRegistry()


def spec_for(symbol: str, exchange: str | None = None) -> InstrumentSpec:
    return DEFAULT_REGISTRY.get(symbol, exchange)
