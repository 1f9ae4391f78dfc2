"""Every routing key of the platform is built here, and nowhere else.

Keys are dot-separated words; no word may be empty or contain ``.``, ``*``, ``#`` or
white space, so a key can never accidentally act as a wildcard or shift its words.
"""
from __future__ import annotations

import re

_WORD = re.compile(r"^[^.*#\s]+$")


class KeyError_(ValueError):
    """A routing-key word is empty or holds a character that would change the key's meaning."""


def _word(what: str, value: str) -> str:
    if not isinstance(value, str) or not _WORD.match(value):
        raise KeyError_(f"{what} {value!r} cannot be used in a routing key (empty, or holds '.', '*', '#' or a space)")
    return value


def tick_key(exchange: str, symbol: str) -> str:
    """``tick_key("SHFE", "rb2512") -> "SHFE.rb2512"`` (exchange upper-cased)."""
    return f"{_word('exchange', exchange.upper())}.{_word('symbol', symbol)}"


def bar_key(freq: str, exchange: str, symbol: str) -> str:
    """``bar_key("1min", "SHFE", "rb2512") -> "1min.SHFE.rb2512"``."""
    return f"{_word('frequency', freq)}.{tick_key(exchange, symbol)}"


def order_key(target: str) -> str:
    """Orders to ``qaorder``: the key is the target account or group name."""
    return _word("account or group", target)


def exec_key(account: str) -> str:
    """Child orders to ``qa.exec``: the key is the account."""
    return _word("account", account)


def risk_key(account: str) -> str:
    """Force-close and release commands to ``qarisk``: the key is the account."""
    return _word("account", account)


REPORT_KINDS = ("order", "trade", "account", "reject", "position", "risk", "audit")


def report_key(account: str, kind: str) -> str:
    """Reports to ``qa.report``: ``<account>.<kind>``."""
    if kind not in REPORT_KINDS:
        raise KeyError_(f"report kind {kind!r} is not one of {', '.join(REPORT_KINDS)}")
    return f"{_word('account', account)}.{kind}"


# Binding patterns (topic wildcards) -------------------------------------------------
ALL = "#"


def ticks_of_exchange(exchange: str) -> str:
    return f"{_word('exchange', exchange.upper())}.*"


def bars_of(freq: str = "*", exchange: str = "*", symbol: str = "*") -> str:
    parts = [freq, exchange.upper() if exchange != "*" else "*", symbol]
    return ".".join(p if p == "*" else _word("bar key word", p) for p in parts)


def reports_of(account: str = "*", kind: str = "*") -> str:
    a = account if account == "*" else _word("account", account)
    k = kind if kind == "*" else _word("kind", kind)
    return f"{a}.{k}"
