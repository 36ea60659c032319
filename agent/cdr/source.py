"""The daemon's CDR source: follow the PBX's CDR file and settle calls from it, by itself.

Every ``poll_seconds`` the new complete lines of the file are read
(:class:`~agent.cdr.follow.CdrFollower`), parsed with the configured layout,
merged per call, and applied (:func:`~agent.cdr.settle.apply_row`): a call the
meter settled provisionally is corrected to the PBX's billsec; one still open
in the ledger (its end is being settled right now, or after a restart the
meter has not reconciled it yet) is kept pending and tried again, up to
``pending_max_age``. Then the position and the pending lines are saved
(atomically): after a crash the lines since the last save are read again and
applied again as replays, which write nothing.

What the source cannot reconcile is logged and counted in
``callgate_reconcile_mismatches_total{kind}``: ``missing_in_ledger`` (an
answered outbound call the ledger never saw), ``charged_differently``,
``conflict`` (a second CDR for a corrected call with another billsec),
``refused`` (the call's account is closed: reopen it, then ``reconcile --apply``),
``not_settled`` (still open after ``pending_max_age``) and ``unreadable`` (a
damaged row: logged with its file, line and field, skipped; the other rows go on).
The source never stops the daemon: a row whose applying fails unexpectedly is
logged once and kept pending like a row of an open call; any other failure is
logged once and the next poll tries again, with every line read still pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.cdr.follow import MAX_LINE, CdrFollower, FollowState, load_state, save_state
from agent.cdr.formats import CdrFormatError, CdrRow, Layout, parse_row
from agent.cdr.reconcile import classify
from agent.cdr.settle import Outcome, apply_row, merge_rows
from agent.ledger import Ledger, LedgerError
from agent.meter.clock import Clock
from agent.money import clip

log = structlog.get_logger("callgate.cdr")


@dataclass
class StepReport:
    """What one poll did (for tests and logs)."""

    read: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    pending: int = 0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class CdrSource:
    def __init__(
        self, *, ledger: Ledger, path: Path, layout: Layout, state_path: Path, clock: Clock,
        poll_seconds: float = 1.0, pending_max_age: float = 3600.0,
        outbound: Callable[[CdrRow], bool] = lambda row: bool(row.accountcode),
        metrics: Any = None,
    ) -> None:
        self.ledger = ledger
        self.path = path
        self.layout = layout
        self.state_path = state_path
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.pending_max_age = pending_max_age
        self.outbound = outbound
        self.metrics = metrics
        self.state: FollowState | None = None
        self.follower: CdrFollower | None = None
        self._saved: Any = None  # what the state file holds (a failed save is retried)
        self._failed: set[str] = set()  # calls whose row failed unexpectedly (logged once)

    async def run(self) -> None:
        failing = ""  # the last failure logged: a lasting one (a file it may not read,
        # a state directory it may not write) is logged once, not every poll
        try:
            while True:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if str(exc) != failing:
                        log.exception("cdr.poll_failed", path=str(self.path), error=str(exc))
                    failing = str(exc)
                else:
                    if failing:
                        log.info("cdr.poll_recovered", path=str(self.path))
                    failing = ""
                await asyncio.sleep(self.poll_seconds)
        finally:
            if self.follower is not None:
                self.follower.close()

    async def step(self) -> StepReport:
        """One poll: read, apply, save.

        The lines read join the pending lines *before* anything is applied, and
        a line leaves them only once its row is applied (or dropped, logged): an
        exception anywhere in between leaves every line for the next poll, and
        rows applied already are replays then (a CDR is applied once per call).
        """
        if self.follower is None:
            first = not await asyncio.to_thread(self.state_path.exists)
            self.state = await asyncio.to_thread(load_state, self.state_path)
            self.follower = CdrFollower(self.path, self.state, from_end=first)
            # A first start saves its state at once, even with no file to follow yet:
            # the next start is then no first start, and reads what came meanwhile.
            self._saved = None if first else self._snapshot()
        assert self.state is not None
        state = self.state
        lines = await asyncio.to_thread(self.follower.read)
        now = self.clock.now().timestamp()
        report = StepReport(read=len(lines))
        for line in lines:
            if line.too_long:
                where = f"{self.path} line {line.number}" if line.number else str(self.path)
                log.error("cdr.unreadable_row",
                          error=f"{where}: longer than {MAX_LINE} bytes, no CDR row")
                self._mismatch("unreadable")
                report.count("unreadable")
            else:
                state.pending.append((line.text, now, line.number))
        rows: list[CdrRow] = []
        seen_of: dict[str, float] = {}
        texts_of: dict[str, list[tuple[str, float, int]]] = {}
        for entry in state.pending:
            row = self._parse(entry, report)
            if row is not None:
                rows.append(row)
                seen_of[row.call_id] = min(entry[1], seen_of.get(row.call_id, entry[1]))
                texts_of.setdefault(row.call_id, []).append(entry)
        pending: list[tuple[str, float, int]] = []
        merged = merge_rows(rows)
        for i, row in enumerate(merged):
            failed = False
            try:
                outcome = await self._apply(row)
            except LedgerError as exc:  # unreachable: keep this row and the rest for later
                log.warning("cdr.ledger_unavailable", error=str(exc))
                for rest in merged[i:]:
                    pending.extend(texts_of[rest.call_id])
                break
            except Exception as exc:  # a daemon never dies of one row
                # A failure nobody foresaw: this row waits (up to pending_max_age, as a
                # row of an open call), the others go on. Logged once per call.
                if row.call_id not in self._failed:
                    self._failed.add(row.call_id)
                    log.exception("cdr.row_failed", call_id=clip(row.call_id),
                                  line=row.line, error=clip(str(exc), 200))
                outcome, failed = Outcome.PENDING, True
            if outcome is Outcome.PENDING and now - seen_of[row.call_id] >= self.pending_max_age:
                log.error("cdr.call_never_settled", call_id=clip(row.call_id),
                          waited_s=round(now - seen_of[row.call_id]))
                self._mismatch("not_settled")
                report.count("dropped")
                self._failed.discard(row.call_id)
            elif outcome is Outcome.PENDING:
                report.count("failed" if failed else outcome.value)
                pending.extend(texts_of[row.call_id])
            else:
                report.count(outcome.value)
            if not failed:
                self._failed.discard(row.call_id)
        state.pending = pending
        report.pending = len(pending)
        if self._snapshot() != self._saved:
            await asyncio.to_thread(save_state, self.state_path, state)
            self._saved = self._snapshot()
        return report

    def _parse(self, entry: tuple[str, float, int], report: StepReport) -> CdrRow | None:
        """A pending line as a row; None (logged, counted) for a blank or damaged one."""
        text, _, number = entry
        if not text.strip():
            return None
        try:
            return parse_row(text, self.layout, line=number, source=str(self.path))
        except CdrFormatError as exc:
            log.error("cdr.unreadable_row", error=str(exc))
        except Exception as exc:  # parse_row broke its contract: still one row
            log.exception("cdr.unreadable_row", error=clip(str(exc), 200),
                          line=number, text=clip(text))
        self._mismatch("unreadable")
        report.count("unreadable")
        return None

    def _snapshot(self) -> Any:
        assert self.state is not None
        return (self.state.device, self.state.inode, self.state.offset,
                list(self.state.pending))

    async def _apply(self, row: CdrRow) -> Outcome:
        bound = log.bind(call_id=row.call_id, pbx_billsec=row.billsec)
        result = await apply_row(self.ledger, row, source=str(self.path))
        outcome = result.outcome
        if outcome is Outcome.CORRECTED:
            assert result.cdr is not None
            bound.info("cdr.call_settled_from_pbx", account=result.cdr.account,
                       provisional_billsec=result.cdr.billsec,
                       correction=str(result.cdr.correction), charged=str(result.cdr.charged))
            if result.cdr.correction and self.metrics is not None:
                self.metrics.cdr_correction()
        elif outcome is Outcome.CONFLICT:
            bound.error("cdr.conflicting_cdr", why=result.why)
            self._mismatch("conflict")
        elif outcome is Outcome.REFUSED:
            bound.error("cdr.correction_refused", why=result.why)
            self._mismatch("refused")
        elif outcome is Outcome.NOT_OURS and row.answered and self.outbound(row):
            bound.error("cdr.call_missing_in_ledger", caller=row.caller,
                        callee=row.destination, accountcode=row.accountcode,
                        why="answered outbound talk the ledger never charged")
            self._mismatch("missing_in_ledger")
        elif outcome is Outcome.NOT_NEEDED and result.cdr is not None:
            record = await self.ledger.get_call(row.call_id)
            if record is not None:
                line = classify(row, record, result.cdr, "call_id")
                if line.unexplained:
                    bound.warning("cdr.charged_differently", ledger_billsec=result.cdr.billsec,
                                  ledger_amount=str(line.ledger_amount),
                                  pbx_amount=str(line.pbx_amount))
                    self._mismatch(line.kind.value)
        return outcome

    def _mismatch(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.reconcile_mismatch(kind)
