"""Exact money: parsing, validation and the integer minor unit used in storage.

Money is never a float. The API speaks :class:`decimal.Decimal`; storage holds
integers of a fixed minor unit (default 0.0001 CNY), so sums are exact and a
statement adds up to the cent. An amount with more decimal places than the minor
unit is refused, never rounded: rounding money silently is how cents go missing.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

CURRENCY = "CNY"
MINOR_UNIT = Decimal("0.0001")
ZERO = Decimal(0)


class AmountError(ValueError):
    """An amount a user wrote that is not an acceptable sum of money."""


def parse_amount(
    text: str | int | Decimal,
    *,
    minor_unit: Decimal = MINOR_UNIT,
    allow_zero: bool = False,
    allow_negative: bool = False,
) -> Decimal:
    """Parse ``text`` as an exact amount; raise :class:`AmountError` with a clear message.

    Floats are refused outright: a float cannot carry an exact decimal amount.
    """
    if isinstance(text, (float, bool)):
        raise AmountError(f"amount {text!r} must be written as a decimal string, not a float")
    raw = str(text).strip()
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise AmountError(f"amount {raw!r} is not a number") from None
    if not value.is_finite():
        raise AmountError(f"amount {raw!r} is not a finite number")
    try:
        whole_units = value.quantize(minor_unit, rounding="ROUND_DOWN")
    except InvalidOperation:  # more digits than the decimal context holds (28)
        raise AmountError(f"amount {raw!r} is too large") from None
    if value != whole_units:
        raise AmountError(
            f"amount {raw!r} has more decimal places than the minor unit {minor_unit}"
        )
    if value < 0 and not allow_negative:
        raise AmountError(f"amount {raw!r} must not be negative")
    if value == 0 and not allow_zero:
        raise AmountError(f"amount {raw!r} must be greater than zero")
    return value.quantize(minor_unit)


def to_minor(amount: Decimal, minor_unit: Decimal = MINOR_UNIT) -> int:
    """Decimal -> integer minor units; exact or an error (never rounds)."""
    units = amount / minor_unit
    if units != units.to_integral_value():
        raise AmountError(f"amount {amount} is not a whole number of {minor_unit}")
    return int(units)


def from_minor(units: int, minor_unit: Decimal = MINOR_UNIT) -> Decimal:
    """Integer minor units -> Decimal, quantized to the minor unit."""
    return (Decimal(units) * minor_unit).quantize(minor_unit)


def format_amount(amount: Decimal, places: int = 2) -> str:
    """Human display: at least ``places`` decimals, more only if the amount needs them."""
    normalized = amount.normalize()
    exponent = normalized.as_tuple().exponent
    shown = max(places, -exponent if isinstance(exponent, int) else places)
    return f"{amount:.{shown}f}"
