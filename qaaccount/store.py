"""MongoDB persistence of QIFI accounts and of the paper executor's state (pymongo, sync).

Collections (database ``QA_MONGO_DB``, default ``qaflow``):

``accounts``  -- one QIFI document per account, ``_id`` = ``account_cookie``; written by the
    account daemon and by ``qaflow account open/settle``; read by the order router
    (``accounts.balance``, ``positions``). Extra fields next to QIFI's:
    ``rev`` (int, +1 on every write: optimistic concurrency between the daemon and the
    CLI -- a write whose ``rev`` is stale fails with :class:`StaleAccount` and the writer
    reloads), ``seen_trade_ids`` (every trade id ever applied, so a trade redelivered
    after a settlement or a restart counts once), ``updated_at`` (UTC ns).
``account_instruments`` -- optional per-instrument overrides (``_id`` = ``"EXCHANGE.symbol"``:
    ``margin_rate``, fee table, ``multiplier``, ``price_tick``, ``lot_size``); see
    :class:`InstrumentTable`.
``sim_orders`` -- the paper executor's orders, ``_id`` = order id: ``account``, the order,
    ``status``, ``traded``, ``fills`` (fill counter -> trade ids), ``reports``, ``cost``,
    ``cancel_ids`` (processed cancel message ids) and ``outbox`` (encoded events persisted
    before they are published; emptied once the publisher confirmed them -- lazily, by the next
    write or a timer, see :class:`handlers.broker.SimService`; re-published at start).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo import ReplaceOne, UpdateOne
from pymongo.errors import DuplicateKeyError

from qaaccount.account import Account
from qaaccount.instruments import Instrument, Instruments, UnknownInstrument, future, stock
from qaorder.models import STOCK_EXCHANGES, Exchange

log = logging.getLogger(__name__)

__all__ = ["StaleAccount", "AccountExists", "AccountStore", "InstrumentTable", "SimStateStore", "OutboxItem",
           "DEFAULT_MARGIN_RATE", "MAX_SEEN_TRADE_IDS"]

#: futures margin rate used when ``account_instruments`` has no entry for an instrument
DEFAULT_MARGIN_RATE = 0.1
MAX_SEEN_TRADE_IDS = 200_000
_INSTRUMENT_FIELDS = ("margin_rate", "open_ratio", "open_per_lot", "close_ratio", "close_per_lot",
                      "close_today_ratio", "close_today_per_lot", "multiplier", "price_tick", "lot_size")


class StaleAccount(RuntimeError):
    """The account document changed since it was read (another writer): reload and retry."""


class AccountExists(RuntimeError):
    pass


# instruments ------------------------------------------------------------------------------
class InstrumentTable(Instruments):
    """Instruments resolved on first use: the ``account_instruments`` override if any, else
    ``qamarket.models.spec_for`` (multiplier, tick, lot) with :data:`DEFAULT_MARGIN_RATE`
    and no fees for futures, and QAFlow's A-share defaults for stocks (a warning is logged
    for every defaulted future: configure real rates with ``qaflow account instrument``)."""

    def __init__(self, db: Any = None, items: Iterable[Instrument] = ()) -> None:
        super().__init__(items)
        self._coll = db["account_instruments"] if db is not None else None

    def __getitem__(self, key: str) -> Instrument:
        try:
            return super().__getitem__(key)
        except UnknownInstrument:
            inst = self._resolve(key)
            self.add(inst)
            return inst

    def _resolve(self, key: str) -> Instrument:
        exchange, _, symbol = key.partition(".")
        try:
            ex = Exchange(exchange)
        except ValueError:
            raise UnknownInstrument(key) from None
        over = (self._coll.find_one({"_id": key}) if self._coll is not None else None) or {}
        if ex in STOCK_EXCHANGES:
            return stock(symbol, ex)
        from qamarket.models import UnknownInstrument as SpecMissing
        from qamarket.models import spec_for

        try:
            spec = spec_for(symbol, exchange)
            mult, tick = spec.multiplier, spec.price_tick
        except SpecMissing:
            if "multiplier" not in over:
                raise UnknownInstrument(key) from None
            mult, tick = float(over["multiplier"]), float(over.get("price_tick", 1.0))
        if not over:
            log.warning("instrument %s: no account_instruments entry; margin rate %.2f and no fees assumed",
                        key, DEFAULT_MARGIN_RATE)
        kw = {k: over[k] for k in _INSTRUMENT_FIELDS if k in over and k not in ("multiplier", "price_tick",
                                                                                "margin_rate")}
        return future(symbol, ex, multiplier=float(over.get("multiplier", mult)),
                      price_tick=float(over.get("price_tick", tick)),
                      margin_rate=float(over.get("margin_rate", DEFAULT_MARGIN_RATE)), **kw)

    def configure(self, key: str, **params: float) -> dict[str, Any]:
        """Store overrides for ``key`` (validated by building the instrument)."""
        assert self._coll is not None
        bad = set(params) - set(_INSTRUMENT_FIELDS)
        if bad:
            raise ValueError(f"unknown instrument fields: {', '.join(sorted(bad))}")
        doc = {k: v for k, v in params.items() if v is not None}
        self._coll.update_one({"_id": key}, {"$set": doc}, upsert=True)
        self._by_key.pop(key, None)
        inst = self[key]   # raises if the result is invalid
        return {"_id": key, **{f: getattr(inst, f) for f in _INSTRUMENT_FIELDS}}


# accounts -----------------------------------------------------------------------------------
class AccountStore:
    """QIFI documents in ``accounts`` with a revision number for safe concurrent writers."""

    def __init__(self, db: Any, instruments: Instruments | None = None) -> None:
        self.db = db
        self.coll = db["accounts"]
        self.instruments = instruments if instruments is not None else InstrumentTable(db)

    def ids(self) -> list[str]:
        return sorted(str(d["_id"]) for d in self.coll.find({}, {"_id": 1}))

    def doc(self, account: str) -> dict[str, Any] | None:
        return self.coll.find_one({"_id": account})  # type: ignore[no-any-return]

    def docs(self, accounts: Sequence[str] | None = None) -> list[dict[str, Any]]:
        q = {"_id": {"$in": list(accounts)}} if accounts else {}
        return sorted(self.coll.find(q), key=lambda d: str(d["_id"]))

    def open(self, account: str, cash: float, trading_day: str = "") -> Account:
        acc = Account(account, self.instruments, trading_day=trading_day)
        acc.deposit_cash(cash)
        try:
            self.coll.insert_one(self._to_doc(acc, 1))
        except DuplicateKeyError:
            raise AccountExists(f"account {account!r} already exists") from None
        return acc

    def load(self, account: str) -> tuple[Account, int] | None:
        d = self.doc(account)
        if d is None:
            return None
        return self.from_doc(d), int(d.get("rev", 0))

    def from_doc(self, d: dict[str, Any]) -> Account:
        acc = Account.from_qifi(d, self.instruments)
        # trade ids applied before the last settlement (QIFI's trades only hold today's)
        acc._trade_ids.update(d.get("seen_trade_ids", ()))  # noqa: SLF001 - the account's own dedupe set
        return acc

    def _to_doc(self, acc: Account, rev: int) -> dict[str, Any]:
        doc = acc.to_qifi()
        seen = sorted(acc._trade_ids)  # noqa: SLF001
        doc.update(_id=acc.account_cookie, rev=rev, seen_trade_ids=seen[-MAX_SEEN_TRADE_IDS:],
                   updated_at=time.time_ns())
        return doc

    def save(self, acc: Account, rev: int) -> int:
        """Write ``acc`` if the stored document is still at ``rev``; returns the new rev."""
        new = rev + 1
        res = self.coll.replace_one({"_id": acc.account_cookie, "rev": rev}, self._to_doc(acc, new))
        if res.matched_count != 1:
            raise StaleAccount(f"account {acc.account_cookie!r} changed since rev {rev}")
        return new


# the paper executor's state ---------------------------------------------------------------------
@dataclass(frozen=True)
class OutboxItem:
    kind: str          # report kind: order | trade | reject
    message_id: str
    type: str          # schema name
    body: str          # the encoded message (JSON text), re-published byte for byte

    def to_doc(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.message_id, "type": self.type, "body": self.body}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> OutboxItem:
        return cls(d["kind"], d["id"], d["type"], d["body"])


class SimStateStore:
    """``sim_orders``: written BEFORE events are published and BEFORE the command is acked."""

    def __init__(self, db: Any) -> None:
        self.coll = db["sim_orders"]

    def load(self, account: str) -> Iterator[dict[str, Any]]:
        return iter(self.coll.find({"account": account}))

    @staticmethod
    def _replace(account: str, doc: dict[str, Any], outbox: Sequence[OutboxItem], cancel_ids: Iterable[str],
                 now: int) -> ReplaceOne:
        oid = doc["order"]["order_id"]
        full = dict(doc, _id=oid, account=account, outbox=[o.to_doc() for o in outbox],
                    cancel_ids=list(cancel_ids), updated_at=now)
        return ReplaceOne({"_id": oid}, full, upsert=True)

    def save(self, account: str, orders: Iterable[tuple[dict[str, Any], list[OutboxItem], list[str]]]) -> None:
        """Replace each order document (``SimOrder.to_doc()``) with its whole outbox and cancel ids."""
        self.commit([(account, d, o, c) for d, o, c in orders])

    def commit(self, orders: Iterable[tuple[str, dict[str, Any], Sequence[OutboxItem], Iterable[str]]],
               clear: Iterable[str] = ()) -> int:
        """ONE ``bulk_write``: replace every ``(account, SimOrder.to_doc(), outbox, cancel_ids)`` document
        and empty the outbox of the ``clear`` order ids (events confirmed by an earlier batch: the lazy
        clear of :class:`handlers.broker.SimService`). Returns the number of operations (0: no write)."""
        now = time.time_ns()
        orders = list(orders)
        ops: list[Any] = [self._replace(a, d, o, c, now) for a, d, o, c in orders]
        written = {d["order"]["order_id"] for _a, d, _o, _c in orders}
        # one point update per id, by _id (served from the index; 10 of them cost ~1 ms here, a 10-id ``$in``
        # update_many ~3 ms on a 5k-document nx-27017 collection)
        ops += [UpdateOne({"_id": i}, {"$set": {"outbox": [], "updated_at": now}})
                for i in dict.fromkeys(clear) if i not in written]
        if ops:
            self.coll.bulk_write(ops, ordered=True)
        return len(ops)

    def clear_outbox(self, order_ids: Iterable[str]) -> None:
        self.commit((), order_ids)

    def pending(self, account: str) -> list[tuple[str, list[OutboxItem]]]:
        out = []
        for d in self.coll.find({"account": account}, {"outbox": 1}):
            if d.get("outbox"):
                out.append((str(d["_id"]), [OutboxItem.from_doc(x) for x in d["outbox"]]))
        return out
