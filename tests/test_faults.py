"""Issue 8's fault suite: the real ``callgate run`` process under fire, money checked after.

Each scenario runs real agent processes against the PBX simulators over
loopback (Asterisk and FreeSWITCH side by side, each with its own agent and
ledger, to halve the wall time), on SQLite and again on PostgreSQL, and ends
with :func:`~tests.daemon_harness.money_problems`: the five money invariants
checked against the simulator's own billsec. Tariffs are compressed (2 s
increments) so a scenario takes seconds.

1. SIGKILL mid-call: the PBX ends calls at their own deadline; the restarted
   agent settles them (flagged) and adopts and meters on the calls still up.
2. PBX link dropped (a hang-up lost meanwhile) and PBX restarted with every
   call gone: reconciled, nothing charged twice.
3. Duplicate, reordered and late events: hang-up right after answer, Cdr
   before/after Hangup, Hangup/Cdr/answer replayed after settlement.
4. Ledger unavailable (SQLite locked by another process for 10 s; PostgreSQL
   cut off through a proxy): new calls refused ``ledger_unavailable``, calls in
   progress end at their paid boundary, the agent recovers by itself.
5. MQTT broker unreachable (through a proxy): calls gated and metered; the
   newest events (the buffer's worth) published once it is back; drops counted.
6. A bad policy edit while a call runs: the call is not affected.
7. Two agents (an Asterisk node and a FreeSWITCH node) selling one PostgreSQL
   balance: no overdraw, the concurrency cap held across both; and while one
   node's agent is dead, the other's reconcile leaves that node's calls alone.

``money_problems`` itself is tested last (it must be able to fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.ledger import CallStatus, open_ledger
from tests.conftest import PG_PORT, _in_thread, _pg_schema, pg_base_url
from tests.daemon_harness import (
    Agent,
    TcpProxy,
    free_port,
    money_problems,
    scrape_metrics,
    service_or_skip,
    sim_port,
    simulator,
    write_config,
)

KINDS = ("asterisk", "freeswitch")
SECRET = "fault-secret"
GRACE = 2  # the meter's default grace, which the agent config keeps
CALLER = {"acme": "02158880000", "slowco": "02158880001", "shared": "02158880002"}
POLICY = """\
version: 1
prepaid: {first_topup_minimum: "0.10"}
tariffs:
  quick: {rate: "0.13", increment: 2, minimum: 2}
  slow: {rate: "0.13", increment: 10, minimum: 10}
defaults:
  tariff: quick
  low_balance_warning: "0"
  calling_hours: [{days: all, windows: [{start: "00:00", end: "24:00"}]}]
accounts:
  acme: {name: ACME, caller_ids: ["02158880000"]}
  slowco: {name: Slow, caller_ids: ["02158880001"], tariff: slow}
  shared: {name: Shared, caller_ids: ["02158880002"], max_concurrent_calls: 3}
"""


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """A fresh ledger URL per name: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    made: list[tuple[str, str]] = []

    def url(name: str) -> str:
        if request.param == "sqlite":
            return f"sqlite://{tmp_path}/{name}.db"
        base = pg_base_url()
        schema = f"faults_{name}_{uuid.uuid4().hex[:10]}"
        _in_thread(_pg_schema, base, schema, True)
        made.append((base, schema))
        return f"{base}?search_path={schema}"

    yield url
    for base, schema in made:
        _in_thread(_pg_schema, base, schema, False)


@dataclass
class Rig:
    """One simulated PBX, its agent's config, and the test's own handle on the ledger."""

    kind: str
    sim: Any
    config: Path
    ledger: Any
    seq: int = 0

    async def topup(self, account: str, amount: str) -> None:
        self.seq += 1
        await self.ledger.topup(account, Decimal(amount), ref=f"{self.kind}-t{self.seq}",
                                at=datetime.now(UTC))

    async def place(self, account: str = "acme", *, talk: float | None, ring: float = 0.0,
                    **extra: Any) -> Any:
        self.seq += 1
        return await self.sim.place_call(
            caller=CALLER[account], destination=f"13800{self.seq:06d}", accountcode=account,
            talk_seconds=talk, ring_seconds=ring, **extra)

    def hang_up(self, call: Any) -> None:
        if self.kind == "asterisk":
            call.hangup("caller")
        else:
            self.sim.hangup(call.a_leg, "NORMAL_CLEARING")

    def drop_link(self) -> None:
        if self.kind == "asterisk":
            self.sim.drop_ami_connections()
        else:
            self.sim.drop_esl_connections()

    async def restart_pbx(self) -> None:
        """As if the PBX restarted: connections cut, every call gone without an event."""
        if self.kind == "asterisk":
            await self.sim.restart(keep_calls=False)
        else:
            await self.sim.restart()

    @property
    def connected_event(self) -> str:
        return "ami.connected" if self.kind == "asterisk" else "freeswitch.esl_connected"

    async def until_status(self, call: Any, status: CallStatus, timeout: float = 10) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                record = await self.ledger.get_call(call.call_id)
                if record is not None and record.status is status:
                    return record
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def rig(kind: str, tmp: Path, url: str, *, agent_url: str | None = None,
              node: str = "t1", extra: str = "") -> AsyncIterator[Rig]:
    tmp.mkdir(parents=True, exist_ok=True)
    gate_port = free_port()
    async with simulator(kind, SECRET, gate_port) as sim:
        config = write_config(tmp, kind, sim_port(sim), gate_port, SECRET,
                              ledger=agent_url or url, node=node, policy=POLICY, extra=extra)
        ledger = await open_ledger(url)
        try:
            yield Rig(kind, sim, config, ledger)
        finally:
            await ledger.close()


async def on_both_pbx(scenario: Callable[[str], Awaitable[None]]) -> None:
    """Run the scenario for Asterisk and FreeSWITCH at once; report each failure by kind."""
    outcomes = await asyncio.gather(*(scenario(kind) for kind in KINDS), return_exceptions=True)
    failed = [(kind, out) for kind, out in zip(KINDS, outcomes, strict=True)
              if isinstance(out, BaseException)]
    if len(failed) == 1:
        kind, error = failed[0]
        raise AssertionError(f"[{kind}] {error}") from error
    if failed:
        raise AssertionError("\n\n".join(f"[{kind}] {error!r}" for kind, error in failed))


async def ended(*calls: Any, timeout: float = 20) -> dict[str, Any]:
    """The simulator's figures for these calls, once every one has ended."""
    async with asyncio.timeout(timeout):
        results = [await call.ended() for call in calls]
    return {r.call_id: r for r in results}


async def assert_money(r: Rig, results: dict[str, Any], agent: Agent) -> None:
    problems = await money_problems(r.ledger, results, GRACE)
    problems += [f"agent crash line: {json.dumps(line)[:400]}" for line in agent.crashes()]
    assert not problems, "\n".join(problems)


async def decision(agent: Agent, call: Any) -> dict[str, Any]:
    return await agent.wait_for("gate.decision", call_id=call.call_id)


# -- 1. SIGKILL mid-call ---------------------------------------------------------------------


async def test_agent_killed_mid_call_restarts_settles_and_adopts(tmp_path, store):
    async def scenario(kind: str) -> None:
        async with rig(kind, tmp_path / kind, store(kind)) as r:
            await r.topup("acme", "1.00")
            await r.topup("slowco", "1.00")
            async with Agent(r.config) as agent:
                await agent.wait_for("daemon.ready")
                short = await r.place("acme", talk=None)  # talks until the PBX stops it
                long = await r.place("slowco", talk=11)  # 10 s increments: outlives the outage
                await r.until_status(short, CallStatus.ANSWERED)
                await r.until_status(long, CallStatus.ANSWERED)
                # Allowed (first unit held) but still ringing when the agent dies.
                ringing = await r.place("acme", talk=None, ring=1.0)
                await r.until_status(ringing, CallStatus.ADMITTED)
                await agent.kill()
            # Nobody meters now: the PBX's own deadline (paid + grace) ends the short
            # call, and the limit armed at allow time ends the one answered meanwhile.
            away = await ended(short, ringing, timeout=10)
            assert away[short.call_id].by_deadline, away
            assert away[ringing.call_id].by_deadline and away[ringing.call_id].answered_at, away
            assert long.call_id in _live(r), "the long call should still be up"
            async with Agent(r.config) as agent:
                await agent.wait_for("meter.settle_ended_while_away", call_id=short.call_id)
                await agent.wait_for("meter.settle_ended_while_away", call_id=ringing.call_id)
                await agent.wait_for("meter.adopted", call_id=long.call_id)
                results = await ended(short, ringing, long, timeout=20)
                await agent.wait_for("meter.settled", call_id=long.call_id)
                await agent.wait_for("meter.settled", call_id=short.call_id)
                await agent.wait_for("meter.settled", call_id=ringing.call_id)
                # The adopted call was metered on: its second increment was held by
                # the new agent, and it ended by itself, not at the old deadline.
                record = await r.ledger.get_call(long.call_id)
                assert record.paid_seconds == 20 and not results[long.call_id].by_deadline
                assert await agent.stop() == 0
                await assert_money(r, results, agent)
                (cdr,) = [c for c in await _cdrs(r, "acme") if c.call_id == short.call_id]
                assert "ended_while_away" in cdr.flags

    await on_both_pbx(scenario)


def _live(r: Rig) -> list[str]:
    if r.kind == "asterisk":
        return [c.call_id for c in r.sim.live_calls()]
    return list(r.sim.live_calls())


async def _cdrs(r: Rig, account: str) -> list[Any]:
    start, end = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    return list(await r.ledger.cdrs(account, start, end))


# -- 2. PBX link drops; PBX restarts with calls gone -----------------------------------------


async def test_pbx_link_drop_and_pbx_restart_reconcile_without_double_charge(tmp_path, store):
    async def scenario(kind: str) -> None:
        async with rig(kind, tmp_path / kind, store(kind)) as r:
            await r.topup("acme", "2.00")
            async with Agent(r.config) as agent:
                await agent.wait_for("daemon.ready")
                survivor = await r.place(talk=None)
                lost = await r.place(talk=None)
                await r.until_status(survivor, CallStatus.ANSWERED)
                await r.until_status(lost, CallStatus.ANSWERED)
                # The link drops and one call hangs up before the agent is back: its
                # hang-up events are never delivered. Another, just allowed, is answered
                # meanwhile: the answer is seen only in the PBX's list at reconnect.
                unheard = await r.place(talk=3, ring=0.1)
                r.drop_link()
                r.hang_up(lost)
                await agent.wait_for(r.connected_event, count=2)
                await agent.wait_for("meter.call_vanished", call_id=lost.call_id)
                await agent.wait_for("meter.settled", call_id=lost.call_id)
                await agent.wait_for("meter.settled", call_id=unheard.call_id)
                # The survivor was metered through the drop; now the PBX restarts
                # and it is gone without a word.
                await asyncio.sleep(1.5)
                assert survivor.call_id in _live(r)
                ringing = await r.place(talk=None, ring=30)  # first unit held at setup
                await r.until_status(ringing, CallStatus.ADMITTED)
                await r.restart_pbx()
                await agent.wait_for(r.connected_event, count=3)
                await agent.wait_for("meter.settled", call_id=survivor.call_id)
                # Gone unanswered: its hold and line are freed now, not in 30-60 s.
                await agent.wait_for("meter.settled", call_id=ringing.call_id, timeout=5)
                # Service goes on after all that.
                after = await r.place(talk=2.5)
                await agent.wait_for("meter.settled", call_id=after.call_id)
                results = await ended(survivor, lost, unheard, ringing, after)
                assert len(agent.matching("meter.settled")) == 5
                assert await agent.stop() == 0
                await assert_money(r, results, agent)
                flags = {c.call_id: c.flags for c in await _cdrs(r, "acme")}
                assert "vanished" in flags[lost.call_id]
                assert "vanished" in flags[survivor.call_id]
                assert "billsec_assumed_paid" not in flags[after.call_id]
                # Adopted from the list (or, on a slow machine, seen answering after the
                # reconnect): either way metered from its real answer, charged exactly.
                assert set(flags[unheard.call_id]) <= {"adopted"}, flags[unheard.call_id]

    await on_both_pbx(scenario)


# -- 3. duplicate, reordered and late events -------------------------------------------------


def _replay_end_and_answer(r: Rig, call: Any) -> None:
    """Send a settled call's hang-up (and Cdr) again, and a late answer, as a PBX might."""
    if r.kind == "asterisk":
        ch = call.caller
        r.sim.emit("Hangup", [*ch.fields(), ("Cause", "16"), ("Cause-txt", "Normal Clearing")])
        # A late Cdr with other figures (billsec up to now) must not re-rate the call.
        r.sim._cdr_event(call, time.time() + 30, "Dial", "SIP/uas", "ANSWERED", call.callee)
        r.sim.emit("Newstate", ch.fields())  # ChannelState 6: Up
    else:
        r.sim._emit("CHANNEL_HANGUP_COMPLETE", call.a_leg)
        r.sim._emit("CHANNEL_ANSWER", call.a_leg)


async def test_duplicate_reordered_and_late_events_charge_once(tmp_path, store):
    async def scenario(kind: str) -> None:
        async with rig(kind, tmp_path / kind, store(kind)) as r:
            await r.topup("acme", "2.00")
            async with Agent(r.config) as agent:
                await agent.wait_for("daemon.ready")
                calls = [
                    await r.place(talk=0.01),  # hangs up before the answer is processed
                    await r.place(talk=2.5),
                    await r.place(talk=3.5),
                ]
                if kind == "asterisk":  # the Cdr before and after the Hangup (traces 01, 02)
                    calls.append(await r.place(talk=1.5, cdr="before"))
                    calls.append(await r.place(talk=1.5, cdr="after"))
                results = await ended(*calls)
                for call in calls:
                    await agent.wait_for("meter.settled", call_id=call.call_id)
                for call in calls:
                    _replay_end_and_answer(r, call)
                # A fresh call after the replays: once it is settled, the replays
                # (sent before it) have been through the meter.
                marker = await r.place(talk=1.5)
                results |= await ended(marker)
                await agent.wait_for("meter.settled", call_id=marker.call_id)
                await asyncio.sleep(1.0)
                for call in calls:
                    assert len(agent.matching("meter.settled", call_id=call.call_id)) == 1
                assert not agent.matching("meter.unseen_call_adopted")
                await assert_money(r, results, agent)
                assert await agent.stop() == 0

    await on_both_pbx(scenario)


# -- 4. the ledger is unavailable ------------------------------------------------------------

LOCKER = """\
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


@contextlib.asynccontextmanager
async def sqlite_locked(url: str, seconds: float) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process holds the SQLite ledger's write lock for ``seconds``."""
    path = url[len("sqlite://"):]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCKER, path, str(seconds), stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"locked\n"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_ledger_unavailable_refuses_new_calls_ends_paid_ones_and_recovers(
        tmp_path, store, request):
    backend = request.node.callspec.params["store"]

    async def scenario(kind: str) -> None:
        url = store(kind)
        async with contextlib.AsyncExitStack() as stack:
            proxy = None
            if backend == "postgres":
                proxy = await stack.enter_async_context(TcpProxy(("127.0.0.1", PG_PORT)))
                agent_url = url.replace(f"127.0.0.1:{PG_PORT}", f"127.0.0.1:{proxy.port}")
            else:
                agent_url = url
            r = await stack.enter_async_context(
                rig(kind, tmp_path / kind, url, agent_url=agent_url))
            await r.topup("acme", "5.00")
            agent = await stack.enter_async_context(Agent(r.config))
            await agent.wait_for("daemon.ready")
            running = await r.place(talk=None)
            record = await r.until_status(running, CallStatus.ANSWERED)
            outage_started = time.monotonic()
            if proxy is not None:
                await proxy.down()
                outage = 8.0
            else:
                await stack.enter_async_context(sqlite_locked(url, 10))
                outage = 10.0
            refused = await r.place(talk=1)
            assert (await ended(refused))[refused.call_id].answered_at is None
            line = await decision(agent, refused)
            assert (line["result"], line["reason"]) == ("DENY", "ledger_unavailable"), line
            # The running call is not extended past what it paid: it ends at its paid
            # boundary (the meter's hang-up, or the PBX deadline + grace) while the
            # ledger is still away; money_problems checks billsec <= paid + grace.
            results = await ended(running, timeout=outage)
            assert time.monotonic() - outage_started < outage
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - outage_started)))
            if proxy is not None:
                await proxy.up()
            # Recovers by itself: the ended call is settled, new calls are allowed.
            await agent.wait_for("meter.settled", call_id=running.call_id, timeout=20)
            async with asyncio.timeout(20):
                while True:
                    again = await r.place(talk=2.5)
                    result = (await ended(again))[again.call_id]
                    results[again.call_id] = result
                    if result.answered_at is not None:
                        break
                    await asyncio.sleep(0.5)
            await agent.wait_for("meter.settled", call_id=again.call_id)
            results[refused.call_id] = (await ended(refused))[refused.call_id]
            assert record.paid_seconds >= 2
            assert await agent.stop() == 0
            await assert_money(r, results, agent)

    await on_both_pbx(scenario)


# -- 5. the MQTT broker is down ----------------------------------------------------------------


# The broker's outage; the minute is CALLGATE_FAULT_MQTT_OUTAGE=60 (a soak run).
MQTT_OUTAGE = float(os.environ.get("CALLGATE_FAULT_MQTT_OUTAGE", "10"))


@pytest.mark.mqtt
async def test_mqtt_broker_down_gating_and_metering_go_on_events_follow(tmp_path):
    import aiomqtt

    service_or_skip(1883, "Mosquitto")
    buffer = 4
    prefix = f"cgfault-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    async with TcpProxy(("127.0.0.1", 1883)) as proxy:
        extra = (f"mqtt: {{url: 'mqtt://127.0.0.1:{proxy.port}', topic_prefix: {prefix}, "
                 f"buffer: {buffer}}}\nmetrics: {{listen: '127.0.0.1:{metrics_port}'}}\n")
        async with (
            rig("asterisk", tmp_path, f"sqlite://{tmp_path}/ledger.db", extra=extra) as r,
            aiomqtt.Client("127.0.0.1", 1883) as client,
        ):
            await client.subscribe(f"{prefix}/#", qos=1)
            await r.topup("acme", "5.00")
            async with Agent(r.config) as agent:
                await agent.wait_for("mqtt.connected")
                await proxy.down()
                # Three calls while the broker is away: 9 events for a buffer of 4.
                calls = [await r.place(talk=1.5) for _ in range(3)]
                results = await ended(*calls)
                for call in calls:
                    await agent.wait_for("meter.settled", call_id=call.call_id)
                    line = await decision(agent, call)
                    assert line["result"] == "ALLOW"
                await asyncio.sleep(MQTT_OUTAGE - 2)  # the calls took ~2 s of it
                await proxy.up()
                # Reconnect backoff is capped at 30 s (+25% jitter).
                await agent.wait_for("mqtt.connected", count=2, timeout=45)
                received: list[tuple[str, dict[str, Any]]] = []
                async with asyncio.timeout(15):
                    async for message in client.messages:
                        received.append((str(message.topic), json.loads(message.payload)))
                        if len(received) == buffer:
                            break
                metrics = await scrape_metrics(metrics_port)
                # The three calls end within a millisecond of each other: the last
                # event is the call/end of whichever the meter settled last.
                settled_last = agent.matching("meter.settled")[-1]["call_id"]
                assert await agent.stop() == 0
                await assert_money(r, results, agent)
    # The newest events came through, in order; the gap is exactly the drops counted.
    seqs = [payload["seq"] for _, payload in received]
    assert seqs == list(range(seqs[0], seqs[0] + buffer)), seqs
    assert received[-1][0].endswith("/call/end")
    assert received[-1][1]["call_id"] == settled_last
    assert settled_last in {call.call_id for call in calls}
    assert metrics["callgate_mqtt_dropped_total"] == seqs[0] - 1
    assert seqs[0] - 1 == 3 * 3 - buffer


# -- 6. a bad policy edit while a call runs ----------------------------------------------------


async def test_bad_policy_edit_leaves_the_running_call_alone(tmp_path, store):
    async def scenario(kind: str) -> None:
        async with rig(kind, tmp_path / kind, store(kind)) as r:
            await r.topup("acme", "1.00")
            async with Agent(r.config) as agent:
                await agent.wait_for("daemon.ready")
                call = await r.place(talk=5.5)
                await r.until_status(call, CallStatus.ANSWERED)
                policy = r.config.parent / "policy.yaml"
                policy.write_text(POLICY.replace('increment: 2,', 'increment: two,'))
                assert agent.proc is not None
                agent.proc.send_signal(signal.SIGHUP)
                await agent.wait_for("policy.reload_refused")
                results = await ended(call)
                await agent.wait_for("meter.settled", call_id=call.call_id)
                result = results[call.call_id]
                # 5.5 s of talk: billsec 5 (Asterisk), 5 or 6 (FreeSWITCH counts whole
                # epoch seconds, agent/sim/freeswitch.py fs_billsec)
                assert not result.by_deadline and result.billsec in (5, 6), result
                assert not agent.matching("meter.cutoff_planned")
                assert await agent.stop() == 0
                await assert_money(r, results, agent)

    await on_both_pbx(scenario)


# -- 7. two agents, one PostgreSQL balance ------------------------------------------------------


@pytest.mark.postgres
async def test_two_agents_on_one_postgres_balance_never_overdraw_and_share_the_cap(tmp_path):
    base = pg_base_url()
    schema = f"faults_two_{uuid.uuid4().hex[:10]}"
    _in_thread(_pg_schema, base, schema, True)
    url = f"{base}?search_path={schema}"
    try:
        async with (
            rig("asterisk", tmp_path / "n1", url, node="n1") as one,
            rig("freeswitch", tmp_path / "n2", url, node="n2") as two,
            Agent(one.config) as agent_one,
            Agent(two.config) as agent_two,
        ):
            # 0.65 pays five 2 s increments; the account rents three lines.
            await one.topup("shared", "0.65")
            await agent_one.wait_for("daemon.ready")
            await agent_two.wait_for("daemon.ready")
            calls = [await r.place("shared", talk=None) for _ in range(3) for r in (one, two)]
            results = await ended(*calls, timeout=30)
            for call in calls:
                if results[call.call_id].answered_at is not None:
                    agent = agent_one if call in calls[::2] else agent_two
                    await agent.wait_for("meter.settled", call_id=call.call_id)
            answered = [r for r in results.values() if r.answered_at is not None]
            assert len(answered) == 3, results  # the three lines, whichever node took them
            decisions = [line for a in (agent_one, agent_two) for line in a.matching(
                "gate.decision")]
            refused = [d["reason"] for d in decisions if d["result"] == "DENY"]
            assert len(refused) == 6 - len(answered), decisions
            assert refused == ["concurrency_limit"] * 3, refused
            # Never more than three calls up at once, across both PBXs.
            edges = sorted([(r.answered_at, 1) for r in answered]
                           + [(r.ended_at, -1) for r in answered])
            live = peak = 0
            for _, step in edges:
                live += step
                peak = max(peak, live)
            assert peak <= 3
            # The whole balance sold, not a cent more: the calls were cut when it ran out.
            balance = await one.ledger.balance("shared")
            assert (balance.posted, balance.held) == (0, 0)
            assert sum((c.amount for c in await _cdrs(one, "shared")), Decimal(0)) == Decimal(
                "0.65")
            assert await agent_one.stop() == 0 and await agent_two.stop() == 0
            problems = await money_problems(one.ledger, results, GRACE)
            problems += [json.dumps(c) for a in (agent_one, agent_two) for c in a.crashes()]
            assert not problems, "\n".join(problems)
    finally:
        _in_thread(_pg_schema, base, schema, False)


# -- the checker itself can fail -------------------------------------------------------------


@dataclass(frozen=True)
class _PbxSays:
    call_id: str
    answered_at: datetime | None
    billsec: int


async def test_money_problems_names_each_broken_invariant(tmp_path):
    from agent.ledger import CallRecord, Cdr

    ledger = await open_ledger(f"sqlite://{tmp_path}/ledger.db")
    now = datetime.now(UTC)
    try:
        await ledger.topup("acme", Decimal("1"), ref="t", at=now)

        async def call(call_id: str, paid: int, charged: str | None, billsec: int) -> None:
            await ledger.admit_call(CallRecord(
                call_id=call_id, account="acme", node="t1", caller="1", callee="2",
                tariff_name="quick", rate=Decimal("0.13"), increment=2, minimum=2,
                admitted_at=now), None)
            assert await ledger.hold(call_id, 1, Decimal("0.13") * (paid // 2), paid, now)
            if charged is not None:
                await ledger.settle_call(Cdr(
                    call_id=call_id, account="acme", caller="1", callee="2", answered_at=now,
                    ended_at=now, billsec=billsec, billed_seconds=paid, amount=Decimal(charged),
                    cause="NORMAL_CLEARING"))

        await call("right", 4, "0.26", 3)
        assert await money_problems(ledger, {"right": _PbxSays("right", now, 3)}) == []
        await call("short", 4, "0.13", 4)  # billed 2 s of 4
        await call("long", 4, "0.26", 4)  # the PBX let it talk 9 s
        await call("open", 2, None, 0)  # never settled
        problems = "\n".join(await money_problems(ledger, {
            "right": _PbxSays("right", now, 3), "short": _PbxSays("short", now, 4),
            "long": _PbxSays("long", now, 9), "open": _PbxSays("open", now, 1),
            "ghost": _PbxSays("ghost", now, 5)}))
        for needle in ("short: charged 0.1300, expected 0.2600",
                       "long: talked 9 s, paid 4 s", "long: charged 0.2600, expected 0.6500",
                       "open: ended on the PBX, never settled", "acme: 0.1300 still held",
                       "live calls left in the ledger: ['open']",
                       "ghost: talked 5 s, unknown to the ledger"):
            assert needle in problems, problems
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_two_agents_on_one_ledger_reconcile_only_their_own_calls(tmp_path):
    # Node n1's agent dies mid-call while n2's agent reconnects to its PBX and
    # reconciles: n2 must leave n1's call alone (it is not on n2's PBX, yet it is up).
    base = pg_base_url()
    schema = f"faults_nodes_{uuid.uuid4().hex[:10]}"
    _in_thread(_pg_schema, base, schema, True)
    url = f"{base}?search_path={schema}"
    try:
        async with (
            rig("asterisk", tmp_path / "n1", url, node="n1") as one,
            rig("freeswitch", tmp_path / "n2", url, node="n2") as two,
            Agent(two.config) as agent_two,
        ):
            await one.topup("acme", "5.00")
            async with Agent(one.config) as agent_one:
                await agent_one.wait_for("daemon.ready")
                await agent_two.wait_for("daemon.ready")
                mine, theirs = await one.place(talk=6), await two.place(talk=6)
                await one.until_status(mine, CallStatus.ANSWERED)
                await two.until_status(theirs, CallStatus.ANSWERED)
                await agent_one.kill()
            two.drop_link()
            await agent_two.wait_for(two.connected_event, count=2)
            async with Agent(one.config) as agent_one:
                await agent_one.wait_for("daemon.ready")
                results = await ended(mine, theirs)
                await agent_one.wait_for("meter.settled", call_id=mine.call_id)
                await agent_two.wait_for("meter.settled", call_id=theirs.call_id)
                assert await agent_one.stop() == 0
                await assert_money(one, results, agent_one)
            assert not [line for line in agent_two.lines if line.get("call_id") == mine.call_id]
            assert await agent_two.stop() == 0
            cdrs = {c.call_id: c for c in await _cdrs(one, "acme")}
            assert cdrs[mine.call_id].node == "n1" and cdrs[theirs.call_id].node == "n2"
            assert "vanished" not in cdrs[theirs.call_id].flags
    finally:
        _in_thread(_pg_schema, base, schema, False)
