"""The shipped dialplans on real PBXs: real SIP calls through real Asterisk (PJSIP) and
FreeSWITCH, gated and metered by the real ``callgate run``, every charge checked
against the PBX's own CDR file and every timing against sipp's own SIP trace.

Each test runs once per PBX (the module fixture boots each PBX once). The tariff is
compressed (INCREMENT seconds per increment) so the whole tier takes minutes."""

from __future__ import annotations

import math
import subprocess
import time
from decimal import Decimal

import pytest

from tests.realpbx.conftest import BALANCES, CAP, GRACE, INCREMENT, RATE, Tier
from tests.realpbx.harness import CallTrace, CdrRow, tariff_charge, wait_until

pytestmark = pytest.mark.realpbx

# FreeSWITCH's scheduler polls every 0.5 s and counts +N from the whole second
# (README, "While the call runs"): a PBX-side deadline may fire up to that late.
SCHEDULER_SLOP = 0.6


def _cdr(t: Tier, number: str, caller: CallTrace | None = None) -> CdrRow:
    """The PBX's own CDR row of the (single) call to ``number``."""
    return t.pbx.wait_cdr(lambda r: r.dst == number)


def _pbx_billsec(t: Tier, row: CdrRow) -> int:
    """How each PBX turns its own answer and end times into billsec (READMEs):
    Asterisk with cdr.conf ``initiatedseconds = yes`` rounds half up (cdr_custom
    has the exact times); FreeSWITCH 1.10.12 subtracts whole epoch seconds (its
    CDR has exactly those: ``answer_epoch``, ``end_epoch``)."""
    assert row.answer is not None
    if t.pbx.kind == "asterisk":
        return math.floor(row.end - row.answer + 0.5)
    return math.floor(row.end) - math.floor(row.answer)


def _decisions(t: Tier, account: str) -> list[dict[str, object]]:
    return [line for line in t.agent.lines()
            if line.get("event") == "gate.decision" and line.get("account") == account]


def test_refused_outside_hours_and_for_balance_never_reach_the_trunk(t: Tier) -> None:
    uas = t.pbx.trunk("answer", calls=1, timeout=30)
    night = t.pbx.call("13800138010", account="night")
    broke = t.pbx.call("13800138011", account="broke")
    night_trace, broke_trace = night.wait(), broke.wait()
    assert night_trace.status is not None and night_trace.status >= 400, night_trace
    assert broke_trace.status is not None and broke_trace.status >= 400, broke_trace
    assert [d["reason"] for d in _decisions(t, "night")] == ["outside_hours"]
    assert [d["reason"] for d in _decisions(t, "broke")] == ["insufficient_balance"]
    time.sleep(0.5)
    assert uas.invites() == 0, "a refused call reached the trunk"
    uas.stop()
    assert t.agent.charges("night") == {}


def test_metered_calls_are_charged_exactly_from_the_pbx_cdr(t: Tier) -> None:
    """Three concurrent calls of 1, 2 and 3 increments: each charge is
    ceil(billsec / increment) x rate with the PBX's own billsec, and the dialled
    number is in the PBX's own CDR (FreeSWITCH: despite the transfer to the check)."""
    holds = {"13800138021": 1.5, "13800138022": 4.2, "13800138023": 7.0}
    before = t.agent.balance("acme")["posted"]
    uas = t.pbx.trunk("answer", calls=len(holds))
    calls = {number: t.pbx.call(number, account="acme", hold=hold)
             for number, hold in holds.items()}
    traces = {number: c.wait() for number, c in calls.items()}
    total = Decimal(0)
    for number, trace in traces.items():
        assert trace.status == 200, (number, trace)
        assert trace.bye_from_pbx is False, "the caller hung up, not the PBX"
        row = _cdr(t, number)
        assert row.billsec > 0 and row.answer is not None, row
        assert row.dst == number  # FreeSWITCH: put back after the transfer to the check
        assert row.billsec == _pbx_billsec(t, row), ("billsec is not what we documented", row)
        charge = t.agent.wait_settled("acme", row.call_id)
        assert charge == tariff_charge(row.billsec, INCREMENT, RATE), (number, row, charge)
        assert t.agent.charge_count("acme", row.call_id) == 1
        total += charge
    assert uas.wait(30) == 0, uas.log_tail()
    assert before - t.agent.balance("acme")["posted"] == total


def test_cut_off_at_the_paid_boundary(t: Tier) -> None:
    """Account "cut" pays exactly two increments: the PBX ends the call (BYE to the
    caller) at answer + 2 increments, never later than the grace."""
    paid = 2 * INCREMENT
    assert Decimal(BALANCES["cut"]) == 2 * Decimal(RATE)
    uas = t.pbx.trunk("answer", calls=1)
    trace = t.pbx.call("13800138030", account="cut", hold=paid + 10).wait()
    assert trace.status == 200 and trace.bye_from_pbx, trace
    assert trace.talked is not None
    lateness = trace.talked - paid
    print(f"{t.pbx.name} cut-off: BYE {lateness * 1000:+.0f} ms from the paid boundary")
    assert -SCHEDULER_SLOP - 1.0 <= lateness <= GRACE, f"cut off {lateness:+.3f} s late"
    row = _cdr(t, "13800138030")
    assert t.agent.wait_settled("cut", row.call_id) == Decimal(BALANCES["cut"])
    assert t.agent.balance("cut")["available"] == 0
    uas.wait(30)


def test_gate_down_fails_closed_but_emergency_numbers_still_go_out(t: Tier) -> None:
    """No agent: an ordinary call is refused and never reaches the trunk; an emergency
    number from an account with no money reaches the trunk all the same, with no
    limit (it outlives the first increment)."""
    t.agent.kill()
    try:
        uas = t.pbx.trunk("answer", calls=1)
        refused = t.pbx.call("13800138040", account="acme").wait()
        assert refused.status is not None and refused.status >= 400, refused
        time.sleep(0.5)
        assert uas.invites() == 0, "the gate was down and the call went out"
        emergency = t.pbx.call("112", account="broke", hold=INCREMENT + 1.5).wait()
        assert emergency.status == 200, emergency
        assert emergency.bye_from_pbx is False, "the PBX limited an emergency call"
        assert uas.invites() == 1
        assert uas.wait(30) == 0
    finally:
        t.agent.start()


def test_emergency_call_with_the_agent_up_is_neither_cut_nor_charged(t: Tier) -> None:
    """The meter sees the emergency call on AMI/ESL (it never asked the gate): it must
    not take it for an unseen call to meter, cut at the first hold or charge."""
    before = t.agent.balance("broke")
    uas = t.pbx.trunk("answer", calls=1)
    trace = t.pbx.call("120", account="broke", hold=INCREMENT + 1.5).wait()
    assert trace.status == 200, trace
    assert trace.bye_from_pbx is False, f"the emergency call was cut after {trace.talked} s"
    assert uas.wait(30) == 0
    time.sleep(1.0)  # anything the meter would do, it did at the hang-up
    assert t.agent.charges("broke") == {}
    assert t.agent.balance("broke") == before


def test_agent_sigkilled_mid_call_pbx_ends_it_within_grace_restart_settles(t: Tier) -> None:
    uas = t.pbx.trunk("answer", calls=1)
    caller = t.pbx.call("13800138050", account="killed", hold=40)
    wait_until("the answer", caller.answered, 20)
    time.sleep(INCREMENT / 2)
    t.agent.kill()
    trace = caller.wait()
    assert trace.status == 200 and trace.bye_from_pbx, trace
    t.agent.start()
    row = _cdr(t, "13800138050")
    charge = t.agent.wait_settled("killed", row.call_id)
    assert t.agent.charge_count("killed", row.call_id) == 1
    paid = int(charge / Decimal(RATE)) * INCREMENT  # what the dead agent had reserved
    assert trace.talked is not None
    print(f"{t.pbx.name} after SIGKILL: BYE at answer + {trace.talked:.3f} s, paid {paid} s")
    assert trace.talked <= paid + GRACE + SCHEDULER_SLOP, "the PBX let unpaid talk through"
    assert trace.talked >= paid - 2, "ended long before what was paid"
    assert tariff_charge(row.billsec, INCREMENT, RATE) <= charge + Decimal(RATE)
    uas.wait(30)


def test_concurrency_cap(t: Tier) -> None:
    uas = t.pbx.trunk("answer", calls=CAP)
    callers = []
    for i in range(CAP):
        callers.append(t.pbx.call(f"1380013806{i}", account="capped", hold=4))
        wait_until("the answer", callers[-1].answered, 20)
    extra = t.pbx.call("13800138069", account="capped").wait()
    assert extra.status is not None and extra.status >= 400, extra
    assert "concurrency_limit" in [d["reason"] for d in _decisions(t, "capped")]
    for c in callers:
        assert c.wait().status == 200
    assert uas.invites() == CAP
    for i in range(CAP):
        row = _cdr(t, f"1380013806{i}")
        assert t.agent.wait_settled("capped", row.call_id) == tariff_charge(
            row.billsec, INCREMENT, RATE)


def _drop_control_link(t: Tier) -> None:
    if t.pbx.kind == "asterisk":
        sessions = t.pbx.ami_sessions()  # type: ignore[attr-defined]
        assert sessions, "no AMI session of callgate to kick"
        for _, fd in sessions:
            t.pbx.cli(f"manager kick session {fd}")  # type: ignore[attr-defined]
    else:
        # FreeSWITCH has no command that closes one ESL session: kill the agent's
        # connection at the PBX's end (the kernel resets it, as a dying link would).
        res = subprocess.run(["ss", "-K", "state", "established", "sport", "=",
                              f":{t.pbx.control_port}"], capture_output=True, text=True,
                             check=False)
        assert str(t.pbx.control_port) in res.stdout, f"ss -K killed nothing: {res}"


def test_control_link_dropped_mid_call_reconnects_and_charges_once(t: Tier) -> None:
    uas = t.pbx.trunk("answer", calls=1)
    caller = t.pbx.call("13800138070", account="dropped", hold=2 * INCREMENT + 1.5)
    wait_until("the answer", caller.answered, 20)
    time.sleep(1.0)
    connected = sum(1 for line in t.agent.lines()
                    if line.get("event") in ("ami.connected", "freeswitch.esl_connected"))
    _drop_control_link(t)
    wait_until("the agent to reconnect", lambda: sum(
        1 for line in t.agent.lines()
        if line.get("event") in ("ami.connected", "freeswitch.esl_connected"))
        > connected, 20)
    trace = caller.wait()
    assert trace.status == 200 and trace.bye_from_pbx is False, trace
    row = _cdr(t, "13800138070")
    charge = t.agent.wait_settled("dropped", row.call_id)
    assert t.agent.charge_count("dropped", row.call_id) == 1
    assert charge == tariff_charge(row.billsec, INCREMENT, RATE), (row, charge)
    uas.wait(30)


def test_busy_and_no_answer_are_free(t: Tier) -> None:
    before = t.agent.balance("spare")
    busy_uas = t.pbx.trunk("busy", calls=1)
    busy = t.pbx.call("13800138080", account="spare").wait()
    assert busy.status == 486, busy
    busy_uas.wait(30)
    ring_uas = t.pbx.trunk("noanswer", calls=1)
    unanswered = t.pbx.call("13800138081", account="spare").wait()
    assert unanswered.status is not None and unanswered.status >= 400, unanswered
    ring_uas.wait(30)
    for number in ("13800138080", "13800138081"):
        row = _cdr(t, number)  # both PBXs write a row, even with unanswered = no
        assert row.billsec == 0 and row.answer is None, row
    wait_until("holds released", lambda: t.agent.balance("spare")["held"] == 0, 15)
    assert t.agent.balance("spare") == before
    assert t.agent.charges("spare") == {}


def test_freeswitch_deletes_the_last_deadline_task_when_the_call_ends(t: Tier) -> None:
    """The agent's last ``sched_api`` deadline of a call that ended before it must be
    deleted with the call; left armed, it fires later at a channel that is gone
    (``uuid_kill`` answers ``-ERR No such channel!``)."""
    if t.pbx.kind != "freeswitch":
        pytest.skip("FreeSWITCH's sched_api tasks (Asterisk's deadline dies with the channel)")

    def agent_tasks() -> list[list[str]]:
        """``show tasks`` rows (id, desc, group, runtime, ...) of callgate's groups."""
        return [line.split(",") for line in t.pbx.api("show tasks").splitlines()  # type: ignore[attr-defined]
                if ",callgate_" in line]

    uas = t.pbx.trunk("answer", calls=1)
    caller = t.pbx.call("13800138090", account="spare2", hold=1.5)
    wait_until("the answer", caller.answered, 20)
    armed = wait_until("the agent's deadline task", agent_tasks, 1.4, every=0.05)
    assert caller.wait().status == 200
    ended = time.time()
    runtime = max(int(task[3]) for task in armed)
    assert runtime > ended + 1, "the task would already have fired: the check proves nothing"
    wait_until("the ended call's deadline task deleted", lambda: not agent_tasks(),
               runtime - time.time() - 0.5, every=0.05)
    uas.wait(30)


def test_every_dial_reaches_the_gate_which_refuses_what_is_not_a_number(t: Tier) -> None:
    """The shipped dialplans send every outbound dial to the gate (issue 16, item 10):
    a 3-digit non-emergency number and a ``+`` number are allowed and dialled as
    dialled; a 16-digit one (and a 1-digit one) is refused by callgate as
    ``invalid_number`` and never reaches the trunk. Nothing falls through to
    whatever else the PBX's dialplan does (the READMEs, "callgate_outbound" /
    "Every other dial")."""
    uas = t.pbx.trunk("answer", calls=2)
    allowed = ("114", "+8613800138100")
    for number in allowed:
        trace = t.pbx.call(number, account="spare3", hold=1.0).wait()
        assert trace.status == 200, (number, trace)
    for number in ("1380013810012345", "7", "operator"):
        trace = t.pbx.call(number, account="spare3").wait()
        assert trace.status is not None and trace.status >= 400, (number, trace)
    decisions = [(d["callee"], d["reason"]) for d in _decisions(t, "spare3")]
    refused = [("1380013810012345", "invalid_number"), ("7", "invalid_number")]
    # a name: FreeSWITCH's gate refuses it; Asterisk has no extension for it (404,
    # the gated pattern leaves letters to the special extensions h, i, s, t)
    refused += [("operator", "invalid_number")] if t.pbx.kind == "freeswitch" else []
    assert decisions == [("114", "allowed"), ("+8613800138100", "allowed"), *refused]
    assert uas.wait(30) == 0, uas.log_tail()
    dialled = [m.first_line.split()[1] for m in uas.messages()
               if not m.sent and m.first_line.startswith("INVITE")]
    assert [uri.split(":", 1)[1].split("@", 1)[0] for uri in dialled] == list(allowed)
    for number in allowed:
        row = _cdr(t, number)
        assert t.agent.wait_settled("spare3", row.call_id) == tariff_charge(
            row.billsec, INCREMENT, RATE)
