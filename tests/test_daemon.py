"""The real ``callgate run`` process against the PBX simulators over loopback sockets.

Covers start (READY), gating and metering end to end, SIGHUP with a bad policy
(old policy kept, error located), a good edit taking effect at the next
decision, SIGTERM (exit 0), and the start-up errors an operator can cause.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from decimal import Decimal

import pytest

from agent.ledger import open_ledger
from tests.daemon_harness import (
    POLICY,
    free_port,
    read_until,
    sim_port,
    simulator,
    start_agent,
    write_config,
)


@pytest.mark.parametrize("kind", ["asterisk", "freeswitch"])
async def test_run_gates_meters_reloads_and_stops_cleanly(tmp_path, kind):
    gate_port = free_port()
    secret = "t-secret"
    async with simulator(kind, secret, gate_port) as sim:
        config = write_config(tmp_path, kind, sim_port(sim), gate_port, secret)
        ledger = await open_ledger(f"sqlite://{tmp_path / 'ledger.db'}")
        from datetime import UTC, datetime
        await ledger.topup("acme", Decimal("0.26"), ref="t1", at=datetime.now(UTC))
        proc = await start_agent(config)
        seen: list[str] = []
        try:
            await read_until(proc, "daemon.ready", seen)
            # 0.26 pays two 2 s increments: a 10 s call is cut off at 4 s.
            call = await sim.place_call(caller="02158880000", destination="13800138000",
                                        accountcode="acme", talk_seconds=10)
            result = await asyncio.wait_for(call.ended(), 20)
            assert 3 <= result.billsec <= 4, result
            await read_until(proc, "meter.settled", seen)
            balance = await ledger.balance("acme")
            assert balance.available == Decimal("0") and balance.held == 0

            # A bad edit is refused with its location; the old policy stays in force.
            (tmp_path / "policy.yaml").write_text(POLICY.replace('"0.13"', "0.13x"))
            proc.send_signal(signal.SIGHUP)
            line = await read_until(proc, "policy.reload_refused", seen)
            assert "policy.yaml:4: tariffs.quick.rate" in line
            refused = await sim.place_call(caller="02158880000", destination="13800138001",
                                           accountcode="acme", talk_seconds=1)
            refused_result = await asyncio.wait_for(refused.ended(), 10)
            assert refused_result.answered_at is None  # still gated: balance is spent

            # A good edit (picked up from the file, no signal) takes effect at once.
            await ledger.topup("acme", Decimal("1"), ref="t2", at=datetime.now(UTC))
            (tmp_path / "policy.yaml").write_text(
                POLICY.replace('["02158880000"]', '["02158880000"], status: suspended'))
            await read_until(proc, "policy.reloaded", seen)
            denied = await sim.place_call(caller="02158880000", destination="13800138002",
                                          accountcode="acme", talk_seconds=1)
            assert (await asyncio.wait_for(denied.ended(), 10)).answered_at is None
            await read_until(proc, "account_suspended", seen)

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            assert await ledger.audit() == []
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await ledger.close()


async def test_bad_policy_at_start_exits_1_with_the_located_error(tmp_path):
    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "x")
    (tmp_path / "policy.yaml").write_text(POLICY.replace("days: all", "days: someday"))
    proc = await start_agent(config)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"policy.yaml:7: defaults.calling_hours[0].days" in out


async def test_wrong_ami_secret_exits_1_with_a_clear_error(tmp_path):
    gate_port = free_port()
    async with simulator("asterisk", "right", gate_port) as sim:
        config = write_config(tmp_path, "asterisk", sim_port(sim), gate_port, "wrong")
        proc = await start_agent(config)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"Authentication failed" in out or b"login refused" in out, out.decode()[-2000:]


async def test_missing_secret_credential_is_named(tmp_path):
    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "x")
    config.write_text(config.read_text().replace("secret: x", "secret_env: NO_SUCH_VAR_X"))
    proc = await start_agent(config)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"pbx.ami: secret: environment variable NO_SUCH_VAR_X is not set" in out


def test_run_without_config_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CALLGATE_CONFIG"}
    proc = subprocess.run([sys.executable, "-m", "agent", "run"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=30)
    assert proc.returncode == 2 and "run needs an agent config" in proc.stderr


@pytest.mark.parametrize("kind", ["asterisk", "freeswitch"])
async def test_demo_runs_and_passes(kind, capsys):
    from agent.demo import run_demo

    assert await asyncio.wait_for(run_demo(kind), 60) == 0
    out = capsys.readouterr().out
    for needle in ("outside_hours", "insufficient_balance", "cut off", "closing balance"):
        assert needle in out, needle
    assert "\nTOTAL " in out and "\nhealthy: callgate " in out  # the report and status




def _broker_or_skip() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=2):
            return
    except OSError:
        message = "Mosquitto is not reachable at 127.0.0.1:1883"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI requires it)")
        pytest.skip(f"{message}; start it with: mosquitto -d -c /etc/mosquitto/mosquitto.conf")


async def _http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_run_publishes_events_to_mqtt_and_serves_metrics(tmp_path):
    import json
    import uuid

    import aiomqtt

    _broker_or_skip()
    gate_port, metrics_port = free_port(), free_port()
    prefix = f"cgtest-{uuid.uuid4().hex[:8]}"
    async with simulator("asterisk", "s", gate_port) as sim:
        config = write_config(tmp_path, "asterisk", sim_port(sim), gate_port, "s")
        config.write_text(config.read_text()
                          + f"mqtt: {{url: 'mqtt://127.0.0.1:1883', topic_prefix: {prefix}}}\n"
                          + f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n")
        ledger = await open_ledger(f"sqlite://{tmp_path / 'ledger.db'}")
        from datetime import UTC, datetime
        await ledger.topup("acme", Decimal("5"), ref="t1", at=datetime.now(UTC))
        await ledger.close()
        received: list[tuple[str, dict]] = []
        async with aiomqtt.Client("127.0.0.1", 1883) as client:
            await client.subscribe(f"{prefix}/#", qos=1)
            proc = await start_agent(config)
            seen: list[str] = []
            try:
                await read_until(proc, "daemon.ready", seen)
                status, body = await _http_get(metrics_port, "/healthz")
                assert status == 200 and "ok" in body
                call = await sim.place_call(caller="02158880000", destination="13800138000",
                                            accountcode="acme", talk_seconds=3)
                await asyncio.wait_for(call.ended(), 15)
                async with asyncio.timeout(15):
                    async for message in client.messages:
                        received.append((str(message.topic), json.loads(message.payload)))
                        if str(message.topic).endswith("/call/end"):
                            break
                status, body = await _http_get(metrics_port, "/metrics")
                assert status == 200
                assert 'callgate_decisions_total{reason="allowed",result="ALLOW"} 1.0' in body
                assert "callgate_pbx_connected 1.0" in body
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 15) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    topics = [t.split("/", 2)[2] for t, _ in received]
    assert topics[0] == "decision" and "call/start" in topics and topics[-1] == "call/end"
    decision = received[0][1]
    assert decision["result"] == "ALLOW" and decision["schema"] == 1 and decision["node"] == "t1"
    cdr = received[-1][1]
    # 3 s of talk at 2 s increments: two started increments, however late the meter was.
    assert (cdr["amount"], cdr["billsec"], cdr["account"]) == ("0.2600", 3, "acme"), cdr
