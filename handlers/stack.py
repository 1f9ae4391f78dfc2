"""Run several QAFlow daemons together: ``qaflow up`` / ``qaflow down`` and the demo.

Each daemon is a real ``python -m handlers.cli <command> ...`` process with its own log
file (``.qaflow/logs/<name>.log``) and PID file (``.qaflow/run/<name>.pid``). ``down``
sends SIGTERM to exactly the PIDs recorded by ``up`` (after checking that each still runs
a QAFlow command) and waits for them to drain and exit.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qapubsub.settings import ConfigError
from qapubsub.topology import tick_shards_from_env

STATE = Path(os.environ.get("QA_STATE_DIR", ".qaflow"))


@dataclass
class Daemon:
    name: str
    argv: tuple[str, ...]


#: the example strategy `make run` trades with
STRATEGY = ("strategy", "qamarket.strategies.ma_cross:MaCross", "--id", "ma-demo", "--symbol", "SHFE.rb2605",
            "--freq", "1min", "--param", "fast=3", "slow=8", "volume=2")


def default_daemons(accounts: Sequence[str] = ("demo1", "demo2", "demo3"),
                    strategy_accounts: Sequence[str] = ("demo1", "demo2"), web_port: int = 8010,
                    tick_shards: int | None = None) -> list[Daemon]:
    """The whole platform: data in, bars, orders, executors, accounts, risk, a strategy, the web.

    One tickhandler per tick shard (``tick_shards``, default ``QA_TICK_SHARDS`` or 1): every shard
    queue needs its consumer, or the instruments hashed to it would wait there unhandled.
    """
    acc = tuple(a for name in accounts for a in ("--account", name))
    shards = tick_shards_from_env() if tick_shards is None else tick_shards
    ticks = [Daemon("tickhandler", ("tickhandler",))] if shards == 1 else [
        Daemon(f"tickhandler-{i}", ("tickhandler", "--shard", str(i), "--shards", str(shards))) for i in range(shards)]
    return [
        *ticks,
        Daemon("barhandler", ("barhandler", "--subscribe", "SHFE.rb2605:1min,5min")),
        Daemon("router", ("router",)),
        Daemon("broker-sim", ("broker", "sim", *acc)),
        Daemon("account", ("account", "run")),
        Daemon("risk", ("risk", "run")),
        Daemon("strategy", (*STRATEGY[:2], "--accounts", ",".join(strategy_accounts), *STRATEGY[2:])),
        Daemon("web", ("web", "--port", str(web_port))),
    ]


class Stack:
    def __init__(self, state: Path = STATE, env: Mapping[str, str] | None = None) -> None:
        self.state = state
        self.logs = state / "logs"
        self.run_dir = state / "run"
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, d: Daemon, *, detach: bool = False) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{d.name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "handlers.cli", *d.argv], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach)
        log.close()
        (self.run_dir / f"{d.name}.pid").write_text(str(proc.pid))
        self.procs[d.name] = proc
        return proc

    def dead(self) -> dict[str, int]:
        """Daemons that exited, with their codes."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = None
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        return codes


def _is_ours(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"handlers.cli" in cmd


def down(state: Path = STATE, timeout: float = 30.0) -> dict[str, int | str]:
    """SIGTERM the daemons ``up`` recorded; returns name -> 'stopped' / 'not running' / 'killed'."""
    out: dict[str, int | str] = {}
    run_dir = state / "run"
    pids: dict[str, int] = {}
    for f in sorted(run_dir.glob("*.pid")) if run_dir.exists() else []:
        pid = int(f.read_text().strip() or 0)
        if pid and _is_ours(pid):
            os.kill(pid, signal.SIGTERM)
            pids[f.stem] = pid
        else:
            out[f.stem] = "not running"
        f.unlink()
    deadline = time.monotonic() + timeout
    for name, pid in pids.items():
        while _is_ours(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_ours(pid):
            os.kill(pid, signal.SIGKILL)
            out[name] = "killed after timeout"
        else:
            out[name] = "stopped"
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accounts", default="demo1,demo2,demo3", help="paper accounts the executor serves")
    parser.add_argument("--strategy-accounts", default="demo1,demo2", help="accounts the example strategy trades")
    parser.add_argument("--web-port", type=int, default=8010)
    parser.add_argument("--tick-shards", type=int, default=None, metavar="N",
                        help="tickhandler processes, one per shard (default QA_TICK_SHARDS or 1; about one per "
                             "spare core for heavy feeds, see docs/operations.md)")


def run(args: argparse.Namespace) -> int:
    """``qaflow up``: start the platform's daemons in the background."""
    if args.tick_shards is not None and args.tick_shards < 1:
        raise ConfigError(f"--tick-shards {args.tick_shards}: at least 1")
    stack = Stack()
    for d in default_daemons([a for a in args.accounts.split(",") if a],
                             [a for a in args.strategy_accounts.split(",") if a], args.web_port, args.tick_shards):
        p = stack.start(d, detach=True)
        print(f"started {d.name:12} pid {p.pid}  log {stack.logs / (d.name + '.log')}")
    print("stop them with: qaflow down")
    return 0
