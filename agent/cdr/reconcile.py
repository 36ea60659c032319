"""Reconciliation: every answered outbound call of the PBX's CDR against the ledger (pure).

Each call becomes one :class:`Line` of a :class:`Kind`. Calls are matched by
the PBX's unique id, which the ledger keeps as the call id (Asterisk
``uniqueid``, FreeSWITCH A-leg ``uuid``); a row whose id the ledger does not
know is matched, as a fallback, to an unmatched ledger call to the same number
answered within :data:`NUMBER_MATCH_SECONDS` (the line says so).

Kinds, and whether they leave something unexplained (exit status 1):

=======================  ===========  ====================================================
kind                     unexplained  meaning
=======================  ===========  ====================================================
``equal``                no           charged exactly ``rate(pbx billsec)``
``corrected``            no           equal since a correction from the PBX's CDR
``explained``            no           differs by a rule the ledger flagged (the grace
                                      past a cut-off, a charge the balance could not pay)
``needs_correction``     yes          settled provisionally; ``--apply`` corrects it
``charged_differently``  yes          settled live, yet not ``rate(pbx billsec)``
``not_settled``          yes          the ledger still has the call open
``missing_in_ledger``    yes          answered outbound talk nobody was charged for
                                      (the call escaped the gate): the most serious
``missing_in_pbx``       yes          charged in the ledger, no row in the PBX's CDR
=======================  ===========  ====================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import partial

from agent.cdr.formats import CdrRow
from agent.cdr.settle import is_provisional
from agent.ledger import CallRecord, Cdr
from agent.rating import Tariff, rate

NUMBER_MATCH_SECONDS = 5
# Ledger flags that explain a charge other than rate(billsec) for the same billsec.
EXPLAINING_FLAGS = {
    "grace": "talk into the PBX-side grace after the paid boundary is not billed",
    "unpaid": "the balance could not pay the increment the call started",
    "capped": "the charge was capped at what the call's holds paid",
}


class Kind(StrEnum):
    EQUAL = "equal"
    CORRECTED = "corrected"
    EXPLAINED = "explained"
    NEEDS_CORRECTION = "needs_correction"
    CHARGED_DIFFERENTLY = "charged_differently"
    NOT_SETTLED = "not_settled"
    MISSING_IN_LEDGER = "missing_in_ledger"
    MISSING_IN_PBX = "missing_in_pbx"


UNEXPLAINED = frozenset({Kind.NEEDS_CORRECTION, Kind.CHARGED_DIFFERENTLY, Kind.NOT_SETTLED,
                         Kind.MISSING_IN_LEDGER, Kind.MISSING_IN_PBX})
# The order lines are printed in: the most serious first.
ORDER = (Kind.MISSING_IN_LEDGER, Kind.CHARGED_DIFFERENTLY, Kind.NEEDS_CORRECTION,
         Kind.NOT_SETTLED, Kind.MISSING_IN_PBX, Kind.EXPLAINED, Kind.CORRECTED, Kind.EQUAL)


@dataclass(frozen=True, slots=True)
class Line:
    """One call: the PBX's row and the ledger's call as they are (no field copied from
    either), what the row rates at, and what the two come to."""

    kind: Kind
    row: CdrRow | None = None  # the PBX's row (None: missing_in_pbx)
    record: CallRecord | None = None  # the ledger's call (None: missing_in_ledger)
    cdr: Cdr | None = None  # its settled record, with any correction (None: open or missing)
    pbx_amount: Decimal | None = None  # rate(pbx billsec) under the call's tariff
    matched_by: str = "call_id"  # or "number", or "" when unmatched
    note: str = ""

    def _pick(self, ledger: str, pbx: str) -> str:
        """A field of the ledger's call (record, else settled record), else of the row."""
        for source in (self.record, self.cdr):
            if source is not None:
                return str(getattr(source, ledger))
        return str(getattr(self.row, pbx)) if self.row is not None else ""

    @property
    def call_id(self) -> str:
        return self._pick("call_id", "call_id")

    @property
    def account(self) -> str:
        return self._pick("account", "accountcode")

    @property
    def caller(self) -> str:
        return self._pick("caller", "caller")

    @property
    def callee(self) -> str:
        return self._pick("callee", "destination")

    @property
    def answered_at(self) -> datetime | None:
        if self.row is not None:
            return self.row.answer
        return self.cdr.answered_at if self.cdr is not None else None

    @property
    def pbx_billsec(self) -> int | None:
        return self.row.billsec if self.row is not None else None

    @property
    def ledger_billsec(self) -> int | None:
        return self.cdr.billsec if self.cdr is not None else None

    @property
    def ledger_amount(self) -> Decimal | None:
        """What the ledger charged (with any correction)."""
        return self.cdr.charged if self.cdr is not None else None

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(self.cdr.flags) if self.cdr is not None else ()

    @property
    def unexplained(self) -> bool:
        return self.kind in UNEXPLAINED

    @property
    def difference(self) -> Decimal | None:
        """Ledger minus PBX: positive means the customer was charged too much."""
        if self.pbx_amount is None or self.ledger_amount is None:
            return None
        return self.ledger_amount - self.pbx_amount


def tariff_of(record: CallRecord) -> Tariff:
    return Tariff(record.tariff_name, record.rate, record.increment, record.minimum)


def expected_amount(record: CallRecord, row: CdrRow) -> Decimal:
    return rate(tariff_of(record), row.billsec) if row.answered else Decimal(0)


def classify(row: CdrRow, record: CallRecord, cdr: Cdr | None, matched_by: str) -> Line:
    """One CDR row against its ledger call."""
    expected = expected_amount(record, row)
    line = partial(Line, row=row, record=record, cdr=cdr, pbx_amount=expected,
                   matched_by=matched_by)
    if cdr is None:
        return line(Kind.NOT_SETTLED, note="the ledger has the call open")
    if cdr.charged == expected:
        if cdr.pbx_billsec is not None and cdr.correction:
            return line(Kind.CORRECTED,
                        note=f"corrected by {cdr.correction} from PBX billsec {cdr.pbx_billsec}")
        return line(Kind.EQUAL)
    if cdr.pbx_billsec is None and is_provisional(cdr):
        return line(Kind.NEEDS_CORRECTION,
                    note="settled provisionally; --apply corrects it from this CDR")
    reasons = [why for flag, why in EXPLAINING_FLAGS.items() if flag in cdr.flags]
    if reasons and cdr.billsec == row.billsec:
        return line(Kind.EXPLAINED, note="; ".join(reasons))
    return line(Kind.CHARGED_DIFFERENTLY,
                note="settled from the PBX's billsec live, yet charged differently")


def digits(number: str) -> str:
    return "".join(c for c in number if c.isdigit())


def reconcile(
    rows: Iterable[CdrRow],
    records: Mapping[str, CallRecord],
    cdrs: Mapping[str, Cdr],
    period_cdrs: Iterable[Cdr],
    *,
    in_period: Callable[[CdrRow], bool],
    outbound: Callable[[CdrRow], bool],
    unmatched_amount: Callable[[CdrRow], Decimal | None] = lambda row: None,
) -> list[Line]:
    """Match the PBX's rows (merged per call) with the ledger.

    ``records``/``cdrs``: the ledger's calls and settled records, by call id, for
    every row's id that the ledger knows and every call of ``period_cdrs``
    (the ledger's settled calls of the period). ``in_period`` says which rows
    the period covers; ``outbound`` which rows the ledger should know;
    ``unmatched_amount`` rates a row the ledger lacks (from the policy), if it can.
    """
    rows = list(rows)
    ids_in_file = {r.call_id for r in rows}
    lines: list[Line] = []
    matched: set[str] = set()
    # Ledger calls of the period the file has no row for: candidates for number matching.
    by_number: dict[str, list[Cdr]] = {}
    for settled in period_cdrs:
        if settled.call_id not in ids_in_file:
            by_number.setdefault(digits(settled.callee), []).append(settled)
    for row in rows:
        if not in_period(row):
            continue
        record = records.get(row.call_id)
        if record is not None:
            matched.add(row.call_id)
            cdr = cdrs.get(row.call_id)
            if not row.answered and (cdr is None or cdr.charged == 0):
                continue  # unanswered on both sides: nothing to reconcile
            lines.append(classify(row, record, cdr, "call_id"))
            continue
        if not row.answered or not outbound(row):
            continue
        candidate = _by_number(row, by_number, matched)
        if candidate is not None:
            matched.add(candidate.call_id)
            lines.append(classify(row, records[candidate.call_id], candidate, "number"))
            continue
        lines.append(Line(
            Kind.MISSING_IN_LEDGER, row=row, pbx_amount=unmatched_amount(row), matched_by="",
            note="answered outbound talk the ledger never charged (escaped the gate?)"))
    for cdrs_of_number in by_number.values():
        for left in cdrs_of_number:
            if left.call_id in matched or (left.charged == 0 and left.billsec == 0):
                continue
            lines.append(Line(
                Kind.MISSING_IN_PBX, cdr=left, matched_by="",
                note="charged in the ledger, but the PBX's CDR has no row for it"))
    lines.sort(key=lambda line: (ORDER.index(line.kind),
                                 line.answered_at.timestamp() if line.answered_at else 0.0,
                                 line.call_id))
    return lines


def _by_number(row: CdrRow, by_number: Mapping[str, list[Cdr]], taken: set[str]) -> Cdr | None:
    if row.answer is None:
        return None
    best: Cdr | None = None
    best_gap = float(NUMBER_MATCH_SECONDS) + 1
    for cdr in by_number.get(digits(row.destination), []):
        if cdr.call_id in taken or cdr.answered_at is None:
            continue
        gap = abs((cdr.answered_at - row.answer).total_seconds())
        if gap <= NUMBER_MATCH_SECONDS and gap < best_gap:
            best, best_gap = cdr, gap
    return best


def summary(lines: Iterable[Line]) -> dict[str, int]:
    counts = {kind.value: 0 for kind in ORDER}
    for line in lines:
        counts[line.kind.value] += 1
    return counts
