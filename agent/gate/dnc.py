"""Do-not-call lists: millions of numbers in a compact, sorted integer array.

A Python ``set`` of a million short strings costs ~100 MB; here each number is
one unsigned 64-bit integer (``1`` followed by its digits, so leading zeros
survive: ``010…`` and ``10…`` stay distinct) in a sorted ``array('Q')``: 8 bytes
a number, and a lookup is a binary search. Files are cached by (path, size,
mtime) so a policy reload does not re-read an unchanged multi-million-line file.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path

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
        if not isinstance(number, str) or not number.isdigit() or len(number) > MAX_DIGITS:
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

_cache: dict[str, tuple[int, int, DncSet]] = {}  # resolved path -> (size, mtime_ns, set)


def load_file(path: Path, normalize: Callable[[str], str]) -> DncSet:
    """Read one number per line (blank lines and ``#`` comments skipped)."""
    stat = path.stat()
    cache_key = str(path.resolve())
    cached = _cache.get(cache_key)
    if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return cached[2]
    text_all = path.read_text(encoding="utf-8")
    tokens = text_all.split()
    # Fast path: a plain file of digits (the common case, millions of lines).
    # Anything else (comments, +86…, separators) takes the careful per-line
    # path, which also knows the line number of a bad entry.
    if tokens and "".join(tokens).isdigit() and max(map(len, tokens)) <= MAX_DIGITS:
        keys = array("Q", sorted({int("1" + t) for t in tokens}))
        result = DncSet(keys)
        _cache[cache_key] = (stat.st_size, stat.st_mtime_ns, result)
        return result
    keys = array("Q")
    append = keys.append
    with path.open("r", encoding="utf-8", errors="strict") as handle:
        for line_no, line in enumerate(handle, 1):
            text = line.strip()
            if not text or text[0] == "#":
                continue
            if not text.isdigit():
                text = normalize(text)
            if not text.isdigit() or len(text) > MAX_DIGITS:
                shown = text if len(text) <= 40 else f"{text[:40]}… ({len(text)} characters)"
                raise DncFileError(path, line_no, f"{shown!r} is not a phone number")
            append(int("1" + text))
    ordered = array("Q", sorted(set(keys)))
    result = DncSet(ordered)
    _cache[cache_key] = (stat.st_size, stat.st_mtime_ns, result)
    return result
