"""``qaflow declare``: declare every exchange and platform queue, idempotently."""
from __future__ import annotations

import argparse

from qapubsub.settings import Settings
from qapubsub.topology import Topology, tick_shards_from_env


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    parser.add_argument("--tick-shards", type=int, default=None,
                        help="tick shard queues to declare (default QA_TICK_SHARDS or 1)")


def run(args: argparse.Namespace) -> int:
    import pika

    from handlers.cli import CannotConnect

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    try:
        conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    except Exception as exc:  # noqa: BLE001
        raise CannotConnect(f"RabbitMQ at {settings.amqp_url and __import__('qapubsub').redact_url(settings.amqp_url)}: {exc}") from None
    shards = args.tick_shards if args.tick_shards is not None else tick_shards_from_env()
    queues = [*topo.platform_queues, *(topo.tick_queue(i) for i in range(1, shards))]
    try:
        topo.declare_sync(conn.channel(), queues=queues)
    finally:
        conn.close()
    print(f"declared {len(topo.exchanges)} exchanges and {len(queues)} queues ({shards} tick shard(s))")
    return 0


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow declare"))
