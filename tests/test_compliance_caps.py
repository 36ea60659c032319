"""caller_id_cap and cps_limit through the gatekeeper and a real ledger, at their boundaries.

Hypothesis draws attempts a few microseconds either side of each window's
edge — an hour before ``now`` (rolling), local midnight (calendar day, in the
account's timezone), a second before ``now`` (cps) — and a clock injected at
``now``; a reference model counts the attempts the rule must see (an attempt
exactly at the edge is inside the window), and the gate's decision must match
it. Refused attempts and other caller IDs are drawn too; they never count.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import eventloop
from agent.gate.decision import Reason
from agent.gatekeeper import Gatekeeper
from agent.ledger import open_ledger
from agent.meter.clock import SimClock
from tests.gate_helpers import BASE, SHANGHAI, call, policy_from

ALL_DAY = """  calling_hours: [{days: all, windows: [{start: "00:00", end: "24:00"}]}]
"""
OWN, OTHER = "02158880000", "02158880001"
US = timedelta(microseconds=1)


def _policy(tmp: Path, rules: str) -> Any:
    text = BASE.replace("accounts:", f"defaults:\n{ALL_DAY}{rules}accounts:") \
        .replace('caller_ids: ["02158880000"]', f'caller_ids: ["{OWN}", "{OTHER}"]') \
        .replace("max_concurrent_calls: 2", "max_concurrent_calls: 1000")
    return policy_from(tmp, text)


async def _gate_decides(rules: str, now: datetime,
                        attempts: list[tuple[datetime, str, bool]]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        policy = _policy(Path(tmp), rules)
        ledger = await open_ledger(f"sqlite://{tmp}/ledger.db")
        try:
            await ledger.topup("acme", Decimal("100"), ref="t", at=now - timedelta(days=3))
            for at, caller, allowed in attempts:
                await ledger.record_attempt("acme", "13900000000", at, allowed, "x", caller)
            gate = Gatekeeper(ledger=ledger, policy=lambda: policy, clock=SimClock(now),
                              node="n1", budget=5)
            return await gate(replace(call("13800138000", caller=OWN),
                                      call_id="probe"))
        finally:
            await ledger.close()


nows = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31),
                    timezones=st.just(UTC))
near = st.sampled_from([-2, -1, 0, 0, 1, 2]).map(lambda n: n * US)
callers = st.sampled_from([OWN, OWN, OWN, OTHER])


def _midnight(now: datetime) -> datetime:
    local = now.astimezone(SHANGHAI)
    return datetime.combine(local.date(), time(0), tzinfo=SHANGHAI).astimezone(UTC)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(now=nows, hour_slack=st.integers(0, 1), day_slack=st.integers(0, 1),
       hour_edge=st.lists(st.tuples(near, callers, st.booleans()), max_size=6),
       day_edge=st.lists(st.tuples(near, callers, st.booleans()), max_size=6),
       midnight_shift=st.integers(0, 3600))
def test_caller_id_cap_windows_match_the_model(now, hour_slack, day_slack, hour_edge, day_edge,
                                               midnight_shift):
    # Put `now` just after local midnight sometimes, so the two windows overlap both ways.
    now = max(now, _midnight(now) + timedelta(seconds=midnight_shift))
    attempts = [(now - timedelta(hours=1) + d, c, ok) for d, c, ok in hour_edge]
    attempts += [(_midnight(now) + d, c, ok) for d, c, ok in day_edge]
    attempts = [a for a in attempts if a[0] <= now]
    counted = [at for at, caller, ok in attempts if ok and caller == OWN]
    in_hour = sum(at >= now - timedelta(hours=1) for at in counted)
    in_day = sum(at >= _midnight(now) for at in counted)
    # Limits right at the model's counts (or one above): every example sits on a boundary.
    per_hour = max(1, in_hour + hour_slack)
    per_day = max(per_hour, in_day + day_slack)
    decision = eventloop.run(_gate_decides(
        f"  caller_id_cap: {{per_hour: {per_hour}, per_day: {per_day}}}\n", now, attempts))
    refused = in_hour >= per_hour or in_day >= per_day
    assert decision.allow is not refused, (in_hour, in_day, decision.message)
    if refused:
        assert decision.reason is Reason.CALLER_ID_CAP


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(now=nows, slack=st.integers(0, 1),
       edge=st.lists(st.tuples(near, st.booleans()), max_size=8),
       inside=st.integers(0, 3))
def test_cps_limit_window_matches_the_model(now, slack, edge, inside):
    attempts = [(now - timedelta(seconds=1) + d, OTHER, ok) for d, ok in edge]
    attempts += [(now - timedelta(milliseconds=10 * (i + 1)), OWN, True) for i in range(inside)]
    in_second = sum(ok and at >= now - timedelta(seconds=1) for at, _, ok in attempts)
    limit = max(1, in_second + slack)
    decision = eventloop.run(_gate_decides(f"  cps_limit: {limit}\n", now, attempts))
    assert decision.allow is (in_second < limit), (in_second, decision.message)
    if not decision.allow:
        assert decision.reason is Reason.CPS_LIMIT


def test_an_allowed_call_is_counted_for_its_normalised_caller_id(tmp_path):
    """The gate's own admissions feed the caps: the third call from one number is refused."""
    now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)

    async def go() -> list[Any]:
        policy = _policy(tmp_path, "  caller_id_cap: {per_hour: 2}\n")
        ledger = await open_ledger(f"sqlite://{tmp_path}/l.db")
        try:
            await ledger.topup("acme", Decimal("100"), ref="t", at=now - timedelta(days=1))
            gate = Gatekeeper(ledger=ledger, policy=lambda: policy, clock=SimClock(now),
                              node="n1", budget=5)
            out = []
            for i, caller in enumerate(["+86" + OWN, OWN, "0086" + OWN, OTHER]):
                out.append(await gate(replace(call(f"1380013800{i}", caller=caller),
                                              call_id=f"c{i}")))
            return out
        finally:
            await ledger.close()

    first, second, third, other = eventloop.run(go())
    assert first.allow and second.allow
    assert third.reason is Reason.CALLER_ID_CAP  # +86…, 0…, 0086… are one number
    assert other.allow
