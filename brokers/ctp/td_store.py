"""The CTP executor's persistent order records: our order id <-> vn.py ``vt_orderid`` / CTP
``FrontID``/``SessionID``/``OrderRef``, the order's state and the reports not yet confirmed.

One document per order (collection ``ctp_orders``, ``_id`` = our order id)::

    {_id, account, gateway, order: {...}, sent: "SENDING" | "SENT" | "LOCAL",
     legs: [{offset, volume, type, price, vt_orderid, orderid, front_id, session_id, order_ref,
             status, traded}],
     status, reported_traded, reported_avg_price, reason, fills: [{trade}...], reports: n,
     outbox: [{kind, id, type, body}], cancel_ids: [...], updated: ns}

``sent`` is written as ``SENDING`` *before* ``gateway.send_order`` is called and as ``SENT``
with the vt_orderids right after it returns, before the exec message is acked. A record
left ``SENDING`` by a crash is never sent again (see docs/brokers.md).
"""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qaorder.models import Order, OrderStatus, Trade
from qaorder.state import OrderState

SENDING, SENT, LOCAL = "SENDING", "SENT", "LOCAL"


@dataclass
class Leg:
    offset: str
    volume: int
    type: str
    price: float
    vt_orderid: str = ""
    orderid: str = ""
    front_id: int | None = None
    session_id: int | None = None
    order_ref: str = ""
    status: OrderStatus = OrderStatus.SUBMITTING
    traded: int = 0        # max(cumulative traded vn.py reported, volume of our distinct fills)
    filled: int = 0        # volume of our distinct fills of this leg

    @property
    def left(self) -> int:
        return 0 if self.status.is_terminal else self.volume - self.traded

    def to_doc(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Leg:
        d = dict(d)
        d["status"] = OrderStatus(d["status"])
        return cls(**d)


@dataclass
class OrderRecord:
    state: OrderState
    account: str
    legs: list[Leg] = field(default_factory=list)
    sent: str = SENDING
    reports: int = 0
    outbox: list[dict[str, str]] = field(default_factory=list)
    cancel_ids: list[str] = field(default_factory=list)

    @property
    def order(self) -> Order:
        return self.state.order

    @property
    def order_id(self) -> str:
        return self.state.order_id

    def to_doc(self) -> dict[str, Any]:
        st = self.state
        return {"_id": st.order_id, "account": self.account, "order": msgspec.to_builtins(st.order),
                "sent": self.sent, "legs": [leg.to_doc() for leg in self.legs], "status": st.status.value,
                "reported_traded": st.reported_traded, "reported_avg_price": st.reported_avg_price,
                "reason": st.reason, "fills": [msgspec.to_builtins(t) for t in st.fills.values()],
                "reports": self.reports, "outbox": list(self.outbox), "cancel_ids": list(self.cancel_ids),
                "updated": time.time_ns()}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> OrderRecord:
        order = msgspec.convert(d["order"], Order)
        fills = [msgspec.convert(t, Trade) for t in d.get("fills", [])]
        st = OrderState(order, status=OrderStatus(d["status"]), fills={t.trade_id: t for t in fills},
                        reported_traded=int(d.get("reported_traded", 0)),
                        reported_avg_price=float(d.get("reported_avg_price", 0.0)), reason=str(d.get("reason", "")))
        return cls(state=st, account=d["account"], legs=[Leg.from_doc(x) for x in d.get("legs", [])],
                   sent=d.get("sent", SENDING), reports=int(d.get("reports", 0)), outbox=list(d.get("outbox", [])),
                   cancel_ids=list(d.get("cancel_ids", [])))


class MemoryStore:
    """In-process store (unit tests; survives an executor 'restart' when the same object is reused)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.saves = 0
        self.lock = threading.Lock()

    def load(self, account: str) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(d) for d in self.docs.values() if d["account"] == account]

    def save(self, doc: dict[str, Any]) -> None:
        with self.lock:
            self.docs[doc["_id"]] = copy.deepcopy(doc)
            self.saves += 1

    def clear_outbox(self, order_ids: Iterable[str]) -> None:
        with self.lock:
            for oid in order_ids:
                if oid in self.docs:
                    self.docs[oid]["outbox"] = []


class MongoStore:
    """The records in MongoDB (``pymongo`` Database), collection ``ctp_orders`` by default."""

    def __init__(self, db: Any, collection: str = "ctp_orders") -> None:
        self.coll = db[collection]
        try:
            self.coll.create_index("account")
            self.coll.create_index("legs.vt_orderid")
        except Exception:  # noqa: BLE001 - indexes are an optimisation
            pass

    def load(self, account: str) -> list[dict[str, Any]]:
        return list(self.coll.find({"account": account}))

    def save(self, doc: dict[str, Any]) -> None:
        self.coll.replace_one({"_id": doc["_id"]}, doc, upsert=True)

    def clear_outbox(self, order_ids: Iterable[str]) -> None:
        ids = list(order_ids)
        if ids:
            self.coll.update_many({"_id": {"$in": ids}}, {"$set": {"outbox": []}})
