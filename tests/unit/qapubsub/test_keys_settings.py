from __future__ import annotations

import pytest

from qapubsub import keys
from qapubsub.messages import DecodeError, Message, decode, encode
from qapubsub.settings import ConfigError, Settings, redact_url
from qapubsub.topology import Topology, explain_precondition


def test_keys_are_built_in_one_place() -> None:
    assert keys.tick_key("shfe", "rb2512") == "SHFE.rb2512"
    assert keys.bar_key("1min", "SHFE", "rb2512") == "1min.SHFE.rb2512"
    assert keys.report_key("acc1", "trade") == "acc1.trade"
    assert keys.bars_of(freq="5min") == "5min.*.*"


@pytest.mark.parametrize("bad", ["", "rb.2512", "rb*", "a#", "a b"])
def test_key_words_that_would_change_meaning_are_refused(bad: str) -> None:
    with pytest.raises(keys.KeyError_):
        keys.tick_key("SHFE", bad)


def test_unknown_report_kind_refused() -> None:
    with pytest.raises(keys.KeyError_, match="report kind"):
        keys.report_key("acc", "trades")


def test_settings_from_env_and_quantaxis_names() -> None:
    s = Settings.from_env({"QA_AMQP_URL": "amqp://u:p@h1:5672/%2F, amqp://u:p@h2:5673/%2F"})
    assert s.amqp_urls == ("amqp://u:p@h1:5672/%2F", "amqp://u:p@h2:5673/%2F")
    q = Settings.from_env({"QAPUBSUB_IP": "10.0.0.5", "QAPUBSUB_PWD": "s3cret"})
    assert q.amqp_url == "amqp://admin:s3cret@10.0.0.5:5672/%2F"
    assert "s3cret" not in repr(q)
    m = Settings.from_env({"MONGODB": "dbhost"})
    assert m.mongo_url == "mongodb://dbhost:27017/"


@pytest.mark.parametrize("env, var", [
    ({"QA_AMQP_URL": "http://x"}, "QA_AMQP_URL"),
    ({"QA_MONGO_URL": "mongodb://"}, "QA_MONGO_URL"),
    ({"QA_LOG_LEVEL": "LOUD"}, "QA_LOG_LEVEL"),
    ({"QAPUBSUB_PORT": "abc"}, "QAPUBSUB_PORT"),
])
def test_bad_config_names_the_bad_key(env: dict[str, str], var: str) -> None:
    with pytest.raises(ConfigError, match=var):
        Settings.from_env(env)


def test_redact_url() -> None:
    assert redact_url("amqp://u:secret@h:1/%2F") == "amqp://u:***@h:1/%2F"
    assert redact_url("amqp://h/") == "amqp://h/"


class _Cmd(Message, tag="test.cmd", forbid_unknown_fields=True):
    account: str
    volume: int


def test_envelope_roundtrip_and_strict_decode() -> None:
    msg = _Cmd(account="a", volume=3)
    back = decode(encode(msg), _Cmd)
    assert back == msg and back.schema == "test.cmd" and back.ts > 0 and back.id
    with pytest.raises(DecodeError, match="volume"):
        decode(b'{"schema":"test.cmd","account":"a"}', _Cmd)
    with pytest.raises(DecodeError, match="bogus"):
        decode(b'{"schema":"test.cmd","account":"a","volume":1,"bogus":1}', _Cmd)
    with pytest.raises(DecodeError, match="not valid JSON"):
        decode(b'{"schema":', _Cmd)


def test_topology_names_and_mismatch_sentence() -> None:
    t = Topology()
    assert (t.order, t.risk, t.tick, t.qapubsub_order) == ("qaorder", "qarisk", "qa.tick", "QAORDER_ROUTER")
    assert t.exchange("QAORDER_ROUTER").type == "direct" and not t.exchange("QAORDER_ROUTER").durable
    assert Topology("t-1.").order == "t-1.qaorder"
    text = ("PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'qaorder' in vhost '/': "
            "received 'topic' but current is 'direct'")
    sentence = explain_precondition(text)
    assert "'qaorder'" in sentence and "'direct'" in sentence and "'topic'" in sentence


def test_tick_queue_type_comes_from_qa_tick_queue_and_a_bad_value_names_the_variable(monkeypatch) -> None:
    from qapubsub.settings import ConfigError
    from qapubsub.topology import tick_queue_type_from_env

    monkeypatch.delenv("QA_TICK_QUEUE", raising=False)
    assert Topology().tick_queue(0).quorum is False
    assert Topology(tick_queue_type="quorum").tick_queue(1).quorum is True
    monkeypatch.setenv("QA_TICK_QUEUE", "Quorum")
    q = Topology().tick_queue(0)
    assert q.quorum and q.arguments["x-single-active-consumer"] is True
    assert tick_queue_type_from_env({"QA_TICK_QUEUE": ""}) == "classic"
    with pytest.raises(ConfigError, match="QA_TICK_QUEUE='stream'"):
        tick_queue_type_from_env({"QA_TICK_QUEUE": "stream"})
    text = ("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'qa.tickhandler.0' in vhost '/': "
            "received none but current is the value 'quorum' of type 'longstr'")
    assert "QA_TICK_QUEUE=quorum keeps this queue" in explain_precondition(text)


def test_encode_takes_bson_int64_read_back_from_mongodb() -> None:
    """pymongo decodes a BSON int64 at or above 2**31 as bson.Int64 (an int subclass msgspec refuses):
    a millisecond time in an account document read back made the account snapshot fail to encode."""
    import json

    import bson

    from qapubsub.messages import encode

    doc = bson.decode(bson.encode({"insert_date_time": 1_740_992_400_500, "volume": 3}))
    assert type(doc["insert_date_time"]) is bson.int64.Int64
    assert json.loads(encode({"orders": {"o1": doc}})) == {"orders": {"o1": {"insert_date_time": 1_740_992_400_500,
                                                                            "volume": 3}}}
    with pytest.raises(TypeError, match="cannot encode objects of type object"):
        encode({"x": object()})
