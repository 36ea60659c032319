"""configure_logging: JSON lines with the right fields, stdlib routed through, secrets masked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import structlog

from agent.logs import configure_logging, mask_secrets

# Created at import, before any configure_logging(), as the agent's modules do.
_EARLY = structlog.get_logger("callgate.early")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == "callgate"]:
        root.removeHandler(handler)
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_line_has_timestamp_level_event_and_bound_context() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    log = structlog.get_logger("callgate.meter")
    structlog.contextvars.bind_contextvars(call_id="c-1", account="acme")
    log.info("meter.reserved", amount=Decimal("0.1300"), seconds=60,
             paid_until=datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC))
    log.bind(step=2).warning("meter.cutoff")
    first, second = _lines(buf)
    assert first["event"] == "meter.reserved"
    assert first["level"] == "info"
    assert first["logger"] == "callgate.meter"
    assert (first["call_id"], first["account"]) == ("c-1", "acme")
    assert first["amount"] == "0.1300"  # exact, never a float
    assert first["seconds"] == 60
    assert first["paid_until"] == "2026-11-25T03:00:05+00:00"
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=5)
    assert second["event"] == "meter.cutoff"
    assert second["level"] == "warning"
    assert (second["call_id"], second["step"]) == ("c-1", 2)


def test_stdlib_logging_is_routed_through_the_same_pipeline() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    structlog.contextvars.bind_contextvars(call_id="c-9")
    logging.getLogger("aiomqtt").warning("broker %s unreachable", "127.0.0.1:1883")
    (line,) = _lines(buf)
    assert line["event"] == "broker 127.0.0.1:1883 unreachable"
    assert line["level"] == "warning"
    assert line["logger"] == "aiomqtt"
    assert line["call_id"] == "c-9"
    assert line["timestamp"].endswith("Z")


def test_level_filters_both_kinds_of_logger() -> None:
    buf = io.StringIO()
    configure_logging("json", "WARNING", stream=buf)
    structlog.get_logger("x").info("hidden")
    logging.getLogger("asyncio").info("hidden too")
    structlog.get_logger("x").error("shown")
    assert [line["event"] for line in _lines(buf)] == ["shown"]


def test_exceptions_are_rendered_into_the_json_line() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    try:
        raise RuntimeError("ledger unreachable")
    except RuntimeError:
        structlog.get_logger("x").exception("gate.failed")
    (line,) = _lines(buf)
    assert line["event"] == "gate.failed"
    assert "RuntimeError: ledger unreachable" in line["exception"]


def test_secrets_are_masked_at_any_depth() -> None:
    buf = io.StringIO()
    configure_logging("json", "debug", stream=buf)
    structlog.get_logger("x").info(
        "config.loaded",
        ami_secret="s3cret",
        Password="hunter2",
        mqtt={"url": "mqtt://broker", "password": "p", "auth": {"token": "t"}},
        username="callgate",
    )
    text = buf.getvalue()
    for secret in ("s3cret", "hunter2", '"p"', '"t"'):
        assert secret not in text
    (line,) = _lines(buf)
    assert line["ami_secret"] == "***"
    assert line["Password"] == "***"
    assert line["mqtt"] == {"url": "mqtt://broker", "password": "***", "auth": {"token": "***"}}
    assert line["username"] == "callgate"


def test_mask_secrets_processor_alone() -> None:
    event = {"event": "x", "esl_password": "ClueCon", "token_count": 3, "call_id": "c"}
    assert mask_secrets(None, "info", event) == {
        "event": "x", "esl_password": "***", "token_count": "***", "call_id": "c"
    }


def test_auto_is_console_on_a_terminal_and_json_otherwise() -> None:
    tty = _Tty()
    configure_logging("auto", "info", stream=tty)
    structlog.get_logger("x").info("call.start", call_id="c-2")
    out = tty.getvalue()
    assert "call.start" in out and "call_id" in out and "c-2" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)

    pipe = io.StringIO()
    configure_logging("auto", "info", stream=pipe)
    structlog.get_logger("x").info("call.start", call_id="c-3")
    assert _lines(pipe)[0]["call_id"] == "c-3"
    assert tty.getvalue() == out  # the earlier handler was replaced, not kept


def test_console_forced_even_when_not_a_terminal() -> None:
    buf = io.StringIO()
    configure_logging("console", "info", stream=buf)
    structlog.get_logger("x").info("policy.reloaded", rules=4)
    text = buf.getvalue()
    assert "policy.reloaded" in text and "rules=4" in text
    assert "\x1b[" not in text  # no colour codes into a pipe


def test_bad_level_or_format_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="log level 'loud'"):
        configure_logging("json", "loud")
    with pytest.raises(ValueError, match="log format 'xml'"):
        configure_logging("xml", "info")  # type: ignore[arg-type]


def test_loggers_created_before_configuration_follow_it() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    _EARLY.info("one")
    configure_logging("json", "info", stream=second)
    _EARLY.info("two")
    assert [line["event"] for line in _lines(first)] == ["one"]
    assert [line["event"] for line in _lines(second)] == ["two"]


def test_positional_arguments_are_interpolated() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    structlog.get_logger("x").info("broker %s:%d unreachable", "127.0.0.1", 1883)
    assert _lines(buf)[0]["event"] == "broker 127.0.0.1:1883 unreachable"


class _Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError("journald went away")


def test_a_failing_stream_never_raises_into_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)  # no report on stderr
    configure_logging("json", "info", stream=_Broken())
    structlog.get_logger("x").info("gate.decision", call_id="c-1")
    logging.getLogger("asyncio").warning("also lost")


def test_the_default_stream_is_stdout_as_it_is_at_each_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A capture that was stdout when logging was configured (a test's capsys, a CLI
    # command run in-process) and is closed since must not keep taking the lines:
    # they go to whatever stdout is now, for our lines and stdlib records alike.
    monkeypatch.setattr(logging, "raiseExceptions", True)  # a failed write would be reported
    earlier, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", earlier)
    configure_logging("json", "info")
    structlog.get_logger("x").info("one")
    earlier.close()
    monkeypatch.setattr("sys.stdout", later)
    errors = io.StringIO()
    monkeypatch.setattr("sys.stderr", errors)  # where Handler.handleError would report
    structlog.get_logger("x").info("two")
    logging.getLogger("asyncio").warning("three")
    assert [line["event"] for line in _lines(later)] == ["two", "three"]
    assert errors.getvalue() == ""


def test_an_explicit_stream_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    structlog.get_logger("x").info("one")
    assert [line["event"] for line in _lines(buf)] == ["one"]
