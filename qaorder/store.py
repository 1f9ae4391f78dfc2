"""MongoDB storage of the order router: orders, child orders, audit, rules, groups, state.

Sync pymongo (the router is a pika process). One :class:`OrderStore` per database.

Collections and documents
-------------------------

``orders`` -- one document per *incoming* order (the idempotency record of orders)::

    {_id: <order_id>, order: {...native Order...}, dialect: "native"|"qatrader",
     routing_key: "acc1", exchange: "qaorder", state: "planned"|"routed"|"rejected",
     reason: "", received_ns: ..., routed_ns: ...,
     children: [{order_id, account, routing_key, message_id, body, confirmed: bool,
                 error: str|null}]}

  ``body`` is the exact JSON published to ``qa.exec``: a redelivered order re-publishes
  its unconfirmed children byte for byte, with the same ``message_id``.

``child_orders`` -- one per order sent to an executor (``_id`` = child order id)::

    {_id, parent_id, account, symbol, exchange, direction, offset, volume, price,
     source, status: "SUBMITTING"|...|"REJECTED", reason, updated_ns}

``processed`` -- idempotency records of the other commands (cancels by message id,
force-close and release by ``command_id``)::

    {_id: "cancel:<id>"|"forceclose:<command_id>"|"release:<command_id>",
     state: "planned"|"done"|"rejected", children: [...as above...], ...}

``audit`` -- one document per routing decision (``qaorder.models.AuditRecord`` fields
plus ``ts``): ``direct | group | follow | skip | reject | cancel | forceclose | release |
refused | duplicate``.

``follower_rules`` -- ``{_id: rule_id, ...FollowerRule fields...}``.

``groups`` -- ``{_id: group_name, members: ["acc1", "acc2"]}``.

``account_state`` -- ``{_id: account, reduce_only: bool, command_id, reason, operator,
since_ns}``: the trading block a force-close sets until a release.

``meta`` -- ``{_id: "routing", version: n}``: bumped by every rule/group change so a
running router reloads with one point read per message.

``accounts`` -- written by the account daemon (QIFI, ``_id`` = account_cookie); read here
for ``accounts.balance`` (copy-trade equity sizing) and ``positions`` (force-close).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from qaorder.models import AuditRecord, OrderStatus
from qaorder.routing import FollowerRule

__all__ = ["OrderStore", "rule_to_doc", "rule_from_doc", "new_rule_id", "QifiPosition", "TERMINAL"]

TERMINAL = [s.value for s in OrderStatus if s.is_terminal]


def new_rule_id() -> str:
    return "r-" + uuid.uuid4().hex[:8]


def rule_to_doc(rule: FollowerRule) -> dict[str, Any]:
    d = msgspec.to_builtins(rule)
    for k in ("symbols", "products"):
        if d.get(k) is not None:
            d[k] = sorted(d[k])
    d["_id"] = d["rule_id"]
    return d


def rule_from_doc(doc: Mapping[str, Any]) -> FollowerRule:
    d = {k: v for k, v in doc.items() if k in FollowerRule.__struct_fields__}
    for k in ("reverse", "enabled"):   # nx-27017 reads booleans back as 0/1
        if k in d:
            d[k] = bool(d[k])
    return msgspec.convert(d, FollowerRule)


class _Bucket:
    __slots__ = ("volume",)

    def __init__(self, volume: int) -> None:
        self.volume = volume


class QifiPosition:
    """A QIFI position dict seen as ``qaorder.routing.PositionView``."""

    def __init__(self, key: str, doc: Mapping[str, Any]) -> None:
        ex, _, sym = key.partition(".")
        self.exchange = str(doc.get("exchange_id") or ex)
        self.symbol = str(doc.get("instrument_id") or sym)
        self._doc = doc

    def bucket(self, name: str) -> _Bucket:   # long_today -> volume_long_today
        return _Bucket(int(self._doc.get(f"volume_{name}", 0) or 0))


class OrderStore:
    def __init__(self, db: Any, *, create_indexes: bool = True) -> None:
        self.db = db
        self.orders = db["orders"]
        self.children = db["child_orders"]
        self.processed = db["processed"]
        self.audit_coll = db["audit"]
        self.rules = db["follower_rules"]
        self.groups_coll = db["groups"]
        self.account_state = db["account_state"]
        self.meta = db["meta"]
        self.accounts = db["accounts"]
        if create_indexes:
            self.children.create_index([("account", ASCENDING), ("status", ASCENDING)])
            self.children.create_index([("parent_id", ASCENDING)])
            self.audit_coll.create_index([("parent_id", ASCENDING)])

    # version ----------------------------------------------------------------------------
    def version(self) -> int:
        doc = self.meta.find_one({"_id": "routing"})
        return int(doc["version"]) if doc else 0

    def bump_version(self) -> int:
        doc = self.meta.find_one_and_update({"_id": "routing"}, {"$inc": {"version": 1}}, upsert=True,
                                            return_document=ReturnDocument.AFTER)
        return int(doc["version"])

    # rules ----------------------------------------------------------------------------
    def add_rule(self, rule: FollowerRule) -> str:
        self.rules.insert_one(rule_to_doc(rule))
        self.bump_version()
        return rule.rule_id

    def remove_rule(self, rule_id: str) -> bool:
        n = self.rules.delete_one({"_id": rule_id}).deleted_count
        if n:
            self.bump_version()
        return bool(n)

    def load_rules(self) -> list[FollowerRule]:
        out = []
        for d in self.rules.find({}):
            out.append(rule_from_doc(d))
        out.sort(key=lambda r: r.rule_id)
        return out

    # groups ---------------------------------------------------------------------------
    def set_group(self, name: str, members: Sequence[str]) -> None:
        self.groups_coll.replace_one({"_id": name}, {"_id": name, "members": list(members)}, upsert=True)
        self.bump_version()

    def remove_group(self, name: str) -> bool:
        n = self.groups_coll.delete_one({"_id": name}).deleted_count
        if n:
            self.bump_version()
        return bool(n)

    def load_groups(self) -> dict[str, list[str]]:
        return {d["_id"]: list(d.get("members") or []) for d in self.groups_coll.find({})}

    # accounts (written by the account daemon) ------------------------------------------------
    def account_ids(self) -> list[str]:
        return [d["_id"] for d in self.accounts.find({}, {"_id": 1})]

    def account_doc(self, account: str) -> dict[str, Any] | None:
        return self.accounts.find_one({"_id": account})  # type: ignore[no-any-return]

    def equities(self, accounts: Iterable[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in self.accounts.find({"_id": {"$in": list(dict.fromkeys(accounts))}}, {"accounts.balance": 1}):
            bal = (d.get("accounts") or {}).get("balance")
            if isinstance(bal, (int, float)):
                out[d["_id"]] = float(bal)
        return out

    def positions(self, account: str) -> list[QifiPosition]:
        doc = self.account_doc(account) or {}
        return [QifiPosition(k, p) for k, p in (doc.get("positions") or {}).items()]

    # account state (reduce-only) --------------------------------------------------------
    def set_reduce_only(self, account: str, on: bool, **info: Any) -> None:
        self.account_state.update_one({"_id": account}, {"$set": {"reduce_only": on, "since_ns": time.time_ns(), **info}},
                                      upsert=True)

    def reduce_only_accounts(self) -> set[str]:
        return {d["_id"] for d in self.account_state.find({}) if d.get("reduce_only")}

    # orders -------------------------------------------------------------------------------
    def get_order(self, order_id: str) -> dict[str, Any] | None:
        return self.orders.find_one({"_id": order_id})  # type: ignore[no-any-return]

    def plan_order(self, doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert the order's plan; returns (the stored doc, True) or (the existing one, False)."""
        try:
            self.orders.insert_one(doc)
            return doc, True
        except DuplicateKeyError:
            return self.orders.find_one({"_id": doc["_id"]}), False

    def child_confirmed(self, coll: str, record_id: str, index: int, error: str | None = None) -> None:
        self.db[coll].update_one({"_id": record_id},
                                 {"$set": {f"children.{index}.confirmed": True, f"children.{index}.error": error}})

    def finish(self, coll: str, record_id: str, state: str, **extra: Any) -> None:
        self.db[coll].update_one({"_id": record_id}, {"$set": {"state": state, "done_ns": time.time_ns(), **extra}})

    def children_of(self, parent_id: str) -> list[tuple[str, str]] | None:
        doc = self.orders.find_one({"_id": parent_id}, {"children": 1})
        if doc is None:
            return None
        return [(c["account"], c["order_id"]) for c in doc.get("children", []) if c.get("kind", "order") == "order"]

    def save_children(self, docs: Sequence[dict[str, Any]]) -> None:
        for d in docs:
            self.children.replace_one({"_id": d["_id"]}, d, upsert=True)

    def set_child_status(self, order_id: str, status: str, reason: str = "") -> None:
        self.children.update_one({"_id": order_id}, {"$set": {"status": status, "reason": reason,
                                                              "updated_ns": time.time_ns()}})

    def working_children(self, account: str) -> list[dict[str, Any]]:
        return [d for d in self.children.find({"account": account}) if d.get("status") not in TERMINAL]

    # processed commands -----------------------------------------------------------------
    def get_processed(self, key: str) -> dict[str, Any] | None:
        return self.processed.find_one({"_id": key})  # type: ignore[no-any-return]

    def plan_processed(self, doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        try:
            self.processed.insert_one(doc)
            return doc, True
        except DuplicateKeyError:
            return self.processed.find_one({"_id": doc["_id"]}), False

    # audit ----------------------------------------------------------------------------------
    def audit(self, records: Iterable[AuditRecord | Mapping[str, Any]]) -> None:
        now = time.time_ns()
        docs = [{**(msgspec.to_builtins(r) if isinstance(r, AuditRecord) else dict(r)), "ts": now} for r in records]
        if docs:
            self.audit_coll.insert_many(docs)

    def audit_of(self, **query: Any) -> list[dict[str, Any]]:
        return list(self.audit_coll.find(query))
