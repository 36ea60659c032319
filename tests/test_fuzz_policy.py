"""Fuzz the policy loader: any file ops can write gives a Policy or located errors, never a crash.

The daemon reloads the policy live, and a reload that raised anything but
:class:`ConfigError` would take the old policy's guarantees with it. So for
mutations of the shipped ``config/policy.yaml`` (a key deleted, a value of
another type, an unknown key, a prefix unquoted, characters inserted or
deleted anywhere) and for random YAML-ish documents, :func:`load_policy`
either returns a :class:`Policy` or raises a :class:`ConfigError` whose every
error names a file, a line in that file (when the problem is in the file: an
empty document has none) and a message.
"""

from __future__ import annotations

import io
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from agent.gate.policy import Policy, load_policy
from agent.yamlfile import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "policy.yaml"
SHIPPED_TEXT = SHIPPED.read_text(encoding="utf-8")
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Words the schema knows, so random documents get past the first unknown key often.
VOCABULARY = ["version", "currency", "prepaid", "first_topup_minimum", "complaint_penalty",
              "fail_mode", "fail_open_max_seconds", "tariffs", "standard", "rate", "increment",
              "minimum", "rounding", "destinations", "defaults", "timezone", "calling_hours",
              "days", "windows", "start", "end", "closed_dates", "at_window_end", "tariff",
              "numbers", "strip_prefixes", "international_prefix", "allow", "deny",
              "do_not_call", "files", "callee_cap", "rate_cap", "max_attempts", "period",
              "low_balance_warning", "accounts", "acme", "name", "status", "match",
              "accountcodes", "endpoint_prefixes", "caller_id_prefixes", "caller_ids",
              "max_concurrent_calls"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    st.sampled_from(["0.13", "-1", "1e400", "0.00001", "08:00", "24:00", "25:61", "all",
                     "mon-fri", "day", "1h", "0s", "closed", "open", "up", "down", "finish",
                     "Asia/Shanghai", "Mars/Olympus", "2026-02-30", "0900", "+86", "", " "]),
)
KEYS = st.one_of(st.sampled_from(VOCABULARY), st.text(min_size=1, max_size=8))


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.width = 4096
    return yaml


def _dump(data: Any) -> str:
    out = io.StringIO()
    _yaml().dump(data, out)
    return out.getvalue()


def _paths(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key or item path of a loaded document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*at, key)
            yield from _paths(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*at, index)
            yield from _paths(value, (*at, index))


SHIPPED_PATHS = list(_paths(_yaml().load(SHIPPED_TEXT)))


def check(text: str) -> Policy | ConfigError:
    """Load ``text`` as a policy file; assert the outcome is one of the two documented ones."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_policy(path)
        except ConfigError as exc:
            assert exc.errors, "a ConfigError without errors"
            # Any line break an editor or YAML knows (\r, \x85, \u2028...) counts.
            lines = len(text.splitlines()) + 1
            for error in exc.errors:
                assert error.file and error.message.strip(), error
                if error.file == str(path) and error.message != "the file is empty":
                    assert error.line is not None and 1 <= error.line <= lines, (str(error), text)
                assert str(error).startswith(error.file)
            return exc


def test_the_shipped_policy_loads() -> None:
    assert isinstance(check(SHIPPED_TEXT), Policy)


def _parent_and_key(doc: Any, path: tuple[Any, ...]) -> tuple[Any, Any]:
    node = doc
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


@FUZZ
@given(st.sampled_from(SHIPPED_PATHS))
def test_deleting_any_key_or_item(path: tuple[Any, ...]) -> None:
    doc = _yaml().load(SHIPPED_TEXT)
    parent, key = _parent_and_key(doc, path)
    del parent[key]
    check(_dump(doc))


# A null for a default that accounts inherit (numbers, destinations, …) once
# crashed compile_policy with an AssertionError; it is now a located error.
@pytest.mark.parametrize("path", [("defaults", "numbers"), ("defaults", "destinations"),
                                  ("defaults", "calling_hours"), ("defaults", "tariff")])
def test_null_defaults_are_located_errors(path: tuple[str, str]) -> None:
    doc = _yaml().load(SHIPPED_TEXT)
    doc[path[0]][path[1]] = None
    result = check(_dump(doc))
    assert isinstance(result, ConfigError)
    assert any(e.path == ".".join(path) and e.line for e in result.errors), result


@FUZZ
@given(st.sampled_from(SHIPPED_PATHS), st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                     st.dictionaries(KEYS, inner, max_size=3)), max_leaves=6))
def test_any_value_replaced_by_another_type(path: tuple[Any, ...], value: Any) -> None:
    doc = _yaml().load(SHIPPED_TEXT)
    parent, key = _parent_and_key(doc, path)
    parent[key] = value
    check(_dump(doc))


@FUZZ
@given(st.sampled_from([(), *[p for p in SHIPPED_PATHS if isinstance(p[-1], str)]]),
       KEYS, SCALARS)
def test_an_unknown_key_anywhere(path: tuple[Any, ...], key: str, value: Any) -> None:
    doc = _yaml().load(SHIPPED_TEXT)
    node = doc
    for part in path:
        node = node[part]
    if not isinstance(node, dict):
        return  # a scalar: nowhere to add a key
    if key in node:
        key = key + "_x"
    node[key] = value
    outcome = check(_dump(doc))
    # The schema forbids unknown keys, but a key the vocabulary knows may be legal there.
    if key not in VOCABULARY:
        assert isinstance(outcome, ConfigError), (path, key)


QUOTED_NUMBERS = [m.span() for m in re.finditer(r'"\+?[0-9][0-9.:]*"', SHIPPED_TEXT)]


@FUZZ
@given(st.sampled_from(QUOTED_NUMBERS))
def test_unquoting_a_prefix_or_number(span: tuple[int, int]) -> None:
    start, end = span
    check(SHIPPED_TEXT[:start] + SHIPPED_TEXT[start + 1:end - 1] + SHIPPED_TEXT[end:])


def test_unquoted_deny_prefix_is_refused_with_its_line() -> None:
    """The trap the loader exists for: ``- 00`` reads as the number 0."""
    text = SHIPPED_TEXT.replace('- "00"  ', "- 00    ", 1)
    outcome = check(text)
    assert isinstance(outcome, ConfigError)
    (error,) = outcome.errors
    line = text[:text.index("- 00    ")].count("\n") + 1
    assert error.line == line and "quoted" in error.message


EDIT_CHARS = st.sampled_from([*":-#{}[],&*!|>'\"%@`\t\n\r\x00", "  ", "\n  ", "- ", ": "])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SHIPPED_TEXT)), st.integers(0, 3), EDIT_CHARS),
                min_size=1, max_size=4))
def test_character_edits_anywhere(edits: list[tuple[int, int, str]]) -> None:
    """A typo ops could make: a few characters deleted and others inserted."""
    text = SHIPPED_TEXT
    for position, delete, insert in edits:
        position = min(position, len(text))
        text = text[:position] + insert + text[position + delete:]
    check(text)


@FUZZ
@given(st.recursive(
    st.dictionaries(KEYS, SCALARS, max_size=4),
    lambda inner: st.dictionaries(KEYS, st.one_of(SCALARS, inner, st.lists(inner, max_size=2)),
                                  max_size=4),
    max_leaves=20))
def test_random_yaml_documents(document: dict[str, Any]) -> None:
    check(_dump(document))


@FUZZ
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=300))
def test_random_text(text: str) -> None:
    check(text)


def test_an_amount_too_large_for_exact_decimals_is_a_located_error() -> None:
    """Found by this fuzz: ``rate: 1e24`` (29 digits at 0.0001) used to escape as
    decimal.InvalidOperation from agent/money.py's quantize."""
    text = SHIPPED_TEXT.replace('rate: "0.13" ', "rate: 1e24   ", 1)
    outcome = check(text)
    assert isinstance(outcome, ConfigError)
    (error,) = outcome.errors
    assert error.path == "tariffs.standard.rate" and "too large" in error.message
    assert error.line == text[:text.index("rate: 1e24")].count("\n") + 1
