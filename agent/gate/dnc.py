"""Do-not-call lists: millions of numbers in a compact, sorted integer array.

A Python ``set`` of a million short strings costs ~100 MB; here each number is
one unsigned 64-bit integer (``1`` followed by its digits, so leading zeros
survive: ``010…`` and ``10…`` stay distinct) in a sorted ``array('Q')``: 8 bytes
a number, and a lookup is a binary search. Files are cached by (path, size,
mtime) so a policy reload does not re-read an unchanged multi-million-line file.

A line is one number, normalised like any dialled number (:func:`parse_line`):
what a line means never depends on what else the file holds.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path

from agent.gate.numbers import MAX_DIGITS as MAX_NUMBER_DIGITS
from agent.gate.numbers import MIN_DIGITS as MIN_NUMBER_DIGITS
from agent.gate.numbers import Normalizer, ascii_digits

MAX_DIGITS = 18  # "1" + 18 digits < 2**64


class DncFileError(ValueError):
    def __init__(self, path: Path, line: int | None, message: str) -> None:
        self.path, self.line = path, line
        super().__init__(message)


def _key(number: str) -> int:
    return int("1" + number)


def number_key(number: str) -> int:
    """The integer a number is kept as (digits only, at most MAX_DIGITS)."""
    return int("1" + number)


def is_key_number(number: str) -> bool:
    """``number`` can be kept as a key: 1 to MAX_DIGITS ASCII digits."""
    return ascii_digits(number) and len(number) <= MAX_DIGITS


def key_number(key: int) -> str:
    return str(key)[1:]


class DncSet:
    __slots__ = ("_keys",)

    def __init__(self, keys: array[int]) -> None:
        self._keys = keys

    @classmethod
    def of(cls, numbers: Iterable[str]) -> DncSet:
        return cls(array("Q", sorted({_key(n) for n in numbers})))

    def union(self, *others: DncSet) -> DncSet:
        if not others:
            return self
        merged = set(self._keys)
        for other in others:
            merged.update(other._keys)
        return DncSet(array("Q", sorted(merged)))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, str) or not is_key_number(number):
            return False
        key = _key(number)
        keys = self._keys
        index = bisect_left(keys, key)
        return index < len(keys) and keys[index] == key

    def has_key(self, key: int) -> bool:
        """Membership of a key made by :func:`number_key` (no re-parsing)."""
        keys = self._keys
        index = bisect_left(keys, key)
        return index < len(keys) and keys[index] == key

    def keys(self) -> array[int]:
        return self._keys

    @property
    def nbytes(self) -> int:
        return self._keys.itemsize * len(self._keys)


EMPTY = DncSet(array("Q"))

# (resolved path, normaliser) -> (size, mtime_ns, set): a file is read with the
# normaliser of the accounts that name it.
_cache: dict[tuple[str, Normalizer], tuple[int, int, DncSet]] = {}


def parse_line(line: str, normalize: Normalizer) -> str | None:
    """One line of a do-not-call file: the normalised number, or None (blank/comment).

    A line holds one number, written as it would be dialled (separators and a
    ``+86`` allowed: ``138 0013 8000`` is the one number 13800138000), and may end
    in a ``# comment``. Raises :class:`ValueError` when the rest is not a number.
    """
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    return dnc_number(text, normalize)


def dnc_number(text: str, normalize: Normalizer) -> str:
    """A number for a do-not-call list, written as it would be dialled: normalised.

    The one rule for what a do-not-call entry may be, wherever it is typed (a
    policy file, ``callgate dnc add``, a complaint's callee, the web console):
    a dialable number (:func:`~agent.gate.numbers.is_dialable`: ASCII digits, 3
    to 15 after the international prefix) that fits a key. ``+``, ``00``,
    ``¹²³`` or ``12ab`` raise :class:`ValueError` with a one-line message.
    """
    number = normalize(text)
    if not normalize.is_dialable(number) or len(number) > MAX_DIGITS:
        shown = text if len(text) <= 40 else f"{text[:40]}… ({len(text)} characters)"
        raise ValueError(f"{shown!r} is not a phone number")
    return number


def load_file(path: Path, normalize: Normalizer) -> DncSet:
    """Read one number per line (see :func:`parse_line`; blank lines and comments skipped)."""
    stat = path.stat()
    cache_key = (str(path.resolve()), normalize)
    cached = _cache.get(cache_key)
    if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return cached[2]
    text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's export may start with a BOM
    result = _plain_digits(text, normalize)
    if result is None:
        result = _line_by_line(path, text, normalize)
    _cache[cache_key] = (stat.st_size, stat.st_mtime_ns, result)
    return result


def _plain_digits(text: str, normalize: Normalizer) -> DncSet | None:
    """The fast path: a file of bare digit lines (millions of them) -> the set, or None.

    Means exactly what :func:`parse_line` makes of each line: the digit prefixes
    the normaliser strips are stripped here too, in one regular-expression pass,
    and every line must be a dialable length. Anything else returns None and
    takes the careful path, which also knows the line number of a bad entry.
    """
    bare = text.replace("\n", "").replace("\r", "")
    if not ascii_digits(bare):
        return None
    digit_prefixes = [p for p in normalize.strip_prefixes if p.isdigit()]  # longest first
    if digit_prefixes:
        pattern = "|".join(re.escape(p) for p in digit_prefixes)
        text = re.sub(rf"(?m)^(?:{pattern})(?=\d)", "", text)
    tokens = text.split()
    international = len(normalize.international_prefix)
    if min(map(len, tokens)) < MIN_NUMBER_DIGITS + international or \
            max(map(len, tokens)) > MAX_NUMBER_DIGITS:
        return None  # short or long lines: let the careful path judge each one
    return DncSet(array("Q", sorted({int("1" + t) for t in tokens})))


def _line_by_line(path: Path, text: str, normalize: Normalizer) -> DncSet:
    keys = array("Q")
    append = keys.append
    for line_no, line in enumerate(text.splitlines(), 1):
        try:
            number = parse_line(line, normalize)
        except ValueError as exc:
            raise DncFileError(path, line_no, str(exc)) from None
        if number is not None:
            append(int("1" + number))
    return DncSet(array("Q", sorted(set(keys))))
