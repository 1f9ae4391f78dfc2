"""Errors and back-off shared by the pika (``sync``) and aio-pika (``aio``) transports."""
from __future__ import annotations

import random
from dataclasses import dataclass


class TransportError(RuntimeError):
    """Base of the transport's errors."""


class FatalError(TransportError):
    """A configuration error that no reconnect can fix (login refused, no access, no such queue)."""


class Interrupted(TransportError):
    """Waiting for the broker was interrupted by a stop."""


class NotConnected(TransportError):
    """No broker reachable within the time asked for."""


class PublishError(TransportError):
    """A message could not be published (not confirmed after the retries, or refused)."""


class Unroutable(PublishError):
    """A ``mandatory`` message was returned: no queue is bound for its routing key."""

    def __init__(self, exchange: str, routing_key: str, message_id: str | None = None, detail: str = "") -> None:
        self.exchange, self.routing_key, self.message_id = exchange, routing_key, message_id
        super().__init__(f"message {message_id or ''} to exchange {exchange!r} with routing key {routing_key!r} "
                         f"is unroutable: no queue is bound for that key" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with jitter, in kombu's terms.

    The n-th wait (n = 0, 1, ...) is ``min(interval_max, interval_start * interval_step ** n)``
    scaled by a random factor in ``[1 - jitter, 1 + jitter]`` (never above ``interval_max``),
    so that many clients do not reconnect in lock step.
    """

    interval_start: float = 0.1
    interval_step: float = 2.0
    interval_max: float = 5.0
    jitter: float = 0.25

    def delay(self, n: int) -> float:
        base = min(self.interval_max, self.interval_start * self.interval_step ** max(0, n))
        return min(self.interval_max, base * (1.0 - self.jitter + 2.0 * self.jitter * random.random()))
