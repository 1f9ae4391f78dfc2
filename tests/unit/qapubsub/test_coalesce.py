"""CoalescingWriter: the writer thread behind pipelined batches (pure threads, no I/O)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest

from qapubsub.coalesce import CoalescingWriter


@dataclass
class J:
    n: int
    size: int = 1
    future: Future[object] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Recorder:
    """``run``: records each call's jobs and completes them; the first call can be held."""

    def __init__(self, hold_first: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.hold = threading.Event()
        self.entered = threading.Event()
        if not hold_first:
            self.hold.set()

    def __call__(self, jobs: list[J]) -> None:
        self.entered.set()
        assert self.hold.wait(10)
        self.calls.append([j.n for j in jobs])
        for j in jobs:
            j.future.set_result(j.n)


def test_jobs_queued_behind_a_slow_run_are_run_together_in_order() -> None:
    rec = Recorder(hold_first=True)
    w = CoalescingWriter(rec, name="t-coalesce")
    first = w.put(J(0))
    assert rec.entered.wait(10)                      # the first run is under way (and held) ...
    futs = [w.put(J(i)) for i in range(1, 6)]        # ... so these queue up behind it
    rec.hold.set()
    assert [f.result(10) for f in [first, *futs]] == list(range(6))
    w.wait_idle()
    assert rec.calls == [[0], [1, 2, 3, 4, 5]]
    w.close()


def test_max_size_caps_what_one_run_takes() -> None:
    rec = Recorder(hold_first=True)
    w = CoalescingWriter(rec, name="t-coalesce-cap", size=lambda j: j.size, max_size=10)
    w.put(J(0))
    assert rec.entered.wait(10)
    for i in range(1, 5):
        w.put(J(i, size=4))
    rec.hold.set()
    w.wait_idle()
    assert rec.calls == [[0], [1, 2, 3], [4]]        # 4 + 4 + 4 >= 10: the third one ends the run
    w.close()


def test_small_jobs_wait_for_more_until_the_linger_is_over_and_full_ones_do_not() -> None:
    rec = Recorder()
    w = CoalescingWriter(rec, name="t-coalesce-linger", linger=30.0, size=lambda j: j.size, fill=10)
    a = w.put(J(0, size=2))
    b = w.put(J(1, size=3))
    assert not a.done() and not b.done()             # 5 < fill: still waiting for more ...
    c = w.put(J(2, size=6))                          # ... until 11 >= fill: run at once
    assert c.result(10) == 2 and a.done() and b.done()
    assert rec.calls == [[0, 1, 2]]
    old = J(3, size=1, queued_at=time.monotonic() - 31.0)   # queued longer ago than the linger
    assert w.put(old).result(10) == 3
    assert rec.calls[-1] == [3]
    w.close()


def test_a_failing_run_fails_every_future_it_left() -> None:
    def run(jobs: list[J]) -> None:
        jobs[0].future.set_result("ok")
        raise RuntimeError("the store went away")

    w = CoalescingWriter(run, name="t-coalesce-fail", linger=30.0, size=lambda j: j.size, fill=2)   # one run
    f = w.put(J(0))
    g = w.put(J(1))
    assert f.result(10) == "ok"
    with pytest.raises(RuntimeError, match="the store went away"):
        g.result(10)
    assert w.put(J(2, size=2)).result(10) == "ok"   # the thread lives on
    w.close()


def test_close_runs_what_is_queued_and_ends_the_thread() -> None:
    rec = Recorder(hold_first=True)
    w = CoalescingWriter(rec, name="t-coalesce-close")
    futs = [w.put(J(i)) for i in range(3)]
    assert rec.entered.wait(10)
    threading.Timer(0.05, rec.hold.set).start()
    w.close()
    assert all(f.done() for f in futs) and sorted(n for c in rec.calls for n in c) == [0, 1, 2]
    assert not any(t.name == "t-coalesce-close" and t.is_alive() for t in threading.enumerate())
    assert w.put(J(9)).result(10) == 9               # used again after close: a new thread runs it
    w.close()


def test_on_idle_runs_when_nothing_comes_and_its_failure_does_not_end_the_thread() -> None:
    calls: list[int] = []
    twice = threading.Event()

    def on_idle() -> None:
        calls.append(1)
        if len(calls) >= 2:
            twice.set()
        raise OSError("connection reset")

    rec = Recorder()
    w = CoalescingWriter(rec, name="t-coalesce-idle", on_idle=on_idle, idle_interval=0.01)
    assert twice.wait(10)
    assert w.put(J(7)).result(10) == 7               # still serving jobs
    w.close()
