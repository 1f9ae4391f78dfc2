"""The CTP executor driven at the vn.py boundary: REAL EventEngine, REAL OrderData/TradeData,
a recording BaseGateway subclass (gateway.py). No RabbitMQ: reports go to a list publisher."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vnpy.trader.object", reason="vn.py not installed (see docs/brokers.md)")

from brokers.ctp.settings import CtpSettings, SettingsError  # noqa: E402
from brokers.ctp.td import CtpExecutor, load_settings  # noqa: E402
from brokers.ctp.td_store import SENDING, MemoryStore  # noqa: E402
from qaorder.models import Cancel, Direction, Offset, Order, PriceType  # noqa: E402

from .gateway import ENV, Exchange, ListPublisher, OrderType, SimCtpGateway, Status, wait_for  # noqa: E402
from .gateway import Direction as VD  # noqa: E402
from .gateway import Offset as VO  # noqa: E402


def order(oid: str = "o1", *, volume: int = 3, offset: str = "OPEN", direction: str = "BUY", exchange: str = "SHFE",
          symbol: str = "rb2512", pt: str = "LIMIT", price: float | None = 3900.0, account: str = "A") -> Order:
    return Order(order_id=oid, account=account, symbol=symbol, exchange=exchange, direction=Direction(direction),
                 offset=Offset(offset), price_type=PriceType(pt), price=price, volume=volume)


class Harness:
    def __init__(self, store: MemoryStore | None = None, delays: tuple[float, ...] = (5, 10, 30, 60),
                 online: bool = True) -> None:
        self.store = store or MemoryStore()
        self.pub = ListPublisher()       # report thread
        self.cmd = ListPublisher()       # exec thread
        settings = CtpSettings.from_env(ENV)
        self.ex = CtpExecutor(settings, "A", self.store, gateway_class=SimCtpGateway, reconnect_delays=delays)
        self.ex.start(lambda: self.pub)
        self.gw: SimCtpGateway = self.ex.gateway

    def drain(self) -> None:
        assert self.ex.drain(5)

    def place(self, o: Order) -> list[str]:
        self.ex.on_order(o, self.cmd)
        self.drain()
        return [leg.vt_orderid for leg in self.ex.records[o.order_id].legs]

    def all(self, kind: str | None = None) -> list[dict[str, Any]]:
        return self.cmd.bodies(kind) + self.pub.bodies(kind)

    def statuses(self, oid: str = "o1") -> list[str]:
        return [b["status"] for b in self.all("order") if b["order_id"] == oid]

    def trades(self) -> list[dict[str, Any]]:
        return self.all("trade")


@pytest.fixture
def h() -> Iterator[Harness]:
    hh = Harness()
    assert wait_for(hh.ex.ready.is_set)
    yield hh
    hh.ex.stop()


def test_fill_in_two_parts_reports_each_step_once(h: Harness) -> None:
    vt = h.place(order())[0]
    req = h.gw.requests[0]
    assert (req.symbol, req.exchange, req.direction, req.type, req.offset, req.price, req.volume) == \
        ("rb2512", Exchange.SHFE, VD.LONG, OrderType.LIMIT, VO.OPEN, 3900.0, 3.0)
    assert vt == "CTP.1_1002_1"
    h.gw.update(vt, Status.NOTTRADED)
    h.gw.update(vt, Status.PARTTRADED, 1)
    h.gw.fill(vt, 1, 3899.0, "       101")
    h.gw.update(vt, Status.ALLTRADED, 3)
    h.gw.fill(vt, 2, 3898.0, "       102")
    h.drain()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "PARTTRADED", "ALLTRADED"]
    trades = h.trades()
    assert [(t["trade_id"], t["volume"], t["price"], t["direction"], t["offset"]) for t in trades] == [
        ("o1-SHFE-101", 1, 3899.0, "BUY", "OPEN"), ("o1-SHFE-102", 2, 3898.0, "BUY", "OPEN")]
    assert trades[0]["trade_time"] == 1741007100 * 10**9      # 2025-03-03 21:05 Shanghai in UTC ns
    ids = h.cmd.ids() + h.pub.ids()
    assert len(ids) == len(set(ids))
    final = h.all("order")[-1]
    # the ALLTRADED status came before the second trade: its avg_price is that of the fills known then
    assert (final["traded"], final["exchange_order_id"], final["avg_price"]) == (3, "CTP.1_1002_1", 3899.0)
    # the id map is persisted: vt_orderid, front id, session id, order ref
    leg = h.store.docs["o1"]["legs"][0]
    assert (leg["vt_orderid"], leg["front_id"], leg["session_id"], leg["order_ref"]) == ("CTP.1_1002_1", 1, 1002, "1")


def test_duplicate_and_out_of_order_events_are_applied_once(h: Harness) -> None:
    vt = h.place(order())[0]
    h.gw.update(vt, Status.ALLTRADED, 3)             # status before the trades
    t1 = h.gw.fill(vt, 1, 3899.0, "11")
    h.gw.update(vt, Status.NOTTRADED, 0)             # late ack
    h.gw.on_trade(t1)                                # duplicate trade
    h.gw.fill(vt, 2, 3899.0, "12")
    h.gw.update(vt, Status.ALLTRADED, 3)             # duplicate status
    h.drain()
    assert h.statuses() == ["SUBMITTING", "ALLTRADED"]
    assert [t["trade_id"] for t in h.trades()] == ["o1-SHFE-11", "o1-SHFE-12"]
    assert h.ex.counts["duplicates"] == 1


def test_fill_before_ack(h: Harness) -> None:
    vt = h.place(order(volume=2))[0]
    h.gw.fill(vt, 1, 3899.0, "21")
    h.gw.update(vt, Status.NOTTRADED, 0)
    h.gw.update(vt, Status.PARTTRADED, 1)
    h.drain()
    assert h.statuses() == ["SUBMITTING", "PARTTRADED"]
    assert len(h.trades()) == 1


def test_ctp_reject(h: Harness) -> None:
    vt = h.place(order())[0]
    h.gw.update(vt, Status.REJECTED)
    h.gw.update(vt, Status.REJECTED)
    h.drain()
    assert h.statuses() == ["SUBMITTING", "REJECTED"]


def test_send_order_refused_is_rejected(h: Harness) -> None:
    h.gw.refuse_send = True
    h.place(order())
    assert h.statuses() == ["REJECTED"]
    assert h.all("reject")[0]["order_id"] == "o1"


def test_cancel_sends_cancel_request_and_reports_cancelled(h: Harness) -> None:
    vt = h.place(order())[0]
    h.gw.update(vt, Status.NOTTRADED)
    h.gw.update(vt, Status.PARTTRADED, 1)
    h.gw.fill(vt, 1, 3899.0, "31")
    h.drain()
    h.ex.on_cancel(Cancel(order_id="o1", account="A"), h.cmd)
    assert [(c.orderid, c.symbol, c.exchange) for c in h.gw.cancels] == [("1_1002_1", "rb2512", Exchange.SHFE)]
    h.gw.update(vt, Status.CANCELLED, 1)
    h.drain()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "PARTTRADED", "CANCELLED"]
    assert h.all("order")[-1]["traded"] == 1
    # cancel again: already cancelled; unknown order: rejected
    h.ex.on_cancel(Cancel(order_id="o1", account="A"), h.cmd)
    h.ex.on_cancel(Cancel(order_id="nope", account="A"), h.cmd)
    assert [r["reason"] for r in h.all("reject")] == ["order o1 is already CANCELLED", "unknown order nope"]
    assert len(h.gw.cancels) == 1


def test_redelivered_order_is_not_sent_twice(h: Harness) -> None:
    h.place(order())
    h.place(order())
    assert len(h.gw.requests) == 1
    assert h.statuses() == ["SUBMITTING"]


def test_disconnected_rejects_then_reconnect_reconciles_missed_fills(h: Harness) -> None:
    vt = h.place(order())[0]
    h.gw.update(vt, Status.NOTTRADED)
    h.drain()
    h.gw.disconnect()
    h.drain()
    assert not h.ex.ready.is_set()
    h.place(order("o2"))
    assert len(h.gw.requests) == 1                       # nothing sent while disconnected
    assert h.statuses("o2") == ["REJECTED"]
    rej = [r for r in h.all("reject") if r["order_id"] == "o2"]
    assert "disconnected" in rej[0]["reason"]
    # while we were away: o1 filled (the counter knows, we did not hear)
    h.gw.fill(vt, 3, 3899.0, "41", push=False)
    h.gw.update(vt, Status.ALLTRADED, 3, push=False)
    h.gw.login()                                         # replays every order and trade of the day
    h.drain()
    assert h.ex.ready.is_set()
    assert [t["trade_id"] for t in h.trades()] == ["o1-SHFE-41"]
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "ALLTRADED"]
    h.gw.disconnect()
    h.gw.login()                                         # a second replay changes nothing
    h.drain()
    assert len(h.trades()) == 1 and h.statuses() == ["SUBMITTING", "NOTTRADED", "ALLTRADED"]
    assert h.ex.counts["reconciles"] >= 2
    # and orders are accepted again
    h.place(order("o3"))
    assert len(h.gw.requests) == 2


def test_restart_finds_orders_through_the_persistent_id_map() -> None:
    store = MemoryStore()
    a = Harness(store)
    assert wait_for(a.ex.ready.is_set)
    vt = a.place(order())[0]
    a.gw.update(vt, Status.NOTTRADED)
    a.gw.fill(vt, 1, 3899.0, "51")
    a.drain()
    orders_at_counter = dict(a.gw.orders)
    trades_at_counter = list(a.gw.trades)
    a.ex.stop()

    b = Harness(store)                                   # a new process: new engine, new gateway
    b.gw.orders.update(orders_at_counter)
    b.gw.trades.extend(trades_at_counter)
    b.gw.fill(vt, 2, 3898.0, "52", push=False)           # filled while we were down
    b.gw.update(vt, Status.ALLTRADED, 3, push=False)
    b.gw.disconnect()
    b.gw.login()                                         # replay
    b.drain()
    assert [t["trade_id"] for t in b.trades()] == ["o1-SHFE-52"]   # 51 was reported before the restart
    assert b.statuses() == ["ALLTRADED"]
    b.place(order())                                     # redelivered after the restart: not sent again
    assert b.gw.requests == []
    b.ex.stop()


def test_crash_between_send_and_sent_record_links_the_orphan() -> None:
    store = MemoryStore()
    a = Harness(store)
    assert wait_for(a.ex.ready.is_set)
    # simulate the crash: the SENDING record is written, send_order happened, the SENT write did not
    a.place(order())
    doc = store.docs["o1"]
    doc["sent"] = SENDING
    for leg in doc["legs"]:
        leg.update(vt_orderid="", orderid="", front_id=None, session_id=None, order_ref="")
    at_counter = dict(a.gw.orders)
    a.ex.stop()
    b = Harness(store)
    assert [r.order_id for r in b.ex.orphans()] == ["o1"]
    b.gw.orders.update(at_counter)
    vt = next(iter(at_counter))
    b.gw.fill(vt, 3, 3899.0, "61", push=False)
    b.gw.update(vt, Status.ALLTRADED, 3, push=False)
    b.gw.disconnect()
    b.gw.login()
    b.drain()
    assert b.ex.orphans() == [] and b.ex.counts["orphans_linked"] == 1
    assert [t["trade_id"] for t in b.trades()] == ["o1-SHFE-61"]
    assert b.statuses()[-1] == "ALLTRADED"
    b.ex.stop()


def test_shfe_close_split_yesterday_first(h: Harness) -> None:
    h.gw.position("rb2512", Exchange.SHFE, VD.LONG, 5, 3)
    h.drain()
    vts = h.place(order(volume=4, offset="CLOSE", direction="SELL"))
    assert [(r.offset, r.volume, r.direction) for r in h.gw.requests] == [
        (VO.CLOSEYESTERDAY, 3.0, VD.SHORT), (VO.CLOSETODAY, 1.0, VD.SHORT)]
    # what is left: 1 today; our working legs hold the rest
    h.place(order("o2", volume=2, offset="CLOSE", direction="SELL"))
    assert h.statuses("o2") == ["REJECTED"] and "only 0 yesterday + 1 today" in h.all("reject")[-1]["reason"]
    for i, vt in enumerate(vts):
        h.gw.update(vt, Status.NOTTRADED)
        h.gw.fill(vt, 3 if i == 0 else 1, 3901.0, f"7{i}")
        h.gw.update(vt, Status.ALLTRADED, 3 if i == 0 else 1)
    h.drain()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "PARTTRADED", "ALLTRADED"]
    assert [t["offset"] for t in h.trades()] == ["CLOSEYESTERDAY", "CLOSETODAY"]


def test_shfe_close_without_position_snapshot_is_rejected(h: Harness) -> None:
    h.place(order(offset="CLOSE", direction="SELL"))
    assert h.gw.requests == [] and h.statuses() == ["REJECTED"]
    assert "no LONG position" in h.all("reject")[0]["reason"]
    h.place(order("o2", offset="CLOSE", direction="SELL", exchange="DCE", symbol="i2601"))   # DCE: no split
    assert h.gw.requests[0].offset == VO.CLOSE


@pytest.mark.parametrize("exchange,price,expected", [
    ("SHFE", None, None), ("CFFEX", None, None), ("DCE", None, (OrderType.MARKET, 0.0)),
    ("SHFE", 3950.0, (OrderType.FAK, 3950.0)), ("CZCE", None, (OrderType.MARKET, 0.0))])
def test_market_orders(h: Harness, exchange: str, price: float | None, expected: Any) -> None:
    h.place(order(pt="MARKET", price=price, exchange=exchange))
    if expected is None:
        assert h.gw.requests == [] and h.statuses() == ["REJECTED"]
        assert "does not accept market orders" in h.all("reject")[0]["reason"]
    else:
        assert (h.gw.requests[0].type, h.gw.requests[0].price) == expected


def test_fak_fok_and_unsupported_exchange(h: Harness) -> None:
    h.place(order("a", pt="FAK"))
    h.place(order("b", pt="FOK"))
    assert [r.type for r in h.gw.requests] == [OrderType.FAK, OrderType.FOK]
    h.place(order("c", exchange="SSE", symbol="600000"))
    assert h.statuses("c") == ["REJECTED"] and len(h.gw.requests) == 2


def test_a_raising_handler_does_not_stop_the_executor(h: Harness) -> None:
    from vnpy.event import Event
    from vnpy.trader.event import EVENT_ORDER

    h.ex.event_engine.register(EVENT_ORDER, lambda e: 1 / 0)       # somebody else's broken handler
    h.ex.event_engine.put(Event(EVENT_ORDER, object()))             # an object we cannot map
    vt = h.place(order())[0]
    h.gw.update(vt, Status.NOTTRADED)
    h.drain()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED"]
    assert h.ex.counts["handler_errors"] >= 2


def test_publish_failure_is_retried_without_loss_or_duplicate(h: Harness) -> None:
    vt = h.place(order())[0]
    h.pub.fail = 2
    h.gw.update(vt, Status.NOTTRADED)
    h.gw.fill(vt, 3, 3899.0, "81")
    assert wait_for(lambda: len(h.trades()) == 1 and h.statuses()[-1] == "ALLTRADED", 10)
    h.drain()
    assert h.statuses() == ["SUBMITTING", "NOTTRADED", "ALLTRADED"]
    assert h.ex.counts["publish_retries"] >= 1
    assert h.store.docs["o1"]["outbox"] == []


def test_reconnect_backoff_schedule() -> None:
    class Offline(SimCtpGateway):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            self.online = False

    store = MemoryStore()
    settings = CtpSettings.from_env(ENV)
    ex = CtpExecutor(settings, "A", store, gateway_class=Offline, reconnect_delays=(0.1, 0.2, 0.4, 0.5))
    pub = ListPublisher()
    ex.start(lambda: pub)
    try:
        gw = ex.gateway
        assert wait_for(lambda: len(gw.connects) >= 5, 5)
        t = gw.connect_times
        gaps = [b - a for a, b in zip(t, t[1:])]
        # each gap is at least its scheduled delay, and not much more (the supervisor ticks every 25 ms)
        for gap, want in zip(gaps, (0.1, 0.2, 0.4, 0.5)):
            assert want - 0.01 <= gap <= want + 0.15
        ex.on_order(order(), pub)
        assert [b["status"] for b in pub.bodies("order")] == ["REJECTED"]
        gw.login()
        assert wait_for(ex.ready.is_set)
        n = len(gw.connects)
        import time
        time.sleep(0.4)
        assert len(gw.connects) == n          # logged in: no more attempts
    finally:
        ex.stop()


def test_password_never_logged_nor_stored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hh = Harness()
    try:
        assert wait_for(hh.ex.ready.is_set)
        hh.place(order())
        assert hh.gw.connects[0]["密码"] == "s3cret-pw"       # it does reach vn.py
    finally:
        hh.ex.stop()
    assert "s3cret-pw" not in caplog.text and "authc0de" not in caplog.text
    assert "s3cret-pw" not in repr(hh.store.docs) and "s3cret-pw" not in repr(hh.ex.settings)


def test_settings_file_and_env(tmp_path: Any) -> None:
    f = tmp_path / "ctp.toml"
    f.write_text('[ctp]\nuserid = "u9"\nbroker_id = "4040"\ntd_front = "tcp://10.0.0.1:41205"\n'
                 'md_front = "tcp://10.0.0.1:41213"\nenvironment = "test"\n')
    s = load_settings(str(f), {"QA_CTP_PASSWORD": "pw-from-env"})
    assert (s.userid, s.broker_id, s.td_front, s.environment, s.password) == (
        "u9", "4040", "tcp://10.0.0.1:41205", "test", "pw-from-env")
    f.write_text('[ctp]\nuserid = "u9"\npassword = "nope"\n')
    with pytest.raises(SettingsError, match="QA_CTP_PASSWORD") as ei:
        load_settings(str(f), {"QA_CTP_PASSWORD": "pw"})
    assert "nope" not in str(ei.value)
    with pytest.raises(SettingsError, match="PASSWORD"):
        load_settings(None, {k: v for k, v in ENV.items() if k != "QA_CTP_PASSWORD"})
