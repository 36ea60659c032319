"""What a number is (said once, in agent.gate.numbers), and what a do-not-call line is."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.gate.decide import decide
from agent.gate.decision import Reason
from agent.gate.dnc import DncSet, _cache, dnc_number, load_file, parse_line
from agent.gate.numbers import Normalizer, is_dialable
from agent.yamlfile import ConfigError
from tests.gate_helpers import BASE, call, local, policy_from, rich

MORNING = local("2026-11-24T10:00:00")
NORMALIZE = Normalizer.build(["+86", "0086"], "00")


def test_a_bare_plus_is_not_the_international_prefix():
    assert NORMALIZE("+") == "+"
    assert NORMALIZE("+44 20 7946 0000") == "00442079460000"


@pytest.mark.parametrize(("number", "ok"), [
    ("+", False), ("", False), ("7", False), ("12", False), ("110", True),
    ("13800138000", True), ("123456789012345", True), ("1234567890123456", False),
    ("1" * 23, False), ("00" + "4" * 15, True), ("00" + "4" * 16, False), ("0012", False),
    ("١٢٣٤٥", False), ("²²²²", False), ("*123#", False), ("12a45", False),
])
def test_what_a_dialable_number_is(number, ok):
    assert is_dialable(number) is ok


@pytest.mark.parametrize("dialled", ["+", "7", "1" * 23, "12+34", "abc"])
def test_the_gate_refuses_what_is_not_a_number_with_its_reason(tmp_path, dialled):
    d = decide(policy_from(tmp_path), rich(), call(dialled), MORNING)
    assert not d.allow and d.reason is Reason.INVALID_NUMBER


def test_the_shortest_and_longest_numbers_pass_the_number_rule(tmp_path):
    p = policy_from(tmp_path)
    assert decide(p, rich(), call("114"), MORNING).allow  # scope rules decide short numbers
    assert decide(p, rich(), call("+86 138 0013 8000"), MORNING).destination == "13800138000"


# -- do-not-call lines -------------------------------------------------------------------

def dnc_policy(tmp_path, content: str):
    (tmp_path / "dnc.txt").write_text(content)
    text = BASE.replace("accounts:", "defaults:\n  do_not_call: {files: [dnc.txt]}\naccounts:")
    return policy_from(tmp_path, text)


@pytest.mark.parametrize("content", [
    "138 0013 8000\n13900000001\n",
    "# list\n138 0013 8000\n13900000001\n",
    "13900000001\n138-0013-8000   # from the complaint of 2026-11-02\n",
    "+86 138 0013 8000\n",
    "008613800138000\n13900000001\n",  # digits only: the fast path normalises too
    "\ufeff13800138000\r\n13900000001\r\n",
])
def test_a_line_is_one_number_whatever_else_the_file_holds(tmp_path, content):
    p = dnc_policy(tmp_path, content)
    d = decide(p, rich(), call("13800138000"), MORNING)
    assert not d.allow and d.reason is Reason.DO_NOT_CALL
    assert decide(p, rich(), call("138"), MORNING).reason is not Reason.DO_NOT_CALL


def test_a_bad_line_is_located(tmp_path):
    with pytest.raises(ConfigError) as info:
        dnc_policy(tmp_path, "13900000001\n12\nhello\n")
    assert "dnc.txt:2:" in str(info.value) and "'12' is not a phone number" in str(info.value)


def test_parse_line():
    assert parse_line("  # only a comment", NORMALIZE) is None
    assert parse_line("   ", NORMALIZE) is None
    assert parse_line("(021) 5888-0000 # office", NORMALIZE) == "02158880000"
    with pytest.raises(ValueError, match="not a phone number"):
        parse_line("138 0013 8000 139 0000 0001", NORMALIZE)  # two numbers: too long


@pytest.mark.parametrize("typed", ["+", "00", "+ ", "()", "¹²³", "١٢٣٤٥", "12", "138#9"])
def test_a_typed_dnc_number_must_be_a_number(typed):
    # The rule of `callgate dnc add` and a complaint's callee: '+' was stored as '00'.
    with pytest.raises(ValueError, match="not a phone number"):
        dnc_number(typed, NORMALIZE)
    assert dnc_number("+86 138-0013-8000", NORMALIZE) == "13800138000"


def test_a_lookup_never_reads_other_digits_as_ascii():
    listed = DncSet.of(["12345", "110"])
    assert "12345" in listed
    # int() reads Arabic-Indic and full-width digits as 0-9: no match through them.
    assert "١٢٣٤٥" not in listed and "１１０" not in listed and "¹¹⁰" not in listed


numbers = st.text(alphabet="0123456789", min_size=5, max_size=15)


@settings(max_examples=40, deadline=None)
@given(st.lists(numbers, min_size=1, max_size=40), st.booleans())
def test_the_fast_and_careful_paths_agree(tmp_path_factory, listed, with_prefix):
    """A file of bare digits (fast path) means what the same lines mean line by line."""
    directory = tmp_path_factory.mktemp("dnc")
    lines = [("0086" + n) if with_prefix and i % 2 else n for i, n in enumerate(listed)]
    plain, careful = directory / "plain.txt", directory / "careful.txt"
    plain.write_text("".join(f"{n}\n" for n in lines))
    careful.write_text("# forces the line-by-line path\n" + "".join(f"{n}\n" for n in lines))
    fast, slow = load_file(plain, NORMALIZE), load_file(careful, NORMALIZE)
    assert len(fast) == len(slow)
    for line in lines:
        expected = NORMALIZE(line)
        assert expected in fast and expected in slow


def test_one_file_read_with_two_normalisers_is_two_sets(tmp_path):
    path = tmp_path / "dnc.txt"
    path.write_text("008613800138000\n")
    _cache.clear()
    assert "13800138000" in load_file(path, NORMALIZE)
    assert "008613800138000" in load_file(path, Normalizer.build([], "00"))
