"""The daemon's status document (``GET /status``) and the verdict on it (pure).

The daemon keeps one :class:`StatusBoard`: when it started, which policy is in
force (file, SHA-256, loaded at), the last refused reload with its located
errors, and per-minute counts of gate decisions and cut-offs for the last
:data:`KEEP_MINUTES` minutes (bounded: one small dict per minute). The daemon
adds what it reads live (PBX link, a ledger probe, the MQTT buffer, live
calls) and serves the whole as JSON on its loopback metrics listener;
``callgate status`` fetches it and :func:`verdict` turns it into
healthy / degraded with the reasons, the same way on both sides.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RECENT_WINDOWS = (1, 5, 15)  # minutes reported
KEEP_MINUTES = max(RECENT_WINDOWS) + 1


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class _Minute:
    decisions: Counter[str] = field(default_factory=Counter)  # "ALLOW:allowed" -> n
    cutoffs: Counter[str] = field(default_factory=Counter)  # reason -> n
    late_cutoffs: int = 0


class StatusBoard:
    """What the daemon remembers for ``/status``; times come from the caller (injected clock)."""

    def __init__(self, started_at: datetime, version: str, node: str) -> None:
        self.started_at = started_at
        self.version = version
        self.node = node
        self.policy: dict[str, Any] | None = None
        self.refused: dict[str, Any] | None = None
        self._minutes: dict[int, _Minute] = {}

    # -- recording ---------------------------------------------------------------
    def policy_loaded(self, path: Path, at: datetime, accounts: int) -> None:
        self.policy = {"file": str(path), "sha256": file_sha256(path), "loaded_at": at,
                       "accounts": accounts}

    def reload_refused(self, path: Path, at: datetime, why: str, errors: list[str]) -> None:
        self.refused = {"file": str(path), "sha256": file_sha256(path), "at": at, "why": why,
                        "errors": errors[:20], "error_count": len(errors)}

    def _minute(self, at: datetime) -> _Minute:
        key = int(at.timestamp() // 60)
        minute = self._minutes.get(key)
        if minute is None:
            minute = self._minutes[key] = _Minute()
            for old in [k for k in self._minutes if k <= key - KEEP_MINUTES]:
                del self._minutes[old]
        return minute

    def decision(self, at: datetime, result: str, reason: str) -> None:
        self._minute(at).decisions[f"{result}:{reason}"] += 1

    def cutoff(self, at: datetime, reason: str, late: bool) -> None:
        minute = self._minute(at)
        minute.cutoffs[reason] += 1
        minute.late_cutoffs += int(late)

    # -- reading -----------------------------------------------------------------
    def recent(self, now: datetime) -> dict[str, Any]:
        """Counts for the last 1, 5 and 15 minutes: the N whole minutes before this one and
        the current minute so far (minute buckets keep this cheap and bounded)."""
        current = int(now.timestamp() // 60)
        out: dict[str, Any] = {}
        for window in RECENT_WINDOWS:
            decisions: Counter[str] = Counter()
            cutoffs: Counter[str] = Counter()
            late = 0
            for key, minute in self._minutes.items():
                if current - window <= key <= current:
                    decisions.update(minute.decisions)
                    cutoffs.update(minute.cutoffs)
                    late += minute.late_cutoffs
            allowed = sum(n for k, n in decisions.items() if k.startswith("ALLOW:"))
            refused = {k.split(":", 1)[1]: n for k, n in sorted(decisions.items())
                       if k.startswith("DENY:")}
            out[f"{window}m"] = {
                "decisions": allowed + sum(refused.values()), "allowed": allowed,
                "refused": refused, "cutoffs": dict(sorted(cutoffs.items())),
                "late_cutoffs": late,
            }
        return out

    def document(self, now: datetime) -> dict[str, Any]:
        """The recorded part of ``/status`` (the daemon adds the live readings)."""
        return {
            "version": self.version, "node": self.node, "started_at": self.started_at,
            "uptime_seconds": int((now - self.started_at).total_seconds()), "at": now,
            "policy": self.policy, "last_refused_reload": self.refused,
            "recent": self.recent(now),
        }


def verdict(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """``("healthy"|"degraded", problems)`` from a status document (its JSON form)."""
    problems: list[str] = []
    if not doc.get("ready"):
        problems.append("not ready yet (waiting for the PBX link)")
    if doc.get("accepting") is False:
        problems.append("stopping: new calls are refused as shutting_down")
    pbx = doc.get("pbx") or {}
    if not pbx.get("connected"):
        problems.append("PBX not connected")
    elif pbx.get("state") == "slow":
        problems.append("the PBX answers commands late (link kept, not reconnected; "
                        f"{pbx.get('command_timeouts', 0)} command timeouts so far)")
    ledger = doc.get("ledger") or {}
    if not ledger.get("reachable"):
        problems.append(f"ledger not reachable: {ledger.get('error') or 'no answer'}")
    mqtt = doc.get("mqtt")
    if mqtt is not None and not mqtt.get("connected"):
        problems.append(f"MQTT broker not connected ({mqtt.get('depth', 0)} event(s) waiting)")
    refused, policy = doc.get("last_refused_reload"), doc.get("policy") or {}
    if refused and _when(refused.get("at")) > _when(policy.get("loaded_at")):
        problems.append(f"the policy on disk was refused ({refused.get('error_count')} "
                        "error(s)); the previous one is still in force")
    return ("degraded" if problems else "healthy"), problems


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
