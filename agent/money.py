"""Exact money: parsing, validation and the integer minor unit used in storage.

Money is never a float. The API speaks :class:`decimal.Decimal`; storage holds
integers of a fixed minor unit (default 0.0001 CNY), so sums are exact and a
statement adds up to the cent. An amount with more decimal places than the minor
unit is refused, never rounded: rounding money silently is how cents go missing.
What a person types is read only as plain ASCII decimal (``100``, ``250.50``):
exponents, digit separators, a ``+``, blanks and non-ASCII digits are refused,
never guessed at. :func:`clip` cuts a value echoed in a message to a readable length.

Shown to a person, an amount has two places or more (:func:`format_amount`:
``12.50``); carried in JSON or CSV, the fixed-point string of the minor unit
(:func:`fixed`: ``12.5000``, ``0.0000``), one format wherever the figure came from.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

CURRENCY = "CNY"
MINOR_UNIT = Decimal("0.0001")
ZERO = Decimal(0)


class AmountError(ValueError):
    """An amount a user wrote that is not an acceptable sum of money."""


# ASCII digits, at most one point with digits on both sides, an optional leading minus.
# Nothing else: no exponent (1e3), no separators (1_000, 1,000), no sign "+", no
# blanks, no full-width or Arabic-Indic digits (str.isdigit() and Decimal() take them).
_AMOUNT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?", re.ASCII)
SHOWN = 40  # characters of a refused amount echoed back in an error


def clip(text: str, limit: int = SHOWN) -> str:
    """``text`` cut to a readable length for an error message or a log line."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _places(minor_unit: Decimal) -> int:
    exponent = minor_unit.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def parse_amount(
    text: str | int | Decimal,
    *,
    minor_unit: Decimal = MINOR_UNIT,
    allow_zero: bool = False,
    allow_negative: bool = False,
    maximum: Decimal | None = None,
) -> Decimal:
    """Parse ``text`` as an exact amount; raise :class:`AmountError` with a clear message.

    A string must be plain ASCII decimal: digits, at most one point followed by at
    most the minor unit's places, and a leading ``-`` only where negative amounts
    are allowed. Floats are refused outright: a float cannot carry an exact
    decimal amount. ``maximum`` bounds the magnitude.
    """
    if isinstance(text, (float, bool)):
        raise AmountError(f"amount {text!r} must be written as a decimal string, not a float")
    if isinstance(text, str):
        shown = clip(text)
        match = _AMOUNT.fullmatch(text)
        if match is None:
            raise AmountError(
                f"amount {shown!r} is not a number in plain decimals "
                "(ASCII digits, at most one point: e.g. 100 or 250.50)"
            )
        _sign, whole, fraction = match.groups()
        if fraction is not None and len(fraction) > _places(minor_unit):
            raise AmountError(
                f"amount {shown!r} has more decimal places than the minor unit {minor_unit}"
            )
        if len(whole.lstrip("0")) > 18:
            raise AmountError(f"amount {shown!r} is too large")
        value = Decimal(text)
    else:
        shown = clip(str(text))
        value = Decimal(text)
        if not value.is_finite():
            raise AmountError(f"amount {shown!r} is not a finite number")
        if value.adjusted() > 17:
            raise AmountError(f"amount {shown!r} is too large")
        if value != value.quantize(minor_unit, rounding="ROUND_DOWN"):
            raise AmountError(
                f"amount {shown!r} has more decimal places than the minor unit {minor_unit}"
            )
    if value < 0 and not allow_negative:
        raise AmountError(f"amount {shown!r} must not be negative")
    if value == 0 and not allow_zero:
        raise AmountError(
            f"amount {shown!r} must not be zero" if allow_negative
            else f"amount {shown!r} must be greater than zero"
        )
    if maximum is not None and abs(value) > maximum:
        raise AmountError(f"amount {shown!r} is above the maximum of {format_amount(maximum)}")
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


def fixed(amount: Decimal, minor_unit: Decimal = MINOR_UNIT) -> str:
    """An amount as JSON and CSV carry it: fixed point with the minor unit's places.

    ``12.5000``, ``-0.1300``, ``0.0000`` (the default unit's four places, the
    string a default ledger's amounts print as): the same for an amount read from
    the ledger and for a sum computed from nothing (``Decimal(0)``, which would
    print ``0``); a zero is never ``-0.0000``. An amount finer than the unit is
    shown exactly, never rounded.
    """
    try:
        quantized = amount.quantize(minor_unit)
    except InvalidOperation:  # more digits than the context holds: exact, as it is
        return str(amount)
    if quantized != amount:
        return str(amount)
    return str(quantized if quantized else quantized.copy_abs())
