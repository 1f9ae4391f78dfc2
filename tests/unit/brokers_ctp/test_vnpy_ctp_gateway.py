"""The REAL ``vnpy_ctp.CtpGateway``, offline: its CTP API callbacks are called directly, as the
CTP library's thread would call them, and only the outbound ``subscribeMarketData`` is
replaced by a recorder (no front is connected, so the native API is never created).

Needs the compiled ``vnpy_ctp`` extension (``pip install 'qaflow[ctp]'``, ~100 s to build);
skipped without it.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vnpy_ctp", reason="vnpy_ctp not installed (pip install 'qaflow[ctp]')")

import vnpy_ctp.gateway.ctp_gateway as ctp_module  # noqa: E402
from vnpy.event import EventEngine  # noqa: E402
from vnpy.trader.constant import Exchange, Product  # noqa: E402
from vnpy.trader.object import ContractData  # noqa: E402
from vnpy_ctp import CtpGateway  # noqa: E402

from brokers.ctp import settings as st  # noqa: E402
from brokers.ctp import vnpy_compat as vc  # noqa: E402
from brokers.ctp.md import CtpMarketData  # noqa: E402
from brokers.ctp.settings import CtpSettings  # noqa: E402

from .conftest import ENV, ListSink, wait_for  # noqa: E402

DBL_MAX = sys.float_info.max


class OfflineCtpGateway(CtpGateway):
    """The real gateway; ``connect`` records instead of creating the native API, and the md
    API's ``subscribeMarketData`` records instead of calling into CTP."""

    def __init__(self, event_engine: EventEngine, gateway_name: str) -> None:
        super().__init__(event_engine, gateway_name)
        self.sent: list[str] = []
        self.setting: dict[str, Any] | None = None
        self.md_api.subscribeMarketData = self._record  # type: ignore[method-assign]

    def _record(self, symbol: str) -> int:
        self.sent.append(symbol)
        return 0

    def connect(self, setting: dict) -> None:
        self.setting = dict(setting)


def depth(symbol: str = "rb2512", **kw: Any) -> dict[str, Any]:
    """A CThostFtdcDepthMarketDataField as vnpy_ctp's C++ layer hands it to Python."""
    d: dict[str, Any] = {
        "TradingDay": "20250304", "ActionDay": "20250303", "InstrumentID": symbol, "UpdateTime": "21:00:01",
        "UpdateMillisec": 500, "LastPrice": 3925.0, "Volume": 1200, "Turnover": 47_100_000.0,
        "OpenInterest": 1_800_000.0, "UpperLimitPrice": 4200.0, "LowerLimitPrice": 3650.0,
        "OpenPrice": 3920.0, "HighestPrice": 3930.0, "LowestPrice": 3915.0, "PreClosePrice": 3910.0,
        "PreSettlementPrice": 3912.0,
        "BidPrice1": 3924.0, "AskPrice1": 3925.0, "BidVolume1": 10, "AskVolume1": 12,
    }
    for i in range(2, 6):
        d.update({f"BidPrice{i}": DBL_MAX, f"AskPrice{i}": DBL_MAX, f"BidVolume{i}": 0, f"AskVolume{i}": 0})
    d.update(kw)
    return d


@pytest.fixture
def feed() -> Iterator[tuple[CtpMarketData, ListSink]]:
    ee = EventEngine(0.1)  # type: ignore[arg-type]
    ee.start()
    sink = ListSink()
    md = CtpMarketData(CtpSettings.from_env(ENV), gateway_class=OfflineCtpGateway, event_engine=ee,
                       sink_factory=lambda: sink, flush_interval=0.01)
    contract = ContractData(symbol="rb2512", exchange=Exchange.SHFE, name="螺纹钢2512", product=Product.FUTURES,
                            size=10, pricetick=1.0, gateway_name="CTP")
    ctp_module.symbol_contract_map["rb2512"] = contract   # what the trader front's instrument query fills
    md.start()
    try:
        yield md, sink
    finally:
        ctp_module.symbol_contract_map.pop("rb2512", None)
        md.stop()
        ee.stop()


def test_setting_keys_match_vnpy_ctp() -> None:
    assert set(CtpGateway.default_setting) == {st.KEY_USERID, st.KEY_PASSWORD, st.KEY_BROKERID, st.KEY_TD_FRONT,
                                              st.KEY_MD_FRONT, st.KEY_APPID, st.KEY_AUTH_CODE, st.KEY_ENVIRONMENT}
    assert set(CtpGateway.default_setting[st.KEY_ENVIRONMENT]) == {st.ENV_PRODUCTION, st.ENV_TEST}


def test_log_texts_we_react_to_exist_in_vnpy_ctp() -> None:
    source = inspect.getsource(ctp_module)
    missing = [text for text in vc.RELIED_ON if text not in source]
    assert not missing, f"vnpy_ctp no longer logs {missing}: update brokers/ctp/vnpy_compat.py"


def test_real_login_callback_resubscribes_every_symbol(feed: tuple[CtpMarketData, ListSink]) -> None:
    md, _ = feed
    gw: OfflineCtpGateway = md.gateway
    assert gw.setting is not None and gw.setting["柜台环境"] == "实盘"
    assert gw.sent == [] and gw.md_api.subscribed == {"rb2512", "i2601"}   # recorded until logged in
    ok = {"ErrorID": 0, "ErrorMsg": ""}
    gw.md_api.onFrontConnected = lambda: gw.write_log(vc.MD_CONNECTED)  # the real one calls login() (native)
    gw.md_api.onFrontConnected()
    gw.md_api.onRspUserLogin({}, ok, 1, True)            # vnpy_ctp re-sends its own set, then logs
    assert wait_for(lambda: md.logins == 1)
    assert wait_for(lambda: sorted(gw.sent) == sorted(["rb2512", "i2601"] * 2))  # vnpy_ctp's + ours
    gw.md_api.onFrontDisconnected(0x1001)                # network read failure
    assert wait_for(lambda: md.disconnects == 1 and not md.md_logged_in)
    gw.md_api.onRspUserLogin({}, ok, 2, True)            # CTP reconnected by itself and logged in
    assert wait_for(lambda: md.logins == 2 and len(gw.sent) == 8)
    gw.md_api.onRspUserLogin({}, {"ErrorID": 3, "ErrorMsg": "不合法的登录"}, 3, True)
    gw.write_log("sync")
    assert wait_for(lambda: md.logins == 2) and len(gw.sent) == 8


def test_real_depth_market_data_to_tick(feed: tuple[CtpMarketData, ListSink]) -> None:
    md, sink = feed
    gw: OfflineCtpGateway = md.gateway
    gw.md_api.onRtnDepthMarketData(depth(UpperLimitPrice=DBL_MAX, OpenPrice=DBL_MAX))
    gw.md_api.onRtnDepthMarketData(depth("unknown2512"))   # no contract yet: vnpy_ctp drops it
    gw.md_api.onRtnDepthMarketData(depth(UpdateTime=""))   # no time: vnpy_ctp drops it
    assert wait_for(lambda: len(sink.items) == 1)
    exchange, key, t = sink.items[0]
    assert (exchange, key) == ("qa.tick", "SHFE.rb2512")
    assert (t.symbol, t.exchange, t.source) == ("rb2512", "SHFE", "CTP")
    assert str(t.dt) == "2025-03-03 21:00:01.500000"
    assert (t.last_price, t.volume, t.turnover, t.open_interest) == (3925.0, 1200.0, 47_100_000.0, 1_800_000.0)
    assert (t.limit_up, t.limit_down, t.open_price) == (0.0, 3650.0, 0.0)   # DBL_MAX -> 0 (vnpy_ctp leaves limit_up)
    assert (t.high_price, t.low_price, t.pre_close) == (3930.0, 3915.0, 3910.0)
    assert (t.bid_price_1, t.ask_price_1, t.bid_volume_1, t.ask_volume_1) == (3924.0, 3925.0, 10.0, 12.0)
    assert (t.bid_price_2, t.ask_price_5) == (0.0, 0.0)
    assert (t.pre_settlement, t.trading_day) == (0.0, "")   # vnpy_ctp's TickData drops them
    assert md.handler_errors == 0
