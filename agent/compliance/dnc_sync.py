"""Keeps a :class:`~agent.compliance.live_dnc.LiveDnc` in step with the ledger (the shell).

How it stays fresh: at start, one consistent snapshot of every live entry and
the change number it is complete up to; then every ``interval`` seconds (0.25
by default) one indexed query for the changes after that number
(``dnc_changes(seq)``: an empty result on a quiet ledger, a primary-key range
scan otherwise), applied in order. A ``callgate dnc add`` or a complaint on any
node is therefore in force on every node sharing the ledger within about
``interval`` plus one query, without a policy reload, and the gate itself
never asks the ledger about do-not-call: a decision looks in memory.

When the ledger is unreachable, or a poll fails in any other way, the last
copy stays in force (entries are never forgotten because of an outage), the
failure is logged once per outage,
and :meth:`DncSync.age` — exported as ``callgate_live_dnc_age_seconds`` —
grows; the sync catches up from its last ``seq`` as soon as the ledger
answers. Calls are then gated by the policy's fail mode as ever, since the
same outage also stops the balance read. If the ledger cannot be read at
start, the agent starts with an empty copy and loads the snapshot as soon as
it can (``loaded`` is False meanwhile, and ``/healthz`` says so).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from agent.compliance.live_dnc import LiveDnc
from agent.ledger import Ledger, LedgerError

log = structlog.get_logger("callgate.dnc")

POLL_INTERVAL = 0.25
BATCH = 10_000


class DncSync:
    def __init__(self, ledger: Ledger, live: LiveDnc | None = None, *,
                 interval: float = POLL_INTERVAL,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.live = live if live is not None else LiveDnc()
        self.interval = interval
        self._monotonic = monotonic
        self.loaded = False
        self.synced_at: float | None = None
        self._failing = False

    async def load(self) -> None:
        """The full snapshot; :class:`LedgerError` if the ledger cannot be read."""
        seq, keys = await self.ledger.dnc_snapshot()
        self.live.load(seq, keys)
        self.loaded = True
        self.synced_at = self._monotonic()
        log.info("dnc.loaded", entries=len(self.live), seq=seq,
                 mbytes=round(self.live.nbytes / 1e6, 1))

    async def poll(self) -> int:
        """Apply every change committed since the last one seen; how many were applied."""
        if not self.loaded:
            await self.load()
            return 0
        applied = 0
        while True:
            changes = await self.ledger.dnc_changes(self.live.seq, BATCH)
            applied += self.live.apply(changes)
            if len(changes) < BATCH:
                break
        self.synced_at = self._monotonic()
        if applied:
            log.info("dnc.synced", applied=applied, seq=self.live.seq, entries=len(self.live))
        return applied

    def age(self) -> float:
        """Seconds since the copy was last known to be complete (inf: never)."""
        if self.synced_at is None:
            return float("inf")
        return self._monotonic() - self.synced_at

    async def run(self) -> None:
        """Poll until cancelled; an unreachable ledger keeps the last copy.

        Any error is logged once per streak (an unexpected one with its
        traceback: it is a bug, not an outage) and the next poll tries again:
        the sync is a daemon loop, and it must never end the daemon.
        """
        while True:
            try:
                await self.poll()
            except Exception as exc:
                if not self._failing:
                    outage = isinstance(exc, LedgerError | OSError | TimeoutError)
                    (log.warning if outage else log.exception)(
                        "dnc.sync_failed", error=str(exc) or type(exc).__name__,
                        entries=len(self.live), seq=self.live.seq)
                self._failing = True
            else:
                if self._failing:
                    log.info("dnc.sync_restored", seq=self.live.seq)
                self._failing = False
            await asyncio.sleep(self.interval)
