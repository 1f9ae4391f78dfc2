"""``qaflow source``: market-data sources publishing ticks to ``qa.tick``.

Sub-subcommands::

    qaflow source random [--seed N] [--instrument SHFE.rb2601 ...] [--no-stocks] [--start "2025-03-03 20:59"]
                         [--rate N | --speed X [--max-gap S] | --asap] [-n N] [--duration S] [--batch K]
                         [--interval-ms 500]
      (default: as fast as possible; ``--speed 1`` without ``--start`` is a real-time feed)
    qaflow source replay FILE.csv ... [--speed X | --asap | --rate N] [--max-gap S] [--batch K]
                         [--symbol rb2601 --exchange SHFE] [--skip-bad-rows]
    qaflow source replay --mongo SHFE.rb2601 [--mongo ...] [--from "2025-03-03 09:00"] [--to ...] [pacing]
    qaflow source sina sh600000 sz000001 ... [--interval 3]
    qaflow source qq   sh600000 sz000001 ... [--interval 3]

All take ``--namespace`` (tests) and ``--confirm-batch``. Each stops on SIGTERM/SIGINT:
stop generating, send partial batches, wait for every publisher confirm, close, exit 0
(a second signal exits at once). Also runnable as ``python -m handlers.source``.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from qapubsub.settings import Settings, mongo_client
from qapubsub.topology import Topology

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    p.add_argument("--confirm-batch", type=int, default=500, help="publisher confirms gathered per window (500)")


def _pacing(p: argparse.ArgumentParser, default_speed: float | None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, default=None, help="ticks per second (paced)")
    g.add_argument("--speed", type=float, default=default_speed,
                   help="follow tick timestamps at X times real time (1 = real time)")
    g.add_argument("--asap", action="store_true", help="as fast as possible")
    p.add_argument("--batch", type=int, default=1, help="ticks per message (TickBatch of one instrument); 1 = Tick")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE")
    sub.required = True

    r = sub.add_parser("random", help="seeded random-walk ticks for many instruments (simulated sessions)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--instrument", action="append", default=None, metavar="EXCHANGE.SYMBOL",
                   help="repeatable; default: ~18 futures and 4 stocks")
    r.add_argument("--no-stocks", action="store_true", help="default set without stocks")
    r.add_argument("--start", default=None, help='simulated local start, e.g. "2025-03-03 20:59:00" (default now)')
    r.add_argument("-n", "--count", type=int, default=None, help="stop after N ticks")
    r.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    r.add_argument("--interval-ms", type=int, default=500, help="simulated step (500 ms, CTP's rate)")
    r.add_argument("--max-gap", type=float, default=None,
                   help="with --speed: cap a closed-market wait to S seconds (default: wait like the real market)")
    _pacing(r, None)
    _common(r)

    rp = sub.add_parser("replay", help="replay ticks from CSV files (our header or vn.py's) or the MongoDB tick store")
    rp.add_argument("files", nargs="*", metavar="FILE.csv")
    rp.add_argument("--mongo", action="append", default=None, metavar="EXCHANGE.SYMBOL",
                    help="replay this instrument from the tick store (QA_MONGO_URL / QA_MONGO_DB); repeatable")
    rp.add_argument("--from", dest="start", default=None, help='with --mongo: local start, "2025-03-03 09:00:00"')
    rp.add_argument("--to", dest="end", default=None, help="with --mongo: local end (inclusive)")
    rp.add_argument("--symbol", default=None, help="for files without a symbol column")
    rp.add_argument("--exchange", default=None, help="for files without an exchange column")
    rp.add_argument("--max-gap", type=float, default=None, help="cap one wall-clock gap to S seconds")
    rp.add_argument("--skip-bad-rows", action="store_true", help="log and skip bad rows instead of stopping")
    rp.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    _pacing(rp, 1.0)
    _common(rp)

    for kind in ("sina", "qq"):
        q = sub.add_parser(kind, help=f"poll {kind} stock quotes over HTTP, publish the changed ones")
        q.add_argument("codes", nargs="+", metavar="CODE", help="sh600000, sz000001, bj430047 or SSE.600000")
        q.add_argument("--interval", type=float, default=3.0, help="seconds between polls (3)")
        q.add_argument("--rounds", type=int, default=None, help="stop after N polls")
        _common(q)


def _publisher(args: argparse.Namespace) -> tuple[Any, Any, Topology]:
    from handlers.cli import CannotConnect
    from qapubsub.settings import redact_url
    from qapubsub.sync import Connection, StreamPublisher, TransportError

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    conn = Connection(settings, max_retries=2, client_name=f"qaflow-source-{args.source}")
    try:
        conn.ensure()
    except TransportError as exc:
        raise CannotConnect(f"RabbitMQ at {redact_url(settings.amqp_url)}: {exc}") from None
    return conn, StreamPublisher(conn, topology=topo, batch_size=args.confirm_batch), topo


def _pace(args: argparse.Namespace) -> dict[str, Any]:
    if args.asap:
        return {"rate": None, "speed": None}
    return {"rate": args.rate, "speed": None if args.rate is not None else args.speed}


def run(args: argparse.Namespace) -> int:
    if args.source == "random":
        return _run_random(args)
    if args.source == "replay":
        return _run_replay(args)
    return _run_quotes(args)


def _run_random(args: argparse.Namespace) -> int:
    from brokers.random_source import RandomSource, default_instruments

    instruments = args.instrument or default_instruments(args.start, stocks=not args.no_stocks)
    src = RandomSource(args.seed, instruments, start=args.start, interval_ms=args.interval_ms)
    conn, pub, topo = _publisher(args)
    try:
        n = src.publish(pub, n=args.count, duration=args.duration, batch=args.batch, exchange=topo.tick,
                        max_gap=args.max_gap, **_pace(args))
    finally:
        conn.close()
    print(f"published {n} ticks of {len(src.instruments)} instruments to {topo.tick} "
          f"({pub.published} messages, {pub.confirmed} confirmed)")
    return 0


def _run_replay(args: argparse.Namespace) -> int:
    from brokers.random_source import from_any
    from brokers.replay import CsvFormatError, publish_ticks, read_csvs, ticks_from_mongo

    if bool(args.files) == bool(args.mongo):
        print("qaflow source replay: give CSV files or --mongo EXCHANGE.SYMBOL (one of the two)", file=sys.stderr)
        return 2
    client = None
    if args.mongo:

        settings = Settings.from_env()
        client = mongo_client(settings)
        start = from_any(args.start) if args.start else None
        end = from_any(args.end) if args.end else None
        ticks = ticks_from_mongo(client[settings.mongo_db], args.mongo, start, end)
    else:
        ticks = read_csvs(args.files, symbol=args.symbol, exchange=args.exchange, skip_bad_rows=args.skip_bad_rows)
    conn, pub, topo = _publisher(args)
    try:
        n = publish_ticks(pub, ticks, exchange=topo.tick, batch=args.batch, max_gap=args.max_gap,
                          duration=args.duration, **_pace(args))
    except (CsvFormatError, OSError) as exc:
        print(f"qaflow source replay: {exc}", file=sys.stderr)
        pub.flush()
        return 1
    finally:
        conn.close()
        if client is not None:
            client.close()
    print(f"replayed {n} ticks to {topo.tick} ({pub.published} messages, {pub.confirmed} confirmed)")
    return 0


def _run_quotes(args: argparse.Namespace) -> int:
    from brokers.quotes import QuotePoller
    from brokers.replay import StopFlag
    from qapubsub import keys

    conn, pub, topo = _publisher(args)
    stop = StopFlag()

    def on_ticks(ticks: list[Any]) -> None:
        for t in ticks:
            pub.publish(topo.tick, keys.tick_key(t.exchange, t.symbol), t)
        pub.flush()

    poller = QuotePoller(args.source, args.codes, on_ticks, interval=args.interval)
    previous = {s: signal.signal(s, stop.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        n = poller.run(stop=stop, rounds=args.rounds)
        pub.flush()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        conn.close()
    print(f"published {n} changed {args.source} quotes in {poller.rounds} polls to {topo.tick}")
    return 0


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow source"))
