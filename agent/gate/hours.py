"""Calling hours: weekly windows and closed dates in an account's timezone (pure).

Windows are half-open, ``[start, end)``: 08:00:00 is inside, 19:30:00 is
outside (contract §3.2). A day may hold several windows (a lunch break).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


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


@dataclass(frozen=True, slots=True)
class CallingHours:
    timezone: ZoneInfo
    week: tuple[tuple[Window, ...], ...]  # index 0 = Monday
    closed_dates: frozenset[date]

    def local(self, now: datetime) -> datetime:
        return now.astimezone(self.timezone)

    def window_at(self, now: datetime) -> Window | None:
        """The window ``now`` falls in, or None when outside every window."""
        local = self.local(now)
        second = local.hour * 3600 + local.minute * 60 + local.second
        for window in self.week[local.weekday()]:
            if window.start <= second < window.end:
                return window
        return None

    def is_closed_date(self, now: datetime) -> bool:
        return self.local(now).date() in self.closed_dates

    def seconds_to_close(self, now: datetime) -> int | None:
        """Whole seconds from ``now`` until its window ends (None when outside)."""
        window = self.window_at(now)
        if window is None:
            return None
        local = self.local(now)
        elapsed = local.hour * 3600 + local.minute * 60 + local.second
        fraction = local.microsecond / 1_000_000
        remaining = window.end - elapsed - fraction
        return max(0, int(remaining))

    def describe(self, now: datetime) -> str:
        local = self.local(now)
        windows = self.week[local.weekday()]
        shown = ", ".join(str(w) for w in windows) or "no windows"
        return f"{WEEKDAYS[local.weekday()]} {local:%H:%M:%S} {self.timezone.key}; open {shown}"
