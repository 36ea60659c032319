"""The policy file's schema: what ops may write in ``policy.yaml`` (pydantic v2).

Unknown keys are errors (a typo must never be silently ignored), dial prefixes
and phone numbers must be quoted strings, amounts are exact decimals with no
more places than the minor unit. ``defaults`` apply to every account; an
account overrides only what it names. Cross-references (tariff names, files,
duplicate account codes) are checked when the policy is compiled
(:mod:`agent.gate.policy`), also with file and line.
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
    model_validator,
)

from agent.gate.hours import WEEKDAYS, parse_time_of_day
from agent.gate.numbers import ascii_digits
from agent.money import AmountError, parse_amount
from agent.rating import Rounding
from agent.yamlfile import NoBoolNumbers


def _money(value: Any) -> Decimal:
    if isinstance(value, float):
        raise ValueError("write amounts as decimals (e.g. '0.13'), never as floats")
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        raise ValueError(f"{value!r} is not an amount")
    try:
        return parse_amount(value, allow_zero=True)
    except AmountError as exc:
        raise ValueError(str(exc)) from None


# Numbers and prefixes are ASCII digits (agent.gate.numbers.ascii_digits): a deny
# prefix written with Arabic-Indic or full-width digits would never match a dialled
# number, so a rule would silently not apply. Hence [0-9], never \d, in patterns.
def _prefix(value: str) -> str:
    if not ascii_digits(value):
        raise ValueError(f"{value!r} is not a dial prefix (digits only, quoted: '00')")
    return value


def _strip_prefix(value: str) -> str:
    if not re.fullmatch(r"\+?[0-9]+", value):
        raise ValueError(f"{value!r} is not a number prefix (digits, optionally after '+')")
    return value


def _number(value: str) -> str:
    if not re.fullmatch(r"\+?[0-9]{2,18}", value.replace(" ", "").replace("-", "")):
        raise ValueError(f"{value!r} is not a phone number (quoted digits, e.g. '02158880000')")
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long
        raise ValueError(
            f"unknown timezone {value!r} (use an IANA name such as 'Asia/Shanghai')"
        ) from None
    return value


def _time(value: str) -> str:
    parse_time_of_day(value)
    return value


def _days(value: Any) -> Any:
    """Accept ``[mon, tue]``, ``mon-fri`` or ``all``."""
    if isinstance(value, str):
        if value == "all":
            return list(WEEKDAYS)
        if "-" in value:
            first, _, last = value.partition("-")
            if first in WEEKDAYS and last in WEEKDAYS:
                a, b = WEEKDAYS.index(first), WEEKDAYS.index(last)
                if a <= b:
                    return list(WEEKDAYS[a : b + 1])
            raise ValueError(f"{value!r} is not a day range (e.g. 'mon-fri')")
        return [value]
    return value


MAX_PERIOD = 366 * 86400


def _period(value: Any) -> int | str:
    """``day`` (calendar day in the account's timezone) or a duration: 90, '30s', '10m', '24h'."""
    if value == "day":
        return "day"
    seconds = None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        seconds = value
    elif isinstance(value, str):
        match = re.fullmatch(r"([0-9]{1,9})\s*([smhd])", value)
        if match and int(match.group(1)) > 0:
            seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[
                match.group(2)]
    if seconds is not None and seconds <= MAX_PERIOD:
        return seconds
    raise ValueError(f"{value!r} is not a period (use 'day' or a duration from 1 s to 366 days, "
                     "like '10m', '24h')")


Money = Annotated[Decimal, BeforeValidator(_money)]
DialPrefix = Annotated[StrictStr, AfterValidator(_prefix)]
StripPrefix = Annotated[StrictStr, AfterValidator(_strip_prefix)]
PhoneNumber = Annotated[StrictStr, AfterValidator(_number)]
Timezone = Annotated[StrictStr, AfterValidator(_timezone)]
TimeOfDay = Annotated[StrictStr, AfterValidator(_time)]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Period = Annotated[int | str, BeforeValidator(_period)]
Identifier = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class Strict(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowSpec(Strict):
    start: TimeOfDay
    end: TimeOfDay

    @model_validator(mode="after")
    def _check(self) -> Self:
        if parse_time_of_day(self.start) >= parse_time_of_day(self.end):
            raise ValueError(f"window start {self.start} must be before its end {self.end}")
        if parse_time_of_day(self.start) >= 86400:
            raise ValueError("a window cannot start at 24:00")
        return self


class HoursSpec(Strict):
    days: Annotated[list[Weekday], BeforeValidator(_days)] = Field(min_length=1)
    windows: list[WindowSpec]


class TariffSpec(Strict):
    rate: Money = Field(description="price of one increment")
    increment: int = Field(60, gt=0, le=3600)
    minimum: int = Field(60, ge=0, le=86400)
    rounding: Rounding = Rounding.UP
    destinations: dict[str, Money] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.rate <= 0:
            raise ValueError("rate must be greater than zero")
        if self.minimum % self.increment:
            raise ValueError(
                f"minimum {self.minimum} s must be a whole number of {self.increment} s increments"
            )
        for prefix, rate in self.destinations.items():
            _prefix(prefix)
            if rate <= 0:
                raise ValueError(f"destinations.{prefix}: rate must be greater than zero")
        return self


class NumbersSpec(Strict):
    strip_prefixes: list[StripPrefix] = Field(default_factory=list)
    international_prefix: DialPrefix = "00"


class ScopeSpec(Strict):
    allow: list[DialPrefix] = Field(default_factory=list)
    deny: list[DialPrefix] = Field(default_factory=list)


class DoNotCallSpec(Strict):
    numbers: list[PhoneNumber] = Field(default_factory=list)
    files: list[StrictStr] = Field(default_factory=list)


class CapSpec(Strict):
    max_attempts: int = Field(gt=0)
    period: Period


class CallerIdCapSpec(Strict):
    """Allowed attempts from one presented caller ID (carriers flag a number that
    places more than roughly 75-100 calls a day, or bursts)."""

    per_hour: int | None = Field(None, gt=0, description="in any rolling hour")
    per_day: int | None = Field(None, gt=0, description="in a calendar day (account timezone)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.per_hour is None and self.per_day is None:
            raise ValueError("give per_hour, per_day or both")
        if self.per_hour is not None and self.per_day is not None \
                and self.per_hour > self.per_day:
            raise ValueError(f"per_hour {self.per_hour} is more than per_day {self.per_day}")
        return self


def _duration(value: Any) -> int:
    period = _period(value)
    if period == "day":
        raise ValueError("give a duration like '30d' or '12h', not 'day'")
    return int(period)


Duration = Annotated[int, BeforeValidator(_duration)]


class ComplaintsSpec(Strict):
    """Suspend an account automatically after ``suspend_after`` complaints in ``period``."""

    suspend_after: int = Field(gt=0)
    period: Duration


class RiskSpec(Strict):
    """Early warning over each account's calls ended in the last ``window`` (per node)."""

    window: Duration = 3600
    short_call_seconds: int = Field(6, gt=0, le=600)
    max_short_call_percent: int | None = Field(None, ge=0, le=100)
    min_answer_percent: int | None = Field(None, ge=0, le=100)
    min_calls: int = Field(20, gt=0)


class MatchSpec(Strict):
    accountcodes: list[StrictStr] | None = None
    caller_id_prefixes: list[DialPrefix] = Field(default_factory=list)
    endpoint_prefixes: list[StrictStr] = Field(default_factory=list)


class RulesSpec(Strict):
    """What an account may override; ``None`` means 'as in defaults'."""

    timezone: Timezone | None = None
    calling_hours: list[HoursSpec] | None = None
    closed_dates: list[date] | None = None
    at_window_end: Literal["finish", "cut"] | None = None
    tariff: Identifier | None = None
    numbers: NumbersSpec | None = None
    destinations: ScopeSpec | None = None
    do_not_call: DoNotCallSpec | None = None
    callee_cap: CapSpec | None = None
    rate_cap: CapSpec | None = None
    caller_id_cap: CallerIdCapSpec | None = None
    cps_limit: int | None = Field(None, gt=0, le=1000)
    max_concurrent_calls: int | None = Field(None, gt=0)
    low_balance_warning: Money | None = None
    min_call_seconds: int | None = Field(None, gt=0, le=86400)


class DefaultsSpec(RulesSpec):
    timezone: Timezone | None = "Asia/Shanghai"
    calling_hours: list[HoursSpec] | None = Field(
        default_factory=lambda: [
            HoursSpec(days=_days("all"), windows=[WindowSpec(start="08:00", end="19:30")])
        ]
    )
    closed_dates: list[date] | None = Field(default_factory=list)
    at_window_end: Literal["finish", "cut"] | None = "finish"
    tariff: Identifier | None = "standard"
    numbers: NumbersSpec | None = Field(
        default_factory=lambda: NumbersSpec(strip_prefixes=["+86", "0086"])
    )
    destinations: ScopeSpec | None = Field(default_factory=ScopeSpec)
    do_not_call: DoNotCallSpec | None = Field(default_factory=DoNotCallSpec)
    low_balance_warning: Money | None = Decimal("20")

    @field_validator("timezone", "calling_hours", "closed_dates", "at_window_end", "tariff",
                     "numbers", "destinations", "do_not_call", "low_balance_warning",
                     mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # Accounts inherit these; "nothing" has no meaning for them (the caps and
        # max_concurrent_calls may be null: no limit).
        if value is None:
            raise ValueError("must not be empty here: remove the key to keep the built-in "
                             "default, or give a value")
        return value


class AccountSpec(RulesSpec):
    name: StrictStr
    status: Literal["active", "suspended"] = "active"
    match: MatchSpec = Field(default_factory=MatchSpec)
    caller_ids: list[PhoneNumber] = Field(default_factory=list)
    caller_id_prefixes: list[DialPrefix] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.caller_ids and not self.caller_id_prefixes:
            raise ValueError(
                "an account must list the caller IDs it owns (caller_ids or caller_id_prefixes)"
            )
        return self


class PrepaidSpec(Strict):
    first_topup_minimum: Money = Decimal("100")
    complaint_penalty: Money = Decimal("1000")
    fail_mode: Literal["closed", "open"] = "closed"
    fail_open_max_seconds: int = Field(300, gt=0)


DEFAULT_EMERGENCY_NUMBERS = ("110", "112", "119", "120", "122")  # China: police, GSM, fire,
# ambulance, traffic accidents


def _emergency(value: str) -> str:
    if not re.fullmatch(r"[0-9]{2,15}", value):
        raise ValueError(f"{value!r} is not an emergency number (quoted digits, e.g. '110')")
    return value


class PolicySpec(Strict):
    version: Literal[1]
    currency: Literal["CNY"] = "CNY"
    emergency_numbers: list[Annotated[StrictStr, AfterValidator(_emergency)]] = Field(
        default_factory=lambda: list(DEFAULT_EMERGENCY_NUMBERS))
    prepaid: PrepaidSpec = Field(default_factory=PrepaidSpec)
    tariffs: dict[Identifier, TariffSpec] = Field(
        default_factory=lambda: {"standard": TariffSpec(rate=Decimal("0.13"))}
    )
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    accounts: dict[Identifier, AccountSpec] = Field(default_factory=dict)
    complaints: ComplaintsSpec | None = None
    risk: RiskSpec | None = None
