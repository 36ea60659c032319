"""Every validation error names file, line and dotted field path, and says what to do."""

from __future__ import annotations

import pytest

from agent.gate.policy import load_policy
from agent.yamlfile import ConfigError
from tests.gate_helpers import write_policy


def errors_of(tmp_path, text):
    path = write_policy(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    return path, info.value.errors


def one_error(tmp_path, text):
    path, errors = errors_of(tmp_path, text)
    assert len(errors) == 1, errors
    return path, errors[0]


GOOD_ACCOUNT = """\
accounts:
  acme:
    name: ACME
    caller_ids: ["02158880000"]
"""


def test_window_end_error_is_located_with_dotted_path(tmp_path):
    path, err = one_error(tmp_path, """\
version: 1
accounts:
  acme:
    name: ACME
    caller_ids: ["02158880000"]
    calling_hours:
      - days: all
        windows:
          - {start: "08:00", end: "25:00"}
""")
    assert err.file == str(path) and err.line == 9
    assert err.path == "accounts.acme.calling_hours[0].windows[0].end"
    assert "not a valid time" in err.message
    assert str(err).startswith(f"{path}:9: accounts.acme.calling_hours[0].windows[0].end: ")


def test_unknown_key_is_an_error_not_ignored(tmp_path):
    _, err = one_error(tmp_path, "version: 1\ndefaults:\n  calling_hour: []\n" + GOOD_ACCOUNT)
    assert err.line == 3 and err.path == "defaults.calling_hour"
    assert "unknown key" in err.message


def test_unquoted_prefix_is_refused_with_the_reason(tmp_path):
    _, err = one_error(tmp_path, "version: 1\ndefaults:\n  destinations:\n    deny: [0900]\n"
                       + GOOD_ACCOUNT)
    assert err.path == "defaults.destinations.deny[0]" and err.line == 4
    assert "quoted" in err.message and "900" in err.message


def test_unquoted_strip_prefix_plus86(tmp_path):
    _, err = one_error(tmp_path, "version: 1\ndefaults:\n  numbers:\n    strip_prefixes: [+86]\n"
                       + GOOD_ACCOUNT)
    assert err.path == "defaults.numbers.strip_prefixes[0]" and "quoted" in err.message


def test_too_many_decimal_places(tmp_path):
    _, err = one_error(tmp_path, """\
version: 1
tariffs:
  standard:
    rate: 0.13001
""" + GOOD_ACCOUNT)
    assert err.path == "tariffs.standard.rate" and err.line == 4
    assert "decimal places" in err.message


def test_unquoted_decimal_is_read_exactly_not_as_float(tmp_path):
    path = write_policy(tmp_path, "version: 1\ntariffs:\n  standard:\n    rate: 0.13\n"
                        + GOOD_ACCOUNT)
    from decimal import Decimal
    assert load_policy(path).accounts["acme"].tariff.base.rate == Decimal("0.13")


@pytest.mark.parametrize(("snippet", "path_", "needle"), [
    ("    timezone: Asia/Shanghia\n", "accounts.acme.timezone", "unknown timezone"),
    ("    tariff: premium\n", "accounts.acme.tariff", "unknown tariff 'premium'"),
    ("    status: paused\n", "accounts.acme.status", "'active' or 'suspended'"),
    ("    max_concurrent_calls: 0\n", "accounts.acme.max_concurrent_calls", "greater than 0"),
    ("    callee_cap: {max_attempts: 2, period: fortnight}\n", "accounts.acme.callee_cap.period",
     "not a period"),
    ("    at_window_end: stop\n", "accounts.acme.at_window_end", "'finish' or 'cut'"),
    ("    low_balance_warning: 1.5e3x\n", "accounts.acme.low_balance_warning", "not a number"),
])
def test_account_field_errors(tmp_path, snippet, path_, needle):
    _, err = one_error(tmp_path, "version: 1\n" + GOOD_ACCOUNT + snippet)
    assert err.path == path_, err
    assert needle in err.message, err.message
    assert err.line == 6  # version + 4 account lines, then the snippet


def test_window_start_after_end(tmp_path):
    _, err = one_error(tmp_path, """\
version: 1
defaults:
  calling_hours: [{days: all, windows: [{start: "19:30", end: "08:00"}]}]
""" + GOOD_ACCOUNT)
    assert err.path == "defaults.calling_hours[0].windows[0]" and err.line == 3
    assert "before its end" in err.message


def test_account_without_caller_ids(tmp_path):
    _, err = one_error(tmp_path, "version: 1\naccounts:\n  acme:\n    name: ACME\n")
    assert err.path == "accounts.acme" and err.line == 3 and "caller IDs" in err.message


def test_missing_required_field(tmp_path):
    _, err = one_error(tmp_path, "version: 1\naccounts:\n  acme:\n    caller_ids: ['0215']\n")
    assert err.path == "accounts.acme.name" and err.line == 3 and "required" in err.message


def test_minimum_not_whole_increments(tmp_path):
    _, err = one_error(tmp_path, "version: 1\ntariffs:\n  s:\n    rate: '0.1'\n"
                       "    increment: 60\n    minimum: 90\n" + GOOD_ACCOUNT
                       + "    tariff: s\n")
    assert err.path == "tariffs.s" and "whole number" in err.message


def test_duplicate_accountcode_across_accounts(tmp_path):
    _, err = one_error(tmp_path, """\
version: 1
accounts:
  acme: {name: A, caller_ids: ["02158880000"]}
  beta:
    name: B
    caller_ids: ["02158880001"]
    match: {accountcodes: ["acme"]}
""")
    assert err.path == "accounts.beta.match.accountcodes[0]" and err.line == 7
    assert "already matches account 'acme'" in err.message


def test_dnc_file_missing_and_bad_line(tmp_path):
    _, err = one_error(tmp_path, "version: 1\ndefaults:\n  do_not_call: {files: [nope.txt]}\n"
                       + GOOD_ACCOUNT)
    assert err.path == "defaults.do_not_call.files[0]" and "not found" in err.message
    (tmp_path / "bad.txt").write_text("13900000001\nhello\n")
    _, err = one_error(tmp_path, "version: 1\ndefaults:\n  do_not_call: {files: [bad.txt]}\n"
                       + GOOD_ACCOUNT)
    assert "bad.txt:2:" in err.message and "not a phone number" in err.message


def test_yaml_syntax_error_has_a_line(tmp_path):
    _, err = one_error(tmp_path, "version: 1\naccounts:\n  acme: {name: [\n")
    assert err.line is not None and "YAML syntax" in err.message


def test_duplicate_key(tmp_path):
    _, err = one_error(tmp_path, "version: 1\nversion: 1\n")
    assert err.line == 2 and "duplicate key" in err.message


def test_numeric_account_id_must_be_quoted(tmp_path):
    _, err = one_error(tmp_path, "version: 1\naccounts:\n  1001: {name: X, caller_ids: ['021']}\n")
    assert err.line == 3 and "quoted" in err.message


def test_several_errors_are_all_reported(tmp_path):
    _, errors = errors_of(tmp_path, """\
version: 2
accounts:
  acme:
    name: ACME
    caller_ids: [2158880000]
""")
    paths = {e.path for e in errors}
    assert {"version", "accounts.acme.caller_ids[0]"} <= paths


def test_empty_and_missing_files(tmp_path):
    _, err = one_error(tmp_path, "")
    assert "empty" in err.message
    with pytest.raises(ConfigError, match="file not found"):
        load_policy(tmp_path / "absent.yaml")


@pytest.mark.parametrize("field, text", [
    ("defaults.destinations.deny[0]", "defaults:\n  destinations: {deny: ['٠٠']}\n"),
    ("defaults.numbers.international_prefix",
     "defaults:\n  numbers: {international_prefix: '００'}\n"),
    ("defaults.numbers.strip_prefixes[0]", "defaults:\n  numbers: {strip_prefixes: ['+٨٦']}\n"),
    ("defaults.do_not_call.numbers[0]", "defaults:\n  do_not_call: {numbers: ['¹²³⁴⁵']}\n"),
    ("emergency_numbers[0]", "emergency_numbers: ['١١٠']\n"),
    ("accounts.acme.caller_ids[0]", "accounts:\n  acme:\n    name: ACME\n"
                                    "    caller_ids: ['٠٢١٥٨٨٨٠٠٠٠']\n"),
])
def test_numbers_and_prefixes_are_ascii_digits(tmp_path, field, text):
    # A deny prefix in Arabic-Indic digits would never match a dialled number: the rule
    # would be silently void. Refused, located.
    _, err = one_error(tmp_path, "version: 1\n" + text)
    assert err.path == field and "not a" in err.message, err


@pytest.mark.parametrize(("snippet", "path_"), [
    ("complaints: {suspend_after: true, period: 30d}\n", "complaints.suspend_after"),
    ("defaults: {cps_limit: true}\n", "defaults.cps_limit"),
    ("defaults: {caller_id_cap: {per_hour: true}}\n", "defaults.caller_id_cap.per_hour"),
    ("defaults: {rate_cap: {max_attempts: false, period: 1h}}\n",
     "defaults.rate_cap.max_attempts"),
])
def test_true_or_false_is_not_a_number(tmp_path, snippet, path_):
    """YAML's true would be read as 1: suspend_after: true would suspend on the first
    complaint, cps_limit: true would allow one call a second."""
    _, err = one_error(tmp_path, "version: 1\n" + snippet + GOOD_ACCOUNT)
    assert err.path == path_ and err.line == 2
    assert "not true/false" in err.message
