"""Shared test fixtures: a fresh ledger on each backend.

SQLite: a new file in ``tmp_path``. PostgreSQL: a new schema in database ``test``
at 127.0.0.1:5432, selected through the URL's ``search_path`` and dropped after
the test. When that server cannot be reached the PostgreSQL tests are skipped,
except under CI (``CI=true``) where they fail: CI must not pass by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent import eventloop

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_DATABASE = "test"
PG_USERS = ("root", "postgres")

_pg_base: list[str | None] = []  # cached: the working base URL, or None


def _in_thread(coro_fn: Any, *args: Any) -> Any:
    """Run a coroutine on a private loop: sync fixtures must not touch the test's loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(eventloop.run, coro_fn(*args)).result()


async def _find_pg() -> tuple[str | None, str]:
    import asyncpg

    errors = []
    for user in PG_USERS:
        url = f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{PG_DATABASE}"
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except Exception as exc:
            errors.append(f"{user}: {exc}")
            continue
        await conn.close()
        return url, ""
    return None, "; ".join(errors)


def pg_base_url() -> str:
    """The base URL of the test server, or skip/fail the test as the environment says."""
    if not _pg_base:
        url, why = _in_thread(_find_pg)
        _pg_base.append(url)
        if url is None:
            _pg_base.append(why)
    url = _pg_base[0]
    if url is None:
        message = (
            f"PostgreSQL at {PG_HOST}:{PG_PORT} database {PG_DATABASE!r} is not reachable "
            f"({_pg_base[1]})"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    return url


async def _pg_schema(base: str, schema: str, create: bool) -> None:
    import asyncpg

    conn = await asyncpg.connect(base, timeout=5)
    try:
        if create:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        else:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL ledger URL whose search_path is a fresh schema, dropped afterwards."""
    base = pg_base_url()
    schema = f"ledger_test_{uuid.uuid4().hex[:12]}"
    _in_thread(_pg_schema, base, schema, True)
    try:
        yield f"{base}?search_path={schema}"
    finally:
        _in_thread(_pg_schema, base, schema, False)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/ledger.db"


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def ledger_url(request: pytest.FixtureRequest) -> str:
    """A URL of a fresh, empty ledger store, once per backend."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Any]:
    from agent.ledger import open_ledger

    opened = await open_ledger(ledger_url)
    try:
        yield opened
    finally:
        await opened.close()


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """The tests run on the loop the daemon runs on (agent.eventloop)."""
    from agent import eventloop

    return {eventloop.loop_name(): eventloop.loop_factory()}
