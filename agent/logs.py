"""Logging setup: one structlog pipeline for our own lines and for the stdlib's.

- JSON lines (one object per line: ``timestamp`` ISO 8601 UTC, ``level``,
  ``event``, ``logger`` and the bound context such as ``call_id`` and
  ``account``) when the output is not a terminal (journald) or ``format="json"``;
  a readable console rendering on a terminal or with ``format="console"``.
- Standard-library loggers (asyncio, aiomqtt, paho) go through the same
  processors and renderer, so journald gets one format.
- Values under keys that name a secret (``secret``, ``password``, ``token``,
  ``passwd``, ``authorization``, in any case and as part of a longer key such as
  ``ami_secret``) are replaced by ``"***"``, also inside nested dicts.

Context for a call is bound with ``structlog.contextvars.bind_contextvars`` (or
``log.bind``); :func:`structlog.contextvars.merge_contextvars` is the first
processor, so every line logged inside that context carries it.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import MutableMapping
from datetime import date, datetime, time
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

MASK = "***"
_SECRET_WORDS = ("secret", "password", "passwd", "token", "authorization")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


@functools.lru_cache(maxsize=4096)
def _is_secret(key: object) -> bool:
    # Cached: the same few dozen keys come by on every line (scanning each lowered
    # key for five words was a quarter of a line's cost); bounded, since nested
    # dicts may be keyed by data.
    lowered = str(key).lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (MASK if _is_secret(k) else _masked(v)) for k, v in value.items()}
    return value


def mask_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Processor: replace the values of secret-named keys (at any dict depth) by ``***``."""
    for key, value in event_dict.items():
        if _is_secret(key):
            event_dict[key] = MASK
        elif isinstance(value, dict):
            event_dict[key] = _masked(value)
    return event_dict


def _json_default(value: Any) -> str:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


# Decimal amounts, datetimes and enums become their str() (structlog's fallback
# would give repr, "Decimal('0.13')"): a line must never fail to render, and
# money must not pass through float. One encoder, built once (json.dumps with
# arguments builds a new one for every line).
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=_json_default)


def render_json(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """Processor: the event dict as one JSON object (the last processor of the chain)."""
    return _ENCODER.encode(event_dict)


def _level(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"log level {level!r} is not one of {', '.join(_LEVELS)}"
        ) from None


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler on the root logger: stdlib records arrive by ``emit``, our own
    lines, already rendered by structlog, by :meth:`write_line`. Both take the
    handler's lock, so lines from threads never interleave.

    Configured without a stream, it writes to whatever ``sys.stdout`` is at the
    time of the line, not the one it was made with: a redirection or capture that
    was later closed (pytest's ``capsys`` of an earlier test, a CLI command run
    in-process) must not keep taking the lines and fail each of them with "I/O
    operation on closed file".
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._follow_stdout = stream is None
        super().__init__(sys.stdout if stream is None else stream)

    @property
    def stream(self) -> TextIO:
        return sys.stdout if self._follow_stdout else self._stream

    @stream.setter
    def stream(self, value: TextIO) -> None:
        # StreamHandler.__init__ and setStream assign it; an explicit stream is kept.
        self._stream = value

    def write_line(self, line: str) -> None:
        try:
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(line + self.terminator)
                self.flush()
        except RecursionError:
            raise
        except Exception:
            # As StreamHandler.emit does: report on stderr, never raise into the
            # caller (a lost log line must not fail a call).
            self.handleError(logging.makeLogRecord({"msg": line}))


_handler: _Handler | None = None  # the one configure_logging() installed last


class _LineWriter:
    """structlog's wrapped logger for our own lines: takes the rendered line and
    hands it to the current handler. It replaces the stdlib logger that
    ``structlog.stdlib.LoggerFactory`` gives, whose ``_log`` built a LogRecord,
    walked the stack for a caller (``findCaller``: no line of ours shows it) and
    went through ``ProcessorFormatter``, which copies the record and runs the
    renderer: more than half of a line's cost (bench/log_lines.py). The handler
    is looked up at call time, so loggers created at import follow a later
    configure_logging()."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name  # read by add_logger_name

    def msg(self, line: str) -> None:
        if _handler is not None:
            _handler.write_line(line)

    debug = info = warning = error = critical = exception = msg


@functools.cache
def _line_writer(name: str = "callgate") -> _LineWriter:
    """Logger factory: one writer per logger name (loggers are not cached, below,
    so this runs for every line). ``structlog.get_logger()`` without a name
    gives "callgate" (every logger of ours is named)."""
    return _LineWriter(name)


def configure_logging(
    format: Literal["json", "console", "auto"] = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stdout) in one format.

    Without ``stream`` the lines go to ``sys.stdout`` as it is when each is written
    (see :class:`_Handler`); the console/JSON choice is made now, from the stdout
    of this call.

    ``auto`` picks console rendering when the stream is a terminal, JSON otherwise.
    Calling it again replaces the previous setup (tests and the CLI may do so).

    Our own lines (structlog loggers) are filtered by level before any work
    (``make_filtering_bound_logger``: a method below the level is an empty
    function), run through ``shared`` and the renderer inside structlog, and are
    written as finished lines: no stdlib LogRecord. Stdlib records (asyncio,
    aiomqtt) go through ``ProcessorFormatter`` with the same processors and
    renderer, so both kinds of line look alike.
    """
    global _handler
    out = sys.stdout if stream is None else stream
    numeric_level = _level(level)
    if format not in ("json", "console", "auto"):
        raise ValueError(f"log format {format!r} is not one of json, console, auto")
    is_tty = hasattr(out, "isatty") and out.isatty()
    as_json = format == "json" or (format == "auto" and not is_tty)

    # No PositionalArgumentsFormatter: the filtering logger does log.info("%s", x)
    # itself and stdlib records arrive with their message formatted.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_secrets,
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        shared.append(structlog.processors.format_exc_info)
        renderer = render_json
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=is_tty)

    handler = _Handler(stream)  # None: sys.stdout as it is at each line
    handler.set_name("callgate")
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "callgate"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _handler = handler

    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=_line_writer,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Not cached: modules create their loggers at import, before this runs, and a
        # second configure_logging() (or structlog.testing.capture_logs) must take
        # effect for them too. Assembling the logger per line costs ~1 us.
        cache_logger_on_first_use=False,
    )
