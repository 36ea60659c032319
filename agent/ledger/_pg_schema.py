"""The PostgreSQL ledger's schema: its migrations, the server-side functions and
how a store is created or brought up to date (under an advisory lock, so agents
starting at once against one database migrate it once).

MIGRATIONS[n] takes a store from schema version n to n + 1; the tables are the
SQLite ledger's, the functions (schema 8) do the usual admission, hold and
settlement in one round trip each, and their batch forms (schema 9) do several
of one kind in one statement and one commit (agent/ledger/postgres.py calls them).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from agent.ledger import _rules as rules
from agent.ledger.model import LedgerError

# The usual admission — a new call on an open account — as one statement the
# server runs alone: lock, count, hold, record, log, commit, in one round trip
# instead of five. It answers 'careful' for everything else (unknown or closed
# account, a call id already known), having written nothing; the Python path
# then says why. Each statement of a VOLATILE function takes a fresh snapshot
# under READ COMMITTED, so the live count, made after the account row is
# locked, sees every call admitted by whoever held the lock before us.
# A later change to it is a new schema version with CREATE OR REPLACE.
ADMIT_FUNCTION = """
CREATE FUNCTION callgate_admit(
    p_call_id TEXT, p_account TEXT, p_node TEXT, p_caller TEXT, p_callee TEXT,
    p_tariff TEXT, p_rate BIGINT, p_increment INTEGER, p_minimum INTEGER,
    p_at TIMESTAMPTZ, p_units BIGINT, p_paid INTEGER, p_key TEXT,
    p_max_live BIGINT, p_reason TEXT, p_caller_key TEXT
) RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_closed BOOLEAN;
BEGIN
    -- Locking the account row serialises admissions across every node.
    SELECT closed INTO v_closed FROM accounts WHERE id = p_account FOR UPDATE;
    IF NOT FOUND OR v_closed
       OR EXISTS (SELECT 1 FROM calls WHERE call_id = p_call_id) THEN
        RETURN 'careful';
    END IF;
    IF p_max_live IS NOT NULL AND (SELECT count(*) FROM calls
            WHERE account = p_account AND status <> 'ended') >= p_max_live THEN
        INSERT INTO attempts (account, destination, at, allowed, reason, caller)
            VALUES (p_account, p_callee, p_at, false, 'concurrency_limit', p_caller_key);
        RETURN 'lines_busy';
    END IF;
    -- The conditional UPDATE is the balance check.
    UPDATE accounts SET held = held + p_units
        WHERE id = p_account AND posted - held >= p_units;
    IF NOT FOUND THEN
        INSERT INTO attempts (account, destination, at, allowed, reason, caller)
            VALUES (p_account, p_callee, p_at, false, 'insufficient_balance', p_caller_key);
        RETURN 'no_funds';
    END IF;
    INSERT INTO calls (call_id, account, node, caller, callee, tariff_name, rate, increment,
                       minimum, admitted_at, status, held, paid_seconds, steps)
        VALUES (p_call_id, p_account, p_node, p_caller, p_callee, p_tariff, p_rate,
                p_increment, p_minimum, p_at, 'admitted', p_units, p_paid, 1);
    INSERT INTO postings (account, kind, amount, at, ref, key, call_id)
        VALUES (p_account, 'hold', p_units, p_at, p_call_id, p_key, p_call_id);
    INSERT INTO attempts (account, destination, at, allowed, reason, caller)
        VALUES (p_account, p_callee, p_at, true, p_reason, p_caller_key);
    RETURN 'admitted';
END
$$"""

# The usual settlement — the first CDR of a call that belongs to the account it
# names — in one round trip instead of eight: the charge and release postings,
# the balances, the call's end and its CDR. It returns the stored CDR (a replay
# or a conflict: the caller compares fingerprints) or, for the new one, the
# CDR it wrote; nothing, having written nothing, for an unknown call or another
# account's, which the Python path explains. The charge is rules.settle_plan's:
# what the CDR says, never more than the call's holds (then flagged capped,
# p_flags_capped); tests/test_ledger_contract.py holds both backends to it.
SETTLE_FUNCTION = """
CREATE FUNCTION callgate_settle(
    p_call_id TEXT, p_account TEXT, p_caller TEXT, p_callee TEXT, p_answered TIMESTAMPTZ,
    p_ended TIMESTAMPTZ, p_billsec INTEGER, p_billed INTEGER, p_amount BIGINT, p_cause TEXT,
    p_cut_off BOOLEAN, p_flags TEXT, p_flags_capped TEXT, p_node TEXT, p_submitted TEXT
) RETURNS SETOF cdrs LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_account TEXT;
    v_held BIGINT;
    v_charge BIGINT;
    v_cdr cdrs%ROWTYPE;
BEGIN
    -- Lock order call, then account (as every writer).
    SELECT account, held INTO v_account, v_held FROM calls WHERE call_id = p_call_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_cdr FROM cdrs WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT v_cdr;
        RETURN;
    END IF;
    IF v_account <> p_account THEN
        RETURN;
    END IF;
    v_charge := least(p_amount, v_held);
    IF v_charge > 0 THEN
        INSERT INTO postings (account, kind, amount, at, ref, key, call_id)
            VALUES (v_account, 'charge', v_charge, p_ended, p_call_id,
                    'charge:' || p_call_id, p_call_id);
    END IF;
    IF v_held - v_charge > 0 THEN
        INSERT INTO postings (account, kind, amount, at, ref, key, call_id)
            VALUES (v_account, 'release', v_held - v_charge, p_ended, p_call_id,
                    'release:' || p_call_id, p_call_id);
    END IF;
    UPDATE accounts SET posted = posted - v_charge, held = held - v_held WHERE id = v_account;
    UPDATE calls SET held = 0, status = 'ended', ended_at = p_ended WHERE call_id = p_call_id;
    INSERT INTO cdrs (call_id, account, caller, callee, answered_at, ended_at, billsec,
                      billed_seconds, amount, cause, cut_off, flags, node, submitted)
        VALUES (p_call_id, v_account, p_caller, p_callee, p_answered, p_ended, p_billsec,
                p_billed, v_charge, p_cause, p_cut_off,
                CASE WHEN p_amount > v_held THEN p_flags_capped ELSE p_flags END,
                p_node, p_submitted)
        RETURNING * INTO v_cdr;
    RETURN NEXT v_cdr;
END
$$"""

# The meter's hold of the next increment of a live call in one round trip: what
# _hold_job does, answering 'held' (also for the same step again) or 'no_funds';
# 'careful' (having written nothing) for an unknown or ended call, a closed
# account or a step held before for another amount, which the Python path explains.
HOLD_FUNCTION = """
CREATE FUNCTION callgate_hold(
    p_call_id TEXT, p_units BIGINT, p_paid INTEGER, p_at TIMESTAMPTZ, p_key TEXT
) RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_account TEXT;
    v_status TEXT;
    v_done BIGINT;
BEGIN
    -- Lock order call, then account (as every writer).
    SELECT account, status INTO v_account, v_status FROM calls
        WHERE call_id = p_call_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'careful';
    END IF;
    SELECT amount INTO v_done FROM postings WHERE account = v_account AND key = p_key;
    IF FOUND THEN
        RETURN CASE WHEN v_done = p_units THEN 'held' ELSE 'careful' END;
    END IF;
    IF v_status = 'ended' THEN
        RETURN 'careful';
    END IF;
    UPDATE accounts SET held = held + p_units
        WHERE id = v_account AND NOT closed AND posted - held >= p_units;
    IF NOT FOUND THEN
        RETURN CASE WHEN (SELECT closed FROM accounts WHERE id = v_account)
                    THEN 'careful' ELSE 'no_funds' END;
    END IF;
    INSERT INTO postings (account, kind, amount, at, ref, key, call_id)
        VALUES (v_account, 'hold', p_units, p_at, p_call_id, p_key, p_call_id);
    UPDATE calls SET held = held + p_units, paid_seconds = greatest(paid_seconds, p_paid),
        steps = steps + 1 WHERE call_id = p_call_id;
    RETURN 'held';
END
$$"""

# Group commit (schema 9): several requests of one kind that queued up while the
# agent's lanes were busy (agent/ledger/_pg_batch.py) go as one statement, one
# transaction and one commit. Each element is the schema 8 function itself,
# called in the order the requests arrived, so the money rules are the same
# function; an element answering 'careful' (or nothing) is explained by the
# Python path, alone, afterwards. Every lock the batch will need is taken first,
# in a stable order, so batches from any number of nodes cannot deadlock with
# one another or with single writers: calls by call id, then accounts by id (the
# lock order of every writer is call, then account). An error anywhere takes the
# whole batch back; the agent then runs its elements one by one.
ADMIT_BATCH_FUNCTION = """
CREATE FUNCTION callgate_admit_batch(
    p_call_id TEXT[], p_account TEXT[], p_node TEXT[], p_caller TEXT[], p_callee TEXT[],
    p_tariff TEXT[], p_rate BIGINT[], p_increment INTEGER[], p_minimum INTEGER[],
    p_at TIMESTAMPTZ[], p_units BIGINT[], p_paid INTEGER[], p_key TEXT[],
    p_max_live BIGINT[], p_reason TEXT[], p_caller_key TEXT[]
) RETURNS TEXT[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_out TEXT[] := '{}';
BEGIN
    PERFORM 1 FROM accounts WHERE id = ANY(p_account) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. cardinality(p_call_id) LOOP
        v_out := v_out || callgate_admit(
            p_call_id[i], p_account[i], p_node[i], p_caller[i], p_callee[i], p_tariff[i],
            p_rate[i], p_increment[i], p_minimum[i], p_at[i], p_units[i], p_paid[i],
            p_key[i], p_max_live[i], p_reason[i], p_caller_key[i]);
    END LOOP;
    RETURN v_out;
END
$$"""

HOLD_BATCH_FUNCTION = """
CREATE FUNCTION callgate_hold_batch(
    p_call_id TEXT[], p_units BIGINT[], p_paid INTEGER[], p_at TIMESTAMPTZ[], p_key TEXT[]
) RETURNS TEXT[] LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_out TEXT[] := '{}';
BEGIN
    PERFORM 1 FROM calls WHERE call_id = ANY(p_call_id) ORDER BY call_id FOR UPDATE;
    PERFORM 1 FROM accounts WHERE id IN (SELECT account FROM calls
        WHERE call_id = ANY(p_call_id)) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. cardinality(p_call_id) LOOP
        v_out := v_out || callgate_hold(p_call_id[i], p_units[i], p_paid[i], p_at[i],
                                        p_key[i]);
    END LOOP;
    RETURN v_out;
END
$$"""

# One row per element that callgate_settle answered, numbered by its place in
# the batch (from 1); an element without a row is explained by the Python path.
SETTLE_BATCH_FUNCTION = """
CREATE FUNCTION callgate_settle_batch(
    p_call_id TEXT[], p_account TEXT[], p_caller TEXT[], p_callee TEXT[],
    p_answered TIMESTAMPTZ[], p_ended TIMESTAMPTZ[], p_billsec INTEGER[], p_billed INTEGER[],
    p_amount BIGINT[], p_cause TEXT[], p_cut_off BOOLEAN[], p_flags TEXT[],
    p_flags_capped TEXT[], p_node TEXT[], p_submitted TEXT[]
) RETURNS SETOF cdrs_numbered LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_cdr cdrs%ROWTYPE;
BEGIN
    PERFORM 1 FROM calls WHERE call_id = ANY(p_call_id) ORDER BY call_id FOR UPDATE;
    PERFORM 1 FROM accounts WHERE id IN (SELECT account FROM calls
        WHERE call_id = ANY(p_call_id)) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. cardinality(p_call_id) LOOP
        SELECT * INTO v_cdr FROM callgate_settle(
            p_call_id[i], p_account[i], p_caller[i], p_callee[i], p_answered[i], p_ended[i],
            p_billsec[i], p_billed[i], p_amount[i], p_cause[i], p_cut_off[i], p_flags[i],
            p_flags_capped[i], p_node[i], p_submitted[i]);
        IF FOUND THEN
            RETURN NEXT ROW(i, v_cdr)::cdrs_numbered;
        END IF;
    END LOOP;
END
$$"""

MIGRATIONS: list[list[str]] = [
    [  # 1: accounts, postings, calls and their CDRs
        """CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            posted BIGINT NOT NULL DEFAULT 0,
            held BIGINT NOT NULL DEFAULT 0,
            closed BOOLEAN NOT NULL DEFAULT false,
            created_at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE postings (
            id BIGSERIAL PRIMARY KEY,
            account TEXT NOT NULL REFERENCES accounts(id),
            kind TEXT NOT NULL,
            amount BIGINT NOT NULL,
            at TIMESTAMPTZ NOT NULL,
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
            rate BIGINT NOT NULL,
            increment INTEGER NOT NULL,
            minimum INTEGER NOT NULL,
            admitted_at TIMESTAMPTZ NOT NULL,
            answered_at TIMESTAMPTZ,
            paid_seconds INTEGER NOT NULL DEFAULT 0,
            held BIGINT NOT NULL DEFAULT 0,
            steps INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            ended_at TIMESTAMPTZ)""",
        "CREATE INDEX calls_account_status ON calls (account, status)",
        """CREATE TABLE cdrs (
            call_id TEXT PRIMARY KEY REFERENCES calls(call_id),
            account TEXT NOT NULL,
            caller TEXT NOT NULL,
            callee TEXT NOT NULL,
            answered_at TIMESTAMPTZ,
            ended_at TIMESTAMPTZ NOT NULL,
            billsec INTEGER NOT NULL,
            billed_seconds INTEGER NOT NULL,
            amount BIGINT NOT NULL,
            cause TEXT NOT NULL,
            cut_off BOOLEAN NOT NULL,
            flags TEXT NOT NULL,
            node TEXT NOT NULL,
            submitted TEXT NOT NULL)""",
        "CREATE INDEX cdrs_account_ended ON cdrs (account, ended_at)",
    ],
    [  # 2: the attempts log for frequency and rate caps, shared by every node
        """CREATE TABLE attempts (
            id BIGSERIAL PRIMARY KEY,
            account TEXT NOT NULL,
            destination TEXT NOT NULL,
            at TIMESTAMPTZ NOT NULL,
            allowed BOOLEAN NOT NULL,
            reason TEXT NOT NULL)""",
        "CREATE INDEX attempts_account_at ON attempts (account, at)",
        "CREATE INDEX attempts_at ON attempts (at)",
    ],
    [  # 3: the gate's reads stay O(live calls) and O(attempts to one number) as history grows
        "CREATE INDEX calls_live ON calls (account) WHERE status <> 'ended'",
        "CREATE INDEX attempts_callee ON attempts (account, destination, at)",
    ],
    [  # 4: calls_live serves every query of calls by account (see the SQLite ledger)
        "DROP INDEX calls_account_status",
    ],
    [  # 5: who made each finance posting (blank for the agent's own holds and charges)
        "ALTER TABLE postings ADD COLUMN operator TEXT NOT NULL DEFAULT ''",
    ],
    [  # 6: a settled call corrected from the PBX's own CDR (its billsec, the signed correction)
        "ALTER TABLE cdrs ADD COLUMN pbx_billsec INTEGER",
        "ALTER TABLE cdrs ADD COLUMN correction BIGINT NOT NULL DEFAULT 0",
    ],
    [  # 7: compliance (see the SQLite ledger)
        """CREATE TABLE dnc (
            account TEXT NOT NULL,
            number TEXT NOT NULL,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            added_at TIMESTAMPTZ NOT NULL,
            seq BIGINT NOT NULL,
            PRIMARY KEY (account, number))""",
        """CREATE TABLE dnc_log (
            seq BIGSERIAL PRIMARY KEY,
            account TEXT NOT NULL,
            number TEXT NOT NULL,
            added BOOLEAN NOT NULL,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE complaints (
            ticket TEXT PRIMARY KEY,
            account TEXT NOT NULL,
            callee TEXT NOT NULL,
            at TIMESTAMPTZ NOT NULL,
            fine BIGINT NOT NULL,
            operator TEXT NOT NULL,
            note TEXT NOT NULL,
            recorded_at TIMESTAMPTZ NOT NULL,
            withdrawn_at TIMESTAMPTZ,
            withdrawn_by TEXT,
            withdraw_note TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX complaints_account_at ON complaints (account, at)",
        """CREATE TABLE suspensions (
            account TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            at TIMESTAMPTZ NOT NULL)""",
        """CREATE TABLE account_log (
            id BIGSERIAL PRIMARY KEY,
            account TEXT NOT NULL,
            action TEXT NOT NULL,
            reason TEXT NOT NULL,
            operator TEXT NOT NULL,
            at TIMESTAMPTZ NOT NULL)""",
        "ALTER TABLE attempts ADD COLUMN caller TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX attempts_caller ON attempts (account, caller, at)",
    ],
    [  # 8: admission, holds and settlement in one round trip each
        ADMIT_FUNCTION,
        HOLD_FUNCTION,
        SETTLE_FUNCTION,
    ],
    [  # 9: their batch forms, for group commit (nothing else changes)
        "CREATE TYPE cdrs_numbered AS (n INTEGER, cdr cdrs)",
        ADMIT_BATCH_FUNCTION,
        HOLD_BATCH_FUNCTION,
        SETTLE_BATCH_FUNCTION,
    ],
]
assert len(MIGRATIONS) == rules.SCHEMA_VERSION

# Any 64-bit constant: serialises schema creation/migration between agents
# starting at once against the same database.
MIGRATION_LOCK = 0x63616C6C67617465  # "callgate"


async def migrate(conn: Any, where: str, minor_unit: Decimal, create: bool = True
                   ) -> tuple[Decimal, bool]:
    """Bring the store to the current schema; return its minor unit and whether it was new."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
    created = await conn.fetchval("SELECT to_regclass('meta')") is None
    if created:
        schemas = await conn.fetchval("SELECT current_setting('search_path')")
        if not create:
            raise LedgerError(
                f"no ledger at {where}: the database has no callgate tables in its search "
                f"path ({schemas}); create them with `callgate ledger init`, or check "
                "--ledger / CALLGATE_LEDGER / agent.yaml"
            )
        if await conn.fetchval("SELECT to_regclass('accounts')") is not None:
            raise LedgerError(f"{where} has an accounts table but is not a callgate ledger")
        if await conn.fetchval("SELECT current_schema()") is None:
            # ?search_path=callgate on a database without that schema: make it.
            first = _first_schema(schemas)
            if first is None:
                raise LedgerError(
                    f"{where}: the search_path ({schemas}) names no schema to create the "
                    "ledger in; add ?search_path=callgate to the URL"
                )
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(first)}")
        await conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        await conn.executemany(
            "INSERT INTO meta (key, value) VALUES ($1, $2)",
            [("schema_version", "0"), ("minor_unit", str(minor_unit))],
        )
    meta = {r["key"]: r["value"] for r in await conn.fetch("SELECT key, value FROM meta")}
    version = int(meta["schema_version"])
    if version > rules.SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {where} has schema version {version}, newer than this callgate "
            f"understands ({rules.SCHEMA_VERSION}); upgrade callgate"
        )
    for step in MIGRATIONS[version:]:
        for statement in step:
            await conn.execute(statement)
    if version < rules.SCHEMA_VERSION:
        await conn.execute(
            "UPDATE meta SET value = $1 WHERE key = 'schema_version'", str(rules.SCHEMA_VERSION)
        )
    return Decimal(meta["minor_unit"]), created


def _first_schema(search_path: str) -> str | None:
    """The first schema a search_path names (not ``$user``), unquoted."""
    for part in search_path.split(","):
        name = part.strip()
        if name.startswith('"') and name.endswith('"') and len(name) >= 2:
            name = name[1:-1].replace('""', '"')
        if name and name != "$user":
            return name
    return None


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
