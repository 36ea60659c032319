"""Random sequences of finance commands, good and bad, through the real CLI on both
backends: a refused command writes nothing, and every balance always equals the sum of
its postings (hypothesis stateful testing)."""

from __future__ import annotations

import io
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from agent import eventloop
from agent.cli import main
from agent.ledger import PostingKind, open_ledger

POLICY = """\
version: 1
prepaid: {first_topup_minimum: 50}
accounts:
  acme: {name: ACME, caller_ids: ["02158880000"]}
  beta: {name: Beta, caller_ids: ["02158880001"]}
"""
GOOD = st.sampled_from(["50", "100", "0.01", "0.0001", "12.5", "9999999.9999", "10000000"])
BAD = st.sampled_from([
    "1e3", "1_000", "+5", " 5", "5.", ".5", "0", "-0", "", "abc", "NaN", "0.00001",
    "99999999999999999999", "10000000.0001", "１００", "٥", "5,00", "x" * 5000,
])
AMOUNTS = st.one_of(GOOD, BAD, GOOD.map(lambda a: "-" + a))
ACCOUNTS = st.sampled_from(["acme", "beta", "ghost"])
REFS = st.sampled_from(["R1", "R2", "R3", " ", "R-" + "9" * 40, "R" * 300])
OPERATORS = st.sampled_from(["clerk", "auditor", " bad", "x" * 70])


async def _snapshot(url: str) -> tuple[Any, ...]:
    ledger = await open_ledger(url, create=False)
    try:
        balances = await ledger.balances()
        histories = {b.account: await ledger.history(b.account) for b in balances}
        problems = await ledger.audit()
    finally:
        await ledger.close()
    return tuple(balances), histories, problems


def _effect(kind: PostingKind, amount: D) -> D:
    if kind in (PostingKind.TOPUP, PostingKind.ADJUSTMENT):
        return amount
    if kind in (PostingKind.PENALTY, PostingKind.REFUND, PostingKind.CHARGE):
        return -amount
    return D(0)


def _machine(url: str, policy: Path) -> type[RuleBasedStateMachine]:
    class Finance(RuleBasedStateMachine):
        def command(self, *argv: str, operator: str) -> int:
            before = eventloop.run(_snapshot(url))
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                code = main(["--policy", str(policy), "--ledger", url, "--operator", operator,
                             *argv])
            after = eventloop.run(_snapshot(url))
            assert "Traceback" not in err.getvalue()
            assert code in (0, 2), (argv, code, err.getvalue())
            if code != 0:
                assert err.getvalue().count("\n") == 1, err.getvalue()
                assert len(err.getvalue()) < 600
                assert after == before, f"refused {argv} but the ledger changed"
            balances, histories, problems = after
            assert problems == []
            for b in balances:  # the invariant: a balance is the sum of its postings
                postings = histories[b.account]
                assert b.posted == sum((_effect(p.kind, p.amount) for p in postings), D(0))
                lifecycle = [p.kind for p in postings
                             if p.kind in (PostingKind.REFUND, PostingKind.REOPEN)]
                assert b.closed == (lifecycle[-1:] == [PostingKind.REFUND])
            return code

        @rule(kind=st.sampled_from(["topup", "penalty"]), account=ACCOUNTS, amount=AMOUNTS,
              ref=REFS, operator=OPERATORS)
        def money(self, kind: str, account: str, amount: str, ref: str, operator: str) -> None:
            self.command("ledger", kind, account, amount, "--ref", ref, operator=operator)

        @rule(account=ACCOUNTS, amount=AMOUNTS, ref=REFS, operator=OPERATORS,
              reason=st.sampled_from(["typo", ""]))
        def adjust(self, account: str, amount: str, ref: str, operator: str,
                   reason: str) -> None:
            self.command("ledger", "adjust", account, amount, "--ref", ref, "--reason", reason,
                         operator=operator)

        @rule(kind=st.sampled_from(["refund", "reopen"]), account=ACCOUNTS, ref=REFS,
              operator=OPERATORS)
        def lifecycle(self, kind: str, account: str, ref: str, operator: str) -> None:
            self.command("ledger", kind, account, "--ref", ref, operator=operator)

    return Finance


def _run(url: str, tmp_path: Path, examples: int, steps: int) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    with redirect_stdout(io.StringIO()):
        assert main(["--ledger", url, "ledger", "init"]) == 0
    run_state_machine_as_test(
        _machine(url, policy),
        settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )


def test_random_finance_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    _run(sqlite_url, tmp_path, examples=20, steps=20)


@pytest.mark.postgres
def test_random_finance_on_postgres(pg_url: str, tmp_path: Path) -> None:
    _run(pg_url, tmp_path, examples=8, steps=15)
