"""What every ``callgate`` command shares: locating config, policy and ledger, errors, output.

Also the two rules every command that writes keeps: a ledger is opened with
:func:`open_store` / :class:`OpenedLedger`, which never create one (only ``run``
and ``ledger init`` do), and what it records names its author with
:func:`operator_name` (``--operator``, else the invoking user's login name).

Resolution order for each setting: the command-line option, then the
environment variable (``CALLGATE_CONFIG``, ``CALLGATE_POLICY``,
``CALLGATE_LEDGER``), then the agent config file (``-c``; default
``/etc/callgate/agent.yaml`` when it exists), then the built-in default. The
same for every command: ``run`` and ``config check`` take ``--policy`` and
``--ledger`` over the agent config's ``policy:`` and ``ledger:`` too
(:func:`overridden`).

Every command's ``--from``/``--to``/``--at``/``--since`` is read by
:mod:`agent.days` (shared with the web console's query parameters), and only
there: a bad or out-of-range day is a :class:`~agent.days.DayError`, one line
and exit 2 like a :class:`UsageError`.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from agent.money import clip, fixed
from agent.yamlfile import ConfigError

if TYPE_CHECKING:
    import argparse

    from agent.config import AgentConfig
    from agent.gate.policy import Policy
    from agent.ledger import Ledger

DEFAULT_CONFIG = Path("/etc/callgate/agent.yaml")
DEFAULT_LEDGER = "sqlite:///var/lib/callgate/ledger.db"


class UsageError(Exception):
    """Bad usage or refused input: exit status 2 and a one-line message."""


class CheckFailed(Exception):
    """A check did not pass (e.g. an invalid policy): exit status 1."""


def agent_config(args: argparse.Namespace) -> AgentConfig | None:
    """The agent config named by ``-c``/``CALLGATE_CONFIG``, or the default if present."""
    from agent.config import load_agent_config

    cached: AgentConfig | None = getattr(args, "_agent_config", None)
    if cached is not None:
        return cached
    named = getattr(args, "config", None) or os.environ.get("CALLGATE_CONFIG")
    path = Path(named) if named else DEFAULT_CONFIG
    if not path.exists():
        if named:
            raise UsageError(f"agent config {path} does not exist")
        return None
    try:
        config = load_agent_config(path)
    except ConfigError as exc:
        raise UsageError(str(exc).replace("\n", "; ")) from None
    overridden(config, args)
    args._agent_config = config
    return config


def overridden(config: AgentConfig, args: argparse.Namespace) -> list[str]:
    """Put ``--policy``/``--ledger`` (or their environment variables) in place of the
    agent config's own, as for every other command, ``run`` and ``config check``
    included; what was replaced, one note each."""
    notes = []
    named = getattr(args, "policy", None) or os.environ.get("CALLGATE_POLICY")
    if named and Path(named).resolve() != config.policy_path:
        source = "--policy" if getattr(args, "policy", None) else "CALLGATE_POLICY"
        notes.append(f"policy: {named} (from {source}; {config.path} names "
                     f"{config.policy_path})")
        config.policy_path = Path(named).resolve()
    url = getattr(args, "ledger", None) or os.environ.get("CALLGATE_LEDGER")
    if url and url != config.ledger:
        source = "--ledger" if getattr(args, "ledger", None) else "CALLGATE_LEDGER"
        notes.append(f"ledger: {clip(url, 200)} (from {source}; {config.path} names "
                     f"{clip(config.ledger, 200)})")
        config.ledger = url
    return notes


def policy_path(args: argparse.Namespace) -> Path:
    named = getattr(args, "policy", None) or os.environ.get("CALLGATE_POLICY")
    if named:
        return Path(named)
    config = agent_config(args)
    if config is not None:
        return config.policy_path
    raise UsageError(
        "no policy given: use --policy PATH, CALLGATE_POLICY, or -c CONFIG with a 'policy:' key"
    )


def load_policy(args: argparse.Namespace) -> Policy:
    """Load and validate the policy; a bad one is a :class:`UsageError` with its located errors."""
    from agent.gate.policy import load_policy as load

    path = policy_path(args)
    try:
        return load(path)
    except ConfigError as exc:
        first = clip(str(exc.errors[0]), 300) if exc.errors else "unreadable"
        more = len(exc.errors) - 1
        raise UsageError(
            f"policy {path} is invalid: {first}"
            + (f" (and {more} more; see callgate policy check)" if more > 0 else "")
        ) from None


def ledger_url(args: argparse.Namespace) -> str:
    named = getattr(args, "ledger", None) or os.environ.get("CALLGATE_LEDGER")
    if named:
        return str(named)
    config = agent_config(args)
    if config is not None:
        return config.ledger
    return DEFAULT_LEDGER


def operator_name(args: argparse.Namespace) -> str:
    """Who is running this command, recorded with what it writes (postings, complaints, …).

    ``--operator NAME``; else the invoking user's login name: ``$SUDO_USER`` under
    sudo (the person, not root), else the login name of the process's user.
    """
    from agent.ledger._rules import OPERATOR_LIMIT

    name = getattr(args, "operator", None)
    if name is None:
        name = os.environ.get("SUDO_USER") or ""
        if not name:
            try:
                name = getpass.getuser()
            except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
                name = f"uid {os.getuid()}"
    if not name or name != name.strip() or not name.isprintable() or len(name) > OPERATOR_LIMIT:
        raise UsageError(
            f"--operator {clip(name)!r} must be a printable name without leading or trailing "
            f"blanks, at most {OPERATOR_LIMIT} characters"
        )
    return name


async def open_store(args: argparse.Namespace, *, create: bool = False) -> Ledger:
    """Open the configured ledger; only ``create=True`` (``ledger init``) may make a new one.

    Every CLI command opens its ledger here, so a mistyped path or database is
    refused with the place it looked at (exit 2), never silently created.
    """
    from agent.ledger import LedgerError, open_ledger

    url = ledger_url(args)
    try:
        return await open_ledger(url, create=create)
    except LedgerError as exc:
        raise UsageError(clip(str(exc), 400)) from None


class OpenedLedger:
    """``async with OpenedLedger(args) as ledger``: an existing ledger; its errors, one line."""

    def __init__(self, args: argparse.Namespace, *, create: bool = False) -> None:
        self.args = args
        self.create = create
        self.ledger: Ledger | None = None

    async def __aenter__(self) -> Ledger:
        self.ledger = await open_store(self.args, create=self.create)
        return self.ledger

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        from agent.ledger import LedgerError

        if self.ledger is not None:
            await self.ledger.close()
        if isinstance(exc, LedgerError):
            raise UsageError(clip(str(exc), 400)) from None


def try_policy(args: argparse.Namespace) -> Policy | None:
    """The policy if one is configured and valid, else None (finance must not depend on it)."""
    try:
        return load_policy(args)
    except UsageError:
        return None


def account_zone(args: argparse.Namespace, account: str, named: str | None = None
                 ) -> ZoneInfo:
    """The timezone an account's dates and times are shown in (:func:`agent.finance.zone`).

    ``--tz`` when given; else the account's zone in the policy; else (an account
    no longer in the policy, or no valid policy) UTC, which the output names.
    """
    from agent.finance import zone

    if named is not None and not named.strip():
        raise UsageError("--tz must not be blank (an IANA name such as Asia/Shanghai)")
    return zone(None if named else try_policy(args), account, named)


def now() -> datetime:
    """The wall clock, aware UTC: the CLI is the imperative shell."""
    return datetime.now(UTC)


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):  # every Decimal the CLI prints is an amount of money
        return fixed(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value"):
        return obj.value
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, default=_default, ensure_ascii=False, indent=None)
    sys.stdout.write("\n")
