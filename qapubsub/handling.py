"""What a consumer does with a delivery once its handler has run: pure rules, no I/O.

Shared by the pika (``qapubsub.sync``) and aio-pika (``qapubsub.aio``) consumers so both
behave the same:

* handler returns            -> ack (batched with ``multiple`` on high-rate streams);
* body cannot be decoded, or
  the handler raises Reject  -> publish a copy to the dead-letter exchange with the reason
                                in ``x-qa-error`` (confirmed), then ack the original;
* handler raises Transient -> wait (back-off), requeue, do not count an attempt;
* handler raises anything
  else                       -> requeue, up to ``max_attempts`` deliveries in all, then
                                dead-letter with the last error as the reason.

Attempts are counted per message id in a bounded table; quorum queues also carry
``x-delivery-count`` and dead-letter by themselves at ``x-delivery-limit``, which covers a
consumer that crashes on a message before it can count.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from enum import Enum
from typing import Any

ERROR_HEADER = "x-qa-error"
ORIGINAL_EXCHANGE_HEADER = "x-qa-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "x-qa-original-routing-key"
QUEUE_HEADER = "x-qa-queue"
ATTEMPTS_HEADER = "x-qa-attempts"
DEAD_AT_HEADER = "x-qa-dead-at-ns"
MAX_REASON = 1000
DEFAULT_MAX_ATTEMPTS = 3


class Reject(Exception):
    """Raised by a handler for a message that can never succeed (invalid, wrong schema...).

    The message is dead-lettered at once with ``str(exc)`` as the reason; no retry.
    """


class Transient(Exception):
    """Raised by a handler whose side effect cannot be done *now* (database down, broker busy).

    The message is requeued after a back-off and retried without counting an attempt: an
    outage must never dead-letter good messages.
    """


class Outcome(Enum):
    ACK = "ack"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead_letter"


def reason_of(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, Reject) else f"{type(exc).__name__}: {exc}"
    return text[:MAX_REASON]


def dead_letter_headers(headers: Mapping[str, Any] | None, *, reason: str, exchange: str, routing_key: str,
                        queue: str, attempts: int) -> dict[str, Any]:
    """Headers for the dead-lettered copy: the original ones plus where it came from and why."""
    out = dict(headers or {})
    out.update({
        ERROR_HEADER: reason[:MAX_REASON],
        ORIGINAL_EXCHANGE_HEADER: exchange,
        ORIGINAL_ROUTING_KEY_HEADER: routing_key,
        QUEUE_HEADER: queue,
        ATTEMPTS_HEADER: attempts,
        DEAD_AT_HEADER: time.time_ns(),
    })
    return out


class AttemptTracker:
    """Counts failed deliveries per message id (bounded: oldest entries forgotten first)."""

    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS, capacity: int = 100_000) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.max_attempts = max_attempts
        self.capacity = capacity
        self._failures: OrderedDict[str, int] = OrderedDict()

    def failed(self, message_id: str | None, delivery_count: int | None = None) -> tuple[Outcome, int]:
        """Record a handler failure; returns what to do and the attempts made so far.

        ``delivery_count`` is the broker's ``x-delivery-count`` (quorum queues: deliveries
        before this one), which survives a consumer restart where our table does not.
        """
        key = message_id or ""
        n = self._failures.pop(key, 0) + 1 if key else 1
        if delivery_count is not None:
            n = max(n, int(delivery_count) + 1)
        if n >= self.max_attempts:
            self._failures.pop(key, None)
            return Outcome.DEAD_LETTER, n
        if key:
            self._failures[key] = n
            while len(self._failures) > self.capacity:
                self._failures.popitem(last=False)
        return Outcome.REQUEUE, n

    @property
    def pending(self) -> bool:
        """Whether any message has failed and not yet succeeded or been given up."""
        return bool(self._failures)

    def succeeded(self, message_id: str | None) -> None:
        if message_id:
            self._failures.pop(message_id, None)
