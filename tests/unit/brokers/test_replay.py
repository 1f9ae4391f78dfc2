"""Replay without I/O: CSV parsing (our header and vn.py's), the pacing schedule, the publish loop."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from brokers.random_source import RandomSource, market_fields
from brokers.replay import (CSV_HEADER, CsvFormatError, Pacer, StopFlag, parse_csv, parse_datetime, publish_ticks,
                            read_csv, read_csvs, schedule, ticks_from_store, write_csv)
from qamarket.models import Tick, TickBatch
from qamarket.sessions import ms_of

OURS = """symbol,exchange,datetime,last_price,volume,turnover,open_interest,bid_price_1,bid_volume_1,ask_price_1,ask_volume_1
rb2605,SHFE,2025-03-03 21:00:00.500,3301,12,396120,182000,3300,5,3301,7
rb2605,SHFE,2025-03-03 21:00:01.000,3302,20,660280,182004,3301,3,3302,9
rb2605,SHFE,1741035601500,3300,31,1023280,182001,3299,4,3300,2
"""

# vn.py TickData field names; gateway_name, name, localtime; tz-aware datetimes; Exchange enum text
VNPY = """symbol,exchange,datetime,name,volume,turnover,open_interest,last_price,last_volume,limit_up,limit_down,open_price,high_price,low_price,pre_close,bid_price_1,ask_price_1,bid_volume_1,ask_volume_1,gateway_name,localtime
IF2503,Exchange.CFFEX,2025-03-03 09:30:00.200000+08:00,沪深300,15,17442000.0,230100,3876.0,15,4263.0,3488.8,3876.0,3876.0,3876.0,3875.4,3875.8,3876.2,3,5,CTP,
IF2503,CFFEX,2025-03-03 01:30:00.700000+00:00,沪深300,18,20929560.0,230102,3876.2,3,4263.0,3488.8,3876.0,3876.2,3876.0,3875.4,3876.0,3876.2,1,4,CTP,2025-03-03 09:30:00.710
"""


def test_our_header_parses_every_column() -> None:
    ticks = list(parse_csv(io.StringIO(OURS), name="ours.csv"))
    assert len(ticks) == 3
    t = ticks[0]
    assert (t.symbol, t.exchange, t.datetime, t.last_price) == ("rb2605", "SHFE", ms_of(2025, 3, 3, 21, 0, 0, 500), 3301)
    assert (t.volume, t.turnover, t.open_interest) == (12, 396120, 182000)
    assert (t.bid_price_1, t.bid_volume_1, t.ask_price_1, t.ask_volume_1) == (3300, 5, 3301, 7)
    assert t.trading_day == "20250304"  # night session: next trading day, derived
    assert ticks[2].datetime == 1741035601500  # epoch-ms form accepted


def test_vnpy_dialect() -> None:
    ticks = list(parse_csv(io.StringIO(VNPY), name="vnpy.csv"))
    assert [t.exchange for t in ticks] == ["CFFEX", "CFFEX"]
    assert ticks[0].datetime == ms_of(2025, 3, 3, 9, 30, 0, 200)
    assert ticks[1].datetime == ms_of(2025, 3, 3, 9, 30, 0, 700)  # UTC converted to exchange-local
    assert ticks[0].source == "CTP" and ticks[0].limit_up == 4263.0 and ticks[0].pre_close == 3875.4
    assert ticks[0].trading_day == "20250303"


def test_vt_symbol_and_defaults_for_missing_columns() -> None:
    text = "vt_symbol,datetime,last_price\nrb2605.SHFE,2025-03-03 09:00:00.000,3300\n"
    (t,) = parse_csv(io.StringIO(text))
    assert (t.symbol, t.exchange) == ("rb2605", "SHFE")
    text = "datetime,last_price,volume\n2025-03-03 09:00:00.500,3300,1\n"
    (t,) = parse_csv(io.StringIO(text), symbol="rb2605", exchange="shfe")
    assert (t.symbol, t.exchange, t.volume) == ("rb2605", "SHFE", 1)


def test_missing_required_column_is_named() -> None:
    with pytest.raises(CsvFormatError, match="last_price"):
        list(parse_csv(io.StringIO("symbol,exchange,datetime\nrb2605,SHFE,2025-03-03 09:00:00\n"), name="x.csv"))


def test_bad_row_names_file_line_and_column() -> None:
    text = OURS.replace("3302,20", "33o2,20")
    with pytest.raises(CsvFormatError, match=r"bad\.csv:3: column 'last_price'"):
        list(parse_csv(io.StringIO(text), name="bad.csv"))
    assert len(list(parse_csv(io.StringIO(text), name="bad.csv", skip_bad_rows=True))) == 2
    with pytest.raises(CsvFormatError, match=r":2: column 'exchange'"):
        list(parse_csv(io.StringIO(OURS.replace("rb2605,SHFE,2025-03-03 21:00:00.500", "rb2605,LME,2025-03-03 21:00:00.500"))))
    with pytest.raises(CsvFormatError, match=r":2: .*datetime"):
        list(parse_csv(io.StringIO(OURS.replace("2025-03-03 21:00:00.500", "03/03/2025 21:00"))))
    with pytest.raises(CsvFormatError, match=r":2: 3 values for 11 columns"):
        list(parse_csv(io.StringIO(OURS.splitlines()[0] + "\nrb2605,SHFE,1\n")))


def test_parse_datetime_forms() -> None:
    assert parse_datetime("2025-03-03 09:00:00.500") == ms_of(2025, 3, 3, 9, 0, 0, 500)
    assert parse_datetime("2025-03-03T09:00:00") == ms_of(2025, 3, 3, 9)
    assert parse_datetime("2025-03-03 09:00:00.500+08:00") == ms_of(2025, 3, 3, 9, 0, 0, 500)
    assert parse_datetime("1740992400500") == 1740992400500


def test_write_then_read_round_trip_and_merge(tmp_path: Path) -> None:
    src = RandomSource(3, ["SHFE.rb2605", "SSE.600000"], start="2025-03-03 14:59:00")
    ticks = list(src.ticks(200))
    a, b = tmp_path / "rb.csv", tmp_path / "sh.csv"
    with a.open("w", newline="") as fh:
        write_csv([t for t in ticks if t.symbol == "rb2605"], fh)
    with b.open("w", newline="") as fh:
        write_csv([t for t in ticks if t.symbol == "600000"], fh)
    assert a.read_text().splitlines()[0] == ",".join(CSV_HEADER)
    back = list(read_csv(a))
    assert [market_fields(t) for t in back] == [market_fields(t) for t in ticks if t.symbol == "rb2605"]
    merged = list(read_csvs([a, b]))
    assert len(merged) == 200
    assert [t.datetime for t in merged] == sorted(t.datetime for t in ticks)


def test_schedule_real_speed_keeps_gaps() -> None:
    ms = [1000, 1500, 1500, 4000, 3900, 5000]
    assert schedule(ms, speed=1.0) == [0.0, 0.5, 0.5, 3.0, 3.0, 4.0]  # backwards stamp adds nothing
    assert schedule(ms, speed=10.0) == pytest.approx([0.0, 0.05, 0.05, 0.3, 0.3, 0.4])
    assert schedule([0, 10_000, 3_600_000], speed=1.0, max_gap=2.0) == [0.0, 2.0, 4.0]  # lunch/night capped
    assert schedule(ms) == [0.0] * 6  # as fast as possible
    assert schedule(ms, rate=4) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]


def test_pacer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Pacer(rate=10, speed=1)
    with pytest.raises(ValueError):
        Pacer(speed=0)


class FakePublisher:
    """Records publishes; ``flush`` counts."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, object]] = []
        self.flushes = 0

    def publish(self, exchange: str, key: str, msg: object) -> None:
        self.sent.append((exchange, key, msg))

    def flush(self) -> None:
        self.flushes += 1


def test_publish_ticks_keys_batches_and_flush() -> None:
    ticks = list(RandomSource(1, start="2025-03-03 10:00:00").ticks(100))
    pub = FakePublisher()
    assert publish_ticks(pub, ticks, exchange="x.tick", install_signals=False) == 100
    assert [k for _, k, _ in pub.sent] == [f"{t.exchange}.{t.symbol}" for t in ticks] and pub.flushes == 1
    pub = FakePublisher()
    assert publish_ticks(pub, ticks, exchange="x.tick", batch=8, install_signals=False) == 100
    assert all(isinstance(m, TickBatch) and k == f"{m.exchange}.{m.symbol}" for _, k, m in pub.sent)
    assert sum(len(m.ticks) for _, _, m in pub.sent) == 100  # type: ignore[attr-defined]


def test_publish_ticks_stops_on_flag_and_still_flushes() -> None:
    stop = StopFlag()
    pub = FakePublisher()

    def gen():
        for i, t in enumerate(RandomSource(1, start="2025-03-03 10:00:00").ticks(None)):
            if i == 50:
                stop.set()
            yield t

    assert publish_ticks(pub, gen(), exchange="x", stop=stop, install_signals=False) == 50
    assert pub.flushes == 1


def test_ticks_from_any_store() -> None:
    class Store:
        def ticks(self, exchange, symbol, start, end):  # noqa: ANN001, ANN201
            return iter([Tick(symbol=symbol, exchange=exchange, datetime=start, last_price=1.0)])

    (t,) = ticks_from_store(Store(), "SHFE", "rb2605", 5, 6)
    assert (t.symbol, t.datetime) == ("rb2605", 5)


def test_schedule_from_an_origin_waits_for_the_first_tick() -> None:
    # a real-time source started at 08:59:00 whose first tick is at 09:00:00.250 waits 60.25 s
    origin = ms_of(2025, 3, 3, 8, 59)
    assert schedule([origin + 60_250, origin + 60_750], speed=1.0, origin_ms=origin) == [60.25, 60.75]
    assert schedule([origin + 60_250], speed=1.0, origin_ms=origin, max_gap=1.0) == [1.0]
