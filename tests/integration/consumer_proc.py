"""A real consumer process for the SIGTERM test.

``python consumer_proc.py AMQP_URL NAMESPACE QUEUE LOGFILE``: consumes QUEUE (bound to the
namespace's qa.exec), each message takes ~1 s; writes ``start N`` / ``done N`` lines.
"""
from __future__ import annotations

import logging
import sys
import time

from qapubsub.sync import Connection, Consumer, Delivery
from qapubsub.topology import Binding, Topology
from tests.integration.test_sync_transport import Ping


def main(argv: list[str]) -> int:
    url, namespace, queue, logfile = argv
    logging.basicConfig(level=logging.WARNING)
    topo = Topology(namespace)
    out = open(logfile, "a", buffering=1)  # noqa: SIM115

    def handler(m: Ping, d: Delivery) -> None:
        out.write(f"start {m.n}\n")
        time.sleep(1.0)  # busy: SIGTERM arrives now
        out.write(f"done {m.n}\n")

    q = topo.durable_queue(queue, Binding(topo.exec, "acc6"))
    consumer = Consumer(Connection(urls=[url]), q, handler, message_type=Ping, topology=topo, prefetch=10)
    return consumer.run_until_signal()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
