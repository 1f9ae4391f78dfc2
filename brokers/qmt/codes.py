"""Stock codes, lots and the xtquant constants QAFlow relies on (checked against xtquant's
``xtconstant.py``: STOCK_BUY 23, STOCK_SELL 24, FIX_PRICE 11, order status 48..57, 255)."""
from __future__ import annotations

from typing import Any

from qaorder.models import OrderStatus

SUFFIX_TO_EXCHANGE = {"SH": "SSE", "SZ": "SZSE", "BJ": "BSE"}
EXCHANGE_TO_SUFFIX = {v: k for k, v in SUFFIX_TO_EXCHANGE.items()}

# xtconstant values (verified against xtquant/xtconstant.py)
STOCK_BUY, STOCK_SELL = 23, 24
FIX_PRICE = 11
MARKET_SH_CONVERT_5_CANCEL = 42
MARKET_SZ_CONVERT_5_CANCEL = 47
ORDER_UNREPORTED, ORDER_WAIT_REPORTING, ORDER_REPORTED = 48, 49, 50
ORDER_REPORTED_CANCEL, ORDER_PARTSUCC_CANCEL, ORDER_PART_CANCEL = 51, 52, 53
ORDER_CANCELED, ORDER_PART_SUCC, ORDER_SUCCEEDED, ORDER_JUNK, ORDER_UNKNOWN = 54, 55, 56, 57, 255

#: xt order_status -> ours (None: not a status change we report)
STATUS = {
    ORDER_UNREPORTED: OrderStatus.SUBMITTING, ORDER_WAIT_REPORTING: OrderStatus.SUBMITTING,
    ORDER_REPORTED: OrderStatus.NOTTRADED,
    ORDER_REPORTED_CANCEL: OrderStatus.NOTTRADED,      # cancel pending: still working
    ORDER_PARTSUCC_CANCEL: OrderStatus.PARTTRADED,     # cancel pending: still working
    ORDER_PART_CANCEL: OrderStatus.CANCELLED,          # part filled, rest cancelled
    ORDER_CANCELED: OrderStatus.CANCELLED, ORDER_PART_SUCC: OrderStatus.PARTTRADED,
    ORDER_SUCCEEDED: OrderStatus.ALLTRADED, ORDER_JUNK: OrderStatus.REJECTED,
}

INSTALL_HINT = ("xtquant ships with MiniQMT (Windows) and is not on PyPI: install your broker's QMT client, "
                "then put its xtquant package on PYTHONPATH (e.g. <QMT>/bin.x64/Lib/site-packages)")


class XtquantMissing(ImportError):
    """xtquant is not importable (not Windows, or MiniQMT's package not on the path)."""


class CodeError(ValueError):
    pass


def to_xt_code(exchange: str, symbol: str) -> str:
    """(``SSE``, ``600000``) -> ``600000.SH``."""
    try:
        return f"{symbol}.{EXCHANGE_TO_SUFFIX[exchange]}"
    except KeyError:
        raise CodeError(f"QMT trades SSE, SZSE and BSE, not {exchange}") from None


def from_xt_code(code: str) -> tuple[str, str]:
    """``600000.SH`` / ``000001.sz`` / ``430047.BJ`` -> (``SSE``|``SZSE``|``BSE``, symbol)."""
    sym, _, suffix = str(code).partition(".")
    ex = SUFFIX_TO_EXCHANGE.get(suffix.upper())
    if not sym or ex is None:
        raise CodeError(f"stock code {code!r}: expected <symbol>.SH|SZ|BJ")
    return ex, sym


def lot_rule(exchange: str, symbol: str) -> tuple[int, int]:
    """(minimum, increment) of a BUY: 100/100 on the main boards, 200/1 on the STAR market (688),
    100/1 on the Beijing exchange."""
    if exchange == "SSE" and symbol.startswith("688"):
        return 200, 1
    if exchange == "BSE":
        return 100, 1
    return 100, 100


def load_xtquant() -> Any:
    """``(xttrader, xtconstant, xttype)`` as a namespace, or :class:`XtquantMissing`."""
    import types

    try:
        from xtquant import xtconstant, xttrader, xttype
    except ImportError as exc:
        raise XtquantMissing(f"xtquant is not importable ({exc}). {INSTALL_HINT}") from exc
    return types.SimpleNamespace(xttrader=xttrader, xtconstant=xtconstant, xttype=xttype)
