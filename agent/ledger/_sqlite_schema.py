"""The SQLite ledger's schema: its migrations, and how a store is created or brought
up to date (run by the worker thread, in the write transaction that opens it).
"""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

from agent.ledger import _rules as rules
from agent.ledger.model import LedgerError

# Migrations: MIGRATIONS[n] takes a store from schema version n to n + 1.
MIGRATIONS: list[list[str]] = [
    [  # 1: accounts, postings, calls and their CDRs
        """CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            posted INTEGER NOT NULL DEFAULT 0,
            held INTEGER NOT NULL DEFAULT 0,
            closed INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL)""",
        """CREATE TABLE postings (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            account TEXT NOT NULL REFERENCES accounts(id),
            kind TEXT NOT NULL,
            amount INTEGER NOT NULL,
            at INTEGER NOT NULL,
            ref TEXT NOT NULL,
            key TEXT NOT NULL,
            call_id TEXT,
            note TEXT NOT NULL DEFAULT '',
            UNIQUE (account, key))""",
        "CREATE INDEX postings_account_at ON postings (account, at)",
        "CREATE INDEX postings_call ON postings (call_id) WHERE call_id IS NOT NULL",
        """CREATE TABLE calls (
            call_id TEXT PRIMARY KEY,
            account TEXT NOT NULL REFERENCES accounts(id),
            node TEXT NOT NULL,
            caller TEXT NOT NULL,
            callee TEXT NOT NULL,
            tariff_name TEXT NOT NULL,
            rate INTEGER NOT NULL,
            increment INTEGER NOT NULL,
            minimum INTEGER NOT NULL,
            admitted_at INTEGER NOT NULL,
            answered_at INTEGER,
            paid_seconds INTEGER NOT NULL DEFAULT 0,
            held INTEGER NOT NULL DEFAULT 0,
            steps INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            ended_at INTEGER)""",
        "CREATE INDEX calls_account_status ON calls (account, status)",
        """CREATE TABLE cdrs (
            call_id TEXT PRIMARY KEY REFERENCES calls(call_id),
            account TEXT NOT NULL,
            caller TEXT NOT NULL,
            callee TEXT NOT NULL,
            answered_at INTEGER,
            ended_at INTEGER NOT NULL,
            billsec INTEGER NOT NULL,
            billed_seconds INTEGER NOT NULL,
            amount INTEGER NOT NULL,
            cause TEXT NOT NULL,
            cut_off INTEGER NOT NULL,
            flags TEXT NOT NULL,
            node TEXT NOT NULL,
            submitted TEXT NOT NULL)""",
        "CREATE INDEX cdrs_account_ended ON cdrs (account, ended_at)",
    ],
    [  # 2: the attempts log for frequency and rate caps
        """CREATE TABLE attempts (
            id INTEGER PRIMARY KEY,
            account TEXT NOT NULL,
            destination TEXT NOT NULL,
            at INTEGER NOT NULL,
            allowed INTEGER NOT NULL,
            reason TEXT NOT NULL)""",
        "CREATE INDEX attempts_account_at ON attempts (account, at)",
        "CREATE INDEX attempts_at ON attempts (at)",
    ],
    [  # 3: the gate's reads stay O(live calls) and O(attempts to one number) as history grows
        "CREATE INDEX calls_live ON calls (account) WHERE status != 'ended'",
        "CREATE INDEX attempts_callee ON attempts (account, destination, at)",
    ],
    [  # 4: without statistics SQLite counted live calls through this covering index,
       # reading every call the account ever made (1.6 ms at 50,000); calls_live serves
       # every query by account, so the index only cost writes and misled the planner
        "DROP INDEX calls_account_status",
    ],
    [  # 5: who made each finance posting (blank for the agent's own holds and charges)
        "ALTER TABLE postings ADD COLUMN operator TEXT NOT NULL DEFAULT ''",
    ],
    [  # 6: a settled call corrected from the PBX's own CDR (its billsec, the signed correction)
        "ALTER TABLE cdrs ADD COLUMN pbx_billsec INTEGER",
        "ALTER TABLE cdrs ADD COLUMN correction INTEGER NOT NULL DEFAULT 0",
    ],
    [  # 7: compliance: live do-not-call entries and their ordered change log,
       # complaints, suspensions; attempts remember the presented caller ID
        """CREATE TABLE dnc (
            account TEXT NOT NULL,
            number TEXT NOT NULL,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            added_at INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (account, number))""",
        """CREATE TABLE dnc_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            account TEXT NOT NULL,
            number TEXT NOT NULL,
            added INTEGER NOT NULL,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            at INTEGER NOT NULL)""",
        """CREATE TABLE complaints (
            ticket TEXT PRIMARY KEY,
            account TEXT NOT NULL,
            callee TEXT NOT NULL,
            at INTEGER NOT NULL,
            fine INTEGER NOT NULL,
            operator TEXT NOT NULL,
            note TEXT NOT NULL,
            recorded_at INTEGER NOT NULL,
            withdrawn_at INTEGER,
            withdrawn_by TEXT,
            withdraw_note TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX complaints_account_at ON complaints (account, at)",
        """CREATE TABLE suspensions (
            account TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            at INTEGER NOT NULL)""",
        """CREATE TABLE account_log (
            id INTEGER PRIMARY KEY,
            account TEXT NOT NULL,
            action TEXT NOT NULL,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            at INTEGER NOT NULL)""",
        "ALTER TABLE attempts ADD COLUMN caller TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX attempts_caller ON attempts (account, caller, at)",
    ],
    [],  # 8: PostgreSQL's one-round-trip functions; an in-process store needs none
    [],  # 9: their batch forms (group commit is the SQLite worker's own)
]
assert len(MIGRATIONS) == rules.SCHEMA_VERSION


def migrate(conn: sqlite3.Connection, path: Path, minor_unit: Decimal, create: bool = True
             ) -> tuple[Decimal, bool]:
    """Bring the store to the current schema; return its minor unit and whether it was new."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    created = "meta" not in tables
    if created:
        if tables - {"sqlite_sequence"}:
            raise LedgerError(f"{path} is an SQLite database but not a callgate ledger")
        if not create:
            raise LedgerError(f"{path} is not a callgate ledger (an empty file)")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("schema_version", "0"), ("minor_unit", str(minor_unit))],
        )
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    version = int(meta["schema_version"])
    if version > rules.SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {path} has schema version {version}, newer than this callgate "
            f"understands ({rules.SCHEMA_VERSION}); upgrade callgate"
        )
    for step in MIGRATIONS[version:]:
        for statement in step:
            conn.execute(statement)
    if version < rules.SCHEMA_VERSION:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(rules.SCHEMA_VERSION),)
        )
    return Decimal(meta["minor_unit"]), created
