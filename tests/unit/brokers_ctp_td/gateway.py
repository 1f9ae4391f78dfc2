"""The vn.py boundary of the CTP executor tests: a REAL ``BaseGateway`` subclass that records
``send_order``/``cancel_order`` and emits REAL vn.py ``OrderData``/``TradeData``/``PositionData``
and log texts through the REAL ``EventEngine`` (``BaseGateway.on_order`` etc.), the way
``vnpy_ctp.CtpGateway`` does: ``send_order`` emits a SUBMITTING OrderData before it returns
``"<gateway>.<FrontID>_<SessionID>_<OrderRef>"``; login is announced by the log texts
vnpy_ctp writes; a re-login replays the day's orders and trades (CTP private flow, RESTART).
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any
from zoneinfo import ZoneInfo

from vnpy.event import EventEngine
from vnpy.trader.constant import Direction, Exchange, Offset, OrderType, Status
from vnpy.trader.gateway import BaseGateway
from vnpy.trader.object import CancelRequest, OrderData, OrderRequest, PositionData, TradeData

from brokers.ctp import vnpy_compat as vc

SH = ZoneInfo("Asia/Shanghai")
ENV = {"QA_CTP_USERID": "u1", "QA_CTP_PASSWORD": "s3cret-pw", "QA_CTP_BROKER_ID": "9999",
       "QA_CTP_MD_FRONT": "tcp://127.0.0.1:1", "QA_CTP_TD_FRONT": "tcp://127.0.0.1:2", "QA_CTP_AUTH_CODE": "authc0de"}


class SimCtpGateway(BaseGateway):
    default_name = "CTP"
    exchanges = [Exchange.SHFE, Exchange.INE, Exchange.DCE, Exchange.CZCE, Exchange.CFFEX, Exchange.GFEX]
    default_setting: dict[str, Any] = {}

    def __init__(self, event_engine: EventEngine, gateway_name: str) -> None:
        super().__init__(event_engine, gateway_name)
        self.front, self.session, self.ref = 1, 1001, 0
        self.online = True            # connect() logs in
        self.refuse_send = False      # send_order returns "" (CTP API refused the request)
        self.connects: list[dict[str, Any]] = []
        self.connect_times: list[float] = []
        self.requests: list[OrderRequest] = []
        self.cancels: list[CancelRequest] = []
        self.orders: dict[str, OrderData] = {}
        self.trades: list[TradeData] = []
        self.closed = False
        self.lock = threading.Lock()

    # BaseGateway -------------------------------------------------------------------------
    def connect(self, setting: dict) -> None:
        self.connects.append(dict(setting))
        self.connect_times.append(time.monotonic())
        if self.online:
            self.login()

    def close(self) -> None:
        self.closed = True

    def subscribe(self, req: Any) -> None:
        pass

    def send_order(self, req: OrderRequest) -> str:
        with self.lock:
            self.requests.append(req)
            if self.refuse_send:
                return ""
            self.ref += 1
            orderid = f"{self.front}_{self.session}_{self.ref}"
            order = req.create_order_data(orderid, self.gateway_name)
            self.orders[order.vt_orderid] = order
        self.on_order(order)    # as vnpy_ctp: before send_order returns
        return order.vt_orderid

    def cancel_order(self, req: CancelRequest) -> None:
        self.cancels.append(req)

    def query_account(self) -> None:
        pass

    def query_position(self) -> None:
        pass

    # what CTP would do -------------------------------------------------------------------
    def login(self, replay: bool = True) -> None:
        self.write_log(vc.TD_CONNECTED)
        self.write_log(vc.TD_LOGIN_OK)
        self.session += 1
        if replay:   # private flow RESTART: the day's orders and trades again
            for o in list(self.orders.values()):
                self.on_order(o)
            for t in list(self.trades):
                self.on_trade(t)
        self.write_log(vc.CONTRACTS_OK)

    def disconnect(self) -> None:
        self.write_log(f"{vc.TD_DISCONNECTED}，原因4097")

    def update(self, vt_orderid: str, status: Status, traded: float | None = None, push: bool = True) -> OrderData:
        o = self.orders[vt_orderid]
        o = OrderData(symbol=o.symbol, exchange=o.exchange, orderid=o.orderid, type=o.type, direction=o.direction,
                      offset=o.offset, price=o.price, volume=o.volume, traded=o.traded if traded is None else traded,
                      status=status, datetime=dt.datetime.now(SH), gateway_name=self.gateway_name)
        self.orders[vt_orderid] = o
        if push:
            self.on_order(o)
        return o

    def fill(self, vt_orderid: str, volume: float, price: float, tradeid: str, push: bool = True) -> TradeData:
        o = self.orders[vt_orderid]
        t = TradeData(symbol=o.symbol, exchange=o.exchange, orderid=o.orderid, tradeid=tradeid, direction=o.direction,
                      offset=o.offset, price=price, volume=volume,
                      datetime=dt.datetime(2025, 3, 3, 21, 5, 0, tzinfo=SH), gateway_name=self.gateway_name)
        self.trades.append(t)
        if push:
            self.on_trade(t)
        return t

    def position(self, symbol: str, exchange: Exchange, direction: Direction, volume: float, yd: float) -> None:
        self.on_position(PositionData(symbol=symbol, exchange=exchange, direction=direction, volume=volume,
                                      yd_volume=yd, gateway_name=self.gateway_name))


from .pubhelpers import ListPublisher, wait_for  # noqa: E402


__all__ = ["SimCtpGateway", "ListPublisher", "wait_for", "ENV", "Direction", "Exchange", "Offset", "OrderType",
           "Status"]
