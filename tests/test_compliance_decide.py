"""decide()'s compliance rules, pure: suspended, live do-not-call, cps_limit, caller_id_cap.

Each at its boundary, with its reason code and its line in ``explain``; and the
policy keys that configure them, with located errors.
"""

from __future__ import annotations

import pytest

from agent.calls import HangupCause
from agent.compliance.live_dnc import LiveDnc
from agent.gate.decide import decide
from agent.gate.decision import Reason
from agent.gate.dnc import number_key
from agent.ledger.compliance import GLOBAL, DncChange
from agent.yamlfile import ConfigError
from tests.gate_helpers import BASE, call, local, policy_from, rich

MORNING = local("2026-11-24T10:00:00")

CAPS = BASE.replace("accounts:", """defaults:
  cps_limit: 3
  caller_id_cap: {per_hour: 75, per_day: 100}
accounts:""")


@pytest.fixture
def capped(tmp_path):
    return policy_from(tmp_path, CAPS)


def live(*entries: tuple[str, str]) -> LiveDnc:
    copy = LiveDnc()
    copy.apply(DncChange(i + 1, account, number, True)
               for i, (account, number) in enumerate(entries))
    return copy


def test_a_ledger_suspension_refuses_with_its_own_reason(tmp_path):
    p = policy_from(tmp_path)
    d = decide(p, rich(suspended="3 complaints within 30 days"), call(), MORNING,
               explain=True)
    assert not d.allow and d.reason is Reason.SUSPENDED
    assert d.message == "account acme is suspended (3 complaints within 30 days)"
    assert d.hangup_cause is HangupCause.OUTGOING_CALL_BARRED
    assert d.checks[-1].rule == "suspension" and not d.checks[-1].passed
    # the policy's own suspension keeps its older, distinct code
    suspended = policy_from(tmp_path, BASE.replace("name: ACME", "name: ACME\n    status: "
                                                   "suspended"))
    assert decide(suspended, rich(suspended="x"), call(), MORNING).reason is \
        Reason.ACCOUNT_SUSPENDED


def test_a_suspension_refuses_even_with_the_ledger_unreachable_in_fail_open(tmp_path):
    # An unreachable ledger cannot say the account is suspended: the fail mode decides.
    p = policy_from(tmp_path, "version: 1\nprepaid: {fail_mode: open}\n" +
                    BASE.removeprefix("version: 1\n"))
    assert decide(p, rich(None), call(), MORNING).reason is Reason.LEDGER_UNAVAILABLE


def test_live_dnc_refuses_the_account_entries_and_the_global_ones(tmp_path):
    p = policy_from(tmp_path)
    copy = live(("acme", "13800138000"), (GLOBAL, "13900139000"), ("beta", "13700137000"))
    d = decide(p, rich(live_dnc=copy), call("13800138000"), MORNING, explain=True)
    assert d.reason is Reason.DO_NOT_CALL and d.message.endswith("live do-not-call list")
    assert (d.checks[-1].rule, d.checks[-1].passed) == ("live_do_not_call", False)
    assert d.checks[-1].detail == ("13800138000 is on the ledger's live do-not-call list "
                                   "(3 entries)")
    assert decide(p, rich(live_dnc=copy), call("+8613900139000"), MORNING).reason is \
        Reason.DO_NOT_CALL  # normalised first, then looked up
    assert decide(p, rich(live_dnc=copy), call("13700137000"), MORNING).allow  # beta's
    assert decide(p, rich(live_dnc=copy), call("13800138001"), MORNING).allow
    # and a live entry still refuses while the ledger cannot be read
    assert decide(p, rich(None, live_dnc=copy), call("13800138000"), MORNING).reason is \
        Reason.DO_NOT_CALL


@pytest.mark.parametrize(("burst", "allowed"), [(0, True), (2, True), (3, False), (9, False)])
def test_cps_limit_boundary(capped, burst, allowed):
    d = decide(capped, rich(cps_attempts=burst), call(), MORNING)
    assert d.allow is allowed
    if not allowed:
        assert d.reason is Reason.CPS_LIMIT
        assert d.message == (f"acme placed {burst} calls in the last second "
                             "(at most 3 per second)")
        assert d.hangup_cause is HangupCause.NORMAL_TEMPORARY_FAILURE


@pytest.mark.parametrize(("hour", "day", "allowed"), [
    (74, 99, True), (75, 75, False), (0, 99, True), (10, 100, False), (74, 100, False),
])
def test_caller_id_cap_boundaries(capped, hour, day, allowed):
    d = decide(capped, rich(caller_hour_attempts=hour, caller_day_attempts=day), call(),
               MORNING, explain=True)
    assert d.allow is allowed
    if not allowed:
        assert d.reason is Reason.CALLER_ID_CAP
        assert d.message.startswith("caller ID 02158880000 made ")
        assert d.message.endswith("(at most 75 per rolling hour and 100 per calendar day)")
    (check,) = [c for c in d.checks if c.rule == "caller_id_cap"]
    assert check.detail == (f"02158880000: {hour} attempts in the last hour, {day} today; "
                            "at most 75 per rolling hour and 100 per calendar day")


def test_the_new_rules_come_after_the_existing_caps_in_explain(capped):
    d = decide(capped, rich(), call(), MORNING, explain=True)
    rules = [c.rule for c in d.checks]
    assert rules.index("suspension") == rules.index("ledger_account") + 1
    assert rules.index("cps_limit") > rules.index("concurrency")
    assert rules.index("caller_id_cap") == rules.index("cps_limit") + 1
    assert rules[-1] == "balance"


def test_a_per_day_only_cap_ignores_the_hour(tmp_path):
    p = policy_from(tmp_path, BASE.replace("accounts:", "defaults:\n  caller_id_cap: "
                                           "{per_day: 2}\naccounts:"))
    assert decide(p, rich(caller_hour_attempts=10**6, caller_day_attempts=1), call(),
                  MORNING).allow
    assert decide(p, rich(caller_day_attempts=2), call(), MORNING).reason is \
        Reason.CALLER_ID_CAP


def test_an_account_overrides_the_defaults_caps(tmp_path):
    text = CAPS.replace('caller_ids: ["02158880000"]',
                        'caller_ids: ["02158880000"]\n    cps_limit: 10')
    p = policy_from(tmp_path, text)
    assert decide(p, rich(cps_attempts=9), call(), MORNING).allow
    assert p.accounts["acme"].caller_id_cap is not None  # inherited


@pytest.mark.parametrize(("snippet", "message"), [
    ("caller_id_cap: {}", "give per_hour, per_day or both"),
    ("caller_id_cap: {per_hour: 101, per_day: 100}", "per_hour 101 is more than per_day 100"),
    ("caller_id_cap: {per_hour: 0}", "greater than 0"),
    ("cps_limit: 0", "greater than 0"),
])
def test_bad_cap_keys_are_located_errors(tmp_path, snippet, message):
    with pytest.raises(ConfigError) as error:
        policy_from(tmp_path, BASE.replace("accounts:", f"defaults:\n  {snippet}\naccounts:"))
    text = str(error.value)
    assert "policy.yaml:3" in text and message in text


@pytest.mark.parametrize(("snippet", "message"), [
    ("complaints: {suspend_after: 3, period: day}", "give a duration"),
    ("complaints: {suspend_after: 0, period: 30d}", "greater than 0"),
    ("complaints: {period: 30d}", "suspend_after"),
    ("risk: {max_short_call_percent: 101}", "less than or equal to 100"),
    ("risk: {window: 1h, typo: 1}", "typo"),
])
def test_bad_complaints_and_risk_keys_are_located_errors(tmp_path, snippet, message):
    with pytest.raises(ConfigError) as error:
        policy_from(tmp_path, BASE + snippet + "\n")
    assert message in str(error.value)


def test_complaints_and_risk_compile(tmp_path):
    p = policy_from(tmp_path, BASE + "complaints: {suspend_after: 3, period: 30d}\n"
                    "risk: {window: 30m, short_call_seconds: 6, max_short_call_percent: 40,"
                    " min_answer_percent: 20, min_calls: 10}\n")
    assert p.complaints is not None and p.complaints.suspend_after == 3
    assert p.complaints.period.days == 30
    assert p.risk is not None and (p.risk.window, p.risk.min_calls) == (1800, 10)


def test_live_dnc_keys_are_the_file_sets_keys():
    assert live(("acme", "0102")).listed("acme", "0102")
    assert not live(("acme", "0102")).listed("acme", "102")  # leading zeros stay distinct
    assert number_key("0102") != number_key("102")
