"""Only ``callgate run`` and ``callgate ledger init`` create a ledger; every other command
refuses a store that does not exist, naming where it looked, and creates nothing."""

from __future__ import annotations

import ast
import textwrap
import uuid
from pathlib import Path

import pytest

from agent import eventloop
from agent.cli import main
from tests.conftest import _in_thread, pg_base_url

POLICY = """\
version: 1
prepaid: {first_topup_minimum: 100}
accounts:
  acme: {name: ACME, caller_ids: ["02158880000"]}
"""

# Every command that reads or writes a ledger, as a user would type it.
COMMANDS = [
    ["ledger", "topup", "acme", "100", "--ref", "B1"],
    ["ledger", "penalty", "acme", "5", "--ref", "P1"],
    ["ledger", "adjust", "acme", "5", "--ref", "A1", "--reason", "r"],
    ["ledger", "refund", "acme", "--ref", "R1"],
    ["ledger", "reopen", "acme", "--ref", "O1"],
    ["ledger", "balance"],
    ["ledger", "balance", "acme"],
    ["ledger", "history", "acme"],
    ["ledger", "statement", "acme"],
    ["calls"],
    ["policy", "explain", "--account", "acme", "--to", "13800138000"],
    # the commands other work added on the same helper
    ["ledger", "balance", "acme", "--at", "2026-11-01"],
    ["ledger", "report", "--from", "2026-11-01", "--to", "2026-11-30"],
    ["ledger", "flagged", "--from", "2026-11-01", "--to", "2026-11-30"],
    ["complaint", "list"],
    ["dnc", "list"],
    ["account", "status", "acme"],
    ["account", "suspend", "acme", "--reason", "x"],
]


@pytest.fixture
def policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("agent.cli.common.DEFAULT_CONFIG", tmp_path / "absent.yaml")
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(POLICY))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_a_mistyped_sqlite_path_is_refused_and_not_created(
        command: list[str], policy: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "ledgr.db"
    code, out, err = run(capsys, "--policy", str(policy), "--ledger", f"sqlite://{typo}",
                         *command)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert f"no ledger at {typo}" in err
    assert "ledger init" in err
    assert not typo.exists() and list(tmp_path.iterdir()) == [policy]


def test_an_empty_file_is_not_a_ledger_and_stays_empty(
        policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = run(capsys, "--policy", str(policy), "--ledger", f"sqlite://{empty}",
                       "ledger", "balance")
    assert code == 2 and "not a callgate ledger" in err
    assert empty.stat().st_size == 0


def test_ledger_init_creates_once_then_commands_work(
        policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite://{tmp_path}/ledger.db"
    code, out, _ = run(capsys, "--ledger", url, "ledger", "init")
    assert code == 0 and out.startswith(f"created the ledger at {tmp_path}/ledger.db")
    code, out, _ = run(capsys, "--ledger", url, "ledger", "init")
    assert code == 0 and "already exists" in out
    assert run(capsys, "--policy", str(policy), "--ledger", url, "ledger", "topup", "acme",
               "100", "--ref", "B1")[0] == 0


async def _tables(base: str, schema: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(base)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
        exists = await conn.fetchval(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1", schema)
        return ["<schema>"] * int(exists) + sorted(r[0] for r in rows)
    finally:
        await conn.close()


async def _drop(base: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_a_postgres_database_without_our_tables_is_missing_not_populated(
        command: list[str], policy: Path, pg_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    schema = pg_url.rsplit("search_path=", 1)[1]
    code, out, err = run(capsys, "--policy", str(policy), "--ledger", pg_url, *command)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "no ledger at" in err and "ledger init" in err, err
    assert _in_thread(_tables, pg_base_url(), schema) == ["<schema>"]  # nothing created


@pytest.mark.postgres
def test_search_path_to_a_new_schema_is_created_by_init(
        policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = pg_base_url()
    schema = f"callgate_new_{uuid.uuid4().hex[:10]}"
    url = f"{base}?search_path={schema}"
    try:
        code, out, err = run(capsys, "--ledger", url, "ledger", "balance")
        assert code == 2 and "no ledger at" in err and "Traceback" not in err
        assert _in_thread(_tables, base, schema) == []
        code, out, err = run(capsys, "--ledger", url, "ledger", "init")
        assert (code, err) == (0, ""), err
        assert "created the ledger" in out
        tables = _in_thread(_tables, base, schema)
        assert tables[0] == "<schema>" and {"accounts", "postings", "meta"} <= set(tables)
        assert run(capsys, "--policy", str(policy), "--ledger", url, "ledger", "topup",
                   "acme", "100", "--ref", "B1")[0] == 0
    finally:
        _in_thread(_drop, base, schema)


def test_run_still_creates_its_ledger(tmp_path: Path) -> None:
    """The daemon's own open (what `run` does) creates a new store."""
    from agent.ledger import open_ledger

    async def go() -> bool:
        ledger = await open_ledger(f"sqlite://{tmp_path}/new.db")
        try:
            return bool(getattr(ledger, "created", False))
        finally:
            await ledger.close()

    assert eventloop.run(go()) is True
    assert (tmp_path / "new.db").exists()


def test_every_cli_command_opens_its_ledger_through_the_one_refusing_helper() -> None:
    """A command added later cannot bring the silent creation back: in agent/cli only
    common.open_store may call open_ledger, and it creates only when told to."""
    cli = Path(__file__).resolve().parent.parent / "agent" / "cli"
    offenders: list[str] = []
    for path in sorted(cli.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == "open_ledger" and path.name != "common.py":
                    # config check probes the ledger without creating it
                    creates = [k for k in node.keywords if k.arg == "create"]
                    ok = creates and isinstance(creates[0].value, ast.Constant) and \
                        creates[0].value.value is False
                    if not ok:
                        offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


