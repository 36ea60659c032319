"""Days and times a person types (CLI options, the console's query parameters).

One reading for every command and every API call that takes ``--from``/``--to``,
``--at`` or ``--since``: a day is ``YYYY-MM-DD``, a time is ISO 8601 (without an
offset it is read in the account's zone), and both are refused with one line,
:class:`DayError`, rather than guessed at or left to fail later.

Why a range: moving a time across zones, taking the next midnight, looking back a
cap's period (at most 366 days) or ahead a few days for the calling hours must
stay inside :mod:`datetime`'s years 1 to 9999, or it raises ``OverflowError`` (the
CLI's "internal error"). Days and times are therefore taken from
:data:`FIRST_DAY` to :data:`LAST_DAY`, which leaves more than a year to either
end; ``--to 9999-12-31`` meaning "for ever" is refused with the last day that
works. No ledger holds a time outside it, and ``strftime`` writes years before
1000 without their leading zeros.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, tzinfo

from agent.money import clip

FIRST_DAY = date(1900, 1, 1)
LAST_DAY = date(9998, 12, 31)
RANGE = f"days and times must be from {FIRST_DAY} to {LAST_DAY}"


class DayError(ValueError):
    """A day or time that cannot be read or is out of range: one line for the user."""


def _in_range(day: date, what: str, text: str) -> None:
    if not FIRST_DAY <= day <= LAST_DAY:
        raise DayError(f"{what} {clip(text)!r} is out of range: {RANGE}")


def parse_day(text: str, what: str) -> date:
    """A day, ``YYYY-MM-DD``, from :data:`FIRST_DAY` to :data:`LAST_DAY`."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise DayError(f"{what} {clip(text)!r} is not a date (YYYY-MM-DD)") from None
    _in_range(day, what, text)
    return day


def parse_period(start: str | None, end: str | None) -> tuple[date | None, date | None]:
    """``--from`` and ``--to`` (either may be absent, but not blank); the last not
    before the first."""
    first = None if start is None else parse_day(start, "--from")
    last = None if end is None else parse_day(end, "--to")
    if first is not None and last is not None and last < first:
        raise DayError(f"--to {last} is before --from {first}")
    return first, last


def day_start(day: date, zone: tzinfo) -> datetime:
    """The UTC instant a day begins in ``zone`` (a day from :func:`parse_day`, or the
    day after one)."""
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def parse_instant(text: str, zone: tzinfo, what: str, *, day_end: bool = False) -> datetime:
    """An ISO time, or a day (``YYYY-MM-DD``), as an aware UTC instant.

    A time without an offset is read in ``zone`` (the account's). A day alone is its
    first instant, or with ``day_end`` its last (a balance "as of" that day).
    """
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        _in_range(day, what, text)
        if day_end:
            return day_start(day + timedelta(days=1), zone) - timedelta(microseconds=1)
        return day_start(day, zone)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DayError(f"{what} {clip(text)!r} is neither a date nor an ISO time "
                       "(YYYY-MM-DD, or e.g. 2026-11-24T09:30)") from None
    _in_range(moment.date(), what, text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)
