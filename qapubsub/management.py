"""A small client for RabbitMQ's management HTTP API (plugin ``rabbitmq_management``).

Used by ``qaflow doctor`` (exchange types, users, cluster nodes, queue leaders) and by the
tests to find what they declared. Credentials come from the AMQP URL; port 15672 unless
``QA_MANAGEMENT_URL`` says otherwise.
"""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ManagementError(RuntimeError):
    pass


class Management:
    def __init__(self, amqp_url: str, base_url: str | None = None, timeout: float = 5.0) -> None:
        parts = urllib.parse.urlsplit(amqp_url)
        self.vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        user = urllib.parse.unquote(parts.username or "guest")
        pwd = urllib.parse.unquote(parts.password or "guest")
        # QA_MANAGEMENT_URL may list one URL per cluster node (comma-separated): tried in order.
        bases = base_url or os.environ.get("QA_MANAGEMENT_URL") or f"http://{parts.hostname}:15672"
        self.bases = [b.strip().rstrip("/") for b in bases.split(",") if b.strip()]
        self.base = self.bases[0]
        self._auth = "Basic " + base64.b64encode(f"{user}:{pwd}".encode()).decode()
        self.timeout = timeout

    def get(self, path: str) -> Any:
        """GET from the current node's API; on a connection failure, from the next listed node."""
        order = [self.base, *(b for b in self.bases if b != self.base)]
        for i, base in enumerate(order):
            try:
                result = self._get(base, path)
            except ManagementError as exc:
                if "not reachable" not in str(exc) or i == len(order) - 1:
                    raise
                continue
            self.base = base
            return result
        raise AssertionError("unreachable")

    def _get(self, base: str, path: str) -> Any:
        req = urllib.request.Request(base + path, headers={"Authorization": self._auth})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - loopback/configured URL
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ManagementError(f"GET {path}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ManagementError(f"management API at {base} not reachable: {exc}") from None

    def _vh(self) -> str:
        return urllib.parse.quote(self.vhost, safe="")

    def exchanges(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.get(f"/api/exchanges/{self._vh()}?columns=name,type,durable,arguments")}

    def queues(self) -> dict[str, dict[str, Any]]:
        cols = "name,type,durable,arguments,consumers,messages,leader,members,online,node"
        return {q["name"]: q for q in self.get(f"/api/queues/{self._vh()}?columns={cols}")}

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.get("/api/nodes?columns=name,running,type"))

    def whoami(self) -> dict[str, Any]:
        return dict(self.get("/api/whoami"))
