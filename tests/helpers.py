"""Small test helpers: waiting on a condition with a deadline (never a bare sleep)."""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


async def await_for(cond: Callable[[], T | Awaitable[T]], timeout: float = 10.0, interval: float = 0.02,
                    what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value  # type: ignore[misc]
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {value!r})")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def risk_url() -> str:
    """The risk desk's login URL: QA_RISK_AMQP_URL, else the one the set-up wrote to .qaflow/servers.env."""
    url = os.environ.get("QA_RISK_AMQP_URL", "")
    env = Path(__file__).resolve().parents[1] / ".qaflow" / "servers.env"
    if not url and env.exists():
        for line in env.read_text().splitlines():
            if "QA_RISK_AMQP_URL=" in line:
                url = line.split("=", 1)[1].strip().strip("'\"")
    return url


def cleaned(ticks: Iterable[Any]) -> Iterator[Any]:
    """The ticks a fresh ``TickCleaner`` per instrument keeps, in order: what the tickhandler stores.

    Copies: the cleaner normalises kept ticks in place, and the caller's ticks are what it publishes."""
    import copy

    from qamarket.cleaning import TickCleaner
    from qamarket.models import DEFAULT_REGISTRY

    cleaners: dict[tuple[str, str], TickCleaner] = {}
    for t in ticks:
        key = (t.exchange, t.symbol)
        c = cleaners.get(key)
        if c is None:
            c = cleaners[key] = TickCleaner(DEFAULT_REGISTRY.get(t.symbol, t.exchange))
        t = copy.copy(t)
        if c.check(t) is None:
            yield t


def expected_after_cleaning(ticks: Iterable[Any]) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
    """``{(exchange, symbol): [market fields of each kept tick]}``, comparable with the tick store."""
    from brokers.random_source import market_fields

    out: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for t in cleaned(ticks):
        out.setdefault((t.exchange, t.symbol), []).append(market_fields(t))
    return out
