"""The simulator runs the SHIPPED Asterisk dialplan as Asterisk 22 (PJSIP) does: a Dial
line of the past fails the simulated call exactly as the real PBX failed it
(tests/fixtures/asterisk22/, recorded by tests/realpbx/record_traces.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.sim.asterisk import read_trace
from agent.sim.asterisk_dialplan import (
    SHIPPED_EXTENSIONS,
    ShippedDialplan,
    pattern_regex,
    strip_comment,
)
from tests.test_asterisk_gate import ALLOW, Gate, adapter_with_sim

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk22"
OLD_SIP = "Dial(SIP/${CALLGATE_TRUNK}/${EXTEN},${CALLGATE_RING_SECONDS})"
OLD_PJSIP = "Dial(PJSIP/${CALLGATE_TRUNK}/${EXTEN},${CALLGATE_RING_SECONDS})"


def shipped_with(tmp_path: Path, dial: str) -> ShippedDialplan:
    """The shipped extensions.conf with its gated Dial line replaced by ``dial``."""
    text = SHIPPED_EXTENSIONS.read_text()
    lines = text.splitlines()
    gated = next(i for i, line in enumerate(lines)
                 if "Dial(" in line and "TIMEOUT" in lines[i - 1])
    lines[gated] = f" same => n,{dial}"
    path = tmp_path / "extensions.conf"
    path.write_text("\n".join(lines) + "\n")
    return ShippedDialplan.load(path)


def recorded(name: str, event: bytes, field: bytes) -> str:
    """A field of the first ``event`` in a recorded real-Asterisk-22 AMI trace."""
    for chunk in read_trace(FIXTURES / f"{name}.ami.txt"):
        if chunk.direction == "<<<" and chunk.payload.startswith(b"Event: " + event + b"\r\n"):
            for line in chunk.payload.split(b"\r\n"):
                if line.startswith(field + b": "):
                    return line.split(b": ", 1)[1].decode()
    raise AssertionError(f"no {event!r} {field!r} in {name}")


def test_the_shipped_dial_line_dials_pjsip_number_at_endpoint() -> None:
    """Fails if the shipped extensions.conf goes back to a SIP/ (or any broken) Dial line."""
    plan = ShippedDialplan.load()
    result = plan.dial("13800138000")
    assert result.ok, result.log
    assert result.dial_data.startswith("PJSIP/13800138000@")
    # the real Asterisk 22's DialBegin for the same line (trace 21)
    assert result.dial_string == recorded("21-pjsip-answered-caller-hangup", b"DialBegin",
                                          b"DialString")


@pytest.mark.parametrize(("dial", "trace", "cause", "status"), [
    (OLD_SIP, "26-dial-sip-no-channel-type", 66, 503),
    (OLD_PJSIP, "27-dial-pjsip-endpoint-slash-number", 3, 404),
])
def test_dial_lines_of_the_past_fail_as_on_the_real_asterisk_22(
        tmp_path: Path, dial: str, trace: str, cause: int, status: int) -> None:
    result = shipped_with(tmp_path, dial).dial("13800138000")
    assert not result.ok
    assert (result.cause, result.sip_status) == (cause, status)
    assert str(result.cause) == recorded(trace, b"Hangup", b"Cause")
    # the same log line the real PBX wrote (the messages.log extract beside the trace)
    logged = (FIXTURES / f"{trace}.messages.log").read_text()
    assert result.log.split(": ", 1)[1] in logged


async def test_the_simulator_fails_an_allowed_call_on_an_old_sip_dial_line(
        tmp_path: Path) -> None:
    async with asyncio.timeout(10), adapter_with_sim(Gate(ALLOW)) as (_, sim, _):
        sim.dialplan = shipped_with(tmp_path, OLD_SIP)
        result = await (await sim.place_call(talk_seconds=1)).ended()
        assert (result.ended_by, result.cause, result.answered_at) == ("dial_failed", 66, None)
        assert result.variables["CALLGATE_RESULT"] == "ALLOW"  # the gate allowed it
        assert "No channel type registered for 'SIP'" in sim.failed_dials[0].log
        sim.dialplan = ShippedDialplan.load()
        ok = await (await sim.place_call(talk_seconds=0.2)).ended()
        assert ok.answered_at is not None


async def test_emergency_numbers_bypass_the_gate_in_the_simulated_dialplan() -> None:
    refuse_all = Gate(ALLOW.__class__(False, ALLOW.reason.__class__("insufficient_balance"),
                                      "no money"))
    async with asyncio.timeout(10), adapter_with_sim(refuse_all) as (_, sim, _):
        assert sim.dialplan.emergency == {"110", "112", "119", "120", "122"}
        result = await (await sim.place_call(destination="112", talk_seconds=0.3)).ended()
    assert result.answered_at is not None
    assert refuse_all.calls == [], "the emergency call asked the gate"
    assert result.agi_status == ""


def test_a_semicolon_starts_a_comment_in_a_dialplan_value() -> None:
    assert strip_comment("CALLGATE_TRUNK = carrier ; the trunk") == "CALLGATE_TRUNK = carrier"
    assert strip_comment(r"Set(X=a\;b)") == "Set(X=a;b)"


@pytest.mark.parametrize("number", ["114", "+8613800138000", "13800138000", "7",
                                    "1380013810012345", "*97"])
def test_every_dial_but_a_name_asks_the_gate_in_the_shipped_dialplan(number: str) -> None:
    """Issue 16: a 3-digit or ``+`` number, a 1- or 16-digit one reach the gate (which
    refuses what is not a number); ``_X.`` missed ``+`` numbers and 1-digit dials."""
    assert ShippedDialplan.load().route(number) == "gate"


def test_exact_emergency_extensions_win_and_names_match_nothing() -> None:
    plan = ShippedDialplan.load()
    assert {plan.route(n) for n in ("110", "112", "119", "120", "122")} == {"emergency"}
    # the special extensions must never run the gate (h runs at every hang-up)
    for name in ("h", "i", "s", "t", "operator", ""):
        assert plan.route(name) is None, name


@pytest.mark.parametrize(("pattern", "yes", "no"), [
    ("_X.", ["12", "1+"], ["1", "+1"]),
    ("_NXX-XXXX", ["2001234"], ["1001234", "200123"]),
    ("_[+0-9*#]!", ["+", "7", "+861", "*97"], ["", "h", "a1"]),
    ("110", ["110"], ["1100", "_110"]),
])
def test_asterisk_patterns(pattern: str, yes: list[str], no: list[str]) -> None:
    regex = pattern_regex(pattern)
    assert all(regex.fullmatch(n) for n in yes)
    assert not any(regex.fullmatch(n) for n in no)


async def test_the_simulator_will_not_place_a_call_the_dialplan_cannot_route() -> None:
    async with asyncio.timeout(10), adapter_with_sim(Gate(ALLOW)) as (_, sim, _):
        with pytest.raises(ValueError, match="no extension"):
            await sim.place_call(destination="operator")
        plus = await (await sim.place_call(destination="+8613800138000",
                                           talk_seconds=0.2)).ended()
        assert plus.answered_at is not None
