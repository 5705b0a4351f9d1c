"""The request body producer the registry client and the etcd gateway send bytes with."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from regdisc.httpclient import BytesProducer

from .conftest import fired


@implementer(IConsumer)
class Collecting:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        raise AssertionError("not expected")

    def unregisterProducer(self) -> None:
        raise AssertionError("not expected")


def test_the_body_is_written_as_production_starts() -> None:
    """The whole body is written, with its length known, before startProducing returns."""
    producer = BytesProducer(b'{"ID":"7"}')
    verifyObject(IBodyProducer, producer)
    consumer = Collecting()
    done: Deferred = producer.startProducing(consumer)
    assert producer.length == 10
    assert consumer.written == [b'{"ID":"7"}']
    assert fired(done) is None
