"""A finance console on loopback for the web tests: policy, tokens, users, a real server.

``console_at(url, tmp)`` starts the console (agent/web) on port 0 of 127.0.0.1
on the running loop, over a fresh ledger at ``url`` and a policy of two
accounts, with one token per role and one user; the test talks to it over
real HTTP (aiohttp's client, or a browser).
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.gate.policy import load_policy
from agent.ledger import open_ledger
from agent.web.auth import new_token, password_hash, token_hash
from agent.web.server import Console, CredentialFiles, Settings, bound_port, start

POLICY = """\
version: 1
prepaid:
  first_topup_minimum: 100
  complaint_penalty: 1000
complaints: {suspend_after: 2, period: 30d}
accounts:
  acme:
    name: ACME Telemarketing
    caller_ids: ["02158880000"]
  beta:
    name: Beta Sales
    caller_ids: ["02158880001"]
"""
PASSWORD = "correct horse battery"


class Clock:
    """A monotonic clock the test moves (failed sign-in windows, sessions)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    base: str
    console: Console
    tokens: dict[str, str]  # role -> token
    policy_path: Path
    ledger_url: str
    clock: Clock
    extra: dict[str, Any] = field(default_factory=dict)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def write_files(tmp: Path) -> tuple[Path, Path, Path, dict[str, str]]:
    policy = tmp / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    tokens = {role: new_token() for role in ("read", "finance", "admin")}
    names = {"read": "auditor", "finance": "payments", "admin": "boss"}
    tokens_file = tmp / "tokens.txt"
    tokens_file.write_text("# name role hash\n" + "".join(
        f"{names[r]} {r} {token_hash(t)}\n" for r, t in tokens.items()))
    users_file = tmp / "users.txt"
    users_file.write_text(f"clerk finance {password_hash(PASSWORD)}\n"
                          f"viewer read {password_hash(PASSWORD)}\n")
    for f in (tokens_file, users_file):
        f.chmod(0o600)
    return policy, tokens_file, users_file, tokens


@contextlib.asynccontextmanager
async def console_at(url: str, tmp: Path, settings: Settings | None = None,
                     wrap: Any = None) -> AsyncIterator[Served]:
    policy_path, tokens_file, users_file, tokens = write_files(tmp)
    policy = load_policy(policy_path)
    ledger = await open_ledger(url)
    clock = Clock()
    files = CredentialFiles(tokens_file, users_file)
    c = Console(ledger=wrap(ledger) if wrap else ledger, policy=lambda: policy,
                credentials=files.get, settings=settings or Settings(), monotonic=clock)
    runner = await start(c, "127.0.0.1", 0)
    try:
        yield Served(f"http://127.0.0.1:{bound_port(runner)}", c, tokens, policy_path, url,
                     clock)
    finally:
        await runner.cleanup()
        await ledger.close()
