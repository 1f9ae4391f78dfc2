"""Settings of the CTP market-data process, from the environment (``QA_CTP_*``).

The password is read from the environment only (``QA_CTP_PASSWORD``), never from the
command line (it would show in ``ps``), never logged, never in ``repr``.

:meth:`CtpSettings.vnpy_setting` builds the dict ``vnpy_ctp.CtpGateway.connect`` takes
(vnpy_ctp 6.7 names its keys in Chinese: ``用户名`` user id, ``密码`` password,
``经纪商代码`` broker id, ``交易服务器`` trader front, ``行情服务器`` market-data front,
``产品名称`` app id, ``授权编码`` auth code, ``柜台环境`` ``实盘`` production / ``测试`` test).

Why a trader front for market data: vnpy_ctp drops every depth-market-data push until it
knows the instrument's exchange, which it learns only from the trader front's instrument
query (``symbol_contract_map``). Without ``QA_CTP_TD_FRONT`` no tick is ever emitted.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from qamarket.models import EXCHANGES, FUTURES_EXCHANGES

#: vnpy_ctp 6.7 ``CtpGateway.default_setting`` keys.
KEY_USERID = "用户名"
KEY_PASSWORD = "密码"
KEY_BROKERID = "经纪商代码"
KEY_TD_FRONT = "交易服务器"
KEY_MD_FRONT = "行情服务器"
KEY_APPID = "产品名称"
KEY_AUTH_CODE = "授权编码"
KEY_ENVIRONMENT = "柜台环境"
ENV_PRODUCTION = "实盘"
ENV_TEST = "测试"
ENVIRONMENTS = {"production": ENV_PRODUCTION, "test": ENV_TEST}

PREFIX = "QA_CTP_"


class SettingsError(ValueError):
    """A CTP setting is missing or invalid; the message names the variable (never its secret value)."""


@dataclass(frozen=True)
class CtpSettings:
    userid: str
    password: str = field(repr=False)
    broker_id: str
    md_front: str
    td_front: str
    app_id: str = ""
    auth_code: str = field(default="", repr=False)
    environment: str = "production"  # "production" (实盘) or "test" (测试: SimNow, 7x24 test fronts)
    gateway_name: str = "CTP"
    symbols: tuple[tuple[str, str], ...] = ()  # ((EXCHANGE, symbol), ...)
    queue_size: int = 10_000

    def __post_init__(self) -> None:
        for name in ("userid", "password", "broker_id", "md_front", "td_front"):
            if not getattr(self, name):
                raise SettingsError(f"{PREFIX}{name.upper()} is not set")
        if self.environment not in ENVIRONMENTS:
            raise SettingsError(f"{PREFIX}ENV={self.environment!r}: expected one of {', '.join(ENVIRONMENTS)}")
        for var, front in (("MD_FRONT", self.md_front), ("TD_FRONT", self.td_front)):
            if any(c.isspace() for c in front):
                raise SettingsError(f"{PREFIX}{var}={front!r} holds white space")
        if self.queue_size < 1:
            raise SettingsError(f"{PREFIX}QUEUE_SIZE must be >= 1, not {self.queue_size}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> CtpSettings:
        """Read ``QA_CTP_USERID, PASSWORD, BROKER_ID, MD_FRONT, TD_FRONT, APP_ID, AUTH_CODE, ENV,
        GATEWAY_NAME, SYMBOLS, QUEUE_SIZE``; ``overrides`` (from the command line) win, except
        that the password can only come from the environment."""
        env = os.environ if env is None else env
        if "password" in overrides:
            raise SettingsError("the CTP password is read from QA_CTP_PASSWORD only")

        def get(name: str, default: str = "") -> str:
            return env.get(PREFIX + name, default).strip()

        try:
            queue_size = int(get("QUEUE_SIZE", "10000"))
        except ValueError:
            raise SettingsError(f"{PREFIX}QUEUE_SIZE={get('QUEUE_SIZE')!r} is not an integer") from None
        values: dict[str, object] = {
            "userid": get("USERID"),
            "password": env.get(PREFIX + "PASSWORD", ""),
            "broker_id": get("BROKER_ID"),
            "md_front": get("MD_FRONT"),
            "td_front": get("TD_FRONT"),
            "app_id": get("APP_ID"),
            "auth_code": env.get(PREFIX + "AUTH_CODE", ""),
            "environment": get("ENV", "production").lower() or "production",
            "gateway_name": get("GATEWAY_NAME", "CTP") or "CTP",
            "symbols": parse_symbols(get("SYMBOLS")),
            "queue_size": queue_size,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def vnpy_setting(self) -> dict[str, str]:
        """The dict for ``CtpGateway.connect`` (contains the password: never log it)."""
        return {
            KEY_USERID: self.userid,
            KEY_PASSWORD: self.password,
            KEY_BROKERID: self.broker_id,
            KEY_TD_FRONT: self.td_front,
            KEY_MD_FRONT: self.md_front,
            KEY_APPID: self.app_id,
            KEY_AUTH_CODE: self.auth_code,
            KEY_ENVIRONMENT: ENVIRONMENTS[self.environment],
        }

    def describe(self) -> dict[str, object]:
        """What may be logged: everything but the password and the auth code."""
        return {"userid": self.userid, "broker_id": self.broker_id, "md_front": self.md_front,
                "td_front": self.td_front, "app_id": self.app_id, "environment": self.environment,
                "gateway_name": self.gateway_name, "symbols": [f"{e}.{s}" for e, s in self.symbols],
                "password": "***" if self.password else "", "auth_code": "***" if self.auth_code else ""}


def parse_symbols(text: str | list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``"SHFE.rb2512, rb2601.SHFE DCE.i2601"`` -> ``(("SHFE", "rb2512"), ("SHFE", "rb2601"), ("DCE", "i2601"))``.

    Both our routing-key order (``EXCHANGE.symbol``) and vn.py's ``vt_symbol`` order
    (``symbol.EXCHANGE``) are accepted; the exchange is the part that names one. CTP
    serves futures exchanges only. Duplicates are dropped, order is kept.
    """
    items = text.replace(",", " ").replace(";", " ").split() if isinstance(text, str) else list(text)
    out: dict[tuple[str, str], None] = {}
    for item in items:
        parts = item.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise SettingsError(f"symbol {item!r}: expected EXCHANGE.symbol (SHFE.rb2512) or symbol.EXCHANGE")
        a, b = parts
        if a.upper() in EXCHANGES and b.upper() not in EXCHANGES:
            exchange, symbol = a.upper(), b
        elif b.upper() in EXCHANGES and a.upper() not in EXCHANGES:
            exchange, symbol = b.upper(), a
        else:
            raise SettingsError(f"symbol {item!r}: no exchange among {', '.join(sorted(FUTURES_EXCHANGES))}")
        if exchange not in FUTURES_EXCHANGES:
            raise SettingsError(f"symbol {item!r}: CTP serves {', '.join(sorted(FUTURES_EXCHANGES))}, not {exchange}")
        out[(exchange, symbol)] = None
    return tuple(out)
