"""Helpers for the vn.py-driven tests: a recording gateway, an in-memory sink, a waiter."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

ENV = {
    "QA_CTP_USERID": "u1", "QA_CTP_PASSWORD": "s3cret-pw", "QA_CTP_BROKER_ID": "9999",
    "QA_CTP_MD_FRONT": "tcp://127.0.0.1:1", "QA_CTP_TD_FRONT": "tcp://127.0.0.1:2",
    "QA_CTP_SYMBOLS": "SHFE.rb2512,DCE.i2601",
}


class ListSink:
    """Stands in for the StreamPublisher; ``gate`` (if set) blocks publish until released."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.items: list[tuple[str, str, Any]] = []
        self.flushes = 0
        self.closed = False
        self.gate = gate
        self.thread: str | None = None

    def publish(self, exchange: str, routing_key: str, message: Any) -> None:
        self.thread = threading.current_thread().name
        if self.gate is not None:
            self.gate.wait(10)
        self.items.append((exchange, routing_key, message))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()
