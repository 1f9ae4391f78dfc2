"""Pure logic of the web daemon (no I/O): quotes, diffs, batching, slow clients, tokens.

The WebSocket protocol reproduces the spirit of DIFF (shinnytech's "Differential
Information Flow for Finance", used by TQ and by QUANTAXIS's QAUTLRA-RS): the server
keeps, per client, a *tree* of data (``quotes``, ``trade``) and sends only what changed
as ``{"aid": "rtn_data", "data": [patch, ...]}``; the client merges every patch into its
own copy of the tree (a recursive dict merge, latest value wins).

* :func:`quote_of` -- a :class:`qamarket.models.Tick` as a DIFF quote dict.
* :class:`QuoteBook` -- the latest full quote per instrument and :meth:`QuoteBook.update`,
  which returns the fields that changed (all of them for the first tick of an instrument).
* :class:`ClientState` -- one client's pending patch: changes are merged into it
  (coalesced: the latest value of a field wins), :meth:`ClientState.take` hands out a
  batch when ``max_changes`` distinct leaves are waiting or ``interval`` seconds have passed since
  the last batch, and only when the previous message has been written (one message in
  flight per client). A client whose previous message is still unwritten after
  ``drop_after`` seconds, or whose pending tree exceeds ``max_pending`` entries, is to be
  dropped (:meth:`ClientState.drop_reason`). Memory per client is thus bounded by one
  message in flight plus one coalesced tree.
* :class:`Subscriptions` -- reference-counted interest: which instruments (accounts) the
  union of clients needs, and what to bind / unbind when a client changes its list.
* :class:`Tokens` -- ``QA_WEB_TOKENS`` / ``QA_WEB_TOKEN``: which accounts a token covers.
"""
from __future__ import annotations

import datetime as _dt
import hmac
import json
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "QUOTE_FIELDS", "quote_of", "format_datetime", "QuoteBook", "merge", "count_leaves", "ClientState",
    "Subscriptions", "Tokens", "TokenError", "parse_ins_list", "parse_accounts", "instrument_key",
]

# DIFF quote field -> Tick attribute (vn.py names on our side, DIFF/TQ names on the wire).
QUOTE_FIELDS: tuple[tuple[str, str], ...] = (
    ("last_price", "last_price"), ("highest", "high_price"), ("lowest", "low_price"), ("open", "open_price"),
    ("volume", "volume"), ("amount", "turnover"), ("open_interest", "open_interest"),
    ("pre_close", "pre_close"), ("pre_settlement", "pre_settlement"),
    ("upper_limit", "limit_up"), ("lower_limit", "limit_down"),
    *((f"bid_price{i}", f"bid_price_{i}") for i in range(1, 6)),
    *((f"bid_volume{i}", f"bid_volume_{i}") for i in range(1, 6)),
    *((f"ask_price{i}", f"ask_price_{i}") for i in range(1, 6)),
    *((f"ask_volume{i}", f"ask_volume_{i}") for i in range(1, 6)),
)


def format_datetime(ms: int) -> str:
    """Exchange-local epoch ms -> ``"2025-03-03 09:00:00.500"`` (DIFF's quote ``datetime``)."""
    d = _dt.datetime(1970, 1, 1) + _dt.timedelta(milliseconds=ms)
    return d.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d}"


def instrument_key(exchange: str, symbol: str) -> str:
    """DIFF's instrument id: ``"SHFE.rb2605"``."""
    return f"{exchange}.{symbol}"


def _num(x: float) -> float | int:
    """Compact numbers: integers travel without ``.0`` (volumes, prices on integer ticks) and
    binary-float noise is cut (``3891.7999999999997`` -> ``3891.8``: 6 decimals are kept, far
    below any tick size); the book, the diffs and the full quotes all hold the same value."""
    if x != x or abs(x) >= 1e15:
        return x
    r = round(x, 6)
    return int(r) if r == int(r) else r


def quote_of(tick: Any) -> dict[str, Any]:
    """A tick as a full DIFF quote (``instrument_id``, ``datetime``, prices, 5 levels)."""
    q: dict[str, Any] = {"instrument_id": instrument_key(str(tick.exchange), tick.symbol),
                         "datetime": format_datetime(tick.datetime), "trading_day": tick.trading_day}
    for name, attr in QUOTE_FIELDS:
        q[name] = _num(getattr(tick, attr))
    return q


class QuoteBook:
    """Latest full quote per instrument key."""

    def __init__(self) -> None:
        self.quotes: dict[str, dict[str, Any]] = {}

    def update(self, key: str, quote: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``quote`` as the instrument's latest; return the fields that changed
        (every field for an instrument seen for the first time; ``{}`` if nothing changed)."""
        old = self.quotes.get(key)
        if old is None:
            self.quotes[key] = dict(quote)
            return dict(quote)
        changed = {k: v for k, v in quote.items() if old.get(k, _MISSING) != v}
        if changed:
            old.update(changed)
        return changed

    def get(self, key: str) -> dict[str, Any] | None:
        return self.quotes.get(key)


_MISSING = object()


def merge(tree: dict[str, Any], patch: Mapping[str, Any]) -> int:
    """Merge ``patch`` into ``tree`` in place (DIFF's rule: dicts merge, anything else
    replaces; ``None`` deletes). Returns the number of new leaves added to ``tree``."""
    added = 0
    for k, v in patch.items():
        if isinstance(v, Mapping):
            sub = tree.get(k)
            if not isinstance(sub, dict):
                sub = tree[k] = {}
            added += merge(sub, v)
        elif v is None:
            tree[k] = None
        else:
            if k not in tree:
                added += 1
            tree[k] = v
    return added


def count_leaves(tree: Mapping[str, Any]) -> int:
    return sum(count_leaves(v) if isinstance(v, Mapping) else 1 for v in tree.values())


@dataclass
class ClientState:
    """One client's pending changes, batching and slow-client bookkeeping (times in seconds,
    from whatever monotonic clock the caller passes)."""

    interval: float = 0.1         # send at most this long after the first pending change
    max_changes: int = 2000       # ... or as soon as this many distinct leaves are waiting (coalesced
                                  # changes do not count: 10 ticks of one instrument are one diff)
    drop_after: float = 5.0       # previous message still unwritten this long -> drop
    max_pending: int = 100_000    # distinct pending leaves (bounded memory) -> drop
    pending: dict[str, Any] = field(default_factory=dict)
    changes: int = 0              # changes merged since the last batch (coalesced ones too)
    leaves: int = 0               # distinct pending leaves
    first_change_at: float | None = None
    in_flight_since: float | None = None   # a message was handed out and is not written yet
    oldest_origin_ns: int | None = None    # origin time of the oldest change waiting
    sent_batches: int = 0
    coalesced: int = 0            # changes overwritten before they were sent
    urgent: bool = False          # a snapshot is waiting: send at the next chance

    def add(self, patch: Mapping[str, Any], now: float, *, changes: int | None = None,
            origin_ns: int | None = None, urgent: bool = False) -> None:
        """Merge a patch; ``changes`` defaults to its number of leaves."""
        n = count_leaves(patch) if changes is None else changes
        new = merge(self.pending, patch)
        self.leaves += new
        self.coalesced += max(0, n - new)
        self.changes += n
        if self.first_change_at is None:
            self.first_change_at = now
        if origin_ns is not None and (self.oldest_origin_ns is None or origin_ns < self.oldest_origin_ns):
            self.oldest_origin_ns = origin_ns
        self.urgent = self.urgent or urgent

    def due(self, now: float) -> bool:
        """A batch should go now (if the client can take it)."""
        if not self.pending:
            return False
        if self.urgent or self.leaves >= self.max_changes:
            return True
        return self.first_change_at is not None and now - self.first_change_at >= self.interval - 1e-9

    def take(self, now: float) -> tuple[dict[str, Any], int | None] | None:
        """Hand out the pending tree (and the oldest origin ns) if due and nothing is in
        flight; the caller sends it and calls :meth:`written` when the write completed."""
        if self.in_flight_since is not None or not self.due(now):
            return None
        tree, origin = self.pending, self.oldest_origin_ns
        self.pending, self.changes, self.leaves = {}, 0, 0
        self.first_change_at, self.oldest_origin_ns, self.urgent = None, None, False
        self.in_flight_since = now
        self.sent_batches += 1
        return tree, origin

    def written(self) -> None:
        self.in_flight_since = None

    def drop_reason(self, now: float) -> str | None:
        """Why this client must be dropped now, or ``None``."""
        if self.in_flight_since is not None and now - self.in_flight_since > self.drop_after:
            return f"too slow: a message stayed unwritten for more than {self.drop_after:g} s"
        if self.leaves > self.max_pending:
            return f"too slow: more than {self.max_pending} pending updates"
        return None


def rtn_data(tree: Mapping[str, Any], origin_ns: int | None = None) -> dict[str, Any]:
    """The message carrying a patch (``origin_ns``: UTC ns of the oldest tick in it)."""
    msg: dict[str, Any] = {"aid": "rtn_data", "data": [tree]}
    if origin_ns is not None:
        msg["origin_ns"] = origin_ns
    return msg


class Subscriptions:
    """Reference-counted interest of many clients in keys (instruments or accounts)."""

    def __init__(self) -> None:
        self.by_client: dict[Hashable, set[str]] = {}
        self.clients_of: dict[str, set[Hashable]] = {}

    def set(self, client: Hashable, keys: Iterable[str]) -> tuple[set[str], set[str]]:
        """Replace ``client``'s keys (DIFF: every subscribe_quote carries the whole list).
        Returns ``(to_bind, to_unbind)``: keys nobody wanted before / nobody wants now."""
        new = set(keys)
        old = self.by_client.get(client, set())
        to_bind, to_unbind = set(), set()
        for k in new - old:
            holders = self.clients_of.setdefault(k, set())
            if not holders:
                to_bind.add(k)
            holders.add(client)
        for k in old - new:
            holders = self.clients_of.get(k, set())
            holders.discard(client)
            if not holders:
                self.clients_of.pop(k, None)
                to_unbind.add(k)
        if new:
            self.by_client[client] = new
        else:
            self.by_client.pop(client, None)
        return to_bind, to_unbind

    def add(self, client: Hashable, keys: Iterable[str]) -> tuple[set[str], set[str]]:
        return self.set(client, self.by_client.get(client, set()) | set(keys))

    def remove(self, client: Hashable) -> set[str]:
        """Forget a client; returns the keys to unbind."""
        return self.set(client, ())[1]

    def clients(self, key: str) -> set[Hashable]:
        return self.clients_of.get(key, set())

    def keys(self, client: Hashable | None = None) -> set[str]:
        return set(self.clients_of) if client is None else set(self.by_client.get(client, set()))


def parse_ins_list(value: Any) -> list[str]:
    """``"rb2605,au2606"`` or a JSON list -> stripped, de-duplicated words (order kept)."""
    if isinstance(value, str):
        words = value.split(",")
    elif isinstance(value, list):
        words = [str(w) for w in value]
    else:
        raise ValueError("ins_list must be a comma-separated string or a list")
    return list(dict.fromkeys(w.strip() for w in words if w.strip()))


parse_accounts = parse_ins_list


class TokenError(ValueError):
    """QA_WEB_TOKENS cannot be parsed."""


ALL = "*"


@dataclass(frozen=True)
class Tokens:
    """Which accounts each token covers (``"*"`` = all).

    ``QA_WEB_TOKENS`` is JSON ``{"token": ["acc1", "acc2"] | "*"}`` or the short form
    ``token1=acc1+acc2;token2=*``; ``QA_WEB_TOKEN`` is one token covering every account.
    With neither set, :attr:`configured` is False: reads are open (the daemon binds to
    loopback) and every state-changing request is refused.
    """

    table: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        return bool(self.table)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Tokens:
        table: dict[str, frozenset[str]] = {}
        raw = (env.get("QA_WEB_TOKENS") or "").strip()
        if raw:
            if raw.startswith("{"):
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise TokenError(f"QA_WEB_TOKENS is not valid JSON: {exc}") from None
                if not isinstance(obj, dict):
                    raise TokenError("QA_WEB_TOKENS must be a JSON object token -> accounts")
                items = obj.items()
            else:
                items = []
                for part in raw.split(";"):
                    if not part.strip():
                        continue
                    tok, sep, accs = part.partition("=")
                    if not sep:
                        raise TokenError(f"QA_WEB_TOKENS entry {part.strip()[:4]}... has no '=' (token=acc1+acc2)")
                    items.append((tok.strip(), accs.replace("+", ",").split(",")))
            for tok, accs in items:
                if not isinstance(tok, str) or len(tok) < 8:
                    raise TokenError("every token in QA_WEB_TOKENS must be a string of at least 8 characters")
                if accs == ALL:
                    accs = [ALL]
                if not isinstance(accs, list) or not all(isinstance(a, str) for a in accs):
                    raise TokenError("QA_WEB_TOKENS: accounts must be a list of names or \"*\"")
                table[tok] = frozenset(a.strip() for a in accs if a.strip())
        single = (env.get("QA_WEB_TOKEN") or "").strip()
        if single:
            if len(single) < 8:
                raise TokenError("QA_WEB_TOKEN must be at least 8 characters")
            table[single] = frozenset({ALL})
        return cls(table)

    def accounts_of(self, token: str | None) -> frozenset[str] | None:
        """The accounts a token covers, or ``None`` for an unknown / missing token."""
        if not token:
            return None
        for known, accs in self.table.items():   # constant-time compare of each candidate
            if hmac.compare_digest(known.encode(), token.encode()):
                return accs
        return None

    def valid(self, token: str | None) -> bool:
        return self.accounts_of(token) is not None

    def covers(self, token: str | None, account: str) -> bool:
        accs = self.accounts_of(token)
        return accs is not None and (ALL in accs or account in accs)

    def split(self, token: str | None, accounts: Iterable[str]) -> tuple[list[str], list[str]]:
        """``(covered, refused)`` for a subscription. Without any configured token every
        account is readable (loopback-only daemon)."""
        covered, refused = [], []
        for a in accounts:
            (covered if (not self.configured or self.covers(token, a)) else refused).append(a)
        return covered, refused

    def readable(self, token: str | None, account: str) -> bool:
        return not self.configured or self.covers(token, account)
