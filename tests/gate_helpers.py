"""Build policies for tests from YAML text, and requests/states with sane defaults."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from agent.calls import CallInfo, Direction
from agent.gate.decision import AccountState
from agent.gate.policy import Policy, load_policy

SHANGHAI = ZoneInfo("Asia/Shanghai")

BASE = """\
version: 1
accounts:
  acme:
    name: ACME
    caller_ids: ["02158880000"]
    max_concurrent_calls: 2
"""


def write_policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def policy_from(tmp_path: Path, text: str = BASE) -> Policy:
    return load_policy(write_policy(tmp_path, text))


def local(text: str) -> datetime:
    """A Shanghai wall-clock time as an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).astimezone(UTC)


def call(destination: str = "13800138000", *, caller: str = "02158880000",
         accountcode: str = "acme", direction: Direction = Direction.OUTBOUND,
         endpoint: str = "") -> CallInfo:
    return CallInfo("c1", direction, caller, destination, accountcode, endpoint)


def rich(balance: str | None = "100", **kw: object) -> AccountState:
    return AccountState(balance=None if balance is None else Decimal(balance), **kw)  # type: ignore[arg-type]
