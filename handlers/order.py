"""``qaflow order send|cancel``: publish a native order or cancel to ``qaorder`` (confirmed).

Examples::

    qaflow order send --account acc1 --symbol rb2512 --exchange SHFE --direction BUY \\
        --offset OPEN --price 3900 --volume 1            # prints the order id
    qaflow order cancel --account acc1 --order-id ID

The order is validated exactly as the router will (``qaorder.dialects.decode_order``);
an invalid field exits 2 naming it. Exit 3: RabbitMQ unreachable.
"""
from __future__ import annotations

import argparse
import sys

from qaorder.models import Direction, Exchange, Offset, PriceType


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Send an order or a cancel to the qaorder exchange (publisher confirms)."
    parser.add_argument("--namespace", default=None, help="name prefix (tests); default QA_NAMESPACE or none")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("send", help="send a new order; prints its order id",
                       description="Send a new order to an account or a group; prints its order id.")
    s.add_argument("--account", required=True, help="target account or group (routing key)")
    s.add_argument("--symbol", required=True, help="instrument, e.g. rb2512")
    s.add_argument("--exchange", required=True, type=str.upper, choices=[e.value for e in Exchange])
    s.add_argument("--direction", required=True, type=str.upper, choices=[d.value for d in Direction])
    s.add_argument("--offset", required=True, type=str.upper, choices=[o.value for o in Offset])
    s.add_argument("--price", type=float, default=None, help="limit price (required unless --price-type MARKET)")
    s.add_argument("--volume", required=True, type=int)
    s.add_argument("--price-type", default="LIMIT", type=str.upper, choices=[p.value for p in PriceType])
    s.add_argument("--order-id", default=None, help="order id (default: a new unique id)")
    s.add_argument("--strategy-id", default="")
    c = sub.add_parser("cancel", help="cancel an order (and its group / follower children)",
                       description="Cancel an order; the router cancels its group and follower children too.")
    c.add_argument("--account", required=True, help="the account or group the order was sent to")
    c.add_argument("--order-id", required=True)
    c.add_argument("--reason", default="")


def run(args: argparse.Namespace) -> int:
    from handlers.cli import CannotConnect
    from qaorder.dialects import decode_order
    from qaorder.models import Cancel, Order, OrderRejected
    from qapubsub import keys
    from qapubsub.messages import encode, new_id
    from qapubsub.settings import Settings
    from qapubsub.sync import Connection, FatalError, Publisher, PublishError, TransportError
    from qapubsub.topology import Topology

    settings = Settings.from_env()
    topo = Topology(settings.namespace if args.namespace is None else args.namespace)
    try:
        key = keys.order_key(args.account)
        if args.action == "send":
            msg = Order(order_id=args.order_id or new_id(), account=args.account, symbol=args.symbol,
                        exchange=Exchange(args.exchange), direction=Direction(args.direction),
                        offset=Offset(args.offset), price_type=PriceType(args.price_type), price=args.price,
                        volume=args.volume, strategy_id=args.strategy_id, source="cli")
        else:
            msg = Cancel(order_id=args.order_id, account=args.account, reason=args.reason)
        decode_order(encode(msg), key)      # the router's own validation, field named
    except OrderRejected as exc:
        print(f"qaflow order: invalid {exc.field or 'order'}: {exc.reason}", file=sys.stderr)
        return 2
    except (keys.KeyError_, ValueError) as exc:
        print(f"qaflow order: {exc}", file=sys.stderr)
        return 2
    conn = Connection(settings, client_name="qaflow-order", max_retries=1)
    try:
        Publisher(conn, topology=topo).publish(topo.order, key, msg)
    except (FatalError, TransportError) as exc:
        if isinstance(exc, PublishError):
            print(f"qaflow order: not published: {exc}", file=sys.stderr)
            return 1
        raise CannotConnect(str(exc)) from None
    finally:
        conn.close()
    print(msg.order_id)
    return 0


if __name__ == "__main__":
    from handlers.cli import run_module

    raise SystemExit(run_module(__name__, None, "qaflow order"))
