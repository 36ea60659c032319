"""The MQTT publisher against the real Mosquitto at 127.0.0.1:1883.

A subscriber (aiomqtt) checks what arrives: topics, JSON payloads, QoS 1 and
order. Broker outages are made with a small loopback TCP proxy to 1883 that the
test starts and stops, so "the broker comes back" is real. Without Mosquitto the
broker tests are skipped, except under CI (``CI=true``) where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiomqtt
import pytest

from agent.events import EventPublisher, MqttSettings, MqttSettingsError

BROKER = ("127.0.0.1", 1883)
FAST = {"reconnect_min": 0.05, "reconnect_max": 0.2}


@pytest.fixture
def mosquitto() -> None:
    try:
        with socket.create_connection(BROKER, timeout=1):
            pass
    except OSError as exc:
        message = f"Mosquitto at {BROKER[0]}:{BROKER[1]} is not reachable ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)


def _prefix() -> str:
    return f"callgate-test-{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Subscriber:
    """Collects every message under ``<prefix>/#`` with QoS 1."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.messages: list[aiomqtt.Message] = []
        self._arrived = asyncio.Event()

    async def run(self, subscribed: asyncio.Event) -> None:
        async with aiomqtt.Client(*BROKER, timeout=5) as client:
            await client.subscribe(f"{self.prefix}/#", qos=1)
            subscribed.set()
            async for message in client.messages:
                self.messages.append(message)
                self._arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[aiomqtt.Message]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.messages

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(bytes(m.payload)) for m in self.messages]  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def subscribed(prefix: str) -> AsyncIterator[Subscriber]:
    subscriber = Subscriber(prefix)
    ready = asyncio.Event()
    task = asyncio.create_task(subscriber.run(ready))
    try:
        async with asyncio.timeout(5):
            await asyncio.wait({task, asyncio.create_task(ready.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield subscriber
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


@contextlib.asynccontextmanager
async def running(publisher: EventPublisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(10):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class Proxy:
    """A loopback TCP proxy to Mosquitto on a fixed port, started and stopped at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        # When set, only the broker's first packet (CONNACK) reaches the client: the
        # broker gets every PUBLISH but the publisher never sees a PUBACK.
        self.hold_acks = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Stop listening and cut every connection, as a broker crash would."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*BROKER)
        self._writers += [writer, up_writer]
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)),
                 asyncio.create_task(self._pipe(up_reader, writer, self.hold_acks))]
        self._tasks.update(pipes)
        for pipe in pipes:
            pipe.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: bool = False
    ) -> None:
        try:
            first = True
            while data := await reader.read(65536):
                if first or not hold:
                    writer.write(data)
                    await writer.drain()
                first = False
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()


# --- settings ---------------------------------------------------------------------------


def test_settings_from_the_url() -> None:
    assert MqttSettings().endpoint() == ("127.0.0.1", 1883, False)
    assert MqttSettings(url="mqtts://broker.example").endpoint() == ("broker.example", 8883, True)
    assert MqttSettings(url="mqtt://b:1884", tls=True).endpoint() == ("b", 1884, True)
    with_user = MqttSettings(url="mqtt://agent:p%40ss@b")
    assert with_user.credentials() == ("agent", "p@ss")
    assert MqttSettings(url="mqtt://agent:x@b", username="u", password="y").credentials() == (
        "u", "y")


def test_password_is_not_in_repr() -> None:
    assert "hunter2" not in repr(MqttSettings(username="u", password="hunter2"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://b:1883"}, "must start with mqtt:// or mqtts://"),
        ({"url": "mqtt://"}, "has no host"),
        ({"url": "mqtt://b:99999"}, "bad port"),
        ({"url": "mqtt://b/topic"}, "only scheme://host"),
        ({"buffer": 0}, "at least 1"),
        ({"node": "pbx/+"}, "node 'pbx/+'"),
        ({"topic_prefix": ""}, "topic_prefix ''"),
    ],
)
def test_bad_settings_are_refused_with_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MqttSettingsError, match=message.replace("+", r"\+")):
        MqttSettings(**kwargs)


def test_missing_ca_file_is_refused_at_construction(tmp_path: Any) -> None:
    settings = MqttSettings(url="mqtts://b", ca_file=str(tmp_path / "none.pem"))
    with pytest.raises(MqttSettingsError, match="ca_file"):
        EventPublisher(settings)


# --- publish() alone: never blocks, never raises, bounded --------------------------------


def test_publish_without_a_broker_buffers_and_drops_the_oldest() -> None:
    publisher = EventPublisher(MqttSettings(url=f"mqtt://127.0.0.1:{_free_port()}", buffer=5))
    for i in range(12):
        publisher.publish("decision", {"i": i})
    assert (publisher.depth, publisher.dropped, publisher.published) == (5, 7, 0)
    assert [json.loads(e.payload)["i"] for e in publisher._buffer] == [7, 8, 9, 10, 11]
    assert publisher.connected is False


def test_unserialisable_event_is_rejected_not_raised() -> None:
    publisher = EventPublisher(MqttSettings())
    publisher.publish("decision", {"bad": object()})
    publisher.publish("bad/+/topic", {})
    publisher.publish("decision", {"ok": True})
    assert (publisher.rejected, publisher.depth) == (2, 1)


def test_payload_envelope_and_exact_values() -> None:
    moment = datetime(2026, 11, 25, 1, 2, 3, 456789, tzinfo=UTC)
    publisher = EventPublisher(MqttSettings(node="pbx-1", topic_prefix="cg"), clock=lambda: moment)
    publisher.publish("call/end", {"call_id": "c1", "charge": Decimal("0.2600"),
                                   "answered": moment, "lines": {"a"}})
    (event,) = publisher._buffer
    assert event.topic == "cg/pbx-1/call/end"
    assert json.loads(event.payload) == {
        "schema": 1, "node": "pbx-1", "ts": "2026-11-25T01:02:03.456789Z", "seq": 1,
        "call_id": "c1", "charge": "0.2600", "answered": "2026-11-25T01:02:03.456789+00:00",
        "lines": ["a"],
    }


async def test_flush_times_out_while_the_broker_is_down() -> None:
    publisher = EventPublisher(MqttSettings(url=f"mqtt://127.0.0.1:{_free_port()}"), **FAST)
    assert await publisher.flush(0.01) is True  # nothing waiting
    publisher.publish("cutoff", {"call_id": "c"})
    async with running(publisher):
        assert await publisher.flush(0.3) is False
        assert publisher.connected is False
        assert publisher.depth == 1


# --- against Mosquitto -----------------------------------------------------------------


async def test_subscriber_receives_every_event_in_order_with_qos1(mosquitto: None) -> None:
    prefix = _prefix()
    publisher = EventPublisher(MqttSettings(topic_prefix=prefix, node="pbx-1"))
    topics = ["decision", "call/start", "call/end", "cutoff", "balance/low", "policy/reload"]
    async with subscribed(prefix) as subscriber:
        # Some published before the connection exists, the rest while connected.
        for i in range(3):
            publisher.publish(topics[i], {"i": i, "amount": Decimal("0.1300")})
        async with running(publisher):
            for i in range(3, 60):
                publisher.publish(topics[i % len(topics)], {"i": i, "amount": Decimal("0.1300")})
            assert await publisher.flush(5) is True
            messages = await subscriber.wait_for(60)
            assert publisher.connected is True
    assert [m.topic.value for m in messages] == [
        f"{prefix}/pbx-1/{topics[i % len(topics)]}" for i in range(60)]
    assert {m.qos for m in messages} == {1}
    payloads = subscriber.payloads()
    assert [p["i"] for p in payloads] == list(range(60))
    assert [p["seq"] for p in payloads] == list(range(1, 61))
    assert all(p["schema"] == 1 and p["node"] == "pbx-1" and p["amount"] == "0.1300"
               for p in payloads)
    assert (publisher.published, publisher.depth, publisher.dropped) == (60, 0, 0)


async def test_buffered_events_arrive_when_the_broker_comes_back(mosquitto: None) -> None:
    prefix = _prefix()
    proxy = Proxy(_free_port())
    publisher = EventPublisher(
        MqttSettings(url=f"mqtt://127.0.0.1:{proxy.port}", topic_prefix=prefix, buffer=3),
        **FAST)
    async with subscribed(prefix) as subscriber, running(publisher):
        # Broker unreachable: publish returns at once, the oldest are dropped.
        for i in range(5):
            publisher.publish("decision", {"i": i})
        assert (publisher.depth, publisher.dropped) == (3, 2)
        assert await publisher.flush(0.2) is False
        assert publisher.connected is False

        await proxy.start()
        await subscriber.wait_for(3)
        assert await publisher.flush(5) is True
        assert publisher.connected is True

        # The broker goes away mid-stream; events published meanwhile wait, then arrive.
        await proxy.stop()
        await _until(lambda: not publisher.connected)
        publisher.publish("cutoff", {"i": 5})
        publisher.publish("call/end", {"i": 6})
        assert await publisher.flush(0.2) is False
        await proxy.start()
        await subscriber.wait_for(5)
        assert await publisher.flush(5) is True
        await proxy.stop()
    assert [p["i"] for p in subscriber.payloads()] == [2, 3, 4, 5, 6]
    assert [m.topic.value for m in subscriber.messages][-2:] == [
        f"{prefix}/node/cutoff", f"{prefix}/node/call/end"]
    assert (publisher.dropped, publisher.published, publisher.depth) == (2, 5, 0)


async def test_cancelling_run_while_connected_ends_it(mosquitto: None) -> None:
    publisher = EventPublisher(MqttSettings(topic_prefix=_prefix()))
    task = asyncio.create_task(publisher.run())
    await _until(lambda: publisher.connected)
    task.cancel()
    async with asyncio.timeout(10):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()
    assert publisher.connected is False


async def test_unacknowledged_events_are_sent_again_after_a_reconnect(mosquitto: None) -> None:
    prefix = _prefix()
    proxy = Proxy(_free_port())
    proxy.hold_acks = True
    publisher = EventPublisher(
        MqttSettings(url=f"mqtt://127.0.0.1:{proxy.port}", topic_prefix=prefix), **FAST)
    async with subscribed(prefix) as subscriber, running(publisher):
        await proxy.start()
        await _until(lambda: publisher.connected)
        for i in range(3):
            publisher.publish("call/end", {"i": i})
        await subscriber.wait_for(3)  # the broker has them, the publisher has no PUBACK
        assert (publisher.depth, publisher.published) == (3, 0)
        await proxy.stop()
        await _until(lambda: not publisher.connected)
        proxy.hold_acks = False
        await proxy.start()
        assert await publisher.flush(5) is True
        await subscriber.wait_for(6)
        await proxy.stop()
    # At least once: the repeat is visible to a consumer by its seq.
    assert [(p["i"], p["seq"]) for p in subscriber.payloads()] == [
        (0, 1), (1, 2), (2, 3), (0, 1), (1, 2), (2, 3)]
    assert (publisher.depth, publisher.published) == (0, 3)


async def test_full_buffer_while_connected_drops_the_oldest_unsent(mosquitto: None) -> None:
    prefix = _prefix()
    proxy = Proxy(_free_port())
    proxy.hold_acks = True
    publisher = EventPublisher(
        MqttSettings(url=f"mqtt://127.0.0.1:{proxy.port}", topic_prefix=prefix, buffer=3),
        window=2, **FAST)
    async with subscribed(prefix) as subscriber, running(publisher):
        await proxy.start()
        await _until(lambda: publisher.connected)
        publisher.publish("decision", {"i": 0})
        publisher.publish("decision", {"i": 1})
        await subscriber.wait_for(2)  # both on the wire, neither acknowledged
        for i in range(2, 7):
            publisher.publish("decision", {"i": i})
        # The window (0, 1) is untouched; of 2..6 the buffer keeps the newest three.
        assert (publisher.depth, publisher.dropped) == (5, 2)
        await proxy.stop()
        await _until(lambda: not publisher.connected)
        # Back in the buffer the unacknowledged 0 and 1 are the oldest: over the
        # bound they go (the broker already has them).
        assert (publisher.depth, publisher.dropped) == (3, 4)
        proxy.hold_acks = False
        await proxy.start()
        assert await publisher.flush(5) is True
        await subscriber.wait_for(5)
        await proxy.stop()
    assert [p["i"] for p in subscriber.payloads()] == [0, 1, 4, 5, 6]
    assert (publisher.published, publisher.dropped) == (3, 4)
