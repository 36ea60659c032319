"""Who may use the finance console: API tokens, users, roles, sessions, failed-login limits.

Credentials live in two small text files (or systemd credentials), one entry a
line, ``#`` starting a comment; nothing secret is ever stored or logged in the
clear:

- tokens: ``NAME ROLE sha256:HEX`` — the SHA-256 of the token. A token is 32
  random bytes (``callgate web token`` makes one), so a fast hash is enough: no
  dictionary can guess it, and the check costs microseconds per request.
- users: ``NAME ROLE $argon2id$…`` — an argon2id hash of a password a person
  chose (``callgate web user`` writes it), slow on purpose.

Roles are ordered: ``read`` (balances, statements, live calls) < ``finance``
(also the money postings) < ``admin`` (also the list of who has access).

Everything here is pure apart from reading the files: the clock is passed in,
so the failed-login limit and session expiry are tested without sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import argon2

from agent.yamlfile import ConfigError, LocatedError


class Role(IntEnum):
    READ = 1
    FINANCE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


ROLES = {r.label: r for r in Role}
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")


@dataclass(frozen=True)
class Principal:
    """Someone authenticated: a token's or a user's name (the postings' operator) and role."""

    name: str
    role: Role
    kind: str  # "token" or "user"


def new_token() -> str:
    return "cg_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


_hasher = argon2.PasswordHasher()


def password_hash(password: str) -> str:
    return _hasher.hash(password)


def _check_name(name: str) -> str | None:
    if not name or len(name) > 64 or not set(name) <= _NAME_OK:
        return f"name {name[:64]!r} must be 1-64 letters, digits or _.@-"
    return None


@dataclass
class Credentials:
    """The tokens (by hash) and users (by name) the console accepts."""

    tokens: dict[str, Principal] = field(default_factory=dict)
    users: dict[str, tuple[Principal, str]] = field(default_factory=dict)

    def by_token(self, token: str) -> Principal | None:
        if not token.startswith("cg_") or len(token) > 200:
            return None
        return self.tokens.get(token_hash(token))

    def by_password(self, name: str, password: str) -> Principal | None:
        entry = self.users.get(name)
        if entry is None or len(password) > 1024:
            # The same work as a wrong password, so a name's existence does not show.
            _verify(_DUMMY, password[:1024])
            return None
        principal, stored = entry
        return principal if _verify(stored, password) else None

    def everyone(self) -> list[Principal]:
        return sorted([*self.tokens.values(), *(p for p, _ in self.users.values())],
                      key=lambda p: (p.kind, p.name))


_DUMMY = _hasher.hash(secrets.token_hex(16))


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except argon2.exceptions.VerificationError:
        return False
    except argon2.exceptions.InvalidHashError:
        return False


def _parse(text: str, source: str, kind: str, out: Credentials) -> list[LocatedError]:
    errors = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            errors.append(LocatedError(source, number, "",
                                       f"expected 'NAME ROLE HASH', got {len(parts)} field(s)"))
            continue
        name, role_text, secret = parts
        problem = _check_name(name)
        role = ROLES.get(role_text)
        if problem is None and role is None:
            problem = f"role {role_text[:20]!r} is not one of read, finance, admin"
        if problem is None and kind == "token" and not (
                secret.startswith("sha256:") and len(secret) == 71):
            problem = "the hash must be sha256: and 64 hex digits (callgate web token makes one)"
        if problem is None and kind == "user" and not secret.startswith("$argon2"):
            problem = "the hash must be an argon2 hash (callgate web user makes one)"
        if problem is None and (name in out.users if kind == "user" else any(
                p.name == name for p in out.tokens.values())):
            problem = f"{kind} {name!r} is listed twice"
        if problem is not None:
            errors.append(LocatedError(source, number, name, problem))
            continue
        assert role is not None
        principal = Principal(name, role, kind)
        if kind == "token":
            out.tokens[secret.lower()] = principal
        else:
            out.users[name] = (principal, secret)
    return errors


def _read(path: Path, what: str) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([LocatedError(str(path), None, what,
                                        f"cannot read: {exc.strerror or exc}")]) from None
    if mode & 0o004:
        raise ConfigError([LocatedError(str(path), None, what,
                                        "is readable by everyone; chmod o-r it")])
    return text


def credential_path(name: str) -> Path:
    """A systemd credential (``LoadCredential=``) by name."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError([LocatedError("", None, name,
                                        "a credential needs systemd's $CREDENTIALS_DIRECTORY "
                                        "(LoadCredential= in the unit)")])
    return Path(directory) / name


def load_credentials(tokens: Path | None, users: Path | None) -> Credentials:
    """Read both files; every bad line is reported (file and line), none is skipped."""
    out = Credentials()
    errors: list[LocatedError] = []
    if tokens is not None:
        errors += _parse(_read(tokens, "tokens"), str(tokens), "token", out)
    if users is not None:
        errors += _parse(_read(users, "users"), str(users), "user", out)
    if errors:
        raise ConfigError(errors)
    return out


class FailureLimit:
    """At most ``limit`` failed sign-ins per client in ``window`` seconds; then refuse.

    Memory is bounded: at most ``clients`` addresses are tracked (the oldest
    forgotten first), each with at most ``limit`` timestamps.
    """

    def __init__(self, limit: int = 10, window: float = 60.0, clients: int = 10_000) -> None:
        self.limit, self.window, self.clients = limit, window, clients
        self._failures: dict[str, deque[float]] = {}

    def blocked_for(self, client: str, now: float) -> float:
        """Seconds until ``client`` may try again (0: it may now)."""
        times = self._failures.get(client)
        if not times:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window - now)

    def failed(self, client: str, now: float) -> None:
        times = self._failures.pop(client, None) or deque(maxlen=self.limit)
        times.append(now)
        self._failures[client] = times  # re-inserted: the dict keeps recency order
        while len(self._failures) > self.clients:
            self._failures.pop(next(iter(self._failures)))


@dataclass
class Session:
    principal: Principal
    csrf: str
    expires: float
    flash: str = ""  # one message for the next page (what the last form did)


class Sessions:
    """Signed-in browsers, kept in memory (a restart signs everyone out)."""

    def __init__(self, lifetime: float = 8 * 3600, limit: int = 10_000) -> None:
        self.lifetime, self.limit = lifetime, limit
        self._by_id: dict[str, Session] = {}

    def start(self, principal: Principal, now: float) -> str:
        for sid in [s for s, v in self._by_id.items() if v.expires <= now]:
            del self._by_id[sid]
        while len(self._by_id) >= self.limit:
            self._by_id.pop(next(iter(self._by_id)))
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = Session(principal, secrets.token_urlsafe(32), now + self.lifetime)
        return sid

    def get(self, sid: str, now: float) -> Session | None:
        session = self._by_id.get(sid)
        if session is None:
            return None
        if session.expires <= now:
            del self._by_id[sid]
            return None
        return session

    def end(self, sid: str) -> None:
        self._by_id.pop(sid, None)


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
