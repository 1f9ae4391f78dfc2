"""What the real-broker executors (CTP: :mod:`brokers.ctp.td`, QMT: :mod:`brokers.qmt.executor`)
share: the report outbox and the two threads around the gateway.

* The gateway's callbacks (vn.py's EventEngine thread, xtquant's callback thread) only put
  events on ``events``. ONE report thread (:meth:`GatewayExecutor._report_loop`) takes them in
  order and applies them (``process``, the subclass's mapping).
* A record's new reports go into its outbox, the record is saved with it, the reports are
  published (confirmed) and the outbox cleared (:meth:`GatewayExecutor._commit`). If saving or
  publishing fails, the record stays in ``dirty`` and the report thread retries with back-off
  until it works (:meth:`GatewayExecutor.flush_dirty`, also at start-up): a report is never
  lost, and one sent again keeps its id (consumers deduplicate).
* A supervisor thread (:meth:`GatewayExecutor._supervise`) reconnects the gateway while it is
  not connected: after ``reconnect_delays`` (5 s, 10 s, 30 s, then every 60 s by default).

A subclass sets the attributes listed on the class and implements ``process``,
``_connected`` and ``_reconnect``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from qaorder.models import OrderStatusReport, Trade
from qapubsub import keys
from qapubsub.messages import Message, encode
from qapubsub.topology import Topology

log = logging.getLogger(__name__)

RECONNECT_DELAYS: tuple[float, ...] = (5.0, 10.0, 30.0, 60.0)
#: put on ``events`` to end the report thread
STOP = object()


def kind_of(msg: Message) -> str:
    """The report kind of an outgoing message: its routing key is ``<account>.<kind>``."""
    return "trade" if isinstance(msg, Trade) else "order" if isinstance(msg, OrderStatusReport) else "reject"


class GatewayExecutor:
    """The shared part of a gateway executor (see the module doc)."""

    #: the gateway's name in log lines ("CTP", "QMT")
    gateway_label = "gateway"
    account: str
    store: Any                     # save(doc), clear_outbox([order ids]), load(account)
    topo: Topology
    lock: threading.RLock
    events: queue.Queue[Any]
    records: dict[str, Any]        # order id -> brokers.ctp.td_store.OrderRecord
    dirty: set[str]                # records whose save or publish has not completed
    counts: dict[str, int]         # with trades, reports, handler_errors, publish_retries, reconnect_attempts
    stopping: threading.Event
    reconnect_delays: tuple[float, ...]

    # the subclass's part ----------------------------------------------------------------------
    def process(self, item: Any, publisher: Any) -> None:
        raise NotImplementedError

    def _connected(self) -> bool:
        raise NotImplementedError

    def _reconnect(self) -> None:
        raise NotImplementedError

    def _on_process_error(self, item: Any, exc: Exception) -> None:
        """An event that could not be mapped (not an I/O failure): reported, the executor goes on."""
        self.counts["handler_errors"] += 1
        log.error("%s event %r not applied: %s: %s (the executor goes on)", self.gateway_label,
                  item[0] if isinstance(item, tuple) else type(item).__name__, type(exc).__name__, exc,
                  exc_info=exc, extra={"account": self.account})

    # the outbox ---------------------------------------------------------------------------------
    def _commit(self, rec: Any, events: Sequence[Message], publisher: Any) -> None:
        """Save the record with ``events`` in its outbox, then publish them (confirmed) and clear it."""
        for e in events:
            rec.outbox.append({"kind": kind_of(e), "id": e.id, "type": e.schema, "body": encode(e).decode()})
        self.dirty.add(rec.order_id)
        self.store.save(rec.to_doc())
        self._publish_outbox(rec, publisher)
        self.dirty.discard(rec.order_id)

    def _publish_outbox(self, rec: Any, publisher: Any) -> None:
        if not rec.outbox:
            return
        for item in rec.outbox:
            publisher.publish(self.topo.report, keys.report_key(self.account, item["kind"]), item["body"].encode(),
                              properties={"message_id": item["id"], "type": item["type"],
                                          "content_type": "application/json"},
                              mandatory=item["kind"] != "reject")
            if item["kind"] == "trade":
                self.counts["trades"] += 1
            elif item["kind"] == "order":
                self.counts["reports"] += 1
        rec.outbox = []
        self.store.clear_outbox([rec.order_id])

    def flush_dirty(self, publisher: Any) -> int:
        """Save and publish every record a failed commit left behind (and every unpublished outbox)."""
        with self.lock:
            ids = set(self.dirty) | {r.order_id for r in self.records.values() if r.outbox}
            for oid in sorted(ids):
                rec = self.records[oid]
                self.store.save(rec.to_doc())
                self._publish_outbox(rec, publisher)
                self.dirty.discard(oid)
            return len(ids)

    # the threads ----------------------------------------------------------------------------------
    def _report_loop(self, publisher_factory: Callable[[], Any]) -> None:
        """Apply the gateway's events in order; retry a failed save/publish with back-off until it works."""
        publisher: Any = None
        failures = 0
        while True:
            try:
                if publisher is None:
                    publisher = publisher_factory()
                if failures:
                    self.flush_dirty(publisher)
                    failures = 0
                try:
                    item = self.events.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    if item is STOP:
                        return
                    try:
                        self.process(item, publisher)
                    except Exception as exc:  # noqa: BLE001
                        if self.dirty:
                            raise          # a commit failed half-way: persist/publish again
                        self._on_process_error(item, exc)
                finally:
                    self.events.task_done()
            except Exception as exc:  # noqa: BLE001 - persist/publish failed: retry until it works
                failures += 1
                self.counts["publish_retries"] += 1
                log.error("persisting/publishing %s reports failed (%s: %s); retrying", self.gateway_label,
                          type(exc).__name__, exc, extra={"account": self.account})
                if self.stopping.wait(min(5.0, 0.1 * 2 ** min(failures, 6))) and self.events.empty():
                    return

    def _supervise(self) -> None:
        """Reconnect while not connected, after ``reconnect_delays`` (the last one repeats)."""
        attempt = 0
        due: float | None = None
        delays = self.reconnect_delays
        tick = max(0.01, min(0.5, delays[0] / 4))
        while not self.stopping.wait(tick):
            if self._connected():
                attempt, due = 0, None
                continue
            now = time.monotonic()
            if due is None:
                due = now + delays[min(attempt, len(delays) - 1)]
            elif now >= due:
                attempt += 1
                self.counts["reconnect_attempts"] += 1
                log.warning("%s still not connected: connect attempt %d", self.gateway_label, attempt,
                            extra={"account": self.account})
                try:
                    self._reconnect()
                except Exception as exc:  # noqa: BLE001
                    log.error("%s reconnect raised %s: %s", self.gateway_label, type(exc).__name__, exc,
                              extra={"account": self.account})
                due = time.monotonic() + delays[min(attempt, len(delays) - 1)]

