"""The MQTT event publisher: a bounded in-memory buffer drained to the broker with QoS 1.

Gating and metering must never wait for MQTT, so :meth:`EventPublisher.publish`
is synchronous: it serialises the event, appends it to a bounded buffer and
returns. :meth:`EventPublisher.run` (a task the daemon owns) connects with
aiomqtt, sends the buffer in order with QoS 1, and reconnects with capped,
jittered exponential backoff for as long as it runs. While the broker is away
the buffer holds up to ``MqttSettings.buffer`` events (while connected, up to
``window`` more are on the wire awaiting their PUBACK); when it is full the
oldest waiting event is dropped and counted in ``dropped``.

Use (the daemon)::

    publisher = EventPublisher(MqttSettings(url=..., node=config.node, buffer=...))
    task = task_group.create_task(publisher.run())
    publisher.publish("decision", {"call_id": ..., "result": "DENY", ...})  # sync
    # on SIGTERM, after the last event:
    drained = await publisher.flush(5.0)
    task.cancel()

Topics are ``<topic_prefix>/<node>/<topic>`` (``callgate/pbx-1/decision``,
``…/call/start``, ``…/call/end``, ``…/cutoff``, ``…/balance/low``,
``…/policy/reload``). Payloads are JSON objects::

    {"schema": 1, "node": "pbx-1", "ts": "2026-11-25T01:02:03.456789Z", "seq": 17, ...}

``seq`` counts events from 1 in this process, so a consumer can see a gap
(events dropped while the broker was down) or a repeat. Delivery is at least
once: an event is removed from the buffer only when the broker has acknowledged
it (PUBACK), so events in flight when the connection drops are sent again after
the reconnect. Decimal amounts are written as strings (``"0.1300"``), never as
floats; datetimes as ISO 8601.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from enum import Enum
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog

log = structlog.get_logger("callgate.mqtt")

SCHEMA_VERSION = 1
# Publishes in flight at once: enough to keep the loopback pipe full, small enough
# that a reconnect re-sends little (paho's own default in-flight limit is 20).
WINDOW = 20
KEEPALIVE_SECONDS = 30
# aiomqtt's per-operation timeout (CONNACK, PUBACK, DISCONNECT): a broker that
# accepts TCP but never answers is given up on after this and retried.
OPERATION_TIMEOUT = 5.0


class MqttSettingsError(ValueError):
    """MQTT settings that cannot work; the message says which field and why."""


@dataclass(frozen=True)
class MqttSettings:
    url: str = "mqtt://127.0.0.1:1883"  # mqtt:// or mqtts:// (TLS); host and port from the URL
    username: str | None = None  # or in the URL: mqtt://user:password@host
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None  # CA bundle for mqtts://; the system store when None
    topic_prefix: str = "callgate"
    node: str = "node"
    buffer: int = 10_000  # max events held while the broker is down
    client_id: str | None = None  # None: a random id chosen by the client library

    def __post_init__(self) -> None:
        self.endpoint()  # validate the URL now, not at the first connect
        if self.buffer < 1:
            raise MqttSettingsError(f"mqtt buffer must be at least 1, not {self.buffer}")
        for name in ("topic_prefix", "node"):
            value = getattr(self, name)
            if not value or any(c in value for c in "+#\0"):
                raise MqttSettingsError(
                    f"mqtt {name} {value!r} must be non-empty, without '+', '#' or NUL"
                )

    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) from the URL; mqtts:// means TLS, default ports 1883/8883."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise MqttSettingsError(
                f"mqtt url {self.url!r} must start with mqtt:// or mqtts:// (TLS)"
            )
        if not parts.hostname:
            raise MqttSettingsError(f"mqtt url {self.url!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise MqttSettingsError(f"mqtt url {self.url!r} must be only scheme://host[:port]")
        try:
            port = parts.port
        except ValueError:
            raise MqttSettingsError(f"mqtt url {self.url!r} has a bad port") from None
        tls = self.tls or parts.scheme == "mqtts"
        return parts.hostname, port or (8883 if tls else 1883), tls

    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password): the fields, else those written in the URL."""
        parts = urlsplit(self.url)
        username = self.username or (unquote(parts.username) if parts.username else None)
        password = self.password or (unquote(parts.password) if parts.password else None)
        return username, password


@dataclass(slots=True)
class _Event:
    seq: int
    topic: str
    payload: bytes


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: "0.1300", never 0.13 through a float
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class EventPublisher:
    """Publish events without ever blocking the caller; drain them to MQTT from :meth:`run`.

    Read-only counters for metrics and logs: ``depth`` (events waiting, including
    those sent but not yet acknowledged), ``dropped`` (oldest events discarded
    because the buffer was full), ``rejected`` (events that could not be
    serialised: a bug, logged), ``published`` (acknowledged by the broker),
    ``connected``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        clock: Callable[[], datetime] = _utc_now,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        window: int = WINDOW,
    ) -> None:
        self.settings = settings
        self._host, self._port, tls = settings.endpoint()
        self._username, self._password = settings.credentials()
        try:
            self._tls_context = ssl.create_default_context(cafile=settings.ca_file) if tls else None
        except OSError as exc:
            raise MqttSettingsError(f"mqtt ca_file {settings.ca_file!r}: {exc}") from None
        self._clock = clock
        self._reconnect = (reconnect_min, reconnect_max)
        self._window = max(1, window)
        self._base = f"{settings.topic_prefix}/{settings.node}"
        self._buffer: deque[_Event] = deque()
        self._seq = itertools.count(1)
        # Sent, not yet acknowledged (at most `window`), oldest first; these go back
        # to the front of the buffer if the connection is lost.
        self._flight: deque[tuple[_Event, asyncio.Task[None]]] = deque()
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self.dropped = 0
        self.rejected = 0
        self.published = 0
        self.connected = False

    @property
    def depth(self) -> int:
        return len(self._buffer) + len(self._flight)

    # --- the caller's side: synchronous, never blocks, never raises ------------------

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Queue one event for ``<prefix>/<node>/<topic>``; returns at once."""
        seq = next(self._seq)
        try:
            if not topic or any(c in topic for c in "+#\0"):
                raise ValueError(f"bad topic {topic!r}")
            document = {"schema": SCHEMA_VERSION, "node": self.settings.node,
                        "ts": _iso_utc(self._clock()), "seq": seq, **payload}
            body = json.dumps(document, default=_json_default, ensure_ascii=False,
                              separators=(",", ":")).encode()
        except Exception as exc:  # a bad event is a bug to log, never a failure of the call
            self.rejected += 1
            log.error("mqtt.event_rejected", topic=topic, error=str(exc))
            return
        if len(self._buffer) >= self.settings.buffer:
            self._drop_oldest()
        self._buffer.append(_Event(seq, f"{self._base}/{topic}", body))
        self._empty.clear()
        self._wakeup.set()

    def _drop_oldest(self) -> None:
        self._buffer.popleft()
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("mqtt.buffer_full", dropped=self.dropped, buffer=self.settings.buffer)

    async def flush(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the buffer to empty; True if it did."""
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    # --- the connection's side --------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._host, self._port,
            username=self._username, password=self._password,
            identifier=self.settings.client_id,
            tls_context=self._tls_context,
            keepalive=KEEPALIVE_SECONDS,
            timeout=OPERATION_TIMEOUT,
            max_inflight_messages=self._window,
            clean_session=True,
            # paho leaves Nagle on; with several small PUBLISH packets in flight it
            # holds each behind the previous one's TCP ACK.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # aiomqtt warns above 10 pending calls; a full window is our normal state.
        client.pending_calls_threshold = self._window
        return client

    async def run(self) -> None:
        """Connect, drain, reconnect with backoff; runs until cancelled."""
        low, high = self._reconnect
        delay = low
        while True:
            try:
                async with self._client() as client:
                    self.connected = True
                    delay = low
                    log.info("mqtt.connected", broker=f"{self._host}:{self._port}",
                             waiting=self.depth)
                    await self._drain(client)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.unavailable", broker=f"{self._host}:{self._port}",
                            error=str(exc), retry_in=round(delay, 2), waiting=self.depth)
            except Exception:
                # Events are best effort; a publisher bug must not stop the daemon.
                log.exception("mqtt.publisher_failed", retry_in=round(delay, 2))
            finally:
                self.connected = False
            # Jitter so that many agents restarted together do not reconnect in step.
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(high, delay * 2)

    async def _drain(self, client: aiomqtt.Client) -> None:
        # A sliding window: up to `window` publishes in flight, topped up as the
        # oldest is acknowledged. Sending while acks come back also matters for TCP:
        # Mosquitto leaves Nagle on by default, so its later PUBACKs wait for our
        # ACK of the first, which a stop-after-a-batch sender delays by ~40 ms.
        lost = asyncio.create_task(self._until_disconnected(client))
        try:
            while True:
                while self._buffer and len(self._flight) < self._window:
                    event = self._buffer.popleft()
                    # Tasks start in creation order, so paho queues the PUBLISH packets
                    # in buffer order; the broker forwards one client's QoS 1 in order.
                    task = asyncio.create_task(client.publish(event.topic, event.payload, qos=1))
                    self._flight.append((event, task))
                waits: set[asyncio.Future[Any]] = {lost}
                if self._flight:
                    waits.add(self._flight[0][1])
                waiter = None
                if len(self._flight) < self._window:
                    self._wakeup.clear()
                    waiter = asyncio.create_task(self._wakeup.wait())
                    waits.add(waiter)
                try:
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if waiter is not None:
                        waiter.cancel()
                if lost in done:
                    lost.result()
                    raise aiomqtt.MqttError("connection lost")
                self._retire()
        finally:
            lost.cancel()
            self._requeue()

    def _retire(self) -> None:
        """Drop acknowledged events from the head of the window, in order."""
        while self._flight and self._flight[0][1].done():
            _, task = self._flight[0]
            failure = task.exception()  # MqttError: no PUBACK in time, or not sent
            if failure is not None:
                raise failure
            self._flight.popleft()
            self.published += 1
        if not self._flight and not self._buffer:
            self._empty.set()

    def _requeue(self) -> None:
        """After the connection is gone: unacknowledged events go back to the front."""
        with contextlib.suppress(Exception):
            self._retire()  # acks that arrived just before the loss
        for event, task in reversed(self._flight):
            task.cancel()
            self._buffer.appendleft(event)
        self._flight.clear()
        while len(self._buffer) > self.settings.buffer:
            self._drop_oldest()

    @staticmethod
    async def _until_disconnected(client: aiomqtt.Client) -> None:
        # We subscribe to nothing, so the message iterator yields nothing and ends
        # with MqttError exactly when the connection drops: aiomqtt's public signal.
        async for _ in client.messages:
            pass
