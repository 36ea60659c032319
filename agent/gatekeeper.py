"""The gate's shell: what a FastAGI or outbound-socket request actually runs.

Reads the account's state from the ledger (available balance, live calls,
recent attempts) within the decision budget, calls the pure
:func:`~agent.gate.decide.decide`, then, for an allowed outbound call, admits
it in the ledger (an atomic concurrency check across every node sharing the
ledger) and logs the attempt for the frequency and rate caps. A ledger that
does not answer in time is ``ledger_unavailable``, and the policy's fail mode
decides. The decision budget runs from the moment the PBX connected
(``CallInfo.received_at``, stamped by the adapter at accept), and at most
``slots`` decisions use the ledger at once (:mod:`agent.gate.overload`): a
request that could not be decided before its deadline is refused at once as
``overloaded`` without touching the ledger (no read, no hold), again with the
policy's fail mode (``open``: allowed unmetered for ``fail_open_max_seconds``,
as for ``ledger_unavailable``). The first billing unit is held at admission, and ``max_seconds`` of
an allowed call is the talk time already paid (that first unit, plus the ring
allowance): that is the limit the dialplan arms, and the meter extends it as
the call pays on. A stopping agent refuses new calls (``shutting_down``). An
emergency number is allowed before any of this: no ledger read, no hold, no
attempt logged.

The compliance rules ride on the same single read: the ledger's suspension,
attempts in the last second (``cps_limit``) and from this caller ID in the last
hour and since local midnight (``caller_id_cap``; the caller ID is counted as
the account normalises it). Live do-not-call entries are looked up in memory
(``live_dnc``, kept fresh by :class:`~agent.compliance.dnc_sync.DncSync`): no
extra round trip, and they still refuse while the ledger is unreachable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from agent.calls import CallInfo, Direction
from agent.gate.decide import decide
from agent.gate.decision import AccountState, Decision, DncView, Reason
from agent.gate.overload import DEFAULT_SLOTS, Slots, Verdict
from agent.gate.policy import AccountPolicy, Policy
from agent.ledger import Admission, CallRecord, Ledger, LedgerError
from agent.meter.clock import Clock

log = structlog.get_logger("callgate.gate")

CPS_WINDOW = timedelta(seconds=1)  # cps_limit counts allowed attempts in the last second
OVERLOAD_LOG_EVERY = 1.0  # seconds: overload refusals are summed into one warning per second

OnDecision = Callable[[CallInfo, Decision, float], None]


def state_request(account: AccountPolicy, call: CallInfo, now: datetime) -> dict[str, Any]:
    """What :meth:`Ledger.account_state` must count for this account's rules and call."""
    zone = account.hours.timezone
    caller_cap = account.caller_id_cap
    return {
        "account_since": account.rate_cap.since(now, zone) if account.rate_cap else None,
        "callee_since": account.callee_cap.since(now, zone) if account.callee_cap else None,
        "destination": account.normalize(call.destination),
        "cps_since": now - CPS_WINDOW if account.cps_limit is not None else None,
        "caller": account.normalize(call.caller_id) if caller_cap is not None else None,
        "caller_hour_since": caller_cap.hour_since(now)
        if caller_cap is not None and caller_cap.per_hour is not None else None,
        "caller_day_since": caller_cap.day_since(now, zone)
        if caller_cap is not None and caller_cap.per_day is not None else None,
    }


class Gatekeeper:
    def __init__(
        self,
        *,
        ledger: Ledger,
        policy: Callable[[], Policy],
        clock: Clock,
        node: str,
        budget: float = 0.45,
        ring_allowance: int = 0,
        on_decision: OnDecision | None = None,
        live_dnc: DncView | None = None,
        slots: int = DEFAULT_SLOTS,
    ) -> None:
        self.live_dnc = live_dnc
        self.ledger = ledger
        self.policy = policy
        self.clock = clock
        self.node = node
        self.budget = budget
        self.ring_allowance = ring_allowance
        self.on_decision = on_decision
        self.accepting = True
        self.slots = Slots(slots)
        self._overload_logged = 0.0  # loop time of the last gate.overloaded warning
        self._overload_unlogged = 0  # refusals since then

    async def __call__(self, call: CallInfo) -> Decision:
        started = time.perf_counter()
        decision = await self._decide(call)
        elapsed = time.perf_counter() - started
        if decision.reason is Reason.OVERLOADED and not decision.allow:
            # Summed into one gate.overloaded warning a second (_overloaded): under
            # overload a line per refusal is CPU taken from the calls still served.
            if self.on_decision is not None:
                self.on_decision(call, decision, elapsed)
            return decision
        log.info("gate.decision", call_id=call.call_id, account=decision.account,
                 result=decision.result, reason=decision.reason.value,
                 max_seconds=decision.max_seconds, paid_seconds=decision.paid_seconds,
                 until_close=decision.until_close, caller=call.caller_id,
                 callee=call.destination, ms=round(elapsed * 1000, 2))
        if self.on_decision is not None:
            self.on_decision(call, decision, elapsed)
        return decision

    async def _decide(self, call: CallInfo) -> Decision:
        now = self.clock.now()
        policy = self.policy()
        if call.direction is Direction.INBOUND:
            return decide(policy, AccountState(balance=None), call, now)
        account = policy.match_account(call)
        if policy.emergency_number(call, account) is not None:
            # Allowed before anything else, even while stopping: no ledger read, no
            # admission, no hold, no attempt logged (never charged, never counted).
            return decide(policy, AccountState(balance=None), call, now)
        if not self.accepting:
            return Decision(False, Reason.SHUTTING_DOWN, "the agent is stopping")
        if account is None:
            return decide(policy, AccountState(balance=None), call, now)
        # One deadline for the whole decision (waiting for a slot, read and admission
        # together), from when the PBX connected, so the answer is ours (logged,
        # counted, published) before the adapter gives up and within the PBX's wait.
        loop = asyncio.get_running_loop()
        arrived = loop.time() if call.received_at is None else call.received_at
        deadline = arrived + self.budget
        if not await self._slot(loop, deadline):
            return self._overloaded(policy, account, call, now, loop.time() - arrived)
        began = loop.time()
        try:
            return await self._ledger_decision(policy, account, call, now, deadline)
        finally:
            self._release(loop, loop.time() - began)

    async def _slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> bool:
        """Take a ledger slot now, or wait in line for one while that can still pay off.
        False: refused (see :class:`~agent.gate.overload.Slots`), ledger untouched."""
        verdict, waiter = self.slots.arrive(loop.time(), deadline)
        if verdict is Verdict.START:
            return True
        if verdict is Verdict.REFUSE or waiter is None:
            return False
        future: asyncio.Future[bool] = loop.create_future()
        waiter.token = future
        try:
            async with asyncio.timeout_at(self.slots.give_up_at(waiter)):
                return await future
        except BaseException as exc:
            # Timed out or cancelled: a slot handed over in the same instant goes
            # back; a waiter still queued leaves the queue.
            if future.done() and not future.cancelled() and future.result():
                self._release(loop, None)
            else:
                self.slots.leave(waiter)
            if isinstance(exc, TimeoutError):
                return False
            raise

    def _release(self, loop: asyncio.AbstractEventLoop, held: float | None) -> None:
        """Give a slot back and wake the waiters it hands slots to (or refuses)."""
        now = loop.time()
        started, refused = self.slots.release(now, held)
        while True:
            for waiter in refused:
                future = waiter.token
                assert isinstance(future, asyncio.Future)
                if not future.done():
                    future.set_result(False)
            gone = 0
            for waiter in started:
                future = waiter.token
                assert isinstance(future, asyncio.Future)
                if future.done():  # its caller was cancelled meanwhile: pass the slot on
                    gone += 1
                else:
                    future.set_result(True)
            if not gone:
                return
            started, refused = [], []
            for _ in range(gone):
                more, passed = self.slots.release(now, None)
                started += more
                refused += passed

    def _overloaded(self, policy: Policy, account: AccountPolicy, call: CallInfo,
                    now: datetime, waited: float) -> Decision:
        """The answer for a request that cannot be decided in time, under the reason
        ``overloaded``: the policy's fail mode decides, as for an unreachable ledger.

        Failing closed it is refused without running the rules: under overload the
        refusals must cost next to nothing (decide() is most of a refusal's CPU, and
        each one taken from the decisions that can still be served). Failing open the
        rules that need no ledger (hours, destinations, do-not-call) run first, and a
        call they refuse keeps its own reason.
        """
        self._overload_unlogged += 1
        loop_now = asyncio.get_running_loop().time()
        if loop_now - self._overload_logged >= OVERLOAD_LOG_EVERY:
            log.warning("gate.overloaded", refused=self._overload_unlogged,
                        waiting=len(self.slots.waiting), busy=self.slots.busy,
                        service_ms=round(self.slots.service * 1000, 1),
                        waited_ms=round(waited * 1000, 1))
            self._overload_logged, self._overload_unlogged = loop_now, 0
        if policy.prepaid.fail_mode != "open":
            return Decision(False, Reason.OVERLOADED,
                            f"the gate is overloaded: no decision within the {self.budget:g} s"
                            " budget (fail closed)", account.id)
        decision = decide(policy, AccountState(balance=None, live_dnc=self.live_dnc), call, now)
        if decision.reason is not Reason.LEDGER_UNAVAILABLE:
            return decision
        return replace(decision, reason=Reason.OVERLOADED,
                       message=f"the gate is overloaded; allowed for {decision.max_seconds} s "
                               "because the policy fails open")

    async def _ledger_decision(self, policy: Policy, account: AccountPolicy, call: CallInfo,
                               now: datetime, deadline: float) -> Decision:
        """Holding a slot: read the account, decide, admit or log the refusal."""
        try:
            async with asyncio.timeout_at(deadline):
                state = await self._state(account, call, now)
        except (TimeoutError, LedgerError) as exc:
            log.warning("gate.ledger_unavailable", call_id=call.call_id, error=str(exc)
                        or type(exc).__name__)
            state = AccountState(balance=None, live_dnc=self.live_dnc)
        decision = decide(policy, state, call, now)
        if decision.allow and decision.tariff is not None and state.balance is not None:
            return await self._admit(account, call, decision, now, deadline)
        if state.balance is not None:  # the ledger answers: log the refusal for the caps
            await self._log_attempt(account, call, decision, now, deadline)
        return decision

    async def _state(self, account: AccountPolicy, call: CallInfo, now: Any) -> AccountState:
        """One ledger read: balance, live calls and the attempts the caps count."""
        snapshot = await self.ledger.account_state(account.id,
                                                   **state_request(account, call, now))
        return AccountState(snapshot.available, snapshot.live_calls,
                            snapshot.callee_attempts, snapshot.account_attempts,
                            snapshot.closed, snapshot.suspended, snapshot.cps_attempts,
                            snapshot.caller_hour_attempts, snapshot.caller_day_attempts,
                            self.live_dnc)

    async def _admit(self, account: AccountPolicy, call: CallInfo, decision: Decision,
                     now: Any, deadline: float) -> Decision:
        """One ledger write: admit (concurrency across nodes), hold the first unit, log it.

        Reserving the first billing unit at setup (RFC 4006's initial request) makes
        the PBX-side limit handed to the dialplan time already paid for, so an agent
        that dies before the answer cannot give talk time away.
        """
        tariff = decision.tariff
        assert tariff is not None
        record = CallRecord(
            call_id=call.call_id, account=account.id, node=self.node, caller=call.caller_id,
            callee=decision.destination, tariff_name=tariff.name, rate=tariff.rate,
            increment=tariff.increment, minimum=tariff.minimum, admitted_at=now,
        )
        try:
            async with asyncio.timeout_at(deadline):
                outcome = await self.ledger.admit_and_hold(
                    record, account.max_concurrent_calls, tariff.first_unit_cost,
                    tariff.first_unit_seconds, reason=decision.reason.value,
                    caller_key=account.normalize(call.caller_id))
        except (TimeoutError, LedgerError) as exc:
            # A timed-out write may still commit: the meter's reconciliation closes an
            # admitted call the PBX never shows (its hold is released, nothing charged).
            log.warning("gate.admit_failed", call_id=call.call_id, error=str(exc)
                        or type(exc).__name__)
            return replace(decision, allow=False, reason=Reason.LEDGER_UNAVAILABLE,
                           message="the ledger could not admit the call", max_seconds=None)
        if outcome is Admission.LINES_BUSY:
            return replace(decision, allow=False, reason=Reason.CONCURRENCY_LIMIT,
                           message=f"all {account.max_concurrent_calls} lines of {account.id} "
                                   "are in use", max_seconds=None)
        if outcome is Admission.NO_FUNDS:
            return replace(decision, allow=False, reason=Reason.INSUFFICIENT_BALANCE,
                           message="the balance was spent by other calls meanwhile",
                           max_seconds=None)
        # The dialplans arm this limit when the call is allowed, so ring time counts
        # against it; ring_allowance lends ringing some time (each second of it is a
        # second a dead agent could give away), the meter resets it at answer.
        limit = tariff.first_unit_seconds
        if decision.max_seconds is not None:
            limit = min(limit, decision.max_seconds)
        return replace(decision, max_seconds=limit + self.ring_allowance)

    async def _log_attempt(self, account: AccountPolicy, call: CallInfo, decision: Decision,
                           now: Any, deadline: float) -> None:
        if not decision.destination:
            return
        try:
            # Within the deadline too: the refusal is due to the PBX before it is due
            # to the caps' count.
            async with asyncio.timeout_at(deadline):
                await self.ledger.record_attempt(account.id, decision.destination, now,
                                                 decision.allow, decision.reason.value,
                                                 account.normalize(call.caller_id))
        except (TimeoutError, LedgerError) as exc:  # caps degrade, calls do not
            log.warning("gate.attempt_not_logged", account=account.id,
                        error=str(exc) or type(exc).__name__)
