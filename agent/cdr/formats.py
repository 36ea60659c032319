"""The PBXs' CDR CSV rows, parsed (sans-IO): one line of text in, one :class:`CdrRow` out.

A PBX writes one CSV row per call when it ends; callgate reads the rows to settle
money from the PBX's own billsec. Which column holds what is a :class:`Layout`:
a list of column names, one per CSV column, each either one of the *roles*
callgate reads or anything else (a column it skips). Role names, and the PBX
variable names accepted for them (so a layout can be pasted from the PBX's own
template):

==============  ==========================================================
role            also accepted as
==============  ==========================================================
``call_id``     ``uniqueid`` (Asterisk), ``uuid`` (FreeSWITCH)
``accountcode`` —
``caller``      ``src``, ``caller_id_number``
``destination`` ``dst``, ``destination_number``
``context``     ``dcontext``
``start``       ``start_epoch``, ``start_stamp``
``answer``      ``answer_epoch``, ``answer_stamp``
``end``         ``end_epoch``, ``end_stamp``
``duration``    —
``billsec``     —
``disposition`` ``hangup_cause`` (``ANSWERED``, ``BUSY``, ``NORMAL_CLEARING`` …)
==============  ==========================================================

``call_id`` and ``billsec`` are required: callgate matches a row to its ledger
call by the PBX's unique id, which is the id the ledger keeps for the call.
Times are epoch seconds (``1764752400`` or ``1764752400.123456``) or
``YYYY-MM-DD HH:MM:SS`` in the layout's timezone (UTC unless configured); an
empty time or ``0`` means "did not happen" (an unanswered call's answer time).

A row is damaged, and :func:`parse_row` raises :class:`CdrFormatError` naming
the line and the field (value clipped), unless billsec and duration are ASCII
digits of at most :data:`MAX_SECONDS` (billsec at most duration + 1 s), epoch
times are ASCII and before the year 10000, and the fields read are printable
and at most :data:`FIELD_LIMIT` characters. It raises nothing else, whatever
the line: a damaged row must never crash a reader or reach money.

The presets (:data:`PRESETS`) are the standard layouts:

- ``asterisk-custom``: the ``cdr_custom`` row callgate ships
  (``config/asterisk/cdr_custom.conf``).
- ``asterisk-csv``: Asterisk's fixed ``cdr_csv`` row (``Master.csv``) with
  ``loguniqueid = yes`` and ``loguserfield = yes`` in ``cdr.conf`` ``[csv]``;
  times are local unless ``usegmtime = yes`` (set it, or give the timezone).
- ``freeswitch-csv``: the ``mod_cdr_csv`` template callgate ships
  (``config/freeswitch/autoload_configs/cdr_csv.conf.xml``, epoch times).
- ``freeswitch-example``: FreeSWITCH's stock ``example`` template (local
  ``*_stamp`` times: give the PBX's timezone).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.money import clip

ROLES = ("call_id", "accountcode", "caller", "destination", "context", "start", "answer",
         "end", "duration", "billsec", "disposition")
ALIASES = {
    "uniqueid": "call_id", "uuid": "call_id",
    "src": "caller", "caller_id_number": "caller",
    "dst": "destination", "destination_number": "destination",
    "dcontext": "context",
    "start_epoch": "start", "start_stamp": "start",
    "answer_epoch": "answer", "answer_stamp": "answer",
    "end_epoch": "end", "end_stamp": "end",
    "hangup_cause": "disposition",
}
REQUIRED = ("call_id", "billsec")
# Dispositions / hang-up causes that say the call was answered even with billsec 0.
ANSWERED = frozenset({"ANSWERED"})


class CdrFormatError(ValueError):
    """A row (or a layout) callgate cannot read; the message names the line and column."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Which CSV column holds which role (see the module docstring)."""

    name: str
    columns: tuple[str, ...]  # one name per CSV column; roles after aliasing, or skipped
    timezone: tzinfo = UTC
    pbx: str = ""  # "asterisk" | "freeswitch" | "" (a custom layout)

    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.columns) if c in ROLES}


def make_layout(name: str, columns: Sequence[str], *, timezone: str | tzinfo = UTC,
                pbx: str = "") -> Layout:
    """A layout from column names (roles, aliases or other names to skip)."""
    roles = tuple(ALIASES.get(c.strip().lower(), c.strip().lower()) for c in columns)
    seen: set[str] = set()
    for role in roles:
        if role in ROLES and role in seen:
            raise CdrFormatError(f"CDR layout {name!r}: column {role!r} is named twice")
        seen.add(role)
    missing = [r for r in REQUIRED if r not in seen]
    if missing:
        raise CdrFormatError(
            f"CDR layout {name!r} has no {' and no '.join(repr(m) for m in missing)} column"
        )
    if isinstance(timezone, str):
        try:
            zone: tzinfo = UTC if timezone.upper() == "UTC" else ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise CdrFormatError(f"CDR layout {name!r}: unknown timezone {timezone!r}") from None
    else:
        zone = timezone
    return Layout(name, roles, zone, pbx)


PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "asterisk-custom": ("asterisk", (
        "uniqueid", "accountcode", "src", "dst", "dcontext", "channel", "dstchannel",
        "lastapp", "disposition", "start", "answer", "end", "duration", "billsec")),
    "asterisk-csv": ("asterisk", (
        "accountcode", "src", "dst", "dcontext", "clid", "channel", "dstchannel", "lastapp",
        "lastdata", "start", "answer", "end", "duration", "billsec", "disposition",
        "amaflags", "uniqueid", "userfield")),
    "freeswitch-csv": ("freeswitch", (
        "uuid", "accountcode", "caller_id_number", "destination_number", "context",
        "start_epoch", "answer_epoch", "end_epoch", "duration", "billsec", "hangup_cause",
        "sip_hangup_disposition", "last_app")),
    "freeswitch-example": ("freeswitch", (
        "caller_id_name", "caller_id_number", "destination_number", "context", "start_stamp",
        "answer_stamp", "end_stamp", "duration", "billsec", "hangup_cause", "uuid",
        "bleg_uuid", "accountcode", "read_codec", "write_codec")),
}


def preset(name: str, *, timezone: str | tzinfo = UTC,
           columns: Sequence[str] | None = None) -> Layout:
    """A standard layout by name; ``columns`` replaces its columns (the PBX kind stays)."""
    if name not in PRESETS:
        raise CdrFormatError(
            f"unknown CDR format {name!r}; use one of: {', '.join(sorted(PRESETS))}")
    pbx, standard = PRESETS[name]
    return make_layout(name, columns or standard, timezone=timezone, pbx=pbx)


@dataclass(frozen=True, slots=True)
class CdrRow:
    """One call as the PBX's CDR tells it."""

    call_id: str
    billsec: int
    accountcode: str = ""
    caller: str = ""
    destination: str = ""
    context: str = ""
    start: datetime | None = None
    answer: datetime | None = None
    end: datetime | None = None
    duration: int | None = None
    disposition: str = ""
    line: int = 0  # where it was read (1-based), for messages

    @property
    def answered(self) -> bool:
        return self.billsec > 0 or self.answer is not None or self.disposition in ANSWERED

    @property
    def when(self) -> datetime | None:
        """The time the row is filed under in a period: its start, else answer, else end."""
        return self.start or self.answer or self.end


# What a damaged row can hold, and the bounds that keep it from reaching money or
# crashing a reader (a year of talk, a time before year 10000, a field no PBX writes).
MAX_SECONDS = 366 * 86400  # billsec / duration: at most a (leap) year of talk
MAX_EPOCH = 253402300800  # 10000-01-01T00:00:00Z: datetime's range ends before it
FIELD_LIMIT = 256  # characters of a field callgate reads (Asterisk's are at most 80)
_SECONDS = re.compile(r"[0-9]{1,12}", re.ASCII)
_EPOCH = re.compile(r"([0-9]{1,12})(?:\.([0-9]{1,9}))?", re.ASCII)


def _seconds(text: str, role: str, where: str) -> int:
    """A count of seconds: ASCII digits, at most :data:`MAX_SECONDS`."""
    text = text.strip()
    if not _SECONDS.fullmatch(text):
        raise CdrFormatError(
            f"{where}: {role} {clip(text)!r} is not a whole number of seconds (ASCII digits)")
    value = int(text)
    if value > MAX_SECONDS:
        raise CdrFormatError(
            f"{where}: {role} {clip(text)!r} is more than a year ({MAX_SECONDS} s)")
    return value


def _time(text: str, role: str, zone: tzinfo, where: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    epoch = _EPOCH.fullmatch(text)
    if epoch is not None:
        whole = int(epoch[1])
        if whole == 0 and not (epoch[2] or "").strip("0"):
            return None  # FreeSWITCH's answer_epoch 0, Asterisk's answer(double) 0.000000
        if whole >= MAX_EPOCH:
            raise CdrFormatError(f"{where}: {role} {clip(text)!r} is past the year 9999")
        micros = int((epoch[2] or "0").ljust(6, "0")[:6])
        return datetime.fromtimestamp(whole, UTC).replace(microsecond=micros)
    if not text.isascii():
        raise CdrFormatError(f"{where}: {role} {clip(text)!r} is not a time (ASCII only)")
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved out of range
        raise CdrFormatError(
            f"{where}: {role} {clip(text)!r} is neither epoch seconds nor a "
            "YYYY-MM-DD HH:MM:SS time within years 1 to 9999"
        ) from None


def _text(fields: Sequence[str], at: Mapping[str, int], role: str, where: str) -> str:
    """A text field: printable, at most :data:`FIELD_LIMIT` characters ("" if not in the layout)."""
    i = at.get(role)
    if i is None:
        return ""
    text = fields[i]
    if len(text) > FIELD_LIMIT:
        raise CdrFormatError(f"{where}: {role} is {len(text)} characters long "
                             f"(at most {FIELD_LIMIT}): {clip(text)!r}")
    if not text.isprintable():
        raise CdrFormatError(f"{where}: {role} {clip(text)!r} holds control characters")
    return text


def parse_row(text: str, layout: Layout, *, line: int = 0, source: str = "") -> CdrRow:
    """One CSV line (without its newline) as a :class:`CdrRow`; :class:`CdrFormatError` if not.

    Nothing else is raised, whatever the line holds: a damaged row is one error
    naming the file, the line and the field, with the value clipped.
    """
    where = f"{source or 'CDR'} line {line}" if line else (source or "CDR row")
    try:
        fields = next(csv.reader([text], strict=True))
    except (csv.Error, StopIteration) as exc:
        raise CdrFormatError(f"{where}: not a CSV row ({clip(str(exc))})") from None
    if len(fields) != len(layout.columns):
        raise CdrFormatError(
            f"{where}: {len(fields)} columns, but the {layout.name!r} layout has "
            f"{len(layout.columns)}"
        )
    at = layout.index()

    def get(role: str) -> str:
        return _text(fields, at, role, where)

    call_id = get("call_id").strip()
    if not call_id:
        raise CdrFormatError(f"{where}: the call_id column is empty")
    zone = layout.timezone
    duration_text = get("duration")
    billsec = _seconds(get("billsec"), "billsec", where)
    duration = _seconds(duration_text, "duration", where) if duration_text.strip() else None
    # billsec counts from the answer, duration from the start: billsec is never the
    # larger, but for Asterisk's ``initiatedseconds`` rounding billsec up alone (+1 s).
    if duration is not None and billsec > duration + 1:
        raise CdrFormatError(f"{where}: billsec {billsec} is more than the duration {duration}")
    return CdrRow(
        call_id=call_id,
        billsec=billsec,
        accountcode=get("accountcode").strip(),
        caller=get("caller").strip(),
        destination=get("destination").strip(),
        context=get("context").strip(),
        start=_time(get("start"), "start", zone, where),
        answer=_time(get("answer"), "answer", zone, where),
        end=_time(get("end"), "end", zone, where),
        duration=duration,
        disposition=get("disposition").strip().upper(),
        line=line,
    )


def parse_lines(lines: Iterable[str], layout: Layout, *, source: str = "",
                first_line: int = 1) -> tuple[list[CdrRow], list[CdrFormatError]]:
    """Every row of ``lines`` that parses, and an error for each that does not.

    Blank lines are skipped; a bad row never hides the rows after it.
    """
    rows: list[CdrRow] = []
    errors: list[CdrFormatError] = []
    for n, text in enumerate(lines, start=first_line):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            rows.append(parse_row(text, layout, line=n, source=source))
        except CdrFormatError as exc:
            errors.append(exc)
    return rows, errors
