"""The sans-IO ESL parser on the recorded FreeSWITCH bytes, in any chunking, and fuzzed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.pbx.esl import (
    ApiResponse,
    AuthRequest,
    ChannelData,
    CommandReply,
    ConnectionClosed,
    DisconnectNotice,
    EslEvent,
    EslParser,
    LogData,
    ParseError,
    UnknownFrame,
)
from agent.sim.freeswitch import read_trace, trace_stream

TRACES = Path(__file__).parent / "fixtures" / "freeswitch"
ALL = sorted(TRACES.glob("*.esl.txt"))
FRAME_TYPES = (ApiResponse, AuthRequest, ChannelData, CommandReply, ConnectionClosed,
               DisconnectNotice, EslEvent, LogData, ParseError, UnknownFrame)


def parse(data: bytes, **kw: int) -> list[object]:
    parser = EslParser(**kw)
    parser.receive_data(data)
    parser.receive_data(b"")
    return list(parser.events())


def parse_chunked(data: bytes, cuts: list[int]) -> list[object]:
    parser = EslParser()
    out: list[object] = []
    prev = 0
    for cut in [*sorted(set(cuts) - {0}), len(data)]:
        if cut == prev:
            continue  # b"" means end of stream, as from a socket
        parser.receive_data(data[prev:cut])
        out.extend(parser.events())
        prev = cut
    parser.receive_data(None)
    out.extend(parser.events())
    return out


def summary(frames: list[object]) -> list[tuple[str, object, object]]:
    """A comparable view of frames (headers decoded)."""
    out = []
    for f in frames:
        headers = getattr(f, "headers", None)
        out.append((type(f).__name__, dict(headers) if headers is not None else None,
                    getattr(f, "body", None)))
    return out


def test_fixtures_are_the_recorded_traces() -> None:
    assert len(ALL) == 20
    shared = Path("/work/shared/traces/freeswitch")
    if shared.exists():
        for path in ALL:
            assert path.read_bytes() == (shared / path.name).read_bytes(), path.name


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name[:24])
def test_every_recorded_message_is_one_frame(path: Path) -> None:
    """Each RECV chunk is one complete ESL message (trace README): so the parser
    must yield exactly one well-typed frame per chunk, and nothing unknown."""
    chunks = read_trace(path)
    for conn in {c.conn for c in chunks}:
        recv = [c.data for c in chunks if c.conn == conn and c.direction == "RECV"]
        frames = parse(b"".join(recv))
        assert isinstance(frames[-1], ConnectionClosed) and frames[-1].partial == 0
        assert len(frames) - 1 == len(recv)
        for frame, chunk in zip(frames, recv, strict=False):
            assert not isinstance(frame, ParseError | UnknownFrame), (conn, frame)
            assert summary(parse(chunk)[:1]) == summary([frame])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from([p for p in ALL if "all-events" not in p.name]),
       cuts=st.lists(st.integers(min_value=0, max_value=130_000), max_size=40))
def test_any_chunking_gives_the_same_frames(path: Path, cuts: list[int]) -> None:
    conns = {c.conn for c in read_trace(path)}
    data = trace_stream(path, "outbound" if "outbound" in conns else "inbound")
    cuts = [c % (len(data) + 1) for c in cuts]
    assert summary(parse_chunked(data, cuts)) == summary(parse(data))


def test_byte_by_byte_equals_one_shot() -> None:
    data = trace_stream(TRACES / "07-api-responses-and-errors.esl.txt")
    assert summary(parse_chunked(data, list(range(len(data))))) == summary(parse(data))


def test_connect_reply_is_channel_data_with_decoded_values() -> None:
    """06a: one ~170-header block, Reply-Text %2BOK%0A, Content-Type not first."""
    frames = parse(trace_stream(TRACES / "06a-outbound-socket-reject.esl.txt", "outbound"))
    data = frames[0]
    assert isinstance(data, ChannelData) and data.ok
    h = data.headers
    assert len(h) > 150
    assert list(h)[-4:] == ["Content-Type", "Reply-Text", "Socket-Mode", "Control"]
    assert h["Reply-Text"] == "+OK\n"
    assert h["Unique-ID"] == "50b19cc9-4a6f-4501-9baf-478d8196dbc6"
    assert h["Channel-Name"] == "sofia/internal/sipp@127.0.0.1:5261"
    assert h["Caller-Destination-Number"] == "815550601"
    assert h["variable_callgate_dest"] == "15550601"
    assert h["variable_accountcode"] == "acme"
    assert h["variable_sip_full_via"] == "SIP/2.0/UDP 127.0.0.1:5261;branch=z9hG4bK-17156-1-0"
    assert h.get_raw("Channel-Name") == "sofia/internal/sipp%40127.0.0.1%3A5261"
    notices = [f for f in frames if isinstance(f, DisconnectNotice)]
    assert [n.linger for n in notices] == [True, False]
    assert notices[0].headers["Linger-Time"] == "-1"


def test_hangup_complete_fields_and_double_hangup_cause() -> None:
    frames = parse(trace_stream(TRACES / "01b-outbound-answered-caller-hangup"
                                ".selected-events.esl.txt"))
    events = [f for f in frames if isinstance(f, EslEvent)]
    assert [e.name for e in events] == [
        "CHANNEL_CREATE", "CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_ANSWER",
        "CHANNEL_BRIDGE", "CHANNEL_HANGUP", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE",
        "CHANNEL_HANGUP_COMPLETE"]
    a_end = events[-1]
    assert a_end.headers["Unique-ID"] == "e1b1b2d0-239f-4ad2-8910-d4b1cb52508f"
    assert a_end.headers["Hangup-Cause"] == "NORMAL_CLEARING"
    assert a_end.headers["variable_billsec"] == "5"
    assert a_end.headers["variable_billmsec"] == "5020"
    assert a_end.headers["Event-Date-GMT"] == "Tue, 24 Nov 2026 21:55:31 GMT"
    assert a_end.headers["Caller-Channel-Answered-Time"] == "1795557326342497"


def test_api_bgapi_auth_and_errors_from_trace_07() -> None:
    chunks = read_trace(TRACES / "07-api-responses-and-errors.esl.txt")
    bad = parse(b"".join(c.data for c in chunks if c.conn == "badauth" and c.direction == "RECV"))
    assert isinstance(bad[0], AuthRequest)
    assert isinstance(bad[1], CommandReply) and bad[1].reply_text == "-ERR invalid"
    assert not bad[1].ok
    assert isinstance(bad[2], DisconnectNotice) and bad[2].body.startswith(b"Disconnected")
    noauth = parse(b"".join(c.data for c in chunks if c.conn == "noauth" and c.direction == "RECV"))
    assert isinstance(noauth[1], CommandReply)
    assert noauth[1].reply_text == "-ERR command not found"

    frames = parse(trace_stream(TRACES / "07-api-responses-and-errors.esl.txt"))
    api = [f for f in frames if isinstance(f, ApiResponse)]
    assert api[0].body == b'{"row_count": 0}\n'
    assert b"true" in [a.body for a in api] and b"false" in [a.body for a in api]
    assert b"_undef_" in [a.body for a in api]
    assert [a.body for a in api].count(b"-ERR No such channel!\n") >= 5
    assert not next(a for a in api if a.body == b"-ERR No such channel!\n").ok
    job = [f for f in frames if isinstance(f, CommandReply) and f.job_uuid]
    assert job[0].job_uuid == "7780b979-a2cf-4fae-90aa-0659179cae22"
    bg = [f for f in frames if isinstance(f, EslEvent) and f.name == "BACKGROUND_JOB"]
    assert bg[0].headers["Job-UUID"] == job[0].job_uuid
    assert bg[0].body == b"-ERR No such channel!\n"


def test_bgapi_job_body_04b() -> None:
    frames = parse(trace_stream(TRACES / "04b-answered-bgapi-uuid_kill.esl.txt"))
    bg = [f for f in frames if isinstance(f, EslEvent) and f.name == "BACKGROUND_JOB"]
    assert bg[0].body == b"+OK\n"
    assert bg[0].headers["Job-Command-Arg"] == (
        "7d6deeb5-441f-4221-8f67-df87545348e1 NORMAL_CLEARING")


# -- bounds and bad input -----------------------------------------------------

GOOD = b"Content-Type: command/reply\nReply-Text: +OK\n\n"


def test_oversize_header_block_is_refused_and_stream_resyncs() -> None:
    junk = b"X-Junk: " + b"a" * 70_000 + b"\n\n"
    frames = parse_chunked(junk + GOOD, list(range(0, len(junk), 7000)))
    assert isinstance(frames[0], ParseError) and "header block" in frames[0].reason
    assert isinstance(frames[1], CommandReply) and frames[1].reply_text == "+OK"
    # unterminated and huge: bounded buffering, one error, no frame
    parser = EslParser(max_header_bytes=1024)
    for _ in range(100):
        parser.receive_data(b"b" * 1000)
        assert [type(f) for f in parser.events()] in ([], [ParseError])
    assert len(parser._buf) - parser._pos <= 2048
    parser.receive_data(b"\n\n" + GOOD)
    assert isinstance(list(parser.events())[-1], CommandReply)


def test_oversize_body_is_skipped_without_buffering() -> None:
    body = b"z" * 50_000
    head = f"Content-Type: api/response\nContent-Length: {len(body)}\n\n".encode()
    parser = EslParser(max_body_bytes=10_000)
    parser.receive_data(head)
    frames = list(parser.events())
    assert isinstance(frames[0], ParseError) and "50000" in frames[0].reason
    for i in range(0, len(body), 4096):
        parser.receive_data(body[i : i + 4096])
        assert list(parser.events()) == []
        assert len(parser._buf) - parser._pos < 8192
    parser.receive_data(GOOD)
    assert isinstance(next(iter(parser.events())), CommandReply)


def test_bad_content_length_invalid_utf8_json_and_log() -> None:
    data = (b"Content-Type: api/response\nContent-Length: -4\n\n"
            + b"Content-Type: command/reply\nReply-Text: +OK caf\xe9 \xff\n\n"
            + b'Content-Length: 52\nContent-Type: text/event-json\n\n'
            + b'{"Event-Name":"HEARTBEAT","Up-Time":"1","_body":"x"}'
            + b"Content-Type: log/data\nContent-Length: 3\nLog-Level: 7\n\nabc"
            + b"Content-Type: text/weird\n\n")
    frames = parse(data)
    assert isinstance(frames[0], ParseError)
    assert isinstance(frames[1], CommandReply) and frames[1].reply_text.startswith("+OK caf")
    assert isinstance(frames[2], EslEvent) and frames[2].name == "HEARTBEAT"
    assert frames[2].body == b"x"
    assert isinstance(frames[3], LogData) and frames[3].body == b"abc"
    assert isinstance(frames[4], UnknownFrame) and frames[4].content_type == "text/weird"
    assert isinstance(frames[5], ConnectionClosed)


def test_truncated_stream_reports_lost_bytes() -> None:
    frames = parse(b"Content-Type: api/response\nContent-Length: 10\n\nabc")
    assert frames == [ConnectionClosed(partial=3)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(min_size=1, max_size=300),
    st.text(min_size=1, max_size=60).map(str.encode),
    st.text(st.characters(categories=["Nd", "No"]), max_size=4).map(  # digit-like
        lambda t: f"\n\nContent-Length: {t}\n\n".encode()),
    st.sampled_from([b"\n\n", b"Content-Length: ", b"Content-Length: 5\n\n", b"\n",
                     b"Content-Type: text/event-plain\n", b"Content-Type: command/reply\n",
                     b"Event-Name: X\n", b"%", b"\xff\xfe", b"Content-Length: 99999999\n\n"]),
), max_size=30))
def test_fuzz_never_raises_and_always_progresses(parts: list[bytes]) -> None:
    parser = EslParser(max_header_bytes=512, max_body_bytes=2048)
    for part in parts:
        parser.receive_data(part)
        for frame in parser.events():
            assert isinstance(frame, FRAME_TYPES)
            if isinstance(frame, EslEvent):
                dict(frame.headers)  # decoding every value must not raise either
        assert len(parser._buf) - parser._pos <= 512 + 2048 + 300 + 16
    parser.receive_data(GOOD)
    frames = list(parser.events())
    parser.receive_data(b"")
    frames += list(parser.events())
    assert isinstance(frames[-1], ConnectionClosed)


def test_lazy_header_lookup_equals_a_full_split() -> None:
    """HeaderBlock finds headers in place; it must agree with splitting every line."""
    from agent.pbx.esl import HeaderBlock, split_header_lines

    blocks = []
    for path in ALL:
        for chunk in read_trace(path):
            if chunk.direction == "RECV":
                head, _, body = chunk.data.partition(b"\n\n")
                blocks.append(head.decode())
                if b"event-plain" in head:
                    blocks.append(body.partition(b"\n\n")[0].decode())
    blocks += ["A: 1\nB:\nA: 2\nC: x: y", "Empty:", "X: \nY: z"]
    for text in blocks:
        split = split_header_lines(text)
        lazy = HeaderBlock(text)
        assert dict(lazy) == split
        for name, value in split.items():
            assert lazy[name] == value and name in lazy
        assert "No-Such-Header" not in lazy and lazy.get("No-Such-Header") is None
    assert HeaderBlock("A: 1\nB:\nA: 2")["A"] == "1"
    assert HeaderBlock("A: 1\nB:\nA: 2")["B"] == ""


def test_unicode_digits_are_not_a_content_length() -> None:
    """``"²".isdigit()`` is true but ``int("²")`` raises: framing must not trust it."""
    inner = "Event-Name: X\nContent-Length: ³\n\n".encode()
    frames = parse("Content-Type: api/response\nContent-Length: ²\n\n".encode() + GOOD
                   + b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner)
                   + inner + GOOD)
    assert isinstance(frames[0], ParseError) and "²" in frames[0].reason
    assert isinstance(frames[1], CommandReply)
    assert isinstance(frames[2], ParseError) and "³" in frames[2].reason
    assert isinstance(frames[3], CommandReply)
