"""Fuzzing the gaps the per-protocol tests leave (issue 8, hostile input).

tests/test_ami_parser.py, test_agi_protocol.py and test_esl_parser.py already
fuzz framing: arbitrary bytes in random chunks give only the documented events,
and oversize header lines, messages and bodies are refused with bounded
buffering. What they do not reach, and this file does:

- FastAGI after the request: a reply stream of arbitrary bytes and reply-like
  lines gives only documented events with bounded buffering, and a ``520-``
  usage text that never ends is refused at :data:`MAX_USAGE` (it grew without
  bound before).
- The two call trackers, one step past the parsers: recorded AMI and ESL
  events whose field values are replaced by hostile ones (non-numbers where
  numbers go, Unicode digits, huge values, bad timestamps, missing fields)
  never raise; they give :mod:`agent.calls` events or nothing. A raising
  tracker would cost the adapter its PBX session on every such message.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.calls import CallAnswered, CallEnded, CallRequested
from agent.pbx import agi
from agent.pbx.ami import AmiParser, CallTracker, Message
from agent.pbx.esl import EslEvent, EslParser
from agent.pbx.freeswitch import CallTracker as FsCallTracker
from agent.pbx.freeswitch import FreeswitchSettings
from agent.sim.asterisk import read_trace
from agent.sim.freeswitch import trace_stream

FIXTURES = Path(__file__).parent / "fixtures"
T0 = datetime(2026, 11, 24, 21, 55, tzinfo=UTC)
CALL_EVENTS = (CallRequested, CallAnswered, CallEnded)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HOSTILE_VALUES = st.one_of(
    st.sampled_from(["", " ", "-1", "0", "abc", "1e309", "nan", "inf", "99999999999999999999",
                     "²", "١٢", "3.5", "2026-13-45 25:61:61", "9999-12-31 23:59:59",
                     "0000-00-00 00:00:00", "1795557311.26", "<unknown>", "(null)", "%",
                     "%ZZ", "%00", "%E4%B8", "+OK", "-ERR", "\x00", "a" * 5000,
                     "18446744073709551616", "-9223372036854775809", "00:00:-1", "1:2:3:4"]),
    st.text(max_size=30),
    st.integers(-(10**25), 10**25).map(str),
)


# -- FastAGI after the request ------------------------------------------------------

REPLY_PARTS = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.sampled_from([b"200 result=1\n", b"200 result=0 (x)\n", b"HANGUP\n", b"520-Invalid\n",
                     b"520 End of proper usage.\n", b"510 Invalid or unknown command\n",
                     b"\n", b"\r\n", b"200 result=", b"511 Command Not Permitted\n",
                     b"usage line\n" * 50, b"x" * 5000]),
)


def _connection() -> agi.FastAgiConnection:
    conn = agi.FastAgiConnection()
    conn.receive_data(b"agi_network: yes\nagi_uniqueid: 1795557361.39\n\n")
    assert isinstance(conn.next_event(), agi.AgiRequest)
    return conn


@FUZZ
@given(st.lists(REPLY_PARTS, max_size=40))
def test_agi_reply_stream_gives_documented_events_in_bounded_memory(parts: list[bytes]) -> None:
    conn = _connection()
    events: list[object] = []
    for part in [*parts, b""]:
        conn.receive_data(part)
        for event in conn.events():
            assert isinstance(event, agi.AgiReply | agi.AgiHangup | agi.ParseFailed
                              | agi.ConnectionClosed)
            events.append(event)
        assert len(conn._buf) - conn._pos <= agi.MAX_LINE + 5000 + 1
        assert conn._usage_size <= agi.MAX_USAGE
    assert isinstance(events[-1], agi.ParseFailed | agi.ConnectionClosed)
    assert sum(isinstance(e, agi.AgiRequest) for e in events) == 0


def test_agi_usage_text_that_never_ends_is_refused() -> None:
    conn = _connection()
    conn.receive_data(b"520-Invalid command syntax.  Proper usage follows:\n")
    refused = None
    for _ in range(1000):
        conn.receive_data(b"usage " * 16 + b"\n")
        for event in conn.events():
            refused = event
        if refused is not None:
            break
    assert isinstance(refused, agi.ParseFailed) and "usage" in refused.reason
    assert conn.state is agi.AgiState.CLOSED
    conn.receive_data(b"200 result=1\n")
    assert conn.next_event() is None  # closed: nothing more is read


def test_agi_usage_text_within_the_bound_is_one_reply() -> None:
    conn = _connection()
    usage = [f" usage line {i}" for i in range(100)]
    conn.receive_data(b"520-Invalid\n" + "\n".join(usage).encode() + b"\n520 End of usage.\n")
    (reply,) = list(conn.events())
    assert isinstance(reply, agi.AgiReply) and reply.code == 520 and list(reply.usage) == usage


# -- the AMI call tracker ---------------------------------------------------------------

def _ami_messages() -> dict[str, list[tuple[Message, datetime]]]:
    out = {}
    for path in sorted((FIXTURES / "asterisk").glob("*.ami.txt")):
        parser = AmiParser()
        timed = []
        for chunk in read_trace(path):
            if chunk.direction != "<<<":
                continue
            parser.receive_data(chunk.payload)
            at = T0 + timedelta(seconds=chunk.offset)
            timed += [(m, at) for m in parser.events() if isinstance(m, Message)]
        out[path.name] = timed
    return out


AMI = _ami_messages()


@FUZZ
@given(st.sampled_from(sorted(AMI)), st.data())
def test_ami_tracker_never_raises_on_hostile_field_values(name: str,
                                                          data: st.DataObject) -> None:
    tracker = CallTracker(cdr_wait=1.0)
    messages = AMI[name]
    mutate = data.draw(st.sets(st.integers(0, len(messages) - 1), max_size=8))
    at = T0
    for index, (msg, at) in enumerate(messages):
        if index in mutate:
            fields = list(msg.fields.items())
            if fields:
                key = data.draw(st.sampled_from([k for k, _ in fields]))
                if data.draw(st.booleans()):
                    fields = [(k, v) for k, v in fields if k != key]  # a field missing
                else:
                    value = data.draw(HOSTILE_VALUES).replace("\r", "").replace("\n", "")
                    fields = [(k, value if k == key else v) for k, v in fields]
            msg = Message.build(msg.kind.capitalize(), msg.name, fields)
        for event in [*tracker.feed(msg, at), *tracker.expire(at)]:
            assert isinstance(event, CALL_EVENTS), event
    for event in [*tracker.expire(at + timedelta(seconds=30)), *tracker.flush()]:
        assert isinstance(event, CALL_EVENTS), event


# -- the FreeSWITCH call tracker ----------------------------------------------------------

def _esl_events() -> dict[str, list[EslEvent]]:
    out = {}
    for path in sorted((FIXTURES / "freeswitch").glob("*.esl.txt")):
        parser = EslParser()
        try:
            parser.receive_data(trace_stream(path, "inbound"))
        except (KeyError, ValueError):
            continue  # an outbound-socket-only trace
        events = [f for f in parser.events() if isinstance(f, EslEvent)]
        if events:
            out[path.name] = events
    return out


ESL = _esl_events()


@FUZZ
@given(st.sampled_from(sorted(ESL)), st.data())
def test_freeswitch_tracker_never_raises_on_hostile_header_values(name: str,
                                                                  data: st.DataObject) -> None:
    tracker = FsCallTracker(FreeswitchSettings())
    events = ESL[name]
    mutate = data.draw(st.sets(st.integers(0, len(events) - 1), max_size=8))
    for index, event in enumerate(events):
        if index in mutate:
            headers = dict(event.headers)
            key = data.draw(st.sampled_from(sorted(headers)))
            if data.draw(st.booleans()):
                del headers[key]
            else:
                headers[key] = data.draw(HOSTILE_VALUES)
            event = EslEvent(headers.get("Event-Name", event.name), headers, event.body)
        for out in tracker.feed(event):
            assert isinstance(out, CALL_EVENTS), out
