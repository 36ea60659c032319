"""ESL command builders produce the exact bytes the recorder sent to FreeSWITCH."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.pbx.esl import CommandError, commands
from agent.pbx.freeswitch import SUBSCRIBED_EVENTS, FreeswitchSettings
from agent.pbx.freeswitch_calls import subscription
from agent.sim.freeswitch import read_trace

TRACES = Path(__file__).parent / "fixtures" / "freeswitch"


def sent(name: str, conn: str = "inbound") -> list[bytes]:
    return [c.data for c in read_trace(TRACES / name) if c.conn == conn and c.direction == "SEND"]


def test_inbound_commands_match_trace_07() -> None:
    out = sent("07-api-responses-and-errors.esl.txt")
    selected = ["CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE", "CHANNEL_HANGUP",
                "CHANNEL_HANGUP_COMPLETE", "CHANNEL_PARK", "HEARTBEAT", "BACKGROUND_JOB"]
    assert commands.auth("ClueCon") == out[0]
    assert commands.events(selected) == out[1]
    assert commands.api("show channels as json") == out[2]
    assert commands.api("status") == out[3]
    assert commands.filter_add("Event-Name", "HEARTBEAT") in out
    assert commands.filter_delete("Event-Name", "HEARTBEAT") in out
    assert commands.filter_delete("all") in out
    assert commands.command("noevents") in out
    assert out[-1] == commands.command("exit")
    assert sent("07-api-responses-and-errors.esl.txt", "badauth") == [
        commands.auth("WrongPassword")]


def test_bgapi_and_sched_hangup_match_traces() -> None:
    uuid = "7d6deeb5-441f-4221-8f67-df87545348e1"
    assert commands.bgapi(f"uuid_kill {uuid} NORMAL_CLEARING") in sent(
        "04b-answered-bgapi-uuid_kill.esl.txt")
    assert commands.api("sched_hangup +3 d9b928d1-4479-44e2-b3bd-9b50a0c7735e "
                        "ALLOTTED_TIMEOUT") in sent(
        "05-answered-sched_hangup-allotted-timeout.esl.txt")
    # our own Job-UUID rides as a header, so the job is known before the reply
    assert commands.bgapi("status", "j-1") == b"bgapi status\nJob-UUID: j-1\n\n"


def test_outbound_socket_commands_match_traces_06() -> None:
    out_a = sent("06a-outbound-socket-reject.esl.txt", "outbound")
    assert out_a[0] == commands.command("connect")
    assert out_a[1] == commands.command("myevents")
    assert out_a[2] == commands.command("linger")
    assert out_a[3] == commands.sendmsg_execute("hangup", "CALL_REJECTED")
    out_b = sent("06b-outbound-socket-allow-resume.esl.txt", "outbound")
    assert out_b[2] == commands.sendmsg_execute("set", "callgate_result=ALLOW")
    assert out_b[3:] == [commands.command("resume"), commands.command("exit")]


def test_subscription_is_only_what_the_adapter_reads() -> None:
    assert set(SUBSCRIBED_EVENTS) == {"CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE", "HEARTBEAT",
                                      "BACKGROUND_JOB"}
    plain = subscription(FreeswitchSettings())
    assert plain[0] == commands.events(SUBSCRIBED_EVENTS)
    # only A-legs, plus the two events that are not about a channel
    assert plain[1:] == [commands.filter_add("Call-Direction", "inbound"),
                         commands.filter_add("Event-Name", "HEARTBEAT"),
                         commands.filter_add("Event-Name", "BACKGROUND_JOB")]
    # CHANNEL_CREATE only when a watch-only context is decided from it
    watch = subscription(FreeswitchSettings(watch_only_contexts=frozenset({"sales"})))
    assert watch[0] == commands.events((*SUBSCRIBED_EVENTS, "CHANNEL_CREATE"))


@pytest.mark.parametrize("bad", ["x\nexit", "x\r\n", "ok\n\napi status"])
def test_newlines_cannot_smuggle_a_second_command(bad: str) -> None:
    with pytest.raises(CommandError):
        commands.api(bad)
    with pytest.raises(CommandError):
        commands.sendmsg_execute("set", f"callgate_reason={bad}")
    with pytest.raises(CommandError):
        commands.bgapi(bad, "job")
    with pytest.raises(CommandError):
        commands.events(["x", "json"], fmt="xml")
