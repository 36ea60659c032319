"""The ledger: accounts, holds and postings in exact money; ``open_ledger`` picks the backend.

The contract (types, errors, the five money invariants) is in
:mod:`agent.ledger.model`; the backends are :mod:`agent.ledger.sqlite` (the
embedded default) and :mod:`agent.ledger.postgres` (several nodes, one balance).
"""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import parse_qsl, urlsplit

from agent.ledger.model import (
    AccountClosed,
    AccountSnapshot,
    Admission,
    Balance,
    CallRecord,
    CallStatus,
    Cdr,
    IdempotencyConflict,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    Posting,
    PostingKind,
    RefusedOperation,
    UnknownAccount,
)
from agent.money import MINOR_UNIT, AmountError, clip, parse_amount

__all__ = [
    "AccountClosed",
    "AccountSnapshot",
    "Admission",
    "Balance",
    "CallRecord",
    "CallStatus",
    "Cdr",
    "IdempotencyConflict",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "Posting",
    "PostingKind",
    "RefusedOperation",
    "UnknownAccount",
    "open_ledger",
]


def _minor_unit(options: dict[str, str], url: str) -> Decimal:
    text = options.get("minor_unit")
    if text is None:
        return MINOR_UNIT
    try:
        unit = parse_amount(text).normalize()
    except AmountError as exc:
        raise LedgerError(f"ledger URL {url!r}: minor_unit {exc}") from None
    if unit.as_tuple().digits != (1,) or unit > 1:
        raise LedgerError(
            f"ledger URL {url!r}: minor_unit must be 1, 0.1, 0.01, 0.001 or 0.0001 (got {text})"
        )
    return unit


def _max_posting(options: dict[str, str], url: str) -> Decimal:
    from agent.ledger._rules import DEFAULT_MAX_POSTING

    text = options.get("max_posting")
    if text is None:
        return DEFAULT_MAX_POSTING
    try:
        return parse_amount(text, maximum=Decimal(10**14))
    except AmountError as exc:
        raise LedgerError(f"ledger URL {clip(url, 200)!r}: max_posting {exc}") from None


async def open_ledger(url: str, *, create: bool = True) -> Ledger:
    """Open the ledger a URL names, migrating its schema (creating it if ``create``).

    With ``create=False`` (every CLI command but ``ledger init``) a store that
    does not exist — no file, or a database without callgate's tables — is a
    :class:`LedgerError` naming where it looked, and nothing is created.

    ``sqlite:///abs/path/ledger.db`` (an absolute path; ``sqlite:ledger.db``
    without slashes is relative to the working directory),
    ``postgresql://user@host:port/db`` or ``postgres://…``.
    ``?minor_unit=0.01`` sets the unit of a new store (default 0.0001);
    ``?max_posting=1000000`` the largest single finance posting (default
    10,000,000); other PostgreSQL query parameters are server settings, e.g.
    ``?search_path=tenant``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        from agent.ledger.sqlite import SqliteLedger

        if parts.netloc:
            raise LedgerError(
                f"ledger URL {url!r}: a SQLite URL has no host; write sqlite:///path/ledger.db"
            )
        # sqlite:///var/lib/x.db is /var/lib/x.db (the README's agent config);
        # sqlite:ledger.db is relative to the working directory.
        path = "/" + parts.path.lstrip("/") if parts.path.startswith("/") else parts.path
        if not parts.path.strip("/"):
            raise LedgerError(f"ledger URL {url!r} names no file")
        options = dict(parse_qsl(parts.query))
        unknown = set(options) - {"minor_unit", "max_posting"}
        if unknown:
            raise LedgerError(f"ledger URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        return await SqliteLedger.open(path, minor_unit=_minor_unit(options, url), create=create,
                                       max_posting=_max_posting(options, url))
    if scheme in ("postgresql", "postgres"):
        from agent.ledger.postgres import PostgresLedger, split_options

        dsn, options = split_options(url)
        size = options.get("pool_size", "10")
        if not size.isdigit() or int(size) < 1:
            raise LedgerError(f"ledger URL: pool_size must be a positive whole number (got {size})")
        pool_size = int(size)
        return await PostgresLedger.open(
            dsn, minor_unit=_minor_unit(options, url), pool_size=pool_size, create=create,
            max_posting=_max_posting(options, url),
        )
    raise LedgerError(
        f"ledger URL {url!r}: unknown scheme {parts.scheme!r}; "
        "use sqlite:///path/ledger.db or postgresql://user@host/db"
    )
