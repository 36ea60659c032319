"""Group commit on PostgreSQL (agent/ledger/_pg_batch.py and the schema 9 batch
functions): a request goes alone when a lane is free, requests that queue behind
busy lanes go as one batch, and a batch gives each request exactly what the
single path would have: the same admissions, refusals, replays and errors, the
audit clean. A failing batch falls back to its elements one by one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal as D

import pytest

from agent.ledger import (
    Admission,
    CallRecord,
    Cdr,
    IdempotencyConflict,
    LedgerUnavailable,
    RefusedOperation,
    UnknownAccount,
    open_ledger,
)
from agent.ledger import _pg_statements as sql
from agent.ledger import postgres as pg_backend
from agent.ledger._pg_batch import BatchFailed, Lane
from agent.ledger.model import LedgerError

T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
RATE = D("0.13")


def call(call_id: str, account: str) -> CallRecord:
    return CallRecord(call_id, account, "pbx-1", "021", "138", "standard", RATE, 60, 60, T0)


def cdr(call_id: str, account: str, amount: D = D(0), billsec: int = 0) -> Cdr:
    return Cdr(call_id, account, "021", "138", None, T0, billsec, billsec, amount, "NO_ANSWER")


# -- the lane alone ----------------------------------------------------------------------
class Server:
    """A fake server: each statement takes one loop turn per gate; records what it got."""

    def __init__(self) -> None:
        self.singles: list[int] = []
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail_batch: BaseException | None = None

    async def one(self, req: int) -> int:
        await self.gate.wait()
        if req < 0:
            raise ValueError(f"bad {req}")
        self.singles.append(req)
        return req * 10

    async def many(self, reqs: Sequence[int]) -> list[int]:
        await self.gate.wait()
        if self.fail_batch is not None:
            raise self.fail_batch
        self.batches.append(list(reqs))
        return [r * 10 for r in reqs]


async def test_a_request_goes_alone_while_a_lane_is_free() -> None:
    server = Server()
    lane: Lane[int, int] = Lane(2, server.one, server.many)
    server.gate.set()
    assert await lane.submit(1) == 10
    assert await asyncio.gather(lane.submit(2), lane.submit(3)) == [20, 30]
    assert server.batches == [] and server.singles == [1, 2, 3]


async def test_requests_behind_busy_lanes_go_as_one_batch_in_order() -> None:
    server = Server()
    lane: Lane[int, int] = Lane(1, server.one, server.many, max_batch=3)
    tasks = [asyncio.ensure_future(lane.submit(n)) for n in range(6)]
    await asyncio.sleep(0)
    server.gate.set()
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40, 50]
    assert server.singles == [0]
    assert server.batches == [[1, 2, 3], [4, 5]]
    assert lane.batches == 2


async def test_a_failed_batch_is_sent_again_one_by_one() -> None:
    server = Server()
    server.fail_batch = BatchFailed("deadlock detected")
    lane: Lane[int, int] = Lane(1, server.one, server.many)
    tasks = [asyncio.ensure_future(lane.submit(n)) for n in (1, 2, -3, 4)]
    await asyncio.sleep(0)
    server.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:2] == [10, 20] and results[3] == 40
    assert isinstance(results[2], ValueError)  # its own error, to it alone
    assert server.singles == [1, 2, 4]


async def test_a_lost_server_fails_every_request_of_the_batch() -> None:
    server = Server()
    server.fail_batch = LedgerUnavailable("lost the PostgreSQL ledger")
    lane: Lane[int, int] = Lane(1, server.one, server.many)
    tasks = [asyncio.ensure_future(lane.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    server.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 10
    assert all(isinstance(r, LedgerUnavailable) for r in results[1:])


@pytest.mark.parametrize("abandonable", [True, False])
async def test_a_request_given_up_while_queued(abandonable: bool) -> None:
    """Dropped if the lane says so (an admission nobody waits for), else run anyway
    (a settlement stands)."""
    server = Server()
    lane: Lane[int, int] = Lane(1, server.one, server.many, abandonable=abandonable)
    first = asyncio.ensure_future(lane.submit(1))
    queued = [asyncio.ensure_future(lane.submit(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    queued[0].cancel()
    server.gate.set()
    assert await first == 10
    assert await queued[1] == 30
    await lane.wait()
    sent = server.singles + [r for b in server.batches for r in b]
    assert sent == ([1, 3] if abandonable else [1, 2, 3])



@pytest.mark.parametrize("abandonable", [True, False])
async def test_a_request_given_up_while_its_failed_batch_is_resent(abandonable: bool) -> None:
    """A batch the server refused goes again one by one; an admission whose caller
    gave up meanwhile (the gate's deadline) is not sent alone any more: it would
    admit a call the PBX was told to refuse, its hold and line kept until the
    meter drops it. A settlement still stands."""
    gates = {n: asyncio.Event() for n in range(4)}
    sent: list[int] = []

    async def one(req: int) -> int:
        sent.append(req)
        await gates[req].wait()
        return req * 10

    async def many(reqs: Sequence[int]) -> list[int]:
        raise BatchFailed("deadlock detected")

    lane: Lane[int, int] = Lane(1, one, many, abandonable=abandonable)
    first = asyncio.ensure_future(lane.submit(0))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(lane.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    gates[0].set()
    async with asyncio.timeout(5):
        while sent != [0, 1]:  # the batch failed; its first element goes alone
            await asyncio.sleep(0)
    queued[2].cancel()  # its caller gives up while the fallback is under way
    for gate in gates.values():
        gate.set()
    assert await first == 0
    assert await asyncio.gather(*queued[:2]) == [10, 20]
    await lane.wait()
    assert sent == ([0, 1, 2] if abandonable else [0, 1, 2, 3])

# -- the batch functions on PostgreSQL ---------------------------------------------------
async def _open(pg_url: str) -> pg_backend.PostgresLedger:
    ledger = await open_ledger(pg_url)
    assert isinstance(ledger, pg_backend.PostgresLedger)
    return ledger


@pytest.mark.postgres
async def test_batched_admissions_keep_the_line_cap_and_the_balance(pg_url: str) -> None:
    """Sixty admissions at once on three accounts: one capped at 5 lines, one funded for
    4 increments, one unknown, and a call id twice; each gets the single path's answer."""
    ledger = await _open(pg_url)
    try:
        await ledger.topup("capped", D("100"), ref="f1", at=T0)
        await ledger.topup("poor", RATE * 4, ref="f2", at=T0)
        requests = [(call(f"c{n}", "capped"), 5) for n in range(20)]
        requests += [(call(f"p{n}", "poor"), None) for n in range(20)]
        requests += [(call(f"u{n}", "nobody"), None) for n in range(10)]
        requests += [(call("twice", "capped"), None)] * 2
        results = await asyncio.gather(*(
            ledger.admit_and_hold(c, cap, RATE, 60, reason="ok") for c, cap in requests
        ), return_exceptions=True)
        assert ledger._admits.batches > 0
        capped = [r for (c, _), r in zip(requests, results, strict=True)
                  if c.account == "capped" and c.call_id != "twice"]
        assert capped.count(Admission.ADMITTED) == 5
        assert capped.count(Admission.LINES_BUSY) == 15
        poor = results[20:40]
        assert poor.count(Admission.ADMITTED) == 4 and poor.count(Admission.NO_FUNDS) == 16
        assert all(isinstance(r, UnknownAccount) for r in results[40:50])
        assert results[50] is Admission.ADMITTED  # the same call admitted again: a replay
        assert results[51] is Admission.ADMITTED
        assert len(await ledger.live_calls("capped")) == 6  # 5 capped + "twice" (no cap)
        assert (await ledger.balance("poor")).available == D(0)
        # Five capped calls and "twice" twice: the Python path logs a replayed admission
        # again, as it does without batches.
        assert len(await ledger.attempts("capped", T0)) == 7
        assert await ledger.audit() == []
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_batched_settlements_replay_conflict_and_unknown(pg_url: str) -> None:
    ledger = await _open(pg_url)
    try:
        await ledger.topup("acme", D("100"), ref="f1", at=T0)
        for n in range(31):
            assert await ledger.admit_and_hold(call(f"c{n}", "acme"), None, RATE, 60,
                                               reason="ok") is Admission.ADMITTED
        cdrs = [cdr(f"c{n}", "acme", RATE, 60) for n in range(30)]
        cdrs += [cdr("c0", "acme", RATE, 60),  # a replay of the same CDR
                 cdr("c1", "acme", D(0), 0),  # a conflicting one
                 cdr("nothing", "acme"),  # an unknown call
                 cdr("c30", "other")]  # acme's call, named as another account's
        results = await asyncio.gather(*(ledger.settle_call(c) for c in cdrs),
                                       return_exceptions=True)
        assert ledger._settles.batches > 0
        assert all(isinstance(r, Cdr) and r.amount == RATE for r in results[2:31])
        assert results[0] == results[30]  # the replay: the stored CDR
        # c1's two CDRs raced (one may be in a batch, the other alone): the first settled
        # it, the other is a conflict, whichever came first.
        first, second = results[1], results[31]
        assert {type(first), type(second)} == {Cdr, IdempotencyConflict}
        c1 = first if isinstance(first, Cdr) else second
        assert isinstance(c1, Cdr)
        assert isinstance(results[32], LedgerError) and "nothing" in str(results[32])
        assert isinstance(results[33], RefusedOperation) and "other" in str(results[33])
        await ledger.settle_call(cdr("c30", "acme"))
        balance = await ledger.balance("acme")
        assert (balance.available, balance.held) == (D("100") - RATE * 29 - c1.amount, D(0))
        assert await ledger.audit() == []
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_a_batch_the_server_refuses_is_run_one_by_one(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = await _open(pg_url)
    try:
        await ledger.topup("acme", RATE * 10, ref="f1", at=T0)
        # The server refuses every batch: the functions are gone, the read divides by zero.
        for fn in ("callgate_admit_batch", "callgate_hold_batch", "callgate_settle_batch"):
            async with ledger._conn() as conn:
                await conn.execute(f"DROP FUNCTION {fn}")
        monkeypatch.setattr(sql, "STATE_MANY", sql.STATE_MANY.replace(
            "ORDER BY k.n", "ORDER BY 1 / (k.n - k.n)"))
        states = await asyncio.gather(*(ledger.account_state("acme") for _ in range(10)))
        assert {s.available for s in states} == {RATE * 10}
        admitted = await asyncio.gather(*(
            ledger.admit_and_hold(call(f"c{n}", "acme"), None, RATE, 60, reason="ok")
            for n in range(12)))
        assert admitted.count(Admission.ADMITTED) == 10
        assert admitted.count(Admission.NO_FUNDS) == 2
        await ledger.topup("acme", RATE * 10, ref="f2", at=T0)
        live = [c.call_id for c in await ledger.live_calls("acme")]
        assert all(await asyncio.gather(*(ledger.hold(c, 2, RATE, 120, T0) for c in live)))
        settled = await asyncio.gather(*(ledger.settle_call(cdr(c, "acme", RATE, 60))
                                         for c in live))
        assert [c.amount for c in settled] == [RATE] * 10
        assert all(lane.batches > 0 for lane in (ledger._reads, ledger._admits,
                                                  ledger._holds, ledger._settles))
        balance = await ledger.balance("acme")
        assert (balance.available, balance.held) == (RATE * 10, D(0))
        assert await ledger.audit() == []
    finally:
        await ledger.close()


@pytest.mark.postgres
async def test_batched_state_reads_answer_what_single_reads_do(pg_url: str) -> None:
    """Reads with every window set or not, to known and unknown accounts, suspended or not:
    the batch answers each exactly as a read alone."""
    ledger = await _open(pg_url)
    try:
        await ledger.topup("acme", D("10"), ref="f1", at=T0)
        await ledger.topup("beta", D("5"), ref="f2", at=T0)
        assert await ledger.admit_and_hold(call("live", "acme"), None, RATE, 60,
                                           reason="ok") is Admission.ADMITTED
        for n in range(6):
            at = T0.replace(minute=n * 10)
            await ledger.record_attempt("acme", f"13{n % 2}", at, n != 3, "ok",
                                        caller=f"02{n % 3}")
        async with ledger._conn() as conn:
            await conn.execute("INSERT INTO suspensions VALUES ('beta', 'complaints', 'ops',"
                               " now())")
        queries = []
        for account in ("acme", "beta", "nobody"):
            for since in (None, T0, T0.replace(minute=25)):
                for who in ("020", "021"):
                    queries.append(dict(account=account, account_since=since,
                                        callee_since=since, destination="130",
                                        cps_since=since, caller=who, caller_hour_since=since,
                                        caller_day_since=T0 if since else None))
        alone = [await ledger.account_state(q.pop("account"), **q) for q in
                 [dict(q) for q in queries]]
        together = await asyncio.gather(*(ledger.account_state(q.pop("account"), **q)
                                          for q in [dict(q) for q in queries]))
        assert ledger._reads.batches > 0
        assert list(together) == alone
        assert alone[2].account_attempts == 6 and alone[2].live_calls == 1  # 5 + the admission
        assert alone[8].suspended == "complaints"
        assert not alone[14].known
    finally:
        await ledger.close()
