"""The ``qaflow`` command: one CLI, one subcommand per daemon or tool.

Each subcommand lives in its own module under ``handlers/`` exposing
``configure(parser)`` and ``run(args) -> int``; that module is also runnable as
``python -m handlers.<name>``. Exit codes follow dramatiq: 0 ok, 1 error, 2 usage,
3 cannot connect.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

from qapubsub.settings import ConfigError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("handlers.doctor", "check broker, MongoDB, credentials and topology; say what to fix"),
    "declare": ("handlers.declare", "declare every exchange and platform queue (idempotent)"),
    "demo": ("handlers.demo", "the live demo `make run` shows: ticks, bars, orders, copy-trade, fills"),
    "up": ("handlers.stack", "start the platform's daemons in the background (logs in .qaflow/logs)"),
    "down": ("handlers.down", "stop the daemons `qaflow up` started"),
    "tickhandler": ("handlers.tickhandler", "daemon: clean, persist and aggregate ticks into bars"),
    "barhandler": ("handlers.barhandler", "daemon: history + live bars merged, indicators, history requests"),
    "router": ("handlers.router", "daemon: order router (groups, copy-trade, risk, force-close) to qa.exec"),
    "broker": ("handlers.broker", "executors: sim (paper trading); ctp and qmt"),
    "account": ("handlers.account", "daemon: QIFI accounts from reports; open, instrument, settle, show"),
    "risk": ("handlers.risk", "risk desk: live monitor daemon; force-close, release, status, config"),
    "strategy": ("handlers.strategy", "daemon: run a strategy (module:Class) on live bars; orders to qaorder"),
    "web": ("handlers.web", "daemon: WebSocket quotes and accounts, REST API, dashboard"),
    "order": ("handlers.order", "send or cancel an order (published to qaorder, confirmed)"),
    "follow": ("handlers.follow", "add, remove or list copy-trade follower rules"),
    "source": ("handlers.source", "market-data sources: random, replay, sina, qq"),
}


class CannotConnect(RuntimeError):
    """A server is unreachable; the CLI exits 3 with this message."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qaflow", description="QAFlow: RabbitMQ-routed event platform for quant trading")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING... (default: QA_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def setup_logging(level: str | None, as_json: bool = False) -> None:
    from qapubsub.settings import Settings

    try:
        settings = Settings.from_env()
        level = level or settings.log_level
        as_json = as_json or settings.log_json
    except ConfigError:
        level = level or "INFO"
    fmt = ('{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}' if as_json
           else "%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    # pika narrates every connection at INFO; our own modules log what matters.
    for noisy in ("pika", "aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)


def run_module(module: str, argv: Sequence[str] | None, prog: str) -> int:
    """Entry for ``python -m handlers.<name>``: the same parser as ``qaflow <name>``."""
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=prog)
    mod.configure(parser)
    args = parser.parse_args(argv)
    return dispatch(mod, args)


def _exit_before_work(signum: int, _frame: object) -> None:
    # Until a daemon installs its own handlers (when it starts consuming) nothing is in flight:
    # a SIGTERM while it connects or declares is a clean exit, not a death by signal.
    raise SystemExit(EXIT_OK)


def dispatch(mod: object, args: argparse.Namespace) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_work)
    setup_logging(getattr(args, "log_level", None))
    try:
        return int(mod.run(args))  # type: ignore[attr-defined]
    except ConfigError as exc:
        print(f"qaflow: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CannotConnect as exc:
        print(f"qaflow: cannot connect: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints usage; keep its code (0 for --help, 2 for a typo)
        return int(exc.code or 0)
    return dispatch(importlib.import_module(args._module), args)


if __name__ == "__main__":
    raise SystemExit(main())
