"""``qaflow down``: stop the daemons ``qaflow up`` started (SIGTERM, drain, exit)."""
from __future__ import annotations

import argparse

from handlers.stack import STATE, down


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each daemon to drain")


def run(args: argparse.Namespace) -> int:
    result = down(STATE, args.timeout)
    if not result:
        print("nothing to stop (no daemons recorded under .qaflow/run)")
    for name, what in result.items():
        print(f"{name:12} {what}")
    return 0
