"""The only module that imports vn.py (``vnpy`` 4.5, ``vnpy_ctp`` 6.7), and what we rely on of it.

Imported lazily by :mod:`brokers.ctp.md` when the process starts, never by ``brokers`` or
``brokers.ctp`` themselves. :func:`load` raises :class:`VnpyMissing` with the install
command when the extra is not installed.

What QAFlow relies on, pinned by tests (``tests/unit/brokers_ctp``):

* ``vnpy.event.EventEngine``: one worker thread calls every handler in turn; a handler that
  raises kills that thread silently (``_run`` only catches ``queue.Empty``), and the other
  handlers of the same event are skipped. So every handler we register is wrapped
  (:func:`brokers.ctp.md.guarded`), and :func:`guarded_engine_class` returns an
  ``EventEngine`` whose dispatch also guards the gateway's own handlers (its timer query).
* ``vnpy_ctp``'s market-data API reports connection state only as log texts
  (``gateway.write_log`` -> ``EVENT_LOG`` with ``LogData(msg, gateway_name)``); the texts
  are literal Chinese strings in ``vnpy_ctp/gateway/ctp_gateway.py``, not localised:
  ``MD_LOGIN_OK`` after ``onRspUserLogin`` without error (also after every reconnect: CTP
  reconnects by itself and logs in again on ``onFrontConnected``), ``MD_DISCONNECTED`` on
  ``onFrontDisconnected``. A test reads vnpy_ctp's source to check the texts still exist.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'qaflow[ctp]'  (vnpy==4.5.0 vnpy_ctp==6.7.11.4; see docs/brokers.md)"

# vnpy_ctp 6.7.11 CtpMdApi / CtpTdApi log texts (ctp_gateway.py).
MD_CONNECTED = "行情服务器连接成功"
MD_DISCONNECTED = "行情服务器连接断开"  # + "，原因{reason}"
MD_LOGIN_OK = "行情服务器登录成功"
MD_LOGIN_FAILED = "行情服务器登录失败"  # + "，代码：{id}，信息：{msg}" (write_error)
MD_SUBSCRIBE_FAILED = "行情订阅失败"
MD_ERROR = "行情接口报错"
TD_CONNECTED = "交易服务器连接成功"
TD_DISCONNECTED = "交易服务器连接断开"
TD_AUTH_FAILED = "交易服务器授权验证失败"
TD_LOGIN_OK = "交易服务器登录成功"
TD_LOGIN_FAILED = "交易服务器登录失败"
CONTRACTS_OK = "合约信息查询成功"  # from here on vnpy_ctp emits ticks (it drops them before)

#: every text above that the process reacts to or reports, for the source-pinning test.
RELIED_ON = (MD_CONNECTED, MD_DISCONNECTED, MD_LOGIN_OK, MD_LOGIN_FAILED, MD_SUBSCRIBE_FAILED,
             TD_DISCONNECTED, TD_LOGIN_OK, TD_LOGIN_FAILED, CONTRACTS_OK)


class VnpyMissing(ImportError):
    """vn.py or vnpy_ctp is not installed."""


class Vnpy:
    """The vn.py names the market-data process uses, resolved once by :func:`load`."""

    def __init__(self, *, with_ctp: bool = True) -> None:
        try:
            from vnpy.event import Event, EventEngine
            from vnpy.trader.constant import Exchange
            from vnpy.trader.event import EVENT_LOG, EVENT_TICK, EVENT_TIMER
            from vnpy.trader.object import LogData, SubscribeRequest, TickData
        except ImportError as exc:
            raise VnpyMissing(f"vn.py is not installed ({exc}); install it with: {INSTALL_HINT}") from exc
        self.Event = Event
        self.EventEngine = EventEngine
        self.Exchange = Exchange
        self.EVENT_LOG: str = EVENT_LOG
        self.EVENT_TICK: str = EVENT_TICK
        self.EVENT_TIMER: str = EVENT_TIMER
        self.LogData = LogData
        self.SubscribeRequest = SubscribeRequest
        self.TickData = TickData
        self.CtpGateway: Any = None
        if with_ctp:
            try:
                from vnpy_ctp import CtpGateway
            except ImportError as exc:
                raise VnpyMissing(f"vnpy_ctp is not installed ({exc}); install it with: {INSTALL_HINT}") from exc
            self.CtpGateway = CtpGateway


_LOADED: dict[bool, Vnpy] = {}


def load(*, with_ctp: bool = True) -> Vnpy:
    v = _LOADED.get(with_ctp)
    if v is None:
        v = _LOADED[with_ctp] = Vnpy(with_ctp=with_ctp)
    return v


def guarded_engine_class(on_error: Callable[[str, BaseException], None] | None = None) -> type:
    """An ``EventEngine`` subclass whose dispatch survives any handler's exception.

    vn.py's ``_process`` calls handlers in a list comprehension; one exception ends the
    worker thread. This one calls each handler in its own ``try`` and reports the error to
    ``on_error(event_type, exc)`` (default: log it). It overrides the private ``_process``
    (same in vn.py 3.x and 4.x); a test drives it with a raising handler.
    """
    EventEngine = load(with_ctp=False).EventEngine

    def report(event_type: str, exc: BaseException) -> None:
        log.error("vn.py event handler raised on %s: %s: %s", event_type, type(exc).__name__, exc,
                  exc_info=exc, extra={"event_type": event_type})

    sink = on_error or report

    class GuardedEventEngine(EventEngine):  # type: ignore[misc, valid-type]
        def _process(self, event: Any) -> None:
            handlers = self._handlers.get(event.type)
            for handler in (*(handlers or ()), *self._general_handlers):
                try:
                    handler(event)
                except Exception as exc:  # noqa: BLE001 - the worker thread must survive
                    sink(event.type, exc)

    return GuardedEventEngine
