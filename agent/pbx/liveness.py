"""A slow PBX told from a dead one: the rules both control links (ESL, AMI) follow.

A PBX that is drowning answers commands late, but its TCP link is alive and
bytes still arrive (events, heartbeats, late replies). Dropping that link and
re-listing every channel after the reconnect only adds load. So:

* a command without a reply within its timeout fails (the caller decides what
  to do, e.g. the meter keeps the earlier PBX-side deadline) but the link is
  kept: its reply, when it comes, is matched in order and dropped. The next
  commands get a longer timeout (doubled after each miss, up to a ceiling,
  ``dead_after`` unless set) until one is answered in time again;
* the link counts as dead only when *no byte at all* has arrived for
  ``dead_after`` seconds while a reply was awaited (or, idle, after a probe),
  or the kernel says so: end of stream, a reset, or TCP keepalive / user
  timeout (:func:`keepalive`) for a peer host that is gone.

:class:`LinkHealth` holds the readings for metrics and ``/status``. The three
numbers come from agent.yaml: ``pbx.command_timeout_seconds`` (5),
``pbx.command_timeout_max_seconds`` (the ceiling; default ``dead_after``) and
``pbx.dead_after_seconds`` (30).
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

UP, SLOW, DOWN = "up", "slow", "down"


@dataclass
class LinkHealth:
    """What the daemon shows of one control link (metrics, /status)."""

    state: str = DOWN
    command_timeouts: int = 0  # commands that got no reply in time (PBX slow)
    reconnects: int = 0  # links dropped as dead and opened again
    late_replies: int = 0  # replies that came after their command had timed out

    def snapshot(self) -> dict[str, object]:
        return {"state": self.state, "command_timeouts": self.command_timeouts,
                "reconnects": self.reconnects, "late_replies": self.late_replies}


class CommandTimer:
    """The command timeout, backing off while the PBX is slow (pure)."""

    def __init__(self, base: float, ceiling: float) -> None:
        self.base = base
        self.ceiling = max(base, ceiling)
        self.current = base

    def missed(self) -> None:
        self.current = min(self.current * 2, self.ceiling)

    def answered(self) -> None:
        self.current = self.base


def is_dead(now: float, last_rx: float, awaiting_since: float | None, dead_after: float) -> bool:
    """No byte for ``dead_after`` s while something was awaited for that long."""
    if awaiting_since is None:
        return False
    return now - last_rx >= dead_after and now - awaiting_since >= dead_after


def keepalive(sock: socket.socket | None, dead_after: float) -> None:
    """Let the kernel notice a peer host that is gone (no ACKs) within ~``dead_after``:
    keepalive probes on an idle link, and a user timeout for unacknowledged data.
    A live but busy PBX still ACKs at the TCP level, so this never fires for it."""
    if sock is None:
        return
    idle = max(1, int(dead_after / 2))
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))
