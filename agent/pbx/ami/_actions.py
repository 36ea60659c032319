"""AMI actions: what the client writes (sans-IO).

An action is ``Action: <name>``, ``ActionID: <id>`` and its fields, each line
ended by CRLF and the whole by an empty line (trace 07: ``Action: Getvar`` /
``ActionID: lab-009`` / ``Channel: ...`` / ``Variable: ...``). A value holding a
CR or LF would end the action early and let the rest be read as a second one,
so it is refused rather than sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class ActionError(ValueError):
    """An action that cannot be written safely (a line break in a field)."""


def _clean(text: str, what: str) -> str:
    if "\r" in text or "\n" in text:
        raise ActionError(f"AMI {what} may not contain a line break: {text!r}")
    return text


def format_action(
    name: str,
    action_id: str,
    fields: Mapping[str, str | int | Iterable[str]] | None = None,
) -> bytes:
    """The bytes of one action. A field whose value is a list is repeated."""
    lines = [f"Action: {_clean(name, 'action name')}", f"ActionID: {_clean(action_id, 'ActionID')}"]
    for key, value in (fields or {}).items():
        if not key or ":" in key:
            raise ActionError(f"bad AMI header name {key!r}")
        _clean(key, "header name")
        values = [value] if isinstance(value, str | int) else list(value)
        for item in values:
            lines.append(f"{key}: {_clean(str(item), f'value of {key}')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
