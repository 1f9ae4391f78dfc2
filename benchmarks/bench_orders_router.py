"""A MEASUREMENT COPY of the order router with the changes the orders benchmark proposes.

Not the product: ``handlers/router.py`` is unchanged. This subclass only overrides the hot
path of a new order so that ``benchmarks.bench_orders`` can report what each change gains:

1. children published with *gathered* confirms: every child of an order is framed on a
   confirm-mode channel (``mandatory``, persistent, same bodies and ``message_id`` as the
   router's) and the router waits once for all their acks (returns mark the child
   unroutable, as ``Publisher`` does) -- instead of one broker round trip per child;
2. MongoDB writes batched per order: the child documents in ONE ``bulk_write`` of
   ``ReplaceOne(upsert)`` (was one ``replace_one`` per child), and every child's
   ``confirmed`` flag plus ``state``/``done_ns`` in ONE ``update_one`` (was one
   ``update_one`` per child and one more for ``finish``);
3. the idempotency read ``orders.find_one`` before the plan is dropped: ``plan_order``'s
   insert already detects a redelivery (duplicate key) and returns the stored plan;
4. the routing-configuration version (``meta``) is read at most every
   ``RELOAD_INTERVAL`` seconds instead of once per order (a rule change then takes effect
   within 0.2 s rather than on the very next order).

Risk-first is kept: ``poll_risk()`` (one ``basic_get``) still runs before every order.

::

    python -m benchmarks.bench_orders_router [--namespace NS]     # env as for handlers.router
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import pika
import pika.spec
from pymongo import ReplaceOne

from handlers.router import Router
from qaorder.models import Order, OrderStatus
from qapubsub.settings import Settings
from qapubsub.topology import Topology

log = logging.getLogger(__name__)
RELOAD_INTERVAL = 0.2


class GatheredPublisher:
    """Publish a batch on a confirm-mode channel and wait once for all the confirms."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._ch: Any = None
        self._gen = -1
        self._next = 1
        self._acked = 0
        self._nacked: set[int] = set()
        self._returned: set[str] = set()
        self._ok = False

    def _channel(self) -> Any:
        if self._ch is None or not self._ch.is_open or self._gen != self.connection.generation:
            ch = self.connection.channel()
            impl = ch._impl  # noqa: SLF001

            def on_confirm(frame: Any) -> None:
                m = frame.method
                if isinstance(m, pika.spec.Basic.Nack):
                    self._nacked.add(m.delivery_tag)
                self._acked = max(self._acked, m.delivery_tag)

            def on_return(_ch: Any, _method: Any, props: Any, _body: bytes) -> None:
                self._returned.add(props.message_id)

            self._ok = False
            impl.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda _f: setattr(self, "_ok", True))
            impl.add_on_return_callback(on_return)
            self.connection.blocking._flush_output(lambda: self._ok)  # noqa: SLF001
            self._ch, self._gen, self._next, self._acked = ch, self.connection.generation, 1, 0
        return self._ch

    def publish_all(self, items: list[tuple[str, str, bytes, dict[str, Any]]]) -> list[str | None]:
        """Publish every (exchange, key, body, props); returns per item None or an error."""
        ch = self._channel()
        impl = ch._impl  # noqa: SLF001
        self._returned.clear()
        self._nacked.clear()
        first = self._next
        for ex, key, body, props in items:
            impl.basic_publish(ex, key, body, pika.BasicProperties(delivery_mode=2, **props), mandatory=True)
            self._next += 1
        last = self._next - 1
        self.connection.blocking._flush_output(lambda: self._acked >= last)  # noqa: SLF001
        if any(first <= t <= last for t in self._nacked):
            raise RuntimeError("broker nacked a child: requeue the order")
        return [f"no executor for account {key}" if props["message_id"] in self._returned else None
                for _ex, key, _b, props in items]


class FastRouter(Router):
    def __init__(self, *a: Any, **kw: Any) -> None:
        self._last_reload = 0.0
        super().__init__(*a, **kw)
        self.gathered = GatheredPublisher(self.connection)
        store = self.store

        def save_children(docs: list[dict[str, Any]]) -> None:
            if docs:
                store.children.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=True)

        store.save_children = save_children  # type: ignore[method-assign]
        self._pending_sets: dict[str, Any] = {}

        def finish(coll: str, record_id: str, state: str, **extra: Any) -> None:
            # the children's confirmed flags (from _publish_children) and the state in ONE write
            sets, self._pending_sets = self._pending_sets, {}
            store.db[coll].update_one({"_id": record_id}, {"$set": {**sets, "state": state,
                                                                   "done_ns": time.time_ns(), **extra}})

        store.finish = finish  # type: ignore[method-assign]
        store.get_order = lambda _oid: None  # type: ignore[method-assign] # plan_order's insert detects duplicates

    def reload(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_reload < RELOAD_INTERVAL:
            return False
        self._last_reload = now
        return super().reload(force)

    def _publish_children(self, coll: str, rec: dict[str, Any]) -> None:
        todo = [(i, c) for i, c in enumerate(rec.get("children", [])) if not c.get("confirmed")]
        if not todo:
            return
        items = []
        for _i, c in todo:
            props = {"message_id": c["message_id"], "type": c.get("type"), "content_type": "application/json"}
            if c.get("correlation_id"):
                props["correlation_id"] = c["correlation_id"]
            items.append((self.topo.exec, c["routing_key"], c["body"].encode(), props))
        errors = self.gathered.publish_all(items)
        sets: dict[str, Any] = {}
        for (i, c), err in zip(todo, errors):
            sets[f"children.{i}.confirmed"] = True
            sets[f"children.{i}.error"] = err
            if err is None:
                self.counts["children"] += 1
        self._pending_sets = sets   # written together with the state by finish()
        for (_i, c), err in zip(todo, errors):
            if err:
                if c.get("kind", "order") == "order":
                    self.store.set_child_status(c["order_id"], OrderStatus.REJECTED.value, err)
                self.store.audit([{"action": "reject", "parent_id": rec["_id"], "account": c["account"],
                                   "child_id": c["order_id"], "detail": err}])
                self.report_reject(c["account"], "account", err, order_id=c["order_id"], routing_key=c["routing_key"])


def _fast(namespace: str | None) -> int:
    import pymongo

    from qapubsub.sync import Connection

    settings = Settings.from_env()
    topo = Topology(settings.namespace if namespace is None else namespace)
    client = pymongo.MongoClient(settings.mongo_url, serverSelectionTimeoutMS=3000)
    conn = Connection(settings, client_name="qaflow-router-fast")
    router = FastRouter(settings, topo, client[settings.mongo_db], connection=conn)
    log.info("fast router (measurement copy) started", extra={"namespace": topo.namespace})
    try:
        return router.run_until_signal()
    finally:
        client.close()


def main() -> int:
    """``--original`` runs ``handlers.router`` itself (unchanged); ``--profile PATH`` wraps either
    in cProfile and writes the stats when the router returns after SIGTERM."""
    from handlers.cli import run_module, setup_logging

    p = argparse.ArgumentParser()
    p.add_argument("--namespace", default=None)
    p.add_argument("--original", action="store_true", help="the product router, not the copy")
    p.add_argument("--profile", default=None, metavar="PATH")
    args = p.parse_args()
    setup_logging(None)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        if args.original:
            return run_module("handlers.router", [] if args.namespace is None else ["--namespace", args.namespace],
                              "qaflow router")
        return _fast(args.namespace)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
