"""Rating: the contract tariff exactly, and the general rules for any tariff (hypothesis)."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.rating import (
    Rounding,
    Tariff,
    billed_seconds,
    cost_of_seconds,
    payable_seconds,
    rate,
)

CONTRACT = Tariff(name="standard", rate=D("0.13"), increment=60, minimum=60)


@pytest.mark.parametrize(
    ("billsec", "amount", "billed"),
    [(0, "0", 0), (-5, "0", 0), (1, "0.13", 60), (59, "0.13", 60), (60, "0.13", 60),
     (61, "0.26", 120), (120, "0.26", 120), (121, "0.39", 180), (3600, "7.80", 3600)],
)
def test_the_contract_tariff(billsec: int, amount: str, billed: int) -> None:
    """Contract §1/§3.1: 0.13 CNY per started 60 s; unanswered (0 s) is free."""
    assert rate(CONTRACT, billsec) == D(amount)
    assert billed_seconds(CONTRACT, billsec) == billed


def test_rounding_modes() -> None:
    down = Tariff("d", D("0.10"), increment=60, minimum=0, rounding=Rounding.DOWN)
    nearest = Tariff("n", D("0.10"), increment=60, minimum=0, rounding=Rounding.NEAREST)
    assert [billed_seconds(down, s) for s in (1, 59, 61, 119, 120)] == [60, 60, 60, 60, 120]
    assert [billed_seconds(nearest, s) for s in (1, 29, 89, 90, 150)] == [60, 60, 60, 120, 180]


def test_a_minimum_longer_than_one_increment() -> None:
    tariff = Tariff("m", D("0.05"), increment=6, minimum=30)
    assert billed_seconds(tariff, 1) == 30 and rate(tariff, 1) == D("0.25")
    assert billed_seconds(tariff, 31) == 36 and rate(tariff, 31) == D("0.30")
    assert (tariff.first_unit_seconds, tariff.first_unit_cost) == (30, D("0.25"))


def test_costs_and_payable_time() -> None:
    assert cost_of_seconds(CONTRACT, 120) == D("0.26")
    with pytest.raises(ValueError, match="whole number"):
        cost_of_seconds(CONTRACT, 90)
    assert payable_seconds(CONTRACT, D("0.26")) == 120
    assert payable_seconds(CONTRACT, D("0.38")) == 120
    assert payable_seconds(CONTRACT, D("0.12")) == 0
    assert payable_seconds(CONTRACT, D("-900")) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"increment": 0}, {"minimum": 90}, {"minimum": -60}, {"rate": D("-0.13")}],
)
def test_invalid_tariffs_are_refused(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"name": "x", "rate": D("0.13")} | kwargs
    with pytest.raises(ValueError):
        Tariff(**fields)  # type: ignore[arg-type]


tariffs = st.builds(
    lambda rate_units, increment, minimum_increments, rounding: Tariff(
        "t", D(rate_units) / 10000, increment, increment * minimum_increments, rounding
    ),
    st.integers(0, 100_000),
    st.integers(1, 600),
    st.integers(0, 5),
    st.sampled_from(list(Rounding)),
)


@given(tariffs, st.integers(0, 100_000), st.integers(0, 100_000))
def test_rating_is_monotone_in_talk_time(tariff: Tariff, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert rate(tariff, low) <= rate(tariff, high)
    assert billed_seconds(tariff, low) <= billed_seconds(tariff, high)


@given(tariffs, st.integers(1, 100_000))
def test_any_talk_pays_at_least_one_increment(tariff: Tariff, billsec: int) -> None:
    billed = billed_seconds(tariff, billsec)
    assert billed >= max(tariff.increment, tariff.minimum)
    assert billed % tariff.increment == 0
    assert rate(tariff, billsec) >= tariff.rate
    assert rate(tariff, billsec) == tariff.rate * (billed // tariff.increment)
    if tariff.rounding is Rounding.UP:
        assert billsec <= billed < max(billsec + tariff.increment, tariff.minimum + 1)


@given(st.integers(0, 10**7))
def test_payable_time_is_exactly_what_the_balance_covers(units: int) -> None:
    balance = D(units) / 10000
    seconds = payable_seconds(CONTRACT, balance)
    assert seconds % CONTRACT.increment == 0
    assert cost_of_seconds(CONTRACT, seconds) <= balance
    assert cost_of_seconds(CONTRACT, seconds + CONTRACT.increment) > balance
