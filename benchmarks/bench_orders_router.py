"""Run the product router (``handlers.router``), optionally under cProfile, for ``benchmarks.bench_orders``.

The measurement copy that lived here (gathered confirms per order, batched writes per order:
1.76x the unbatched router) is retired: ``handlers/router.py`` now batches *across* orders
(see docs/orders.md, Performance). ``--original`` is accepted for compatibility.

::

    python -m benchmarks.bench_orders_router [--namespace NS] [--profile PATH]
"""
from __future__ import annotations

import argparse


def main() -> int:
    """``--profile PATH`` wraps the router in cProfile and writes the stats when it returns after SIGTERM."""
    from handlers.cli import run_module, setup_logging

    p = argparse.ArgumentParser()
    p.add_argument("--namespace", default=None)
    p.add_argument("--original", action="store_true", help="(compatibility) the product router")
    p.add_argument("--profile", default=None, metavar="PATH")
    args = p.parse_args()
    setup_logging(None)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        return run_module("handlers.router", [] if args.namespace is None else ["--namespace", args.namespace],
                          "qaflow router")
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
