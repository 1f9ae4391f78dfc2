"""``qaflow demo`` (placeholder until the transport lands)."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ticks", type=int, default=200, help="ticks to publish")


def run(args: argparse.Namespace) -> int:
    return 0
