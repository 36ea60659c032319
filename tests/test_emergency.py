"""Emergency numbers: allowed first, whatever the balance, hour, caps or scope; never
charged, held or counted (gate, gatekeeper and meter)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.gate.decide import decide
from agent.gate.decision import Reason
from agent.gate.policy import load_policy
from agent.meter.meter import MeterSettings
from tests.gate_helpers import BASE, call, local, policy_from, rich
from tests.meter_harness import Harness, policy_text

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"
NIGHT = local("2026-11-24T23:00:00")


@pytest.mark.parametrize("number", ["110", "112", "119", "120", "122", "+86 110", "12-0"])
def test_the_shipped_policy_allows_china_emergency_numbers_at_night_with_no_money(number):
    policy = load_policy(SHIPPED)
    d = decide(policy, rich("-500"), call(number), NIGHT, explain=True)
    assert d.allow and d.reason is Reason.EMERGENCY
    assert d.tariff is None and d.paid_seconds is None
    assert d.max_seconds == 86400  # a limit the dialplans accept, not a money limit
    assert [c.rule for c in d.checks] == ["direction", "emergency"]


def test_emergency_beats_every_rule(tmp_path):
    text = BASE.replace("accounts:", """defaults:
  destinations: {allow: ["13"], deny: ["11"]}
  do_not_call: {numbers: ["110"]}
  callee_cap: {max_attempts: 1, period: day}
  rate_cap: {max_attempts: 1, period: 1h}
  closed_dates: [2026-11-24]
accounts:""").replace("max_concurrent_calls: 2", "max_concurrent_calls: 1\n    status: suspended")
    p = policy_from(tmp_path, text)
    state = rich(None, live_calls=5, callee_attempts=9, account_attempts=9, closed=True)
    assert decide(p, state, call("110"), NIGHT).reason is Reason.EMERGENCY
    # an unknown line may reach emergency services too
    assert decide(p, state, call("119", accountcode="nobody"), NIGHT).reason is \
        Reason.EMERGENCY
    assert not decide(p, state, call("13800138000"), NIGHT).allow


def test_the_emergency_list_is_policy(tmp_path):
    p = policy_from(tmp_path, BASE.replace("version: 1\n",
                                           "version: 1\nemergency_numbers: ['999']\n"))
    assert decide(p, rich("0"), call("999"), NIGHT).reason is Reason.EMERGENCY
    assert decide(p, rich("0"), call("110"), NIGHT).reason is not Reason.EMERGENCY


START = datetime(2026, 11, 24, 15, 0, tzinfo=UTC)  # 23:00 in Shanghai: outside the hours


@pytest.fixture
async def night(tmp_path):
    text = policy_text().replace('"00:00", end: "24:00"', '"08:00", end: "19:30"')
    harness = await Harness(tmp_path, START, text, MeterSettings(unseen_calls="cut")).start()
    yield harness
    await harness.stop()


async def test_the_gate_allows_without_reading_holding_or_counting(night):
    h = night
    decision, sim = await h.dial(talk=300, ring=2, destination="120")
    assert decision.allow and decision.reason is Reason.EMERGENCY and sim is not None
    await h.advance(400)
    assert sim.ended_at is not None and sim.billsec == 300 and sim.ended_by != "hangup"
    assert await h.ledger.get_call(sim.info.call_id) is None  # never admitted nor charged
    assert await h.ledger.attempts("a0", START.replace(year=2000)) == []  # never counted
    assert await h.ledger.balances() == []  # no posting of any kind


async def test_the_meter_never_cuts_an_emergency_call_routed_before_the_gate(night):
    h = night
    _, sim = await h.dial(talk=200, ring=1, destination="110", gated=False)
    await h.advance(300)
    assert sim is not None and sim.billsec == 200 and sim.ended_by != "hangup"
    assert await h.ledger.get_call(sim.info.call_id) is None
    # an ordinary unseen call is still cut at once (unseen_calls: cut)
    _, other = await h.dial(talk=200, ring=1, destination="13800138000", gated=False)
    await h.advance(300)
    assert other is not None and other.ended_by == "hangup"
