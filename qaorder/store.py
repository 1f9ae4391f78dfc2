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

  ``state: "routed"`` means every child was confirmed by the broker (or returned: then its
  ``error`` is set); the per-child ``confirmed`` flags are only written for children that
  were returned or belong to a cancel / force-close record, so they are meaningful while
  ``state`` is ``planned`` (written in one bulk update per router batch).

``child_orders`` -- status *exceptions* of children (``_id`` = child order id): children the
router rejected (risk, reduce-only, returned as unroutable) and children it asked to cancel
(``PENDING_CANCEL``)::

    {_id, parent_id, account, symbol, exchange, direction, offset, volume, price,
     source, status: "PENDING_CANCEL"|"REJECTED", reason, updated_ns}

  Accepted children are *not* copied here (that was one upsert per child on the hot path):
  they live in their parent's plan in ``orders`` (``children.account`` is indexed) and
  :meth:`OrderStore.working_children` derives an account's working children from the plans
  plus these exceptions.

``processed`` -- idempotency records of the other commands (cancels by message id,
force-close and release by ``command_id``)::

    {_id: "cancel:<id>"|"forceclose:<command_id>"|"release:<command_id>",
     state: "planned"|"done"|"rejected", children: [...as above...], ...}

``audit`` -- routing decisions (``qaorder.models.AuditRecord`` fields plus ``ts``):
``direct | group | follow | skip | reject | cancel | forceclose | release | refused |
duplicate``. Single records are one document each; the router's order batches write ONE
document per batch, ``{batch: true, records: [...], ts}`` (``records.parent_id`` is indexed).
:meth:`OrderStore.audit_of` flattens both shapes.

``follower_rules`` -- ``{_id: rule_id, ...FollowerRule fields...}``.

``groups`` -- ``{_id: group_name, members: ["acc1", "acc2"]}``.

``account_state`` -- ``{_id: account, reduce_only: bool, command_id, reason, operator,
since_ns}``: the trading block a force-close sets until a release; ``halted: bool`` and
``halt: {command_id, reason, operator, since_ns}``: the block of every new order a Halt sets
until a Resume (the two are independent).

``meta`` -- ``{_id: "routing", version: n}``: bumped by every rule/group change; a running
router reads it at most every 0.2 s (and before a batch when that long has passed).

``accounts`` -- written by the account daemon (QIFI, ``_id`` = account_cookie); read here
for ``accounts.balance`` (copy-trade equity sizing) and ``positions`` (force-close).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from pymongo import ASCENDING, ReturnDocument, UpdateMany, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

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
            self.audit_coll.create_index([("records.parent_id", ASCENDING)])
            self.audit_coll.create_index([("orders", ASCENDING)])
            self.orders.create_index([("children.account", ASCENDING)])

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

    def set_halted(self, account: str, on: bool, **info: Any) -> None:
        halt = {**info, "since_ns": time.time_ns()}
        self.account_state.update_one({"_id": account}, {"$set": {"halted": on, "halt": halt}}, upsert=True)

    def halted_accounts(self) -> dict[str, dict[str, Any]]:
        """``{account: {command_id, reason, operator, since_ns}}`` of the accounts a Halt blocks."""
        return {d["_id"]: dict(d.get("halt") or {}) for d in self.account_state.find({}) if d.get("halted")}

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

    def get_orders(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored plans of ``ids`` (one read)."""
        if not ids:
            return {}
        return {d["_id"]: d for d in self.orders.find({"_id": {"$in": list(ids)}})}

    def plan_orders(self, docs: Sequence[dict[str, Any]]) -> set[str]:
        """Insert many plans in ONE unordered ``insert_many``; returns the ids that already existed
        (found by the duplicate-key errors of that write, not by reads). Other errors raise."""
        if not docs:
            return set()
        try:
            self.orders.insert_many(docs, ordered=False)
            return set()
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or []
            other = [e for e in errors if e.get("code") != 11000]
            if other or exc.details.get("writeConcernErrors"):
                raise
            return {docs[e["index"]]["_id"] for e in errors}

    def finish_many(self, coll: str, states: Mapping[str, Sequence[str]],
                    sets: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """ONE bulk write: ``states`` {state: [ids]} (one ``update_many`` each) and per-record extra
        ``$set`` s (returned children's flags) -- with ``done_ns``."""
        now = time.time_ns()
        ops: list[Any] = []
        sets = sets or {}
        for state, ids in states.items():
            plain = [i for i in ids if i not in sets]
            if plain:
                ops.append(UpdateMany({"_id": {"$in": plain}}, {"$set": {"state": state, "done_ns": now}}))
            for i in ids:
                if i in sets:
                    ops.append(UpdateOne({"_id": i}, {"$set": {**sets[i], "state": state, "done_ns": now}}))
        if ops:
            self.db[coll].bulk_write(ops, ordered=False)

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
        """Upsert child status documents (exceptions: rejected / pending-cancel), one bulk write."""
        if docs:
            from pymongo import ReplaceOne

            self.children.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=False)

    def set_child_status(self, order_id: str, status: str, reason: str = "", **on_insert: Any) -> None:
        """Set a child's status (upsert: accepted children have no document until their first exception)."""
        update: dict[str, Any] = {"$set": {"status": status, "reason": reason, "updated_ns": time.time_ns()}}
        if on_insert:
            update["$setOnInsert"] = on_insert
        self.children.update_one({"_id": order_id}, update, upsert=True)

    def working_children(self, account: str) -> list[dict[str, Any]]:
        """The account's children not known to be terminal: from the plans in ``orders`` and the
        force-close plans in ``processed`` (accepted children), minus children returned as
        unroutable or marked terminal in ``child_orders``; plus ``child_orders`` documents of
        children planned elsewhere (older routers wrote every child there). Each item:
        ``{_id, account, status, order: {...Order fields...}}``. Rare (force-close): the plan
        query is served by the ``children.account`` index on MongoDB."""
        status = {d["_id"]: d for d in self.children.find({"account": account})}
        out: dict[str, dict[str, Any]] = {}
        for coll, query in ((self.orders, {"children": {"$elemMatch": {"account": account}}, "state": {"$ne": "rejected"}}),
                            (self.processed, {"kind": "forceclose", "account": account})):
            for doc in coll.find(query, {"children": 1}):
                for c in doc.get("children") or []:
                    if c.get("account") != account or c.get("kind", "order") != "order" or c.get("error"):
                        continue
                    oid = c["order_id"]
                    st = status.get(oid, {}).get("status", OrderStatus.SUBMITTING.value)
                    if st in TERMINAL:
                        continue
                    body = msgspec.json.decode(c["body"])
                    body.pop("schema", None)
                    out[oid] = {"_id": oid, "account": account, "status": st, "order": body}
        for oid, d in status.items():
            if oid not in out and d.get("status") not in TERMINAL and d.get("order"):
                out[oid] = d
        return list(out.values())

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

    def audit_batch(self, records: Sequence[AuditRecord | Mapping[str, Any]], *, orders: Sequence[str] = (),
                    ts: int | None = None) -> None:
        """ONE document for many records (a router batch). ``orders``: the plans whose routing
        decisions this document holds (:meth:`audited_orders` finds them); ``ts``: when the
        decisions were taken (default: now)."""
        self.audit_batches([(records, orders, ts)])

    def audit_batches(self, batches: Sequence[tuple[Sequence[AuditRecord | Mapping[str, Any]], Sequence[str],
                                                    int | None]]) -> None:
        """:meth:`audit_batch` for several batches ``(records, orders, ts)``: ONE ``insert_many``."""
        docs = []
        for records, orders, ts in batches:
            if not (records or orders):
                continue
            now = time.time_ns() if ts is None else ts
            doc: dict[str, Any] = {"batch": True, "ts": now, "records": [
                {**(msgspec.to_builtins(r) if isinstance(r, AuditRecord) else dict(r)), "ts": now} for r in records]}
            if orders:
                doc["orders"] = list(orders)
            docs.append(doc)
        if docs:
            self.audit_coll.insert_many(docs)

    def audited_orders(self, ids: Sequence[str]) -> set[str]:
        """Which of the plans ``ids`` have their routing decisions in the audit collection."""
        if not ids:
            return set()
        found: set[str] = set()
        for d in self.audit_coll.find({"orders": {"$in": list(ids)}}, {"orders": 1}):
            found.update(d.get("orders") or [])
        return found & set(ids)

    def audit_of(self, **query: Any) -> list[dict[str, Any]]:
        """Records matching ``query`` (equality on fields), single documents and batch records alike."""
        out = [d for d in self.audit_coll.find({**query, "batch": {"$ne": True}})]
        # $elemMatch, not "records.k": nx-27017 misses dotted array paths once they are indexed
        for d in self.audit_coll.find({"batch": True, **({"records": {"$elemMatch": query}} if query else {})}):
            out.extend(r for r in d.get("records") or [] if all(r.get(k) == v for k, v in query.items()))
        return out
