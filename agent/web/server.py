"""The console's aiohttp application and its life on the caller's event loop.

Why aiohttp: its server runs on the loop that is already running (the daemon's
uvloop), with no second loop, no threads and no database layer; it bounds
request bodies (``client_max_size``) and header sizes itself. What it does not
do, the middlewares here do, in this order for every request:

1. ``guard``: security headers, a deadline for the whole request
   (``request_timeout``), and every error turned into one line for the user —
   ``{"error": "…"}`` under ``/api``, a page elsewhere. Refusals of the finance
   rules map to 4xx: bad input 400, an unknown account 404, a reference reused
   with other content or a closed account 409, a rule of the ledger (first
   top-up minimum, refund with calls up, a negative balance) 422; an unreachable
   ledger is 503. No traceback reaches a client.
2. ``authenticate``: a ``Bearer`` token under ``/api``, a session cookie for
   pages; 401 without valid credentials, 403 when the role is too low for the
   route (each handler states its role with :func:`needs`), 429 for a client
   past its failed sign-ins.

aiohttp has no timeout for a client that sends its request head slowly; the
console is meant to sit on loopback behind a TLS proxy, whose header timeout
covers that (the README's snippet sets it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent.finance import NotFound, Refused
from agent.ledger import (
    AccountClosed,
    IdempotencyConflict,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    RefusedOperation,
    UnknownAccount,
)
from agent.money import fixed
from agent.web.auth import (
    Credentials,
    FailureLimit,
    Principal,
    Role,
    Session,
    Sessions,
    load_credentials,
)
from agent.yamlfile import ConfigError

log = structlog.get_logger("callgate.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION_COOKIE = "callgate_session"


def needs(role: Role) -> Callable[[Handler], Handler]:
    """Mark the least role a handler needs (the default is ``read``)."""

    def mark(handler: Handler) -> Handler:
        handler.role = role  # type: ignore[attr-defined]
        return handler

    return mark


def public(handler: Handler) -> Handler:
    """A handler that needs no credentials (sign-in, the OpenAPI document)."""
    handler.public = True  # type: ignore[attr-defined]
    return handler


@dataclass
class Settings:
    max_body_bytes: int = 16_384
    request_timeout: float = 15.0
    failed_logins: int = 10
    failed_logins_window: float = 300.0
    session_hours: float = 8.0
    behind_proxy: bool = False  # a loopback peer's X-Forwarded-For names the client


class CredentialFiles:
    """The token and user files, read again when they change (kept as they were if broken)."""

    def __init__(self, tokens: Path | None, users: Path | None) -> None:
        self.paths = (tokens, users)
        self._stamp = self._now_stamp()
        self.current = load_credentials(tokens, users)

    def _now_stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self.paths:
            try:
                st = p.stat() if p is not None else None
                out.append((st.st_mtime_ns, st.st_size) if st else (0, 0))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def get(self) -> Credentials:
        stamp = self._now_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.current = load_credentials(*self.paths)
                log.info("web.credentials_reloaded", who=len(self.current.everyone()))
            except ConfigError as exc:
                log.error("web.credentials_kept_old", error=str(exc).replace("\n", "; "))
        return self.current


@dataclass
class Console:
    """What the handlers use: the ledger, the current policy, credentials, settings."""

    ledger: Ledger
    policy: Callable[[], Any]
    credentials: Callable[[], Credentials]
    settings: Settings = field(default_factory=Settings)
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    monotonic: Callable[[], float] = time.monotonic
    node: str = ""
    # Publish an event on MQTT as the CLI would (the daemon's publisher), or None.
    publish: Callable[[str, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.failures = FailureLimit(s.failed_logins, s.failed_logins_window)
        self.sessions = Sessions(s.session_hours * 3600)


CONSOLE = web.AppKey("console", Console)
PRINCIPAL = web.RequestKey("principal", Principal)
SESSION = web.RequestKey("session", Session)


def console(request: web.Request) -> Console:
    return request.app[CONSOLE]


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def client(request: web.Request) -> str:
    """The client's address, for the failed sign-in limit.

    Behind a reverse proxy every request comes from the proxy: with
    ``behind_proxy`` the last X-Forwarded-For entry (the address the proxy saw)
    counts instead, but only on a request from loopback, where the proxy is.
    """
    from agent.web.listen import is_loopback

    peer = request.remote or "unknown"
    if console(request).settings.behind_proxy and is_loopback(peer):
        forwarded = request.headers.get("X-Forwarded-For", "").rsplit(",", 1)[-1].strip()
        if forwarded:
            return forwarded[:64]
    return peer


# -- JSON ---------------------------------------------------------------------------
def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):  # an amount, as the CLI's --json gives it
        return fixed(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if hasattr(obj, "value"):
        return obj.value
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_default, ensure_ascii=False)


def json_response(obj: Any, status: int = 200, **kw: Any) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps, **kw)


# -- errors -------------------------------------------------------------------------
def status_of(exc: Exception) -> int:
    if isinstance(exc, NotFound | UnknownAccount):
        return 404
    if isinstance(exc, IdempotencyConflict | AccountClosed):
        return 409
    if isinstance(exc, RefusedOperation):
        return 422
    if isinstance(exc, LedgerUnavailable):
        return 503
    return 400


def one_line(text: str) -> str:
    return " ".join(text.split())[:500]


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "Cache-Control": "no-store",
}


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _error(request: web.Request, status: int, message: str,
           headers: dict[str, str] | None = None) -> web.StreamResponse:
    if _is_api(request):
        return json_response({"error": message}, status=status, headers=headers)
    from agent.web.pages import error_page

    return error_page(request, status, message, headers)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    c = console(request)
    try:
        length = request.content_length
        if length is not None and length > c.settings.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {c.settings.max_body_bytes} "
                                "bytes")
        async with asyncio.timeout(c.settings.request_timeout):
            response = await handler(request)
    except ApiError as exc:
        response = _error(request, exc.status, str(exc), exc.headers)
    except (Refused, LedgerError) as exc:
        response = _error(request, status_of(exc), one_line(str(exc)))
    except TimeoutError:
        response = _error(request, 503, "the request took too long; try again")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = {413: f"the request body is larger than {c.settings.max_body_bytes} bytes",
                404: "no such page", 405: "method not allowed"}.get(exc.status, exc.reason)
        response = _error(request, exc.status, text)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug must not reach the client as a traceback
        log.exception("web.error", path=request.path, error=str(exc))
        response = _error(request, 500, "internal error; the server log has the details")
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.handler
    if getattr(route, "public", False) or request.match_info.http_exception is not None:
        return await handler(request)
    c = console(request)
    who: Principal | None = None
    if _is_api(request):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        now = c.monotonic()
        wait = c.failures.blocked_for(client(request), now)
        if wait:
            seconds = str(math.ceil(wait))
            raise ApiError(429, f"too many failed authentications; retry in {seconds} s",
                           {"Retry-After": seconds})
        if scheme.lower() == "bearer" and token:
            who = c.credentials().by_token(token.strip())
        if who is None:
            c.failures.failed(client(request), now)
            log.warning("web.auth_failed", client=client(request), path=request.path)
            raise ApiError(401, "a valid API token is required (Authorization: Bearer TOKEN)",
                           {"WWW-Authenticate": 'Bearer realm="callgate"'})
    else:
        session = c.sessions.get(request.cookies.get(SESSION_COOKIE, ""), c.monotonic())
        if session is None:
            if request.method == "GET":
                raise web.HTTPSeeOther("/login")
            raise ApiError(401, "your session has ended; sign in again")
        request[SESSION] = session
        who = session.principal
    request[PRINCIPAL] = who
    wanted: Role = getattr(route, "role", Role.READ)
    if who.role < wanted:
        raise ApiError(403, f"{who.kind} {who.name!r} has the role {who.role.label}; "
                            f"this needs {wanted.label}")
    return await handler(request)


def build_app(c: Console) -> web.Application:
    from agent.web import api, compliance, compliance_pages, pages

    app = web.Application(middlewares=[guard, authenticate],
                          client_max_size=c.settings.max_body_bytes)
    app[CONSOLE] = c
    api.add_routes(app)
    compliance.add_routes(app)
    pages.add_routes(app)
    compliance_pages.add_routes(app)
    return app


async def start(c: Console, host: str, port: int, *,
                tls: ssl.SSLContext | None = None) -> web.AppRunner:
    """Serve on the running loop; the caller stops it with ``await runner.cleanup()``."""
    runner = web.AppRunner(build_app(c), access_log=None, handle_signals=False,
                           keepalive_timeout=15, max_line_size=8190, max_field_size=8190,
                           max_headers=64)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=64)
        await site.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise
    log.info("web.listening", address=", ".join(bound(runner)), tls=tls is not None)
    return runner


def bound(runner: web.AppRunner) -> list[str]:
    out = []
    for address in runner.addresses:
        host, port = address[0], address[1]
        out.append(f"{host}:{port}")
    return out


def bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _credential_file(base: Path, file: str | None, credential: str | None) -> Path | None:
    if credential is not None:
        from agent.web.auth import credential_path

        return credential_path(credential)
    return (base / file).resolve() if file is not None else None


def credential_files(spec: Any, base: Path) -> CredentialFiles:
    """The token and user files a ``web:`` section names, read and checked.

    :class:`~agent.yamlfile.ConfigError` for an unreadable or bad file, and for a
    console nobody could sign in to; ``callgate config check`` calls this too.
    """
    from agent.yamlfile import LocatedError

    tokens = _credential_file(base, spec.tokens_file, spec.tokens_credential)
    users = _credential_file(base, spec.users_file, spec.users_credential)
    if tokens is None and users is None:
        raise ConfigError([LocatedError("", None, "web", "no tokens_file and no users_file: "
                                        "nobody could sign in")])
    return CredentialFiles(tokens, users)


async def start_from_config(spec: Any, base: Path, ledger: Ledger, policy: Callable[[], Any],
                            *, node: str = "",
                            publish: Callable[[str, dict[str, Any]], None] | None = None,
                            ) -> web.AppRunner:
    """Start the console a ``web:`` section describes (paths relative to ``base``).

    Raises :class:`~agent.yamlfile.ConfigError` for unreadable or bad credential
    files and for a console nobody could sign in to, ``OSError`` when the
    address cannot be bound or the TLS files cannot be read.
    """
    from agent.config import _address

    files = credential_files(spec, base)
    settings = Settings(max_body_bytes=spec.max_body_bytes,
                        request_timeout=spec.request_timeout_seconds,
                        failed_logins=spec.failed_logins,
                        failed_logins_window=spec.failed_logins_window_seconds,
                        session_hours=spec.session_hours, behind_proxy=spec.behind_proxy)
    tls = None
    if spec.tls_cert is not None:
        tls = tls_context(base / spec.tls_cert, base / spec.tls_key)
    host, port = _address(spec.listen)
    c = Console(ledger=ledger, policy=policy, credentials=files.get, settings=settings,
                node=node, publish=publish)
    return await start(c, host, port, tls=tls)
