"""AMI framing on the recorded Asterisk 20 bytes: any chunking, fuzzing, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.pbx.ami import (
    MAX_LINE,
    MAX_MESSAGE,
    ActionError,
    AmiParser,
    Banner,
    ConnectionClosed,
    Message,
    ParseFailed,
    format_action,
)
from agent.sim.asterisk import TraceChunk, read_trace

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk"
AMI_TRACES = sorted(FIXTURES.glob("*.ami.txt"))


def connections(path: Path) -> list[list[TraceChunk]]:
    """A trace split per TCP connection (07b holds two)."""
    conns: list[list[TraceChunk]] = []
    for chunk in read_trace(path):
        if chunk.direction == "---" and b"TCP connected" in chunk.payload:
            conns.append([])
        elif conns:
            conns[-1].append(chunk)
    return conns


def received(conn: list[TraceChunk]) -> list[bytes]:
    return [c.payload for c in conn if c.direction == "<<<"]


def parse(stream: bytes, sizes: list[int] | None = None) -> list[object]:
    parser = AmiParser()
    out: list[object] = []
    pos = 0
    for size in sizes or [len(stream) or 1]:
        parser.receive_data(stream[pos : pos + size])
        pos += size
        out.extend(parser.events())
    if pos < len(stream):
        parser.receive_data(stream[pos:])
        out.extend(parser.events())
    parser.receive_data(b"")
    out.extend(parser.events())
    return out


ALL_CONNECTIONS = [
    pytest.param(conn, id=f"{path.name}#{i}")
    for path in AMI_TRACES
    for i, conn in enumerate(connections(path))
]


@pytest.mark.parametrize("conn", ALL_CONNECTIONS)
def test_every_recorded_message_is_framed_byte_exact(conn: list[TraceChunk]) -> None:
    chunks = received(conn)
    events = parse(b"".join(chunks))
    # The recorder split the stream one message per chunk (README "File format").
    assert events[0] == Banner("9.0.0")
    assert chunks[0] == b"Asterisk Call Manager/9.0.0\r\n"
    messages = events[1:-1]
    assert all(isinstance(m, Message) for m in messages)
    assert [m.to_bytes() for m in messages if isinstance(m, Message)] == chunks[1:]
    assert events[-1] == ConnectionClosed(unparsed=0)


@pytest.mark.parametrize("conn", ALL_CONNECTIONS[:3] + ALL_CONNECTIONS[-3:])
def test_one_byte_at_a_time_gives_the_same_messages(conn: list[TraceChunk]) -> None:
    stream = b"".join(received(conn))
    assert parse(stream, [1] * len(stream)) == parse(stream)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_chunking_gives_the_same_messages(data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(AMI_TRACES))
    stream = b"".join(received(connections(path)[0]))
    sizes = data.draw(st.lists(st.integers(1, 700), min_size=1, max_size=400))
    assert parse(stream, sizes) == parse(stream)


def test_headers_values_and_repeated_variables_from_trace_07() -> None:
    conn = connections(FIXTURES / "07-ami-actions-live-call.ami.txt")[0]
    messages = [m for m in parse(b"".join(received(conn))) if isinstance(m, Message)]
    status = next(m for m in messages if m.name == "Status" and "Variable" in m)
    assert status.getall("Variable") == ["CALLGATE_RESULT=(null)", "DIALSTATUS=ANSWER"]
    assert status.get("Privilege") == "Call"
    assert status.action_id == "lab-008"
    missing = next(m for m in messages if m.get("Variable") == "NO_SUCH_VARIABLE")
    assert missing.kind == "response" and missing.name == "Success"
    assert missing.get("Value", "absent") == ""  # "Value: " present, empty
    bad = next(m for m in messages if m.action_id == "lab-014")
    assert (bad.name, bad.get("Message")) == ("Error", "No such channel")
    hangup = next(m for m in messages if m.name == "Hangup")
    assert (hangup["Cause"], hangup["Cause-txt"]) == ("16", "Normal Clearing")
    assert hangup.action_id == ""


@pytest.mark.parametrize("path", AMI_TRACES, ids=lambda p: p.name)
def test_recorded_actions_are_what_format_action_writes(path: Path) -> None:
    for conn in connections(path):
        for chunk in conn:
            if chunk.direction != ">>>":
                continue
            sent = Message(chunk.payload.decode().removesuffix("\r\n\r\n"))
            assert sent.kind == "action"
            fields = {k: v for k, v in sent.fields.items() if k not in ("Action", "ActionID")}
            assert format_action(sent.name, sent.action_id, fields) == chunk.payload


def test_action_with_a_line_break_is_refused() -> None:
    with pytest.raises(ActionError, match="line break"):
        format_action("Hangup", "x", {"Channel": "SIP/a\r\nAction: Logoff"})
    with pytest.raises(ActionError):
        format_action("Hangup", "x", {"Bad:Key": "v"})
    assert format_action("Status", "1", {"Variable": ["A", "B"]}).count(b"Variable: ") == 2


def test_oversize_message_is_refused_and_the_stream_resynchronises() -> None:
    parser = AmiParser()
    parser.receive_data(b"Asterisk Call Manager/9.0.0\r\n")
    assert parser.next_event() == Banner("9.0.0")
    for _ in range(MAX_MESSAGE // 1000 + 2):
        parser.receive_data(b"Event: Huge\r\nX: " + b"y" * 1000)
    failed = list(parser.events())
    assert len(failed) == 1 and isinstance(failed[0], ParseFailed)
    assert len(parser._buf) < 1000  # nothing kept while skipping
    parser.receive_data(b"more junk\r\n\r\nEvent: Hangup\r\nCause: 16\r\n\r\n")
    (event,) = list(parser.events())
    assert isinstance(event, Message) and event.name == "Hangup" and event["Cause"] == "16"


def test_oversize_line_is_refused() -> None:
    parser = AmiParser(expect_banner=False)
    parser.receive_data(b"Event: X\r\nY: " + b"z" * (MAX_LINE + 1) + b"\r\n\r\nEvent: Ok\r\n\r\n")
    events = list(parser.events())
    assert isinstance(events[0], ParseFailed) and "line" in events[0].reason
    assert isinstance(events[1], Message) and events[1].name == "Ok"


def test_a_port_that_is_not_ami_is_reported() -> None:
    parser = AmiParser()
    parser.receive_data(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert isinstance(parser.next_event(), ParseFailed)


def test_eof_mid_message_reports_the_lost_bytes() -> None:
    parser = AmiParser(expect_banner=False)
    partial = b"Event: Hangup\r\nCause: 1"
    parser.receive_data(partial)
    assert parser.next_event() is None
    parser.receive_data(None)
    assert parser.next_event() == ConnectionClosed(unparsed=len(partial))
    assert parser.next_event() is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), st.booleans())
def test_fuzzed_bytes_give_only_documented_events(chunks: list[bytes], banner: bool) -> None:
    parser = AmiParser(expect_banner=banner)
    seen = []
    for chunk in [*(c for c in chunks if c), b""]:  # b"" is end of stream
        parser.receive_data(chunk)
        for event in parser.events():
            assert isinstance(event, Banner | Message | ParseFailed | ConnectionClosed)
            if isinstance(event, Message):
                event.fields  # noqa: B018 - header splitting must not raise either
                event.getall("Variable")
            seen.append(event)
    assert isinstance(seen[-1], ConnectionClosed)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_fuzz_inside_a_valid_stream_never_loses_later_messages(junk: bytes, size: int) -> None:
    tail = b"\r\n\r\nEvent: Sentinel\r\nN: 1\r\n\r\n"
    stream = b"Asterisk Call Manager/9.0.0\r\n" + junk.replace(b"\r\n\r\n", b"") + tail
    events = parse(stream, [size] * (len(stream) // size + 1))
    messages = [e for e in events if isinstance(e, Message)]
    assert messages[-1].name == "Sentinel"
