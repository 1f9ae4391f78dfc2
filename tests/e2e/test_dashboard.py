"""The dashboard in headless Chromium: live quotes, bar charts, accounts, and an order
sent with ``python -m handlers.order send`` appearing in the orders list.

The router does not run here: the web daemon shows orders as *sent* from its own tap on
``qaorder`` (a bounded live queue bound per subscribed account, status ``SENT``), which is
what a user sees before the router and executor report back. A screenshot is written to
the test's tmp dir (``dashboard.png``; its path is printed).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qamarket.models import Bar, Tick
from qapubsub import keys
from qapubsub.messages import encode
from tests import daemons
from tests.e2e.conftest import CDP
from tests.integration.test_web import TOKENS, start_web

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T0 = 1740992400000      # 2025-03-03 09:00:00.000 exchange-local
ADMIN = "tok-admin-xxxxxxx"


def tick(symbol: str, price: float, n: int) -> Tick:
    return Tick(symbol=symbol, exchange="SHFE", datetime=T0 + 20_000 * n, last_price=price, volume=100 + n,  # type: ignore[arg-type]
                bid_price_1=price - 1, ask_price_1=price + 1, bid_volume_1=5 + n % 7, ask_volume_1=3 + n % 5,
                open_interest=20000 + n, pre_settlement=3880 if symbol == "rb2605" else 560,
                high_price=price + 5, low_price=price - 5, trading_day="20250303")


async def test_dashboard_live(browser: CDP, tmp_path: Path, topology: Any, mongo_db: Any, amqp_url: str,
                              mongo_url: str, amqp_channel: Any) -> None:
    env = {"QA_AMQP_URL": amqp_url, "QA_MONGO_URL": mongo_url, "QA_MONGO_DB": mongo_db.name,
           "QA_NAMESPACE": topology.namespace, "QA_WEB_TOKENS": TOKENS, "QA_WEB_TOKEN": ""}
    mongo_db["accounts"].insert_one({
        "_id": "acc1", "account_cookie": "acc1", "trading_day": "20250303",
        "accounts": {"balance": 1_002_350.0, "available": 961_000.0, "margin": 41_350.0, "float_profit": 2_350.0,
                     "position_profit": 2_350.0, "close_profit": 0.0, "risk_ratio": 0.0413},
        "positions": {"SHFE.rb2605": {"volume_long": 3, "volume_short": 0, "open_price_long": 3862.0,
                                      "float_profit": 2_350.0}}, "orders": {}, "trades": {}})
    mongo_db["follower_rules"].insert_one({"_id": "r-demo", "rule_id": "r-demo", "leader": "acc1", "follower": "acc2",
                                           "sizing": "RATIO", "ratio": 0.5, "reverse": False, "enabled": True})
    mongo_db["account_state"].insert_one({"_id": "acc3", "reduce_only": True, "reason": "margin call",
                                          "operator": "desk"})
    from qamarket.store import BarStore
    BarStore(mongo_db).write([Bar(symbol="rb2605", exchange="SHFE", freq="1min", datetime=T0 - 60_000 * (30 - i),
                                  trading_day="20250303", open=3870 + (i % 5) * 3, high=3882 + i % 4,
                                  low=3862 - i % 3, close=3872 + (i % 7) * 2) for i in range(30)])
    web = start_web(tmp_path, env)
    try:
        await browser.navigate(f"{web.base}/?ins=rb2605,au2606&accounts=acc1&token={ADMIN}")
        await browser.wait("document.querySelector('#conn').textContent === 'live'", what="the WebSocket")
        await browser.wait("!!document.querySelector('#quotes tr[data-ins=\"SHFE.au2606\"]')", what="quote rows")
        # the daemon binds the tick queue before it answers the subscription; wait for both bindings
        await browser.wait("fetch('/metrics').then(r => r.text()).then(t => t.includes('qaflow_web_instruments 2.0'))",
                           what="bindings")
        for n in range(12):
            amqp_channel.basic_publish(topology.tick, keys.tick_key("SHFE", "rb2605"),
                                       encode(tick("rb2605", 3880 + (n * 7) % 13, n)))
            amqp_channel.basic_publish(topology.tick, keys.tick_key("SHFE", "au2606"),
                                       encode(tick("au2606", 561 + (n % 4) * 0.5, n)))
            await asyncio.sleep(0.15)
        last_rb = 3880 + (11 * 7) % 13
        got = await browser.wait(
            f"(() => {{ const t = document.querySelector('#quotes tr[data-ins=\"SHFE.rb2605\"] td.last_price');"
            f" return t && t.textContent === '{last_rb:,}' ? t.textContent : null; }})()", what="rb2605 last price")
        assert got == f"{last_rb:,}"
        assert await browser.eval("window.__qaflow.updates") >= 3          # diffs kept coming
        assert await browser.eval("window.__qaflow.bars['SHFE.rb2605'].length") >= 30   # history + live candles
        await browser.wait("!!document.querySelector('#accounts .account[data-account=\"acc1\"]')", what="account")
        # an order from the CLI (published to qaorder, as any user would) shows up as SENT
        r = subprocess.run([sys.executable, "-m", "handlers.order", "send", "--account", "acc1", "--symbol", "rb2605",
                            "--exchange", "SHFE", "--direction", "BUY", "--offset", "OPEN", "--price", "3885",
                            "--volume", "2"], cwd=daemons.ROOT, env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        oid = r.stdout.strip()
        status = await browser.wait(
            f"(() => {{ const r = document.querySelector('#orders tr[data-order-id=\"{oid}\"] td.status');"
            f" return r && r.textContent; }})()", what="the order in the orders list")
        assert status == "SENT"
        await browser.wait("document.querySelector('#follow tbody').textContent.includes('r-demo')", what="rules")
        await browser.wait("document.querySelector('#risk-state tbody').textContent.includes('margin call')",
                           what="risk state")
        await asyncio.sleep(0.8)   # let the flash animations finish
        shot = await browser.screenshot(tmp_path / "dashboard.png")
        print(f"screenshot: {shot}")
        out = os.environ.get("QA_E2E_SCREENSHOT")
        if out:
            Path(out).write_bytes(shot.read_bytes())
        assert shot.stat().st_size > 20_000
        state = json.loads(await browser.eval("JSON.stringify(window.__qaflow.tree.trade.acc1.orders)"))
        assert state[oid]["volume"] == 2 and state[oid]["price"] == 3885
    finally:
        assert daemons.stop(web.proc) == 0
