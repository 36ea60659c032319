"""What every ``callgate`` command shares: locating config, policy and ledger, errors, output.

Resolution order for each setting: the command-line option, then the
environment variable (``CALLGATE_CONFIG``, ``CALLGATE_POLICY``,
``CALLGATE_LEDGER``), then the agent config file (``-c``; default
``/etc/callgate/agent.yaml`` when it exists), then the built-in default.
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

from agent.yamlfile import ConfigError

if TYPE_CHECKING:
    import argparse

    from agent.config import AgentConfig
    from agent.gate.policy import Policy

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
    args._agent_config = config
    return config


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
        raise UsageError(f"policy {path} is invalid:\n{exc}") from None


def ledger_url(args: argparse.Namespace) -> str:
    named = getattr(args, "ledger", None) or os.environ.get("CALLGATE_LEDGER")
    if named:
        return str(named)
    config = agent_config(args)
    if config is not None:
        return config.ledger
    return DEFAULT_LEDGER


def operator(args: argparse.Namespace) -> str:
    """Who is acting: ``--operator NAME``, else the invoking user's login name."""
    named = getattr(args, "operator", None)
    if named is not None:
        if not named.strip():
            raise UsageError("--operator must not be blank")
        return str(named).strip()
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise UsageError("cannot tell who you are: give --operator NAME") from None


def now() -> datetime:
    """The wall clock, aware UTC: the CLI is the imperative shell."""
    return datetime.now(UTC)


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
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
