"""``qaflow source`` argument parsing (no broker)."""
from __future__ import annotations

import argparse

import pytest

from handlers import source


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qaflow source")
    source.configure(p)
    return p.parse_args(list(argv))


def test_subcommands_and_defaults() -> None:
    a = parse("random", "--seed", "3", "--instrument", "SHFE.rb2605", "--rate", "100", "-n", "10", "--batch", "5")
    assert (a.source, a.seed, a.instrument, a.rate, a.count, a.batch, a.speed) == ("random", 3, ["SHFE.rb2605"], 100, 10, 5, None)
    assert source._pace(a) == {"rate": 100, "speed": None}
    r = parse("replay", "a.csv", "b.csv", "--asap")
    assert r.files == ["a.csv", "b.csv"] and source._pace(r) == {"rate": None, "speed": None}
    assert source._pace(parse("replay", "a.csv")) == {"rate": None, "speed": 1.0}  # real speed by default
    q = parse("qq", "sh600000", "sz000001", "--interval", "5")
    assert (q.source, q.codes, q.interval) == ("qq", ["sh600000", "sz000001"], 5.0)
    assert parse("sina", "sh600000").interval == 3.0


def test_usage_errors() -> None:
    with pytest.raises(SystemExit):
        parse()
    with pytest.raises(SystemExit):
        parse("random", "--rate", "1", "--speed", "2")
    with pytest.raises(SystemExit):
        parse("kafka")
