"""The vn.py trading-side names the CTP executor uses (``vnpy`` 4.5), imported lazily.

Kept next to :mod:`brokers.ctp.vnpy_compat` (the market-data side; its guarded engine and
log texts are reused) so that ``import brokers.ctp.td`` loads no vn.py. Raises
:class:`~brokers.ctp.vnpy_compat.VnpyMissing` with the install command when vn.py is absent.
"""
from __future__ import annotations

from typing import Any

from .vnpy_compat import INSTALL_HINT, VnpyMissing

# vnpy_ctp 6.7.11 CtpTdApi log texts the executor reacts to (besides vnpy_compat's TD_* / CONTRACTS_OK)
ORDER_INSERT_FAILED = "交易委托失败"
CANCEL_FAILED = "交易撤单失败"


class VnTd:
    def __init__(self) -> None:
        try:
            from vnpy.trader.constant import Direction, Exchange, Offset, OrderType, Status
            from vnpy.trader.event import (
                EVENT_ACCOUNT, EVENT_LOG, EVENT_ORDER, EVENT_POSITION, EVENT_TIMER, EVENT_TRADE,
            )
            from vnpy.trader.object import CancelRequest, OrderRequest
        except ImportError as exc:
            raise VnpyMissing(f"vn.py is not installed ({exc}); install it with: {INSTALL_HINT}") from exc
        self.Direction: Any = Direction
        self.Exchange: Any = Exchange
        self.Offset: Any = Offset
        self.OrderType: Any = OrderType
        self.Status: Any = Status
        self.OrderRequest: Any = OrderRequest
        self.CancelRequest: Any = CancelRequest
        self.EVENT_ORDER: str = EVENT_ORDER
        self.EVENT_TRADE: str = EVENT_TRADE
        self.EVENT_POSITION: str = EVENT_POSITION
        self.EVENT_ACCOUNT: str = EVENT_ACCOUNT
        self.EVENT_LOG: str = EVENT_LOG
        self.EVENT_TIMER: str = EVENT_TIMER


_LOADED: list[VnTd] = []


def load() -> VnTd:
    if not _LOADED:
        _LOADED.append(VnTd())
    return _LOADED[0]


def ctp_gateway_class() -> Any:
    from .vnpy_compat import load as load_md

    return load_md(with_ctp=True).CtpGateway
