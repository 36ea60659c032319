"""Phone numbers: normalisation and longest-prefix tables (pure).

A number is normalised before any rule sees it, so the do-not-call list, the
scope rules and the tariff prefixes all compare like with like: separators
(space, ``-``, ``.``, brackets, tab) are removed, the first configured national
prefix that matches (``+86``, ``0086``, …) is stripped, and a remaining leading
``+`` followed by digits becomes the international prefix (``00``) so that
``deny: ["00"]`` also catches ``+1…``.

What a dialable number is, said once (:func:`is_dialable`): after normalisation,
ASCII digits only (:func:`ascii_digits`), and 3 to 15 of them (E.164's maximum)
not counting a leading international prefix. A bare ``+``, letters, ``*``/``#``
service codes, ``¹²³``, a 1-digit or a 23-digit string are not numbers and are
refused (``invalid_number``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")

_SEPARATORS = str.maketrans("", "", " -.()\t")


@dataclass(frozen=True, slots=True)
class Normalizer:
    strip_prefixes: tuple[str, ...] = ()  # longest first
    international_prefix: str = "00"

    @classmethod
    def build(cls, strip_prefixes: Iterable[str], international_prefix: str) -> Normalizer:
        ordered = tuple(sorted(set(strip_prefixes), key=len, reverse=True))
        return cls(ordered, international_prefix)

    def __call__(self, number: str) -> str:
        digits = number.translate(_SEPARATORS)
        for prefix in self.strip_prefixes:
            if digits.startswith(prefix) and len(digits) > len(prefix):
                digits = digits[len(prefix):]
                break
        if digits.startswith("+") and ascii_digits(digits[1:]):
            digits = self.international_prefix + digits[1:]
        return digits

    def is_dialable(self, number: str) -> bool:
        """``number`` (already normalised) is a number callgate lets be dialled."""
        return is_dialable(number, self.international_prefix)


MIN_DIGITS = 3  # 110, 114: the shortest numbers (scope rules decide which may be called)
MAX_DIGITS = 15  # E.164: at most 15 digits, country code included


def ascii_digits(text: str) -> bool:
    """At least one character, and every one of them 0-9.

    The one digit check for numbers, everywhere (the gate, DNC files, the live
    list, the ledger, the CLI): ``str.isdigit()`` alone also takes ``'¹²³'``
    (which ``int()`` then refuses: a ValueError deep in the DNC sync) and
    Arabic-Indic or full-width digits (which ``int()`` silently reads as other
    numbers).
    """
    return text.isascii() and text.isdigit()


def is_dialable(number: str, international_prefix: str = "00") -> bool:
    """Digits only, 3 to 15 of them after a leading international prefix (if any)."""
    if not ascii_digits(number):
        return False
    if international_prefix and number.startswith(international_prefix):
        number = number[len(international_prefix):]
    return MIN_DIGITS <= len(number) <= MAX_DIGITS


class PrefixTable(Generic[V]):
    """Longest-prefix match over a set of digit prefixes.

    Lookup costs one dict probe per distinct prefix length (a handful), not
    per prefix, so 100 or 100,000 rules cost the same per call.
    """

    __slots__ = ("_by_length", "_lengths")

    def __init__(self, entries: Mapping[str, V]) -> None:
        self._by_length: dict[int, dict[str, V]] = {}
        for prefix, value in entries.items():
            self._by_length.setdefault(len(prefix), {})[prefix] = value
        self._lengths = tuple(sorted(self._by_length, reverse=True))

    def __bool__(self) -> bool:
        return bool(self._lengths)

    def longest(self, number: str) -> tuple[str, V] | None:
        """The longest prefix of ``number`` in the table with its value, or None."""
        size = len(number)
        for length in self._lengths:
            if length <= size:
                key = number[:length]
                hit = self._by_length[length].get(key)
                if hit is not None or key in self._by_length[length]:
                    return key, self._by_length[length][key]
        return None
