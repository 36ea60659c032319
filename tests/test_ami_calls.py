"""AMI events to normalized calls, replayed from the recorded Asterisk 20 traces.

Each message is fed with the time it was recorded (the trace offsets), so
timestamp-based figures are checked against what really happened.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.calls import CallAnswered, CallEnded, CallEvent, CallRequested, Direction
from agent.pbx.ami import AmiParser, CallTracker, Message, cause_name, parse_duration
from agent.sim.asterisk import read_trace

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk"
T0 = datetime(2026, 11, 24, 21, 55, tzinfo=UTC)


def timed_messages(name: str) -> list[tuple[Message, datetime]]:
    """The first connection's messages with their recorded receive times."""
    out = []
    parser = AmiParser()
    for chunk in read_trace(FIXTURES / name):
        if chunk.direction != "<<<":
            continue
        parser.receive_data(chunk.payload)
        at = T0 + timedelta(seconds=chunk.offset)
        out += [(m, at) for m in parser.events() if isinstance(m, Message)]
    return out


def replay(
    name: str, tracker: CallTracker | None = None, drop: str = ""
) -> tuple[list[CallEvent], CallTracker]:
    tracker = tracker or CallTracker(cdr_wait=2.0)
    out: list[CallEvent] = []
    last = T0
    for msg, at in timed_messages(name):
        if msg.name == drop:
            continue
        out += tracker.feed(msg, at)
        out += tracker.expire(at)
        last = at
    out += tracker.expire(last + timedelta(seconds=10))
    return out, tracker


# name -> (call id, destination, direction, accountcode, answered?, billsec, cause, code)
EXPECTED = {
    "01-outbound-answered-caller-hangup.ami.txt":
        ("1795557311.26", "1001", "outbound", "acme", True, 5, "NORMAL_CLEARING", 16),
    "02-outbound-answered-callee-hangup.ami.txt":
        ("1795557320.28", "2001", "outbound", "acme", True, 3, "NORMAL_CLEARING", 16),
    "03-outbound-busy.ami.txt":
        ("1795557327.30", "3001", "outbound", "acme", False, 0, "USER_BUSY", 17),
    "03b-outbound-no-answer.ami.txt":
        ("1795557331.32", "4001", "outbound", "acme", False, 0, "NORMAL_CLEARING", 16),
    "04-outbound-ami-hangup.ami.txt":
        ("1795557343.34", "1004", "outbound", "acme", True, 2, "NORMAL_CLEARING", 16),
    "05-outbound-absolutetimeout.ami.txt":
        ("1795557349.36", "1005", "outbound", "acme", True, 4, "NORMAL_CLEARING", 16),
    "06-fastagi-deny.ami.txt":
        ("1795557357.38", "1006", "outbound", "acme", False, 0, "CALL_REJECTED", 21),
    "06b-fastagi-allow.ami.txt":
        ("1795557361.39", "1016", "outbound", "acme", True, 4, "NORMAL_CLEARING", 16),
    "06c-fastagi-no-listener.ami.txt":
        ("1795557368.41", "1026", "outbound", "acme", True, 4, "NORMAL_CLEARING", 16),
    "06d-fastagi-deny-hangup-cmd.ami.txt":
        ("1795557376.43", "1036", "outbound", "acme", False, 0, "UNKNOWN", 0),
    "07-ami-actions-live-call.ami.txt":
        ("1795557390.44", "1007", "outbound", "acme", True, 12, "NORMAL_CLEARING", 16),
    "08-inbound-from-trunk.ami.txt":
        ("1795557410.46", "5551234", "inbound", "", True, 4, "NORMAL_CLEARING", 16),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trace_gives_one_call_with_the_pbx_figures(name: str) -> None:
    call_id, dest, direction, account, answered, billsec, cause, code = EXPECTED[name]
    events, tracker = replay(name)
    kinds = [type(e) for e in events]
    assert kinds == ([CallRequested, CallAnswered, CallEnded] if answered
                     else [CallRequested, CallEnded])  # fmt: skip
    requested, ended = events[0], events[-1]
    assert isinstance(requested, CallRequested) and isinstance(ended, CallEnded)
    info = requested.call
    assert (info.call_id, info.destination, info.direction.value, info.accountcode) == (
        call_id, dest, direction, account)  # fmt: skip
    assert (ended.call_id, ended.billsec, ended.cause, ended.cause_code) == (
        call_id, billsec, cause, code)  # fmt: skip
    assert ended.call is not None and ended.call.accountcode == account
    if answered:
        assert isinstance(events[1], CallAnswered)
        assert ended.answered_at == events[1].answered_at
    assert tracker.live_calls() == []


PARTY_ENDED = {"01-outbound-answered-caller-hangup.ami.txt",
               "02-outbound-answered-callee-hangup.ami.txt", "06b-fastagi-allow.ami.txt",
               "06c-fastagi-no-listener.ami.txt", "07-ami-actions-live-call.ami.txt",
               "08-inbound-from-trunk.ami.txt"}  # fmt: skip
PBX_ENDED = {"04-outbound-ami-hangup.ami.txt", "05-outbound-absolutetimeout.ami.txt"}
UNANSWERED = {name for name, expected in EXPECTED.items() if not expected[4]}


@pytest.mark.parametrize("name", sorted(PARTY_ENDED | PBX_ENDED | UNANSWERED))
def test_who_ended_an_answered_call_is_told_by_its_hangup_request(name: str) -> None:
    """A BYE raises HangupRequest on the party's channel (caller in 01, callee in 02);
    an AMI Hangup (04) and an AbsoluteTimeout (05) raise only SoftHangupRequest.
    Alone, 04 and 05 never show a HangupRequest, so the tracker cannot tell their
    silence from a filter that drops them; after a party's hang-up it can. Nobody
    is said to have ended an unanswered call (busy, no answer, refused: 03, 03b,
    06, 06d raise no HangupRequest either)."""
    expected = None if name in UNANSWERED else name in PARTY_ENDED
    events, _ = replay(name)
    assert events[-1].by_party is (True if expected else None)
    _, tracker = replay("01-outbound-answered-caller-hangup.ami.txt")
    events, _ = replay(name, tracker)
    assert events[-1].by_party is expected


def test_a_new_session_and_an_adopted_call_must_show_their_hangup_requests_again() -> None:
    """After a reconnect the filter may differ, and an adopted call's HangupRequest
    may have come while the link was down: neither is taken on trust."""
    messages = [m for m, _ in timed_messages("07-ami-actions-live-call.ami.txt")]
    items = [m for m in messages if m.name == "CoreShowChannel"]
    now = datetime(2026, 11, 24, 21, 56, 31, tzinfo=UTC)
    _, tracker = replay("01-outbound-answered-caller-hangup.ami.txt")
    assert tracker.sees_hangup_requests
    tracker.adopt(items, {"1795557390.44": now}, now)
    assert not tracker.sees_hangup_requests
    events, _ = replay("02-outbound-answered-callee-hangup.ami.txt", tracker)
    assert events[-1].by_party is True and tracker.sees_hangup_requests
    ends = [e for m in messages if m.name != "HangupRequest"
            for e in tracker.feed(m, now) if isinstance(e, CallEnded)]
    assert [(e.call_id, e.by_party) for e in ends] == [("1795557390.44", None)]


def test_without_hangup_requests_nobody_is_said_to_have_ended_a_call() -> None:
    """An eventfilter that drops HangupRequest: no end says who ended it."""
    _, tracker = replay("01-outbound-answered-caller-hangup.ami.txt", drop="HangupRequest")
    for name in sorted(PARTY_ENDED | PBX_ENDED):
        events, _ = replay(name, tracker, drop="HangupRequest")
        assert events[-1].by_party is None, name


def test_callee_leg_never_becomes_a_call() -> None:
    events, _ = replay("01-outbound-answered-caller-hangup.ami.txt")
    assert {e.call_id for e in events if isinstance(e, CallAnswered | CallEnded)} == {
        "1795557311.26"}  # fmt: skip


def test_gated_peer_is_requested_at_newchannel_with_name_and_channel() -> None:
    events, _ = replay("06-fastagi-deny.ami.txt")
    first = events[0]
    assert isinstance(first, CallRequested)
    assert first.call.caller_id == "2001" and first.call.caller_name == "Alice"
    assert first.call.endpoint == "SIP/internal-00000026"
    assert first.call.context == "from-internal"
    newchannel_at = next(at for m, at in timed_messages("06-fastagi-deny.ami.txt")
                         if m.name == "Newchannel")  # fmt: skip
    assert first.at == newchannel_at


def test_answer_is_the_dialend_answer_time() -> None:
    name = "01-outbound-answered-caller-hangup.ami.txt"
    events, _ = replay(name)
    dialend_at = next(at for m, at in timed_messages(name)
                      if m.name == "DialEnd" and m.get("DialStatus") == "ANSWER")  # fmt: skip
    assert events[1] == CallAnswered("1795557311.26", dialend_at, events[1].call)  # type: ignore[union-attr]


def test_cdr_after_hangup_holds_the_end_until_it_arrives() -> None:
    # Trace 05: the Cdr comes after both Hangups.
    tracker = CallTracker(cdr_wait=2.0)
    seen: list[tuple[str, list[CallEvent]]] = []
    for msg, at in timed_messages("05-outbound-absolutetimeout.ami.txt"):
        seen.append((msg.name, list(tracker.feed(msg, at))))
    ending = [(name, evs) for name, evs in seen if any(isinstance(e, CallEnded) for e in evs)]
    assert [name for name, _ in ending] == ["Cdr"]
    hangup_events = [evs for name, evs in seen if name == "Hangup"]
    assert hangup_events == [[], []]


def test_cdr_before_hangup_ends_the_call_at_the_hangup() -> None:
    # Trace 04: the Cdr comes before both Hangups.
    tracker = CallTracker(cdr_wait=2.0)
    for msg, at in timed_messages("04-outbound-ami-hangup.ami.txt"):
        events = tracker.feed(msg, at)
        if any(isinstance(e, CallEnded) for e in events):
            assert msg.name == "Hangup"
            break
    else:
        pytest.fail("no CallEnded")


def test_without_cdr_billsec_is_rounded_up_from_the_times() -> None:
    name = "01-outbound-answered-caller-hangup.ami.txt"
    events, _ = replay(name, drop="Cdr")
    answered, ended = events[1], events[2]
    assert isinstance(answered, CallAnswered) and isinstance(ended, CallEnded)
    talk = (ended.ended_at - answered.answered_at).total_seconds()
    assert ended.billsec == math.ceil(talk)
    assert ended.billsec == 6  # 5.03 s of talk is six started seconds; Asterisk truncates to 5


def test_without_cdr_the_end_waits_cdr_wait_and_no_longer() -> None:
    tracker = CallTracker(cdr_wait=2.0)
    hangup_at = None
    for msg, at in timed_messages("01-outbound-answered-caller-hangup.ami.txt"):
        if msg.name == "Cdr":
            continue
        tracker.feed(msg, at)
        if msg.name == "Hangup" and msg.get("Uniqueid") == "1795557311.26":
            hangup_at = at
    assert hangup_at is not None
    assert tracker.next_expiry() == hangup_at + timedelta(seconds=2)
    assert tracker.expire(hangup_at + timedelta(seconds=1.999)) == []
    (ended,) = tracker.expire(hangup_at + timedelta(seconds=2))
    assert isinstance(ended, CallEnded) and ended.billsec == 6
    assert tracker.next_expiry() is None


def test_busy_gives_two_cdrs_and_one_end() -> None:
    events, _ = replay("03-outbound-busy.ami.txt")
    assert sum(isinstance(e, CallEnded) for e in events) == 1


def test_timestamp_header_is_the_answer_time() -> None:
    tracker = CallTracker()
    base = timed_messages("01-outbound-answered-caller-hangup.ami.txt")
    got: list[CallEvent] = []
    for msg, at in base:
        if msg.name == "DialEnd":
            lines = msg.text.split("\r\n")
            lines.insert(2, "Timestamp: 1795557311.650000")
            msg = Message("\r\n".join(lines))
        got += tracker.feed(msg, at)
    answered = next(e for e in got if isinstance(e, CallAnswered))
    assert answered.answered_at == datetime.fromtimestamp(1795557311.65, UTC)


def test_outbound_contexts_decide_direction() -> None:
    tracker = CallTracker(outbound_contexts={"from-internal-noagi"})
    events, _ = replay("08-inbound-from-trunk.ami.txt", tracker)
    assert events[0].call.direction is Direction.INBOUND  # type: ignore[union-attr]
    tracker = CallTracker(outbound_contexts={"from-internal-noagi"})
    events, _ = replay("01-outbound-answered-caller-hangup.ami.txt", tracker)
    first = events[0]
    assert isinstance(first, CallRequested)
    # Held back until the dialplan set the accountcode (NewAccountCode), then outbound.
    assert first.call.direction is Direction.OUTBOUND and first.call.accountcode == "acme"


def test_watch_only_context_is_outbound_and_requested_with_its_account() -> None:
    tracker = CallTracker(watch_only_contexts={"from-internal-noagi"})
    events, _ = replay("01-outbound-answered-caller-hangup.ami.txt", tracker)
    first = events[0]
    assert isinstance(first, CallRequested)
    assert (first.call.direction, first.call.accountcode) == (Direction.OUTBOUND, "acme")


def test_adopt_from_core_show_channels_of_trace_07() -> None:
    messages = [m for m, _ in timed_messages("07-ami-actions-live-call.ami.txt")]
    items = [m for m in messages if m.name == "CoreShowChannel"]
    assert len(items) == 2
    now = datetime(2026, 11, 24, 21, 56, 31, tzinfo=UTC)
    answered = datetime(2026, 11, 24, 21, 56, 30, tzinfo=UTC)
    tracker = CallTracker()
    (active,) = tracker.adopt(items, {"1795557390.44": answered}, now)
    assert active.call.call_id == "1795557390.44"
    assert active.call.endpoint == "SIP/internal-noagi-0000002c"
    assert active.call.accountcode == "acme" and active.call.direction is Direction.OUTBOUND
    assert active.answered_at == answered and active.created_at == now
    assert tracker.channel_of("1795557390.44") == "SIP/internal-noagi-0000002c"
    # The rest of the trace then ends the adopted call with its Cdr figure.
    ends = [e for m in messages for e in tracker.feed(m, now) if isinstance(e, CallEnded)]
    assert [(e.call_id, e.billsec) for e in ends] == [("1795557390.44", 12)]


def test_helpers() -> None:
    assert cause_name(16, "Normal Clearing") == "NORMAL_CLEARING"
    assert cause_name(21, "") == "CALL_REJECTED"
    assert cause_name(99, "") == "UNKNOWN"
    assert parse_duration("01:02:03") == timedelta(hours=1, minutes=2, seconds=3)
    assert parse_duration("garbage") == timedelta(0)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(EXPECTED)), st.lists(st.integers(1, 900), min_size=1, max_size=300))
def test_any_chunking_gives_the_same_calls(name: str, sizes: list[int]) -> None:
    stream = b"".join(c.payload for c in read_trace(FIXTURES / name) if c.direction == "<<<")
    parser = AmiParser()
    tracker = CallTracker(cdr_wait=0)
    out: list[CallEvent] = []
    pos = 0
    for size in [*sizes, len(stream)]:
        parser.receive_data(stream[pos : pos + size] or None)
        pos += size
        for m in parser.events():
            if isinstance(m, Message):
                out += tracker.feed(m, T0)
        if pos >= len(stream):
            break
    out += tracker.expire(T0)
    reference, _ = replay(name)
    assert [type(e) for e in out] == [type(e) for e in reference]
    assert [getattr(e, "billsec", None) for e in out] == [
        getattr(e, "billsec", None) for e in reference]  # fmt: skip


def test_rename_moves_commands_to_the_new_channel_name() -> None:
    tracker = CallTracker()
    messages = timed_messages("01-outbound-answered-caller-hangup.ami.txt")
    for msg, at in messages:
        if msg.name == "BridgeEnter":
            break
        tracker.feed(msg, at)
    assert tracker.channel_of("1795557311.26") == "SIP/internal-noagi-0000001a"
    rename = Message.build("Event", "Rename", [
        ("Privilege", "call,all"), ("Channel", "SIP/internal-noagi-0000001a"),
        ("Uniqueid", "1795557311.26"), ("Linkedid", "1795557311.26"),
        ("Newname", "SIP/internal-noagi-0000001a<MASQ>"),
    ])  # fmt: skip
    assert tracker.feed(rename, T0) == ()
    assert tracker.channel_of("1795557311.26") == "SIP/internal-noagi-0000001a<MASQ>"
