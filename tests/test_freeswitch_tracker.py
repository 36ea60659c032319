"""The pure FreeSWITCH translation: recorded channel events -> agent.calls events."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.calls import ActiveCall, CallAnswered, CallEnded, CallRequested, Direction
from agent.gate.decision import Decision, Reason
from agent.pbx.esl import ChannelData, EslEvent, EslParser
from agent.pbx.freeswitch import (
    GATE_REPLIES,
    CallTracker,
    FreeswitchSettings,
    call_info,
    gate_commands,
    parse_show_channels,
    usec_to_datetime,
)
from agent.sim.freeswitch import trace_stream

TRACES = Path(__file__).parent / "fixtures" / "freeswitch"
T0 = datetime(2026, 11, 24, 21, 56, tzinfo=UTC)


def frames(name: str, conn: str = "inbound") -> list[object]:
    parser = EslParser()
    parser.receive_data(trace_stream(TRACES / name, conn))
    return list(parser.events())


def replay(name: str, settings: FreeswitchSettings | None = None) -> list[object]:
    tracker = CallTracker(settings or FreeswitchSettings())
    out: list[object] = []
    for f in frames(name):
        if isinstance(f, EslEvent):
            out.extend(tracker.feed(f))
    return out


def us(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1_000_000, UTC)


def test_answered_call_caller_hangup_01b() -> None:
    events = replay("01b-outbound-answered-caller-hangup.selected-events.esl.txt")
    assert [type(e) for e in events] == [CallRequested, CallAnswered, CallEnded]
    req, ans, end = events
    a_leg = "e1b1b2d0-239f-4ad2-8910-d4b1cb52508f"
    assert isinstance(req, CallRequested) and req.call.call_id == a_leg
    assert req.call.accountcode == ""  # not set yet at CHANNEL_CREATE
    assert req.call.destination == "15550102"
    assert req.call.endpoint == "sofia/internal/sipp@127.0.0.1:5261"
    # the A-leg's answer, not the B-leg's 20 ms earlier
    assert isinstance(ans, CallAnswered) and ans.answered_at == us(1795557326342497)
    assert ans.call is not None and ans.call.accountcode == "acme"
    assert ans.call.direction is Direction.OUTBOUND
    assert isinstance(end, CallEnded)
    assert (end.call_id, end.cause, end.cause_code, end.billsec) == (
        a_leg, "NORMAL_CLEARING", 16, 5)
    assert end.answered_at == ans.answered_at and end.ended_at == us(1795557331362462)


def test_all_events_subscription_gives_the_same_calls_01() -> None:
    selected = replay("01b-outbound-answered-caller-hangup.selected-events.esl.txt")
    everything = replay("01-outbound-answered-caller-hangup.all-events.esl.txt")
    assert [type(e) for e in everything] == [type(e) for e in selected]
    assert isinstance(everything[-1], CallEnded) and everything[-1].billsec == 5


def test_callee_hangup_02_busy_03a_noanswer_03b() -> None:
    callee = replay("02-outbound-answered-callee-hangup.esl.txt")
    assert [type(e) for e in callee] == [CallRequested, CallAnswered, CallEnded]
    assert isinstance(callee[-1], CallEnded) and callee[-1].billsec == 3
    busy = replay("03a-outbound-busy.esl.txt")
    assert [type(e) for e in busy] == [CallRequested, CallEnded]
    assert isinstance(busy[-1], CallEnded)
    assert (busy[-1].cause, busy[-1].billsec, busy[-1].answered_at) == ("USER_BUSY", 0, None)
    noans = replay("03b-outbound-no-answer.esl.txt")
    assert [type(e) for e in noans] == [CallRequested, CallEnded]
    assert isinstance(noans[-1], CallEnded) and noans[-1].cause == "NORMAL_CLEARING"
    assert noans[-1].billsec == 0


@pytest.mark.parametrize(("name", "cause"), [
    ("04a-answered-api-uuid_kill.esl.txt", "NORMAL_CLEARING"),
    ("04b-answered-bgapi-uuid_kill.esl.txt", "NORMAL_CLEARING"),
    ("05-answered-sched_hangup-allotted-timeout.esl.txt", "ALLOTTED_TIMEOUT"),
    ("06a-outbound-socket-reject.inbound-events.esl.txt", "CALL_REJECTED"),
])
def test_end_causes(name: str, cause: str) -> None:
    ends = [e for e in replay(name) if isinstance(e, CallEnded)]
    assert len(ends) == 1 and ends[0].cause == cause


def test_gated_calls_see_the_gate_variable_06b() -> None:
    events = replay("06b-outbound-socket-allow-resume.inbound-events.esl.txt")
    ans = [e for e in events if isinstance(e, CallAnswered)]
    assert len(ans) == 1 and ans[0].call is not None
    assert ans[0].call.destination == "15550602"  # variable_callgate_dest wins over 8...


def test_inbound_and_local_calls_08() -> None:
    inbound = replay("08a-inbound-call-external-profile.esl.txt",
                     FreeswitchSettings(outbound_contexts=frozenset({"default"})))
    assert all(getattr(e, "call", None) is None or e.call.direction is Direction.INBOUND  # type: ignore[attr-defined]
               for e in inbound)
    local = replay("08b-local-4digit-call-internal-profile.esl.txt")
    end = next(e for e in local if isinstance(e, CallEnded))
    assert end.call is not None and end.call.direction is Direction.INBOUND  # no accountcode


def test_a_leg_answer_reported_once_even_with_bridge() -> None:
    tracker = CallTracker(FreeswitchSettings())
    evs = [f for f in frames("01b-outbound-answered-caller-hangup.selected-events.esl.txt")
           if isinstance(f, EslEvent)]
    bridge = next(e for e in evs if e.name == "CHANNEL_BRIDGE")
    assert [type(x) for x in tracker.feed(bridge)] == [CallAnswered]
    assert tracker.feed(bridge) == []
    tracker.reset()  # a reconnect ...
    listed = call_info(bridge.headers, FreeswitchSettings())
    tracker.mark_answered([ActiveCall(listed, answered_at=T0)])  # ... that listed it answered
    assert tracker.feed(bridge) == []
    tracker.reset()
    assert [type(x) for x in tracker.feed(bridge)] == [CallAnswered]


def test_show_channels_json_07() -> None:
    api = [f for f in frames("07-api-responses-and-errors.esl.txt")
           if type(f).__name__ == "ApiResponse"]
    assert parse_show_channels(api[0].body) == []  # {"row_count": 0}
    rows = parse_show_channels(api[3].body)  # type: ignore[attr-defined]
    assert [r["direction"] for r in rows] == ["inbound", "outbound"]
    assert rows[0]["accountcode"] == "acme"


def test_a_listing_needs_no_dump_for_what_the_events_told() -> None:
    """show channels (07) against the tracker: an answered call seen answering
    is taken from the event, a ringing one from its row, an unknown answered one
    is dumped, an ended one (the list lags) dropped; B-legs never count."""
    api = [f for f in frames("07-api-responses-and-errors.esl.txt")
           if type(f).__name__ == "ApiResponse"]
    rows = parse_show_channels(api[3].body)  # type: ignore[attr-defined]
    a_leg = rows[0]["uuid"]
    tracker = CallTracker(FreeswitchSettings())
    assert tracker.listing(rows).to_dump == [a_leg]  # answered (ACTIVE), answer not seen
    assert tracker.listing(rows).calls == []
    ringing = [{**rows[0], "callstate": "RINGING"}, rows[1]]
    (call,) = tracker.listing(ringing).calls
    assert (call.call.call_id, call.call.accountcode, call.answered_at) == (a_leg, "acme", None)
    assert call.call.destination == "15550777" and tracker.listing(ringing).to_dump == []
    seen = ActiveCall(call.call, answered_at=T0)
    tracker.mark_answered([seen])
    assert tracker.listing(rows).calls == [seen] and tracker.listing(rows).to_dump == []
    evs = [f for f in frames("01b-outbound-answered-caller-hangup.selected-events.esl.txt")
           if isinstance(f, EslEvent)]
    end = next(e for e in evs if e.name == "CHANNEL_HANGUP_COMPLETE"
               and e.headers["Call-Direction"] == "inbound")
    tracker.feed(end)
    gone = [{**rows[0], "uuid": end.headers["Unique-ID"]}]
    assert tracker.listing(gone).calls == [] and tracker.listing(gone).to_dump == []


def test_the_answer_event_is_kept_for_listings_until_the_hangup() -> None:
    tracker = CallTracker(FreeswitchSettings())
    evs = [f for f in frames("01b-outbound-answered-caller-hangup.selected-events.esl.txt")
           if isinstance(f, EslEvent)]
    answer = next(e for e in evs if e.name == "CHANNEL_ANSWER"
                  and e.headers["Call-Direction"] == "inbound")
    (ans,) = tracker.feed(answer)
    row = {"uuid": ans.call_id, "direction": "inbound", "callstate": "ACTIVE"}
    (listed,) = tracker.listing([row]).calls
    assert (listed.call, listed.answered_at) == (ans.call, ans.answered_at)
    for e in evs:
        tracker.feed(e)
    assert tracker.listing([row]).calls == []  # ended: the lagging list still shows it


def test_gate_reads_the_connect_reply_06a() -> None:
    data = next(f for f in frames("06a-outbound-socket-reject.esl.txt", "outbound")
            if isinstance(f, ChannelData))
    call = call_info(data.headers, FreeswitchSettings(), Direction.OUTBOUND)
    assert call.call_id == "50b19cc9-4a6f-4501-9baf-478d8196dbc6"
    assert (call.caller_id, call.destination, call.accountcode, call.context) == (
        "sipp", "15550601", "acme", "default")


def test_gate_commands() -> None:
    deny = Decision(False, Reason.OUTSIDE_HOURS, "closed")
    out = gate_commands(deny)
    assert out.count(b"\n\n") == GATE_REPLIES
    assert b"execute-app-arg: callgate_result=DENY\n" in out
    assert b"execute-app-arg: callgate_reason=outside_hours\n" in out
    assert b"execute-app-name: hangup\nexecute-app-arg: OUTGOING_CALL_BARRED\n" in out
    allow = gate_commands(Decision(True, Reason.ALLOWED, "ok", max_seconds=1380))
    assert b"callgate_max_seconds=1380\n" in allow and b"resume\n\n" in allow
    assert b"hangup" not in allow and allow.endswith(b"exit\n\n")


def test_usec_times() -> None:
    assert usec_to_datetime("0") is None and usec_to_datetime("") is None
    assert usec_to_datetime("1795557326342497") == datetime(2026, 11, 24, 21, 55, 26, 342497,
                                                             tzinfo=UTC)


HEADER_NAMES = ["Event-Name", "Call-Direction", "Unique-ID", "Caller-Channel-Answered-Time",
                "Caller-Channel-Hangup-Time", "Event-Date-Timestamp", "variable_billsec",
                "variable_hangup_cause_q850", "Hangup-Cause", "Caller-Context",
                "variable_accountcode", "Caller-Destination-Number", "variable_callgate_dest"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(HEADER_NAMES),
                       st.one_of(st.text(max_size=30), st.sampled_from(
                           ["inbound", "0", "99999999999999999999999", "²", "%", "%ZZ",
                            "CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
                            "CHANNEL_HANGUP_COMPLETE", "1795557326342497"]))))
def test_tracker_never_raises_on_odd_headers(headers: dict[str, str]) -> None:
    from agent.pbx.esl import EncodedHeaders, HeaderBlock

    block = "\n".join(f"{k}: {v}" for k, v in headers.items() if "\n" not in v)
    event = EslEvent(headers.get("Event-Name", "CHANNEL_ANSWER"),
                     EncodedHeaders(HeaderBlock(block)))
    tracker = CallTracker(FreeswitchSettings())
    for out in tracker.feed(event) + tracker.feed(event):
        assert isinstance(out, CallRequested | CallAnswered | CallEnded)


def test_uuid_dump_gives_the_live_call_07() -> None:
    """Reconciling reads uuid_dump (percent-encoded lines, like an event body)."""
    from agent.pbx.esl import ApiResponse, EncodedHeaders, HeaderBlock

    dump = next(f for f in frames("07-api-responses-and-errors.esl.txt")
                if isinstance(f, ApiResponse) and f.body.startswith(b"Event-Name: CHANNEL_DATA"))
    headers = EncodedHeaders(HeaderBlock(dump.text))
    call = call_info(headers, FreeswitchSettings(outbound_contexts=frozenset({"default"})))
    assert call.call_id == "d45069b2-278b-49e6-8f57-7d59594b6c52"
    assert (call.accountcode, call.destination, call.direction) == (
        "acme", "15550777", Direction.OUTBOUND)
    assert call.endpoint == "sofia/internal/sipp@127.0.0.1:5261"
    assert usec_to_datetime(headers.get("Caller-Channel-Answered-Time")) is not None


def test_an_event_without_a_timestamp_is_dated_by_the_injected_clock() -> None:
    """The tracker is pure: an end without its own times takes the adapter's clock,
    never the wall clock read inside it."""
    from agent.pbx.esl import EncodedHeaders, HeaderBlock

    block = "\n".join(["Event-Name: CHANNEL_HANGUP_COMPLETE", "Unique-ID: u-1",
                       "Call-Direction: inbound", "Hangup-Cause: NORMAL_CLEARING"])
    event = EslEvent("CHANNEL_HANGUP_COMPLETE", EncodedHeaders(HeaderBlock(block)))
    fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    ended = CallTracker(FreeswitchSettings(), clock=lambda: fixed).feed(event)
    assert [e.ended_at for e in ended if isinstance(e, CallEnded)] == [fixed]
