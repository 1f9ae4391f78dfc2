"""The web daemon's pure logic: quote diffs, batching, coalescing, slow clients, tokens."""
from __future__ import annotations

import pytest

from handlers.webdiff import (
    ClientState, QuoteBook, Subscriptions, Tokens, TokenError, format_datetime, merge, parse_ins_list, quote_of,
    rtn_data,
)
from qamarket.models import Tick

T0 = 1740992400500  # 2025-03-03 09:00:00.500 exchange-local


def tick(price: float = 3900.0, **kw: object) -> Tick:
    base = dict(symbol="rb2605", exchange="SHFE", datetime=T0, last_price=price, volume=10, bid_price_1=price - 1,
                ask_price_1=price + 1, bid_volume_1=5, ask_volume_1=7, open_interest=1000.0, trading_day="20250303")
    base.update(kw)
    return Tick(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- quotes and diffs
def test_quote_has_diff_names_and_compact_numbers() -> None:
    q = quote_of(tick())
    assert q["instrument_id"] == "SHFE.rb2605"
    assert q["datetime"] == "2025-03-03 09:00:00.500" == format_datetime(T0)
    assert q["last_price"] == 3900 and isinstance(q["last_price"], int)   # no ".0" on the wire
    assert q["bid_price1"] == 3899 and q["ask_volume1"] == 7 and q["open_interest"] == 1000
    assert "bid_price5" in q and "upper_limit" in q


def test_first_update_is_full_then_only_changed_fields() -> None:
    book = QuoteBook()
    first = book.update("SHFE.rb2605", quote_of(tick()))
    assert first == quote_of(tick())                       # full quote
    second = book.update("SHFE.rb2605", quote_of(tick(3901.0, datetime=T0 + 500, volume=11)))
    assert second == {"last_price": 3901, "bid_price1": 3900, "ask_price1": 3902, "volume": 11,
                      "datetime": "2025-03-03 09:00:01.000"}
    assert book.update("SHFE.rb2605", quote_of(tick(3901.0, datetime=T0 + 500, volume=11))) == {}
    assert book.get("SHFE.rb2605")["last_price"] == 3901   # the book holds the merged full quote


def test_merge_follows_diff_rules() -> None:
    tree: dict = {"quotes": {"A": {"x": 1, "y": 2}}}
    added = merge(tree, {"quotes": {"A": {"x": 3}, "B": {"z": 1}}})
    assert tree == {"quotes": {"A": {"x": 3, "y": 2}, "B": {"z": 1}}} and added == 1
    merge(tree, {"quotes": {"B": None}})
    assert tree["quotes"]["B"] is None


# ---------------------------------------------------------------------------- batching
def test_batch_waits_for_interval_or_count() -> None:
    st = ClientState(interval=0.1, max_changes=50)
    st.add({"quotes": {"A": {"last_price": 1}}}, now=10.0)
    assert st.take(10.05) is None                          # neither 100 ms nor 50 changes yet
    tree, _ = st.take(10.1)                                 # 100 ms after the first change
    assert tree == {"quotes": {"A": {"last_price": 1}}}
    st.written()
    for i in range(49):
        st.add({"quotes": {f"I{i}": {"last_price": i}}}, now=11.0)
    assert st.take(11.0) is None
    st.add({"quotes": {"I49": {"last_price": 49}}}, now=11.0)
    tree, _ = st.take(11.0)                                 # 50 changes: at once
    assert len(tree["quotes"]) == 50


def test_urgent_snapshot_goes_at_once_and_origin_is_the_oldest() -> None:
    st = ClientState()
    st.add({"quotes": {"A": {"x": 1}}}, now=1.0, origin_ns=200)
    st.add({"quotes": {"A": {"x": 2}}}, now=1.0, origin_ns=100, urgent=True)
    tree, origin = st.take(1.0)
    assert tree == {"quotes": {"A": {"x": 2}}} and origin == 100
    assert rtn_data(tree, origin) == {"aid": "rtn_data", "data": [tree], "origin_ns": 100}


# ---------------------------------------------------------------------------- slow clients
def test_slow_client_is_coalesced_latest_value_wins() -> None:
    st = ClientState(interval=0.1, max_changes=50)
    st.add({"quotes": {"A": {"last_price": 1}}}, now=0.0)
    assert st.take(0.2) is not None                        # in flight, not yet written
    for p in range(2, 1002):                                # 1000 updates while the client is behind
        st.add({"quotes": {"A": {"last_price": p, "volume": p}}}, now=0.3)
    assert st.take(0.5) is None                             # one message in flight at most
    assert st.leaves == 2 and st.coalesced == 1998          # memory stays at one value per field
    st.written()
    tree, _ = st.take(0.5)
    assert tree == {"quotes": {"A": {"last_price": 1001, "volume": 1001}}}


def test_client_that_stays_behind_is_dropped() -> None:
    st = ClientState(drop_after=5.0)
    st.add({"quotes": {"A": {"x": 1}}}, now=0.0, urgent=True)
    assert st.take(0.0) is not None
    assert st.drop_reason(4.9) is None
    assert "too slow" in (st.drop_reason(5.1) or "")
    st.written()
    assert st.drop_reason(100.0) is None


def test_pending_tree_is_bounded() -> None:
    st = ClientState(max_pending=100)
    st.add({"quotes": {"A": {"x": 1}}}, now=0.0, urgent=True)
    st.take(0.0)                                            # in flight: everything else piles up
    for i in range(101):
        st.add({"trade": {"acc": {"trades": {f"t{i}": 1}}}}, now=0.1)
    assert "pending updates" in (st.drop_reason(0.2) or "")


# ---------------------------------------------------------------------------- subscriptions
def test_subscriptions_bind_union_and_unbind_when_nobody_wants() -> None:
    s = Subscriptions()
    assert s.set("c1", ["A", "B"]) == ({"A", "B"}, set())
    assert s.set("c2", ["B", "C"]) == ({"C"}, set())
    assert s.set("c1", ["A"]) == (set(), set())             # B still wanted by c2
    assert s.remove("c2") == {"B", "C"}
    assert s.keys() == {"A"} and s.clients("A") == {"c1"}
    assert parse_ins_list(" rb2605, au2606,,rb2605 ") == ["rb2605", "au2606"]


# ---------------------------------------------------------------------------- tokens
def test_token_coverage_json_and_short_forms() -> None:
    t = Tokens.from_env({"QA_WEB_TOKENS": '{"tok-alpha-1": ["acc1", "acc2"], "tok-admin-1": "*"}'})
    assert t.configured
    assert t.covers("tok-alpha-1", "acc1") and not t.covers("tok-alpha-1", "acc3")
    assert t.covers("tok-admin-1", "anything")
    assert not t.covers("wrong-token", "acc1") and not t.covers(None, "acc1")
    assert t.split("tok-alpha-1", ["acc1", "acc3"]) == (["acc1"], ["acc3"])
    short = Tokens.from_env({"QA_WEB_TOKENS": "tok-alpha-1=acc1+acc2;tok-admin-1=*"})
    assert short.covers("tok-alpha-1", "acc2") and short.covers("tok-admin-1", "x")
    single = Tokens.from_env({"QA_WEB_TOKEN": "one-token-for-all"})
    assert single.covers("one-token-for-all", "acc9")


def test_no_token_configured_means_open_reads_only() -> None:
    t = Tokens.from_env({})
    assert not t.configured
    assert t.split(None, ["acc1"]) == (["acc1"], [])        # reads open (loopback daemon)
    assert not t.valid("anything")                         # writes refused by the handlers


@pytest.mark.parametrize("env", [{"QA_WEB_TOKENS": "{bad json"}, {"QA_WEB_TOKENS": "short=acc1"},
                                 {"QA_WEB_TOKENS": "noequalsign"}, {"QA_WEB_TOKEN": "short"}])
def test_bad_token_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(TokenError):
        Tokens.from_env(env)


# ---------------------------------------------------------------------------- compactness and the invariant
def test_numbers_are_compact_but_exact_enough() -> None:
    q = quote_of(tick(3891.8, bid_price_1=3891.8 - 0.2, ask_price_1=0.1 + 0.2))
    assert q["bid_price1"] == 3891.6 and q["ask_price1"] == 0.3          # no binary-float noise
    assert quote_of(tick(turnover=1234567890.125))["amount"] == 1234567890.125
    assert quote_of(tick(volume=12.0))["volume"] == 12 and isinstance(quote_of(tick(volume=12.0))["volume"], int)


def test_coalesced_changes_of_one_instrument_do_not_send_early() -> None:
    st = ClientState(interval=0.1, max_changes=50)
    for p in range(200):                                   # 200 ticks of one instrument within 100 ms
        st.add({"quotes": {"A": {"last_price": p, "volume": p}}}, now=1.0 + p * 1e-4)
        assert st.take(1.0 + p * 1e-4) is None              # 2 distinct fields: not a reason to send
    tree, _ = st.take(1.1)
    assert tree == {"quotes": {"A": {"last_price": 199, "volume": 199}}}   # one diff, latest values


@pytest.mark.parametrize("depth", [1, 5])
def test_a_client_applying_the_diffs_ends_with_exactly_the_full_quote(depth: int) -> None:
    """The invariant of the incremental stream: first message full, then batched and coalesced
    diffs (some batches held back as if the client were slow), merged DIFF-style by the client,
    give exactly the server's full quote -- which is quote_of(the latest tick) -- at every batch."""
    import json
    import random

    rng = random.Random(depth)
    book, st, client = QuoteBook(), ClientState(interval=0.1, max_changes=40), {}
    keys = [f"SHFE.rb26{i:02d}" for i in range(8)]
    last: dict[str, Tick] = {}
    price = {k: 3900.0 + 7 * i for i, k in enumerate(keys)}
    now = 0.0
    for n in range(3000):
        k = rng.choice(keys)
        price[k] += rng.choice((-0.2, 0.0, 0.2))
        p = price[k]
        lv: dict[str, float] = {"bid_price_1": p - 0.2, "ask_price_1": p + 0.2, "bid_volume_1": rng.randint(1, 9)}
        if depth == 5:
            lv |= {f"ask_volume_{i}": float(rng.randint(0, 30)) for i in range(2, 6)}
            lv |= {f"bid_price_{i}": p - 0.2 * i for i in range(2, 6)}
        t = tick(p, symbol=k.split(".")[1], datetime=T0 + 500 * n, volume=n, turnover=n * p * 10.0 + 0.1,
                 open_interest=1000.0 + rng.randint(-3, 3), **lv)
        last[k] = t
        changed = book.update(k, quote_of(t))
        if changed:
            st.add({"quotes": {k: changed}}, now, changes=len(changed), origin_ns=n)
        now += rng.choice((0.0, 0.001, 0.02))
        if rng.random() < 0.7 and st.in_flight_since is not None:
            st.written()                                       # sometimes the client lags a while
        got = st.take(now)
        if got is not None:
            wire = json.loads(json.dumps(rtn_data(*got)))    # what the client really gets
            for patch in wire["data"]:
                merge(client, patch)
            for key, q in client["quotes"].items():
                if key not in st.pending.get("quotes", {}):
                    assert q == book.get(key) == quote_of(last[key])
    st.written()
    if st.pending:
        merge(client, json.loads(json.dumps(st.take(now + 1)[0])))
    assert client["quotes"] == {k: quote_of(last[k]) for k in last} == book.quotes
