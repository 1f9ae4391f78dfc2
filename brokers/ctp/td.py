"""CTP executor: ``qa.exec`` (one account) -> vn.py ``CtpGateway`` -> ``qa.report``.

One process per CTP account::

    qaflow broker ctp --account A --config /etc/qaflow/ctp-A.toml      # password: QA_CTP_PASSWORD

Threads::

    exec consumer (main):  Order/Cancel from the account's exec queue ─► on_order / on_cancel
                           (map -> persist SENDING -> gateway.send_order -> persist SENT + vt_orderid
                           -> publish -> ack), its own pika connection and Publisher
    vn.py EventEngine:     guarded handlers: order/trade/position/account events -> queue;
                           log texts -> connection state (login, contracts, disconnect)
    report thread:         queue ─► map, apply through qaorder.state, persist, publish
                           (its own pika connection and Publisher)
    supervisor:            while the trader front is not logged in, re-issue gateway.connect()
                           after 5 s, 10 s, 30 s, then every 60 s

Both the exec thread and the report thread work under one lock: an order event that vn.py
emits from inside ``send_order`` waits until the vt_orderid is recorded, so it always finds
its order. Every change of an order is written to MongoDB (``ctp_orders``, with the encoded
reports in an outbox) BEFORE its reports are published and BEFORE the exec message is acked.

Report ids are deterministic: ``<order_id>.ctp.r<n>`` (status), ``<order_id>-<EXCHANGE>-<tradeid>``
(trade = its message id), ``<order_id>.ctp.reject``. See docs/brokers.md for every decision.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qaorder.models import Cancel, Order, OrderStatus, OrderStatusReport, Reject, Trade
from qaorder.state import ORDER_STATE_TABLE, InvalidTransition, OrderEvent, OrderState
from qapubsub import keys
from qapubsub.messages import Message, encode
from qapubsub.topology import Topology

from brokers.gateway import RECONNECT_DELAYS, STOP, GatewayExecutor

from . import td_mapping as tm
from .md import guarded
from .settings import CtpSettings, SettingsError
from .td_store import LOCAL, SENDING, SENT, Leg, MemoryStore, MongoStore, OrderRecord

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3
#: ARBIG's reconnect policy: 5 s, 10 s, 30 s, then 60 s between attempts
_RECONCILE = "reconcile"

_EVENT_OF = {
    OrderStatus.SUBMITTING: OrderEvent.SUBMITTED, OrderStatus.NOTTRADED: OrderEvent.ACCEPTED,
    OrderStatus.PARTTRADED: OrderEvent.PART_FILLED, OrderStatus.ALLTRADED: OrderEvent.FILLED,
    OrderStatus.CANCELLED: OrderEvent.CANCELLED, OrderStatus.REJECTED: OrderEvent.REJECTED,
}


class CtpExecutor(GatewayExecutor):
    """The executor's core, without RabbitMQ consumers (``publisher`` objects are passed in).

    ``gateway_class`` (default ``vnpy_ctp.CtpGateway``), ``event_engine`` (default a guarded
    vn.py EventEngine), ``store`` (:class:`MongoStore` / :class:`MemoryStore`) and
    ``reconnect_delays`` are injectable for tests.
    """

    gateway_label = "CTP"

    def __init__(self, settings: CtpSettings, account: str, store: Any, *, topology: Topology | None = None,
                 gateway_class: type | None = None, event_engine: Any = None,
                 reconnect_delays: Sequence[float] = RECONNECT_DELAYS, clock: Callable[[], int] = time.time_ns) -> None:
        keys.exec_key(account)
        self.settings = settings
        self.account = account
        self.store = store
        self.topo = topology or Topology()
        self.gateway_name = settings.gateway_name
        self.reconnect_delays = tuple(reconnect_delays)
        self.clock = clock
        self._gateway_class = gateway_class
        self._event_engine = event_engine
        self._own_engine = False
        self.vn: Any = None
        self.gateway: Any = None
        self.event_engine: Any = None
        self.lock = threading.RLock()
        self.events: queue.Queue[Any] = queue.Queue()
        self.records: dict[str, OrderRecord] = {}
        self.by_vt: dict[str, tuple[str, int]] = {}
        self.positions = tm.PositionBook()
        self.account_data: dict[str, float] = {}
        self.dirty: set[str] = set()
        self.unmatched_trades: list[Any] = []
        # connection state (written by the EventEngine thread)
        self.logged_in = False
        self.ready = threading.Event()        # logged in and contracts known: orders may be sent
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # counters
        self.counts: dict[str, int] = {k: 0 for k in (
            "orders", "cancels", "sent_legs", "rejected_local", "rejected_disconnected", "order_events", "trade_events",
            "reports", "trades", "duplicates", "foreign", "invalid", "handler_errors", "logins", "disconnects",
            "reconnect_attempts", "reconciles", "publish_retries", "orphans_linked")}
        self._load()

    # persistence -------------------------------------------------------------------------
    def _load(self) -> None:
        for d in self.store.load(self.account):
            rec = OrderRecord.from_doc(d)
            self.records[rec.order_id] = rec
            for i, leg in enumerate(rec.legs):
                if leg.vt_orderid:
                    self.by_vt[leg.vt_orderid] = (rec.order_id, i)
        orphans = [r.order_id for r in self.records.values() if r.sent == SENDING]
        log.info("CTP order records restored", extra={"account": self.account, "orders": len(self.records),
                                                      "vt_orderids": len(self.by_vt), "orphans": orphans})
        if orphans:
            log.error("orders %s were being sent when the executor stopped: not sent again; they are linked to "
                      "the counter's orders of the same instrument/side/offset/price/volume when CTP replays them",
                      orphans, extra={"account": self.account})

    def orphans(self) -> list[OrderRecord]:
        return [r for r in self.records.values() if r.sent == SENDING]

    publish_all_pending = GatewayExecutor.flush_dirty

    # reports ----------------------------------------------------------------------------
    def _report(self, rec: OrderRecord, status: OrderStatus, traded: int, reason: str = "") -> OrderStatusReport:
        o = rec.order
        vts = ",".join(leg.vt_orderid for leg in rec.legs if leg.vt_orderid) or None
        return OrderStatusReport(id=f"{o.order_id}.ctp.r{rec.reports + 1}", ts=self.clock(), order_id=o.order_id,
                                 account=self.account, status=status, traded=traded, avg_price=rec.state.avg_price,
                                 volume=o.volume, reason=reason[:512], exchange_order_id=vts, symbol=o.symbol,
                                 exchange=o.exchange)

    def _apply_report(self, rec: OrderRecord, report: OrderStatusReport, force: bool = False) -> list[Message]:
        try:
            applied = rec.state.apply_report(report)
        except InvalidTransition as exc:
            self.counts["invalid"] += 1
            log.error("CTP report not applied: %s", exc, extra={"order_id": rec.order_id})
            return []
        if applied.changed or force:
            rec.reports += 1
            return [report]
        # not published: free the id for the next report (the state machine remembers seen ids)
        rec.state._seen_reports.discard(report.id)  # noqa: SLF001
        return []

    def _combined(self, rec: OrderRecord) -> tuple[OrderStatus, int, str]:
        """The parent order's status from its legs and fills."""
        st, legs, volume = rec.state, rec.legs, rec.order.volume
        traded = max(st.filled_by_trades, sum(leg.traded for leg in legs), st.reported_traded)
        rejected = [leg for leg in legs if leg.status is OrderStatus.REJECTED]
        reason = ""
        if rejected and len(legs) > 1:
            reason = "CTP rejected leg(s) " + ", ".join(f"{leg.offset} {leg.volume}" for leg in rejected)
        elif rejected:
            reason = "rejected by CTP (its error code and text are in the executor's log)"
        if traded >= volume:
            return OrderStatus.ALLTRADED, volume, ""
        if legs and all(leg.status.is_terminal for leg in legs):
            if traded == 0 and all(leg.status is OrderStatus.REJECTED for leg in legs):
                return OrderStatus.REJECTED, 0, reason
            return OrderStatus.CANCELLED, traded, reason or "cancelled"
        if traded > 0:
            return OrderStatus.PARTTRADED, traded, reason
        if any(leg.status in (OrderStatus.NOTTRADED, OrderStatus.PARTTRADED) for leg in legs):
            return OrderStatus.NOTTRADED, 0, reason
        return OrderStatus.SUBMITTING, 0, reason

    def _status_events(self, rec: OrderRecord, force: bool = False) -> list[Message]:
        status, traded, reason = self._combined(rec)
        return self._apply_report(rec, self._report(rec, status, traded, reason), force=force)

    def _reject_local(self, rec: OrderRecord, field: str, reason: str, publisher: Any) -> None:
        rec.sent = LOCAL
        self.counts["rejected_local"] += 1
        events: list[Message] = self._apply_report(rec, self._report(rec, OrderStatus.REJECTED, 0, reason), force=True)
        events.append(Reject(id=f"{rec.order_id}.ctp.reject", ts=self.clock(), account=self.account, field=field,
                             reason=reason[:512], order_id=rec.order_id))
        log.warning("order rejected: %s: %s", field, reason, extra={"order_id": rec.order_id, "account": self.account})
        self._commit(rec, events, publisher)

    # commands (exec consumer thread) -------------------------------------------------------
    def working_close(self) -> dict[tuple[str, str, str, str], int]:
        out: dict[tuple[str, str, str, str], int] = {}
        for rec in self.records.values():
            if rec.state.status.is_terminal:
                continue
            held = "SHORT" if tm.vn_direction(rec.order.direction) == "LONG" else "LONG"
            for leg in rec.legs:
                if leg.offset in ("CLOSETODAY", "CLOSEYESTERDAY") and leg.left > 0:
                    k = (rec.order.exchange.value, rec.order.symbol, held, leg.offset)
                    out[k] = out.get(k, 0) + leg.left
        return out

    def on_order(self, order: Order, publisher: Any) -> None:
        with self.lock:
            self.counts["orders"] += 1
            rec = self.records.get(order.order_id)
            if rec is not None:
                log.info("order seen before: not sent again", extra={"order_id": order.order_id, "sent": rec.sent})
                self._publish_outbox(rec, publisher)
                return
            rec = self.records[order.order_id] = OrderRecord(OrderState(order), self.account)
            if order.account != self.account:
                return self._reject_local(rec, "account", f"account {order.account!r} is not served by this "
                                                          f"executor ({self.account!r})", publisher)
            if not self.ready.is_set():
                self.counts["rejected_disconnected"] += 1
                state = "logged in, contracts not yet loaded" if self.logged_in else "disconnected"
                return self._reject_local(rec, "account", f"CTP trader front {state}: order not sent; "
                                                          f"send it again after the executor reconnects", publisher)
            try:
                specs = tm.legs_for(order, self.positions, self.working_close())
            except tm.MappingRejected as exc:
                return self._reject_local(rec, exc.field, exc.reason, publisher)
            rec.legs = [Leg(offset=s.offset, volume=s.volume, type=s.type, price=s.price) for s in specs]
            rec.sent = SENDING
            self.store.save(rec.to_doc())           # written before send_order is called
            vn = self.vn
            for i, (leg, s) in enumerate(zip(rec.legs, specs)):
                req = vn.OrderRequest(symbol=s.symbol, exchange=vn.Exchange[s.exchange],
                                      direction=vn.Direction[s.direction], type=vn.OrderType[s.type],
                                      volume=float(s.volume), price=s.price, offset=vn.Offset[s.offset],
                                      reference=f"qaflow:{order.order_id}")
                try:
                    vt = self.gateway.send_order(req)
                except Exception as exc:  # noqa: BLE001 - a gateway error rejects this leg
                    log.error("send_order raised %s: %s", type(exc).__name__, exc, extra={"order_id": order.order_id})
                    vt = ""
                if not vt:
                    leg.status = OrderStatus.REJECTED
                    continue
                self.counts["sent_legs"] += 1
                leg.vt_orderid = vt
                leg.orderid = vt.split(".", 1)[1] if "." in vt else vt
                for k, v in tm.parse_orderid(leg.orderid).items():
                    setattr(leg, k, v)
                self.by_vt[vt] = (order.order_id, i)
            rec.sent = SENT
            if all(leg.status is OrderStatus.REJECTED for leg in rec.legs):
                return self._reject_local(rec, "order", "the CTP API refused the request (send_order returned no "
                                                        "order id: flow control or not logged in; see the log)",
                                          publisher)
            status, traded, reason = self._combined(rec)
            events = self._apply_report(rec, self._report(rec, status, traded, reason), force=True)
            self._commit(rec, events, publisher)     # the id map is in MongoDB before the ack
            log.info("order sent", extra={"order_id": order.order_id,
                                          "vt_orderids": [leg.vt_orderid for leg in rec.legs]})

    def on_cancel(self, cancel: Cancel, publisher: Any) -> None:
        with self.lock:
            self.counts["cancels"] += 1
            rec = self.records.get(cancel.order_id)

            def reject(reason: str) -> Reject:
                return Reject(id=f"{cancel.id}.reject", ts=self.clock(), account=cancel.account, field="order_id",
                              reason=reason, order_id=cancel.order_id)

            if rec is None or rec.account != cancel.account:
                r = reject(f"unknown order {cancel.order_id}")
                publisher.publish(self.topo.report, keys.report_key(self.account, "reject"), encode(r),
                                  properties={"message_id": r.id, "type": r.schema, "content_type": "application/json"},
                                  mandatory=False)
                return
            if cancel.id in rec.cancel_ids:
                self._publish_outbox(rec, publisher)
                return
            events: list[Message] = []
            working = [leg for leg in rec.legs if leg.vt_orderid and not leg.status.is_terminal]
            if rec.state.status.is_terminal:
                events.append(reject(f"order {cancel.order_id} is already {rec.state.status.value}"))
            elif not self.ready.is_set():
                events.append(reject("CTP trader front disconnected: cancel not sent; send it again later"))
            elif not working:
                events.append(reject(f"order {cancel.order_id} has no working CTP order to cancel"))
            else:
                vn = self.vn
                for leg in working:
                    self.gateway.cancel_order(vn.CancelRequest(orderid=leg.orderid, symbol=rec.order.symbol,
                                                               exchange=vn.Exchange[rec.order.exchange.value]))
            rec.cancel_ids.append(cancel.id)
            self._commit(rec, events, publisher)

    # vn.py events (report thread) ---------------------------------------------------------
    def _locate(self, vt_orderid: str) -> tuple[OrderRecord, Leg] | None:
        loc = self.by_vt.get(vt_orderid)
        if loc is None:
            return None
        rec = self.records[loc[0]]
        return rec, rec.legs[loc[1]]

    def _link_orphan(self, data: Any) -> tuple[OrderRecord, Leg] | None:
        """After a crash between send_order and the SENT write: match the counter's order to the one
        unlinked leg with the same instrument, side, offset, price and volume."""
        try:
            key = (data.symbol, data.exchange.name, data.direction.name, data.offset.name, float(data.price),
                   int(data.volume))
        except AttributeError:
            return None
        cands = []
        for rec in self.orphans():
            for i, leg in enumerate(rec.legs):
                if not leg.vt_orderid and key == (rec.order.symbol, rec.order.exchange.value,
                                                  tm.vn_direction(rec.order.direction), leg.offset, float(leg.price),
                                                  leg.volume):
                    cands.append((rec, i))
        if len(cands) != 1:
            return None
        rec, i = cands[0]
        leg = rec.legs[i]
        leg.vt_orderid = data.vt_orderid
        leg.orderid = data.orderid
        for k, v in tm.parse_orderid(data.orderid).items():
            setattr(leg, k, v)
        self.by_vt[leg.vt_orderid] = (rec.order_id, i)
        if all(leg.vt_orderid for leg in rec.legs):
            rec.sent = SENT
        self.counts["orphans_linked"] += 1
        log.warning("orphan order linked to CTP order %s", leg.vt_orderid, extra={"order_id": rec.order_id})
        return rec, leg

    def _leg_step(self, rec: OrderRecord, leg: Leg, status: OrderStatus, traded: int) -> bool:
        event = _EVENT_OF[status]
        if status is not OrderStatus.REJECTED and traded >= leg.volume:
            event = OrderEvent.FILLED
        elif event in (OrderEvent.ACCEPTED, OrderEvent.SUBMITTED) and traded > 0:
            event = OrderEvent.PART_FILLED
        nxt = ORDER_STATE_TABLE.get((leg.status, event))
        if not isinstance(nxt, OrderStatus):
            self.counts["invalid"] += 1
            log.error("CTP order %s: %s after %s ignored", leg.vt_orderid, status.value, leg.status.value,
                      extra={"order_id": rec.order_id})
            return False
        leg.status = nxt
        leg.traded = max(leg.traded, traded)
        return True

    def _on_order_data(self, data: Any, publisher: Any) -> None:
        self.counts["order_events"] += 1
        found = self._locate(data.vt_orderid) or self._link_orphan(data)
        if found is None:
            self.counts["foreign"] += 1
            log.info("CTP order %s is not one of ours: ignored", data.vt_orderid)
            return
        rec, leg = found
        if self._leg_step(rec, leg, tm.status_of(data.status), int(data.traded)):
            events = self._status_events(rec)
            if events:
                self._commit(rec, events, publisher)
        if self.unmatched_trades:
            pending, self.unmatched_trades = self.unmatched_trades, []
            for t in pending:
                self._on_trade_data(t, publisher)

    def _on_trade_data(self, data: Any, publisher: Any) -> None:
        self.counts["trade_events"] += 1
        found = self._locate(data.vt_orderid)
        if found is None:
            if self.orphans():
                self.unmatched_trades.append(data)   # retried once an orphan is linked
            else:
                self.counts["foreign"] += 1
                log.info("CTP trade %s of order %s is not one of ours: ignored", data.tradeid, data.vt_orderid)
            return
        rec, leg = found
        o = rec.order
        tid = tm.trade_id(o.order_id, o.exchange.value, data.tradeid)
        now = self.clock()
        trade = Trade(id=tid, ts=now, trade_id=tid, order_id=o.order_id, account=self.account, symbol=o.symbol,
                      exchange=o.exchange, direction=tm.direction_of(data.direction),
                      offset=tm.offset_of(data.offset, tm.offset_of(leg.offset, o.offset)), price=float(data.price),
                      volume=int(data.volume), trade_time=tm.utc_ns(data.datetime, now))
        try:
            applied = rec.state.apply_trade(trade)
        except InvalidTransition as exc:
            self.counts["invalid"] += 1
            log.error("CTP trade not applied: %s", exc, extra={"order_id": o.order_id})
            return
        if applied.duplicate:
            self.counts["duplicates"] += 1
            return
        leg.filled += trade.volume
        if leg.filled > leg.traded:
            self._leg_step(rec, leg, OrderStatus.PARTTRADED if leg.filled < leg.volume else OrderStatus.ALLTRADED,
                           leg.filled)
        self.positions.on_fill(o.exchange.value, o.symbol, tm.vn_direction(o.direction), trade.offset.value,
                               trade.volume)
        # the fill itself moved the state (PARTTRADED / ALLTRADED): say so in a status report too
        self._commit(rec, [trade, *self._status_events(rec, force=applied.changed)], publisher)

    def _on_position(self, data: Any) -> None:
        self.positions.on_position(data.exchange.name, data.symbol, data.direction.name, data.volume,
                                   data.yd_volume, getattr(data, "frozen", 0))

    def process(self, item: Any, publisher: Any) -> None:
        """Handle one queued vn.py event (report thread)."""
        kind, data = item
        with self.lock:
            if kind == self.vn.EVENT_ORDER:
                self._on_order_data(data, publisher)
            elif kind == self.vn.EVENT_TRADE:
                self._on_trade_data(data, publisher)
            elif kind == self.vn.EVENT_POSITION:
                self._on_position(data)
            elif kind == self.vn.EVENT_ACCOUNT:
                self.account_data = {"balance": float(data.balance), "frozen": float(data.frozen),
                                     "available": float(getattr(data, "available", 0.0))}
            elif kind == _RECONCILE:
                self.counts["reconciles"] += 1
                orphans = [r.order_id for r in self.orphans()]
                working = [r.order_id for r in self.records.values() if not r.state.status.is_terminal]
                log.info("CTP reconnected: replayed orders and trades are applied idempotently",
                         extra={"account": self.account, "working": working, "orphans": orphans})

    # vn.py side (EventEngine thread) ---------------------------------------------------------
    def _on_handler_error(self, name: str, exc: BaseException) -> None:
        self.counts["handler_errors"] += 1
        log.error("CTP handler %s raised %s: %s (the executor goes on)", name, type(exc).__name__, exc, exc_info=exc)

    def _enqueue(self, event: Any) -> None:
        if getattr(event.data, "gateway_name", self.gateway_name) != self.gateway_name:
            return
        self.events.put((event.type, event.data))

    def _on_log(self, event: Any) -> None:
        from . import td_vnpy
        from . import vnpy_compat as vc

        rec = event.data
        if getattr(rec, "gateway_name", None) != self.gateway_name:
            return
        msg = str(getattr(rec, "msg", ""))
        if msg.startswith(vc.TD_LOGIN_OK):
            self.logged_in = True
            self.counts["logins"] += 1
            log.info("CTP trader front logged in (#%d)", self.counts["logins"], extra={"account": self.account})
        elif msg.startswith(vc.CONTRACTS_OK):
            if self.logged_in and not self.ready.is_set():
                self.ready.set()
                log.info("CTP ready: contracts loaded; querying positions and account, reconciling",
                         extra={"account": self.account})
                for q in ("query_position", "query_account"):
                    try:
                        getattr(self.gateway, q)()
                    except Exception as exc:  # noqa: BLE001
                        log.warning("%s failed: %s", q, exc)
                self.events.put((_RECONCILE, None))
        elif msg.startswith(vc.TD_DISCONNECTED):
            self.logged_in = False
            self.ready.clear()
            self.counts["disconnects"] += 1
            log.warning("CTP trader front disconnected (%s): new orders are rejected until it is back", msg,
                        extra={"account": self.account})
        elif msg.startswith((vc.TD_LOGIN_FAILED, vc.TD_AUTH_FAILED, td_vnpy.ORDER_INSERT_FAILED,
                             td_vnpy.CANCEL_FAILED)):
            log.error("CTP: %s", msg, extra={"account": self.account})
        else:
            log.info("CTP: %s", msg, extra={"account": self.account})

    def _connected(self) -> bool:
        return self.logged_in

    def _reconnect(self) -> None:
        """Re-issue gateway.connect() (the supervisor, while the trader front is not logged in)."""
        self.gateway.connect(self.settings.vnpy_setting())

    def _on_process_error(self, item: Any, exc: Exception) -> None:
        # not an I/O failure: a vn.py object we could not map; report it, go on
        self._on_handler_error(f"process:{item[0]}", exc)

    # life cycle ------------------------------------------------------------------------------
    def start(self, publisher_factory: Callable[[], Any]) -> None:
        """Import vn.py, start the report thread, the engine, the supervisor; connect the gateway."""
        from . import td_vnpy, vnpy_compat

        self.vn = vn = td_vnpy.load()
        gateway_class = self._gateway_class or td_vnpy.ctp_gateway_class()
        if self._event_engine is None:
            self._event_engine = vnpy_compat.guarded_engine_class(self._on_handler_error)()
            self._own_engine = True
        self.event_engine = ee = self._event_engine
        for et in (vn.EVENT_ORDER, vn.EVENT_TRADE, vn.EVENT_POSITION, vn.EVENT_ACCOUNT):
            ee.register(et, guarded(self._enqueue, self._on_handler_error, f"enqueue:{et}"))
        ee.register(vn.EVENT_LOG, guarded(self._on_log, self._on_handler_error, "on_log"))
        t = threading.Thread(target=self._report_loop, args=(publisher_factory,),
                             name=f"qaflow-ctp-reports-{self.account}", daemon=True)
        t.start()
        self._threads.append(t)
        if self._own_engine:
            ee.start()
        self.gateway = gateway_class(ee, self.gateway_name)
        log.info("starting CTP executor: %s", self.settings.describe(), extra={"account": self.account})
        self.gateway.connect(self.settings.vnpy_setting())
        s = threading.Thread(target=self._supervise, name=f"qaflow-ctp-supervisor-{self.account}", daemon=True)
        s.start()
        self._threads.append(s)

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until vn.py's queue and ours are empty and processed (tests)."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            engine_q = getattr(self.event_engine, "_queue", None)
            idle = (engine_q is None or engine_q.empty()) and self.events.unfinished_tasks == 0
            quiet = quiet + 1 if idle else 0
            if quiet >= 3:
                return True
            time.sleep(0.01)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.stopping.is_set():
            return
        if self.event_engine is not None:
            if self._own_engine:
                self.event_engine.stop()
            elif self.gateway is not None and hasattr(self.gateway, "process_timer_event"):
                try:
                    self.event_engine.unregister(self.vn.EVENT_TIMER, self.gateway.process_timer_event)
                except Exception:  # noqa: BLE001
                    pass
        if self.gateway is not None:
            try:
                self.gateway.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the CTP gateway: %s", exc)
        self.events.put(STOP)
        self.stopping.set()
        for t in self._threads:
            t.join(timeout)
        log.info("CTP executor stopped", extra={"account": self.account, **self.counts})


# settings from a file + the environment ------------------------------------------------------
FILE_KEYS = ("userid", "broker_id", "td_front", "md_front", "app_id", "environment", "gateway_name")
SECRET_KEYS = ("password", "auth_code")


def load_settings(path: str | None, env: Mapping[str, str] | None = None, **overrides: Any) -> CtpSettings:
    """``QA_CTP_*`` from the environment, overridden by the TOML file's ``[ctp]`` table (or its top
    level), overridden by ``overrides``. The password and auth code come from the environment only."""
    values: dict[str, Any] = {}
    if path:
        import tomllib

        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read the CTP config file {path}: {exc}") from None
        table = data.get("ctp", data)
        for k in SECRET_KEYS:
            if k in table:
                raise SettingsError(f"{path}: '{k}' may not be in a file; set QA_CTP_{k.upper()} in the environment")
        unknown = set(table) - set(FILE_KEYS) - {"account"}
        if unknown:
            raise SettingsError(f"{path}: unknown keys {', '.join(sorted(unknown))} (expected {', '.join(FILE_KEYS)})")
        values = {k: str(v) for k, v in table.items() if k in FILE_KEYS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CtpSettings.from_env(env, **values)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account", required=True, help="the account whose exec queue this process consumes")
    parser.add_argument("--config", default=None, help="TOML file: userid, broker_id, td_front, md_front, app_id, "
                                                       "environment, gateway_name (secrets: environment only)")
    parser.add_argument("--env", choices=("production", "test"), default=None, help="CTP counter environment")
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--start-timeout", type=float, default=60.0,
                        help="seconds to wait for the CTP login before consuming orders (then rejected until ready)")


def run(args: argparse.Namespace) -> int:
    from qapubsub.settings import ConfigError, Settings, mongo_client, redact_url
    from qapubsub.sync import Connection, Consumer, FatalError, Publisher, TransportError

    from .vnpy_compat import VnpyMissing

    try:
        settings = load_settings(args.config, environment=args.env)
        amqp = Settings.from_env()
        keys.exec_key(args.account)
    except (SettingsError, ConfigError, keys.KeyError_) as exc:
        print(f"qaflow broker ctp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    topo = Topology(amqp.namespace if args.namespace is None else args.namespace)
    try:

        client: Any = mongo_client(amqp.mongo_url)
        client.admin.command("ping")
        store = MongoStore(client[amqp.mongo_db])
    except Exception as exc:  # noqa: BLE001
        print(f"qaflow broker ctp: cannot connect to MongoDB: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    ex = CtpExecutor(settings, args.account, store, topology=topo)
    try:
        boot = Connection(amqp, max_retries=0, client_name=f"qaflow-broker-ctp-{args.account}")
        ch = boot.channel()
        topo.declare_sync(ch, queues=[topo.dead_letters, topo.account_reports, topo.exec_queue(args.account)])
        n = ex.flush_dirty(Publisher(boot, topology=topo))
        if n:
            log.info("re-published the unconfirmed reports of %d orders", n)
        boot.close()
    except (FatalError, TransportError, OSError) as exc:
        print(f"qaflow broker ctp: cannot connect to RabbitMQ {redact_url(amqp.amqp_urls[0])}: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    client_name = f"qaflow-broker-ctp-{args.account}"
    try:
        ex.start(lambda: Publisher(Connection(amqp, client_name=client_name + "-reports"), topology=topo))
    except VnpyMissing as exc:
        print(f"qaflow broker ctp: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if not ex.ready.wait(args.start_timeout):
            log.warning("CTP not ready after %.0f s: consuming; orders are rejected until it is", args.start_timeout)
        conn = Connection(amqp, client_name=client_name)
        pub = Publisher(conn, topology=topo)

        def on_exec(msg: Any, _d: Any) -> None:
            if isinstance(msg, Order):
                ex.on_order(msg, pub)
            else:
                ex.on_cancel(msg, pub)

        consumer = Consumer(conn, topo.exec_queue(args.account), on_exec, message_type=Order | Cancel,
                            topology=topo, prefetch=10)
        return consumer.run_until_signal()
    finally:
        ex.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qaflow broker ctp", description="CTP executor (vnpy_ctp): qa.exec -> CTP")
    configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("QA_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    return run(args)


__all__ = ["CtpExecutor", "MemoryStore", "MongoStore", "load_settings", "configure", "run", "main", "RECONNECT_DELAYS"]

if __name__ == "__main__":
    raise SystemExit(main())
