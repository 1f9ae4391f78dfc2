"""vn.py-free test helpers shared by the CTP and QMT executor tests."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class ListPublisher:
    """Stands in for qapubsub.sync.Publisher; thread-safe; ``fail`` raises on the next n publishes."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, bytes, dict[str, Any]]] = []
        self.fail = 0
        self.lock = threading.Lock()

    def publish(self, exchange: str, routing_key: str, body: bytes, *, properties: dict[str, Any],
                mandatory: bool = True) -> str:
        with self.lock:
            if self.fail:
                self.fail -= 1
                raise ConnectionError("simulated publish failure")
            self.items.append((exchange, routing_key, body, properties))
        return str(properties["message_id"])

    def bodies(self, kind: str | None = None) -> list[dict[str, Any]]:
        import json

        with self.lock:
            return [json.loads(b) for _, k, b, _ in self.items if kind is None or k.endswith("." + kind)]

    def ids(self) -> list[str]:
        with self.lock:
            return [p["message_id"] for *_, p in self.items]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()
