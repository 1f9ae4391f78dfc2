"""The writer thread behind pipelined batches (:mod:`qapubsub.batch`, ``pipeline_depth``).

A handler that returns a future for a batch's slow side effect (a database write, a confirmed
publish) hands that work to a :class:`CoalescingWriter`: one thread that runs the jobs in
order, several at once. Used by the tickhandler (tick chunks, closed bars) and the router (audit
documents, plan marks). No broker or database here: ``run`` does the I/O.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Job(Protocol):
    """What :class:`CoalescingWriter` runs: a unit of work with its future and when it was queued."""

    future: Future[Any]
    queued_at: float


J = TypeVar("J", bound=Job)


class CoalescingWriter(Generic[J]):
    """One background thread running queued jobs in order, several at once: the handler queues a
    batch's slow side effect and returns its future to the batch consumer.

    The thread takes the first waiting job and every job queued behind it, and calls
    ``run(jobs)``, which completes each job's future. Coalescing is what makes the thread worth
    having: the jobs that queue up behind a slow write are written together (one
    ``insert_many``, one confirm wait). While the jobs taken are smaller than ``fill`` (their
    ``size(job)`` summed) it waits until ``linger`` s after the first was queued for more to join
    them, so small jobs still make few, full writes; it never takes more than ``max_size``.

    If ``run`` raises, every future it left undone fails with the exception: a bug must fail the
    batches (which the consumer then requeues), not leave the consumer waiting. ``on_idle`` runs on
    the thread when nothing came for ``idle_interval`` s (heartbeats of a connection it publishes
    on); its failures are logged.
    """

    def __init__(self, run: Callable[[list[J]], None], *, name: str, linger: float = 0.0,
                 size: Callable[[J], int] | None = None, fill: float = math.inf, max_size: float = math.inf,
                 on_idle: Callable[[], None] | None = None, idle_interval: float = 0.1) -> None:
        self._run = run
        self.linger = linger
        self._size = size or (lambda _job: 1)
        self.fill = fill
        self.max_size = max_size
        self._on_idle = on_idle
        self._idle_interval = idle_interval if on_idle is not None else None
        self._q: queue.SimpleQueue[J | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._outstanding = 0
        self._name = name
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        t = threading.Thread(target=self._loop, name=self._name, daemon=True)
        t.start()
        return t

    def put(self, job: J) -> Future[Any]:
        """Queue ``job``; its future is done when it has run (after a :meth:`close` a new thread runs it)."""
        with self._cond:
            self._outstanding += 1
            if not self._thread.is_alive():
                self._thread = self._start()
        self._q.put(job)
        return job.future

    def wait_idle(self) -> None:
        """Wait until every job put so far has run."""
        with self._cond:
            self._cond.wait_for(lambda: self._outstanding == 0)

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what is queued, then end the thread."""
        if self._thread.is_alive():
            self.wait_idle()
            self._q.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                job = self._q.get(timeout=self._idle_interval)
            except queue.Empty:
                try:
                    self._on_idle()  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - its next use finds the problem again
                    log.warning("%s: on_idle: %s", self._name, exc)
                continue
            if job is None:
                return
            jobs, n = [job], self._size(job)
            until = job.queued_at + self.linger
            stop = False
            while n < self.max_size:
                try:
                    wait = until - time.monotonic() if n < self.fill else 0.0
                    more = self._q.get(timeout=wait) if wait > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
                n += self._size(more)
            try:
                self._run(jobs)
            except BaseException as exc:  # noqa: BLE001 - fail the batches, do not hang the consumer
                log.exception("%s: %s", self._name, exc)
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            finally:
                with self._cond:
                    self._outstanding -= len(jobs)
                    self._cond.notify_all()
            if stop:
                return
