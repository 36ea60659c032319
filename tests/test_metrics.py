"""Metrics and the /metrics + /healthz endpoint, over a real loopback socket (port 0)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal as D

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.gate.decision import Reason
from agent.metrics import MAX_REQUEST_BYTES, Metrics, bound_port, serve_metrics


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()  # the server closes after one response
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await _request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@dataclass
class _Readiness:
    ok: bool = True
    why: str = "ok"

    def __call__(self) -> tuple[bool, str]:
        return self.ok, self.why


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, _Readiness, int]]:
    metrics = Metrics()
    readiness = _Readiness()
    server = await serve_metrics(metrics, "127.0.0.1", 0, readiness)
    try:
        yield metrics, readiness, bound_port(server)
    finally:
        server.close()
        await server.wait_closed()


async def test_metrics_exposition_carries_what_the_daemon_recorded(
    served: tuple[Metrics, _Readiness, int],
) -> None:
    metrics, _, port = served
    metrics.decision("ALLOW", Reason.ALLOWED, 0.002)
    metrics.decision("DENY", Reason.INSUFFICIENT_BALANCE, 0.0004)
    metrics.decision("DENY", Reason.INSUFFICIENT_BALANCE, 0.03)
    with metrics.ledger_timer("reserve"):
        pass
    metrics.live_calls.set(3)
    metrics.open_holds.set(2)
    metrics.open_holds_amount.set(0.26)
    metrics.pbx_connected.set(1)
    metrics.cutoff("balance", 0.4, 2)
    metrics.cutoff("window_end", 2.5, 2)
    metrics.cutoff("no-such-reason")
    metrics.policy_reload(ok=True)
    metrics.policy_reload(ok=False)
    metrics.policy_reload(ok=False)

    status, headers, body = await _get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    s = _samples(body)
    assert s[("callgate_decisions_total", (("reason", "allowed"), ("result", "ALLOW")))] == 1
    deny = (("reason", "insufficient_balance"), ("result", "DENY"))
    assert s[("callgate_decisions_total", deny)] == 2
    assert s[("callgate_gate_latency_seconds_count", ())] == 3
    assert s[("callgate_gate_latency_seconds_bucket", (("le", "0.0005"),))] == 1
    assert s[("callgate_gate_latency_seconds_bucket", (("le", "0.0025"),))] == 2
    assert s[("callgate_ledger_operation_seconds_count", (("op", "reserve"),))] == 1
    assert s[("callgate_live_calls", ())] == 3
    assert s[("callgate_open_holds", ())] == 2
    assert s[("callgate_open_holds_amount", ())] == 0.26
    assert s[("callgate_pbx_connected", ())] == 1
    assert s[("callgate_cutoffs_total", (("reason", "balance"),))] == 1
    assert s[("callgate_cutoffs_total", (("reason", "window_end"),))] == 1
    assert s[("callgate_cutoffs_total", (("reason", "other"),))] == 1  # bounded label values
    assert s[("callgate_cutoffs_total", (("reason", "unseen"),))] == 0
    assert s[("callgate_cutoff_lateness_seconds_count", ())] == 2
    assert s[("callgate_cutoff_lateness_seconds_bucket", (("le", "0.5"),))] == 1
    assert s[("callgate_late_cutoffs_total", ())] == 1  # 2.5 s late, grace 2 s
    assert s[("callgate_policy_reloads_total", (("outcome", "ok"),))] == 1
    assert s[("callgate_policy_reloads_total", (("outcome", "error"),))] == 2
    assert s[("callgate_policy_last_reload_ok", ())] == 0  # the last one was refused
    assert s[("callgate_build_info", (("version", __version__),))] == 1
    deny_ledger = (("reason", "ledger_unavailable"), ("result", "DENY"))
    assert s[("callgate_decisions_total", deny_ledger)] == 0  # exists before the first one


async def test_gauges_read_a_callable_at_scrape_time(
    served: tuple[Metrics, _Readiness, int],
) -> None:
    metrics, _, port = served
    calls = ["a", "b"]
    metrics.live_calls.set_function(lambda: len(calls))
    assert _samples((await _get(port, "/metrics"))[2])[("callgate_live_calls", ())] == 2
    calls.append("c")
    assert _samples((await _get(port, "/metrics"))[2])[("callgate_live_calls", ())] == 3


@dataclass
class _FakePublisher:
    depth: int = 0
    dropped: int = 0
    published: int = 0
    connected: bool = False


async def test_mqtt_publisher_counters_are_exported(
    served: tuple[Metrics, _Readiness, int],
) -> None:
    metrics, _, port = served
    publisher = _FakePublisher(depth=7, dropped=3, published=40, connected=True)
    metrics.watch_publisher(publisher)
    s = _samples((await _get(port, "/metrics"))[2])
    assert s[("callgate_mqtt_buffer_depth", ())] == 7
    assert s[("callgate_mqtt_dropped_total", ())] == 3
    assert s[("callgate_mqtt_published_total", ())] == 40
    assert s[("callgate_mqtt_connected", ())] == 1
    publisher.depth, publisher.connected = 0, False
    metrics.watch_publisher(publisher)  # watching again replaces, never duplicates
    s = _samples((await _get(port, "/metrics"))[2])
    assert s[("callgate_mqtt_buffer_depth", ())] == 0
    assert s[("callgate_mqtt_connected", ())] == 0


async def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.cutoff("balance")
    balance = ("callgate_cutoffs_total", (("reason", "balance"),))
    assert _samples(a.exposition())[balance] == 1
    assert _samples(b.exposition())[balance] == 0


def test_per_account_series_carry_only_the_policys_accounts() -> None:
    m = Metrics()
    live = {"acme": 2, "stranger": 5}
    m.watch_accounts({"acme": D("50"), "beta": D("0")}, lambda: live)
    m.account_balances({"acme": D("12.3400"), "beta": D("-1"), "stranger": D("99")}, at=100)
    m.account_refused("acme", "insufficient_balance")
    m.account_refused("stranger", "insufficient_balance")  # not in the policy: not a label
    m.account_refused("acme", "do_not_call")  # not a balance refusal: decisions_total has it
    m.account_refused(None, "insufficient_balance")
    s = _samples(m.exposition())
    accounts = {labels for (name, labels) in s if name.startswith("callgate_account_")}
    assert accounts == {(), (("account", "acme"),), (("account", "beta"),),
                        (("account", "acme"), ("reason", "insufficient_balance")),
                        (("account", "acme"), ("reason", "account_closed")),
                        (("account", "beta"), ("reason", "insufficient_balance")),
                        (("account", "beta"), ("reason", "account_closed"))}
    assert s[("callgate_account_live_calls", (("account", "acme"),))] == 2
    assert s[("callgate_account_live_calls", (("account", "beta"),))] == 0
    assert s[("callgate_account_available_balance", (("account", "acme"),))] == 12.34
    assert s[("callgate_account_available_balance", (("account", "beta"),))] == -1
    assert s[("callgate_account_low_balance_line", (("account", "acme"),))] == 50
    refusals = ("callgate_account_refusals_total",
                (("account", "acme"), ("reason", "insufficient_balance")))
    assert s[refusals] == 1
    assert s[("callgate_account_balances_refreshed_timestamp_seconds", ())] == 100
    # A reload that drops an account drops its series (no stale label values).
    m.watch_accounts({"acme": D("50")})
    s = _samples(m.exposition())
    assert not [k for k in s if ("account", "beta") in k[1]]


def test_reconciliation_counters_have_the_agreed_names() -> None:
    m = Metrics()
    m.cdr_correction()
    m.reconcile_mismatch("billsec")
    m.reconcile_mismatch("billsec")
    s = _samples(m.exposition())
    assert s[("callgate_cdr_corrections_total", ())] == 1
    assert s[("callgate_reconcile_mismatches_total", (("kind", "billsec"),))] == 2


async def test_status_is_served_as_json_when_the_daemon_gives_it() -> None:
    import json
    from datetime import UTC, datetime

    calls = 0

    async def status() -> dict[str, object]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("the board broke")
        return {"state": "healthy", "at": datetime(2026, 11, 1, tzinfo=UTC), "amount": D("1.5")}

    server = await serve_metrics(Metrics(), "127.0.0.1", 0, status=status)
    try:
        port = bound_port(server)
        code, headers, body = await _get(port, "/status")
        assert code == 200 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"state": "healthy", "at": "2026-11-01T00:00:00+00:00",
                                    "amount": "1.5"}
        assert (await _get(port, "/status"))[0] == 503  # a failing status never kills it
        assert (await _get(port, "/metrics"))[0] == 200
    finally:
        server.close()
        await server.wait_closed()
    plain = await serve_metrics(Metrics(), "127.0.0.1", 0)  # no status given: 404
    try:
        assert (await _get(bound_port(plain), "/status"))[0] == 404
    finally:
        plain.close()
        await plain.wait_closed()


async def test_healthz_follows_the_readiness_callable(
    served: tuple[Metrics, _Readiness, int],
) -> None:
    _, readiness, port = served
    assert (await _get(port, "/healthz"))[0::2] == (200, b"ok\n")
    readiness.ok, readiness.why = False, "PBX not connected"
    assert (await _get(port, "/healthz"))[0::2] == (503, b"not ready: PBX not connected\n")
    readiness.ok = True
    assert (await _get(port, "/healthz?verbose=1"))[0] == 200


async def test_a_raising_readiness_check_is_a_503_not_a_dead_endpoint() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("ledger closed")

    server = await serve_metrics(Metrics(), "127.0.0.1", 0, broken)
    try:
        status, _, body = await _get(bound_port(server), "/healthz")
    finally:
        server.close()
        await server.wait_closed()
    assert (status, body) == (503, b"not ready: readiness check failed: ledger closed\n")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
    ],
)
async def test_bad_requests_get_clear_statuses(
    served: tuple[Metrics, _Readiness, int], raw: bytes, status: int
) -> None:
    assert (await _request(served[2], raw))[0] == status


async def test_head_request_has_headers_only(served: tuple[Metrics, _Readiness, int]) -> None:
    status, headers, body = await _request(served[2], b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


async def test_oversized_request_head_is_refused(served: tuple[Metrics, _Readiness, int]) -> None:
    raw = b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * (MAX_REQUEST_BYTES * 2) + b"\r\n\r\n"
    assert (await _request(served[2], raw))[0] == 431


async def _server_with(
    timeout: float, max_connections: int = 32
) -> tuple[asyncio.Server, int]:
    server = await serve_metrics(Metrics(), "127.0.0.1", 0, request_timeout=timeout,
                                 max_connections=max_connections)
    return server, bound_port(server)


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.read()


async def test_a_silent_client_is_disconnected_and_others_still_served() -> None:
    server, port = await _server_with(timeout=0.2)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metr")  # never finishes its request
        # Meanwhile a well-behaved scraper is answered.
        assert (await _get(port, "/healthz"))[0] == 200
        assert await _closed_by_server(reader) == b""
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    server, port = await _server_with(timeout=2.0, max_connections=1)
    try:
        held_reader, held_writer = await asyncio.open_connection("127.0.0.1", port)
        held_writer.write(b"GET ")
        await held_writer.drain()
        await asyncio.sleep(0.05)  # let the server start handling the first one
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        shed_answer = b""
        # Shed, no answer: a clean close, or a reset since the request went unread.
        with contextlib.suppress(ConnectionResetError):
            shed_answer = await _closed_by_server(reader)
        assert shed_answer == b""
        writer.close()
        held_writer.write(b"/healthz HTTP/1.1\r\n\r\n")
        assert (await _closed_by_server(held_reader)).startswith(b"HTTP/1.1 200 OK\r\n")
        held_writer.close()
        # The slot is free again.
        assert (await _get(port, "/healthz"))[0] == 200
    finally:
        server.close()
        await server.wait_closed()


def test_default_bind_is_loopback() -> None:
    import inspect

    parameters = inspect.signature(serve_metrics).parameters
    assert parameters["host"].default == "127.0.0.1"
    ready: Callable[[], tuple[bool, str]] = parameters["ready"].default
    assert ready() == (True, "ok")


async def test_pbx_link_health_is_exported(served: tuple[Metrics, _Readiness, int]) -> None:
    from agent.pbx.liveness import LinkHealth

    metrics, _, port = served
    health = LinkHealth(state="slow", command_timeouts=4, reconnects=1, late_replies=3)
    metrics.watch_pbx_link(health)
    s = _samples((await _get(port, "/metrics"))[2])
    assert s[("callgate_pbx_slow", ())] == 1
    assert s[("callgate_pbx_command_timeouts_total", ())] == 4
    assert s[("callgate_pbx_late_replies_total", ())] == 3
    assert s[("callgate_pbx_reconnects_total", ())] == 1
    health.state = "up"
    metrics.watch_pbx_link(health)  # watching again replaces, never duplicates
    assert _samples((await _get(port, "/metrics"))[2])[("callgate_pbx_slow", ())] == 0


async def test_gate_sheds_are_exported(served: tuple[Metrics, _Readiness, int]) -> None:
    from agent.pbx._listener import GateListener

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    metrics, _, port = served
    listener: GateListener | None = None
    metrics.watch_gate_listener(lambda: listener)
    s = _samples((await _get(port, "/metrics"))[2])  # before the adapter binds: zeros
    assert s[("callgate_gate_shed_total", (("why", "pending"),))] == 0
    assert s[("callgate_gate_shed_total", (("why", "late"),))] == 0
    assert s[("callgate_gate_pending", ())] == 0
    listener = GateListener(handler, limit=1024, max_pending=1024, budget=0.5)
    listener._shed("pending")
    listener._shed("pending")
    listener._shed("late", 0.3)
    s = _samples((await _get(port, "/metrics"))[2])
    assert s[("callgate_gate_shed_total", (("why", "pending"),))] == 2
    assert s[("callgate_gate_shed_total", (("why", "late"),))] == 1
    metrics.watch_gate_listener(lambda: listener)  # watching again replaces, never duplicates
    assert _samples((await _get(port, "/metrics"))[2])[
        ("callgate_gate_shed_total", (("why", "late"),))] == 1
