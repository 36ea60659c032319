"""Hostile clients on the gate port of the real ``callgate run`` process (issue 8).

Anything on the host can connect to the FastAGI (Asterisk) or outbound-socket
(FreeSWITCH) gate port. A burst of 200 clients that send garbage, nothing,
half a request (then wait, dribble on or half-close), an oversize line, or a
complete request that names no call must each be refused or timed out by the
daemon: the connection is closed by the daemon, no decision goes back on the
wire, nothing is admitted or logged as an attempt in the ledger, and afterwards
the daemon holds no more file descriptors and no more asyncio tasks
(``callgate_asyncio_tasks``) than before. Real calls placed while the hostile
clients hang on are gated and metered as usual, and are answered before the
silent clients are timed out (no head-of-line blocking).
"""

from __future__ import annotations

import asyncio
import random
import signal
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from agent.ledger import open_ledger
from tests.daemon_harness import (
    drain_output,
    free_port,
    open_fds,
    read_until,
    scrape_metrics,
    sim_port,
    simulator,
    start_agent,
    write_config,
)

CLIENTS = 200
CALLER, ACCOUNT = "02158880000", "acme"
CLOSE_WAIT = 30.0  # bound for the daemon to close one hostile connection (it times out at 5 s)
SETTLE_WAIT = 15.0  # bound for fds and tasks to come back after the burst

# A FastAGI request cut short: real headers (trace 06), no terminating empty line.
AGI_HALF = (b"agi_network: yes\nagi_network_script: gate\nagi_request: agi://127.0.0.1/gate\n"
            b"agi_channel: PJSIP/2001-00000001\nagi_uniqueid: hostile-half\n"
            b"agi_callerid: " + CALLER.encode() + b"\nagi_accountcode: acme\nagi_dnid: 1380013")
# A complete FastAGI request that names no channel (no agi_uniqueid): nothing to decide for.
AGI_NO_ID = (b"agi_network: yes\nagi_network_script: gate\nagi_callerid: " + CALLER.encode()
             + b"\nagi_accountcode: acme\nagi_dnid: 13800138000\n\n")
# The outbound socket's connect reply (trace 06a) cut short, and one with no Unique-ID.
ESL_HALF = (b"Event-Name: CHANNEL_DATA\nUnique-ID: hostile-half\nCall-Direction: inbound\n"
            b"Caller-Caller-ID-Number: " + CALLER.encode() + b"\nvariable_accountcode: acme\n"
            b"Caller-Destination-Number: 13800138000\nContent-Type: command/reply\n")
ESL_NO_ID = (b"Event-Name: CHANNEL_DATA\nCall-Direction: inbound\n"
             b"Caller-Caller-ID-Number: " + CALLER.encode() + b"\nvariable_accountcode: acme\n"
             b"Caller-Destination-Number: 13800138000\nContent-Type: command/reply\n"
             b"Reply-Text: %2BOK%0A\nSocket-Mode: async\nControl: full\n\n")
ESL_REFUSED = (b"Content-Type: command/reply\nReply-Text: -ERR access denied\n"
               b"Unique-ID: hostile-refused\nvariable_accountcode: acme\n\n")

KINDS = {
    "asterisk": ["silent", "garbage", "half", "half_eof", "dribble", "oversize", "no_id"],
    "freeswitch": ["silent", "garbage", "half", "half_eof", "dribble", "oversize", "no_id",
                   "refused"],
}


def payload(kind: str, pbx: str, rng: random.Random) -> bytes:
    """What one hostile client writes first (``dribble`` writes it a byte at a time)."""
    if kind == "silent":
        return b""
    if kind == "garbage":
        junk = rng.randbytes(rng.randint(1, 3000))
        # Keep some garbage plausible: protocol-looking lines, then noise.
        return rng.choice([b"", b"agi_", b"Content-Type: ", b"GET / HTTP/1.1\r\n"]) + junk
    if kind in ("half", "half_eof", "dribble"):
        return AGI_HALF if pbx == "asterisk" else ESL_HALF
    if kind == "oversize":  # one header line far over the parser's bound
        return (b"agi_network: yes\nagi_x: " if pbx == "asterisk" else b"X-Junk: ") \
            + b"y" * 70_000
    if kind == "no_id":
        return AGI_NO_ID if pbx == "asterisk" else ESL_NO_ID
    if kind == "refused":
        return ESL_REFUSED
    raise ValueError(kind)


async def hostile_client(port: int, kind: str, data: bytes,
                         connected: asyncio.Event) -> tuple[str, bytes, datetime | None]:
    """Connect, misbehave, then read until the daemon closes: (kind, bytes it sent, when
    it closed the connection, None if it did not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connected.set()
    received = bytearray()

    async def read_to_eof() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    reading = asyncio.create_task(read_to_eof())
    closed: datetime | None = None
    try:
        async with asyncio.timeout(CLOSE_WAIT):
            if kind == "dribble":  # a byte every 0.2 s until the daemon hangs up
                for i in range(len(data)):
                    if reading.done():
                        break
                    writer.write(data[i:i + 1])
                    await asyncio.wait({reading}, timeout=0.2)
            elif data:
                writer.write(data)
                if kind == "half_eof":
                    writer.write_eof()
            await reading
            closed = datetime.now(UTC)
    except ConnectionError:
        closed = datetime.now(UTC)  # reset by the daemon: refused as well
    except TimeoutError:
        closed = None
    finally:
        reading.cancel()
        writer.close()
    return kind, bytes(received), closed


async def wait_back_to(pid: int, port: int, fds: int, tasks: float) -> tuple[int, float]:
    """Poll until the daemon's fds and tasks are back to the baseline (or the bound passes)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + SETTLE_WAIT
    while True:
        now_fds = open_fds(pid)
        now_tasks = (await scrape_metrics(port))["callgate_asyncio_tasks"]
        if (now_fds <= fds and now_tasks <= tasks) or loop.time() > end:
            return now_fds, now_tasks
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("pbx", ["asterisk", "freeswitch"])
async def test_hostile_gate_clients_are_refused_without_leaks(tmp_path: Path, pbx: str) -> None:
    rng = random.Random(8)
    gate_port, metrics_port, secret = free_port(), free_port(), "h-secret"
    async with simulator(pbx, secret, gate_port) as sim:
        config = write_config(tmp_path, pbx, sim_port(sim), gate_port, secret)
        config.write_text(config.read_text() + f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n")
        ledger = await open_ledger(f"sqlite://{tmp_path / 'ledger.db'}")
        started = datetime.now(UTC) - timedelta(seconds=1)
        await ledger.topup(ACCOUNT, Decimal("5"), ref="h1", at=datetime.now(UTC))
        proc = await start_agent(config)
        seen: list[str] = []
        drain: asyncio.Task[None] | None = None
        try:
            await read_until(proc, "daemon.ready", seen)
            drain = asyncio.create_task(drain_output(proc, seen))
            real_ids: list[str] = []

            async def real_call(n: int) -> object:
                call = await sim.place_call(caller=CALLER, destination=f"1380013{n:04d}",
                                            accountcode=ACCOUNT, talk_seconds=1)
                real_ids.append(call.call_id)  # type: ignore[attr-defined]
                return await asyncio.wait_for(call.ended(), 30)  # type: ignore[attr-defined]

            # Warm up: the first call opens what the daemon keeps open (ledger files).
            warm = await real_call(0)
            assert warm.answered_at is not None  # type: ignore[attr-defined]
            await asyncio.sleep(1)
            fds_before = open_fds(proc.pid)
            tasks_before = (await scrape_metrics(metrics_port))["callgate_asyncio_tasks"]

            kinds = [KINDS[pbx][i % len(KINDS[pbx])] for i in range(CLIENTS)]
            connected = [asyncio.Event() for _ in kinds]
            clients = [asyncio.create_task(
                hostile_client(gate_port, kind, payload(kind, pbx, rng), event))
                for kind, event in zip(kinds, connected, strict=True)]
            async with asyncio.timeout(CLOSE_WAIT):
                await asyncio.gather(*(e.wait() for e in connected))
            # The probes see the burst (the silent clients alone hold ~28 sockets
            # and handler tasks), so "back to baseline" below means something.
            silent = kinds.count("silent")
            assert open_fds(proc.pid) >= fds_before + silent // 2
            during = (await scrape_metrics(metrics_port))["callgate_asyncio_tasks"]
            assert during >= tasks_before + silent // 2
            # Real calls while 200 hostile connections are open.
            calls = [asyncio.create_task(real_call(n)) for n in range(1, 6)]
            answers = []
            for call_task in calls:
                result = await call_task
                assert result.answered_at is not None, result  # type: ignore[attr-defined]
                answers.append(result.answered_at)  # type: ignore[attr-defined]
            outcomes = await asyncio.gather(*clients)

            # Every hostile connection was closed by the daemon, and no decision
            # went back on the wire: FastAGI gets nothing at all, the outbound
            # socket only the daemon's own "connect".
            expected_reply = b"" if pbx == "asterisk" else b"connect\n\n"
            for kind, received, closed in outcomes:
                assert closed is not None, f"{kind}: the daemon left the connection open"
                assert received in (b"", expected_reply), (kind, received[:200])
            # The gate served a real call while the silent clients still held their
            # sockets (the PBX's clock and ours are the same wall clock).
            first_silent_closed = min(c for k, _, c in outcomes if k == "silent" and c)
            assert min(answers) < first_silent_closed, (answers, first_silent_closed)

            # No socket and no task left behind.
            fds_after, tasks_after = await wait_back_to(proc.pid, metrics_port,
                                                        fds_before, tasks_before)
            assert fds_after <= fds_before, (fds_before, fds_after)
            assert tasks_after <= tasks_before, (tasks_before, tasks_after)

            # Nothing decided for the hostile clients: only the real calls were
            # admitted, logged as attempts and settled.
            await read_until_settled(seen, real_ids)
            assert await ledger.live_calls() == []
            attempts = await ledger.attempts(ACCOUNT, started)
            assert len(attempts) == len(real_ids)
            cdrs = await ledger.cdrs(ACCOUNT, started, datetime.now(UTC) + timedelta(seconds=5))
            assert sorted(c.call_id for c in cdrs) == sorted(real_ids)
            for hostile_id in ("hostile-half", "hostile-refused", ""):
                assert await ledger.get_call(hostile_id) is None
            assert not [line for line in seen if '"gate.decision"' in line
                        and "hostile" in line]
            assert sum('"gate.decision"' in line for line in seen) == len(real_ids)
            assert await ledger.audit() == []

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if drain is not None:
                drain.cancel()
            await ledger.close()


async def read_until_settled(seen: list[str], call_ids: list[str], timeout: float = 20) -> None:
    """Wait (bounded) until the daemon logged ``meter.settled`` for every real call."""
    async with asyncio.timeout(timeout):
        while not all(any('"meter.settled"' in line and cid in line for line in seen)
                      for cid in call_ids):
            await asyncio.sleep(0.2)
