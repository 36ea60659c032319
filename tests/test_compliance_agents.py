"""Two real agents (``callgate run``) on one PostgreSQL ledger: one live DNC add, and the
next call to that number on either agent is refused within a second."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.ledger import open_ledger
from tests.daemon_harness import Agent, free_port, sim_port, simulator, write_config

pytestmark = pytest.mark.postgres

NUMBER = "13800138000"


async def _call(sim: Any, destination: str) -> bool:
    """Place a call; True if it was let through (answered)."""
    call = await sim.place_call(caller="02158880000", destination=destination,
                                accountcode="acme", talk_seconds=0.2)
    return (await asyncio.wait_for(call.ended(), 10)).answered_at is not None


async def test_a_dnc_add_is_refused_by_both_agents_within_a_second(tmp_path: Path,
                                                                   pg_url: str) -> None:
    ops = await open_ledger(pg_url)
    await ops.topup("acme", Decimal("100"), ref="t1", at=datetime.now(UTC))
    secret = "t-secret"
    ports = [free_port(), free_port()]
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    try:
        async with simulator("asterisk", secret, ports[0]) as sim_a, \
                simulator("asterisk", secret, ports[1]) as sim_b:
            sims = [sim_a, sim_b]
            # Two PBXs, two uniqueid spaces (a real cluster sets Asterisk's systemname);
            # the simulators both count from the start time.
            sim_b._epoch += 100_000  # type: ignore[attr-defined]
            configs = [write_config(d, "asterisk", sim_port(s), p, secret, ledger=pg_url,
                                    node=f"node-{i}")
                       for i, (d, s, p) in enumerate(zip(dirs, sims, ports, strict=True))]
            async with Agent(configs[0]) as agent_a, Agent(configs[1]) as agent_b:
                agents = [agent_a, agent_b]
                for agent in agents:
                    await agent.wait_for("daemon.ready", timeout=20)
                    await agent.wait_for("dnc.loaded")
                first = [await _call(s, NUMBER) for s in sims]
                assert all(first), [a.matching("gate.decision") for a in agents]
                await ops.dnc_add("acme", NUMBER, reason="asked", operator="ops1",
                                  at=datetime.now(UTC))
                added = time.monotonic()
                took = []
                for sim in sims:
                    while await _call(sim, NUMBER):
                        assert time.monotonic() - added < 1.0, "still allowed after 1 s"
                    took.append(time.monotonic() - added)
                for agent in agents:
                    await agent.wait_for("gate.decision", reason="do_not_call")
                    await agent.wait_for("dnc.synced")
                # other numbers are still allowed on both
                assert all([await _call(s, "13900139000") for s in sims])
                for agent in agents:
                    assert agent.crashes() == []
    finally:
        await ops.close()
    assert max(took) < 1.0, took
