"""Prometheus metrics and the loopback HTTP endpoint serving them with a readiness answer.

The metrics live on their own :class:`~prometheus_client.CollectorRegistry`
(not the process-global one), so tests and several daemons in one process never
share counters. What the daemon calls on :class:`Metrics`:

- ``decision(result, reason, seconds)``: one gate decision (``result``
  ``ALLOW``/``DENY``, ``reason`` a :class:`~agent.gate.decision.Reason` code)
  and how long deciding took -> ``callgate_decisions_total{result,reason}``,
  ``callgate_gate_latency_seconds``.
- ``ledger_timer(op)``: a context manager timing one ledger operation (``op``
  e.g. ``reserve``, ``settle``, ``account_state``) ->
  ``callgate_ledger_operation_seconds{op}``.
- ``cutoff()``: a call cut off at its paid boundary -> ``callgate_cutoffs_total``.
- ``policy_reload(ok)``: -> ``callgate_policy_reloads_total{outcome="ok"|"error"}``.
- ``live_calls``, ``open_holds``, ``open_holds_amount``, ``pbx_connected``,
  ``asyncio_tasks`` (tasks alive in the daemon's event loop: a leak shows as
  growth, bench/soak.py and tests/test_hostile.py watch it): gauges; set them
  (``.set(n)``) or hand them a callable read at scrape time
  (``.set_function(lambda: len(meter.calls))``). The holds amount is in the
  ledger currency as a float: for dashboards, never for accounting.
- ``live_dnc_entries``, ``live_dnc_age_seconds`` (seconds since the in-memory
  copy of the ledger's do-not-call entries was last known complete; it grows
  while the ledger is unreachable): gauges read at scrape time.
- ``risk(reading, short_alert, answer_alert)``: one account's early-warning
  shares over its window -> ``callgate_risk_calls{account}``,
  ``callgate_risk_short_call_percent{account}``,
  ``callgate_risk_answer_percent{account}``, ``callgate_risk_alert{account,kind}``
  (1 while raised).
- ``watch_publisher(publisher)``: export an
  :class:`~agent.events.mqtt.EventPublisher`'s ``depth``, ``dropped``,
  ``published`` and ``connected``, read at scrape time.

:func:`serve_metrics` serves ``GET /metrics`` (text exposition format) and
``GET /healthz`` (200 ``ok`` when the readiness callable says ready, else 503
with its reason) on an asyncio server, no threads. Each request is bounded: at
most :data:`MAX_REQUEST_BYTES` of request head, :data:`REQUEST_TIMEOUT` seconds
for the whole exchange, :data:`MAX_CONNECTIONS` at once; one request per
connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Protocol

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger("callgate.metrics")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 32

# Gate decisions answer a dialplan that is waiting: sub-millisecond to the budget (500 ms).
_GATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PublisherStats(Protocol):
    """What :meth:`Metrics.watch_publisher` reads (an EventPublisher has all four)."""

    @property
    def depth(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def published(self) -> int: ...
    @property
    def connected(self) -> bool: ...


class RiskReadingLike(Protocol):
    """What :meth:`Metrics.risk` reads (agent.compliance.risk.RiskReading)."""

    @property
    def account(self) -> str: ...
    @property
    def calls(self) -> int: ...
    @property
    def short_percent(self) -> Decimal | None: ...
    @property
    def answer_percent(self) -> Decimal | None: ...


class _PublisherCollector(Collector):
    """Reads the publisher's own counters at scrape time (it owns them; we only export)."""

    def __init__(self, publisher: PublisherStats) -> None:
        self._publisher = publisher

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        p = self._publisher
        yield GaugeMetricFamily("callgate_mqtt_buffer_depth",
                                "Events waiting to be published to MQTT", value=p.depth)
        yield CounterMetricFamily("callgate_mqtt_dropped",
                                  "Events dropped (oldest first) while the MQTT buffer was full",
                                  value=p.dropped)
        yield CounterMetricFamily("callgate_mqtt_published",
                                  "Events acknowledged by the MQTT broker (QoS 1)",
                                  value=p.published)
        yield GaugeMetricFamily("callgate_mqtt_connected",
                                "1 while connected to the MQTT broker", value=int(p.connected))


class Metrics:
    """The daemon's metrics on a private registry; see the module docstring for the calls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter("callgate_decisions", "Gate decisions by result and reason",
                                 ["result", "reason"], registry=r)
        self.gate_latency = Histogram("callgate_gate_latency_seconds",
                                      "Time to decide one call at setup",
                                      buckets=_GATE_BUCKETS, registry=r)
        self.live_calls = Gauge("callgate_live_calls", "Answered calls being metered", registry=r)
        self.open_holds = Gauge("callgate_open_holds", "Open holds (reservations) in the ledger",
                                registry=r)
        self.open_holds_amount = Gauge("callgate_open_holds_amount",
                                       "Sum of open holds, in the ledger currency", registry=r)
        self.ledger_latency = Histogram("callgate_ledger_operation_seconds",
                                        "Ledger operation latency by operation", ["op"],
                                        buckets=_LEDGER_BUCKETS, registry=r)
        self.pbx_connected = Gauge("callgate_pbx_connected", "1 while the PBX connection is up",
                                   registry=r)
        self.asyncio_tasks = Gauge("callgate_asyncio_tasks",
                                   "asyncio tasks alive in the daemon's event loop", registry=r)
        self.cutoffs = Counter("callgate_cutoffs", "Calls cut off at their paid boundary",
                               registry=r)
        self.policy_reloads = Counter("callgate_policy_reloads", "Policy reloads by outcome",
                                      ["outcome"], registry=r)
        for outcome in ("ok", "error"):
            self.policy_reloads.labels(outcome)  # both series exist from the start at 0
        self.live_dnc_entries = Gauge("callgate_live_dnc_entries",
                                      "Live do-not-call entries in the gate's in-memory copy",
                                      registry=r)
        self.live_dnc_age = Gauge("callgate_live_dnc_age_seconds",
                                  "Seconds since the live do-not-call copy was last synced",
                                  registry=r)
        self.risk_calls = Gauge("callgate_risk_calls", "Calls ended in the risk window",
                                ["account"], registry=r)
        self.risk_short = Gauge("callgate_risk_short_call_percent",
                                "Answered calls shorter than the policy's threshold, percent",
                                ["account"], registry=r)
        self.risk_answer = Gauge("callgate_risk_answer_percent",
                                 "Answered of all calls ended in the risk window, percent",
                                 ["account"], registry=r)
        self.risk_alert = Gauge("callgate_risk_alert", "1 while a risk alert is raised",
                                ["account", "kind"], registry=r)
        self._publisher: _PublisherCollector | None = None

    def decision(self, result: str, reason: str, seconds: float) -> None:
        self.decisions.labels(result, str(reason)).inc()
        self.gate_latency.observe(seconds)

    def ledger_timer(self, op: str) -> contextlib.AbstractContextManager[object]:
        return self.ledger_latency.labels(op).time()

    def risk(self, reading: RiskReadingLike, short_alert: bool, answer_alert: bool) -> None:
        account = reading.account
        self.risk_calls.labels(account).set(reading.calls)
        if reading.short_percent is not None:
            self.risk_short.labels(account).set(float(reading.short_percent))
        if reading.answer_percent is not None:
            self.risk_answer.labels(account).set(float(reading.answer_percent))
        self.risk_alert.labels(account, "short_calls").set(int(short_alert))
        self.risk_alert.labels(account, "answer_rate").set(int(answer_alert))

    def cutoff(self) -> None:
        self.cutoffs.inc()

    def policy_reload(self, ok: bool) -> None:
        self.policy_reloads.labels("ok" if ok else "error").inc()

    def watch_publisher(self, publisher: PublisherStats) -> None:
        if self._publisher is not None:
            self.registry.unregister(self._publisher)
        self._publisher = _PublisherCollector(publisher)
        self.registry.register(self._publisher)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- the HTTP endpoint ----------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              *, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head if head_only else head + body


def _always_ready() -> tuple[bool, str]:
    return True, "ok"


def answer(metrics: Metrics, ready: Callable[[], tuple[bool, str]], request_head: bytes) -> bytes:
    """The full HTTP response for one request head (pure apart from reading state)."""
    request_line = request_head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _response(400, b"bad request\n")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return _response(405, b"only GET\n")
    head_only = method == "HEAD"
    path = target.split("?", 1)[0]
    if path == "/metrics":
        return _response(200, metrics.exposition(), CONTENT_TYPE_LATEST, head_only=head_only)
    if path == "/healthz":
        try:
            is_ready, why = ready()
        except Exception as exc:  # a broken check means "not ready", never a dead endpoint
            is_ready, why = False, f"readiness check failed: {exc}"
        if is_ready:
            return _response(200, b"ok\n", head_only=head_only)
        return _response(503, f"not ready: {why}\n".encode(), head_only=head_only)
    return _response(404, b"not found; try /metrics or /healthz\n", head_only=head_only)


async def serve_metrics(
    metrics: Metrics,
    host: str = "127.0.0.1",
    port: int = 9108,
    ready: Callable[[], tuple[bool, str]] = _always_ready,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> asyncio.Server:
    """Start serving; the caller reads the bound port from the server and closes it."""
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        active += 1
        stuck = False
        try:
            if active > max_connections:
                return  # shed load: close at once rather than queue scrapers
            async with asyncio.timeout(request_timeout):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    response = _response(431, b"request head too large\n")
                except asyncio.IncompleteReadError:
                    return  # the client went away mid-request
                else:
                    response = answer(metrics, ready, head)
                writer.write(response)
                await writer.drain()
        except TimeoutError:
            stuck = True
        except ConnectionError:
            pass
        finally:
            active -= 1
            if stuck:
                writer.transport.abort()  # a client that neither sends nor reads: no flush
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES)
    log.info("metrics.listening", address=_bound(server))
    return server


def _bound(server: asyncio.Server) -> str:
    return ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)


def bound_port(server: asyncio.Server) -> int:
    """The port the server listens on (useful after binding port 0)."""
    port: int = server.sockets[0].getsockname()[1]
    return port
