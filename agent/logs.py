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


def _is_secret(key: object) -> bool:
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
        event_dict[key] = MASK if _is_secret(key) else _masked(value)
    return event_dict


def _json_default(value: Any) -> str:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def _json_dumps(obj: Any, **kwargs: Any) -> str:
    # Decimal amounts, datetimes and enums become their str() (structlog's fallback
    # would give repr, "Decimal('0.13')"): a line must never fail to render, and
    # money must not pass through float.
    kwargs["default"] = _json_default
    return json.dumps(obj, ensure_ascii=False, **kwargs)


def _level(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"log level {level!r} is not one of {', '.join(_LEVELS)}"
        ) from None


def configure_logging(
    format: Literal["json", "console", "auto"] = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stdout) in one format.

    ``auto`` picks console rendering when the stream is a terminal, JSON otherwise.
    Calling it again replaces the previous setup (tests and the CLI may do so).
    """
    out = sys.stdout if stream is None else stream
    numeric_level = _level(level)
    if format not in ("json", "console", "auto"):
        raise ValueError(f"log format {format!r} is not one of json, console, auto")
    is_tty = hasattr(out, "isatty") and out.isatty()
    as_json = format == "json" or (format == "auto" and not is_tty)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_secrets,
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=is_tty)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: modules create their loggers at import, before this runs, and a
        # second configure_logging() must take effect for them too.
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
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
