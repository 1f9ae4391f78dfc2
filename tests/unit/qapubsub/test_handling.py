"""qapubsub.handling: the pure ack / requeue / dead-letter rules."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qapubsub import handling
from qapubsub.handling import AttemptTracker, Outcome, Reject


def test_requeues_until_max_attempts_then_dead_letters() -> None:
    t = AttemptTracker(max_attempts=3)
    assert t.failed("m1") == (Outcome.REQUEUE, 1)
    assert t.failed("m1") == (Outcome.REQUEUE, 2)
    assert t.failed("m1") == (Outcome.DEAD_LETTER, 3)
    assert t.failed("m1") == (Outcome.REQUEUE, 1)  # forgotten once dead-lettered


def test_counts_are_per_message_and_reset_on_success() -> None:
    t = AttemptTracker(max_attempts=2)
    assert t.failed("a") == (Outcome.REQUEUE, 1)
    assert t.failed("b") == (Outcome.REQUEUE, 1)
    t.succeeded("a")
    assert t.failed("a") == (Outcome.REQUEUE, 1)
    assert t.failed("b") == (Outcome.DEAD_LETTER, 2)


def test_broker_delivery_count_survives_a_restart_of_the_table() -> None:
    t = AttemptTracker(max_attempts=5)
    # x-delivery-count = deliveries before this one (quorum queues)
    assert t.failed("m", delivery_count=3) == (Outcome.REQUEUE, 4)
    assert t.failed("m", delivery_count=4) == (Outcome.DEAD_LETTER, 5)
    assert AttemptTracker(max_attempts=2).failed(None, delivery_count=7) == (Outcome.DEAD_LETTER, 8)


def test_max_attempts_one_dead_letters_at_once_and_zero_is_refused() -> None:
    assert AttemptTracker(max_attempts=1).failed("x") == (Outcome.DEAD_LETTER, 1)
    with pytest.raises(ValueError):
        AttemptTracker(max_attempts=0)


def test_table_is_bounded() -> None:
    t = AttemptTracker(max_attempts=10, capacity=3)
    for i in range(10):
        t.failed(f"m{i}")
    assert len(t._failures) == 3
    assert t.failed("m0") == (Outcome.REQUEUE, 1)  # oldest forgotten
    assert t.failed("m9") == (Outcome.REQUEUE, 2)


@given(st.integers(min_value=1, max_value=20), st.integers(min_value=1, max_value=40))
def test_never_more_deliveries_than_max_attempts(max_attempts: int, failures: int) -> None:
    t = AttemptTracker(max_attempts=max_attempts)
    outcomes = [t.failed("id")[0] for _ in range(failures)]
    first_dead = outcomes.index(Outcome.DEAD_LETTER) + 1 if Outcome.DEAD_LETTER in outcomes else None
    assert first_dead == (max_attempts if failures >= max_attempts else None)


def test_reason_of() -> None:
    assert handling.reason_of(Reject("bad order: no price")) == "bad order: no price"
    assert handling.reason_of(ValueError("boom")) == "ValueError: boom"
    assert len(handling.reason_of(RuntimeError("x" * 5000))) == handling.MAX_REASON


def test_dead_letter_headers_keep_originals_and_add_where_and_why() -> None:
    original = {"x-qa-version": 1, "trace": "abc"}
    h = handling.dead_letter_headers(original, reason="r" * 2000, exchange="qaorder", routing_key="acc1",
                                     queue="qa.router.orders", attempts=3)
    assert h["x-qa-version"] == 1 and h["trace"] == "abc"
    assert h[handling.ERROR_HEADER] == "r" * handling.MAX_REASON
    assert h[handling.ORIGINAL_EXCHANGE_HEADER] == "qaorder"
    assert h[handling.ORIGINAL_ROUTING_KEY_HEADER] == "acc1"
    assert h[handling.QUEUE_HEADER] == "qa.router.orders"
    assert h[handling.ATTEMPTS_HEADER] == 3
    assert isinstance(h[handling.DEAD_AT_HEADER], int) and h[handling.DEAD_AT_HEADER] > 0
    assert original == {"x-qa-version": 1, "trace": "abc"}  # not mutated
    assert handling.dead_letter_headers(None, reason="r", exchange="", routing_key="", queue="q", attempts=1)
