"""Calling hours: weekly windows and closed dates in an account's timezone (pure).

Windows are half-open, ``[start, end)``: 08:00:00 is inside, 19:30:00 is
outside (contract §3.2). A day may hold several windows (a lunch break).

Every window is turned into an interval of absolute time (UTC instants) before
anything is compared, so a daylight-saving change gives the true number of
seconds. A local time the clock skips (a spring-forward gap) is the instant the
clock jumps past it; a local time the clock shows twice (an autumn overlap) is
its first occurrence for a window's start and its second for its end, so a
window covers both. Windows that touch or overlap — on one day, across window
entries, across midnight — form one open period: the close (``close_at``) is
where that period ends, which is what ``at_window_end: cut`` and the meter's
hard stop use. A closed date has no windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HORIZON_DAYS = 8  # an open period is followed at most this far (24/7 hours never close)

Interval = tuple[datetime, datetime]  # [start, end) in UTC


@dataclass(frozen=True, slots=True)
class Window:
    start: int  # seconds after local midnight
    end: int  # exclusive; 86400 = midnight at the end of the day

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}" + (f":{secs:02d}" if secs else "")


def parse_time_of_day(text: str) -> int:
    """``HH:MM`` or ``HH:MM:SS`` -> seconds after midnight; ``24:00`` is allowed as an end."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a time of day (write it as 'HH:MM', e.g. '08:00')")
    hours, minutes = int(parts[0]), int(parts[1])
    seconds = int(parts[2]) if len(parts) == 3 else 0
    if minutes > 59 or seconds > 59 or hours > 24 or (hours == 24 and (minutes or seconds)):
        raise ValueError(f"{text!r} is not a valid time of day")
    return hours * 3600 + minutes * 60 + seconds


def instant(zone: ZoneInfo, day: date, seconds: int, *, end: bool) -> datetime:
    """The UTC instant of local ``day`` + ``seconds`` (see the module docstring for DST)."""
    naive = datetime.combine(day, time()) + timedelta(seconds=seconds)
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second:
        return first
    if first.astimezone(zone).replace(tzinfo=None) == naive:  # shown twice: an overlap
        return max(first, second) if end else min(first, second)
    # Skipped: the clock jumps from before ``naive`` to after it. Find the jump (to the
    # second; transitions fall on whole seconds) between the two readings.
    low = int(min(first, second).timestamp())  # reads before naive
    high = int(max(first, second).timestamp())  # reads after naive
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= naive:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


@dataclass(frozen=True, slots=True)
class CallingHours:
    timezone: ZoneInfo
    week: tuple[tuple[Window, ...], ...]  # index 0 = Monday
    closed_dates: frozenset[date]
    # local day -> its windows as UTC intervals (a cache; not part of the value)
    _days: dict[date, tuple[Interval, ...]] = field(
        default_factory=dict, compare=False, hash=False, repr=False)

    def local(self, now: datetime) -> datetime:
        return now.astimezone(self.timezone)

    def is_closed_date(self, now: datetime) -> bool:
        return self.local(now).date() in self.closed_dates

    def open_period(self, now: datetime) -> Interval | None:
        """The joined open period ``now`` falls in (UTC), or None when outside every window."""
        today = self.local(now).date()
        found: Interval | None = None
        for start, end in _merged(self, today - timedelta(days=1), today):
            if start <= now < end:
                found = (start, end)
                break
        if found is None:
            return None
        start, end = found
        for ahead in range(1, HORIZON_DAYS):
            day = today + timedelta(days=ahead)
            extended = False
            for s, e in _day_intervals(self, day):
                if s <= end:
                    if e > end:
                        end, extended = e, True
                else:
                    break
            if not extended and end < _day_start(self, day + timedelta(days=1)):
                break
        return start, end

    def is_open(self, now: datetime) -> bool:
        return self.open_period(now) is not None

    def close_at(self, now: datetime) -> datetime | None:
        """When the open period ``now`` is in ends (None when outside the hours)."""
        period = self.open_period(now)
        return None if period is None else period[1]

    def seconds_to_close(self, now: datetime) -> int | None:
        """Whole seconds from ``now`` until the close (None when outside the hours)."""
        close = self.close_at(now)
        if close is None:
            return None
        return max(0, int((close - now).total_seconds()))

    def describe(self, now: datetime) -> str:
        local = self.local(now)
        windows = self.week[local.weekday()]
        shown = ", ".join(str(w) for w in windows) or "no windows"
        return f"{WEEKDAYS[local.weekday()]} {local:%H:%M:%S} {self.timezone.key}; open {shown}"


def _day_intervals(hours: CallingHours, day: date) -> tuple[Interval, ...]:
    """One local day's windows as sorted UTC intervals (none on a closed date)."""
    cached = hours._days.get(day)
    if cached is not None:
        return cached
    if len(hours._days) > 64:
        hours._days.clear()
    if day in hours.closed_dates:
        hours._days[day] = ()
        return ()
    zone = hours.timezone
    out = []
    for window in hours.week[day.weekday()]:
        start = instant(zone, day, window.start, end=False)
        end = instant(zone, day, window.end, end=True)
        if start < end:
            out.append((start, end))
    result = tuple(sorted(out))
    hours._days[day] = result
    return result


def _day_start(hours: CallingHours, day: date) -> datetime:
    return instant(hours.timezone, day, 0, end=False)


def _merged(hours: CallingHours, first: date, last: date) -> list[Interval]:
    """The windows of the days ``first``..``last`` with touching/overlapping ones joined."""
    intervals: list[Interval] = []
    day = first
    while day <= last:
        intervals.extend(_day_intervals(hours, day))
        day += timedelta(days=1)
    intervals.sort()
    out: list[Interval] = []
    for start, end in intervals:
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
