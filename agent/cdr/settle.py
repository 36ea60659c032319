"""Settling a call from the PBX's own CDR: which calls need it, and applying it to the ledger.

A call the meter settled while it could not see the call's end is settled
*provisionally* (at what was paid, never more) and flagged; :data:`PROVISIONAL`
lists those flags. When the PBX's CDR row for such a call arrives, the ledger's
``correct_call`` brings its charge to exactly ``rate(billsec)`` of the PBX's
billsec: one ``correction`` posting, idempotent per call. Calls settled from the
PBX's own billsec live are not touched: their figures already are the PBX's.

:func:`merge_rows` folds the rows one call produced (Asterisk writes a second
row, with the same uniqueid, for the ``Hangup`` after a failed ``Dial``) into
one; :func:`decide` is the pure choice; :func:`apply_row` the thin async shell
the daemon's CDR follower and ``callgate ledger reconcile --apply`` share.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from agent.cdr.formats import CdrRow
from agent.ledger import AccountClosed, Cdr, IdempotencyConflict, Ledger, RefusedOperation

# Flags of a settlement made without the PBX's own billsec (see agent/meter/meter.py).
PROVISIONAL = frozenset({
    "ended_while_away",      # the call ended while the agent was down or disconnected
    "billsec_assumed_paid",  # its end was not seen: charged what was paid
    "vanished",              # the PBX stopped listing it and no hang-up event came
    "outcome_unknown",       # admitted, gone unseen: whether it was answered is unknown
    "billsec_from_times",    # the end event had no billsec: estimated from its times
})


class Outcome(StrEnum):
    CORRECTED = "corrected"     # the CDR settled the call (a correction posted, or none needed)
    REPLAYED = "replayed"       # this CDR was applied before: nothing new written
    NOT_NEEDED = "not_needed"   # settled live from the PBX's own billsec: nothing to do
    PENDING = "pending"         # the call is still open in the ledger: try again later
    NOT_OURS = "not_ours"       # the ledger has no call with this id
    CONFLICT = "conflict"       # already corrected from a different billsec: left alone
    REFUSED = "refused"         # the ledger refuses it (account closed, above max_posting)


def is_provisional(cdr: Cdr) -> bool:
    return bool(PROVISIONAL.intersection(cdr.flags))


def merge_rows(rows: Iterable[CdrRow]) -> list[CdrRow]:
    """One row per call id, in first-seen order: the longest billsec, answered if any was.

    Asterisk writes several rows for one call (a failed ``Dial`` and the
    ``Hangup`` after it, each a CDR segment); the call's talk time is its
    answered segment's.
    """
    merged: dict[str, CdrRow] = {}
    for row in rows:
        seen = merged.get(row.call_id)
        if seen is None:
            merged[row.call_id] = row
            continue
        best = row if (row.billsec, row.answered) > (seen.billsec, seen.answered) else seen
        merged[row.call_id] = replace(
            best,
            start=min((t for t in (seen.start, row.start) if t is not None), default=None),
            end=max((t for t in (seen.end, row.end) if t is not None), default=None),
        )
    return list(merged.values())


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    why: str = ""


def decide(row: CdrRow, cdr: Cdr | None, call_known: bool) -> Decision:
    """What to do with a PBX CDR row, given the ledger's settled record of its call."""
    if cdr is None:
        if call_known:
            return Decision(Outcome.PENDING, "the call is not settled yet")
        return Decision(Outcome.NOT_OURS, "the ledger has no call with this id")
    if cdr.pbx_billsec is not None:
        if cdr.pbx_billsec == row.billsec or not row.answered:
            return Decision(Outcome.REPLAYED, f"already settled from PBX billsec "
                                              f"{cdr.pbx_billsec}")
        return Decision(Outcome.CONFLICT, f"already corrected from PBX billsec "
                                          f"{cdr.pbx_billsec}, this row says {row.billsec}")
    if not is_provisional(cdr):
        return Decision(Outcome.NOT_NEEDED, "settled from the PBX's own billsec")
    return Decision(Outcome.CORRECTED)


def correction_note(row: CdrRow, cdr: Cdr, source: str) -> str:
    where = f" ({source}{f' line {row.line}' if row.line else ''})" if source else ""
    return f"PBX CDR billsec {row.billsec}, provisional billsec {cdr.billsec}{where}"


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: Outcome
    cdr: Cdr | None
    why: str = ""


async def apply_row(ledger: Ledger, row: CdrRow, *, source: str = "",
                    operator: str = "") -> Applied:
    """Settle one call from its PBX CDR row, if it needs it. Ledger errors other than
    a conflict (the store unreachable) propagate: the caller retries the row later."""
    cdr = await ledger.call_cdr(row.call_id)
    call_known = cdr is not None or await ledger.get_call(row.call_id) is not None
    decision = decide(row, cdr, call_known)
    if decision.outcome is not Outcome.CORRECTED:
        return Applied(decision.outcome, cdr, decision.why)
    assert cdr is not None
    try:
        corrected = await ledger.correct_call(row.call_id, row.billsec,
                                              note=correction_note(row, cdr, source),
                                              operator=operator)
    except IdempotencyConflict as exc:  # corrected by another process meanwhile
        return Applied(Outcome.CONFLICT, cdr, str(exc))
    except (AccountClosed, RefusedOperation) as exc:
        # The call is settled (its record was read above), so no refusal here means
        # "later": a closed account, a correction above max_posting. Finance acts.
        return Applied(Outcome.REFUSED, cdr, str(exc))
    return Applied(Outcome.CORRECTED, corrected)
