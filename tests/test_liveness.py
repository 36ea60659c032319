"""The slow-or-dead rules both PBX links follow (agent/pbx/liveness.py)."""

from __future__ import annotations

import socket

from agent.pbx.liveness import CommandTimer, LinkHealth, is_dead, keepalive


def test_only_silence_while_a_reply_is_due_is_death() -> None:
    # nothing awaited: an idle link is never dead by this rule (the probe makes it awaited)
    assert not is_dead(now=100, last_rx=0, awaiting_since=None, dead_after=30)
    # a reply due for 40 s, but bytes (events, late replies) came 5 s ago: slow, alive
    assert not is_dead(now=100, last_rx=95, awaiting_since=60, dead_after=30)
    # silent for 40 s, but the reply has been due only 10 s (idle link, fresh command)
    assert not is_dead(now=100, last_rx=60, awaiting_since=90, dead_after=30)
    # silent for 30 s with a reply due as long: dead
    assert is_dead(now=100, last_rx=70, awaiting_since=70, dead_after=30)


def test_the_command_timeout_backs_off_while_slow_and_resets() -> None:
    timer = CommandTimer(5.0, 30.0)
    for expected in (10.0, 20.0, 30.0, 30.0):
        timer.missed()
        assert timer.current == expected
    timer.answered()
    assert timer.current == 5.0


def test_keepalive_sets_a_user_timeout_from_dead_after() -> None:
    with socket.socket() as sock:
        keepalive(sock, 30.0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
    keepalive(None, 30.0)  # no socket (a transport without one): nothing to do


def test_health_snapshot_is_what_status_shows() -> None:
    assert LinkHealth().snapshot() == {"state": "down", "command_timeouts": 0,
                                       "reconnects": 0, "late_replies": 0}
