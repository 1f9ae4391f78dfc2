"""QMT executor: ``qa.exec`` (one account) -> MiniQMT ``XtQuantTrader`` -> ``qa.report``.

::

    qaflow broker qmt --account A --qmt-path 'D:/国金QMT/userdata_mini' --qmt-account 8881234567

* Session: ``XtQuantTrader(path, session_id)`` + a ``XtQuantTraderCallback`` subclass,
  ``start()``, ``connect()`` (0 = ok), ``subscribe(StockAccount)`` (0 = ok).
* On start and after every reconnect: today's orders and trades are rebuilt from
  ``query_stock_orders`` / ``query_stock_trades`` (linked to ours by ``order_remark``) and the
  positions from ``query_stock_positions`` BEFORE new orders are accepted.
* Orders: ``order_stock_async(account, "600000.SH", STOCK_BUY|STOCK_SELL, volume, FIX_PRICE,
  price, "qaflow", remark)``; ``remark`` links the QMT order to ours (our order id, or a
  20-character digest of it when longer than 20 characters). The record (with the remark)
  is in MongoDB before the call, the ``seq`` after it, both before the ack.
  Limit orders by default; MARKET -> SSE/SZSE best-five-then-cancel (42/47), rejected on BSE;
  FAK/FOK rejected (no limit IOC in QMT's price types). BUY in lots (100; 200/1 on STAR 688;
  100/1 on BSE); SELL only with offset CLOSE/CLOSEYESTERDAY and at most ``can_use_volume``
  (T+1: today's buys are not sellable).
* Callbacks (xtquant's thread) only enqueue; one report thread maps, applies through
  :mod:`qaorder.state`, persists, publishes. ``on_disconnected`` -> orders rejected; the
  supervisor builds a new session after 5 s, 10 s, 30 s, then every 60 s.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from qaorder.models import Cancel, Direction, Offset, Order, OrderStatus, OrderStatusReport, PriceType, Reject, Trade
from qaorder.state import ORDER_STATE_TABLE, InvalidTransition, OrderEvent, OrderState
from qapubsub import keys
from qapubsub.messages import Message, encode
from qapubsub.topology import Topology

from brokers.ctp.td_store import LOCAL, SENDING, SENT, Leg, MemoryStore, MongoStore, OrderRecord
from brokers.gateway import RECONNECT_DELAYS, STOP, GatewayExecutor

from . import codes as c

log = logging.getLogger(__name__)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3
_EVENT_OF = {
    OrderStatus.SUBMITTING: OrderEvent.SUBMITTED, OrderStatus.NOTTRADED: OrderEvent.ACCEPTED,
    OrderStatus.PARTTRADED: OrderEvent.PART_FILLED, OrderStatus.ALLTRADED: OrderEvent.FILLED,
    OrderStatus.CANCELLED: OrderEvent.CANCELLED, OrderStatus.REJECTED: OrderEvent.REJECTED,
}


def remark_for(order_id: str) -> str:
    return order_id if len(order_id) <= 20 else hashlib.sha1(order_id.encode()).hexdigest()[:20]  # noqa: S324


class QmtExecutor(GatewayExecutor):
    gateway_label = "QMT"

    def __init__(self, account: str, qmt_path: str, qmt_account: str, store: Any, *, xt: Any = None,
                 topology: Topology | None = None, session_id: int | None = None,
                 reconnect_delays: Sequence[float] = RECONNECT_DELAYS, clock: Callable[[], int] = time.time_ns) -> None:
        keys.exec_key(account)
        self.account, self.qmt_path, self.qmt_account = account, qmt_path, qmt_account
        self.store, self.topo, self.clock = store, topology or Topology(), clock
        self.xt = xt
        self.session_id = session_id or int(time.time()) % 1_000_000_000
        self.reconnect_delays = tuple(reconnect_delays)
        self.trader: Any = None
        self.xt_account: Any = None
        self.lock = threading.RLock()
        self.events: queue.Queue[Any] = queue.Queue()
        self.records: dict[str, OrderRecord] = {}
        self.by_xt: dict[str, str] = {}         # QMT order_id -> our order id
        self.by_remark: dict[str, str] = {}
        self.by_seq: dict[int, str] = {}
        self.positions: dict[str, Any] = {}     # xt code -> XtPosition
        self.dirty: set[str] = set()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.counts = {k: 0 for k in ("orders", "rejected_local", "reports", "trades", "duplicates", "foreign",
                                      "invalid", "handler_errors", "publish_retries", "disconnects", "sessions",
                                      "reconnect_attempts")}
        for d in store.load(account):
            rec = OrderRecord.from_doc(d)
            self.records[rec.order_id] = rec
            leg = rec.legs[0] if rec.legs else None
            if leg is not None:
                self.by_remark[leg.orderid] = rec.order_id
                if leg.vt_orderid:
                    self.by_xt[leg.vt_orderid] = rec.order_id

    # reports (saved and published by GatewayExecutor._commit) --------------------------------
    def _report(self, rec: OrderRecord, force: bool = False, reason: str = "") -> list[Message]:
        leg, st, o = rec.legs[0], rec.state, rec.order
        traded = max(st.filled_by_trades, leg.traded, st.reported_traded)
        status = OrderStatus.ALLTRADED if traded >= o.volume else leg.status
        if status is OrderStatus.NOTTRADED and traded:
            status = OrderStatus.PARTTRADED
        r = OrderStatusReport(id=f"{o.order_id}.qmt.r{rec.reports + 1}", ts=self.clock(), order_id=o.order_id,
                              account=self.account, status=status, traded=traded if status is not OrderStatus.REJECTED
                              else 0, avg_price=st.avg_price, volume=o.volume, reason=(reason or st.reason)[:512],
                              exchange_order_id=leg.vt_orderid or None, symbol=o.symbol, exchange=o.exchange)
        try:
            applied = st.apply_report(r)
        except InvalidTransition as exc:
            self.counts["invalid"] += 1
            log.error("QMT report not applied: %s", exc)
            return []
        if applied.changed or force:
            rec.reports += 1
            return [r]
        st._seen_reports.discard(r.id)  # noqa: SLF001 - the id is reused by the next report
        return []

    def _reject_local(self, rec: OrderRecord, field: str, reason: str, publisher: Any) -> None:
        rec.sent = LOCAL
        if rec.legs:
            rec.legs[0].status = OrderStatus.REJECTED
        else:
            rec.legs = [Leg(offset=rec.order.offset.value, volume=rec.order.volume, type="LIMIT", price=0.0,
                            status=OrderStatus.REJECTED)]
        self.counts["rejected_local"] += 1
        events = self._report(rec, force=True, reason=reason)
        events.append(Reject(id=f"{rec.order_id}.qmt.reject", ts=self.clock(), account=self.account, field=field,
                             reason=reason[:512], order_id=rec.order_id))
        log.warning("order rejected: %s: %s", field, reason, extra={"order_id": rec.order_id})
        self._commit(rec, events, publisher)

    # commands -----------------------------------------------------------------------------
    def _check(self, o: Order) -> tuple[str, int, int, float]:
        """-> (xt code, order_type, price_type, price); raises ValueError(field, reason)."""
        code = c.to_xt_code(o.exchange.value, o.symbol)
        if o.direction is Direction.BUY:
            if o.offset is not Offset.OPEN:
                raise ValueError("offset", "a stock BUY opens (offset OPEN)")
            lo, step = c.lot_rule(o.exchange.value, o.symbol)
            if o.volume < lo or (o.volume - lo) % step:
                raise ValueError("volume", f"BUY {o.volume} of {code}: at least {lo}, in steps of {step}")
        else:
            if o.offset not in (Offset.CLOSE, Offset.CLOSEYESTERDAY):
                raise ValueError("offset", "a stock SELL closes yesterday's shares (offset CLOSE); T+1: "
                                           "nothing bought today can be sold")
            pos = self.positions.get(code)
            can_use = int(getattr(pos, "can_use_volume", 0) or 0)
            held = sum(r.legs[0].left for r in self.records.values() if r.legs and not r.state.status.is_terminal
                       and r.order.direction is Direction.SELL and c.to_xt_code(r.order.exchange.value,
                                                                                r.order.symbol) == code)
            if o.volume > can_use - held:
                raise ValueError("volume", f"SELL {o.volume} of {code} but only {max(can_use - held, 0)} sellable "
                                           f"(T+1; working sells held back)")
        if o.price_type is PriceType.LIMIT:
            return code, c.STOCK_BUY if o.direction is Direction.BUY else c.STOCK_SELL, c.FIX_PRICE, float(o.price or 0)
        if o.price_type is PriceType.MARKET and o.exchange.value in ("SSE", "SZSE"):
            pt = c.MARKET_SH_CONVERT_5_CANCEL if o.exchange.value == "SSE" else c.MARKET_SZ_CONVERT_5_CANCEL
            return code, c.STOCK_BUY if o.direction is Direction.BUY else c.STOCK_SELL, pt, float(o.price or 0)
        raise ValueError("price_type", f"{o.price_type.value} is not supported by QMT on {o.exchange.value} "
                                       f"(LIMIT; MARKET on SSE/SZSE)")

    def on_order(self, order: Order, publisher: Any) -> None:
        with self.lock:
            self.counts["orders"] += 1
            rec = self.records.get(order.order_id)
            if rec is not None:
                if rec.outbox:
                    self._commit(rec, [], publisher)
                return
            rec = self.records[order.order_id] = OrderRecord(OrderState(order), self.account)
            if not self.ready.is_set():
                return self._reject_local(rec, "account", "QMT disconnected (or rebuilding today's orders): order "
                                                          "not sent", publisher)
            try:
                code, otype, ptype, price = self._check(order)
            except c.CodeError as exc:
                return self._reject_local(rec, "exchange", str(exc), publisher)
            except ValueError as exc:
                return self._reject_local(rec, exc.args[0], exc.args[1], publisher)
            remark = remark_for(order.order_id)
            rec.legs = [Leg(offset=order.offset.value, volume=order.volume, type=str(ptype), price=price, orderid=remark)]
            rec.sent = SENDING
            self.by_remark[remark] = order.order_id
            self.store.save(rec.to_doc())
            seq = self.trader.order_stock_async(self.xt_account, code, otype, order.volume, ptype, price, "qaflow",
                                                remark)
            if not isinstance(seq, int) or seq <= 0:
                return self._reject_local(rec, "order", f"order_stock_async refused the request ({seq})", publisher)
            self.by_seq[seq] = order.order_id
            rec.sent = SENT
            rec.legs[0].front_id = seq     # the request seq (until QMT's order_id arrives)
            self._commit(rec, self._report(rec, force=True), publisher)

    def on_cancel(self, cancel: Cancel, publisher: Any) -> None:
        with self.lock:
            rec = self.records.get(cancel.order_id)
            reason = ""
            if rec is None:
                reason = f"unknown order {cancel.order_id}"
            elif rec.state.status.is_terminal:
                reason = f"order {cancel.order_id} is already {rec.state.status.value}"
            elif not self.ready.is_set():
                reason = "QMT disconnected: cancel not sent"
            elif not rec.legs[0].vt_orderid:
                reason = f"order {cancel.order_id} has no QMT order id yet"
            if reason:
                r = Reject(id=f"{cancel.id}.reject", ts=self.clock(), account=cancel.account, field="order_id",
                           reason=reason, order_id=cancel.order_id)
                publisher.publish(self.topo.report, keys.report_key(self.account, "reject"), encode(r),
                                  properties={"message_id": r.id, "type": r.schema,
                                              "content_type": "application/json"}, mandatory=False)
                return
            assert rec is not None
            self.trader.cancel_order_stock_async(self.xt_account, int(rec.legs[0].vt_orderid))

    # callbacks (report thread) ----------------------------------------------------------------
    def _find(self, xt_order_id: Any, remark: Any = None) -> OrderRecord | None:
        oid = self.by_xt.get(str(xt_order_id))
        if oid is None and remark:
            oid = self.by_remark.get(str(remark))
            if oid is not None:
                self._link(oid, xt_order_id)
        return self.records.get(oid) if oid else None

    def _link(self, oid: str, xt_order_id: Any) -> None:
        rec = self.records[oid]
        rec.legs[0].vt_orderid = str(xt_order_id)
        rec.sent = SENT
        self.by_xt[str(xt_order_id)] = oid

    def _on_xt_order(self, o: Any, publisher: Any) -> None:
        rec = self._find(o.order_id, getattr(o, "order_remark", None))
        if rec is None:
            self.counts["foreign"] += 1
            return
        status = c.STATUS.get(int(o.order_status))
        if status is None:
            return
        leg = rec.legs[0]
        traded = int(o.traded_volume or 0)
        event = _EVENT_OF[status]
        if status is not OrderStatus.REJECTED and traded >= leg.volume:
            event = OrderEvent.FILLED
        nxt = ORDER_STATE_TABLE.get((leg.status, event))
        if not isinstance(nxt, OrderStatus):
            self.counts["invalid"] += 1
            return
        leg.status, leg.traded = nxt, max(leg.traded, traded)
        reason = str(getattr(o, "status_msg", "") or "") if status is OrderStatus.REJECTED else ""
        if reason:
            rec.state.reason = reason
        self._commit(rec, self._report(rec, reason=reason), publisher)

    def _on_xt_trade(self, t: Any, publisher: Any) -> None:
        rec = self._find(t.order_id, getattr(t, "order_remark", None))
        if rec is None:
            self.counts["foreign"] += 1
            return
        o = rec.order
        tid = f"{o.order_id}-{str(t.traded_id).strip()}"
        if len(tid) > 128:
            tid = f"{o.order_id[:100]}-{hashlib.sha1(tid.encode()).hexdigest()[:20]}"  # noqa: S324
        now = self.clock()
        ts = int(getattr(t, "traded_time", 0) or 0)
        trade = Trade(id=tid, ts=now, trade_id=tid, order_id=o.order_id, account=self.account, symbol=o.symbol,
                      exchange=o.exchange, direction=o.direction, offset=o.offset, price=float(t.traded_price),
                      volume=int(t.traded_volume), trade_time=ts * 1_000_000_000 if ts else now)
        try:
            applied = rec.state.apply_trade(trade)
        except InvalidTransition as exc:
            self.counts["invalid"] += 1
            log.error("QMT trade not applied: %s", exc)
            return
        if applied.duplicate:
            self.counts["duplicates"] += 1
            return
        leg = rec.legs[0]
        leg.filled += trade.volume
        if leg.filled > leg.traded:
            nxt = ORDER_STATE_TABLE.get((leg.status, OrderEvent.FILLED if leg.filled >= leg.volume
                                         else OrderEvent.PART_FILLED))
            if isinstance(nxt, OrderStatus):
                leg.status, leg.traded = nxt, leg.filled
        self._commit(rec, [trade, *self._report(rec, force=applied.changed)], publisher)

    def process(self, item: Any, publisher: Any) -> None:
        kind, data = item
        with self.lock:
            if kind == "async_response":
                oid = self.by_seq.get(int(data.seq)) or self.by_remark.get(str(getattr(data, "order_remark", "")))
                if oid is not None and data.order_id and int(data.order_id) > 0:
                    self._link(oid, data.order_id)
                    self.store.save(self.records[oid].to_doc())
            elif kind == "order":
                self._on_xt_order(data, publisher)
            elif kind == "trade":
                self._on_xt_trade(data, publisher)
            elif kind == "order_error":
                rec = self._find(data.order_id, getattr(data, "order_remark", None))
                if rec is None and getattr(data, "seq", None) is not None:
                    rec = self.records.get(self.by_seq.get(int(data.seq), ""))
                if rec is not None:
                    rec.legs[0].status = OrderStatus.REJECTED
                    reason = f"QMT order error {data.error_id}: {data.error_msg}"
                    rec.state.reason = reason
                    self._commit(rec, self._report(rec, reason=reason), publisher)
            elif kind == "cancel_error":
                oid = self.by_xt.get(str(data.order_id))
                log.error("QMT cancel error %s: %s", data.error_id, data.error_msg, extra={"order_id": oid})
                r = Reject(id=f"{oid or data.order_id}.qmt.cancel-error.{self.clock()}", account=self.account,
                           field="order_id", reason=f"QMT cancel error {data.error_id}: {data.error_msg}",
                           order_id=oid)
                publisher.publish(self.topo.report, keys.report_key(self.account, "reject"), encode(r),
                                  properties={"message_id": r.id, "type": r.schema,
                                              "content_type": "application/json"}, mandatory=False)

    # session --------------------------------------------------------------------------------
    def _callback(self) -> Any:
        ex = self

        class Callback(self.xt.xttrader.XtQuantTraderCallback):  # type: ignore[misc, name-defined]
            def on_disconnected(self) -> None:
                ex.ready.clear()
                ex.counts["disconnects"] += 1
                log.warning("QMT disconnected: orders are rejected until the session is rebuilt")

            def on_stock_order(self, order: Any) -> None:
                ex.events.put(("order", order))

            def on_stock_trade(self, trade: Any) -> None:
                ex.events.put(("trade", trade))

            def on_order_error(self, error: Any) -> None:
                ex.events.put(("order_error", error))

            def on_cancel_error(self, error: Any) -> None:
                ex.events.put(("cancel_error", error))

            def on_order_stock_async_response(self, response: Any) -> None:
                ex.events.put(("async_response", response))

        return Callback()

    def connect(self) -> bool:
        """A new session: start, connect, subscribe, then rebuild today's orders/trades/positions."""
        xt = self.xt
        self.counts["sessions"] += 1
        trader = xt.xttrader.XtQuantTrader(self.qmt_path, self.session_id + self.counts["sessions"] - 1)
        trader.register_callback(self._callback())
        trader.start()
        rc = trader.connect()
        if rc != 0:
            log.error("QMT connect() returned %s (is MiniQMT running and logged in?)", rc)
            trader.stop()
            return False
        acc = xt.xttype.StockAccount(self.qmt_account)
        if trader.subscribe(acc) != 0:
            log.error("QMT subscribe(%s) failed", self.qmt_account)
            trader.stop()
            return False
        self.trader, self.xt_account = trader, acc
        for o in trader.query_stock_orders(acc, False) or []:
            self.events.put(("order", o))
        for t in trader.query_stock_trades(acc) or []:
            self.events.put(("trade", t))
        self.events.join()          # rebuilt before new orders are accepted
        with self.lock:
            self.positions = {p.stock_code: p for p in trader.query_stock_positions(acc) or []}
        self.ready.set()
        log.info("QMT session ready", extra={"account": self.account, "orders": len(self.records)})
        return True

    def _connected(self) -> bool:
        return self.ready.is_set()

    def _reconnect(self) -> None:
        """A new session (the supervisor, while disconnected)."""
        self.connect()

    def start(self, publisher_factory: Callable[[], Any]) -> None:
        if self.xt is None:
            self.xt = c.load_xtquant()
        t = threading.Thread(target=self._report_loop, args=(publisher_factory,), daemon=True,
                             name=f"qaflow-qmt-reports-{self.account}")
        t.start()
        self._threads.append(t)
        self.connect()
        s = threading.Thread(target=self._supervise, daemon=True, name=f"qaflow-qmt-supervisor-{self.account}")
        s.start()
        self._threads.append(s)

    def drain(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.events.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.events.put(STOP)
        self.stopping.set()
        if self.trader is not None:
            try:
                self.trader.stop()
            except Exception:  # noqa: BLE001
                pass
        for t in self._threads:
            t.join(10)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account", required=True, help="the QAFlow account whose exec queue this process consumes")
    parser.add_argument("--qmt-path", required=True, help="MiniQMT's userdata_mini directory")
    parser.add_argument("--qmt-account", required=True, help="the stock (fund) account id in QMT")
    parser.add_argument("--session-id", type=int, default=None, help="XtQuantTrader session id (default: from the clock)")
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")


def run(args: argparse.Namespace) -> int:
    from qapubsub.settings import ConfigError, Settings, mongo_client
    from qapubsub.sync import Connection, Consumer, Publisher

    try:
        amqp = Settings.from_env()
        keys.exec_key(args.account)
        xt = c.load_xtquant()
    except (ConfigError, keys.KeyError_) as exc:
        print(f"qaflow broker qmt: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except c.XtquantMissing as exc:
        print(f"qaflow broker qmt: {exc}", file=sys.stderr)
        return EXIT_ERROR
    topo = Topology(amqp.namespace if args.namespace is None else args.namespace)
    try:

        client: Any = mongo_client(amqp.mongo_url)
        client.admin.command("ping")
        store = MongoStore(client[amqp.mongo_db], collection="qmt_orders")
    except Exception as exc:  # noqa: BLE001
        print(f"qaflow broker qmt: cannot connect to MongoDB: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    ex = QmtExecutor(args.account, args.qmt_path, args.qmt_account, store, xt=xt, topology=topo,
                     session_id=args.session_id)
    name = f"qaflow-broker-qmt-{args.account}"
    ex.start(lambda: Publisher(Connection(amqp, client_name=name + "-reports"), topology=topo))
    try:
        conn = Connection(amqp, client_name=name)
        pub = Publisher(conn, topology=topo)
        ex.flush_dirty(pub)

        def on_exec(msg: Any, _d: Any) -> None:
            (ex.on_order if isinstance(msg, Order) else ex.on_cancel)(msg, pub)

        return Consumer(conn, topo.exec_queue(args.account), on_exec, message_type=Order | Cancel, topology=topo,
                        prefetch=10).run_until_signal()
    finally:
        ex.stop()


__all__ = ["QmtExecutor", "MemoryStore", "MongoStore", "configure", "run", "remark_for"]
