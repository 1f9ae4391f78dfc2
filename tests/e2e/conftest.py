"""Headless Chromium for the dashboard tests, driven over the DevTools protocol (CDP).

No new Python dependency: Chromium runs with ``--remote-debugging-port`` and the tests
talk CDP over tornado's WebSocket client. Chromium comes from Debian (packages
``chromium`` and ``chromium-driver``); :func:`ensure_chromium` installs them when they are
missing and we are root, skips otherwise -- and FAILS when ``CI`` is set.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

IN_CI = bool(os.environ.get("CI"))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--hide-scrollbars")


def ensure_chromium() -> str:
    """Path of a Chromium binary; installs Debian's chromium + chromium-driver if missing and root."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    why = "Chromium is not installed (Debian: apt-get install -y chromium chromium-driver)"
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                           capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
            r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                               capture_output=True, text=True, env=env, timeout=900)
        path = shutil.which("chromium")
        if path:
            return path
        why += f"; apt-get install failed: {r.stderr.strip()[-300:]}"
    else:
        why += "; not root, so it cannot be installed here"
    if IN_CI:
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


class CDP:
    """A minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        await self.ws.write_message(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), max(0.1, deadline - time.monotonic()))
            if raw is None:
                raise AssertionError("DevTools connection closed")
            msg = json.loads(raw)
            if msg.get("id") == i:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expr: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait(self, expr: str, timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                v = await self.eval(expr)
            except AssertionError as exc:   # the page is still loading
                v = str(exc)[:200]
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or expr} (last: {v!r})")
            await asyncio.sleep(0.1)

    async def navigate(self, url: str) -> None:
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)

    async def screenshot(self, path: Path) -> Path:
        r = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[CDP]:
    from tornado.websocket import websocket_connect

    exe = ensure_chromium()
    port = free_port()
    log = open(tmp_path / "chromium.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                             f"--user-data-dir={tmp_path / 'chrome-profile'}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TMPDIR": str(tmp_path)})  # its singleton socket dir: not in /tmp
    try:
        deadline = time.monotonic() + 30
        targets: list[dict[str, Any]] = []
        while not targets:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Chromium did not start: {(tmp_path / 'chromium.log').read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                    targets = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            except OSError:
                await asyncio.sleep(0.2)
        ws = await websocket_connect(targets[0]["webSocketDebuggerUrl"], max_message_size=64 * 1024 * 1024)
        try:
            yield CDP(ws)
        finally:
            ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
