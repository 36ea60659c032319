"""decide(): each rule, each boundary, in the order the policy reference documents."""

from __future__ import annotations

from decimal import Decimal

import pytest

from agent.calls import Direction, HangupCause
from agent.gate.decide import decide
from agent.gate.decision import Reason
from tests.gate_helpers import BASE, call, local, policy_from, rich


@pytest.fixture
def policy(tmp_path):
    return policy_from(tmp_path)


MORNING = local("2026-11-24T10:00:00")


def test_contract_defaults_allow_and_compute_max_seconds(policy):
    d = decide(policy, rich("1.30"), call(), MORNING)
    assert d.allow and d.reason is Reason.ALLOWED
    assert d.max_seconds == 600  # 10 increments of 60 s at 0.13
    assert d.tariff is not None and d.tariff.rate == Decimal("0.13")
    assert d.result == "ALLOW"


@pytest.mark.parametrize(("wall", "allowed"), [
    ("2026-11-24T07:59:59", False),
    ("2026-11-24T08:00:00", True),
    ("2026-11-24T19:29:59", True),
    ("2026-11-24T19:30:00", False),
    ("2026-11-24T23:00:00", False),
])
def test_calling_hours_boundaries_are_exact(policy, wall, allowed):
    d = decide(policy, rich(), call(), local(wall))
    assert d.allow is allowed
    if not allowed:
        assert d.reason is Reason.OUTSIDE_HOURS
        assert d.hangup_cause is HangupCause.OUTGOING_CALL_BARRED


def test_hours_are_in_the_account_timezone_not_utc(policy):
    # 01:00 UTC is 09:00 in Shanghai.
    from datetime import UTC, datetime
    assert decide(policy, rich(), call(), datetime(2026, 11, 24, 1, 0, tzinfo=UTC)).allow


@pytest.mark.parametrize(("balance", "allowed"), [("0.12", False), ("0.13", True),
                                                   ("0", False), ("-5", False)])
def test_balance_must_cover_one_increment(policy, balance, allowed):
    d = decide(policy, rich(balance), call(), MORNING)
    assert d.allow is allowed
    if not allowed:
        assert d.reason is Reason.INSUFFICIENT_BALANCE
    else:
        assert d.max_seconds == 60


def test_inbound_is_never_gated_even_at_night_without_balance(policy):
    d = decide(policy, rich("0"), call(direction=Direction.INBOUND, accountcode=""),
               local("2026-11-24T03:00"))
    assert d.allow and d.reason is Reason.INBOUND and d.max_seconds is None


def test_unknown_account_is_refused(policy):
    d = decide(policy, rich(), call(accountcode="nobody"), MORNING)
    assert not d.allow and d.reason is Reason.UNKNOWN_ACCOUNT


def test_caller_id_not_owned_is_refused_and_normalised_forms_are_owned(policy):
    assert decide(policy, rich(), call(caller="02199990000"), MORNING).reason is \
        Reason.CALLER_ID_NOT_OWNED
    assert decide(policy, rich(), call(caller="+8602158880000"), MORNING).allow


def test_suspended_and_closed_accounts(tmp_path):
    p = policy_from(tmp_path, BASE + "    status: suspended\n")
    assert decide(p, rich(), call(), MORNING).reason is Reason.ACCOUNT_SUSPENDED
    p2 = policy_from(tmp_path, BASE)
    closed = rich(closed=True)
    assert decide(p2, closed, call(), MORNING).reason is Reason.ACCOUNT_CLOSED


@pytest.mark.parametrize(("number", "reason"), [
    ("0012125550100", Reason.DESTINATION_NOT_ALLOWED),   # international
    ("+12125550100", Reason.DESTINATION_NOT_ALLOWED),    # + becomes 00
    ("12321", Reason.DESTINATION_NOT_ALLOWED),           # 12xxx service
    ("95588", Reason.DESTINATION_NOT_ALLOWED),
    ("*67", Reason.INVALID_NUMBER),
    ("+8613800138000", Reason.ALLOWED),                  # national after stripping +86
])
def test_destination_scope_with_contract_deny_list(tmp_path, number, reason):
    text = BASE.replace("accounts:", """defaults:
  numbers: {strip_prefixes: ["+86", "0086"]}
  destinations: {deny: ["00", "12", "95"]}
accounts:""")
    p = policy_from(tmp_path, text)
    assert decide(p, rich(), call(number), MORNING).reason is reason


def test_longest_prefix_wins_between_allow_and_deny(tmp_path):
    text = BASE.replace("accounts:", """defaults:
  destinations: {allow: ["95588", "1"], deny: ["95"]}
accounts:""")
    p = policy_from(tmp_path, text)
    assert decide(p, rich(), call("95588"), MORNING).allow  # allow 95588 beats deny 95
    assert decide(p, rich(), call("95511"), MORNING).reason is Reason.DESTINATION_NOT_ALLOWED
    # an allow list exists: a number matching no prefix is refused
    assert decide(p, rich(), call("02112345678"), MORNING).reason is \
        Reason.DESTINATION_NOT_ALLOWED


def test_do_not_call_inline_and_file(tmp_path):
    (tmp_path / "dnc.txt").write_text("# complaints\n13900000001\n\n+8613900000002\n")
    text = BASE.replace("accounts:", """defaults:
  numbers: {strip_prefixes: ["+86"]}
  do_not_call: {numbers: ["13900000003"], files: ["dnc.txt"]}
accounts:""")
    p = policy_from(tmp_path, text)
    for n in ("13900000001", "13900000002", "13900000003", "+8613900000001"):
        assert decide(p, rich(), call(n), MORNING).reason is Reason.DO_NOT_CALL, n
    assert decide(p, rich(), call("13900000004"), MORNING).allow


def test_closed_dates_refuse_the_whole_local_day(tmp_path):
    text = BASE.replace("accounts:", "defaults:\n  closed_dates: [2026-10-01]\naccounts:")
    p = policy_from(tmp_path, text)
    assert decide(p, rich(), call(), local("2026-10-01T10:00")).reason is Reason.CLOSED_DATE
    assert decide(p, rich(), call(), local("2026-10-02T10:00")).allow


def test_several_windows_a_day_and_weekday_sets(tmp_path):
    text = BASE.replace("accounts:", """defaults:
  calling_hours:
    - days: mon-fri
      windows: [{start: "09:00", end: "12:00"}, {start: "13:30", end: "18:00"}]
    - days: [sat]
      windows: [{start: "10:00", end: "16:00"}]
accounts:""")
    p = policy_from(tmp_path, text)
    tue = "2026-11-24T"
    assert decide(p, rich(), call(), local(tue + "11:59:59")).allow
    assert not decide(p, rich(), call(), local(tue + "12:30")).allow  # lunch break
    assert decide(p, rich(), call(), local(tue + "13:30")).allow
    assert decide(p, rich(), call(), local("2026-11-28T11:00")).allow  # Saturday
    assert not decide(p, rich(), call(), local("2026-11-29T11:00")).allow  # Sunday


def test_concurrency_limit(policy):
    assert decide(policy, rich(live_calls=1), call(), MORNING).allow
    d = decide(policy, rich(live_calls=2), call(), MORNING)
    assert d.reason is Reason.CONCURRENCY_LIMIT


def test_callee_frequency_cap_counts_the_attempts_of_its_period(tmp_path):
    # Which attempts fall in the period (the local calendar day) is the ledger's
    # count, asked for by the gatekeeper: tests/test_gate_caps.py.
    text = BASE.replace("accounts:", """defaults:
  callee_cap: {max_attempts: 2, period: day}
accounts:""")
    p = policy_from(tmp_path, text)
    now = local("2026-11-24T10:00")
    assert decide(p, rich(callee_attempts=1), call(), now).allow
    d = decide(p, rich(callee_attempts=2), call(), now)
    assert d.reason is Reason.FREQUENCY_CAP
    assert d.message == "13800138000 was tried 2 times (at most 2 per calendar day)"


def test_account_rate_cap_counts_the_attempts_of_its_period(tmp_path):
    text = BASE.replace("accounts:", """defaults:
  rate_cap: {max_attempts: 3, period: 10m}
accounts:""")
    p = policy_from(tmp_path, text)
    now = MORNING
    assert decide(p, rich(account_attempts=3), call(), now).reason is Reason.RATE_CAP
    assert decide(p, rich(account_attempts=2), call(), now).allow


def test_ledger_unavailable_fails_closed_by_default_but_hours_still_win(policy):
    d = decide(policy, rich(None), call(), MORNING)
    assert d.reason is Reason.LEDGER_UNAVAILABLE and not d.allow
    assert decide(policy, rich(None), call(), local("2026-11-24T21:00")).reason is \
        Reason.OUTSIDE_HOURS


def test_ledger_unavailable_fail_open_is_bounded(tmp_path):
    text = "version: 1\nprepaid: {fail_mode: open, fail_open_max_seconds: 120}\n" + \
        BASE.removeprefix("version: 1\n")
    p = policy_from(tmp_path, text)
    d = decide(p, rich(None), call(), MORNING)
    assert d.allow and d.max_seconds == 120 and d.reason is Reason.LEDGER_UNAVAILABLE


def test_cut_at_window_end_caps_max_seconds(tmp_path):
    text = BASE.replace("accounts:", "defaults:\n  at_window_end: cut\naccounts:")
    p = policy_from(tmp_path, text)
    d = decide(p, rich("100"), call(), local("2026-11-24T19:25:00"))
    assert d.allow and d.max_seconds == 300
    p2 = policy_from(tmp_path, BASE)  # finish: only the balance limits
    assert decide(p2, rich("100"), call(), local("2026-11-24T19:25:00")).max_seconds == 46140


def test_per_destination_rate_longest_prefix(tmp_path):
    text = """\
    version: 1
    tariffs:
      standard:
        rate: "0.13"
        destinations: {"0": "0.20", "010": "0.15"}
    accounts:
      acme: {name: ACME, caller_ids: ["02158880000"]}
    """
    p = policy_from(tmp_path, text)
    assert decide(p, rich("1"), call("01012345678"), MORNING).tariff.rate == Decimal("0.15")
    assert decide(p, rich("1"), call("02112345678"), MORNING).tariff.rate == Decimal("0.20")
    assert decide(p, rich("1"), call("13800138000"), MORNING).tariff.rate == Decimal("0.13")
    d = decide(p, rich("0.19"), call("02112345678"), MORNING)
    assert d.reason is Reason.INSUFFICIENT_BALANCE


def test_account_overrides_only_what_it_names(tmp_path):
    text = """\
    version: 1
    defaults:
      calling_hours: [{days: all, windows: [{start: "09:00", end: "17:00"}]}]
      max_concurrent_calls: 5
    accounts:
      acme:
        name: ACME
        caller_ids: ["02158880000"]
        max_concurrent_calls: 1
    """
    p = policy_from(tmp_path, text)
    acme = p.accounts["acme"]
    assert acme.max_concurrent_calls == 1
    assert decide(p, rich(), call(), local("2026-11-24T08:30")).reason is Reason.OUTSIDE_HOURS


def test_matching_by_endpoint_and_caller_prefix(tmp_path):
    text = """\
    version: 1
    accounts:
      acme:
        name: ACME
        match: {accountcodes: [], endpoint_prefixes: ["SIP/acme-"]}
        caller_id_prefixes: ["0215888"]
      beta:
        name: Beta
        match: {accountcodes: ["b1"], caller_id_prefixes: ["0216666"]}
        caller_ids: ["02166660000"]
    """
    p = policy_from(tmp_path, text)
    d = decide(p, rich(), call(accountcode="", endpoint="SIP/acme-0000001a",
                                caller="02158881234"), MORNING)
    assert d.allow and d.account == "acme"
    d = decide(p, rich(), call(accountcode="", caller="02166660000"), MORNING)
    assert d.allow and d.account == "beta"
    assert decide(p, rich(), call(accountcode="acme"), MORNING).reason is \
        Reason.UNKNOWN_ACCOUNT  # acme's accountcode list is explicitly empty


def test_explain_lists_every_rule_checked(policy):
    d = decide(policy, rich("1"), call(), MORNING, explain=True)
    rules = [c.rule for c in d.checks]
    assert rules[:3] == ["direction", "account", "status"]
    assert "balance" in rules and all(c.passed for c in d.checks)
    assert decide(policy, rich("1"), call(), MORNING).checks == ()


def test_explain_details_are_exact(tmp_path):
    # The details are built only when explaining (lazily); pin their text.
    text = BASE.replace("accounts:", """defaults:
  destinations: {allow: ["13"], deny: ["139"]}
  do_not_call: {numbers: ["13800000003"]}
  callee_cap: {max_attempts: 2, period: day}
  rate_cap: {max_attempts: 3, period: 10m}
  at_window_end: cut
accounts:""")
    p = policy_from(tmp_path, text)
    now = local("2026-11-24T19:25:00")
    d = decide(p, rich("1", live_calls=1, callee_attempts=1), call(), now, explain=True)
    assert d.message == "allowed for up to 300 s"
    assert [(c.rule, c.passed, c.detail) for c in d.checks] == [
        ("direction", True, "outbound"),
        ("account", True, "matched 'acme'"),
        ("status", True, "active"),
        ("ledger_account", True, "open"),
        ("suspension", True, "not suspended"),
        ("caller_id", True, "'02158880000' is one of the account's numbers"),
        ("number", True, "'13800138000' normalised to '13800138000'"),
        ("scope", True, "longest prefix '13' is allowed"),
        ("do_not_call", True, "13800138000 is not on the do-not-call list (1 numbers)"),
        ("closed_date", True, "2026-11-24 is open"),
        ("calling_hours", True, "tue 19:25:00 Asia/Shanghai; open 08:00-19:30"),
        ("concurrency", True, "1 live of 2"),
        ("rate_cap", True, "0 attempts, at most 3 per 600 s"),
        ("frequency_cap", True, "1 attempts to 13800138000, at most 2 per calendar day"),
        ("balance", True, "available 1.00, first increment costs 0.13 (standard)"),
        ("window_end", True, "window closes in 300 s and the policy cuts"),
    ]
    late = decide(p, rich("1"), call(), local("2026-11-24T21:00"), explain=True)
    assert late.message == "outside calling hours (tue 21:00:00 Asia/Shanghai; open 08:00-19:30)"
    assert late.checks[-1].detail == "tue 21:00:00 Asia/Shanghai; open 08:00-19:30"
    denied = decide(p, rich("1"), call("13900000000"), now, explain=True)
    assert denied.checks[-1].detail == "longest prefix '139' is denied"
    poor = decide(p, rich("0.01"), call(), now, explain=True)
    assert poor.message == "balance 0.01 cannot pay 0.13 for the first 60 s"
    assert poor.checks[-1].detail == "available 0.01, first increment costs 0.13 (standard)"
    unknown = decide(p, rich("1"), call(accountcode="nobody"), now, explain=True)
    assert unknown.checks[-1].detail == \
        "no account for accountcode 'nobody', endpoint '', caller ID '02158880000'"


def test_example_policy_is_valid_and_matches_the_contract():
    from pathlib import Path

    from agent.gate.policy import load_policy

    p = load_policy(Path(__file__).parent.parent / "config" / "policy.yaml")
    assert p.prepaid.first_topup_minimum == Decimal("100")
    assert p.prepaid.complaint_penalty == Decimal("1000")
    assert p.prepaid.fail_mode == "closed"
    acme = p.accounts["acme"]
    assert acme.tariff.base.rate == Decimal("0.13")
    assert (acme.tariff.base.increment, acme.tariff.base.minimum) == (60, 60)
    assert str(acme.hours.week[0][0]) == "08:00-19:30"
    assert acme.hours.timezone.key == "Asia/Shanghai"


