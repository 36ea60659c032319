"""The early warning: per account, short calls and the answer rate over a rolling window (pure).

Short, unanswered bursts are what precede complaints. For every call this
agent settles, :meth:`RiskMonitor.observe` keeps (when, answered, short) in the
account's window (the policy's ``risk.window``; older calls fall out) and
compares two shares with the policy's limits, once the window holds at least
``min_calls`` calls:

- short-call share: answered calls shorter than ``short_call_seconds``, of the
  answered calls; above ``max_short_call_percent`` raises ``short_calls``;
- answer rate: answered calls of all calls ended; below
  ``min_answer_percent`` raises ``answer_rate``.

Alerts are edge-triggered: one ``raised`` alert when a share crosses its
limit, one ``cleared`` when it is back within it, never one per call. The
comparisons are exact integer arithmetic. The window is per agent (the calls
this node metered); on several nodes each watches its own share of traffic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from agent.gate.policy import RiskLimits


@dataclass(frozen=True, slots=True)
class RiskReading:
    account: str
    calls: int
    answered: int
    short: int

    @property
    def answer_percent(self) -> Decimal | None:
        return None if not self.calls else _percent(self.answered, self.calls)

    @property
    def short_percent(self) -> Decimal | None:
        return None if not self.answered else _percent(self.short, self.answered)


@dataclass(frozen=True, slots=True)
class RiskAlert:
    account: str
    kind: str  # "short_calls" | "answer_rate"
    state: str  # "raised" | "cleared"
    value: Decimal  # percent, one decimal
    limit: int  # percent
    reading: RiskReading

    def payload(self, limits: RiskLimits) -> dict[str, object]:
        return {"account": self.account, "kind": self.kind, "state": self.state,
                "percent": self.value, "limit_percent": self.limit,
                "calls": self.reading.calls, "answered": self.reading.answered,
                "short": self.reading.short, "window_seconds": limits.window,
                "short_call_seconds": limits.short_call_seconds}


def _percent(part: int, whole: int) -> Decimal:
    return (Decimal(part * 100) / Decimal(whole)).quantize(Decimal("0.1"))


class RiskMonitor:
    def __init__(self) -> None:
        self._calls: dict[str, deque[tuple[datetime, bool, bool]]] = {}
        self._counts: dict[str, list[int]] = {}  # account -> [calls, answered, short]
        self._raised: set[tuple[str, str]] = set()

    def observe(self, limits: RiskLimits, account: str, at: datetime, answered: bool,
                billsec: int) -> list[RiskAlert]:
        """One settled call; the alerts whose state changed because of it."""
        short = answered and billsec < limits.short_call_seconds
        window = self._calls.setdefault(account, deque())
        counts = self._counts.setdefault(account, [0, 0, 0])
        window.append((at, answered, short))
        counts[0] += 1
        counts[1] += answered
        counts[2] += short
        self._evict(account, at - timedelta(seconds=limits.window))
        return self._evaluate(limits, self.reading(account))

    def _evict(self, account: str, before: datetime) -> None:
        window, counts = self._calls[account], self._counts[account]
        while window and window[0][0] < before:
            _, answered, short = window.popleft()
            counts[0] -= 1
            counts[1] -= answered
            counts[2] -= short

    def reading(self, account: str) -> RiskReading:
        calls, answered, short = self._counts.get(account, (0, 0, 0))
        return RiskReading(account, calls, answered, short)

    def readings(self) -> list[RiskReading]:
        return [self.reading(a) for a in sorted(self._counts)]

    def _evaluate(self, limits: RiskLimits, r: RiskReading) -> list[RiskAlert]:
        alerts: list[RiskAlert] = []
        enough = r.calls >= limits.min_calls
        if limits.max_short_call_percent is not None:
            limit = limits.max_short_call_percent
            over = enough and r.short * 100 > limit * r.answered
            alerts += self._edge(r, "short_calls", over, r.short_percent, limit)
        if limits.min_answer_percent is not None:
            limit = limits.min_answer_percent
            under = enough and r.answered * 100 < limit * r.calls
            alerts += self._edge(r, "answer_rate", under, r.answer_percent, limit)
        return alerts

    def _edge(self, r: RiskReading, kind: str, bad: bool, value: Decimal | None,
              limit: int) -> list[RiskAlert]:
        key = (r.account, kind)
        was = key in self._raised
        if bad == was:
            return []
        if bad:
            self._raised.add(key)
        else:
            self._raised.discard(key)
        return [RiskAlert(r.account, kind, "raised" if bad else "cleared",
                          value if value is not None else Decimal(0), limit, r)]

    def raised(self, account: str, kind: str) -> bool:
        return (account, kind) in self._raised
