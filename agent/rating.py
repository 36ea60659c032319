"""Rating: what an answered call of ``billsec`` seconds costs under a tariff (pure).

Contract §1/§3.1: 0.13 CNY per 60 s, a started 60 s is a whole 60 s. In general a
call is billed in whole increments, rounded as the tariff says (``up`` by
default), never less than the tariff's minimum, and any answered call with talk
time above zero pays at least one increment; unanswered calls are free.

The meter reserves money ahead in billing *units*: the first unit covers
``first_unit_seconds`` (the minimum or one increment, whichever is longer), each
later unit one increment. :func:`payable_seconds` answers how long a balance can
pay for; :func:`cost_of_seconds` what a paid span costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

ZERO = Decimal(0)


class Rounding(StrEnum):
    UP = "up"
    DOWN = "down"
    NEAREST = "nearest"


@dataclass(frozen=True, slots=True)
class Tariff:
    """A resolved tariff: the rate for one increment of ``increment`` seconds."""

    name: str
    rate: Decimal
    increment: int = 60
    minimum: int = 60
    rounding: Rounding = Rounding.UP

    def __post_init__(self) -> None:
        if self.increment <= 0:
            raise ValueError("increment must be a positive number of seconds")
        if self.minimum < 0 or self.minimum % self.increment:
            raise ValueError("minimum must be zero or a whole number of increments")
        if self.rate < 0:
            raise ValueError("rate must not be negative")

    @property
    def first_unit_seconds(self) -> int:
        """Seconds paid by the first reservation: the minimum or one increment."""
        return max(self.minimum, self.increment)

    @property
    def first_unit_cost(self) -> Decimal:
        return self.rate * (self.first_unit_seconds // self.increment)


def billed_seconds(tariff: Tariff, billsec: int) -> int:
    """Seconds billed for ``billsec`` seconds of talk (0 when there was no talk)."""
    if billsec <= 0:
        return 0
    whole, rest = divmod(billsec, tariff.increment)
    if rest and (
        tariff.rounding is Rounding.UP
        or (tariff.rounding is Rounding.NEAREST and 2 * rest >= tariff.increment)
    ):
        whole += 1
    return max(whole * tariff.increment, tariff.minimum, tariff.increment)


def rate(tariff: Tariff, billsec: int) -> Decimal:
    """The charge for an answered call of ``billsec`` seconds; 0 for no talk."""
    return cost_of_seconds(tariff, billed_seconds(tariff, billsec))


def cost_of_seconds(tariff: Tariff, seconds: int) -> Decimal:
    """Cost of ``seconds`` of billed time (a whole number of increments)."""
    units, rest = divmod(seconds, tariff.increment)
    if rest:
        raise ValueError(f"{seconds} s is not a whole number of {tariff.increment} s increments")
    return tariff.rate * units


def payable_seconds(tariff: Tariff, balance: Decimal) -> int:
    """The longest talk time ``balance`` pays for (0 if it cannot pay the first unit)."""
    if balance < tariff.first_unit_cost:
        return 0
    if tariff.rate == 0:
        raise ValueError("a free tariff has no payable limit")
    increments = int(balance // tariff.rate)
    return increments * tariff.increment
