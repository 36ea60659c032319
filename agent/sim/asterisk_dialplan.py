"""The shipped Asterisk dialplan (config/asterisk/extensions.conf) as the simulator
runs it, and how a real Asterisk 22 with PJSIP (no chan_sip) dials its Dial line.

The simulator does not hard-code the dialplan's Dial string: it reads the shipped
file, so a broken line fails the simulated call the way the real PBX fails it
(recorded in tests/fixtures/asterisk22/, scenarios 26 and 27):

* a technology Asterisk has no driver for (``SIP/...`` on 21 and later): WARNING
  ``No channel type registered for 'SIP'``, no callee channel, the caller's
  channel ends with cause 66 (Channel not implemented) and the caller gets 503;
* ``PJSIP/<endpoint>/<number>``: chan_pjsip takes what follows the second ``/``
  as a URI: ``Endpoint 'carrier': Could not create dialog to invalid URI
  '13800138000'``, cause 3 (No route to destination), the caller gets 404;
* ``PJSIP/<number>@<endpoint>`` dials ``sip:<number>@<the endpoint's contact>``.

It also models the two dialplan-language rules that bit us: a ``;`` starts a
comment (``\\;`` is a literal one), and exact extensions (the emergency numbers
routed to ``callgate-emergency``) win over the pattern that gates (``_[+0-9*#]!``
as shipped: :func:`pattern_regex` reads Asterisk's pattern language).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SHIPPED_EXTENSIONS = Path(__file__).resolve().parents[2] / "config" / "asterisk" / "extensions.conf"
CHANNEL_DRIVERS = frozenset({"PJSIP", "Local"})  # Asterisk 22 as tested: no chan_sip, no IAX2

_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
_PATTERN_CHARS = {"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]", ".": ".+", "!": ".*"}


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """An Asterisk extension pattern (``_X.``, ``_[+0-9*#]!``) as a regex on the
    whole extension: X, Z, N, ``[...]`` classes, ``.`` (one or more of anything),
    ``!`` (zero or more), ``-`` ignored outside a class, the rest literal."""
    if not pattern.startswith("_"):
        return re.compile(re.escape(pattern))
    out = []
    i = 1
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1:end]
            out.append("[" + "".join("-" if c == "-" else re.escape(c) for c in body) + "]")
            i = end + 1
            continue
        if ch in ".!" or ch.upper() in "XZN":
            out.append(_PATTERN_CHARS[ch.upper()])
        elif ch != "-":
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def strip_comment(line: str) -> str:
    """The part of a config line before an unescaped ``;`` (``\\;`` stays, as ``;``)."""
    out = []
    i = 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line) and line[i + 1] == ";":
            out.append(";")
            i += 2
            continue
        if line[i] == ";":
            break
        out.append(line[i])
        i += 1
    return "".join(out).rstrip()


@dataclass(frozen=True, slots=True)
class DialResult:
    """What Asterisk 22 does with one expanded Dial(): go on, or fail at once."""

    dial_data: str  # the expanded app data, e.g. "PJSIP/13800138000@carrier,45"
    ok: bool
    endpoint: str = ""  # the trunk endpoint dialled (callee channel PJSIP/<endpoint>-…)
    dial_string: str = ""  # DialBegin's DialString, e.g. "13800138000@carrier"
    timeout: float | None = None  # Dial's ring timeout (seconds), None: no timeout
    cause: int = 0  # the caller's hangup cause when not ok (66, 3)
    sip_status: int = 0  # what the caller gets when not ok (503, 404)
    log: str = ""  # the WARNING/ERROR line Asterisk logs


@dataclass(frozen=True, slots=True)
class ShippedDialplan:
    """The parts of extensions.conf the simulator runs."""

    globals: dict[str, str]
    dial_data: str  # the raw Dial(...) data of the gated extension
    emergency: frozenset[str]  # exact extensions routed around the gate
    gated: tuple[str, ...] = ()  # the patterns of [callgate-outbound] that run the gate

    @classmethod
    def load(cls, path: str | Path = SHIPPED_EXTENSIONS) -> ShippedDialplan:
        section = ""
        globals_: dict[str, str] = {}
        dial: str | None = None
        emergency: set[str] = set()
        gated: list[str] = []
        in_gated = False
        for raw in Path(path).read_text().splitlines():
            line = strip_comment(raw).strip()
            if not line:
                continue
            if line.startswith("[") and "]" in line:
                section = line[1 : line.index("]")]
                continue
            if section == "globals" and "=" in line:
                key, _, value = line.partition("=")
                globals_[key.strip()] = value.strip()
                continue
            if section != "callgate-outbound":
                continue
            m = re.match(r"exten\s*=>\s*([^,]+),\s*1\s*,\s*(.*)$", line)
            if m:
                exten, app = m.group(1).strip(), m.group(2)
                in_gated = exten.startswith("_")
                if in_gated:
                    gated.append(exten)
                if not in_gated and app.startswith("Goto(callgate-emergency"):
                    emergency.add(exten)
                continue
            m = re.match(r"same\s*=>\s*n(?:\([a-z]+\))?\s*,\s*Dial\((.*)\)$", line)
            if m and in_gated and dial is None:
                dial = m.group(1)
        if dial is None:
            raise ValueError(f"{path}: no Dial() line in the gated extension of "
                             "[callgate-outbound]")
        return cls(globals_, dial, frozenset(emergency), tuple(gated))

    def route(self, exten: str) -> str | None:
        """What [callgate-outbound] does with a dialled ``exten``: ``"emergency"``
        (an exact extension, which Asterisk prefers to any pattern), ``"gate"``, or
        None (no extension: chan_pjsip answers 404 and creates no channel)."""
        if exten in self.emergency:
            return "emergency"
        if any(pattern_regex(p).fullmatch(exten) for p in self.gated):
            return "gate"
        return None

    def expand(self, text: str, exten: str, variables: dict[str, str] | None = None) -> str:
        """``${EXTEN}``, channel variables and [globals] substituted (unknown: empty)."""
        scope = {**self.globals, **(variables or {}), "EXTEN": exten}
        return _VAR.sub(lambda m: scope.get(m.group(1), ""), text)

    def dial(self, exten: str, variables: dict[str, str] | None = None) -> DialResult:
        data = self.expand(self.dial_data, exten, variables)
        args = data.split(",")
        target = args[0].split("&")[0].strip()
        timeout = float(args[1]) if len(args) > 1 and args[1].strip() else None
        tech, _, resource = target.partition("/")
        if tech not in CHANNEL_DRIVERS:
            return DialResult(data, False, cause=66, sip_status=503,
                              log=f"WARNING channel.c: No channel type registered for '{tech}'")
        if "/" in resource:
            endpoint, _, uri = resource.partition("/")
            if not uri.startswith(("sip:", "sips:")):
                return DialResult(
                    data, False, cause=3, sip_status=404,
                    log=f"ERROR res_pjsip.c: Endpoint '{endpoint}': Could not create dialog "
                        f"to invalid URI '{uri}'.  Is endpoint registered and reachable?")
            return DialResult(data, True, endpoint, resource, timeout)
        _, _, endpoint = resource.rpartition("@")
        return DialResult(data, True, endpoint or resource, resource, timeout)
