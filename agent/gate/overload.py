"""Overload control for the gate: which decisions may touch the ledger, and when.

Every gate request has a deadline: the moment the PBX connected (the adapter
stamps :attr:`~agent.calls.CallInfo.received_at`) plus the gatekeeper's share of
the decision budget. Time spent in the accept queue, reading the request or
waiting here is spent from that budget, so a gate offered more than it can do
answers late callers at once instead of serving everybody too late.

:class:`Slots` owns that choice, as a pure state machine over times passed
in (``loop.time()`` in the gatekeeper, a plain number in tests); the
gatekeeper's shell turns its verdicts into futures and timers:

* at most ``slots`` decisions read and write the ledger at once (more only
  lengthen every commit: the SQLite worker is one thread, the PostgreSQL pool is
  bounded); the others wait in one FIFO queue;
* a request is refused at arrival (:meth:`Slots.arrive` -> ``REFUSE``) when
  its deadline has passed already, or when every slot is busy and the queue
  ahead of it cannot drain in time: the wait is predicted from the measured
  time a decision holds its slot (an exponentially weighted mean), so the
  queue's bound follows the budget and the ledger's speed, with no fixed length;
* a waiter is handed a freed slot only if it can still finish in time, with
  ``HEADROOM`` (:meth:`Slots.release`); one that cannot is refused there, and
  one whose turn does not come before ``deadline - HEADROOM * service`` gives up
  (:meth:`Slots.give_up_at`, :meth:`Slots.leave`).

A refused request never reached the ledger: no read, no admission, no hold.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

DEFAULT_SLOTS = 32
"""Decisions in the ledger at once. bench/gate_esl.py --overload: served calls/s
at 2x and 5x the saturation rate were flat from 16 to 64 slots on the SQLite
ledger; 32 is the concurrency the gate benches saturate it with."""

SMOOTHING = 0.2
"""Weight of the newest service time in the mean: about the last ten decisions."""

HEADROOM = 2.0
"""A request goes to the ledger only while ``HEADROOM`` times the mean service time
still fits before its deadline: the mean is a mean, and under load one decision in
several takes twice as long. One that started too late times out in the ledger
(``ledger_unavailable``) after holding a slot that a request in time could have
used: bench/gate_ledger.py --overload showed such timeouts at 1.0."""


class Verdict(enum.Enum):
    START = "start"  # a slot is taken: go to the ledger now
    WAIT = "wait"  # queued: wait for release() to hand over a slot, until give_up_at()
    REFUSE = "refuse"  # cannot be decided in time: refuse now, ledger untouched


@dataclass(eq=False)
class Waiter:
    """One queued request (identity matters, not value: two may share a deadline)."""

    deadline: float
    token: object = None  # the shell's handle (its future)


@dataclass
class Slots:
    """The ledger slots, the FIFO queue before them and the measured service time."""

    slots: int = DEFAULT_SLOTS
    busy: int = 0
    service: float = 0.0  # mean seconds a decision holds its slot; 0 until one finished
    waiting: deque[Waiter] = field(default_factory=deque)
    refused: int = 0  # requests refused here, for metrics and tests

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1, not {self.slots}")

    def predicted_wait(self, ahead: int) -> float:
        """Seconds a request with ``ahead`` requests queued before it waits for a slot,
        if every slot is busy: each round of ``slots`` decisions takes one service time
        (the round in progress counted whole: the estimate errs toward refusing)."""
        return (ahead // self.slots + 1) * self.service

    def arrive(self, now: float, deadline: float) -> tuple[Verdict, Waiter | None]:
        """A request that needs the ledger arrives; ``WAIT`` comes with its queue entry."""
        if now >= deadline:
            self.refused += 1
            return Verdict.REFUSE, None
        if self.busy < self.slots and not self.waiting:
            # A free slot is tried even if the mean says it cannot finish in time: the
            # mean may be stale (a slow moment since gone), and only decisions that
            # run can bring it down again. The ledger calls keep the deadline anyway.
            self.busy += 1
            return Verdict.START, None
        if now + self.predicted_wait(len(self.waiting)) + HEADROOM * self.service > deadline:
            self.refused += 1
            return Verdict.REFUSE, None
        waiter = Waiter(deadline)
        self.waiting.append(waiter)
        return Verdict.WAIT, waiter

    def give_up_at(self, waiter: Waiter) -> float:
        """When a waiter not yet handed a slot must stop waiting to be answered in time."""
        return waiter.deadline - HEADROOM * self.service

    def leave(self, waiter: Waiter) -> None:
        """A waiter gave up (its give_up_at passed): it is refused, ledger untouched."""
        try:
            self.waiting.remove(waiter)
        except ValueError:
            return
        self.refused += 1

    def release(self, now: float, held: float | None) -> tuple[list[Waiter], list[Waiter]]:
        """A slot is free: ``held`` seconds of ledger work finished (None: the slot was
        handed back unused). Returns (started, refused): the waiters now holding a
        slot, and those passed over because they could no longer finish in time."""
        self.busy -= 1
        if held is not None:
            self.service = held if self.service == 0.0 else (
                SMOOTHING * held + (1 - SMOOTHING) * self.service)
        started: list[Waiter] = []
        refused: list[Waiter] = []
        while self.waiting and self.busy < self.slots:
            waiter = self.waiting.popleft()
            if now + HEADROOM * self.service >= waiter.deadline:
                refused.append(waiter)
                self.refused += 1
                continue
            self.busy += 1
            started.append(waiter)
        return started, refused
