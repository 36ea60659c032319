"""Fixtures of the real-PBX tier: one PBX and one real ``callgate run`` per module and
PBX kind (booted once, stopped afterwards even when a test fails). See harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.realpbx.harness import (
    Agent,
    Pbx,
    Ports,
    Procs,
    policy_yaml,
    running_pbx,
    window_excluding_now,
)

INCREMENT = 3  # seconds: the compressed tariff (the contract's is 60)
RATE = "0.13"
GRACE = 2  # meter.grace_seconds
CAP = 2  # account "capped": lines rented

# Opening balances (CNY). "cut" pays exactly two increments; "broke" cannot pay one.
BALANCES = {"acme": "5.00", "broke": "0.01", "night": "5.00", "capped": "5.00", "cut": "0.26",
            "killed": "5.00", "dropped": "5.00", "spare": "5.00", "spare2": "5.00",
            "spare3": "5.00"}


@dataclass
class Tier:
    pbx: Pbx
    agent: Agent
    procs: Procs
    ports: Ports
    workdir: Path

    def agent_up(self) -> None:
        """Make sure the agent runs (a test that killed it may have failed before restarting)."""
        if self.agent.proc is None or self.agent.proc.poll() is not None:
            self.agent.start()


@pytest.fixture(scope="module", params=["asterisk", "freeswitch"])
def tier(request: pytest.FixtureRequest) -> Iterator[Tier]:
    with running_pbx(request.param) as (pbx, procs, ports, workdir):
        agent = Agent(workdir, pbx, procs, grace=GRACE,
                      policy=policy_yaml(increment=INCREMENT, rate=RATE,
                                         night_window=window_excluding_now(),
                                         max_concurrent=CAP))
        for account, amount in BALANCES.items():
            agent.topup(account, amount)
        agent.start()
        yield Tier(pbx, agent, procs, ports, workdir)


@pytest.fixture
def t(tier: Tier) -> Tier:
    tier.agent_up()
    return tier
