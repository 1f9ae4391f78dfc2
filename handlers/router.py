"""``qaflow router``: the order router daemon (pika, one connection).

Consumes ``router_orders`` (``qaorder`` ``#`` and ``QAORDER_ROUTER`` once per known
account/group key) and ``router_risk`` (force-close / release from ``qarisk``), routes
orders with :func:`qaorder.routing.route` and publishes the children to ``qa.exec``
(key = account; confirms + mandatory: no executor queue => Reject report).

Risk first. The orders queue is consumed with :class:`qapubsub.sync.Consumer`; the risk
queue is drained with ``basic_get`` on a second channel of the same connection (a) before
*every* order is handled and (b) every ``risk_interval`` seconds from the consumer loop
when no order arrives. Why not two consumers: pika delivers both consumers' messages in
arrival order through one I/O loop, so a force-close could wait behind a prefetched batch
of orders; with ``basic_get`` before each order a force-close is always applied before
the next order is routed (so the reduce-only block holds for it).

Idempotency. An order's plan (its children and their exact JSON bodies and message ids)
is written to ``orders`` before anything is published; each child is marked once the
broker confirmed (or returned) it; the order is marked ``routed`` and only then acked. A
redelivery of a ``routed`` order is a no-op; of a ``planned`` one re-publishes the
children not yet confirmed, byte for byte (same ``message_id``). Force-close and release
are idempotent by ``command_id`` the same way (``processed``).

Quotes for force-close pricing: the last stored tick of each instrument
(:meth:`qamarket.store.TickStore.last_tick`, collection ``ticks`` of the same database,
written by the tickhandler). Price mode ``QA_FORCECLOSE_PRICE`` = ``LIMIT_PRICE``
(default: sell at limit-down / buy at limit-up) or ``TICKS`` (best opposite price +- 5 ticks).
A position without a usable quote is skipped and audited, never priced by guess.

Instruments (lot size, price tick): :func:`qamarket.models.spec_for`, the registry.

Pre-trade rules: ``qaflow router`` passes a :class:`handlers.risk.RiskGate` as ``risk_check``
(``--no-risk-rules`` to skip): it checks each child first (rejections name the rule,
``risk.<rule>.<check>``), is told of dispatched children, force-closes and releases, and
consumes executor reports and ticks on its own bounded queue of this connection (see
``docs/risk.md``).

Order status updates from ``qa.report`` are left to the account daemon: ``child_orders``
keeps SUBMITTING / PENDING_CANCEL / REJECTED as set by the router.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qaorder.dialects import decode_order
from qaorder.models import Cancel, ForceClose, Offset, Order, OrderRejected, OrderStatus, Release
from qaorder.models import Reject as RejectReport
from qaorder.routing import FollowerRule, PriceMode, Sizing, plan_force_close, route, route_cancel
from qaorder.store import OrderStore
from qapubsub import handling, keys
from qapubsub.messages import DecodeError, Message, decode, encode
from qapubsub.settings import Settings
from qapubsub.topology import Binding, Topology, declare_queue_sync

log = logging.getLogger(__name__)

RiskCheck = Callable[[Order, "RiskContext"], Any]


@dataclass
class RiskContext:
    """What the pre-trade hook gets besides the child order."""

    parent: Order
    dialect: str
    reduce_only: bool
    store: OrderStore
    extra: dict[str, Any] = field(default_factory=dict)

    def account_doc(self, account: str) -> dict[str, Any] | None:
        return self.store.account_doc(account)


class _Instruments:
    """``"EXCHANGE.symbol" -> InstrumentSpec`` (lot_size, price_tick) from the qamarket registry."""

    def get(self, key: str, default: Any = None) -> Any:
        from qamarket.models import spec_for

        ex, _, sym = key.partition(".")
        try:
            return spec_for(sym, ex)
        except Exception:  # noqa: BLE001 - unknown instrument: the caller skips with the reason
            return default


def _word(value: str | None) -> str:
    try:
        return keys.exec_key(value or "")
    except keys.KeyError_:
        return "_unknown"


def _rejection(result: Any, child: Order) -> tuple[str, str] | None:
    """A risk hook's answer as (field, reason), None for accept."""
    if result is None or result is True:
        return None
    if hasattr(result, "ok") and getattr(result, "ok"):
        return None
    if hasattr(result, "rejection") and not hasattr(result, "to_order_rejected"):  # a Decision
        result = result.rejection or "rejected by the risk check"
    if hasattr(result, "to_order_rejected"):
        err = result.to_order_rejected(child)
        return err.field, err.reason
    if isinstance(result, OrderRejected):
        return result.field or "risk", result.reason
    return "risk", str(result)


class Router:
    def __init__(self, settings: Settings, topology: Topology, db: Any, *, risk_check: RiskCheck | None = None,
                 connection: Any = None, risk_interval: float = 0.1, bindings_interval: float = 5.0,
                 price_mode: PriceMode | None = None) -> None:
        from qapubsub.sync import Connection, Publisher

        self.settings = settings
        self.topo = topology
        self.store = OrderStore(db)
        self.db = db
        self.risk_check = risk_check
        # a RiskGate (handlers.risk) also wants dispatched orders, reports and force-closes
        self.risk_gate: Any = risk_check if hasattr(risk_check, "on_order_accepted") else None
        self.connection = connection or Connection(settings, client_name="qaflow-router")
        self.exec_pub = Publisher(self.connection, topology=topology)          # confirms + mandatory
        self.report_pub = Publisher(self.connection, topology=topology, mandatory=False)
        self.instruments = _Instruments()
        mode = price_mode or PriceMode(os.environ.get("QA_FORCECLOSE_PRICE", PriceMode.LIMIT_PRICE.value))
        self.price_mode = mode
        self.risk_interval = risk_interval
        self.bindings_interval = bindings_interval
        self._version = -1
        self.rules: list[FollowerRule] = []
        self.groups: dict[str, list[str]] = {}
        self.reduce_only: set[str] = set()
        self._risk_ch: Any = None
        self._risk_gen = -1
        self._last_risk = 0.0
        self._last_bindings = 0.0
        self._bound: set[str] = set()
        self.counts = {"orders": 0, "children": 0, "rejected": 0, "duplicates": 0, "cancels": 0, "forceclose": 0}
        self.reload(force=True)
        self.consumer = _RouterConsumer(self, self.connection, topology.router_orders.with_bindings(
            *(Binding(topology.qapubsub_order, k) for k in sorted(self._known_keys()))), self.on_order,
            topology=topology, prefetch=50)
        self._bound = {b.routing_key for b in self.consumer.bindings if b.exchange == topology.qapubsub_order}

    # configuration ----------------------------------------------------------------------
    def reload(self, force: bool = False) -> bool:
        v = self.store.version()
        if not force and v == self._version:
            return False
        self._version = v
        self.rules = self.store.load_rules()
        self.groups = self.store.load_groups()
        self.reduce_only = self.store.reduce_only_accounts()
        log.info("routing configuration loaded", extra={"version": v, "rules": len(self.rules),
                                                         "groups": len(self.groups)})
        return True

    def _known_keys(self) -> set[str]:
        out: set[str] = set(self.store.account_ids()) | set(self.groups)
        for members in self.groups.values():
            out.update(members)
        for r in self.rules:
            out.update((r.leader, r.follower))
        good = set()
        for k in out:
            try:
                good.add(keys.order_key(k))
            except keys.KeyError_:
                log.warning("account/group %r cannot be a routing key; not bound to QAORDER_ROUTER", k)
        return good

    def refresh_bindings(self) -> None:
        for k in sorted(self._known_keys() - self._bound):
            self.consumer.bind(self.topo.qapubsub_order, k)
            self._bound.add(k)
        self._last_bindings = time.monotonic()

    def idle(self) -> None:
        """Called from the consumer loop: serve the risk queue, refresh QAORDER_ROUTER bindings."""
        now = time.monotonic()
        if now - self._last_risk >= self.risk_interval:
            self.poll_risk()
        if now - self._last_bindings >= self.bindings_interval:
            self.refresh_bindings()
        if self.risk_gate is not None:
            self.risk_gate.periodic()

    # reports ----------------------------------------------------------------------------
    def report_reject(self, account: str | None, field_: str, reason: str, *, order_id: str | None = None,
                      dialect: str = "", routing_key: str = "") -> None:
        acc = _word(account or routing_key)
        msg = RejectReport(account=account or routing_key, field=field_, reason=reason, order_id=order_id,
                           dialect=dialect, routing_key=routing_key)
        self.report_pub.publish(self.topo.report, keys.report_key(acc, "reject"), msg)
        self.counts["rejected"] += 1

    # orders -----------------------------------------------------------------------------
    def on_order(self, body: bytes, delivery: Any) -> None:
        self.poll_risk()                 # force-close / release first, always
        if self.reload():
            self.refresh_bindings()
        rk = delivery.routing_key
        try:
            msg, dialect = decode_order(body, rk)
        except OrderRejected as exc:
            self.store.audit([{"action": "reject", "parent_id": exc.order_id or "", "account": exc.account or rk,
                               "detail": str(exc), "field": exc.field}])
            self.report_reject(exc.account, exc.field, exc.reason, order_id=exc.order_id, routing_key=rk)
            raise handling.Reject(f"{exc.field}: {exc.reason}" if exc.field else exc.reason) from None
        if isinstance(msg, Cancel):
            self._on_cancel(msg, delivery, body)
        else:
            self._on_new_order(msg, dialect, delivery)

    def _child_entry(self, msg: Message, account: str, kind: str = "order") -> dict[str, Any]:
        return {"order_id": getattr(msg, "order_id"), "account": account, "routing_key": keys.exec_key(account),
                "message_id": msg.id, "type": msg.schema, "kind": kind, "body": encode(msg).decode(),
                "correlation_id": getattr(msg, "correlation_id", None), "confirmed": False, "error": None}

    def _child_doc(self, o: Order, status: str = OrderStatus.SUBMITTING.value) -> dict[str, Any]:
        return {"_id": o.order_id, "parent_id": o.parent_id or o.order_id, "account": o.account, "symbol": o.symbol,
                "exchange": o.exchange.value, "direction": o.direction.value, "offset": o.offset.value,
                "volume": o.volume, "price": o.price, "source": o.source, "status": status, "reason": "",
                "order": msgspec.to_builtins(o), "updated_ns": time.time_ns()}

    def _check_child(self, child: Order, parent: Order, dialect: str) -> tuple[str, str] | None:
        if self.risk_gate is not None:   # the pre-trade rules first: their rejections name the rule
            ctx = RiskContext(parent=parent, dialect=dialect, reduce_only=child.account in self.reduce_only,
                              store=self.store)
            why = _rejection(self.risk_check(child, ctx), child)  # type: ignore[misc]
            if why is not None:
                return why
        if child.account in self.reduce_only and child.offset is Offset.OPEN:
            st = self.store.account_state.find_one({"_id": child.account}) or {}
            return "offset", (f"account {child.account} is reduce-only after force-close {st.get('command_id', '?')}: "
                              f"opening orders are refused until a release")
        if self.risk_check is not None and self.risk_gate is None:
            ctx = RiskContext(parent=parent, dialect=dialect, reduce_only=child.account in self.reduce_only,
                              store=self.store)
            return _rejection(self.risk_check(child, ctx), child)
        return None

    def _on_new_order(self, order: Order, dialect: str, delivery: Any) -> None:
        existing = self.store.get_order(order.order_id)
        if existing is not None:
            self._resume("orders", existing)
            return
        self.counts["orders"] += 1
        equities: dict[str, float] = {}
        if any(r.sizing is Sizing.EQUITY and r.leader == order.account and r.enabled for r in self.rules):
            equities = self.store.equities([order.account, *(r.follower for r in self.rules)])
        dec = route(order, self.rules, self.groups, equities, self.instruments)  # type: ignore[arg-type]
        accepted: list[Order] = []
        rejected: list[tuple[Order, str, str]] = []
        audit: list[Any] = list(dec.audit)
        for child in dec.children:
            why = self._check_child(child, order, dialect)
            if why is None:
                accepted.append(child)
            else:
                rejected.append((child, *why))
                audit.append({"action": "reject", "parent_id": order.order_id, "account": child.account,
                              "child_id": child.order_id, "field": why[0], "detail": why[1]})
        doc = {"_id": order.order_id, "order": msgspec.to_builtins(order), "dialect": dialect,
               "routing_key": delivery.routing_key, "exchange": delivery.exchange, "state": "planned",
               "received_ns": time.time_ns(),
               "children": [self._child_entry(c, c.account) for c in accepted],
               "rejected": [{"order_id": c.order_id, "account": c.account, "field": f, "reason": r}
                            for c, f, r in rejected]}
        rec, fresh = self.store.plan_order(doc)
        if not fresh:
            self._resume("orders", rec)
            return
        if self.risk_gate is not None:
            for c in accepted:
                self.risk_gate.on_order_accepted(c)
        self.store.save_children([self._child_doc(c) for c in accepted] +
                                 [{**self._child_doc(c, OrderStatus.REJECTED.value), "reason": r}
                                  for c, _f, r in rejected])
        self.store.audit(audit)
        for c, f, r in rejected:
            self.report_reject(c.account, f, r, order_id=c.order_id, dialect=dialect, routing_key=delivery.routing_key)
        self._publish_children("orders", rec)
        self.store.finish("orders", rec["_id"], "routed" if accepted else "rejected")

    def _resume(self, coll: str, rec: dict[str, Any]) -> None:
        if rec.get("state") == "planned":
            log.info("resuming a planned %s record", coll, extra={"id": rec["_id"]})
            self._publish_children(coll, rec)
            self.store.finish(coll, rec["_id"], "routed" if coll == "orders" else "done")
        else:
            self.counts["duplicates"] += 1
            self.store.audit([{"action": "duplicate", "parent_id": rec["_id"], "account": rec.get("routing_key", ""),
                               "detail": f"already {rec.get('state')}: not placed again"}])
            log.info("duplicate delivery ignored", extra={"id": rec["_id"]})

    def _publish_children(self, coll: str, rec: dict[str, Any]) -> None:
        from qapubsub.sync import Unroutable

        for i, c in enumerate(rec.get("children", [])):
            if c.get("confirmed"):
                continue
            props = {"message_id": c["message_id"], "type": c.get("type"), "content_type": "application/json"}
            if c.get("correlation_id"):
                props["correlation_id"] = c["correlation_id"]
            err = None
            try:
                self.exec_pub.publish(self.topo.exec, c["routing_key"], c["body"].encode(), properties=props)
                self.counts["children"] += 1
            except Unroutable:
                err = f"no executor for account {c['account']}"
            self.store.child_confirmed(coll, rec["_id"], i, err)
            if err:
                if c.get("kind", "order") == "order":
                    self.store.set_child_status(c["order_id"], OrderStatus.REJECTED.value, err)
                    if self.risk_gate is not None:
                        self.risk_gate.on_order_failed(c["order_id"])
                self.store.audit([{"action": "reject", "parent_id": rec["_id"], "account": c["account"],
                                   "child_id": c["order_id"], "detail": err}])
                self.report_reject(c["account"], "account", err, order_id=c["order_id"], routing_key=c["routing_key"])

    # cancels ------------------------------------------------------------------------------
    def _on_cancel(self, cancel: Cancel, delivery: Any, body: bytes) -> None:
        mid = delivery.message_id or "sha1:" + hashlib.sha1(body).hexdigest()  # noqa: S324
        key = f"cancel:{mid}"
        rec = self.store.get_processed(key)
        if rec is None:
            self.counts["cancels"] += 1
            cancels = route_cancel(cancel, self.rules, self.groups,
                                   children_of={cancel.order_id: c} if (c := self.store.children_of(cancel.order_id))
                                   is not None else None)
            cancels = [msgspec.structs.replace(c, id=f"{c.order_id}/x/{mid}"[:128].replace(" ", "_")) for c in cancels]
            rec, _ = self.store.plan_processed({"_id": key, "kind": "cancel", "order_id": cancel.order_id,
                                                "state": "planned", "received_ns": time.time_ns(),
                                                "children": [self._child_entry(c, c.account, "cancel") for c in cancels]})
            self.store.audit([{"action": "cancel", "parent_id": cancel.order_id, "account": c.account,
                               "child_id": c.order_id, "detail": c.reason} for c in cancels])
            for c in cancels:
                self.store.set_child_status(c.order_id, OrderStatus.PENDING_CANCEL.value, c.reason)
        if rec.get("state") == "planned":
            self._publish_children("processed", rec)
            self.store.finish("processed", key, "done")

    # risk ---------------------------------------------------------------------------------
    def _risk_channel(self) -> Any:
        conn = self.connection.ensure()
        if self._risk_ch is None or not self._risk_ch.is_open or self._risk_gen != self.connection.generation:
            ch = conn.channel()
            declare_queue_sync(ch, self.topo.router_risk)
            self._risk_ch, self._risk_gen = ch, self.connection.generation
        return self._risk_ch

    def poll_risk(self, limit: int = 100) -> int:
        """Handle what waits on the risk queue (basic_get); returns how many were handled."""
        self._last_risk = time.monotonic()
        ch = self._risk_channel()
        if self.risk_gate is not None:
            self.risk_gate.attach(self.connection)   # its bounded report/tick queue on this connection
        n = 0
        while n < limit:
            method, props, body = ch.basic_get(self.topo.router_risk.name, auto_ack=False)
            if method is None:
                break
            n += 1
            try:
                self.on_risk(body, props, method.routing_key)
            except handling.Reject as exc:
                self._dead_letter(body, props, method, str(exc))
                ch.basic_ack(method.delivery_tag)
            except Exception as exc:  # noqa: BLE001
                log.error("risk command failed, requeued: %s", exc, exc_info=True)
                ch.basic_nack(method.delivery_tag, requeue=True)
                break
            else:
                ch.basic_ack(method.delivery_tag)
        return n

    def _dead_letter(self, body: bytes, props: Any, method: Any, reason: str) -> None:
        from qapubsub.sync import Unroutable, properties_dict

        p = properties_dict(props)
        p["headers"] = handling.dead_letter_headers(props.headers, reason=reason, exchange=method.exchange,
                                                    routing_key=method.routing_key, queue=self.topo.router_risk.name,
                                                    attempts=1)
        p.pop("user_id", None)   # the broker refuses another user's id on our connection
        try:
            self.exec_pub.publish(self.topo.dlx, method.routing_key, body, properties=p)
        except Unroutable:
            log.error("dead-letter exchange has no queue; dropping: %s", reason)
        log.error("risk command dead-lettered: %s", reason, extra={"routing_key": method.routing_key})

    def on_risk(self, body: bytes, props: Any, routing_key: str) -> None:
        try:
            cmd = decode(body, ForceClose | Release)
        except DecodeError as exc:
            self.store.audit([{"action": "refused", "parent_id": "", "account": routing_key, "detail": str(exc)}])
            raise handling.Reject(str(exc)) from None
        kind = "forceclose" if isinstance(cmd, ForceClose) else "release"
        user = getattr(props, "user_id", None)
        if user != self.settings.risk_user:
            reason = (f"{kind} {cmd.command_id} refused: AMQP user_id {user!r} is not the risk identity "
                      f"{self.settings.risk_user!r}")
            self.store.audit([{"action": "refused", "parent_id": cmd.command_id, "account": cmd.account,
                               "detail": reason}])
            self.report_reject(cmd.account, "user_id", reason, order_id=cmd.command_id, routing_key=routing_key)
            raise handling.Reject(reason)
        if isinstance(cmd, Release):
            self._on_release(cmd)
        else:
            self._on_force_close(cmd)

    def _on_release(self, cmd: Release) -> None:
        key = f"release:{cmd.command_id}"
        if self.store.get_processed(key) is not None:
            return
        self.store.set_reduce_only(cmd.account, False, command_id=cmd.command_id, reason=cmd.reason,
                                   operator=cmd.operator)
        self.reduce_only.discard(cmd.account)
        if self.risk_gate is not None:
            self.risk_gate.release(cmd.account)
        self.store.audit([{"action": "release", "parent_id": cmd.command_id, "account": cmd.account,
                           "detail": f"released by {cmd.operator}: {cmd.reason}"}])
        self.store.plan_processed({"_id": key, "kind": "release", "state": "done", "children": []})

    def _on_force_close(self, cmd: ForceClose) -> None:
        from qamarket.store import TickStore

        key = f"forceclose:{cmd.command_id}"
        rec = self.store.get_processed(key)
        if rec is None:
            self.counts["forceclose"] += 1
            self.store.set_reduce_only(cmd.account, True, command_id=cmd.command_id, reason=cmd.reason,
                                       operator=cmd.operator)
            self.reduce_only.add(cmd.account)
            if self.risk_gate is not None:
                self.risk_gate.force_close(cmd.account, f"force-close {cmd.command_id}: {cmd.reason}")
            working = [msgspec.convert(d["order"], Order) for d in self.store.working_children(cmd.account)
                       if d.get("order")]
            positions = self.store.positions(cmd.account)
            ticks = TickStore(self.db, create_indexes=False)
            quotes = {}
            for p in positions:
                t = ticks.last_tick(p.exchange, p.symbol)
                if t is not None:
                    quotes[f"{p.exchange}.{p.symbol}"] = t
            plan = plan_force_close(cmd, positions, working, quotes, self.instruments,  # type: ignore[arg-type]
                                    mode=self.price_mode, now_ns=time.time_ns())
            children = ([self._child_entry(c, c.account, "cancel") for c in plan.cancels] +
                        [self._child_entry(o, o.account) for o in plan.orders])
            rec, fresh = self.store.plan_processed({"_id": key, "kind": "forceclose", "account": cmd.account,
                                                    "command_id": cmd.command_id, "state": "planned",
                                                    "received_ns": time.time_ns(), "children": children})
            if fresh:
                self.store.audit([{"action": "forceclose", "parent_id": cmd.command_id, "account": cmd.account,
                                   "detail": f"accepted from {cmd.operator}: {cmd.reason}; reduce-only until release; "
                                             f"{len(plan.cancels)} cancels, {len(plan.orders)} orders, "
                                             f"{len(plan.skipped)} skipped"}, *plan.audit])
                for c in plan.cancels:
                    self.store.set_child_status(c.order_id, OrderStatus.PENDING_CANCEL.value, c.reason)
                self.store.save_children([self._child_doc(o) for o in plan.orders])
        if rec.get("state") == "planned":
            self._publish_children("processed", rec)   # cancels first, then the flattening orders
            self.store.finish("processed", key, "done")

    # running ------------------------------------------------------------------------------
    def run(self) -> None:
        self.consumer.run()

    def stop(self) -> None:
        self.consumer.stop()

    def run_until_signal(self) -> int:
        return self.consumer.run_until_signal()


def _make_consumer_class() -> type:
    from qapubsub.sync import Consumer

    class RouterConsumer(Consumer):  # type: ignore[misc]
        """The orders consumer; its loop also serves the risk queue and the bindings (Router.idle)."""

        def __init__(self, router: Router, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.router = router

        def _maybe_flush_acks(self) -> None:
            super()._maybe_flush_acks()
            if self.ready.is_set():
                self.router.idle()

    return RouterConsumer


def _RouterConsumer(router: Router, *args: Any, **kw: Any) -> Any:  # noqa: N802
    return _make_consumer_class()(router, *args, **kw)


# CLI ----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Order router: consumes qaorder / QAORDER_ROUTER orders and qarisk commands, "
                          "routes (groups, copy-trade, force-close) and publishes child orders to qa.exec.")
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--no-risk-rules", action="store_true",
                        help="skip the pre-trade rules (risk_configs); force-close still applies")


def run(args: argparse.Namespace) -> int:
    import pymongo

    from handlers.cli import CannotConnect
    from qapubsub.settings import redact_url
    from qapubsub.sync import Connection, TransportError

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    client = pymongo.MongoClient(settings.mongo_url, serverSelectionTimeoutMS=3000)
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001
        raise CannotConnect(f"MongoDB at {redact_url(settings.mongo_url)}: {exc}") from None
    conn = Connection(settings, client_name="qaflow-router", max_retries=2)
    try:
        conn.ensure()
    except TransportError as exc:
        raise CannotConnect(str(exc)) from None
    conn.max_retries = None   # once up, reconnect forever
    gate = None
    if not args.no_risk_rules:
        from handlers.risk import RiskGate

        gate = RiskGate(client[settings.mongo_db], topo)
    router = Router(settings, topo, client[settings.mongo_db], connection=conn, risk_check=gate)
    log.info("router started", extra={"namespace": topo.namespace})
    try:
        return router.run_until_signal()
    finally:
        client.close()


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow router"))
