"""BarService: closed bars the live queue shed are read back from the store and emitted in order
(pure logic: the history source is an in-memory list of what the store holds)."""
from __future__ import annotations

from typing import Any

import msgspec

from handlers.barhandler import BarService
from qamarket.models import Bar

KEY = ("SHFE", "rb2605", "1min")
T0 = 1_741_050_000_000            # a minute boundary
M = 60_000


def bar(i: int, prev: int | None = None, final: bool = True) -> Bar:
    p = 3900.0 + i
    return Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=T0 + i * M, trading_day="20250304",
               open=p, high=p + 1, low=p - 1, close=p, volume=10.0, final=final, tick_count=5,
               prev=None if prev is None else T0 + prev * M)


class Stored:
    """What the bar store holds; ``arrive`` bars become visible at the n-th read (a store write lagging)."""

    def __init__(self, bars: list[Bar], later: dict[int, list[Bar]] | None = None) -> None:
        self.bars = list(bars)
        self.later = later or {}
        self.reads: list[tuple[Any, Any, Any]] = []

    def last_label(self, ex: str, sym: str, freq: str) -> int | None:
        return max((b.datetime for b in self.bars), default=None)

    def load(self, ex: str, sym: str, freq: str, *, count: int | None = None, start: int | None = None,
             end: int | None = None) -> tuple[list[Bar], dict[str, int]]:
        self.bars.extend(self.later.pop(len(self.reads), []))
        self.reads.append((count, start, end))
        got = sorted((b for b in self.bars if (start is None or b.datetime >= start)
                      and (end is None or b.datetime <= end)), key=lambda b: b.datetime)
        if count is not None:
            got = got[-count:]
        return got, {"bars": len(got)}


def service(store: Stored, **kw: Any) -> tuple[BarService, list[int]]:
    out: list[int] = []
    svc = BarService(store, emit=lambda b, _v: out.append((b.datetime - T0) // M), **kw)
    svc.subscribe(KEY)
    return svc, out


def test_bars_shed_from_the_live_queue_are_emitted_from_the_store_before_the_next_one() -> None:
    store = Stored([bar(i, i - 1 if i else None) for i in range(5)])        # history 0..4
    svc, out = service(store)
    store.bars += [bar(5, 4), bar(6, 5)]                                    # published and stored, not received
    reads = len(store.reads)
    svc.on_live(bar(7, 6), "m7")
    assert out == [5, 6, 7]
    assert store.reads[reads:] == [(None, T0 + 4 * M + 1, T0 + 6 * M)]      # one read, of the gap only
    assert svc.counts["gaps"] == 1 and svc.counts["gap_emitted"] == 2
    svc.on_live(bar(6, 5), "m6")                                            # a late copy: not emitted again
    svc.on_live(bar(8, 7), "m8")                                            # no gap: no read
    assert out == [5, 6, 7, 8] and len(store.reads) == reads + 1


def test_the_newest_missed_bar_is_waited_for_until_it_is_stored() -> None:
    store = Stored([bar(i, i - 1 if i else None) for i in range(3)], later={2: [bar(4, 3)]})
    svc, out = service(store, gap_wait=10.0)
    store.bars.append(bar(3, 2))                                            # stored; bar 4 only at the next read
    svc.on_live(bar(5, 4), "m5")
    assert out == [3, 4, 5] and svc.counts["gap_unfilled"] == 0


def test_a_gap_still_missing_after_the_wait_is_counted_and_the_rest_emitted() -> None:
    store = Stored([bar(i, i - 1 if i else None) for i in range(3)])
    svc, out = service(store, gap_wait=0.0)
    store.bars.append(bar(3, 2))                                            # bar 4 never stored
    svc.on_live(bar(5, 4), "m5")
    assert out == [3, 5] and svc.counts["gap_unfilled"] == 1


def test_realtime_bars_and_bars_without_prev_read_nothing() -> None:
    store = Stored([bar(i, i - 1 if i else None) for i in range(3)])
    svc, out = service(store)
    reads = len(store.reads)
    svc.on_live(bar(5, final=False), "rt")
    svc.on_live(bar(5), "m5")                                               # prev unknown: emitted as it is
    assert out == [5] and len(store.reads) == reads


def test_a_quiet_series_reads_the_closed_bar_of_its_bar_in_progress_once() -> None:
    """The market pauses after bar 3; its closed bar was shed: no later bar's ``prev`` will tell."""
    store = Stored([bar(i, i - 1 if i else None) for i in range(3)])
    svc, out = service(store, quiet_after=5.0)
    svc.on_live(bar(3, final=False), None)                                  # bar 3 in progress
    heard = svc._heard[KEY]
    store.bars.append(bar(3, 2))                                            # closed, stored, shed from the queue
    reads = len(store.reads)
    assert svc.check_quiet(heard + 64.0) == 0 and len(store.reads) == reads  # not quiet for 60 + 5 s yet
    assert svc.check_quiet(heard + 66.0) == 1 and out == [3]
    assert store.reads[reads:] == [(None, T0 + 2 * M + 1, None)]
    assert svc.check_quiet(heard + 130.0) == 0 and len(store.reads) == reads + 1  # once per quiet period
    svc.on_live(bar(3, 2), "m3")                                            # a late copy is not emitted again
    assert out == [3] and svc.counts["quiet_emitted"] == 1


def test_a_quiet_series_whose_bar_is_not_stored_reads_once_and_emits_it_when_it_comes() -> None:
    store = Stored([bar(i, i - 1 if i else None) for i in range(3)])
    svc, out = service(store)
    svc.on_live(bar(3, final=False), None)
    heard = svc._heard[KEY]
    reads = len(store.reads)
    assert svc.check_quiet(heard + 70.0) == 0 and svc.check_quiet(heard + 140.0) == 0
    assert len(store.reads) == reads + 1                                    # once per quiet period
    svc.on_live(bar(3, 2), "m3")                                            # the publisher closes it late
    assert out == [3]
    svc.on_live(bar(4, final=False), None)                                  # a new bar in progress: checked anew
    assert svc.check_quiet(svc._heard[KEY] + 70.0) == 0 and len(store.reads) == reads + 2


def test_a_failed_quiet_read_is_tried_again_after_another_quiet_period() -> None:
    class Down(Stored):
        down = True

        def load(self, *a: Any, **kw: Any) -> tuple[list[Bar], dict[str, int]]:
            if self.down and kw.get("start") is not None:
                raise ConnectionError("MongoDB down")
            return super().load(*a, **kw)

    store = Down([bar(i, i - 1 if i else None) for i in range(3)])
    svc, out = service(store)
    svc.on_live(bar(3, final=False), None)
    heard = svc._heard[KEY]
    store.bars.append(bar(3, 2))
    assert svc.check_quiet(heard + 66.0) == 0                               # logged, not raised into the consumer
    store.down = False
    assert svc.check_quiet(heard + 100.0) == 0                              # the quiet period starts again
    assert svc.check_quiet(heard + 132.0) == 1 and out == [3]


def test_a_quiet_series_without_realtime_bars_reads_its_newer_closed_bars_too() -> None:
    """A 5-min series (no realtime updates by default): its last bar before a break was shed."""
    five = ("SHFE", "rb2605", "5min")

    def b5(i: int) -> Bar:
        return msgspec.structs.replace(bar(5 * i), freq="5min", prev=None if i == 0 else T0 + 5 * (i - 1) * M)

    store = Stored([b5(0)])
    out: list[int] = []
    svc = BarService(store, emit=lambda b, _v: out.append((b.datetime - T0) // (5 * M)))
    svc.subscribe(five)
    svc.on_live(b5(1), "m1")
    heard = svc._heard[five]
    store.bars += [b5(1), b5(2)]                                            # bar 2 stored, shed from the queue
    assert svc.check_quiet(heard + 300.0) == 0                              # not quiet for 5 min + 5 s yet
    assert svc.check_quiet(heard + 306.0) == 1 and out == [1, 2]
