"""Tick sources against the real broker: exact counts, routing keys, decodable bodies, SIGTERM on a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from brokers.random_source import RandomSource, default_instruments, market_fields
from brokers.replay import read_csv, replay, write_csv
from qamarket.models import Tick, TickBatch
from qapubsub import keys
from qapubsub.messages import decode
from qapubsub.sync import Connection, StreamPublisher
from qapubsub.topology import Binding, Queue, Topology, declare_queue_sync
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]


def _queue(channel: Any, topology: Topology, name: str, pattern: str = keys.ALL) -> str:
    return declare_queue_sync(channel, Queue(topology.name(name), durable=False,
                                             bindings=(Binding(topology.tick, pattern),)))


def _count(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def _drain(channel: Any, queue: str) -> list[tuple[str, Any, bytes]]:
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((method.routing_key, props, body))


def test_random_source_publishes_exactly_n_ticks(amqp_url: str, topology: Topology, amqp_channel) -> None:
    q = _queue(amqp_channel, topology, "t.src.all")
    rb = next(sym for ex, sym in default_instruments("2025-03-03 14:58:00") if sym.startswith("rb"))
    q_rb = _queue(amqp_channel, topology, "t.src.rb", keys.tick_key("SHFE", rb))
    conn = Connection(urls=[amqp_url])
    try:
        src = RandomSource(21, start="2025-03-03 14:58:00")
        n = src.publish(StreamPublisher(conn, topology=topology, batch_size=200), n=1500, install_signals=False)
    finally:
        conn.close()
    assert n == 1500
    wait_for(lambda: _count(amqp_channel, q) == 1500, timeout=10, what="1500 ticks in the queue")
    got = _drain(amqp_channel, q)
    assert len(got) == 1500
    ticks = []
    for key, props, body in got:
        t = decode(body, Tick)
        assert key == keys.tick_key(t.exchange, t.symbol)
        assert props.type == "qa.tick" and props.message_id == t.id and props.delivery_mode == 1
        ticks.append(t)
    expected = [market_fields(t) for t in RandomSource(21, start="2025-03-03 14:58:00").ticks(1500)]
    assert [market_fields(t) for t in ticks] == expected  # one publisher, one queue: order kept
    only_rb = _drain(amqp_channel, q_rb)
    assert only_rb and len(only_rb) == sum(1 for t in ticks if t.symbol == rb)


def test_random_source_batches(amqp_url: str, topology: Topology, amqp_channel) -> None:
    q = _queue(amqp_channel, topology, "t.src.batch")
    conn = Connection(urls=[amqp_url])
    try:
        src = RandomSource(5, ["SHFE.rb2605", "CFFEX.IF2603", "SSE.600000"], start="2025-03-03 10:00:00")
        pub = StreamPublisher(conn, topology=topology)
        assert src.publish(pub, n=400, batch=25, install_signals=False) == 400
    finally:
        conn.close()
    wait_for(lambda: _count(amqp_channel, q) == pub.published, timeout=10, what="every batch")
    total = 0
    for key, props, body in _drain(amqp_channel, q):
        b = decode(body, TickBatch)
        assert key == keys.tick_key(b.exchange, b.symbol) and props.type == "qa.tickbatch"
        assert all(t.symbol == b.symbol for t in b.ticks) and 1 <= len(b.ticks) <= 25
        total += len(b.ticks)
    assert total == 400 and pub.published < 400 / 20


def test_csv_replay_fast(amqp_url: str, topology: Topology, amqp_channel, tmp_path: Path) -> None:
    q = _queue(amqp_channel, topology, "t.src.replay")
    ticks = list(RandomSource(8, ["DCE.m2605", "SZSE.000001"], start="2025-03-03 10:29:00").ticks(300))
    path = tmp_path / "ticks.csv"
    with path.open("w", newline="") as fh:
        write_csv(ticks, fh)
    conn = Connection(urls=[amqp_url])
    try:
        n = replay(StreamPublisher(conn, topology=topology), read_csv(path), speed=None, install_signals=False)
    finally:
        conn.close()
    assert n == 300
    wait_for(lambda: _count(amqp_channel, q) == 300, timeout=10, what="300 replayed ticks")
    got = [decode(body, Tick) for _, _, body in _drain(amqp_channel, q)]
    assert [market_fields(t) for t in got] == [market_fields(t) for t in ticks]


def test_cli_random_stops_on_sigterm_with_exit_0(amqp_url: str, topology: Topology, amqp_channel) -> None:
    q = _queue(amqp_channel, topology, "t.src.cli")
    env = {**os.environ, "QA_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "handlers.source", "random", "--namespace", topology.namespace, "--seed", "3",
         "--start", "2025-03-03 09:30:00", "--rate", "400", "--batch", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _count(amqp_channel, q) >= 100, timeout=15, what="the source publishing")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # every tick it says it published was confirmed and is in the queue: nothing lost at the stop
    line = [ln for ln in out.splitlines() if ln.startswith("published ")][-1]
    n = int(line.split()[1])
    assert f"{n} messages, {n} confirmed" in line
    assert _count(amqp_channel, q) == n
    got = _drain(amqp_channel, q)
    assert all(key == keys.tick_key(decode(body, Tick).exchange, decode(body, Tick).symbol) for key, _, body in got)


def test_cli_replay_vnpy_csv_as_fast_as_possible(amqp_url: str, topology: Topology, amqp_channel,
                                                 tmp_path: Path) -> None:
    q = _queue(amqp_channel, topology, "t.src.clireplay")
    path = tmp_path / "IF2503.csv"  # vn.py dialect: one instrument per file, no symbol/exchange columns
    path.write_text("datetime,last_price,volume,gateway_name\n"
                    + "".join(f"2025-03-03 09:30:{s:02d}.500000+08:00,{3876 + s * 0.2:.1f},{s + 1},CTP\n"
                              for s in range(40)))
    env = {**os.environ, "QA_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "handlers.source", "replay", str(path), "--asap", "--symbol", "IF2503",
                          "--exchange", "CFFEX", "--namespace", topology.namespace, "--batch", "10"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "replayed 40 ticks" in res.stdout and "4 messages, 4 confirmed" in res.stdout
    wait_for(lambda: _count(amqp_channel, q) == 4, timeout=10, what="4 batches")
    batches = [decode(body, TickBatch) for _, _, body in _drain(amqp_channel, q)]
    ticks = [t for b in batches for t in b.ticks]
    assert [t.volume for t in ticks] == list(range(1, 41)) and {t.source for t in ticks} == {"CTP"}
    assert {(t.exchange, t.symbol) for t in ticks} == {("CFFEX", "IF2503")}


def test_replay_from_the_mongodb_tick_store(amqp_url: str, topology: Topology, amqp_channel, mongo_db) -> None:
    from brokers.replay import ticks_from_mongo
    from qamarket.sessions import ms_of
    from qamarket.store import TickStore

    ticks = list(RandomSource(6, ["SHFE.rb2605", "DCE.m2605"], start="2025-03-03 10:00:00").ticks(120))
    TickStore(mongo_db).write(ticks)
    start, end = ms_of(2025, 3, 3, 10, 0, 10), ms_of(2025, 3, 3, 10, 0, 40)
    want = [t for t in ticks if start <= t.datetime <= end]
    got = list(ticks_from_mongo(mongo_db, ["SHFE.rb2605", "DCE.m2605"], start, end))
    assert sorted(map(market_fields, got)) == sorted(map(market_fields, want))
    assert [t.datetime for t in got] == sorted(t.datetime for t in got)
    q = _queue(amqp_channel, topology, "t.src.mongo")
    conn = Connection(urls=[amqp_url])
    try:
        n = replay(StreamPublisher(conn, topology=topology), got, speed=None, install_signals=False)
    finally:
        conn.close()
    wait_for(lambda: _count(amqp_channel, q) == n == len(want), timeout=10, what="the stored ticks replayed")
