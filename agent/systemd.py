"""systemd service notification (sd_notify) and the watchdog, without a dependency.

The protocol (sd_notify(3), systemd.service(5)) is one datagram of
newline-separated ``KEY=VALUE`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET``; a name starting with ``@`` is an abstract socket (a leading
NUL byte on the wire). Without ``$NOTIFY_SOCKET`` (not started by systemd, or a
unit that is not ``Type=notify``) every call here is a no-op returning False.

What the daemon sends, and when:

- :func:`ready` once the ledger is open and the PBX is connected (``READY=1``);
  again after each reload has finished.
- :func:`reloading` when SIGHUP starts a policy reload (``RELOADING=1`` with
  ``MONOTONIC_USEC``, which systemd >= 253 requires for ``Type=notify-reload``
  and older versions ignore), then :func:`ready` when it is done.
- :func:`stopping` when SIGTERM starts the shutdown.
- :func:`status` for the one-line text ``systemctl status`` shows.
- :func:`watchdog_loop` as a task on the event loop: it pings ``WATCHDOG=1``
  every ``WATCHDOG_USEC / 2``. It runs on the loop on purpose: a loop that hangs
  stops pinging, and systemd kills and restarts the service (``WatchdogSec=``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger("callgate.systemd")


def _socket_address(name: str) -> str | None:
    # sd_notify(3): "@" names an abstract socket; only AF_UNIX paths are supported
    # here (systemd may also use vsock: "vsock:CID:PORT", which a PBX host never needs).
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` to systemd; True if the datagram was sent.

    Never raises and never blocks: the socket is non-blocking, so a full receive
    queue (systemd not reading) costs a False, not a stalled event loop.
    """
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = _socket_address(name)
    if address is None:
        log.warning("systemd.notify_socket_unsupported", notify_socket=name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.send(state.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", state=state.split("\n", 1)[0], error=str(exc))
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """READY=1: startup (or a reload) is complete."""
    return notify("READY=1" if status_text is None else f"READY=1\nSTATUS={status_text}")


def stopping() -> bool:
    """STOPPING=1: the shutdown has begun."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC now, in microseconds)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def status(text: str) -> bool:
    """STATUS=<text>: a one-line status for ``systemctl status``."""
    return notify("STATUS=" + text.replace("\n", " "))


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when no watchdog is asked for.

    Follows sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive integer, and
    when WATCHDOG_PID is set the watchdog is meant for that process only.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec.isdigit() or int(raw_usec) <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid is not None and raw_pid.strip() != str(os.getpid()):
        return None
    return int(raw_usec) / 2 / 1_000_000


async def watchdog_loop(
    *,
    environ: Mapping[str, str] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Ping WATCHDOG=1 every WATCHDOG_USEC/2 until cancelled; return at once without one."""
    interval = watchdog_interval(environ)
    if interval is None:
        return
    log.debug("systemd.watchdog", interval_seconds=interval)
    while True:
        notify("WATCHDOG=1", environ=environ)
        await sleep(interval)
