"""qapubsub: QAFlow's RabbitMQ transport (connections, topology, codecs, publishers, consumers)."""
from __future__ import annotations

from .messages import DecodeError, Message, decode, encode, new_id
from .settings import ConfigError, Settings, redact_url
from .topology import Binding, Exchange, Queue, Topology, TopologyMismatch

__all__ = [
    "Binding", "ConfigError", "DecodeError", "Exchange", "Message", "Queue", "Settings", "Topology",
    "TopologyMismatch", "decode", "encode", "new_id", "redact_url",
]
