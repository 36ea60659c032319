"""ESL commands as bytes: what a client writes to FreeSWITCH.

A command is one line (or, for ``sendmsg``, a header block) ended by a blank
line (traces 01b, 06a). Arguments come from our own code and from channel data;
a newline inside one would end the command early and smuggle a second one, so
every builder refuses ``\\r`` and ``\\n``.
"""

from __future__ import annotations

from collections.abc import Iterable


class CommandError(ValueError):
    """A command argument that cannot be sent safely."""


def _check(*parts: str) -> None:
    for part in parts:
        if "\n" in part or "\r" in part:
            raise CommandError(f"newline in ESL command argument {part!r}")


def command(line: str) -> bytes:
    """One command line, e.g. ``exit``, ``resume``, ``myevents``, ``linger 5``."""
    _check(line)
    return line.encode() + b"\n\n"


def auth(password: str) -> bytes:
    return command(f"auth {password}")


def api(cmd: str) -> bytes:
    """Blocking API call; the reply is an ``api/response`` (trace 07)."""
    return command(f"api {cmd}")


def bgapi(cmd: str, job_uuid: str | None = None) -> bytes:
    """Background API call; ``command/reply`` carries the ``Job-UUID`` and a
    BACKGROUND_JOB event the output (trace 04b). With ``job_uuid`` the client
    picks the id itself (``Job-UUID`` header), so it can correlate before the reply."""
    if job_uuid is None:
        return command(f"bgapi {cmd}")
    _check(cmd, job_uuid)
    return f"bgapi {cmd}\nJob-UUID: {job_uuid}\n\n".encode()


def events(names: Iterable[str], fmt: str = "plain") -> bytes:
    """Subscribe: ``event plain CHANNEL_CREATE ...`` (traces 01b, 07)."""
    if fmt not in ("plain", "json"):
        raise CommandError(f"event format must be plain or json, not {fmt!r}")
    return command(" ".join(["event", fmt, *names]))


def filter_add(header: str, value: str) -> bytes:
    return command(f"filter {header} {value}")


def filter_delete(header: str, value: str = "") -> bytes:
    return command(f"filter delete {header} {value}".rstrip())


def sendmsg_execute(app: str, arg: str = "", uuid: str = "") -> bytes:
    """Run a dialplan application on the channel (traces 06a-06c)."""
    _check(app, arg, uuid)
    lines = [f"sendmsg {uuid}".rstrip(), "call-command: execute", f"execute-app-name: {app}"]
    if arg:
        lines.append(f"execute-app-arg: {arg}")
    return ("\n".join(lines) + "\n\n").encode()


def sendmsg_hangup(cause: str, uuid: str = "") -> bytes:
    _check(cause, uuid)
    head = f"sendmsg {uuid}".rstrip()
    return f"{head}\ncall-command: hangup\nhangup-cause: {cause}\n\n".encode()
