"""The amount parser: plain ASCII decimals only, exact, never rounded (property tests)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.money import AmountError, clip, parse_amount

PLAIN = re.compile(r"-?[0-9]+(\.[0-9]{1,4})?", re.ASCII)


@pytest.mark.parametrize("text", [
    "1e3", "1E3", "1_000", "1,000", "１００", "٥", "५", "+5", " 5", "5 ", "5.", ".5",
    "0x10", "Infinity", "NaN", "-", "", "1.2.3", "--5", "5-", "\u00a05", "1\n",
])
def test_what_is_not_a_plain_decimal_is_refused(text: str) -> None:
    with pytest.raises(AmountError, match="not a number"):
        parse_amount(text, allow_negative=True, allow_zero=True)


@pytest.mark.parametrize(("text", "value"), [
    ("100", "100"), ("250.50", "250.5"), ("0.0001", "0.0001"), ("007", "7"), ("-12.5", "-12.5"),
])
def test_plain_decimals_are_read_exactly(text: str, value: str) -> None:
    assert parse_amount(text, allow_negative=True) == Decimal(value)


def test_places_beyond_the_minor_unit_are_refused_not_rounded() -> None:
    with pytest.raises(AmountError, match="more decimal places"):
        parse_amount("1.00001")
    with pytest.raises(AmountError, match="more decimal places"):
        parse_amount("1.001", minor_unit=Decimal("0.01"))
    assert parse_amount("1.01", minor_unit=Decimal("0.01")) == Decimal("1.01")


def test_zero_and_sign_messages_fit_the_command() -> None:
    with pytest.raises(AmountError, match="must be greater than zero"):
        parse_amount("0")
    with pytest.raises(AmountError, match="must not be zero"):  # a signed adjustment
        parse_amount("0", allow_negative=True)
    with pytest.raises(AmountError, match="must not be negative"):
        parse_amount("-5")
    with pytest.raises(AmountError, match="above the maximum"):
        parse_amount("1000.01", maximum=Decimal(1000))


def test_a_huge_amount_is_refused_and_echoed_short() -> None:
    with pytest.raises(AmountError, match="too large") as info:
        parse_amount("9" * 100)
    with pytest.raises(AmountError) as flood:
        parse_amount("x" * 10_000_000)
    assert len(str(info.value)) < 200 and len(str(flood.value)) < 200
    assert clip("a" * 50, 10) == "aaaaaaaaaa… (50 characters)"


@given(st.text(max_size=30))
def test_any_text_is_either_a_plain_decimal_or_refused(text: str) -> None:
    """The parser accepts exactly the plain-decimal language, and then exactly its value."""
    try:
        value = parse_amount(text, allow_negative=True, allow_zero=True)
    except AmountError as exc:
        assert "\n" not in str(exc)
        assert not (PLAIN.fullmatch(text) and len(text.lstrip("-").split(".")[0]) <= 18)
    else:
        assert PLAIN.fullmatch(text), text
        assert value == Decimal(text)


@given(st.decimals(min_value=Decimal("-1e12"), max_value=Decimal("1e12"), places=4,
                   allow_nan=False, allow_infinity=False))
def test_every_exact_amount_round_trips_through_its_plain_text(amount: Decimal) -> None:
    text = f"{amount:f}"
    assert parse_amount(text, allow_negative=True, allow_zero=True) == amount


@given(st.sampled_from("0123456789"), st.sampled_from(["e3", "_0", "E-1", "\u0660", "\uff10"]))
def test_digits_with_anything_foreign_are_refused(digit: str, tail: str) -> None:
    with pytest.raises(AmountError):
        parse_amount(digit + tail)


def test_fixed_is_one_format_for_every_amount_carried_in_json_and_csv() -> None:
    from agent.money import fixed

    assert [fixed(Decimal(x)) for x in ("0", "-0", "0.0000", "-0.0000", "12.5", "-0.13",
                                        "1E+3", "100.00")] == [
        "0.0000", "0.0000", "0.0000", "0.0000", "12.5000", "-0.1300", "1000.0000", "100.0000"]
    assert fixed(Decimal("0.00001")) == "0.00001"  # finer than the unit: exact, not rounded
    assert fixed(Decimal("12.5"), Decimal("0.01")) == "12.50"
