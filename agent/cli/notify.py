"""Publish one event on MQTT from a CLI command, as the agent would (best effort).

The agent config (``-c``) names the broker; without an ``mqtt:`` section
nothing is sent. The ledger write has already committed when this runs, so a
broker that does not acknowledge within the wait is reported on stderr in one
line and the command still succeeds. The publisher's own log lines go to
stderr (errors only: the command says in one line when the event was not
published), never into the command's output on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

from agent.cli.common import agent_config

WAIT_SECONDS = 5.0


@contextlib.contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """The publisher's own log lines (``mqtt.connected``…) go to stderr, errors only,
    while it runs: stdout is the command's output, which ``--json`` promises to be
    one JSON document. The previous logging setup is restored after."""
    before = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(
            colors=False)],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
    )
    try:
        yield
    finally:
        structlog.configure(**before)


async def publish_event(args: argparse.Namespace, topic: str, payload: dict[str, Any]) -> bool:
    """True if the broker acknowledged the event; False if none is configured or it failed."""
    config = agent_config(args)
    if config is None or config.spec.mqtt is None:
        return False
    from agent.daemon import _make_publisher

    try:
        publisher = _make_publisher(config)
    except (ValueError, OSError) as exc:
        print(f"callgate: warning: mqtt: {exc}; the {topic} event was not published",
              file=sys.stderr)
        return False
    with _logs_to_stderr():
        task = asyncio.create_task(publisher.run())
        try:
            publisher.publish(topic, payload)
            sent = bool(await publisher.flush(WAIT_SECONDS))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if not sent:
        print(f"callgate: warning: the MQTT broker did not acknowledge the {topic} event "
              f"within {WAIT_SECONDS:g} s (the ledger record stands)", file=sys.stderr)
    return sent
