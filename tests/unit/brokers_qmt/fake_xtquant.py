"""A simulated ``xtquant`` (MiniQMT is Windows-only and not on PyPI): the documented API surface
and callback sequences, nothing more.

Names and constants follow xtquant's ``xttrader.py`` / ``xttype.py`` / ``xtconstant.py``:
``XtQuantTrader(path, session_id)``, ``register_callback``, ``start``, ``connect`` (0 ok),
``subscribe(account)`` (0 ok), ``order_stock_async(account, stock_code, order_type,
order_volume, price_type, price, strategy_name, order_remark)`` -> seq,
``cancel_order_stock_async(account, order_id)`` -> seq, ``query_stock_orders(account,
cancelable_only)``, ``query_stock_trades``, ``query_stock_positions``, ``query_stock_asset``,
``stop``. Callbacks come from the API's own thread: first
``on_order_stock_async_response(XtOrderResponse(.., seq))``, then ``on_stock_order``
(status 50 reported), trades via ``on_stock_trade`` + ``on_stock_order`` (55/56), errors via
``on_order_error`` / ``on_cancel_error``, and ``on_disconnected``.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import types
from typing import Any

# xtconstant ---------------------------------------------------------------------------------
xtconstant = types.SimpleNamespace(
    SECURITY_ACCOUNT=2, STOCK_BUY=23, STOCK_SELL=24, FIX_PRICE=11, LATEST_PRICE=5,
    MARKET_SH_CONVERT_5_CANCEL=42, MARKET_SZ_CONVERT_5_CANCEL=47,
    ORDER_UNREPORTED=48, ORDER_WAIT_REPORTING=49, ORDER_REPORTED=50, ORDER_REPORTED_CANCEL=51,
    ORDER_PARTSUCC_CANCEL=52, ORDER_PART_CANCEL=53, ORDER_CANCELED=54, ORDER_PART_SUCC=55,
    ORDER_SUCCEEDED=56, ORDER_JUNK=57, ORDER_UNKNOWN=255)


# xttype ---------------------------------------------------------------------------------------
class StockAccount:
    def __init__(self, account_id: str, account_type: str = "STOCK") -> None:
        self.account_id, self.account_type = account_id, xtconstant.SECURITY_ACCOUNT


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class XtOrder(_Obj):
    pass


class XtTrade(_Obj):
    pass


class XtPosition(_Obj):
    pass


class XtOrderResponse(_Obj):
    pass


class XtOrderError(_Obj):
    pass


class XtCancelError(_Obj):
    pass


xttype = types.SimpleNamespace(StockAccount=StockAccount, XtOrder=XtOrder, XtTrade=XtTrade, XtPosition=XtPosition,
                               XtOrderResponse=XtOrderResponse, XtOrderError=XtOrderError, XtCancelError=XtCancelError)


# xttrader ---------------------------------------------------------------------------------------
class XtQuantTraderCallback:
    def on_connected(self) -> None: ...
    def on_disconnected(self) -> None: ...
    def on_stock_order(self, order: Any) -> None: ...
    def on_stock_trade(self, trade: Any) -> None: ...
    def on_order_error(self, error: Any) -> None: ...
    def on_cancel_error(self, error: Any) -> None: ...
    def on_order_stock_async_response(self, response: Any) -> None: ...


class Counter:
    """The broker's side, shared by every session (survives a reconnect or an executor restart)."""

    def __init__(self) -> None:
        self.orders: dict[int, XtOrder] = {}
        self.trades: list[XtTrade] = []
        self.positions: dict[str, XtPosition] = {}
        self.ids = itertools.count(1001)
        self.trade_ids = itertools.count(5001)
        self.connect_rc = 0
        self.sessions: list[XtQuantTrader] = []


COUNTER = Counter()


class XtQuantTrader:
    def __init__(self, path: str, session_id: int) -> None:
        self.path, self.session_id = path, session_id
        self.counter = COUNTER
        self.callback: Any = None
        self.seq = itertools.count(1)
        self.requests: list[dict[str, Any]] = []
        self.cancels: list[int] = []
        self.q: queue.Queue[Any] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.hold = False     # async responses held back (a crash before they arrive)
        COUNTER.sessions.append(self)

    def register_callback(self, callback: Any) -> None:
        self.callback = callback

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:   # the API's callback thread
        while True:
            item = self.q.get()
            if item is None:
                return
            name, arg = item
            if arg is None:
                getattr(self.callback, name)()
            else:
                getattr(self.callback, name)(arg)

    def _cb(self, name: str, arg: Any) -> None:
        self.q.put((name, arg))

    def stop(self) -> None:
        self.q.put(None)

    def connect(self) -> int:
        return self.counter.connect_rc

    def subscribe(self, account: StockAccount) -> int:
        return 0

    def order_stock_async(self, account: StockAccount, stock_code: str, order_type: int, order_volume: int,
                          price_type: int, price: float, strategy_name: str = "", order_remark: str = "") -> int:
        seq = next(self.seq)
        self.requests.append(dict(stock_code=stock_code, order_type=order_type, order_volume=order_volume,
                                  price_type=price_type, price=price, strategy_name=strategy_name,
                                  order_remark=order_remark, seq=seq))
        oid = next(self.counter.ids)
        o = XtOrder(account_id=account.account_id, stock_code=stock_code, order_id=oid, order_sysid=f"S{oid}",
                    order_time=int(time.time()), order_type=order_type, order_volume=order_volume,
                    price_type=price_type, price=price, traded_volume=0, traded_price=0.0,
                    order_status=xtconstant.ORDER_REPORTED, status_msg="", strategy_name=strategy_name,
                    order_remark=order_remark)
        self.counter.orders[oid] = o
        if not self.hold:
            self._cb("on_order_stock_async_response", XtOrderResponse(account_id=account.account_id, order_id=oid,
                                                                      strategy_name=strategy_name,
                                                                      order_remark=order_remark, seq=seq))
            self._cb("on_stock_order", self._copy(o))
        return seq

    def cancel_order_stock_async(self, account: StockAccount, order_id: int) -> int:
        self.cancels.append(order_id)
        return next(self.seq)

    def query_stock_orders(self, account: StockAccount, cancelable_only: bool = False) -> list[XtOrder]:
        return [self._copy(o) for o in self.counter.orders.values()]

    def query_stock_trades(self, account: StockAccount) -> list[XtTrade]:
        return list(self.counter.trades)

    def query_stock_positions(self, account: StockAccount) -> list[XtPosition]:
        return list(self.counter.positions.values())

    def query_stock_asset(self, account: StockAccount) -> Any:
        return _Obj(account_id=account.account_id, cash=1e6, frozen_cash=0.0, market_value=0.0, total_asset=1e6)

    # what the counter does (test helpers) ---------------------------------------------------
    @staticmethod
    def _copy(o: XtOrder) -> XtOrder:
        return XtOrder(**o.__dict__)

    def fill(self, order_id: int, volume: int, price: float, push: bool = True) -> XtTrade:
        o = self.counter.orders[order_id]
        o.traded_volume += volume
        o.traded_price = price
        o.order_status = xtconstant.ORDER_SUCCEEDED if o.traded_volume >= o.order_volume else xtconstant.ORDER_PART_SUCC
        t = XtTrade(account_id=o.account_id, stock_code=o.stock_code, order_type=o.order_type,
                    traded_id=f"T{next(self.counter.trade_ids)}", traded_time=1741230000, traded_price=price,
                    traded_volume=volume, traded_amount=price * volume, order_id=order_id, order_sysid=o.order_sysid,
                    strategy_name=o.strategy_name, order_remark=o.order_remark)
        self.counter.trades.append(t)
        if push:
            self._cb("on_stock_trade", t)
            self._cb("on_stock_order", self._copy(o))
        return t

    def set_status(self, order_id: int, status: int, msg: str = "", push: bool = True) -> None:
        o = self.counter.orders[order_id]
        o.order_status, o.status_msg = status, msg
        if push:
            self._cb("on_stock_order", self._copy(o))

    def order_error(self, order_id: int, error_id: int, msg: str, remark: str) -> None:
        self._cb("on_order_error", XtOrderError(account_id="", order_id=order_id, error_id=error_id, error_msg=msg,
                                                strategy_name="qaflow", order_remark=remark))

    def cancel_error(self, order_id: int, msg: str) -> None:
        self._cb("on_cancel_error", XtCancelError(account_id="", order_id=order_id, market=0, order_sysid="",
                                                  error_id=-1, error_msg=msg))

    def disconnect(self) -> None:
        self._cb("on_disconnected", None)


xttrader = types.SimpleNamespace(XtQuantTrader=XtQuantTrader, XtQuantTraderCallback=XtQuantTraderCallback)
XT = types.SimpleNamespace(xttrader=xttrader, xtconstant=xtconstant, xttype=xttype)


def reset() -> Counter:
    global COUNTER
    COUNTER = Counter()
    return COUNTER
