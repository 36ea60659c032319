"""FastAGI server side, sans-IO, on the recorded Asterisk 20 FastAGI bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.pbx.agi import (
    MAX_LINE,
    MAX_REQUEST,
    AgiHangup,
    AgiReply,
    AgiRequest,
    CommandError,
    ConnectionClosed,
    FastAgiConnection,
    ParseFailed,
    format_command,
    parse_reply,
    quote_arg,
)
from agent.sim.asterisk import read_trace

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk"
AGI_TRACES = sorted(FIXTURES.glob("*.agi.txt"))


def replay(path: Path, sizes: int | None = None) -> tuple[list[object], list[bytes]]:
    """Feed what Asterisk sent (optionally ``sizes`` bytes at a time); the
    server's commands are compared with what the lab server sent."""
    conn = FastAgiConnection()
    events: list[object] = []
    sent: list[bytes] = []
    for chunk in read_trace(path):
        if chunk.direction == "<<<":
            step = sizes or len(chunk.payload)
            for i in range(0, len(chunk.payload), step):
                conn.receive_data(chunk.payload[i : i + step])
                events += conn.events()
        elif chunk.direction == ">>>":
            words = chunk.payload.decode().split()
            if words[:2] in (["SET", "VARIABLE"], ["GET", "VARIABLE"]):
                sent.append(conn.send_command(" ".join(words[:2]), *words[2:]))
            else:
                sent.append(conn.send_command(*words))
            assert sent[-1] == chunk.payload
    conn.receive_data(b"")
    events += conn.events()
    return events, sent


@pytest.mark.parametrize("path", AGI_TRACES, ids=lambda p: p.name)
@pytest.mark.parametrize("sizes", [None, 1, 7])
def test_recorded_requests_and_replies(path: Path, sizes: int | None) -> None:
    events, sent = replay(path, sizes)
    request = events[0]
    assert isinstance(request, AgiRequest)
    assert request.script == "gate"
    assert request.get("accountcode") == "acme"
    assert request.get("callerid") == "2001" and request.get("calleridname") == "Alice"
    assert request.get("context") == "from-internal"
    assert request.get("uniqueid").startswith("17955573")
    assert request.get("channel").startswith("SIP/internal-")
    assert request.args == ()
    replies = [e for e in events if isinstance(e, AgiReply)]
    assert len(replies) == len(sent)
    assert all(r.ok and r.result == "1" for r in replies)
    assert isinstance(events[-1], ConnectionClosed)


def test_get_variable_reply_data_from_trace_06b() -> None:
    events, _ = replay(FIXTURES / "06b-fastagi-allow.agi.txt")
    replies = [e for e in events if isinstance(e, AgiReply)]
    assert replies[-1] == AgiReply(200, "1", "ALLOW", "200 result=1 (ALLOW)")


def test_async_hangup_line_is_not_a_reply_trace_06d() -> None:
    events, _ = replay(FIXTURES / "06d-fastagi-deny-hangup-cmd.agi.txt")
    tail = [type(e) for e in events[1:]]
    # SET VARIABLE -> 200, HANGUP -> 200, then Asterisk's own HANGUP line.
    assert tail == [AgiReply, AgiReply, AgiHangup, ConnectionClosed]


def test_hangup_between_replies_keeps_them_in_step() -> None:
    conn = FastAgiConnection()
    conn.receive_data(b"agi_uniqueid: 1.1\n\n")
    assert isinstance(conn.next_event(), AgiRequest)
    conn.receive_data(b"HANGUP\n200 result=1\n511 Command Not Permitted on a dead channel\n")
    assert list(conn.events()) == [
        AgiHangup(),
        AgiReply(200, "1", "", "200 result=1"),
        AgiReply(511, text="511 Command Not Permitted on a dead channel"),
    ]


def test_utf8_caller_name_split_inside_a_character() -> None:
    raw = "agi_uniqueid: 1.2\nagi_calleridname: 张三丰\n\n".encode()
    cut = raw.index("三".encode()) + 1  # in the middle of a 3-byte character
    conn = FastAgiConnection()
    conn.receive_data(raw[:cut])
    assert conn.next_event() is None
    conn.receive_data(raw[cut:])
    request = conn.next_event()
    assert isinstance(request, AgiRequest) and request.get("calleridname") == "张三丰"


def test_half_request_is_never_reported() -> None:
    conn = FastAgiConnection()
    conn.receive_data(b"agi_network: yes\nagi_uniqueid: 1.3\nagi_accountco")
    assert conn.next_event() is None
    conn.receive_data(None)
    assert list(conn.events()) == [ConnectionClosed(complete=False)]


def test_request_bounds() -> None:
    conn = FastAgiConnection()
    conn.receive_data(b"agi_x: " + b"y" * (MAX_LINE + 10))
    assert isinstance(conn.next_event(), ParseFailed)
    conn = FastAgiConnection()
    line = b"agi_x: " + b"y" * 1000 + b"\n"
    conn.receive_data(line * (MAX_REQUEST // len(line) + 2))
    failed = conn.next_event()
    assert isinstance(failed, ParseFailed) and "request" in failed.reason
    assert conn.next_event() is None  # closed: nothing more is read


def test_garbage_is_refused_before_any_request() -> None:
    conn = FastAgiConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(conn.next_event(), ParseFailed)
    assert conn.next_event() is None


def test_arguments_and_multiline_520() -> None:
    conn = FastAgiConnection()
    conn.receive_data(b"agi_uniqueid: 1.4\nagi_arg_1: acme\nagi_arg_2: x y\n\n")
    request = conn.next_event()
    assert isinstance(request, AgiRequest) and request.args == ("acme", "x y")
    conn.receive_data(
        b"520-Invalid command syntax.  Proper usage follows:\n"
        b" Usage: SET VARIABLE <variablename> <value>\n"
        b"520 End of proper usage.\n"
    )
    (reply,) = list(conn.events())
    assert isinstance(reply, AgiReply) and reply.code == 520 and not reply.ok
    assert reply.usage == (" Usage: SET VARIABLE <variablename> <value>",)


def test_commands_are_quoted_only_when_needed() -> None:
    assert format_command("SET VARIABLE", "CALLGATE_RESULT", "DENY") == (
        b"SET VARIABLE CALLGATE_RESULT DENY\n")  # fmt: skip
    assert quote_arg("a b") == '"a b"'
    assert quote_arg('say "hi" \\o/') == '"say \\"hi\\" \\\\o/"'
    assert quote_arg("") == '""'
    with pytest.raises(CommandError):
        quote_arg("x\nHANGUP")
    conn = FastAgiConnection()
    with pytest.raises(CommandError):
        conn.send_command("NOOP")  # no request yet


def test_parse_reply_forms() -> None:
    assert parse_reply("200 result=0") == AgiReply(200, "0", "", "200 result=0")
    assert parse_reply("200 result= (timeout)") == AgiReply(200, "", "timeout",
                                                            "200 result= (timeout)")  # fmt: skip
    assert parse_reply("510 Invalid or unknown command") == AgiReply(
        510, text="510 Invalid or unknown command")  # fmt: skip
    assert parse_reply("HANGUP") == AgiHangup()
    assert isinstance(parse_reply("hello"), ParseFailed)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=15))
def test_fuzzed_bytes_give_only_documented_events(chunks: list[bytes]) -> None:
    conn = FastAgiConnection()
    events: list[object] = []
    for chunk in [*(c for c in chunks if c), b""]:
        conn.receive_data(chunk)
        events += conn.events()
    allowed = AgiRequest | AgiReply | AgiHangup | ParseFailed | ConnectionClosed
    assert all(isinstance(e, allowed) for e in events)
    assert sum(isinstance(e, AgiRequest) for e in events) <= 1
    assert isinstance(events[-1], ParseFailed | ConnectionClosed)
