"""``qaflow strategy`` as a real subprocess, with the barhandler, the real broker and MongoDB-wire server."""
from __future__ import annotations

from pathlib import Path

import pika
import pytest

from qamarket.models import Bar
from qamarket.rpc import IndicatorBar
from qamarket.sessions import ms_of
from qamarket.store import BarStore
from qaorder.models import Cancel, Order
from qapubsub import keys
from qapubsub.messages import decode, encode
from qapubsub.topology import Topology
from tests import daemons
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
M = 60_000
T0 = ms_of(2025, 3, 4, 9, 0)
STRAT = "qamarket.strategies.ma_cross:MaCross"


def _bar(i: int, close: float) -> Bar:
    return Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=T0 + i * M, trading_day="20250304",  # type: ignore[arg-type]
               open=close, high=close + 1, low=close - 1, close=close, volume=10.0, tick_count=5)


def _publish_bar(ch, topo: Topology, b: Bar) -> None:  # type: ignore[no-untyped-def]
    # exactly as the tickhandler does: qa.bar, message id bar.<freq>.<EX>.<symbol>.<label>
    ch.basic_publish(topo.bar, keys.bar_key(b.freq, b.exchange, b.symbol), encode(b),
                     pika.BasicProperties(message_id=f"bar.{b.freq}.{b.exchange}.{b.symbol}.{b.datetime}",
                                          content_type="application/json", type="qa.bar"))


def _publish_ibar(ch, topo: Topology, b: Bar) -> None:  # type: ignore[no-untyped-def]
    # a re-published merged bar (same message id as the barhandler's)
    ch.basic_publish(topo.ibar, keys.bar_key(b.freq, b.exchange, b.symbol), encode(IndicatorBar(bar=b)),
                     pika.BasicProperties(message_id=f"ibar.{b.freq}.{b.exchange}.{b.symbol}.{b.datetime}",
                                          content_type="application/json", type="qa.ibar"))


def _qifi(account: str, **vols: int) -> dict:
    pos = {f"volume_{k}": v for k, v in vols.items()}
    return {"_id": account, "account_cookie": account, "rev": 1, "trading_day": "20250304",
            "accounts": {"balance": 1e6, "available": 1e6},
            "positions": {"SHFE.rb2605": {"exchange_id": "SHFE", "instrument_id": "rb2605", **pos}} if pos else {},
            "orders": {}, "trades": {}}


class Orders:
    """What reaches qaorder, read from a test queue bound to it."""

    def __init__(self, ch, topo: Topology) -> None:  # type: ignore[no-untyped-def]
        self.ch = ch
        self.q = f"{topo.namespace}test.orders"
        ch.queue_declare(self.q, durable=False)
        ch.queue_bind(self.q, topo.order, routing_key=keys.ALL)
        self.got: list[tuple[str, str, Order | Cancel]] = []

    def drain(self) -> list[tuple[str, str, Order | Cancel]]:
        while True:
            m, props, body = self.ch.basic_get(self.q, auto_ack=True)
            if m is None:
                return self.got
            self.got.append((m.routing_key, props.message_id, decode(body, Order | Cancel)))

    def wait(self, n: int, what: str) -> list[tuple[str, str, Order | Cancel]]:
        return wait_for(lambda: self.drain() if len(self.drain()) >= n else None, timeout=20, what=what)


@pytest.fixture
def env(amqp_url: str, mongo_url: str, topology: Topology, mongo_db) -> dict[str, str]:
    return {"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_NAMESPACE": topology.namespace,
            "QA_MONGO_DB": mongo_db.name}


def _ready(log: Path, n: int = 1) -> bool:
    return log.exists() and log.read_text().count(" ready: ") >= n


def test_ma_cross_live_dedupe_sigterm_restart(topology, env, mongo_db, amqp_channel, tmp_path: Path) -> None:
    BarStore(mongo_db).write([_bar(i, 3500) for i in range(10)])   # history: flat
    mongo_db.accounts.insert_many([_qifi("a1"), _qifi("a2")])
    orders = Orders(amqp_channel, topology)
    bh_log, st_log = tmp_path / "barhandler.log", tmp_path / "strategy.log"
    args = (STRAT, "--accounts", "a1,a2", "--symbol", "SHFE.rb2605", "--freq", "1min", "--id", "ma1",
            "--param", "fast=2", "slow=3", "volume=2")
    with daemons.running("handlers.barhandler", env=env, log=bh_log) as bh:
        with daemons.running("handlers.strategy", *args, env=env, log=st_log) as st:
            wait_for(lambda: _ready(st_log) or st.poll() is not None, timeout=30, what="the strategy to start")
            assert st.poll() is None, st_log.read_text()[-3000:]
            assert "history 1min.SHFE.rb2605: 10 bars" in st_log.read_text()

            _publish_bar(amqp_channel, topology, _bar(10, 3510))      # golden cross -> target +2
            got = orders.wait(2, "the two BUY orders")
            assert len(got) == 2, got
            by_acc = {rk: (mid, o) for rk, mid, o in got}
            assert set(by_acc) == {"a1", "a2"}
            for acc, (mid, o) in by_acc.items():
                assert isinstance(o, Order) and o.account == acc and o.strategy_id == "ma1"
                assert (o.direction.value, o.offset.value, o.volume, o.price) == ("BUY", "OPEN", 2, 3510.0)
                assert o.order_id == mid == f"ma1-rb2605-1min-{T0 + 10 * M}-{acc}-1"

            _publish_bar(amqp_channel, topology, _bar(10, 3510))      # tickhandler re-publish: same id
            _publish_ibar(amqp_channel, topology, _bar(10, 3510))     # barhandler re-publish: same id
            _publish_bar(amqp_channel, topology, _bar(11, 3400))      # death cross -> cancel the working buys
            got = orders.wait(4, "the cancels of the working buys")
            assert len(got) == 4, got   # the duplicates sent nothing
            assert sorted((rk, o.order_id) for rk, _, o in got[2:] if isinstance(o, Cancel)) == \
                [("a1", f"ma1-rb2605-1min-{T0 + 10 * M}-a1-1"), ("a2", f"ma1-rb2605-1min-{T0 + 10 * M}-a2-1")]

            assert daemons.stop(st) == 0, st_log.read_text()[-3000:]
        assert "callback_errors" not in st_log.read_text()

        # restart: positions come from the account documents (a1 long 2 today, a2 short 1 yesterday)
        mongo_db.accounts.update_one({"_id": "a1"}, {"$set": _qifi("a1", long_today=2)})
        mongo_db.accounts.update_one({"_id": "a2"}, {"$set": _qifi("a2", short_his=1)})
        orders.got.clear()
        with daemons.running("handlers.strategy", *args, env=env, log=st_log) as st:
            wait_for(lambda: _ready(st_log, 2) or st.poll() is not None, timeout=30, what="the restart")
            assert st.poll() is None, st_log.read_text()[-3000:]
            assert "history 1min.SHFE.rb2605: 12 bars" in st_log.read_text()  # the live bars are history now
            _publish_bar(amqp_channel, topology, _bar(11, 3400))      # already in its history: skipped
            _publish_bar(amqp_channel, topology, _bar(12, 3700))      # golden cross -> target +2
            got = orders.wait(2, "the orders after the restart")
            assert [(rk, o.direction.value, o.offset.value, o.volume) for rk, _, o in got] == \
                [("a2", "BUY", "CLOSE", 1), ("a2", "BUY", "OPEN", 2)]  # a1 already holds +2
            assert all(o.strategy_id == "ma1" for _, _, o in got)
            assert daemons.stop(st) == 0, st_log.read_text()[-3000:]
        assert daemons.stop(bh) == 0, bh_log.read_text()[-3000:]


def _report(ch, topo: Topology, kind: str, msg) -> None:  # type: ignore[no-untyped-def]
    ch.basic_publish(topo.report, keys.report_key(msg.account, kind), encode(msg),
                     pika.BasicProperties(message_id=msg.id, content_type="application/json", type=msg.schema))


def test_group_binding_reports_move_pos(topology, env, mongo_db, amqp_channel, tmp_path: Path) -> None:
    from qaorder.models import OrderStatus, OrderStatusReport, Trade

    BarStore(mongo_db).write([_bar(i, 3500) for i in range(10)])
    mongo_db.groups.insert_one({"_id": "g1", "members": ["m1", "m2"]})
    orders = Orders(amqp_channel, topology)
    bh_log, st_log = tmp_path / "barhandler.log", tmp_path / "strategy.log"
    args = (STRAT, "--group", "g1", "--bars", "bar", "--id", "grp", "--param", "fast=2", "slow=3", "volume=1")
    with daemons.running("handlers.barhandler", env=env, log=bh_log) as bh:
        with daemons.running("handlers.strategy", *args, env=env, log=st_log) as st:
            wait_for(lambda: _ready(st_log) or st.poll() is not None, timeout=30, what="the strategy to start")
            assert st.poll() is None, st_log.read_text()[-3000:]
            _publish_bar(amqp_channel, topology, _bar(10, 3510))      # golden cross -> one order to the group
            [(rk, mid, o)] = orders.wait(1, "the group order")
            assert rk == "g1" and o.account == "g1" and o.volume == 1 and o.direction.value == "BUY"
            # the router's children filled on both members: trades and status on qa.report
            for m in ("m1", "m2"):
                cid = f"{o.order_id}/g/{m}"
                _report(amqp_channel, topology, "trade", Trade(
                    trade_id=f"t-{m}", order_id=cid, account=m, symbol="rb2605", exchange=o.exchange,
                    direction=o.direction, offset=o.offset, price=3510.0, volume=1, trade_time=0))
                _report(amqp_channel, topology, "order", OrderStatusReport(
                    order_id=cid, account=m, status=OrderStatus.ALLTRADED, traded=1))
            # the fills are applied before the next bar comes (reports and bars are separate queues:
            # published right after them, the bar could be handled first and see the order working)
            wait_for(lambda: f"order {o.order_id} done" in st_log.read_text(), timeout=20,
                     what="the strategy to apply the fills")
            _publish_bar(amqp_channel, topology, _bar(11, 3400))      # death cross: long 1 -> short 1
            got = orders.wait(3, "the reversal")
            assert [(rk, o.direction.value, o.offset.value, o.volume) for rk, _, o in got[1:]] == \
                [("g1", "SELL", "CLOSETODAY", 1), ("g1", "SELL", "OPEN", 1)]
            assert daemons.stop(st) == 0, st_log.read_text()[-3000:]
        text = st_log.read_text()
        assert "'trades': 2" in text and "callback_errors" not in text, text[-3000:]
        assert daemons.stop(bh) == 0


def test_bad_arguments_exit_2(env) -> None:
    import os
    import subprocess
    import sys

    from tests.daemons import ROOT

    for extra in (["--accounts", "a1", "--param", "nope=1"], ["--accounts", "a1", "--symbol", "XX.rb"],
                  ["--group", "no-such-group"]):
        r = subprocess.run([sys.executable, "-m", "handlers.strategy", STRAT, *extra], cwd=ROOT,
                           env={**os.environ, **env}, capture_output=True, timeout=60)
        assert r.returncode == 2, (extra, r.stderr[-2000:])
