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
- ``cutoff(reason, late_seconds, grace_seconds)``: a call cut off (``reason`` e.g.
  ``balance``, ``window_end``) and how late the hang-up went out after its
  planned moment -> ``callgate_cutoffs_total{reason}``,
  ``callgate_cutoff_lateness_seconds``, and ``callgate_late_cutoffs_total`` when
  later than the grace (the PBX-side deadline then ended the call, or talk went
  unbilled).
- ``policy_reload(ok, at)``: -> ``callgate_policy_reloads_total{outcome="ok"|"error"}``,
  ``callgate_policy_last_reload_ok`` (1/0) and
  ``callgate_policy_last_reload_timestamp_seconds{outcome}``.
- ``cdr_correction()`` and ``reconcile_mismatch(kind)``: the PBX CDR
  reconciliation's ``callgate_cdr_corrections_total`` and
  ``callgate_reconcile_mismatches_total{kind}`` (``kind``: ``missing_in_ledger``,
  ``charged_differently``, ``conflict``, ``refused``, ``not_settled``,
  ``unreadable``; see agent/cdr/source.py).
- ``watch_accounts(accounts)``: per-account series, labelled only with account
  ids the policy names (bounded): ``callgate_account_live_calls``,
  ``callgate_account_available_balance``, ``callgate_account_low_balance_line``
  and ``callgate_account_refusals_total{account,reason}`` (only
  ``insufficient_balance`` and ``account_closed``: the refusals that mean "top
  this account up").
- ``build_info``: ``callgate_build_info{version}`` 1; ``started``:
  ``callgate_start_time_seconds``.
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
- ``watch_pbx_link(health)``: the PBX control link (ESL / AMI,
  :class:`agent.pbx.liveness.LinkHealth`) read at scrape time:
  ``callgate_pbx_slow`` (1 while the PBX answers late but the link is alive),
  ``callgate_pbx_command_timeouts_total``, ``callgate_pbx_late_replies_total``
  and ``callgate_pbx_reconnects_total`` (links dropped as dead and reopened).
- ``watch_gate_listener(listener)``: the gate socket's shedding
  (agent/pbx/_listener.py), read at scrape time through a callable, since the
  adapter binds its listener only once it runs:
  ``callgate_gate_shed_total{why="pending"|"late"}`` (connections reset unread:
  past the in-flight bound, or late in the accept queue) and
  ``callgate_gate_pending`` (connections in flight).
- ``watch_publisher(publisher)``: export an
  :class:`~agent.events.mqtt.EventPublisher`'s ``depth``, ``dropped``,
  ``published`` and ``connected``, read at scrape time.

:func:`serve_metrics` serves ``GET /metrics`` (text exposition format),
``GET /healthz`` (200 ``ok`` when the readiness callable says ready, else 503
with its reason) and, when given a ``status`` coroutine, ``GET /status`` (the
daemon's status document as JSON, see :mod:`agent.status`; what ``callgate
status`` reads) on an asyncio server, no threads. Each request is bounded: at
most :data:`MAX_REQUEST_BYTES` of request head, :data:`REQUEST_TIMEOUT` seconds
for the whole exchange, :data:`MAX_CONNECTIONS` at once; one request per
connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

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

from agent import __version__

log = structlog.get_logger("callgate.metrics")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 32

# Gate decisions answer a dialplan that is waiting: sub-millisecond to the budget (500 ms).
_GATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Cut-offs are planned to the second; the grace is 0-30 s (meter.grace_seconds).
_LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
#: cut-off reasons kept as label values (the meter's closed set); others count as "other".
CUTOFF_REASONS = frozenset({
    "balance", "first_hold_failed", "window_end", "account_removed", "account_suspended",
    "unseen", "unknown"})
#: refusals counted per account: the ones that mean "this account needs money".
ACCOUNT_REFUSALS = ("insufficient_balance", "account_closed")
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


class LinkHealthLike(Protocol):
    """What :meth:`Metrics.watch_pbx_link` reads (agent.pbx.liveness.LinkHealth)."""

    @property
    def state(self) -> str: ...
    @property
    def command_timeouts(self) -> int: ...
    @property
    def late_replies(self) -> int: ...
    @property
    def reconnects(self) -> int: ...


class _PbxLinkCollector(Collector):
    """The adapter's own link counters, read at scrape time."""

    def __init__(self, health: LinkHealthLike) -> None:
        self._health = health

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        h = self._health
        yield GaugeMetricFamily("callgate_pbx_slow",
                                "1 while the PBX answers commands late but its link is alive",
                                value=int(h.state == "slow"))
        yield CounterMetricFamily("callgate_pbx_command_timeouts",
                                  "PBX commands with no reply in time (the link was kept)",
                                  value=h.command_timeouts)
        yield CounterMetricFamily("callgate_pbx_late_replies",
                                  "PBX replies that came after their command had timed out",
                                  value=h.late_replies)
        yield CounterMetricFamily("callgate_pbx_reconnects",
                                  "PBX links dropped as dead (silent, closed) and reopened",
                                  value=h.reconnects)


class GateListenerLike(Protocol):
    """What :meth:`Metrics.watch_gate_listener` reads (agent.pbx._listener.GateListener)."""

    @property
    def shed(self) -> int: ...
    @property
    def shed_late(self) -> int: ...
    @property
    def pending(self) -> int: ...


class _GateListenerCollector(Collector):
    """The gate socket's shed connections, read at scrape time (none before it binds)."""

    def __init__(self, listener: Callable[[], GateListenerLike | None]) -> None:
        self._listener = listener

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        gate = self._listener()
        shed = CounterMetricFamily(
            "callgate_gate_shed",
            "Gate connections reset unread under overload (the dialplan refuses the call): "
            "past the in-flight bound (pending) or late in the accept queue (late)",
            labels=["why"])
        late = gate.shed_late if gate is not None else 0
        pending = (gate.shed - late) if gate is not None else 0
        shed.add_metric(["pending"], pending)
        shed.add_metric(["late"], late)
        yield shed
        yield GaugeMetricFamily("callgate_gate_pending",
                                "Gate connections accepted and not yet answered",
                                value=gate.pending if gate is not None else 0)


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


class _AccountLiveCollector(Collector):
    """Live calls per policy account, counted at scrape time (accounts with none show 0)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("callgate_account_live_calls",
                                   "Answered calls being metered, per account", labels=["account"])
        m = self._metrics
        try:
            live = m._live_by_account()
        except Exception:  # a scrape never fails for a view that is not ready
            live = {}
        for account in sorted(m._accounts):
            family.add_metric([account], live.get(account, 0))
        yield family


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
        self._ledger_children: dict[str, Any] = {}
        self._decision_children: dict[tuple[str, str], Any] = {}
        self.ledger_latency = Histogram("callgate_ledger_operation_seconds",
                                        "Ledger operation latency by operation", ["op"],
                                        buckets=_LEDGER_BUCKETS, registry=r)
        self.pbx_connected = Gauge("callgate_pbx_connected", "1 while the PBX connection is up",
                                   registry=r)
        self.asyncio_tasks = Gauge("callgate_asyncio_tasks",
                                   "asyncio tasks alive in the daemon's event loop", registry=r)
        self.cutoffs = Counter("callgate_cutoffs", "Calls cut off by the meter, by reason",
                               ["reason"], registry=r)
        for reason in sorted(CUTOFF_REASONS | {"other"}):
            self.cutoffs.labels(reason)  # every reason's series exists from the start at 0
        self.decisions.labels("DENY", "ledger_unavailable")  # alertable from 0
        self.decisions.labels("DENY", "overloaded")
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
        self.policy_last_reload_ok = Gauge(
            "callgate_policy_last_reload_ok",
            "1 if the last policy load or reload was taken, 0 if it was refused", registry=r)
        self.policy_last_reload_ok.set(1)
        self.policy_last_reload_time = Gauge(
            "callgate_policy_last_reload_timestamp_seconds",
            "When the policy was last loaded (outcome ok) or a reload refused (error)",
            ["outcome"], registry=r)
        self.build_info = Gauge("callgate_build_info", "The running callgate's version (always 1)",
                                ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.started = Gauge("callgate_start_time_seconds",
                             "When the daemon started, seconds since the epoch", registry=r)
        self.cutoff_lateness = Histogram(
            "callgate_cutoff_lateness_seconds",
            "How late a cut-off's hang-up went out after its planned moment",
            buckets=_LATENESS_BUCKETS, registry=r)
        self.late_cutoffs = Counter("callgate_late_cutoffs",
                                    "Cut-offs later than the meter's grace", registry=r)
        self.cdr_corrections = Counter(
            "callgate_cdr_corrections", "Calls corrected in the ledger from the PBX's CDR",
            registry=r)
        self.reconcile_mismatches = Counter(
            "callgate_reconcile_mismatches",
            "Differences found between the PBX's CDRs and the ledger, by kind", ["kind"],
            registry=r)
        self.account_balance = Gauge(
            "callgate_account_available_balance",
            "Available balance per account (policy accounts), ledger currency, for dashboards",
            ["account"], registry=r)
        self.account_low_line = Gauge(
            "callgate_account_low_balance_line",
            "The policy's low_balance_warning per account (0: none)", ["account"], registry=r)
        self.account_refusals = Counter(
            "callgate_account_refusals",
            "Calls refused for want of balance, per account (policy accounts)",
            ["account", "reason"], registry=r)
        self.balances_refreshed = Gauge(
            "callgate_account_balances_refreshed_timestamp_seconds",
            "When the per-account balances were last read from the ledger", registry=r)
        self._accounts: frozenset[str] = frozenset()
        self._live_by_account: Callable[[], Mapping[str, int]] = dict
        r.register(_AccountLiveCollector(self))
        self._publisher: _PublisherCollector | None = None
        self._pbx_link: _PbxLinkCollector | None = None
        self._gate_listener: _GateListenerCollector | None = None

    def decision(self, result: str, reason: str, seconds: float) -> None:
        key = (result, str(reason))
        child = self._decision_children.get(key)
        if child is None:  # a few dozen pairs at most: the reason codes are a closed set
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()
        self.gate_latency.observe(seconds)

    def ledger_timer(self, op: str) -> contextlib.AbstractContextManager[object]:
        # The labelled child per operation, looked up once (labels() takes a lock
        # and builds a key on every call; a call placed makes several ledger calls).
        child = self._ledger_children.get(op)
        if child is None:
            child = self._ledger_children[op] = self.ledger_latency.labels(op)
        return child.time()

    def risk(self, reading: RiskReadingLike, short_alert: bool, answer_alert: bool) -> None:
        account = reading.account
        self.risk_calls.labels(account).set(reading.calls)
        if reading.short_percent is not None:
            self.risk_short.labels(account).set(float(reading.short_percent))
        if reading.answer_percent is not None:
            self.risk_answer.labels(account).set(float(reading.answer_percent))
        self.risk_alert.labels(account, "short_calls").set(int(short_alert))
        self.risk_alert.labels(account, "answer_rate").set(int(answer_alert))

    def cutoff(self, reason: str = "unknown", late_seconds: float | None = None,
               grace_seconds: float | None = None) -> None:
        self.cutoffs.labels(reason if reason in CUTOFF_REASONS else "other").inc()
        if late_seconds is not None:
            self.cutoff_lateness.observe(max(0.0, late_seconds))
            if grace_seconds is not None and late_seconds > grace_seconds:
                self.late_cutoffs.inc()

    def policy_reload(self, ok: bool, at: float | None = None) -> None:
        outcome = "ok" if ok else "error"
        self.policy_reloads.labels(outcome).inc()
        self.policy_loaded(ok, at)

    def policy_loaded(self, ok: bool, at: float | None = None) -> None:
        """The outcome of the last load (the first load counts, the reload counter does not)."""
        self.policy_last_reload_ok.set(1 if ok else 0)
        self.policy_last_reload_time.labels("ok" if ok else "error").set(
            time.time() if at is None else at)

    def cdr_correction(self) -> None:
        self.cdr_corrections.inc()

    def reconcile_mismatch(self, kind: str) -> None:
        self.reconcile_mismatches.labels(kind).inc()

    def watch_accounts(self, accounts: Mapping[str, Decimal],
                       live_by_account: Callable[[], Mapping[str, int]] | None = None) -> None:
        """The policy's accounts (id -> low-balance line); series of others are removed."""
        old = self._accounts
        self._accounts = frozenset(accounts)
        for gone in old - self._accounts:
            for gauge in (self.account_balance, self.account_low_line):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
            for reason in ACCOUNT_REFUSALS:
                with contextlib.suppress(KeyError):
                    self.account_refusals.remove(gone, reason)
        for account, line in accounts.items():
            self.account_low_line.labels(account).set(float(line))
            for reason in ACCOUNT_REFUSALS:
                self.account_refusals.labels(account, reason)  # alertable from 0
        if live_by_account is not None:
            self._live_by_account = live_by_account

    def account_refused(self, account: str | None, reason: str) -> None:
        if account in self._accounts and reason in ACCOUNT_REFUSALS:
            self.account_refusals.labels(account, reason).inc()

    def account_balances(self, available: Mapping[str, Decimal], at: float | None = None) -> None:
        """Set the balance gauges from one ledger read (accounts outside the policy ignored)."""
        for account in self._accounts:
            if account in available:
                self.account_balance.labels(account).set(float(available[account]))
        self.balances_refreshed.set(time.time() if at is None else at)

    def watch_pbx_link(self, health: LinkHealthLike) -> None:
        if self._pbx_link is not None:
            self.registry.unregister(self._pbx_link)
        self._pbx_link = _PbxLinkCollector(health)
        self.registry.register(self._pbx_link)

    def watch_gate_listener(self, listener: Callable[[], GateListenerLike | None]) -> None:
        if self._gate_listener is not None:
            self.registry.unregister(self._gate_listener)
        self._gate_listener = _GateListenerCollector(listener)
        self.registry.register(self._gate_listener)

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
    return _response(404, b"not found; try /metrics, /healthz or /status\n",
                     head_only=head_only)


async def serve_metrics(
    metrics: Metrics,
    host: str = "127.0.0.1",
    port: int = 9108,
    ready: Callable[[], tuple[bool, str]] = _always_ready,
    *,
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
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
                    response = (await _status_response(status, head) if status is not None
                                and _path_of(head) == "/status" else answer(metrics, ready, head))
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


def _path_of(head: bytes) -> str:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    return parts[1].split("?", 1)[0] if len(parts) == 3 else ""


async def _status_response(status: Callable[[], Awaitable[dict[str, Any]]],
                           head: bytes) -> bytes:
    """``GET /status``: the daemon's status document as one JSON object."""
    method = head.split(b" ", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"only GET\n")
    try:
        doc = await status()
        body = json.dumps(doc, default=_json_default, ensure_ascii=False).encode() + b"\n"
    except Exception as exc:  # the status page never takes the listener down
        log.warning("metrics.status_failed", error=str(exc))
        return _response(503, f"status failed: {exc}\n".encode())
    return _response(200, body, "application/json", head_only=method == b"HEAD")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Decimal):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _bound(server: asyncio.Server) -> str:
    return ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)


def bound_port(server: asyncio.Server) -> int:
    """The port the server listens on (useful after binding port 0)."""
    port: int = server.sockets[0].getsockname()[1]
    return port
