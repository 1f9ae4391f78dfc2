"""The paper executor's batch core (handlers.broker.SimService) on nx-27017, with a recording
publisher: one write per batch, lazy outbox clear, redelivery and crash (restart from the store)."""
from __future__ import annotations

from typing import Any

import pytest

from handlers.broker import SimService
from qamarket.models import Tick
from qaorder.models import Cancel, Direction, Offset, Order, PriceType
from qapubsub.errors import PublishError, Unroutable
from qapubsub.topology import Topology

pytestmark = pytest.mark.integration


class Pub:
    """StreamPublisher's surface: publish(), gather() -> returned ids."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []   # (routing key, message id)
        self.pending: list[tuple[str, str]] = []
        self.gathers = 0
        self.return_ids: set[str] = set()
        self.fail = False

    def publish(self, _exchange: str, key: str, _body: bytes, *, properties: dict[str, Any]) -> None:
        self.pending.append((key, properties["message_id"]))

    def gather(self) -> set[str]:
        self.gathers += 1
        if self.fail:
            self.pending.clear()
            raise PublishError("connection lost")
        self.sent += self.pending
        ids = {m for _k, m in self.pending} & self.return_ids
        self.pending = []
        return ids


def order(oid: str, price: float = 3900.0, volume: int = 2) -> Order:
    return Order(order_id=oid, account="A", symbol="rb2512", exchange="SHFE", direction=Direction.BUY,
                 offset=Offset.OPEN, price_type=PriceType.LIMIT, price=price, volume=volume)


def tick(ask: float = 3899.0, av: float = 100.0) -> Tick:
    return Tick(exchange="SHFE", symbol="rb2512", datetime=1_760_000_000_000, last_price=ask, bid_price_1=ask - 1, bid_volume_1=av,
                ask_price_1=ask, ask_volume_1=av, limit_up=4200.0, limit_down=3600.0)


class CountingDb:
    """The database, counting bulk writes on sim_orders."""

    def __init__(self, db: Any) -> None:
        self.db, self.writes = db, 0
        outer = self

        class Coll:
            def __init__(self, c: Any) -> None:
                self.c = c

            def bulk_write(self, *a: Any, **kw: Any) -> Any:
                outer.writes += 1
                return self.c.bulk_write(*a, **kw)

            def __getattr__(self, n: str) -> Any:
                return getattr(self.c, n)

        self.coll = Coll(db["sim_orders"])

    def __getitem__(self, name: str) -> Any:
        return self.coll if name == "sim_orders" else self.db[name]


def outboxes(db: Any) -> dict[str, int]:
    return {d["_id"]: len(d["outbox"]) for d in db.sim_orders.find({})}


def test_batch_is_one_write_one_gather_and_the_clear_is_lazy(mongo_db: Any) -> None:
    cdb = CountingDb(mongo_db)
    svc = SimService(cdb, ["A"], Topology("t."))
    pub = Pub()
    svc.on_commands([order(f"o{i}") for i in range(20)], pub)
    assert cdb.writes == 1 and pub.gathers == 1
    assert [m for _k, m in pub.sent] == [f"o{i}.r1" for i in range(20)]
    # stored before the publish, not yet emptied: a restart would re-publish (same ids)
    assert set(outboxes(mongo_db).values()) == {1}
    # the next batch's single write empties them
    svc.on_commands([order("p1")], pub)
    assert cdb.writes == 2
    ob = outboxes(mongo_db)
    assert ob.pop("p1") == 1 and set(ob.values()) == {0}
    # the timer empties the rest
    svc.clear_delay = 0.0
    svc.idle()
    assert set(outboxes(mongo_db).values()) == {0} and cdb.writes == 3
    svc.idle()
    assert cdb.writes == 3   # nothing left to clear: no write


def test_ticks_fill_in_one_batch_and_trade_ids_survive_a_restart(mongo_db: Any) -> None:
    topo = Topology("t.")
    svc = SimService(mongo_db, ["A"], topo)
    pub = Pub()
    svc.on_commands([order("o1"), order("o2"), order("o3", price=3700.0)], pub)
    n0 = len(pub.sent)
    svc.on_ticks([tick(av=3), tick(av=100)], pub)   # o1 fills 2 (all), o2 1, then 1 on the 2nd quote
    new = [m for _k, m in pub.sent[n0:]]
    assert "o1-1" in new and "o2-1" in new and "o2-2" in new and not any(m.startswith("o3-") for m in new)
    assert pub.gathers == 2
    # kill -9 now (outboxes written, not emptied): a new service re-publishes the same ids only
    svc2 = SimService(mongo_db, ["A"], topo)
    pub2 = Pub()
    n = svc2.publish_all_pending(pub2)
    again = [m for _k, m in pub2.sent]
    assert n == len(new) and sorted(again) == sorted(new)
    for oid in ("o1", "o2"):   # per order, in the order they were made
        assert [m for m in again if m.startswith(oid)] == [m for m in new if m.startswith(oid)]
    assert set(outboxes(mongo_db).values()) == {0}
    # the restored book does not fill again
    svc2.on_ticks([tick(av=100)], pub2)
    assert [m for _k, m in pub2.sent[n:]] == []
    assert mongo_db.sim_orders.find_one({"_id": "o1"})["fills"] == 1


def test_redelivered_batch_places_nothing_twice(mongo_db: Any) -> None:
    svc = SimService(mongo_db, ["A"], Topology("t."))
    pub = Pub()
    pub.fail = True
    batch = [order("o1"), order("o2"),
             Cancel(order_id="o1", account="A", id="c1"), Cancel(order_id="zz", account="A", id="c2")]
    with pytest.raises(PublishError):
        svc.on_commands(batch, pub)
    stored = outboxes(mongo_db)
    assert stored == {"o1": 2, "o2": 1}   # persisted before publishing
    pub.fail = False
    svc.on_commands(batch, pub)           # the redelivery: nothing placed or cancelled again
    ids = [m for _k, m in pub.sent]
    assert ids == ["o1.r1", "o1.r2", "o2.r1", "c2.reject"]   # the unknown order's Reject is made again
    assert mongo_db.sim_orders.find_one({"_id": "o1"})["reports"] == 2
    assert mongo_db.sim_orders.find_one({"_id": "o1"})["cancel_ids"] == ["c1"]


def test_returned_report_is_an_error_returned_reject_is_not(mongo_db: Any) -> None:
    svc = SimService(mongo_db, ["A"], Topology("t."))
    pub = Pub()
    pub.return_ids = {"c9.reject"}
    svc.on_commands([Cancel(order_id="nope", account="A", id="c9")], pub)
    assert [m for _k, m in pub.sent] == ["c9.reject"]
    pub.return_ids = {"o1.r1"}
    with pytest.raises(Unroutable):
        svc.on_commands([order("o1")], pub)
    assert outboxes(mongo_db) == {"o1": 1}
    pub.return_ids = set()
    svc.on_commands([order("o2")], pub)   # the unconfirmed o1.r1 goes out again first
    assert [m for _k, m in pub.sent][-2:] == ["o1.r1", "o2.r1"]
