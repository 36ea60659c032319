"""Cost of a log line: agent.logs' pipeline against structlog routed through stdlib logging.

Both write JSON lines to /dev/null (a flush per line, as to journald). Lines:
* ``info``: a "gate.decision"-like line (8 fields, a bound ``call_id`` context),
  the kind the daemon writes ~2 of per call;
* ``debug``: a line below the level (filtered out);
* ``stdlib``: an asyncio-style stdlib record through the same handler.

The baseline is the configuration agent.logs used before issue 8: structlog's
stdlib ``LoggerFactory`` + ``BoundLogger`` + ``filter_by_level``, every line a
LogRecord (``findCaller`` stack walk) rendered by ``ProcessorFormatter``. Same
output bytes. (Not named logging.py: it would shadow the stdlib
module for a script run from bench/.)

Usage: ``python bench/log_lines.py [--lines N] [--repeat R]``; best of R runs.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

from agent.logs import MASK, configure_logging

log = structlog.get_logger("callgate.gate")
foreign = logging.getLogger("asyncio")


def _old_secret(key: object) -> bool:
    lowered = str(key).lower()
    return any(word in lowered for word in ("secret", "password", "passwd", "token",
                                            "authorization"))


def _old_masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (MASK if _old_secret(k) else _old_masked(v)) for k, v in value.items()}
    return value


def _mask(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """The old mask_secrets: every key scanned for the five words on every line."""
    for key, value in event_dict.items():
        event_dict[key] = MASK if _old_secret(key) else _old_masked(value)
    return event_dict


def _dumps(obj: Any, **kwargs: Any) -> str:  # the old serializer (no datetimes here)
    kwargs["default"] = str
    return json.dumps(obj, ensure_ascii=False, **kwargs)


def configure_baseline(stream: TextIO) -> None:
    """agent.logs.configure_logging("json", "info") as it was before issue 8."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.set_name("callgate")
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(serializer=_dumps)]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "callgate"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def info(n: int) -> None:
    for i in range(n):
        log.info("gate.decision", call_id=f"c{i}", account="acme", result="ALLOW",
                 reason="allowed", max_seconds=600, caller="02158880000",
                 callee="13800138000", ms=0.42)


def debug(n: int) -> None:
    for _ in range(n):
        log.debug("freeswitch.gate", call_id="c1", account="acme", result="ALLOW")


def stdlib(n: int) -> None:
    for _ in range(n):
        foreign.warning("socket.send() raised exception, %s", "retrying")


def us_per_line(fn: Callable[[int], None], n: int) -> float:
    started = time.perf_counter()
    fn(n)
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kinds = {"info": info, "debug": debug, "stdlib": stdlib}
    setups = {"baseline": configure_baseline,
              "callgate": lambda out: configure_logging("json", "info", stream=out)}
    best: dict[str, dict[str, float]] = {s: dict.fromkeys(kinds, float("inf")) for s in setups}
    structlog.contextvars.bind_contextvars(node="bench-1")
    with open(os.devnull, "w") as out:
        for _ in range(args.repeat):  # interleaved, so load changes hit both alike
            for setup, configure in setups.items():
                configure(out)
                for kind, fn in kinds.items():
                    best[setup][kind] = min(best[setup][kind], us_per_line(fn, args.lines))
    structlog.reset_defaults()

    ratio = {k: best["baseline"][k] / best["callgate"][k] for k in kinds}
    print(f"{args.lines:,} JSON lines to /dev/null, best of {args.repeat} runs, µs per line:")
    print(f"  {'line':8} {'baseline':>9} {'callgate':>9}  speed-up")
    for k in kinds:
        print(f"  {k:8} {best['baseline'][k]:9.2f} {best['callgate'][k]:9.2f}  {ratio[k]:.2f}x")
    print(json.dumps({
        "bench": "log_lines", "lines": args.lines,
        **{f"{s}_{k}_us": round(best[s][k], 2) for s in setups for k in kinds},
        **{f"{k}_speedup": round(ratio[k], 2) for k in kinds},
    }))


if __name__ == "__main__":
    main()
