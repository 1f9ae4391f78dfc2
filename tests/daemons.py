"""Run QAFlow daemons as real subprocesses in tests (``python -m handlers.<name>``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(module: str, *args: str, env: Mapping[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send ``sig`` (if still running) and wait; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


@contextmanager
def running(module: str, *args: str, env: Mapping[str, str] | None = None,
            log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = start(module, *args, env=env, log=log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
