"""sina / qq quote parsing against recorded responses (tests/data, GBK as served), field by field."""
from __future__ import annotations

from pathlib import Path

import pytest

from brokers.quotes import (ChangeFilter, QuoteLineError, QuoteParseError, QuotePoller, parse_qq, parse_sina,
                            split_code, to_code)
from qamarket.sessions import ms_of

DATA = Path(__file__).resolve().parents[2] / "data"


def sina_text() -> str:
    return (DATA / "sina_hq.txt").read_bytes().decode("gbk")


def qq_text() -> str:
    return (DATA / "qq_quotes.txt").read_bytes().decode("gbk")


def test_sina_fields() -> None:
    errors: list[QuoteLineError] = []
    skipped: list[str] = []
    ticks = {t.symbol: t for t in parse_sina(sina_text(), errors=errors, skipped=skipped)}
    assert sorted(ticks) == ["000001", "300750", "600000", "600519"]
    t = ticks["600000"]
    assert (t.exchange, t.source, t.trading_day) == ("SSE", "sina", "20250303")
    assert t.datetime == ms_of(2025, 3, 3, 14, 58, 3)
    assert (t.open_price, t.pre_close, t.last_price, t.high_price, t.low_price) == (10.45, 10.43, 10.52, 10.56, 10.41)
    assert (t.volume, t.turnover) == (35842177, 375969352.0)  # shares, CNY
    assert [getattr(t, f"bid_price_{k}") for k in range(1, 6)] == [10.51, 10.50, 10.49, 10.48, 10.47]
    assert [getattr(t, f"bid_volume_{k}") for k in range(1, 6)] == [152300, 88400, 120000, 45600, 70200]
    assert [getattr(t, f"ask_price_{k}") for k in range(1, 6)] == [10.52, 10.53, 10.54, 10.55, 10.56]
    assert [getattr(t, f"ask_volume_{k}") for k in range(1, 6)] == [33100, 98700, 120500, 64000, 150300]
    sz = ticks["000001"]
    assert (sz.exchange, sz.last_price, sz.volume, sz.turnover) == ("SZSE", 11.26, 98236421, 1103467281.56)
    assert sz.datetime == ms_of(2025, 3, 3, 14, 58, 6)
    assert ticks["600519"].ask_price_5 == 1592.0 and ticks["600519"].bid_volume_4 == 500
    # the suspended stock (status 03, price 0) and the unknown code ("") are skipped
    assert skipped == ["sz000043", "sh688999"]
    # the truncated line is reported with its number, and the lines after it were parsed
    assert len(errors) == 1 and errors[0].lineno == 5 and "sh601398" in errors[0].line
    assert "sina line 5" in str(errors[0])


def test_qq_fields_and_units() -> None:
    errors: list[QuoteLineError] = []
    skipped: list[str] = []
    ticks = {t.symbol: t for t in parse_qq(qq_text(), errors=errors, skipped=skipped)}
    assert sorted(ticks) == ["000001", "600000", "600519"]
    t = ticks["600000"]
    assert (t.exchange, t.source, t.trading_day, t.datetime) == ("SSE", "qq", "20250303", ms_of(2025, 3, 3, 14, 58, 3))
    assert (t.last_price, t.pre_close, t.open_price, t.high_price, t.low_price) == (10.52, 10.43, 10.45, 10.56, 10.41)
    assert t.volume == 358422 * 100  # lots -> shares
    assert t.turnover == 375969352.0  # CNY, from field 35
    assert [getattr(t, f"bid_price_{k}") for k in range(1, 6)] == [10.51, 10.50, 10.49, 10.48, 10.47]
    assert [getattr(t, f"bid_volume_{k}") for k in range(1, 6)] == [152300, 88400, 120000, 45600, 70200]
    assert [getattr(t, f"ask_price_{k}") for k in range(1, 6)] == [10.52, 10.53, 10.54, 10.55, 10.56]
    assert [getattr(t, f"ask_volume_{k}") for k in range(1, 6)] == [33100, 98700, 120500, 64000, 150300]
    assert (t.limit_up, t.limit_down) == (11.47, 9.39)
    assert ticks["000001"].exchange == "SZSE" and ticks["000001"].turnover == 1103467281.56
    assert skipped == ["sz000043"]
    assert len(errors) == 1 and errors[0].lineno == 4 and "sz300750" in str(errors[0]) and "fields" in str(errors[0])


def test_sina_and_qq_agree_on_the_same_market() -> None:
    s = {t.symbol: t for t in parse_sina(sina_text())}
    q = {t.symbol: t for t in parse_qq(qq_text())}
    for sym in ("600000", "000001"):
        a, b = s[sym], q[sym]
        for f in ("last_price", "pre_close", "open_price", "high_price", "low_price", "datetime", "turnover",
                  "bid_price_1", "bid_volume_1", "ask_price_5", "ask_volume_5"):
            assert getattr(a, f) == getattr(b, f), (sym, f)
        assert abs(a.volume - b.volume) < 100  # qq rounds to lots


def test_strict_raises_after_parsing_everything() -> None:
    with pytest.raises(QuoteParseError) as err:
        parse_sina(sina_text(), strict=True)
    assert len(err.value.ticks) == 4 and err.value.errors[0].lineno == 5


def test_garbage_never_crashes() -> None:
    errors: list[QuoteLineError] = []
    assert parse_sina('hello\nvar hq_str_sh600000="a,b,c";\n<html>', errors=errors) == []
    assert len(errors) == 3
    assert parse_qq('v_sh600000="1~x~600001' + "~1" * 60 + '";', errors=errors) == []
    assert "does not match" in str(errors[-1])


def test_codes() -> None:
    assert split_code("sh600000") == ("SSE", "600000") and split_code("SZ000001") == ("SZSE", "000001")
    assert to_code("SSE", "600000") == "sh600000" and to_code("", "000001") == "sz000001"
    with pytest.raises(ValueError):
        split_code("hk00700")


def test_change_filter() -> None:
    ticks = parse_sina(sina_text())
    f = ChangeFilter()
    assert len(f.changed(ticks)) == 4
    assert f.changed(ticks) == []
    moved = ticks[0].__copy__()
    moved.last_price = 10.53
    assert f.changed([moved, *ticks[1:]]) == [moved]


def test_poller_builds_requests_without_network() -> None:
    seen: list[list] = []
    p = QuotePoller("sina", ["sh600000", "SZSE.000001", "600519"], seen.append, opener=lambda req, timeout: b"")
    (url,) = p.urls()
    assert url == "https://hq.sinajs.cn/list=sh600000,sz000001,sh600519"
    assert p.request(url).get_header("Referer") == "https://finance.sina.com.cn/"
    body = (DATA / "sina_hq.txt").read_bytes()
    p.opener = lambda req, timeout: body
    assert len(p.poll_once()) == 4 and len(p.poll_once()) == 0 and len(seen) == 1
    q = QuotePoller("qq", ["sh600000"], seen.append, opener=lambda req, timeout: b"")
    assert q.urls() == ["https://qt.gtimg.cn/q=sh600000"] and q.request(q.urls()[0]).get_header("Referer") is None
