"""YAML files edited by people: load with line numbers, validate, report located errors.

Every error names the file, the line and the dotted path of the field, e.g.
``policy.yaml:42: accounts.acme.calling_hours[0].end: ...``. Two YAML traps are
closed here rather than in every model:

- Floats: ``rate: 0.13`` is read as the exact decimal the person wrote, never as a
  binary float (money is never a float).
- Numbers that are really strings: ``0900`` or ``+86`` read as integers by YAML.
  Fields that hold dial prefixes or phone numbers are strict strings, and the
  error message says to quote them.
- Booleans where a number belongs: pydantic would read ``suspend_after: true``
  as 1 (suspend on the first complaint). The models' base classes refuse
  ``true``/``false`` for any field that does not take a boolean
  (:class:`NoBoolNumbers`).

Whatever a file holds — an impossible date (``2026-02-30``), nesting thousands
deep, a megabyte line, binary bytes — reading and validating it either succeeds
or raises :class:`ConfigError`; nothing else escapes (a validator that fails in
an unforeseen way becomes an error without a line rather than a traceback).
Messages are clipped so an error stays one readable line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError, RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

Path_ = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 64  # no file a person edits nests deeper; far below Python's recursion limit
MAX_BYTES = 4 * 2**20  # a policy is rules; millions of numbers belong in do-not-call files
_FLOW = re.compile(r"""'[^'\n]*'|"(?:[^"\\\n]|\\.)*"|#[^\n]*|[\[\]{}]""")


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any or isinstance(annotation, bool):
        return True
    return any(_takes_bool(arg) for arg in get_args(annotation))


class NoBoolNumbers(BaseModel):
    """A base for the files' models: ``true``/``false`` is refused where no boolean belongs
    (pydantic's lax mode would take ``true`` as the number 1)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and not _takes_bool(field.annotation):
                raise ValueError(f"{str(value).lower()} is not allowed here: write a number "
                                 "or text, not true/false")
        return value


def _flow_too_deep(text: str) -> int | None:
    """The line where ``[``/``{`` nesting passes MAX_DEPTH, or None.

    ruamel's scanner is quadratic in flow nesting (5,000 ``[`` take seconds), so
    this cheap pass refuses it first. Quoted text and comments are skipped; where
    it cannot tell, it undercounts, so it never refuses a file ruamel would read.
    """
    if "[" * 8 not in text and "{" * 8 not in text and text.count("[") + text.count("{") \
            <= MAX_DEPTH:
        return None
    depth = 0
    for match in _FLOW.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                return text.count("\n", 0, match.start()) + 1
        elif token in ("]", "}"):
            depth = max(0, depth - 1)
    return None
MAX_MESSAGE = 300  # characters of one error message (a pasted megabyte stays one line)


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


@dataclass(frozen=True)
class LocatedError:
    file: str
    line: int | None
    path: str
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", clip(self.message))
        object.__setattr__(self, "path", clip(self.path, 120))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """One or more located errors in a file a person edits."""

    def __init__(self, errors: Iterable[LocatedError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class _DecimalConstructor(RoundTripConstructor):
    """Read YAML floats as the exact Decimal written in the file."""

    def construct_yaml_float(self, node: Any) -> Any:
        text = str(node.value).replace("_", "")
        try:
            return Decimal(text)
        except ArithmeticError:
            return super().construct_yaml_float(node)


    def construct_yaml_timestamp(self, node: Any, values: Any = None) -> Any:
        # ruamel builds the date itself: 2026-13-01 or 2026-02-30 would raise a bare
        # ValueError with no line or field. Hand the text on instead; the schema
        # refuses it as a date with its file, line and field.
        try:
            return super().construct_yaml_timestamp(node, values)
        except (ValueError, OverflowError):
            return str(node.value)


_DecimalConstructor.add_constructor(
    "tag:yaml.org,2002:float", _DecimalConstructor.construct_yaml_float
)
_DecimalConstructor.add_constructor(
    "tag:yaml.org,2002:timestamp", _DecimalConstructor.construct_yaml_timestamp
)


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class YamlDocument:
    file: str
    data: Any
    lines: dict[Path_, int]

    def line_of(self, path: Path_) -> int | None:
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def error(self, path: Path_, message: str) -> LocatedError:
        return LocatedError(self.file, self.line_of(path), dotted(path), message)


def read_yaml(path: Path) -> YamlDocument:
    """Parse ``path`` into plain data plus a map from field path to line number."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([LocatedError(name, None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([LocatedError(name, None, "", f"cannot read: {exc}")]) from None
    if len(text) > MAX_BYTES:
        raise ConfigError([LocatedError(
            name, None, "", f"larger than {MAX_BYTES // 2**20} MiB: not a file a person edits")])
    deep = _flow_too_deep(text)
    if deep is not None:
        raise ConfigError([LocatedError(
            name, deep, "", f"nested too deeply (more than {MAX_DEPTH} levels)")])
    yaml = YAML(typ="rt")
    yaml.Constructor = _DecimalConstructor
    try:
        raw = yaml.load(text)
    except DuplicateKeyError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError([LocatedError(name, line, "", f"duplicate key: {exc.problem}")]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([LocatedError(name, line, "", f"YAML syntax: {what}")]) from None
    except ReaderError as exc:
        # A control character (a stray ^H or NUL from a paste): ruamel gives
        # only its offset in the text, so count the lines up to it.
        line = text.count("\n", 0, exc.position) + 1
        what = str(exc).split("\n", 1)[0]
        raise ConfigError([LocatedError(name, line, "", f"YAML syntax: {what}")]) from None
    except YAMLError as exc:
        raise ConfigError([LocatedError(name, None, "", f"YAML syntax: {exc}")]) from None
    except RecursionError:
        raise ConfigError([LocatedError(
            name, None, "", f"nested too deeply (more than {MAX_DEPTH} levels)")]) from None
    except Exception as exc:  # whatever the parser trips on is the file's fault
        raise ConfigError([LocatedError(
            name, None, "", f"cannot parse: {type(exc).__name__}: {exc}")]) from None
    lines: dict[Path_, int] = {(): 1}
    errors: list[LocatedError] = []

    class TooDeep(Exception):
        pass

    def plain(node: Any, at: Path_) -> Any:
        if len(at) > MAX_DEPTH:
            line = lines.get(at)
            errors.append(LocatedError(name, line, dotted(at[:8]) + "…",
                                       f"nested too deeply (more than {MAX_DEPTH} levels)"))
            raise TooDeep
        if isinstance(node, CommentedMap):
            out: dict[str, Any] = {}
            for key, value in node.items():
                line = node.lc.key(key)[0] + 1
                if not isinstance(key, str):
                    errors.append(
                        LocatedError(
                            name, line, dotted(at),
                            f"key {key!r} must be a quoted string (write '{key}' in quotes)",
                        )
                    )
                    key = str(key)
                lines[(*at, key)] = line
                out[key] = plain(value, (*at, key))
            return out
        if isinstance(node, CommentedSeq):
            items = []
            for index, value in enumerate(node):
                lines[(*at, index)] = node.lc.item(index)[0] + 1
                items.append(plain(value, (*at, index)))
            return items
        if isinstance(node, bool) or node is None:
            return node
        if isinstance(node, int):
            return int(node)
        if isinstance(node, str):
            return str(node)
        return node

    try:
        data = plain(raw, ())
    except (TooDeep, RecursionError):
        if not errors:
            errors.append(LocatedError(name, None, "",
                                       f"nested too deeply (more than {MAX_DEPTH} levels)"))
    if errors:
        raise ConfigError(errors)
    return YamlDocument(name, data, lines)


def _message(err: Any) -> str:
    kind = err.get("type", "")
    value = err.get("input")
    if kind in ("string_type",) and isinstance(value, int) and not isinstance(value, bool):
        return (
            f"must be a quoted string, not the number {value} "
            "(YAML reads 0900 as 900 and +86 as 86: write '0900' in quotes)"
        )
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; unknown keys are not ignored)"
    message = str(err.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return message


def validate(doc: YamlDocument, model: type[M], context: dict[str, Any] | None = None) -> M:
    """Validate ``doc`` against ``model``; every failure becomes a located error."""
    if doc.data is None:
        raise ConfigError([LocatedError(doc.file, None, "", "the file is empty")])
    try:
        return model.model_validate(doc.data, context=context)
    except ValidationError as exc:
        located = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
            located.append(doc.error(loc, _message(err)))
        raise ConfigError(located) from None
    except RecursionError:
        raise ConfigError([LocatedError(doc.file, None, "", "nested too deeply")]) from None
    except Exception as exc:  # a validator that failed unforeseen
        raise ConfigError([LocatedError(
            doc.file, None, "", f"cannot validate: {type(exc).__name__}: {exc}")]) from None
