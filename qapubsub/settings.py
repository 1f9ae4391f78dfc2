"""Settings from the environment, validated at start.

One prefix (``QA_``) for QAFlow's own variables; QUANTAXIS's ``QAPUBSUB_IP/PORT/USER/PWD``
and ``MONGODB`` are accepted too so that an existing QUANTAXIS set-up keeps working.
Secrets never appear in ``repr`` or in log lines: use :func:`redact_url` to print a URL.
"""
from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_MONGO_URL = "mongodb://127.0.0.1:27017/?directConnection=true"
DEFAULT_MONGO_DB = "qaflow"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


def redact_url(url: str) -> str:
    """``amqp://user:secret@host/`` -> ``amqp://user:***@host/``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _split_urls(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.replace(";", ",").split(",") if u.strip())


def _check_url(var: str, url: str, schemes: tuple[str, ...]) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(
            f"{var}={redact_url(url)!r} is not a valid URL: expected {' or '.join(schemes)}://user:password@host:port/"
        )
    try:
        parts.port
    except ValueError as exc:
        raise ConfigError(f"{var}={redact_url(url)!r}: bad port ({exc})") from None
    return url


@dataclass(frozen=True)
class Settings:
    """Process-wide settings. ``amqp_urls`` holds one URL per broker node (fail-over order)."""

    amqp_urls: tuple[str, ...] = (DEFAULT_AMQP_URL,)
    mongo_url: str = DEFAULT_MONGO_URL
    mongo_db: str = DEFAULT_MONGO_DB
    log_level: str = "INFO"
    log_json: bool = False
    risk_user: str = "qarisk"
    namespace: str = ""
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def amqp_url(self) -> str:
        return self.amqp_urls[0]

    def __repr__(self) -> str:  # never show passwords
        urls = ", ".join(redact_url(u) for u in self.amqp_urls)
        return (
            f"Settings(amqp_urls=[{urls}], mongo_url={redact_url(self.mongo_url)!r}, "
            f"mongo_db={self.mongo_db!r}, log_level={self.log_level!r}, namespace={self.namespace!r})"
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        if env.get("QA_AMQP_URL"):
            urls = tuple(_check_url("QA_AMQP_URL", u, ("amqp", "amqps")) for u in _split_urls(env["QA_AMQP_URL"]))
            if not urls:
                raise ConfigError("QA_AMQP_URL is set but holds no URL")
        elif any(env.get(k) for k in ("QAPUBSUB_IP", "QAPUBSUB_PORT", "QAPUBSUB_USER", "QAPUBSUB_PWD")):
            host = env.get("QAPUBSUB_IP", "127.0.0.1")
            port = env.get("QAPUBSUB_PORT", "5672")
            if not port.isdigit():
                raise ConfigError(f"QAPUBSUB_PORT={port!r} is not a port number")
            # QAPUBSUB's own defaults are admin/admin; keep them so its users change nothing.
            user = urllib.parse.quote(env.get("QAPUBSUB_USER", "admin"), safe="")
            pwd = urllib.parse.quote(env.get("QAPUBSUB_PWD", "admin"), safe="")
            urls = (f"amqp://{user}:{pwd}@{host}:{port}/%2F",)
        else:
            urls = (DEFAULT_AMQP_URL,)

        mongo = env.get("QA_MONGO_URL") or env.get("MONGODB") or DEFAULT_MONGO_URL
        if "://" not in mongo:  # QUANTAXIS's MONGODB holds a bare host name
            mongo = f"mongodb://{mongo}:27017/"
        var = "QA_MONGO_URL" if env.get("QA_MONGO_URL") else "MONGODB"
        _check_url(var, mongo, ("mongodb", "mongodb+srv"))

        level = env.get("QA_LOG_LEVEL", "INFO").upper()
        if level not in LOG_LEVELS:
            raise ConfigError(f"QA_LOG_LEVEL={level!r} is not one of {', '.join(LOG_LEVELS)}")
        log_json = env.get("QA_LOG_JSON", "0").lower()
        if log_json not in ("0", "1", "true", "false", "yes", "no", ""):
            raise ConfigError(f"QA_LOG_JSON={log_json!r}: use 1 or 0")
        return cls(
            amqp_urls=urls,
            mongo_url=mongo,
            mongo_db=env.get("QA_MONGO_DB", DEFAULT_MONGO_DB),
            log_level=level,
            log_json=log_json in ("1", "true", "yes"),
            risk_user=env.get("QA_RISK_USER", "qarisk"),
            namespace=env.get("QA_NAMESPACE", ""),
        )


#: pymongo waits forever for a reply by default: a partitioned or hung MongoDB server would stall a
#: daemon for good, silently. With a socket timeout the wait ends in ``NetworkTimeout`` (a
#: ``ConnectionFailure``), which the daemons already treat as an outage: back off, requeue, retry.
#: 60 s leaves room for long scans on nx-27017 (~28k documents/s). ``socketTimeoutMS`` in the URL wins.
MONGO_SOCKET_TIMEOUT_MS = 60_000


def mongo_client(settings: Settings | str, *, server_selection_ms: int = 5000, **kwargs: Any) -> Any:
    """A ``pymongo.MongoClient`` for ``settings.mongo_url`` (or a URL) with QAFlow's timeouts."""
    import pymongo

    url = settings if isinstance(settings, str) else settings.mongo_url
    opts: dict[str, Any] = {"serverSelectionTimeoutMS": server_selection_ms, **kwargs}
    if "sockettimeoutms" not in url.lower():
        opts.setdefault("socketTimeoutMS", MONGO_SOCKET_TIMEOUT_MS)
    return pymongo.MongoClient(url, **opts)
