"""Publish one event on MQTT from a CLI command, as the agent would (best effort).

The agent config (``-c``) names the broker; without an ``mqtt:`` section
nothing is sent. The ledger write has already committed when this runs, so a
broker that does not acknowledge within the wait is reported on stderr in one
line and the command still succeeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from agent.cli.common import agent_config

WAIT_SECONDS = 5.0


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
