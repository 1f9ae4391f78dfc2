"""The QMT executor against a simulated xtquant (fake_xtquant.py): callbacks on the API's own
thread, in the documented order (async response with seq, order status, trades, errors)."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from brokers.ctp.td_store import MemoryStore
from brokers.qmt import codes as c
from brokers.qmt.executor import QmtExecutor, remark_for
from qaorder.models import Cancel, Direction, Offset, Order, PriceType
from tests.unit.brokers_ctp_td.pubhelpers import ListPublisher, wait_for

from . import fake_xtquant as fx


def order(oid: str = "q1", *, volume: int = 300, direction: str = "BUY", offset: str = "OPEN", exchange: str = "SSE",
          symbol: str = "600000", pt: str = "LIMIT", price: float | None = 10.5) -> Order:
    return Order(order_id=oid, account="A", symbol=symbol, exchange=exchange, direction=Direction(direction),
                 offset=Offset(offset), price_type=PriceType(pt), price=price, volume=volume)


class H:
    def __init__(self, store: MemoryStore | None = None, delays: tuple[float, ...] = (5, 10, 30, 60)) -> None:
        self.store = store or MemoryStore()
        self.pub, self.cmd = ListPublisher(), ListPublisher()
        self.ex = QmtExecutor("A", "C:/qmt/userdata_mini", "8881", self.store, xt=fx.XT, session_id=100,
                              reconnect_delays=delays)
        self.ex.start(lambda: self.pub)

    @property
    def api(self) -> Any:
        return self.ex.trader

    def settle(self) -> None:
        import time
        for _ in range(3):   # the API thread, then our report thread
            time.sleep(0.03)
            assert self.ex.drain(5)

    def place(self, o: Order) -> None:
        self.ex.on_order(o, self.cmd)
        self.settle()

    def all(self, kind: str) -> list[dict[str, Any]]:
        return self.cmd.bodies(kind) + self.pub.bodies(kind)

    def statuses(self, oid: str = "q1") -> list[str]:
        return [b["status"] for b in self.all("order") if b["order_id"] == oid]


@pytest.fixture
def h() -> Iterator[H]:
    fx.reset()
    hh = H()
    yield hh
    hh.ex.stop()


def test_codes() -> None:
    assert c.to_xt_code("SSE", "600000") == "600000.SH" and c.to_xt_code("BSE", "430047") == "430047.BJ"
    assert c.from_xt_code("000001.SZ") == ("SZSE", "000001") and c.from_xt_code("430047.bj") == ("BSE", "430047")
    with pytest.raises(c.CodeError):
        c.to_xt_code("SHFE", "rb2512")
    with pytest.raises(c.CodeError):
        c.from_xt_code("600000")
    assert (c.lot_rule("SSE", "600000"), c.lot_rule("SSE", "688001"), c.lot_rule("BSE", "430047")) == (
        (100, 100), (200, 1), (100, 1))
    for name in ("STOCK_BUY", "STOCK_SELL", "FIX_PRICE", "ORDER_REPORTED", "ORDER_SUCCEEDED", "ORDER_JUNK",
                 "ORDER_CANCELED", "ORDER_PART_CANCEL"):
        assert getattr(c, name) == getattr(fx.xtconstant, name)


def test_buy_fill_flow_exactly_once(h: H) -> None:
    h.place(order())
    req = h.api.requests[0]
    assert {k: req[k] for k in ("stock_code", "order_type", "order_volume", "price_type", "price", "order_remark")} == {
        "stock_code": "600000.SH", "order_type": 23, "order_volume": 300, "price_type": 11, "price": 10.5,
        "order_remark": "q1"}
    xt_id = next(iter(fx.COUNTER.orders))
    h.api.fill(xt_id, 100, 10.49)
    h.api.fill(xt_id, 200, 10.5)
    h.settle()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "PARTTRADED", "ALLTRADED"]
    trades = h.all("trade")
    assert [(t["trade_id"], t["volume"], t["price"]) for t in trades] == [("q1-T5001", 100, 10.49),
                                                                          ("q1-T5002", 200, 10.5)]
    assert h.store.docs["q1"]["legs"][0]["vt_orderid"] == str(xt_id)
    ids = h.cmd.ids() + h.pub.ids()
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("o,field", [
    (order(volume=150), "volume"), (order(symbol="688001", volume=100), "volume"),
    (order(direction="SELL", offset="OPEN", volume=100), "offset"),
    (order(direction="SELL", offset="CLOSETODAY", volume=100), "offset"),
    (order(exchange="SHFE", symbol="rb2512"), "exchange"), (order(pt="FAK"), "price_type"),
    (order(exchange="BSE", symbol="430047", pt="MARKET", price=None), "price_type")])
def test_rejected_before_sending(h: H, o: Order, field: str) -> None:
    h.place(o)
    assert h.api.requests == [] and h.statuses() == ["REJECTED"]
    assert h.all("reject")[0]["field"] == field


def test_publish_failure_is_retried_without_loss_or_duplicate(h: H) -> None:
    """The report thread keeps the record dirty and retries (brokers.gateway), as for CTP."""
    h.place(order())
    xt_id = next(iter(fx.COUNTER.orders))
    h.pub.fail = 2
    h.api.fill(xt_id, 300, 10.5)
    assert wait_for(lambda: [t["volume"] for t in h.all("trade")] == [300] and h.statuses()[-1] == "ALLTRADED", 10)
    h.settle()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "ALLTRADED"]
    ids = h.cmd.ids() + h.pub.ids()
    assert len(ids) == len(set(ids))
    assert h.ex.counts["publish_retries"] >= 1 and h.store.docs["q1"]["outbox"] == []


def test_star_and_bse_lots_and_market(h: H) -> None:
    h.place(order("a", symbol="688001", volume=201))
    h.place(order("b", exchange="BSE", symbol="430047", volume=101))
    h.place(order("c", exchange="SZSE", symbol="000001", pt="MARKET", price=None))
    assert [(r["stock_code"], r["order_volume"], r["price_type"]) for r in h.api.requests] == [
        ("688001.SH", 201, 11), ("430047.BJ", 101, 11), ("000001.SZ", 300, 47)]


def test_sell_t_plus_1(h: H) -> None:
    fx.COUNTER.positions["600000.SH"] = fx.XtPosition(stock_code="600000.SH", volume=500, can_use_volume=200)
    h.ex.stop()
    hh = H(h.store)          # positions are read when the session is (re)built
    try:
        hh.place(order("s1", direction="SELL", offset="CLOSE", volume=300))
        assert hh.statuses("s1") == ["REJECTED"] and "only 200 sellable" in hh.all("reject")[0]["reason"]
        hh.place(order("s2", direction="SELL", offset="CLOSE", volume=200))
        assert hh.api.requests[0]["order_type"] == 24
        hh.place(order("s3", direction="SELL", offset="CLOSE", volume=100))     # s2 holds the 200
        assert hh.statuses("s3") == ["REJECTED"]
    finally:
        hh.ex.stop()


def test_junk_and_order_error(h: H) -> None:
    h.place(order())
    xt_id = next(iter(fx.COUNTER.orders))
    h.api.set_status(xt_id, 57, "价格超出涨跌停")
    h.settle()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "REJECTED"]
    assert h.all("order")[-1]["reason"] == "价格超出涨跌停"
    h.api.hold = True
    h.place(order("q2"))
    h.api.order_error(-1, 1001, "资金不足", "q2")
    h.settle()
    assert h.statuses("q2") == ["SUBMITTING", "REJECTED"] and "资金不足" in h.all("order")[-1]["reason"]


def test_cancel_and_cancel_error(h: H) -> None:
    h.place(order())
    xt_id = next(iter(fx.COUNTER.orders))
    h.api.fill(xt_id, 100, 10.5)
    h.settle()
    h.ex.on_cancel(Cancel(order_id="q1", account="A"), h.cmd)
    assert h.api.cancels == [xt_id]
    h.api.cancel_error(xt_id, "撤单失败")
    h.api.set_status(xt_id, 53)
    h.settle()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "PARTTRADED", "CANCELLED"]
    assert h.all("order")[-1]["traded"] == 100
    assert any("撤单失败" in r["reason"] for r in h.all("reject"))


def test_disconnect_rejects_then_reconnect_rebuilds(h: H) -> None:
    h.ex.stop()
    fx.reset()
    hh = H(delays=(0.05, 0.1, 0.2, 0.3))
    try:
        hh.place(order())
        xt_id = next(iter(fx.COUNTER.orders))
        first = hh.api
        fx.COUNTER.connect_rc = -1                      # MiniQMT not back yet: connect() fails
        first.disconnect()
        hh.settle()
        assert wait_for(lambda: not hh.ex.ready.is_set())
        hh.place(order("q2"))
        assert hh.statuses("q2") == ["REJECTED"]
        first.fill(xt_id, 300, 10.5, push=False)        # filled while we were away
        assert wait_for(lambda: hh.ex.counts["reconnect_attempts"] >= 2, 5)
        fx.COUNTER.connect_rc = 0
        assert wait_for(hh.ex.ready.is_set, 5)          # a new session (supervisor), rebuilt from the queries
        hh.settle()
        assert hh.ex.trader is not first and hh.ex.trader.session_id != first.session_id
        assert [t["trade_id"] for t in hh.all("trade")] == ["q1-T5001"]
        assert hh.statuses() == ["SUBMITTING", "NOTTRADED", "ALLTRADED"]
    finally:
        hh.ex.stop()


def test_rejected_while_disconnected(h: H) -> None:
    h.api.disconnect()
    assert wait_for(lambda: not h.ex.ready.is_set())
    h.place(order())
    assert h.statuses() == ["REJECTED"] and "disconnected" in h.all("reject")[0]["reason"]


def test_restart_rebuilds_and_links_by_remark() -> None:
    fx.reset()
    store = MemoryStore()
    a = H(store)
    a.api.hold = True                 # the async response never arrives: we crash first
    a.place(order("a-very-long-order-id-beyond-twenty-chars"))
    xt_id = next(iter(fx.COUNTER.orders))
    a.api.fill(xt_id, 300, 10.5, push=False)
    a.ex.stop()
    b = H(store)                      # queries on start: the order is found by its remark
    try:
        assert b.statuses("a-very-long-order-id-beyond-twenty-chars")[-1] == "ALLTRADED"
        assert len(b.all("trade")) == 1
        assert fx.COUNTER.orders[xt_id].order_remark == remark_for("a-very-long-order-id-beyond-twenty-chars")
        b.place(order("a-very-long-order-id-beyond-twenty-chars"))        # redelivered: not sent again
        assert b.api.requests == []
    finally:
        b.ex.stop()


def test_xtquant_import_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xtquant", None)
    with pytest.raises(c.XtquantMissing, match="not on PyPI"):
        c.load_xtquant()
    import brokers.qmt.executor  # noqa: F401 - importable without xtquant
