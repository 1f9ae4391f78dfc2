"""QAPUBSUB-compatible facade: a QUANTAXIS user changes only the import.

::

    # from QAPUBSUB.producer import publisher_routing      (before)
    from qapubsub.compat import publisher_routing, subscriber_routing

    p = publisher_routing(exchange="QAORDER_ROUTER")        # direct, non-durable, as QAPUBSUB
    p.pub(json.dumps(order), routing_key="acc1")           # now confirmed, with retries

    class MySub(subscriber_routing):
        def callback(self, chan, method_frame, header_frame, body):
            print(method_frame.routing_key, body)

    s = MySub(exchange="QAORDER_ROUTER", routing_key="acc1")
    s.add_sub("QAORDER_ROUTER", "acc2")                     # restored after a reconnect
    s.start()                                              # blocks; s.stop() from another thread

Same class names, constructor arguments and call shapes as QAPUBSUB 1.11 (``publisher``,
``publisher_routing``, ``publisher_topic``, ``subscriber``, ``subscriber_routing``,
``subscriber_topic``; ``pub(text[, routing_key])``, ``callback(chan, method, properties,
body)``, ``add_sub(exchange, routing_key)``, ``subscribe()``/``start()``/``stop()``,
``exit()``), and the same exchange declarations (fanout / direct / topic, ``durable=False``
unless given, ``auto_delete=False``), so QAPUBSUB clients on the same exchanges keep working.
Underneath: :mod:`qapubsub.sync` -- publisher confirms and bounded retries (no silent
loss, no ~490 duplicate copies), manual ack after ``callback`` returns, reconnect that
restores the queue, every binding (``add_sub`` ones too) and the consumer.

Connection: with no ``host``/``port``/``user``/``password`` given the URL comes from
:class:`~qapubsub.settings.Settings` (``QA_AMQP_URL``, or QUANTAXIS's
``QAPUBSUB_IP/PORT/USER/PWD``); a value given fills QAPUBSUB's defaults
(``admin``/``admin`` at ``localhost:5672``) for the others.
"""
from __future__ import annotations

import json
import logging
import random
import urllib.parse
from typing import Any

import pika

from .settings import Settings
from .sync import Connection, Consumer, Delivery, Publisher
from .topology import Binding, Exchange, Queue

log = logging.getLogger(__name__)

QAPUBSUB_HOST = "localhost"
QAPUBSUB_PORT = 5672
QAPUBSUB_USER = "admin"
QAPUBSUB_PASSWORD = "admin"

__all__ = ["publisher", "publisher_routing", "publisher_topic", "subscriber", "subscriber_routing",
           "subscriber_topic", "amqp_url"]


def amqp_url(host: str | None = None, port: int | str | None = None, user: str | None = None,
             password: str | None = None, vhost: str = "/") -> tuple[str, ...]:
    """The broker URL(s) for QAPUBSUB-style arguments (see the module doc)."""
    if host is None and port is None and user is None and password is None:
        urls = Settings.from_env().amqp_urls
        if vhost in ("/", "", None):
            return urls
        return tuple(urllib.parse.urlunsplit(urllib.parse.urlsplit(u)._replace(path="/" + urllib.parse.quote(vhost, safe="")))
                     for u in urls)
    q = urllib.parse.quote
    return (f"amqp://{q(user or QAPUBSUB_USER, safe='')}:{q(password or QAPUBSUB_PASSWORD, safe='')}@"
            f"{host or QAPUBSUB_HOST}:{int(port or QAPUBSUB_PORT)}/{q(vhost or '/', safe='')}",)


def _body(text: Any) -> tuple[bytes, str]:
    if isinstance(text, (bytes, bytearray)):
        return bytes(text), "text/plain"
    if isinstance(text, str):
        return text.encode("utf-8"), "text/plain"
    if isinstance(text, (dict, list)):
        return json.dumps(text, ensure_ascii=False).encode("utf-8"), "application/json"
    raise TypeError(f"pub() takes str, bytes or dict, not {type(text).__name__}")


class _base:
    """Holds QAPUBSUB's attributes and one robust connection."""

    exchange_type = "fanout"

    def __init__(self, host: str | None, port: int | str | None, user: str | None, password: str | None,
                 channel_number: int, queue_name: str, routing_key: str, exchange: str, exchange_type: str | None,
                 vhost: str, durable: bool, connection: Connection | None = None) -> None:
        self.host, self.port, self.user, self.vhost = host, port, user, vhost
        self.channel_number = channel_number
        self.queue_name = queue_name
        self.routing_key = routing_key
        self.exchange = exchange
        if exchange_type is not None:
            self.exchange_type = exchange_type
        self.durable = durable
        self.connection = connection or Connection(urls=amqp_url(host, port, user, password, vhost))
        # as QAPUBSUB: durable=False (unless given), auto_delete=False
        self._exchanges = (Exchange(exchange, self.exchange_type, durable=durable),) if exchange else ()

    def reconnect(self) -> _base:
        self.connection.lost(None)
        self.connection.ensure()
        return self


class _publisher(_base):
    def __init__(self, host: str | None = None, port: int | str | None = None, user: str | None = None,
                 password: str | None = None, channel_number: int = 1, queue_name: str = "",
                 routing_key: str = "default", exchange: str = "", exchange_type: str | None = None,
                 vhost: str = "/", durable: bool = False, *, mandatory: bool = False, persistent: bool = True,
                 connection: Connection | None = None) -> None:
        super().__init__(host, port, user, password, channel_number, queue_name, routing_key, exchange,
                         exchange_type, vhost, durable, connection)
        self._publisher = Publisher(self.connection, exchanges=self._exchanges, mandatory=mandatory,
                                    persistent=persistent)
        self._publisher._channel()  # connect and declare now, as QAPUBSUB does in __init__

    @property
    def channel(self) -> Any:
        return self._publisher._channel()

    def _pub(self, text: Any, routing_key: str) -> str:
        body, content_type = _body(text)
        return self._publisher.publish(self.exchange, routing_key, body, properties={"content_type": content_type})

    def exit(self) -> None:
        self.connection.close()

    close = exit


class publisher(_publisher):
    """QAPUBSUB ``publisher``: fanout exchange; ``pub(text)`` uses the constructor's routing key."""

    exchange_type = "fanout"

    def pub(self, text: Any, routing_key: str | None = None) -> str:
        return self._pub(text, self.routing_key if routing_key is None else routing_key)


class publisher_routing(_publisher):
    """QAPUBSUB ``publisher_routing``: direct exchange; ``pub(text, routing_key)``."""

    exchange_type = "direct"

    def pub(self, text: Any, routing_key: str) -> str:
        return self._pub(text, routing_key)


class publisher_topic(_publisher):
    """QAPUBSUB ``publisher_topic``: topic exchange; ``pub(text, routing_key)``."""

    exchange_type = "topic"

    def pub(self, text: Any, routing_key: str) -> str:
        return self._pub(text, routing_key)


class _subscriber(_base):
    def __init__(self, host: str | None = None, port: int | str | None = None, user: str | None = None,
                 password: str | None = None, exchange: str = "", queue: str | None = None,
                 routing_key: str = "default", durable: bool = False, vhost: str = "/", *,
                 prefetch: int = 100, connection: Connection | None = None) -> None:
        super().__init__(host, port, user, password, 1, queue or f"qa_sub.{random.randint(0, 1_000_000)}",
                         routing_key, exchange, None, vhost, durable, connection)
        # As QAPUBSUB: a server-named, exclusive, auto-delete queue (re-created on reconnect).
        bind_key = "qa_routing" if self.exchange_type == "fanout" else routing_key
        bindings = (Binding(exchange, bind_key),) if exchange else ()
        self._consumer = Consumer(self.connection, Queue("", durable=durable, exclusive=True, auto_delete=True,
                                                         bindings=bindings),
                                  self._handle, exchanges=self._exchanges, prefetch=prefetch)

    @property
    def queue(self) -> str:
        """The server-named queue (changes after a reconnect)."""
        return self._consumer.queue_name

    @property
    def channel(self) -> Any:
        return self._consumer._ch

    def _handle(self, body: bytes, delivery: Delivery) -> None:
        self.callback(self._consumer._ch, delivery, delivery.properties, body)

    def callback(self, chan: Any, method_frame: Any, _header_frame: pika.spec.BasicProperties, body: bytes,
                 userdata: Any = None) -> None:
        """Override (or assign) this; ``method_frame`` has ``routing_key``, ``exchange``, ``delivery_tag``."""
        log.info("message", extra={"routing_key": method_frame.routing_key, "size": len(body)})

    def add_sub(self, exchange: str, routing_key: str) -> None:
        """Bind one more (exchange, routing key); kept across reconnects."""
        self._consumer.bind(exchange, routing_key)

    def subscribe(self) -> None:
        self._consumer.run()

    def start(self) -> None:
        """Consume until :meth:`stop` (reconnecting on its own; no recursion as in QAPUBSUB)."""
        self._consumer.run()

    def stop(self) -> None:
        self._consumer.stop()

    @property
    def ready(self) -> Any:
        """A threading.Event set while consuming."""
        return self._consumer.ready

    def exit(self) -> None:
        self._consumer.stop()
        self.connection.close()


class subscriber(_subscriber):
    """QAPUBSUB ``subscriber``: fanout exchange."""

    exchange_type = "fanout"


class subscriber_routing(_subscriber):
    """QAPUBSUB ``subscriber_routing``: direct exchange, bound with ``routing_key``."""

    exchange_type = "direct"


class subscriber_topic(_subscriber):
    """QAPUBSUB ``subscriber_topic``: topic exchange, bound with the pattern ``routing_key``."""

    exchange_type = "topic"
