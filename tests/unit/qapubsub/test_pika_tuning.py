"""qapubsub.sync's receive path for pika: frames cut at their sizes, large frames gathered.

Pure: a synthetic AMQP frame stream (pika's own marshalling) is fed in arbitrary pieces to
pika's Connection._on_data_available as patched by qapubsub.sync; every frame must come out
once, whole and in order, whatever the cut points.
"""
from __future__ import annotations

import pika.connection
import pika.frame
import pika.spec
from hypothesis import given, settings
from hypothesis import strategies as st

from qapubsub import sync


class _Sink:
    """Just enough of a pika Connection for _on_data_available."""

    def __init__(self) -> None:
        self._frame_buffer = b""
        self.frames: list[bytes] = []
        self.bytes_received = 0

    def _process_frame(self, frame_value) -> None:  # noqa: ANN001
        self.frames.append(frame_value.marshal())

    def _read_frame(self):  # noqa: ANN202 - pika's own, for what the fast path hands back
        return pika.frame.decode_frame(self._frame_buffer)

    def _trim_frame_buffer(self, n: int) -> None:
        self._frame_buffer = self._frame_buffer[n:]
        self.bytes_received += n


def _stream(body_sizes: list[int]) -> list[bytes]:
    frames: list[bytes] = []
    for i, size in enumerate(body_sizes):
        body = bytes((i + j) % 251 for j in range(size))
        frames.append(pika.frame.Method(1, pika.spec.Basic.Deliver("ctag", i + 1, False, "ex", "key")).marshal())
        frames.append(pika.frame.Header(1, size, pika.spec.BasicProperties(message_id=f"m{i}")).marshal())
        for k in range(0, size, 131_064):   # bodies above frame_max come in several frames
            frames.append(pika.frame.Body(1, body[k:k + 131_064]).marshal())
        if i % 3 == 0:
            frames.append(pika.frame.Heartbeat().marshal())
    return frames


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 7, 8, 300, 4095, 4096, 20_000, 70_000, 140_000, 300_000]),
                      min_size=1, max_size=8),
       cuts=st.lists(st.integers(min_value=1, max_value=90_000), min_size=1, max_size=40))
def test_every_frame_comes_out_once_whole_and_in_order_whatever_the_reads(sizes: list[int], cuts: list[int]) -> None:
    assert sync.PIKA_TUNED, "the tuning is not installed (QA_PIKA_STOCK set, or another pika layout)"
    frames = _stream(sizes)
    data = b"".join(frames)
    sink = _Sink()
    pos, i = 0, 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        pika.connection.Connection._on_data_available(sink, data[pos:pos + n])  # type: ignore[arg-type]
        pos, i = pos + n, i + 1
    assert sink.frames == frames
    assert not sink._frame_buffer and not sink.__dict__.get("_qaflow_pend")
    assert sink.bytes_received == len(data)   # what pika's heartbeat checker reads
