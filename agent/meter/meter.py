"""The meter: answered calls charged increment by increment, cut off the moment they stop paying.

Reserve ahead, settle exactly (DESIGN: Metering and cut-off; RFC 4006-style
online charging, TigerBeetle-style two-phase holds):

1. On answer the first billing unit is held in one ledger transaction, and only
   then is the PBX told the call's hard deadline: answer + paid + grace. A crash
   can therefore only end a call early, never leave talk time unpaid.
2. ``lead`` seconds before each paid boundary the next increment is held. If it
   cannot be (balance spent, account suspended, calling window closing with
   ``at_window_end: cut``), the deadline stays where it is, a cut-off warning is
   published and the meter hangs up itself at the boundary (belt and braces:
   the PBX would end the call ``grace`` seconds later anyway).
3. On hang-up the call is settled from the PBX's own ``billsec``: the rated
   amount is charged from the holds and the rest released, in one transaction.
   Up to ``grace`` seconds past the paid boundary are the provider's tolerance
   for signalling delay: not billed (flag ``grace``) when the meter had stopped
   extending the call or the PBX ended it itself (its deadline, a manager's
   Hangup; not a party). A call that talked on while the meter was merely late
   for its next increment started that increment and pays it, reserved at
   settlement (flag ``reserved_at_settle``); only what the balance cannot pay
   there is forgiven.
4. Every write carries an idempotency key (call id + step; call id for the
   settlement), so duplicate or replayed PBX events never charge twice.

The five money invariants (see :mod:`agent.ledger.model`) are what the
simulation tests check: exact charge from billsec; no talk beyond what was
paid (billsec <= paid + grace, billed <= paid); no overdraw through calls;
postings sum to balances; no open hold for an ended call.

Recovery: on every :class:`~agent.calls.PbxConnected` (start and reconnect) and
every ``reconcile_interval``, the PBX's live calls are compared with the
ledger's open calls of this node: calls still up are adopted and metered on
from their real answer time; calls gone while nobody watched are settled from
what is known and flagged; answered outbound calls the agent never saw are
metered from their elapsed time or cut, as ``unseen_calls`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import structlog

from agent.calls import (
    ActiveCall,
    CallAnswered,
    CallEnded,
    CallEvent,
    CallGone,
    CallInfo,
    CallRequested,
    Direction,
    HangupCause,
    PbxConnected,
    PbxControl,
    PbxDisconnected,
    PbxError,
)
from agent.gate.policy import Policy
from agent.ledger import (
    CallRecord,
    CallStatus,
    Cdr,
    IdempotencyConflict,
    Ledger,
    LedgerError,
    LedgerUnavailable,
)
from agent.meter.clock import Clock
from agent.meter.low_balance import BalancesHook, LowBalanceWatch
from agent.rating import Tariff, billed_seconds, rate

log = structlog.get_logger("callgate.meter")

Publish = Callable[[str, dict[str, Any]], None]
WarningHook = Callable[[str, int], Awaitable[None]]


@dataclass(frozen=True)
class MeterSettings:
    grace_seconds: int = 2
    lead_seconds: int = 5
    warning_seconds: int = 0  # > 0: call the warning hook this long before a cut-off
    reconcile_interval: float = 30.0
    # A call the PBX no longer lists is given this long for its real hang-up event
    # (the Asterisk adapter holds one up to cdr_wait, 2 s, for its Cdr) before it
    # is settled as vanished; the check then queues behind every event already in.
    absent_grace: float = 5.0
    settled_memory: float = 600.0  # seconds a settled call id is remembered (late events)
    admitted_timeout: float = 30.0  # an admitted call the PBX never shows is dropped after this
    # FreeSWITCH's `show channels` reads its core database, written asynchronously
    # (the traces show it about a second behind): a channel created this recently
    # may be missing from a list without being gone, so it is looked for again.
    listing_lag: float = 2.0
    ledger_retry: float = 1.0
    unseen_calls: Literal["meter", "cut"] = "meter"
    # How often every account's balance is looked at for the low-balance warning
    # (finance postings come from the CLI, another process) and handed to
    # on_balances (the metrics' gauges): agent.yaml meter.balance_check_seconds.
    balance_check_interval: float = 10.0


@dataclass(eq=False)
class LiveCall:
    """A call the meter is watching; the ledger holds the durable truth."""

    call_id: str
    account: str
    caller: str
    callee: str
    tariff: Tariff
    answered_at: datetime | None
    paid_seconds: int = 0
    steps: int = 0
    held: Decimal = Decimal(0)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_event: CallEnded | None = None
    cut_reason: str | None = None
    absent: bool = False  # the PBX no longer lists it: never extend, await its end
    seen_at: datetime | None = None  # when this meter took it on (meter clock)
    flags: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    # What _sleep_or_end waits on: the call's own task, and an absence check's.
    sleepers: set[asyncio.Future[None]] = field(default_factory=set)

    @classmethod
    def from_record(cls, record: CallRecord) -> LiveCall:
        tariff = Tariff(record.tariff_name, record.rate, record.increment, record.minimum)
        return cls(record.call_id, record.account, record.caller, record.callee, tariff,
                   record.answered_at, record.paid_seconds, record.steps, record.held)

    @property
    def paid_until(self) -> datetime | None:
        if self.answered_at is None:
            return None
        return self.answered_at + timedelta(seconds=self.paid_seconds)

    def end(self, event: CallEnded | None, flag: str | None = None) -> None:
        if self.ended.is_set():
            return
        self.end_event = event
        if flag:
            self.flags.append(flag)
        self.ended.set()
        for sleeper in self.sleepers:  # wake whoever sleeps on this call
            if not sleeper.done():
                sleeper.set_result(None)


class Meter:
    def __init__(
        self,
        *,
        ledger: Ledger,
        pbx: PbxControl,
        policy: Callable[[], Policy],
        clock: Clock,
        node: str,
        settings: MeterSettings | None = None,
        publish: Publish | None = None,
        warning_hook: WarningHook | None = None,
        on_balances: BalancesHook | None = None,
    ) -> None:
        self.ledger = ledger
        self.pbx = pbx
        self.policy = policy
        self.clock = clock
        self.node = node
        self.settings = settings or MeterSettings()
        self._publish_hook: Publish = publish or (lambda topic, payload: None)
        self.warning_hook = warning_hook
        self.live: dict[str, LiveCall] = {}
        self.pbx_connected = False
        # Calls admitted before this meter existed were admitted by an earlier process:
        # the PBX listing at start is later than their admission, so it shows them if
        # they are still up (see _reconcile).
        self._started_at = clock.now()
        self._queue: asyncio.Queue[CallEvent | _StillAbsent] = asyncio.Queue()
        self._settled: OrderedDict[str, datetime] = OrderedDict()  # call id -> settled at
        # the periodic read of every balance, shared with whoever passed on_balances
        self.low_balance = LowBalanceWatch(ledger, policy, self.publish, on_balances)
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the adapter's sink -------------------------------------------------------
    def on_event(self, event: CallEvent) -> None:
        """Queue an event from the PBX adapter (never blocks)."""
        self._busy += 1
        self._idle.clear()
        self._queue.put_nowait(event)

    async def run(self) -> None:
        """Consume events in order and reconcile periodically, until cancelled."""
        reconciler = asyncio.create_task(self._reconcile_periodically())
        sweeper = asyncio.create_task(self._sweep_balances_periodically())
        try:
            while True:
                event = await self._queue.get()
                try:
                    await self._handle(event)
                except Exception:  # one bad event must never stop metering
                    log.exception("meter.event_failed", kind=type(event).__name__)
                finally:
                    self._done()
        finally:
            reconciler.cancel()
            sweeper.cancel()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reconciler, sweeper, *self._tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Return once no event, ledger write or PBX command is in flight (tests)."""
        while True:
            # A task woken a moment ago needs a few loop turns before it is busy again.
            for _ in range(8):
                await asyncio.sleep(0)
            if self._busy == 0:
                return
            await self._idle.wait()

    # -- bookkeeping --------------------------------------------------------------
    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Tell subscribers; a failing publisher costs the event, never the call's
        metering (a cut-off is published just before the hang-up it announces)."""
        try:
            self._publish_hook(topic, payload)
        except Exception:
            log.exception("meter.publish_failed", topic=topic, call_id=payload.get("call_id"))

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._done()

    def _done(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    def _spawn(self, live: LiveCall) -> None:
        live.seen_at = self.clock.now()
        self.live[live.call_id] = live
        task = asyncio.create_task(self._run_call(live), name=f"call {live.call_id}")
        live.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _remember_settled(self, call_id: str) -> None:
        """Remember a settled call for late events, for a while (the ledger has it for good)."""
        now = self.clock.now()
        self._settled[call_id] = now
        horizon = now - timedelta(seconds=self.settings.settled_memory)
        while self._settled and next(iter(self._settled.values())) < horizon:
            self._settled.popitem(last=False)

    # -- events -------------------------------------------------------------------
    async def _handle(self, event: CallEvent | _StillAbsent) -> None:
        if isinstance(event, _StillAbsent):
            live = self.live.get(event.call_id)
            if live is not None and not live.ended.is_set():
                log.warning("meter.call_vanished", call_id=live.call_id, account=live.account)
                live.end(None, "vanished")
        elif isinstance(event, CallAnswered):
            await self._answered(event)
        elif isinstance(event, CallEnded):
            await self._ended(event)
        elif isinstance(event, PbxConnected):
            self.pbx_connected = True
            await self._reconcile(list(event.calls))
        elif isinstance(event, PbxDisconnected):
            self.pbx_connected = False
            log.warning("meter.pbx_disconnected", reason=event.reason,
                        live_calls=len(self.live))
        elif isinstance(event, CallRequested):
            pass  # gating happens in the gate; the meter starts at answer

    async def _record(self, call_id: str) -> CallRecord | None:
        while True:
            try:
                return await self.ledger.get_call(call_id)
            except LedgerUnavailable:
                await asyncio.sleep(self.settings.ledger_retry)

    async def _answered(self, event: CallAnswered) -> None:
        call_id = event.call_id
        if call_id in self.live or call_id in self._settled:
            return  # duplicate or late
        record = await self._record(call_id)
        if record is None:
            if event.call is not None:
                await self._unseen(event.call, event.answered_at)
            return
        if record.status is CallStatus.ENDED:
            return
        live = LiveCall.from_record(record)
        live.answered_at = record.answered_at or event.answered_at
        self._spawn(live)

    async def _ended(self, event: CallEnded) -> None:
        call_id = event.call_id
        live = self.live.get(call_id)
        if live is not None:
            if live.answered_at is None and event.answered_at is not None:
                live.answered_at = event.answered_at
            live.end(event)
            return
        if call_id in self._settled:
            return
        record = await self._record(call_id)
        if record is None:
            if event.call is not None and event.answered_at is not None:
                await self._unseen(event.call, event.answered_at, ended=event)
            return
        if record.status is CallStatus.ENDED:
            return
        live = LiveCall.from_record(record)
        live.answered_at = live.answered_at or event.answered_at
        live.end(event)
        self._spawn(live)

    async def _unseen(self, call: CallInfo, answered_at: datetime,
                      ended: CallEnded | None = None) -> None:
        """An answered call the gate never admitted (watch-only, or missed while away)."""
        if call.direction is not Direction.OUTBOUND:
            return
        policy = self.policy()
        account = policy.match_account(call)
        if policy.emergency_number(call, account) is not None:
            # Routed before the gate (or allowed by it): never cut, held or charged.
            log.info("meter.emergency_call_not_metered", call_id=call.call_id,
                     account=account.id if account else None)
            return
        bound = log.bind(call_id=call.call_id, account=account.id if account else None)
        if account is None or (self.settings.unseen_calls == "cut" and ended is None):
            bound.warning("meter.unseen_call_cut", reason="no account" if account is None
                          else "policy cuts unseen calls")
            with self._working():
                await self._hangup(call.call_id, HangupCause.CALL_REJECTED, bound)
            if account is None:
                return
        tariff = account.tariff.for_destination(account.normalize(call.destination))
        record = CallRecord(
            call_id=call.call_id, account=account.id, node=self.node, caller=call.caller_id,
            callee=call.destination, tariff_name=tariff.name, rate=tariff.rate,
            increment=tariff.increment, minimum=tariff.minimum, admitted_at=answered_at,
        )
        try:
            with self._working():
                await self.ledger.admit_call(record, None)
        except LedgerError as exc:
            bound.error("meter.unseen_call_not_admitted", error=str(exc))
            return
        live = LiveCall.from_record(record)
        live.answered_at = answered_at
        live.flags.append("unseen")
        if ended is not None:
            live.end(ended)
        elif self.settings.unseen_calls == "cut":
            live.cut_reason = "unseen"
        bound.warning("meter.unseen_call_adopted", answered_at=answered_at.isoformat())
        self._spawn(live)

    # -- one call -----------------------------------------------------------------
    async def _sleep_or_end(self, live: LiveCall, until: datetime) -> bool:
        """Sleep until ``until``; True if the call ended first."""
        if live.ended.is_set():
            return True
        if until <= self.clock.now():
            return False
        # One bare future, which LiveCall.end() completes early: not a second task
        # on the ended event and an asyncio.wait over both (at 10,000 live calls
        # the pair cost tens of MB, and long full garbage collections).
        sleeper = self.clock.sleep_until(until)
        live.sleepers.add(sleeper)
        try:
            await sleeper
        finally:
            live.sleepers.discard(sleeper)
            sleeper.cancel()
        return live.ended.is_set()

    def _stop_reason(self, live: LiveCall, policy: Policy) -> tuple[str | None, datetime | None]:
        """Why the call may not be extended, and a hard stop time from the window (if any)."""
        account = policy.accounts.get(live.account)
        if account is None:
            return "account_removed", None
        if account.suspended:
            return "account_suspended", None
        if live.cut_reason == "unseen":
            return "unseen", None
        if account.at_window_end == "cut":
            now = self.clock.now()
            close = account.hours.close_at(now)  # absolute time: DST-safe, windows joined
            if close is None:
                return "window_end", now
            return None, close
        return None, None

    async def _run_call(self, live: LiveCall) -> None:
        bound = log.bind(call_id=live.call_id, account=live.account)
        try:
            await self._meter(live, bound)
            await self._settle(live, bound)
        except asyncio.CancelledError:
            raise
        except Exception:
            bound.exception("meter.call_failed")
        finally:
            self.live.pop(live.call_id, None)

    async def _meter(self, live: LiveCall, bound: Any) -> None:
        if live.ended.is_set():
            return
        assert live.answered_at is not None
        settings = self.settings
        grace = timedelta(seconds=settings.grace_seconds)
        if live.steps > 0:  # the gate reserved the first unit: arm the deadline from answer
            # First, before any ledger write: the limit armed at setup counts from the
            # gate's answer, ringing included, and ends the call early if not re-armed.
            with self._working():
                _, hard_stop = self._stop_reason(live, self.policy())
                deadline = live.answered_at + timedelta(seconds=live.paid_seconds) + grace
                if hard_stop is not None and hard_stop < deadline:
                    deadline = hard_stop
                await self._set_deadline(live, deadline, bound)
        with self._working():
            # The answered status is informational; holds and settlement carry the money.
            with contextlib.suppress(LedgerUnavailable):
                await self.ledger.answer_call(live.call_id, live.answered_at)
            if "adopted" not in live.flags:  # an adopted call was announced before
                self.publish("call/start", {
                    "call_id": live.call_id, "account": live.account, "caller": live.caller,
                    "callee": live.callee, "answered_at": live.answered_at.isoformat(),
                    "tariff": live.tariff.name})
        while not live.ended.is_set():
            assert live.answered_at is not None
            boundary = live.answered_at + timedelta(seconds=live.paid_seconds)
            if live.steps > 0:
                # Reserve early enough that a cut-off warning can still be given in time.
                lead = max(settings.lead_seconds, settings.warning_seconds + 1
                           if self.warning_hook is not None else 0)
                reserve_at = boundary - timedelta(seconds=lead)
                if await self._sleep_or_end(live, reserve_at):
                    return
                # Paying for time the PBX cannot be told to grant is charging for
                # nothing: with the PBX link down, wait for it up to the boundary.
                while not self.pbx_connected and self.clock.now() < boundary:
                    poll = min(boundary, self.clock.now() + timedelta(seconds=1))
                    if await self._sleep_or_end(live, poll):
                        return
                if live.absent:
                    await live.ended.wait()
                    return
                if not self.pbx_connected:
                    live.flags.append("pbx_unreachable")
                    bound.warning("meter.not_extended_pbx_down", paid_seconds=live.paid_seconds)
                    await live.ended.wait()  # the PBX ends it at its deadline; reconcile settles
                    return
            with self._working():
                reason, hard_stop = self._stop_reason(live, self.policy())
                may_extend = reason is None and (hard_stop is None or hard_stop > boundary)
                held_now = False
                # An answered call always pays its first unit, whatever happens next.
                if live.steps == 0 or may_extend:
                    if await self._hold_next(live, boundary, bound):
                        held_now = True
                        boundary = live.answered_at + timedelta(seconds=live.paid_seconds)
                    else:
                        reason = reason or ("first_hold_failed" if live.steps == 0
                                            else "balance")
                if reason is None and (hard_stop is None or hard_stop > boundary):
                    await self._set_deadline(live, boundary + grace, bound)
                    continue
                live.cut_reason = reason or "window_end"
                cut_at = boundary if hard_stop is None else min(boundary, hard_stop)
                if held_now:
                    await self._set_deadline(
                        live, cut_at + grace if cut_at == boundary else cut_at, bound)
                self.publish("cutoff", {
                    "stage": "planned", "call_id": live.call_id, "account": live.account,
                    "reason": live.cut_reason, "at": cut_at.isoformat(),
                    "paid_seconds": live.paid_seconds})
                bound.info("meter.cutoff_planned", reason=live.cut_reason,
                           at=cut_at.isoformat(), paid_seconds=live.paid_seconds)
            await self._warn_then_cut(live, cut_at, bound)
            await live.ended.wait()
            return

    async def _warn_then_cut(self, live: LiveCall, cut_at: datetime, bound: Any) -> None:
        warning = self.settings.warning_seconds
        if self.warning_hook is not None and warning > 0:
            warn_at = cut_at - timedelta(seconds=warning)
            if await self._sleep_or_end(live, warn_at):
                return
            left = max(0, int((cut_at - self.clock.now()).total_seconds()))
            if left > 0:
                with self._working(), contextlib.suppress(Exception):
                    await self.warning_hook(live.call_id, min(warning, left))
        if await self._sleep_or_end(live, cut_at):
            return
        with self._working():
            lateness = (self.clock.now() - cut_at).total_seconds()
            self.publish("cutoff", {
                "stage": "executed", "call_id": live.call_id, "account": live.account,
                "reason": live.cut_reason, "late_ms": round(lateness * 1000)})
            bound.info("meter.cutoff", reason=live.cut_reason, late_ms=round(lateness * 1000))
            cause = (HangupCause.CALL_REJECTED if live.cut_reason == "first_hold_failed"
                     else HangupCause.ALLOTTED_TIMEOUT)
            await self._hangup(live.call_id, cause, bound)

    async def _hold_next(self, live: LiveCall, boundary: datetime, bound: Any) -> bool:
        """Hold the next billing unit; retry a ledger outage until the paid boundary."""
        tariff = live.tariff
        first = live.steps == 0
        amount = tariff.first_unit_cost if first else tariff.rate
        seconds = tariff.first_unit_seconds if first else tariff.increment
        step = live.steps + 1
        while True:
            try:
                ok = await self.ledger.hold(live.call_id, step, amount,
                                            live.paid_seconds + seconds, self.clock.now())
                break
            except LedgerUnavailable as exc:
                if first or self.clock.now() >= boundary:
                    bound.error("meter.hold_unavailable", step=step, error=str(exc))
                    return False
                await self.clock.sleep_until(
                    min(boundary, self.clock.now() + timedelta(seconds=self.settings.ledger_retry)))
        if not ok:
            bound.info("meter.hold_refused", step=step, amount=str(amount))
            return False
        live.steps = step
        live.paid_seconds += seconds
        live.held += amount
        await self.low_balance.check(live.account)
        return True

    async def _set_deadline(self, live: LiveCall, at: datetime, bound: Any) -> None:
        try:
            await self.pbx.set_deadline(live.call_id, at)
        except CallGone:
            pass  # the hang-up event is on its way
        except PbxError as exc:
            # The earlier deadline stays in force on the PBX; the next step retries.
            bound.warning("meter.deadline_not_set", error=str(exc), at=at.isoformat())

    async def _hangup(self, call_id: str, cause: HangupCause, bound: Any) -> None:
        try:
            await self.pbx.hangup(call_id, cause)
        except CallGone:
            pass
        except PbxError as exc:
            bound.warning("meter.hangup_failed", error=str(exc))

    # -- settlement ---------------------------------------------------------------
    def _billsec(self, live: LiveCall) -> int:
        """The ended call's billsec: the PBX's, else estimated (flagged)."""
        event = live.end_event
        if live.answered_at is None:
            if event is None and live.paid_seconds > 0:
                # Admitted, then it ended while nobody watched: whether it was answered is
                # not known. It is not charged; the flag sends finance to the PBX's CDR.
                live.flags.append("outcome_unknown")
            return 0
        if event is None:
            live.flags.append("billsec_assumed_paid")
            return live.paid_seconds
        if event.billsec is not None:
            billsec = event.billsec
        else:
            talk = (event.ended_at - live.answered_at).total_seconds()
            billsec = max(0, math.ceil(talk))
            live.flags.append("billsec_from_times")
        return billsec

    def _in_grace(self, live: LiveCall, billsec: int) -> bool:
        """Talk past the paid boundary, within the PBX-side grace."""
        return 0 < live.paid_seconds < billsec <= live.paid_seconds + self.settings.grace_seconds

    @staticmethod
    def _stopped_extending(live: LiveCall) -> bool:
        """The meter had stopped paying this call on (a cut-off, the PBX unreachable or no
        longer listing it), or the PBX says it ended the call itself: talk past the
        boundary is the signalling tolerance, not time the customer chose to buy (a call
        cut at its deadline is not also charged the increment it was refused).

        FreeSWITCH names its deadline (ALLOTTED_TIMEOUT). Asterisk ends an
        AbsoluteTimeout with cause 16, like a hang-up (trace 05); there the adapter
        says no party hung up (``by_party`` False: no ``HangupRequest``). Where
        the adapter cannot tell (``by_party`` None), the call pays the increment
        it started."""
        return (live.cut_reason is not None or live.absent or "pbx_unreachable" in live.flags
                or _pbx_ended(live.end_event))

    def _forgive_grace(self, live: LiveCall) -> tuple[int, Decimal]:
        live.flags.append("grace")
        return live.paid_seconds, rate(live.tariff, live.paid_seconds)

    async def _settle(self, live: LiveCall, bound: Any) -> None:
        with self._working():
            billsec = billable = self._billsec(live)
            amount = rate(live.tariff, billable)
            in_grace = self._in_grace(live, billable)
            if in_grace and self._stopped_extending(live):
                billable, amount = self._forgive_grace(live)
            if amount > live.held:
                # The call talked on without the meter reserving ahead: it ended before
                # its answer was processed, it was never seen, or the meter was late for
                # the next increment (a started increment is a whole one). Reserve the
                # rest now; what the balance cannot pay inside the grace is forgiven.
                try:
                    ok = await self.ledger.hold(
                        live.call_id, live.steps + 1, amount - live.held,
                        billed_seconds(live.tariff, billable), self.clock.now())
                except LedgerError:
                    ok = False
                if ok:
                    live.steps += 1
                    live.held = amount
                    live.flags.append("reserved_at_settle")
                elif in_grace:
                    billable, amount = self._forgive_grace(live)
                else:
                    live.flags.append("unpaid")
            event = live.end_event
            ended_at = event.ended_at if event is not None else self.clock.now()
            cause = event.cause if event is not None else "UNKNOWN"
            cut = live.cut_reason is not None or _pbx_ended(event)
            cdr = Cdr(
                call_id=live.call_id, account=live.account, caller=live.caller,
                callee=live.callee, answered_at=live.answered_at, ended_at=ended_at,
                billsec=billsec, billed_seconds=billed_seconds(live.tariff, billable),
                amount=amount, cause=cause, cut_off=cut, flags=tuple(live.flags),
                node=self.node,
            )
            while True:
                try:
                    stored = await self.ledger.settle_call(cdr)
                    break
                except LedgerUnavailable as exc:
                    bound.warning("meter.settle_retry", error=str(exc))
                    await asyncio.sleep(self.settings.ledger_retry)
                except IdempotencyConflict:
                    bound.warning("meter.settle_replayed_with_other_figures")
                    return
            self._remember_settled(live.call_id)
            await self.low_balance.check(live.account)
            bound.info("meter.settled", billsec=billsec, amount=str(stored.amount),
                       cut_off=cut, flags=list(stored.flags))
            self.publish("call/end", _cdr_payload(stored))

    async def _sweep_balances_periodically(self) -> None:
        """The low-balance warning for postings this process did not make (the CLI's)."""
        while True:
            with self._working():
                try:
                    await self.low_balance.sweep(timeout=self.settings.balance_check_interval)
                except Exception:
                    log.exception("meter.balance_sweep_failed")
            await self.clock.sleep_until(
                self.clock.now() + timedelta(seconds=self.settings.balance_check_interval))

    # -- reconciliation -----------------------------------------------------------
    async def _reconcile_periodically(self) -> None:
        while True:
            await self.clock.sleep_until(
                self.clock.now() + timedelta(seconds=self.settings.reconcile_interval))
            if not self.pbx_connected:
                continue
            # A listing is a snapshot that can take seconds to build under load: only
            # calls known before it started can be judged absent from it.
            listed_at = self.clock.now()
            try:
                calls = await self.pbx.active_calls()
            except PbxError as exc:
                log.warning("meter.reconcile_failed", error=str(exc))
                continue
            self._busy += 1
            self._idle.clear()
            try:
                await self._reconcile(calls, listed_at)
            except Exception:
                log.exception("meter.reconcile_failed")
            finally:
                self._done()

    async def _reconcile(self, calls: list[ActiveCall],
                         listed_at: datetime | None = None) -> None:
        """Compare the PBX's list (taken at ``listed_at``) with the ledger and the meter.

        After a (re)connect the adapter holds events back until it has listed the
        calls, so everything the meter knows predates the list: ``listed_at`` is now.
        """
        listed_at = listed_at or self.clock.now()
        on_pbx = {c.call.call_id: c for c in calls}
        try:
            records = [r for r in await self.ledger.live_calls() if r.node == self.node]
        except LedgerError as exc:
            log.error("meter.reconcile_ledger_unavailable", error=str(exc))
            return
        now = self.clock.now()
        known = {r.call_id for r in records}
        young: list[CallRecord] = []
        for record in records:
            if record.call_id in self.live:
                continue
            active = on_pbx.get(record.call_id)
            answered = (active.answered_at if active else None) or record.answered_at
            if active is not None:
                if answered is not None:
                    live = LiveCall.from_record(record)
                    live.answered_at = answered
                    live.flags.append("adopted")
                    log.info("meter.adopted", call_id=record.call_id, account=record.account)
                    self._spawn(live)
                continue
            age = (now - record.admitted_at).total_seconds()
            if record.admitted_at >= listed_at or (record.status is CallStatus.ADMITTED and (
                    (record.admitted_at >= self._started_at
                     and age < self.settings.admitted_timeout)
                    or age < self.settings.listing_lag)):
                # Allowed a moment ago: the PBX's list may predate its channel (one
                # allowed before this process started cannot: not listed, it is gone).
                young.append(record)
                continue
            self._settle_gone(record)
        if young:
            # A channel exists before it asks the gate, so a list taken now (after the
            # ledger read, so after these admissions) shows each of these still up. Not
            # listed: gone while the link was down or the PBX restarted. Settle it now
            # rather than hold its first unit and its line until admitted_timeout.
            try:
                listed = {c.call.call_id for c in await self.pbx.active_calls()}
            except PbxError as exc:
                log.warning("meter.reconcile_failed", error=str(exc))
            else:
                for record in young:
                    if record.call_id in listed:
                        continue
                    if (now - record.admitted_at).total_seconds() < self.settings.listing_lag:
                        self._track(self._settle_if_still_unlisted(record))
                    elif (record.status is CallStatus.ADMITTED
                          and record.call_id not in self.live
                          and record.call_id not in self._settled):
                        # (an answered one has its hang-up event coming, or the next
                        # reconcile, when it is old, settles it)
                        self._settle_gone(record)
        for call_id, live in list(self.live.items()):
            known_before = live.seen_at is not None and live.seen_at < listed_at
            if call_id not in on_pbx and not live.ended.is_set() and known_before:
                self._track(self._end_if_still_absent(live))
        for call_id, active in on_pbx.items():
            if (call_id not in known and call_id not in self.live
                    and call_id not in self._settled and active.answered_at is not None):
                await self._unseen(active.call, active.answered_at)

    async def _settle_if_still_unlisted(self, record: CallRecord) -> None:
        """A call admitted a moment ago and not listed yet: look again after the lag."""
        await self.clock.sleep_until(
            record.admitted_at + timedelta(seconds=self.settings.listing_lag))
        try:
            listed = {c.call.call_id for c in await self.pbx.active_calls()}
        except PbxError:
            return  # the next reconcile decides
        if record.call_id in listed or record.call_id in self.live \
                or record.call_id in self._settled:
            return
        current = await self._record(record.call_id)
        if current is not None and current.status is CallStatus.ADMITTED:
            self._settle_gone(current)

    def _settle_gone(self, record: CallRecord) -> None:
        """An open call of this node the PBX no longer has: settle it from what is known."""
        live = LiveCall.from_record(record)
        live.end(None, "ended_while_away")
        log.warning("meter.settle_ended_while_away", call_id=record.call_id,
                    account=record.account, answered=record.answered_at is not None)
        self._spawn(live)

    def _track(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_if_still_absent(self, live: LiveCall) -> None:
        """The PBX no longer lists a metered call: wait for its real hang-up event.

        After the grace the verdict goes through the event queue, behind every event
        the adapter delivered before it: under load the queue can run seconds behind,
        and a real hang-up waiting in it must win over "vanished".
        """
        live.absent = True
        ended_in_time = await self._sleep_or_end(
            live, self.clock.now() + timedelta(seconds=self.settings.absent_grace))
        if not ended_in_time:
            self._busy += 1
            self._idle.clear()
            self._queue.put_nowait(_StillAbsent(live.call_id))


@dataclass(frozen=True, slots=True)
class _StillAbsent:
    """Queued by the absence check: settle the call as vanished unless it has ended."""

    call_id: str


def _pbx_ended(event: CallEnded | None) -> bool:
    """The PBX itself ended the call, not a party: its deadline (FreeSWITCH
    ``ALLOTTED_TIMEOUT``) or, on Asterisk, an end without a party's ``HangupRequest``."""
    return event is not None and (event.cause == "ALLOTTED_TIMEOUT" or event.by_party is False)


def _cdr_payload(cdr: Cdr) -> dict[str, Any]:
    return {
        "call_id": cdr.call_id, "account": cdr.account, "caller": cdr.caller,
        "callee": cdr.callee,
        "answered_at": cdr.answered_at.isoformat() if cdr.answered_at else None,
        "ended_at": cdr.ended_at.isoformat(), "billsec": cdr.billsec,
        "billed_seconds": cdr.billed_seconds, "amount": str(cdr.amount), "cause": cdr.cause,
        "cut_off": cdr.cut_off, "flags": list(cdr.flags), "node": cdr.node,
    }
