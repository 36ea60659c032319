"""Every posting and every running total is bounded, so a balance is always exactly the
sum of its postings: SQLite never stores a REAL, PostgreSQL never overflows (both backends)."""

from __future__ import annotations

import sqlite3
import textwrap
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.ledger import RefusedOperation, open_ledger
from agent.ledger._rules import BALANCE_LIMIT

AT = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


async def _sum_of_postings(ledger: Any, account: str) -> D:
    total = D(0)
    for p in await ledger.history(account):
        if p.kind.value in ("topup", "adjustment"):
            total += p.amount
        elif p.kind.value in ("penalty", "refund", "charge"):
            total -= p.amount
    return total


async def test_a_posting_above_the_maximum_is_refused_and_writes_nothing(ledger: Any) -> None:
    await ledger.topup("acme", D(100), ref="B1", at=AT)
    for call in (
        lambda: ledger.topup("acme", D("10000000.0001"), ref="B2", at=AT),
        lambda: ledger.penalty("acme", D("99999999999999999999"), ref="P1", at=AT),
        lambda: ledger.adjust("acme", D("-10000000.0001"), ref="A1", at=AT),
    ):
        with pytest.raises(RefusedOperation, match=r"maximum posting of 10000000\.00"):
            await call()
    assert len(await ledger.history("acme")) == 1
    # The maximum itself is fine.
    await ledger.topup("acme", D(10_000_000), ref="B3", at=AT)
    assert (await ledger.balance("acme")).posted == D("10000100")


async def test_running_totals_stay_exact_at_the_limit(ledger_url: str) -> None:
    """With a huge maximum posting, the balance limit is what stops the total: it never
    leaves the exact integer range, and after coming back it equals its postings."""
    big = "9" * 14  # 10**14 - 1 CNY: 10**18 - 10**4 units at 0.0001
    ledger = await open_ledger(f"{ledger_url}{'&' if '?' in ledger_url else '?'}"
                               f"max_posting={big}")
    try:
        await ledger.topup("acme", D(big), ref="B1", at=AT)
        with pytest.raises(RefusedOperation, match="beyond the ledger's limit"):
            await ledger.topup("acme", D(big), ref="B2", at=AT)
        with pytest.raises(RefusedOperation, match="beyond the ledger's limit"):
            await ledger.adjust("acme", D("1.0001"), ref="A0", at=AT)
        await ledger.adjust("acme", D("-" + big), ref="A1", at=AT)
        await ledger.adjust("acme", D("0.0004"), ref="A2", at=AT)
        balance = await ledger.balance("acme")
        assert balance.posted == D("0.0004") == await _sum_of_postings(ledger, "acme")
        # Below zero too: a penalty cannot take the balance past -limit.
        await ledger.penalty("acme", D(big), ref="P1", at=AT)
        with pytest.raises(RefusedOperation, match="beyond the ledger's limit"):
            await ledger.penalty("acme", D(big), ref="P2", at=AT)
        assert (await ledger.balance("acme")).posted == await _sum_of_postings(ledger, "acme")
        assert await ledger.audit() == []
    finally:
        await ledger.close()


async def test_sqlite_keeps_integers(sqlite_url: str) -> None:
    big = "9" * 14
    ledger = await open_ledger(f"{sqlite_url}?max_posting={big}")
    try:
        await ledger.topup("acme", D(big), ref="B1", at=AT)
        with pytest.raises(RefusedOperation):
            await ledger.topup("acme", D(big), ref="B2", at=AT)
    finally:
        await ledger.close()
    path = sqlite_url[len("sqlite://"):]
    with sqlite3.connect(path) as conn:
        kinds = conn.execute("SELECT typeof(posted), typeof(held), posted FROM accounts").fetchall()
        amounts = {r[0] for r in conn.execute("SELECT typeof(amount) FROM postings")}
    assert kinds == [("integer", "integer", 10**18 - 10**4)]
    assert amounts == {"integer"}
    assert BALANCE_LIMIT < 2**63 // 2  # posted - held always fits a signed 64-bit integer


def test_the_cli_refuses_huge_amounts_in_one_line(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        accounts:
          acme: {name: ACME, caller_ids: ["02158880000"]}
        """))
    base = ["--policy", str(policy), "--ledger", f"sqlite://{tmp_path}/l.db"]
    assert main([*base, "ledger", "init"]) == 0
    assert main([*base, "ledger", "topup", "acme", "100", "--ref", "B0"]) == 0
    capsys.readouterr()
    for amount in ("99999999999999999999", "900000000000000", "10000000.01"):
        assert main([*base, "ledger", "topup", "acme", amount, "--ref", "B1"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert "too large" in err or "maximum posting" in err, err
    assert main([*base, "ledger", "history", "acme", "--json"]) == 0
    assert capsys.readouterr().out.count('"kind"') == 1
