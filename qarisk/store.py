"""MongoDB storage of the risk desk (pymongo, sync): configs, counters, monitor state, audit.

Collections (database ``QA_MONGO_DB``):

``risk_configs``  -- ``{_id: account | "*", rules: {...RiskConfig...}, monitor: {...MonitorConfig...},
    version, updated_ns}``. ``"*"`` is the default for accounts without their own document;
    without either, an account's orders pass the pre-trade rules unchecked (rules all off)
    and the monitor ignores it. Written by ``qaflow risk config``; re-read by the router and
    the monitor when ``meta`` ``{_id: "risk", version}`` changes (one point read per poll).
``risk_counters`` -- ``{_id: account, trading_day, daily_orders, orders_by, daily_cancels,
    cancels_by, daily_trades, trades_by, active_orders, reduce_only, halted, reason,
    updated_ns}``: the router's engine counters, saved at most once a second when they
    changed, restored at router start when the trading day is still the same.
``risk_monitor``  -- ``{_id: account, trading_day, high_water, fired: ["rule", "rule:KEY"],
    equity, margin, updated_ns}``: the monitor's day state (a restart keeps the high-water
    mark and does not fire again).
``risk_audit``    -- one document per risk decision: ``{action: "reject" | "warn" |
    "forceclose" | "release" | "config", account, rule, check, detail, command_id,
    order_id, operator, ts}`` (``ts`` UTC ns). Breach documents use a deterministic
    ``_id`` (``<command_id>:<action>``), so a restarted monitor cannot audit one twice.

The router's own audit of force-close execution and refusals stays in ``audit``
(:mod:`qaorder.store`); ``account_state`` (reduce-only) is the router's too.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from .config import RiskConfig, RiskConfigError
from .monitor import MonitorConfig, MonitorState

__all__ = ["DEFAULT_KEY", "StoredConfig", "RiskStore", "parse_config", "apply_sets", "parse_value"]

DEFAULT_KEY = "*"


class StoredConfig(msgspec.Struct, kw_only=True, frozen=True):
    rules: RiskConfig = RiskConfig.all_off()
    monitor: MonitorConfig = MonitorConfig(enabled=False)


def _section_fields(tp: Any) -> dict[str, Any]:
    return {f.name: f for f in msgspec.structs.fields(tp)}


def parse_config(data: Any) -> StoredConfig:
    """``{...RiskConfig fields..., "monitor": {...}}`` (or ``{"rules": {...}, "monitor": {...}}``)
    -> a validated config. Errors name the key (``RiskConfigError``)."""
    if not isinstance(data, dict):
        raise RiskConfigError("a risk config must be a JSON object")
    data = dict(data)
    mon = data.pop("monitor", None)
    rules = data.pop("rules") if "rules" in data and set(data) == {"rules"} else data
    cfg = RiskConfig.from_dict(rules)
    try:
        m = msgspec.convert(mon, MonitorConfig, strict=True) if mon is not None else MonitorConfig(enabled=False)
    except (msgspec.ValidationError, ValueError) as exc:
        msg = str(exc)
        msg = msg.replace("`$", "`$.monitor") if "`$" in msg else f"{msg} - at `$.monitor`"
        raise RiskConfigError(f"invalid risk config: {msg}") from None
    return StoredConfig(rules=cfg, monitor=m)


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when it parses (``false``, ``10``, ``null``, ``["a"]``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_sets(base: Mapping[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` assignments (``funds.enabled=false``, ``monitor.max_daily_loss=5000``,
    ``enabled=false``) to a config dict; an unknown section or key is an error that names it."""
    out: dict[str, Any] = json.loads(json.dumps(dict(base)))
    sections = {**_section_fields(RiskConfig), "monitor": None}
    for item in sets:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise RiskConfigError(f"--set {item!r}: expected section.key=value")
        parts = path.strip().split(".")
        top = parts[0]
        if top not in sections:
            raise RiskConfigError(f"--set {item!r}: unknown key `{top}` (sections: {', '.join(sorted(sections))})")
        value = parse_value(raw)
        if len(parts) == 1:
            if top != "enabled":
                raise RiskConfigError(f"--set {item!r}: `{top}` is a section; set one of its keys, e.g. {top}.enabled")
            out["enabled"] = value
            continue
        if len(parts) != 2:
            raise RiskConfigError(f"--set {item!r}: unknown key `{path}` (use section.key)")
        sec_type = MonitorConfig if top == "monitor" else sections[top].type
        known = _section_fields(sec_type)
        if parts[1] not in known:
            raise RiskConfigError(f"--set {item!r}: unknown key `{path}` (keys of {top}: {', '.join(sorted(known))})")
        if top == "monitor" and parts[1] == "force_close_on" and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        out.setdefault(top, {})[parts[1]] = value
    return out


class RiskStore:
    def __init__(self, db: Any, *, create_indexes: bool = True) -> None:
        self.db = db
        self.configs = db["risk_configs"]
        self.counters = db["risk_counters"]
        self.monitor = db["risk_monitor"]
        self.audit_coll = db["risk_audit"]
        self.meta = db["meta"]
        self.account_state = db["account_state"]
        if create_indexes:
            self.audit_coll.create_index([("account", ASCENDING), ("ts", ASCENDING)])

    # configs ------------------------------------------------------------------------------
    def version(self) -> int:
        d = self.meta.find_one({"_id": "risk"})
        return int(d["version"]) if d else 0

    def _bump(self) -> int:
        d = self.meta.find_one_and_update({"_id": "risk"}, {"$inc": {"version": 1}}, upsert=True,
                                          return_document=ReturnDocument.AFTER)
        return int(d["version"])

    def raw_config(self, account: str) -> dict[str, Any] | None:
        d = self.configs.find_one({"_id": account})
        if d is None:
            return None
        return {**(d.get("rules") or {}), "monitor": d.get("monitor") or {"enabled": False}}

    def set_config(self, account: str, data: Any, *, operator: str = "") -> StoredConfig:
        cfg = parse_config(data)   # raises RiskConfigError naming the key
        v = self._bump()
        self.configs.replace_one({"_id": account}, {"_id": account, "rules": cfg.rules.to_dict(),
                                                    "monitor": msgspec.to_builtins(cfg.monitor), "version": v,
                                                    "updated_ns": time.time_ns()}, upsert=True)
        self.audit({"action": "config", "account": account, "operator": operator,
                    "detail": f"risk config version {v} stored"})
        return cfg

    def delete_config(self, account: str) -> bool:
        n = self.configs.delete_one({"_id": account}).deleted_count
        if n:
            self._bump()
        return bool(n)

    def load_configs(self) -> dict[str, StoredConfig]:
        out: dict[str, StoredConfig] = {}
        for d in self.configs.find({}):
            try:
                out[str(d["_id"])] = parse_config({**_bools(d.get("rules") or {}),
                                                   "monitor": _bools(d.get("monitor") or {"enabled": False})})
            except RiskConfigError as exc:   # written by hand: skip it loudly, keep the others
                import logging

                logging.getLogger(__name__).error("risk config of %s ignored: %s", d["_id"], exc)
        return out

    # counters -------------------------------------------------------------------------------
    def save_counters(self, docs: Iterable[dict[str, Any]]) -> None:
        now = time.time_ns()
        for d in docs:
            self.counters.replace_one({"_id": d["_id"]}, {**d, "updated_ns": now}, upsert=True)

    def load_counters(self) -> dict[str, dict[str, Any]]:
        return {str(d["_id"]): d for d in self.counters.find({})}

    # monitor ----------------------------------------------------------------------------------
    def monitor_state(self, account: str) -> MonitorState:
        return MonitorState.from_doc(self.monitor.find_one({"_id": account}))

    def save_monitor_state(self, account: str, st: MonitorState, **extra: Any) -> None:
        self.monitor.replace_one({"_id": account}, {"_id": account, **st.to_doc(), **extra,
                                                    "updated_ns": time.time_ns()}, upsert=True)

    # audit ------------------------------------------------------------------------------------
    def audit(self, doc: Mapping[str, Any]) -> bool:
        """Insert one audit document; False when its ``_id`` exists already (idempotent)."""
        try:
            self.audit_coll.insert_one({**doc, "ts": time.time_ns()})
            return True
        except DuplicateKeyError:
            return False

    def audit_of(self, **query: Any) -> list[dict[str, Any]]:
        return sorted(self.audit_coll.find(query), key=lambda d: d.get("ts", 0))

    def account_states(self) -> dict[str, dict[str, Any]]:
        return {str(d["_id"]): d for d in self.account_state.find({})}


def _bools(d: Mapping[str, Any]) -> dict[str, Any]:
    """nx-27017 reads booleans back as 0/1: restore them where the schema wants a bool."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out[k] = _bools(v)
        elif k in _BOOL_KEYS and isinstance(v, int) and not isinstance(v, bool) and v in (0, 1):
            out[k] = bool(v)
        else:
            out[k] = v
    return out


_BOOL_KEYS = {"enabled", "allow_auction", "check_lot", "check_limits", "check_tick", "require_quote",
              "count_own_working"}
