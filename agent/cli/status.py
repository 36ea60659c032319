"""``callgate status``: is the running daemon healthy? (exit 0 healthy, 1 degraded, 2 down).

It reads ``GET /status`` from the daemon's own loopback metrics listener, found
from the agent config's ``metrics: listen:`` (or given with ``--listen``, for a
monitoring user who may not read ``agent.yaml``). That listener already exists,
is bounded and loopback-only, and a TCP connection to 127.0.0.1 needs no file
permission, group or root: any local user (the daemon's user in a second
shell, an ops account, a monitoring check) can ask. The daemon answers from
what it holds in memory plus a ledger probe, so the answer is what the running
process sees, not what the CLI could guess from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from agent.cli.common import UsageError, agent_config, print_json
from agent.money import clip

EXIT = {"healthy": 0, "degraded": 1, "down": 2}


def register(sub: Any) -> None:
    status = sub.add_parser("status", help="the running daemon's health (0 ok, 1 degraded, 2 down)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--timeout", type=_seconds, default=5.0,
                        help=f"seconds to wait for the daemon (default 5, at most {MAX_TIMEOUT})")
    status.add_argument("--listen", metavar="HOST:PORT",
                        help="the daemon's metrics listener, instead of reading it from the "
                             "agent config (for a user who may not read agent.yaml)")
    status.set_defaults(func=_status)


MAX_TIMEOUT = 3600  # a health check that waits longer is a hung monitoring job


def _seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds above 0 (nan, inf, 0 or -1 would never
    or always time out)."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--timeout {clip(text)!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT:  # False for nan too
        raise UsageError(f"--timeout {clip(text)!r} must be more than 0 and at most "
                         f"{MAX_TIMEOUT} seconds")
    return value


def _endpoint(args: argparse.Namespace) -> tuple[str, int]:
    if args.listen:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--listen {clip(args.listen)!r} is not HOST:PORT "
                             "(e.g. 127.0.0.1:9108)")
        return _loopback(host.strip("[]") or "127.0.0.1"), int(port)
    config = agent_config(args)
    if config is None:
        raise UsageError("status needs the agent config: -c /etc/callgate/agent.yaml "
                         "(or CALLGATE_CONFIG)")
    if config.spec.metrics is None:
        raise UsageError(f"{config.path}: no 'metrics:' section; callgate status reads the "
                         "daemon's loopback metrics listener (add metrics: {listen: "
                         "'127.0.0.1:9108'})")
    host, port = config.listen(config.spec.metrics.listen)
    return _loopback(host), port


def _loopback(host: str) -> str:
    """Where to connect for a listener bound to ``host`` (a wildcard means this machine)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host


async def fetch_status(host: str, port: int, timeout: float) -> dict[str, Any]:
    """The daemon's status document; ``OSError``/``TimeoutError``/``ValueError`` if none."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /status HTTP/1.1\r\nHost: callgate\r\nConnection: close\r\n\r\n")
            await writer.drain()
            data = await reader.read(1 << 22)
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200 " not in status_line + " ":
        raise ValueError(f"the listener answered {status_line!r} "
                         "(a daemon older than this command, or not callgate)")
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("the listener's answer is not a status document")
    return doc


async def _status(args: argparse.Namespace) -> int:
    host, port = _endpoint(args)
    where = f"{host}:{port}"
    try:
        doc = await fetch_status(host, port, args.timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        why = f"no answer within {args.timeout:g} s" if isinstance(exc, TimeoutError) else (
            str(exc) or type(exc).__name__)
        if args.json:
            print_json({"state": "down", "listener": where, "error": why})
        else:
            print(f"down: no callgate daemon answering on {where} ({why})")
        return EXIT["down"]
    state = doc.get("state") if doc.get("state") in EXIT else "degraded"
    if args.json:
        print_json(doc)
    else:
        print(render(doc, where))
    return EXIT[str(state)]


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _time(value: Any) -> str:
    """An ISO time from the daemon, to the second, in UTC."""
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(doc: dict[str, Any], where: str) -> str:
    """The text form: a verdict line, then one line per part."""
    lines = [f"{doc.get('state', 'degraded')}: callgate {doc.get('version')} on node "
             f"{doc.get('node')} (pid {doc.get('pid')}, {where})"]
    lines += [f"  ! {p}" for p in doc.get("problems") or []]
    lines.append(f"  up since    {_time(doc.get('started_at'))} "
                 f"({_ago(doc.get('uptime_seconds', 0))})")
    pbx = doc.get("pbx") or {}
    lines.append(f"  pbx         {pbx.get('kind')}: "
                 + ("connected" if pbx.get("connected") else "NOT connected")
                 + (" but SLOW (answering late)" if pbx.get("state") == "slow" else "")
                 + (f"; {pbx.get('command_timeouts', 0)} command timeouts, "
                    f"{pbx.get('reconnects', 0)} reconnects"
                    if pbx.get("command_timeouts") or pbx.get("reconnects") else ""))
    ledger = doc.get("ledger") or {}
    lines.append(f"  ledger      {ledger.get('url')}: " + (
        f"reachable ({ledger.get('probe_ms')} ms)" if ledger.get("reachable")
        else f"NOT reachable: {ledger.get('error')}"))
    policy = doc.get("policy") or {}
    checksum = (policy.get("sha256") or "?")[:16]
    lines.append(f"  policy      {policy.get('file')} sha256 {checksum}… loaded "
                 f"{_time(policy.get('loaded_at'))} ({policy.get('accounts')} accounts)")
    refused = doc.get("last_refused_reload")
    if refused:
        lines.append(f"  refused     reload at {_time(refused.get('at'))} ({refused.get('why')}), "
                     f"{refused.get('error_count')} error(s):")
        lines += [f"                {e}" for e in refused.get("errors") or []]
    mqtt = doc.get("mqtt")
    if mqtt is None:
        lines.append("  mqtt        not configured")
    else:
        lines.append(f"  mqtt        {'connected' if mqtt.get('connected') else 'NOT connected'}"
                     f", buffer {mqtt.get('depth')}, dropped {mqtt.get('dropped')}, "
                     f"published {mqtt.get('published')}")
    live = doc.get("live_calls") or {}
    by_account = ", ".join(f"{a} {n}" for a, n in (live.get("by_account") or {}).items())
    lines.append(f"  live calls  {live.get('total', 0)}" + (f" ({by_account})" if by_account
                                                            else ""))
    for window, counts in (doc.get("recent") or {}).items():
        refused_by = ", ".join(f"{r} {n}" for r, n in (counts.get("refused") or {}).items())
        cut_by = ", ".join(f"{r} {n}" for r, n in (counts.get("cutoffs") or {}).items())
        lines.append(
            f"  last {window:<6} {counts.get('decisions', 0)} decision(s): "
            f"{counts.get('allowed', 0)} allowed"
            + (f", refused {refused_by}" if refused_by else ", none refused")
            + f"; cut-offs {sum((counts.get('cutoffs') or {}).values())}"
            + (f" ({cut_by})" if cut_by else "")
            + (f", {counts.get('late_cutoffs')} late" if counts.get("late_cutoffs") else ""))
    return "\n".join(lines)
