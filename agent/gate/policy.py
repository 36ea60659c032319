"""The policy in force: the validated YAML compiled into fast, immutable lookups.

:func:`load_policy` reads ``policy.yaml`` (:mod:`agent.gate.schema` says what
may be written), resolves each account's rules against ``defaults`` (an account
overrides only what it names), checks cross-references, loads do-not-call files
relative to the policy file, and returns a :class:`Policy`. Any problem is a
:class:`~agent.yamlfile.ConfigError` naming file, line and field; a policy is
either wholly valid or not used at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from agent.calls import CallInfo
from agent.gate.dnc import EMPTY, DncFileError, DncSet, load_file
from agent.gate.hours import WEEKDAYS, CallingHours, Window, parse_time_of_day
from agent.gate.numbers import Normalizer, PrefixTable
from agent.gate.schema import AccountSpec, PolicySpec, RulesSpec
from agent.ledger.compliance import SuspendRule
from agent.rating import Tariff
from agent.yamlfile import ConfigError, LocatedError, YamlDocument, read_yaml, validate


@dataclass(frozen=True, slots=True)
class TariffPlan:
    """A named tariff with its optional per-destination-prefix rates (longest prefix wins)."""

    base: Tariff
    by_prefix: PrefixTable[Tariff]

    def for_destination(self, number: str) -> Tariff:
        hit = self.by_prefix.longest(number) if self.by_prefix else None
        return hit[1] if hit else self.base


@dataclass(frozen=True, slots=True)
class Cap:
    max_attempts: int
    period: int | Literal["day"]

    def since(self, now: datetime, timezone: ZoneInfo) -> datetime:
        """Start of the period that ends at ``now`` (a calendar day is local midnight)."""
        if self.period == "day":
            local = now.astimezone(timezone)
            return datetime.combine(local.date(), time(0), tzinfo=timezone)
        return now - timedelta(seconds=self.period)

    def describe(self) -> str:
        per = "calendar day" if self.period == "day" else f"{self.period} s"
        return f"at most {self.max_attempts} per {per}"


@dataclass(frozen=True, slots=True)
class CallerIdCap:
    """Allowed attempts per presented caller ID: in the last hour, in the calendar day."""

    per_hour: int | None
    per_day: int | None

    def hour_since(self, now: datetime) -> datetime:
        return now - timedelta(hours=1)

    def day_since(self, now: datetime, timezone: ZoneInfo) -> datetime:
        return Cap(1, "day").since(now, timezone)

    def describe(self) -> str:
        parts = []
        if self.per_hour is not None:
            parts.append(f"{self.per_hour} per rolling hour")
        if self.per_day is not None:
            parts.append(f"{self.per_day} per calendar day")
        return "at most " + " and ".join(parts)


@dataclass(frozen=True, slots=True)
class RiskLimits:
    """``risk:`` of the policy: when the early warning fires."""

    window: int  # seconds
    short_call_seconds: int
    max_short_call_percent: int | None
    min_answer_percent: int | None
    min_calls: int


@dataclass(frozen=True, slots=True)
class Prepaid:
    first_topup_minimum: Decimal
    complaint_penalty: Decimal
    fail_mode: Literal["closed", "open"]
    fail_open_max_seconds: int


@dataclass(frozen=True, slots=True)
class AccountPolicy:
    """One account's rules, fully resolved against the defaults."""

    id: str
    name: str
    suspended: bool
    hours: CallingHours
    at_window_end: Literal["finish", "cut"]
    tariff: TariffPlan
    normalize: Normalizer
    scope: PrefixTable[bool]  # True = allowed prefix, False = denied prefix
    allow_list_only: bool  # an allow list exists: numbers matching no prefix are refused
    dnc: DncSet
    callee_cap: Cap | None
    rate_cap: Cap | None
    max_concurrent_calls: int | None
    low_balance_warning: Decimal
    caller_ids: frozenset[str]
    caller_id_prefixes: PrefixTable[bool]
    caller_id_cap: CallerIdCap | None = None
    cps_limit: int | None = None

    def owns_caller_id(self, caller_id: str) -> bool:
        number = self.normalize(caller_id)
        if number in self.caller_ids:
            return True
        prefixes = self.caller_id_prefixes
        return bool(prefixes) and prefixes.longest(number) is not None


@dataclass(frozen=True)
class Policy:
    source: Path
    prepaid: Prepaid
    accounts: dict[str, AccountPolicy]
    by_accountcode: dict[str, str]
    by_endpoint: PrefixTable[str]
    by_caller_prefix: PrefixTable[str]
    longest_cap_seconds: int  # how long the attempts log must be kept
    complaints: SuspendRule | None = None
    risk: RiskLimits | None = None
    normalize: Normalizer | None = None  # the defaults' number rules (global DNC entries)

    def match_account(self, call: CallInfo) -> AccountPolicy | None:
        """Accountcode first, then the longest endpoint prefix, then caller-ID prefix."""
        if call.accountcode:
            account_id = self.by_accountcode.get(call.accountcode)
            if account_id is not None:
                return self.accounts[account_id]
        if call.endpoint and self.by_endpoint:
            hit = self.by_endpoint.longest(call.endpoint)
            if hit is not None:
                return self.accounts[hit[1]]
        if call.caller_id and self.by_caller_prefix:
            digits = call.caller_id.lstrip("+")
            hit = self.by_caller_prefix.longest(digits)
            if hit is not None:
                return self.accounts[hit[1]]
        return None

    def summary(self) -> str:
        active = sum(1 for a in self.accounts.values() if not a.suspended)
        return (
            f"policy {self.source} is valid: {len(self.accounts)} accounts "
            f"({active} active), fail mode {self.prepaid.fail_mode}"
        )


def load_policy(path: Path | str) -> Policy:
    """Read, validate and compile a policy file; :class:`ConfigError` on any problem."""
    path = Path(path)
    doc = read_yaml(path)
    spec = validate(doc, PolicySpec)
    return compile_policy(spec, doc, path)


def _merged(defaults: RulesSpec, account: AccountSpec) -> RulesSpec:
    values = {
        name: value if (value := getattr(account, name)) is not None else getattr(defaults, name)
        for name in RulesSpec.model_fields
    }
    return RulesSpec.model_construct(**values)


def _hours(rules: RulesSpec, timezone: ZoneInfo) -> CallingHours:
    week: list[list[Window]] = [[] for _ in WEEKDAYS]
    for spec in rules.calling_hours or []:
        for day in spec.days:
            for window in spec.windows:
                start, end = parse_time_of_day(window.start), parse_time_of_day(window.end)
                week[WEEKDAYS.index(day)].append(Window(start, end))
    ordered = tuple(tuple(sorted(set(day), key=lambda w: w.start)) for day in week)
    closed: frozenset[date] = frozenset(rules.closed_dates or [])
    return CallingHours(timezone, ordered, closed)


def _defaults_normalizer(spec: PolicySpec) -> Normalizer:
    numbers = spec.defaults.numbers
    assert numbers is not None
    return Normalizer.build(numbers.strip_prefixes, numbers.international_prefix)


def compile_policy(spec: PolicySpec, doc: YamlDocument, path: Path) -> Policy:
    errors: list[LocatedError] = []
    base_dir = path.parent

    plans: dict[str, TariffPlan] = {}
    for name, tariff in spec.tariffs.items():
        base = Tariff(name, tariff.rate, tariff.increment, tariff.minimum, tariff.rounding)
        prefixed = {
            prefix: Tariff(f"{name}:{prefix}", rate, tariff.increment, tariff.minimum,
                           tariff.rounding)
            for prefix, rate in tariff.destinations.items()
        }
        plans[name] = TariffPlan(base, PrefixTable(prefixed))

    dnc_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], DncSet] = {}

    def dnc_for(rules: RulesSpec, where: tuple[str | int, ...], normalize: Normalizer) -> DncSet:
        source = rules.do_not_call
        if source is None or (not source.numbers and not source.files):
            return EMPTY
        key = (tuple(source.numbers), tuple(source.files))
        if key in dnc_cache:
            return dnc_cache[key]
        sets = [DncSet.of(normalize(n) for n in source.numbers)]
        for index, name in enumerate(source.files):
            file = (base_dir / name) if not Path(name).is_absolute() else Path(name)
            try:
                sets.append(load_file(file, normalize))
            except FileNotFoundError:
                errors.append(doc.error((*where, "do_not_call", "files", index),
                                        f"do-not-call file {file} not found"))
            except DncFileError as exc:
                errors.append(doc.error((*where, "do_not_call", "files", index),
                                        f"{exc.path}:{exc.line}: {exc}"))
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(doc.error((*where, "do_not_call", "files", index),
                                        f"cannot read do-not-call file {file}: {exc}"))
        result = sets[0].union(*sets[1:])
        dnc_cache[key] = result
        return result

    def cap(spec_cap: object) -> Cap | None:
        if spec_cap is None:
            return None
        return Cap(spec_cap.max_attempts, spec_cap.period)  # type: ignore[attr-defined]

    accounts: dict[str, AccountPolicy] = {}
    by_accountcode: dict[str, str] = {}
    endpoints: dict[str, str] = {}
    caller_prefixes: dict[str, str] = {}
    longest_cap = 86400
    for account_id, account in spec.accounts.items():
        where: tuple[str | int, ...] = ("accounts", account_id)
        rules = _merged(spec.defaults, account)
        # Where an inherited value is wrong, point at the defaults' line.
        def origin(field: str, where: tuple[str | int, ...] = where,
                   account: AccountSpec = account) -> tuple[str | int, ...]:
            return (*where, field) if getattr(account, field) is not None else ("defaults", field)

        if rules.tariff not in plans:
            known = ", ".join(sorted(plans)) or "none"
            errors.append(doc.error(origin("tariff"),
                                    f"unknown tariff {rules.tariff!r} (defined: {known})"))
            continue
        numbers = rules.numbers
        assert numbers is not None
        normalize = Normalizer.build(numbers.strip_prefixes, numbers.international_prefix)
        scope_spec = rules.destinations
        assert scope_spec is not None
        both = set(scope_spec.allow) & set(scope_spec.deny)
        if both:
            errors.append(doc.error(origin("destinations"),
                                    f"prefixes both allowed and denied: {sorted(both)}"))
        scope = PrefixTable({**{p: True for p in scope_spec.allow},
                             **{p: False for p in scope_spec.deny}})
        dnc_where = origin("do_not_call")[:-1]
        timezone = ZoneInfo(rules.timezone or "Asia/Shanghai")
        callee_cap, rate_cap = cap(rules.callee_cap), cap(rules.rate_cap)
        for c in (callee_cap, rate_cap):
            if c is not None and c.period != "day":
                longest_cap = max(longest_cap, int(c.period))
        accounts[account_id] = AccountPolicy(
            id=account_id,
            name=account.name,
            suspended=account.status == "suspended",
            hours=_hours(rules, timezone),
            at_window_end=rules.at_window_end or "finish",
            tariff=plans[rules.tariff or "standard"],
            normalize=normalize,
            scope=scope,
            allow_list_only=bool(scope_spec.allow),
            dnc=dnc_for(rules, dnc_where, normalize),
            callee_cap=callee_cap,
            rate_cap=rate_cap,
            max_concurrent_calls=rules.max_concurrent_calls,
            low_balance_warning=rules.low_balance_warning or Decimal(0),
            caller_ids=frozenset(normalize(n) for n in account.caller_ids),
            caller_id_prefixes=PrefixTable({p: True for p in account.caller_id_prefixes}),
            caller_id_cap=None if rules.caller_id_cap is None else CallerIdCap(
                rules.caller_id_cap.per_hour, rules.caller_id_cap.per_day),
            cps_limit=rules.cps_limit,
        )
        codes = account.match.accountcodes
        if codes is None:
            codes = [account_id]
        for index, code in enumerate(codes):
            other = by_accountcode.setdefault(code, account_id)
            if other != account_id:
                errors.append(doc.error((*where, "match", "accountcodes", index),
                                        f"accountcode {code!r} already matches account {other!r}"))
        for kind, table, values in (
            ("endpoint_prefixes", endpoints, account.match.endpoint_prefixes),
            ("caller_id_prefixes", caller_prefixes, account.match.caller_id_prefixes),
        ):
            for index, prefix in enumerate(values):
                other = table.setdefault(prefix, account_id)
                if other != account_id:
                    errors.append(doc.error((*where, "match", kind, index),
                                            f"prefix {prefix!r} already matches account {other!r}"))
    if not spec.tariffs:
        errors.append(doc.error(("tariffs",), "at least one tariff must be defined"))
    if errors:
        raise ConfigError(errors)
    prepaid = Prepaid(spec.prepaid.first_topup_minimum, spec.prepaid.complaint_penalty,
                      spec.prepaid.fail_mode, spec.prepaid.fail_open_max_seconds)
    return Policy(
        source=path,
        prepaid=prepaid,
        accounts=accounts,
        by_accountcode=by_accountcode,
        by_endpoint=PrefixTable(endpoints),
        by_caller_prefix=PrefixTable(caller_prefixes),
        longest_cap_seconds=longest_cap,
        complaints=None if spec.complaints is None else SuspendRule(
            spec.complaints.suspend_after, timedelta(seconds=spec.complaints.period)),
        normalize=_defaults_normalizer(spec),
        risk=None if spec.risk is None else RiskLimits(
            spec.risk.window, spec.risk.short_call_seconds, spec.risk.max_short_call_percent,
            spec.risk.min_answer_percent, spec.risk.min_calls),
    )
