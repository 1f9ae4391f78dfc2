"""A consumer that hands its handler a *batch* of messages and acknowledges them together.

For high-rate streams whose side effect is cheaper in bulk (the tickhandler writes one
MongoDB chunk per instrument per batch): messages are collected until ``batch_size`` or
``batch_wait`` seconds, the batch handler runs, and only then is the whole batch
acknowledged with one ``multiple`` ack. Nothing is acknowledged before its side effect.

Outcomes, per :mod:`qapubsub.handling`:

* undecodable message -> dead-lettered on its own (after the batch collected so far has
  been handled, so acks stay in order);
* the handler returns ``{delivery_tag: reason}`` -> those messages are dead-lettered with
  the reason, the rest acknowledged;
* the handler raises :class:`~qapubsub.handling.Transient` -> back-off, the whole batch is
  requeued, no attempt counted (a database outage never dead-letters good data);
* the handler raises anything else -> back-off and requeue, counting an attempt for every
  message; once a message reaches ``max_attempts`` the batch is replayed one message at a
  time so that only the poison message is dead-lettered.

``on_idle`` runs every ``idle_interval`` seconds on the consumer's thread, between
deliveries (the tickhandler closes bars by timer there); ``on_stop`` once when stopping,
after the last batch and before the channel closes.

Pipelining (``pipeline_depth`` > 0). The handler may return a
:class:`concurrent.futures.Future` (e.g. of a job on a
:class:`qapubsub.coalesce.CoalescingWriter`) whose result is the ``{delivery_tag: reason}``
mapping: the batch's slow side effect (a database write) then runs elsewhere while the
consumer collects and hands over the next batches. Up to ``pipeline_depth`` batches are in
flight; one more and the consumer waits for the oldest. Batches are acknowledged strictly in
the order they were handed over, each only once its future is done, so a multiple-ack never
covers unfinished work. A failed future requeues that batch *and every later one in flight*
(one ``multiple`` nack: their work assumed the failed one), then backs off; after a failure
other than :class:`~qapubsub.handling.Transient` the consumer waits for each batch at once
until one succeeds, so the one-at-a-time isolation above still finds a poison message. The
handler is told nothing: it must itself make a requeued batch safe to handle again (the
tickhandler rebuilds the instruments concerned from its store). With ``pipeline_depth`` 0 (the
default) a returned future is waited for at once.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from . import handling
from .handling import Outcome, Transient
from .messages import DecodeError, decode
from .sync import Backoff, Connection, Consumer, Delivery, _log_extra, delivery_key
from .topology import Queue

log = logging.getLogger(__name__)

Items = Sequence[tuple[Any, Delivery]]
BatchHandler = Callable[[Items], "Mapping[int, str] | Future[Mapping[int, str] | None] | None"]


def _noop() -> None:
    pass


class BatchConsumer(Consumer):
    """See the module doc. ``batch_handler(items) -> {delivery_tag: reason} | None``."""

    def __init__(self, connection: Connection, queue: Queue | str, batch_handler: BatchHandler, *,
                 batch_size: int = 500, batch_wait: float = 0.02, on_idle: Callable[[], None] | None = None,
                 idle_interval: float = 0.1, prefetch: int = 2000, retry_backoff: Backoff | None = None,
                 on_stop: Callable[[], None] | None = None, pipeline_depth: int = 0, **kwargs: Any) -> None:
        # the poll interval is also clamped to idle_interval, by the base when there is an on_idle
        super().__init__(connection, queue, self._unused, prefetch=prefetch, ack_every=1 << 30,
                         poll_interval=min(kwargs.pop("poll_interval", 0.05), batch_wait),
                         on_idle=on_idle, idle_interval=idle_interval, **kwargs)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if pipeline_depth < 0:
            raise ValueError("pipeline_depth must be >= 0")
        self.batch_handler = batch_handler
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.on_stop = on_stop
        self.retry_backoff = retry_backoff or Backoff(interval_start=0.2, interval_max=10.0)
        self._batch: list[tuple[Any, Delivery]] = []
        self._batch_started = 0.0
        self._transient_failures = 0
        self.pipeline_depth = pipeline_depth
        self._inflight: deque[tuple[list[tuple[Any, Delivery]], Future[Any]]] = deque()
        self._one_at_a_time = False  # after a failure in flight: wait for each batch until one succeeds
        self.counts.update({"batches": 0, "transient_failures": 0, "aborted": 0})

    @staticmethod
    def _unused(_payload: Any, _delivery: Delivery) -> None:  # pragma: no cover - batches only
        raise AssertionError("BatchConsumer dispatches batches")

    # loop hooks ----------------------------------------------------------------------------
    def _maybe_flush_acks(self) -> None:
        if self._inflight:
            self._pump(block=False)
        now = time.monotonic()
        if self._batch and now - self._batch_started >= self.batch_wait:
            self._flush_batch()
        super()._maybe_flush_acks()  # on_idle (after the batch flush), then the acks

    def _shutdown(self) -> None:
        if self._ch is not None and self._ch.is_open:
            with self._ch.connection._acquire_event_dispatch():  # noqa: SLF001 - no re-entrant deliveries
                if self._batch:
                    self._flush_batch()  # finish what was delivered before closing
                self._settle()
                if self.on_stop is not None:
                    try:
                        self.on_stop()
                    except Exception as exc:  # noqa: BLE001 - nothing is lost: the work is redone at restart
                        log.warning("on_stop failed: %s", exc, extra={"queue": self.queue_name})
        super()._shutdown()

    def _setup(self) -> None:
        self._batch = []  # deliveries of a dead channel will be redelivered
        if self._inflight:  # their work finishes (or fails) on its own; their acks died with the channel
            wait_futures([f for _b, f in self._inflight])
            self._inflight.clear()
        super()._setup()

    # deliveries ----------------------------------------------------------------------------
    def _on_message(self, ch: BlockingChannel, method: pika.spec.Basic.Deliver,
                    props: pika.spec.BasicProperties, body: bytes) -> None:
        delivery = Delivery(method.exchange, method.routing_key, bool(method.redelivered), method.delivery_tag,
                            props, body, self.queue_name)
        try:
            payload = decode(body, self.message_type) if self.message_type is not None else body
        except DecodeError as exc:
            self._flush_batch()
            self._settle()  # the dead letter's ack must not run ahead of batches still in flight
            self._dead_letter(delivery, str(exc), 1, self._extra(delivery))
            self._flush_acks()
            return
        if not self._batch:
            self._batch_started = time.monotonic()
        self._batch.append((payload, delivery))
        if len(self._batch) >= self.batch_size:
            self._flush_batch()

    _extra = staticmethod(_log_extra)
    _key = staticmethod(delivery_key)

    def _call(self, items: Items) -> Mapping[int, str] | Future[Any]:
        out = self.batch_handler(items)
        if isinstance(out, Future):
            if self.pipeline_depth and not self._one_at_a_time:
                return out
            out = out.result()  # raises the batch's failure
        return out or {}

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        if not batch or self._ch is None:
            return
        try:
            out = self._call(batch)
        except Exception as exc:  # noqa: BLE001 - an outcome, not a crash
            if not self._settle():
                # An earlier batch failed in flight (this one may have raised because of it): that
                # one and every later one in flight were requeued, but not this one, taken out of
                # the collection before the call. Requeue it too: left unacked, the next
                # multiple-ack would cover it, unhandled. (No second back-off: _abort waited.)
                self._requeue(batch, 0.0)
                return
            self._on_failure(batch, exc)
            return
        if isinstance(out, Future):
            out.add_done_callback(self._wake)
            self._inflight.append((batch, out))
            self._pump(block=len(self._inflight) > self.pipeline_depth)
            return
        if self._inflight:  # finished at once, but acknowledged only after the batches before it
            done: Future[Any] = Future()
            done.set_result(out)
            self._inflight.append((batch, done))
            self._pump(block=False)
            return
        self._transient_failures = 0
        self._one_at_a_time = False
        self._finish(batch, out)

    def _on_failure(self, batch: list[tuple[Any, Delivery]], exc: Exception) -> None:
        if isinstance(exc, Transient):
            self._transient_failures += 1
            self.counts["transient_failures"] += 1
            log.warning("batch of %d not done (%s); requeueing after back-off", len(batch), exc,
                        extra={"queue": self.queue_name})
            self._requeue(batch, self.retry_backoff.delay(self._transient_failures - 1))
            return
        self._failed(batch, exc)

    def _wake(self, _future: Future[Any]) -> None:
        self.connection.add_callback_threadsafe(_noop)  # the loop acknowledges it now, not at its next poll

    # batches in flight ---------------------------------------------------------------------
    def _pump(self, block: bool, until_empty: bool = False) -> bool:
        """Acknowledge the finished batches at the head of the in-flight queue, in order.

        ``block``: wait while more than ``pipeline_depth`` are in flight (``until_empty``: until
        none is). Returns False if one had failed: then it and everything after it were requeued.
        """
        while self._inflight:
            batch, fut = self._inflight[0]
            if not fut.done():
                if not block or (not until_empty and len(self._inflight) <= self.pipeline_depth):
                    return True
                wait_futures([fut])
            self._inflight.popleft()
            exc = fut.exception()
            if exc is not None:
                self._abort(batch, exc)
                return False
            self._transient_failures = 0
            self._one_at_a_time = False
            self._finish(batch, fut.result() or {})
        return True

    def _settle(self) -> bool:
        """Wait for every batch in flight and acknowledge them; False if one failed (see :meth:`_pump`)."""
        return self._pump(block=True, until_empty=True)

    def _abort(self, failed: list[tuple[Any, Delivery]], exc: BaseException) -> None:
        """A batch in flight failed: requeue it, every later batch and the one being collected."""
        later = [b for b, _f in self._inflight]
        wait_futures([f for _b, f in self._inflight])  # let their work end before anything is redelivered
        self._inflight.clear()
        collecting, self._batch = self._batch, []
        tags = [d.delivery_tag for b in (failed, *later, collecting) for _p, d in b]
        self._flush_acks()
        assert self._ch is not None
        self._ch.basic_nack(delivery_tag=max(tags), multiple=True, requeue=True)
        self.counts["requeued"] += len(tags)
        self.counts["aborted"] += 1
        if isinstance(exc, Transient):
            self._transient_failures += 1
            self.counts["transient_failures"] += 1
            delay = self.retry_backoff.delay(self._transient_failures - 1)
        else:
            self._one_at_a_time = True  # the retry runs one batch at a time, so a poison message is isolated
            delay = self.retry_backoff.delay(0)
        log.warning("batch of %d failed in flight (%s); requeued it and %d later message(s) after %.2f s",
                    len(failed), handling.reason_of(exc) if isinstance(exc, Exception) else exc,
                    len(tags) - len(failed), delay, extra={"queue": self.queue_name})
        self._stopping.wait(delay)

    def _finish(self, batch: Sequence[tuple[Any, Delivery]], rejected: Mapping[int, str]) -> None:
        for _payload, d in batch:
            reason = rejected.get(d.delivery_tag)
            if reason is not None:
                self._dead_letter(d, reason, 1, self._extra(d))
            else:
                if self.tracker.pending:
                    self.tracker.succeeded(self._key(d))
                self._ack(d.delivery_tag)
        self._flush_acks()
        self.counts["batches"] += 1

    def _requeue(self, batch: Sequence[tuple[Any, Delivery]], wait: float) -> None:
        if self._stopping.wait(wait):
            pass  # stopping: requeue at once, the broker redelivers to the next consumer
        self._flush_acks()
        assert self._ch is not None
        self._ch.basic_nack(delivery_tag=batch[-1][1].delivery_tag, multiple=True, requeue=True)
        self.counts["requeued"] += len(batch)

    def _failed(self, batch: Sequence[tuple[Any, Delivery]], exc: Exception) -> None:
        reason = handling.reason_of(exc)
        # From here on, and until a batch succeeds, every batch is waited for when handed over: the
        # isolation below must see each message's outcome before it acks or dead-letters it.
        self._one_at_a_time = True
        outcomes = [self.tracker.failed(self._key(d), _count(d)) for _p, d in batch]
        if all(o is Outcome.REQUEUE for o, _n in outcomes):
            log.warning("batch of %d failed (%s); requeueing", len(batch), reason, extra={"queue": self.queue_name})
            self._requeue(batch, self.retry_backoff.delay(max(n for _o, n in outcomes) - 1))
            return
        # Somebody is at its last attempt: find the poison one by handling them one at a time.
        log.error("batch of %d failed again (%s); handling its messages one by one", len(batch), reason,
                  extra={"queue": self.queue_name})
        for item in batch:
            payload, d = item
            try:
                rejected = self._call([item])
            except Transient as t_exc:
                raise RuntimeError(f"store unavailable while isolating a failed batch: {t_exc}") from t_exc
            except Exception as one_exc:  # noqa: BLE001
                self._dead_letter(d, handling.reason_of(one_exc), self.tracker.max_attempts, self._extra(d))
                continue
            reason_one = rejected.get(d.delivery_tag)
            if reason_one is not None:
                self._dead_letter(d, reason_one, 1, self._extra(d))
            else:
                self.tracker.succeeded(self._key(d))
                self._ack(d.delivery_tag)
        self._flush_acks()


def _count(d: Delivery) -> int | None:
    value = (d.properties.headers or {}).get("x-delivery-count")
    return int(value) if isinstance(value, int) else None
