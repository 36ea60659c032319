"""``callgate serve`` and ``callgate web token|user``: the finance console without a PBX.

``serve`` runs only the console (agent/web) against the existing ledger and
the policy of the config (or ``--ledger``/``--policy``; like every command but
``run`` and ``ledger init`` it never creates a ledger): for a finance host with no PBX, or to
keep the console in its own process beside the daemon. The daemon serves the
same console itself when its config has a ``web:`` section. ``serve`` re-reads
the policy when the file changes (an invalid edit keeps the old one) and the
token and user files likewise. With an ``mqtt:`` section it publishes the
events the CLI would for the same actions (``complaint``, ``account``) through
one publisher kept for its lifetime.

``web token NAME --role R`` makes a token: the token is printed once, and the
line for the tokens file holds only its hash. ``web user NAME --role R`` reads a
password (twice from a terminal, else one line of standard input) and prints the
users file line with its argon2 hash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent import eventloop
from agent.cli.common import (
    CheckFailed,
    UsageError,
    agent_config,
    load_policy,
    open_store,
    policy_path,
    print_json,
)


def register(sub: Any) -> None:
    from agent.cli import _not_blank  # blank is refused, never "not given" (the default)

    serve = sub.add_parser("serve", help="run only the finance console (HTTP API and pages)")
    serve.add_argument("--listen", type=_not_blank("--listen"),
                       help="HOST:PORT (default: web.listen, else 127.0.0.1:8090)")
    serve.add_argument("--tokens", type=_not_blank("--tokens"),
                       help="tokens file (default: web.tokens_file)")
    serve.add_argument("--users", type=_not_blank("--users"),
                       help="users file (default: web.users_file)")
    serve.add_argument("--allow-plaintext-remote", action="store_true",
                       help="serve a non-loopback address without TLS (behind a TLS proxy)")
    serve.set_defaults(func=_serve)

    group = sub.add_parser("web", help="make API tokens and console users")
    commands = group.add_subparsers(dest="web_command", required=True, parser_class=type(group))
    token = commands.add_parser("token", help="make an API token and its tokens-file line")
    token.add_argument("name")
    token.add_argument("--role", choices=["read", "finance", "admin"], required=True)
    token.add_argument("--json", action="store_true")
    token.set_defaults(func=_token)
    user = commands.add_parser("user", help="hash a password into a users-file line")
    user.add_argument("name")
    user.add_argument("--role", choices=["read", "finance", "admin"], required=True)
    user.set_defaults(func=_user)


def _name(name: str) -> str:
    from agent.web.auth import _check_name

    problem = _check_name(name)
    if problem:
        raise UsageError(problem)
    return name


def _token(args: argparse.Namespace) -> int:
    from agent.web.auth import new_token, token_hash

    token = new_token()
    line = f"{_name(args.name)} {args.role} {token_hash(token)}"
    if args.json:
        print_json({"name": args.name, "role": args.role, "token": token, "line": line})
    else:
        print(f"token (shown once; give it to the client): {token}")
        print(f"line for the tokens file: {line}")
    return 0


def _user(args: argparse.Namespace) -> int:
    from agent.web.auth import password_hash

    name = _name(args.name)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 12:
        raise UsageError("a password must be at least 12 characters")
    print(f"{name} {args.role} {password_hash(password)}")
    return 0


class _PolicyFile:
    """The policy, loaded again when its file changes; a bad edit keeps the old one.

    Called by every request on the event loop, so the reload runs in a thread
    (as the daemon's policy watcher does): a policy with large do-not-call files
    takes seconds to load, and requests are answered from the policy in force
    meanwhile. Without a running loop (a script, a test) it loads in line.
    """

    def __init__(self, path: Path, policy: Any, load: Callable[[Path], Any] | None = None) -> None:
        self.path, self.policy = path, policy
        self._load = load
        self._stamp = self._read_stamp()
        self._reloading: asyncio.Task[None] | None = None

    def _read_stamp(self) -> tuple[int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    def __call__(self) -> Any:
        if self._reloading is not None and not self._reloading.done():
            return self.policy  # one reload at a time; an edit meanwhile is seen after it
        stamp = self._read_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._reload_now()
            else:
                self._reloading = loop.create_task(self._reload_off_loop(),
                                                   name="policy-reload")
        return self.policy

    def _loader(self) -> Callable[[Path], Any]:
        if self._load is None:
            from agent.gate.policy import load_policy

            self._load = load_policy
        return self._load

    def _reload_now(self) -> None:
        from agent.yamlfile import ConfigError

        try:
            self.policy = self._loader()(self.path)
        except (ConfigError, OSError) as exc:
            self._refused(exc)

    async def _reload_off_loop(self) -> None:
        from agent.yamlfile import ConfigError

        try:
            self.policy = await asyncio.to_thread(self._loader(), self.path)
        except (ConfigError, OSError) as exc:
            self._refused(exc)
        except Exception:  # a task nobody awaits: log it, keep the policy in force
            structlog.get_logger("callgate.web").exception(
                "web.policy_reload_failed", path=str(self.path))

    def _refused(self, exc: Exception) -> None:  # logged once per edit, as the daemon does
        structlog.get_logger("callgate.web").error(
            "web.policy_refused", path=str(self.path),
            error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            action="the previous policy stays in force")


def _spec(args: argparse.Namespace) -> tuple[Any, Path]:
    """The ``web:`` section with the command line's overrides, and the base for its paths."""
    from pydantic import ValidationError

    from agent.config import WebSpec

    config = agent_config(args)
    base = config.path.parent if config is not None else Path.cwd()
    spec = (config.spec.web if config is not None and config.spec.web is not None
            else WebSpec())
    values = spec.model_dump()
    if args.listen:
        values["listen"] = args.listen
    if args.tokens:
        values["tokens_file"] = str(Path(args.tokens).resolve())
        values["tokens_credential"] = None
    if args.users:
        values["users_file"] = str(Path(args.users).resolve())
        values["users_credential"] = None
    if args.allow_plaintext_remote:
        values["allow_plaintext_remote"] = True
    try:
        return WebSpec(**values), base
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"web{'.' + where if where else ''}: {first['msg']}") from None


def _serve(args: argparse.Namespace) -> int:
    from agent.logs import configure_logging

    spec, base = _spec(args)
    config = agent_config(args)
    log = config.spec.log if config is not None else None
    configure_logging(log.format if log else "auto", log.level if log else "info")
    policy = _PolicyFile(policy_path(args), load_policy(args))
    from agent.web.server import credential_files
    from agent.yamlfile import ConfigError

    try:  # checked before the ledger is opened: a console nobody can sign in to is useless
        credential_files(spec, base)
    except ConfigError as exc:
        raise UsageError(str(exc).replace("\n", "; ")) from None
    publisher = None
    if config is not None and config.spec.mqtt is not None:
        from agent.daemon import _make_publisher

        try:
            publisher = _make_publisher(config)
        except (ValueError, OSError) as exc:
            raise UsageError(f"mqtt: {exc}") from None
    return eventloop.run(_run_console(args, spec, base, policy,
                                      config.node if config is not None else "", publisher))


async def _run_console(args: argparse.Namespace, spec: Any, base: Path, policy: Any,
                       node: str, publisher: Any = None) -> int:
    from agent.web.server import start_from_config
    from agent.yamlfile import ConfigError

    ledger = await open_store(args)  # an existing ledger only: serve never creates one
    mqtt = asyncio.create_task(publisher.run(), name="mqtt") if publisher else None
    try:
        try:
            runner = await start_from_config(
                spec, base, ledger, policy, node=node,
                publish=publisher.publish if publisher is not None else None)
        except ConfigError as exc:
            raise UsageError(str(exc).replace("\n", "; ")) from None
        except OSError as exc:
            raise CheckFailed(f"callgate: cannot serve on {spec.listen}: "
                              f"{exc.strerror or exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        if mqtt is not None:
            with contextlib.suppress(Exception):
                await publisher.flush(timeout=5)  # what the console published, sent
            mqtt.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await mqtt
        await ledger.close()
    return 0
