"""The shipped FreeSWITCH config is the one the simulator runs and the design verified."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from agent.sim.freeswitch import hunt, read_hunt_order

CONFIG = Path(__file__).parent.parent / "config" / "freeswitch"


def test_event_socket_is_loopback_with_a_non_default_password() -> None:
    root = ET.parse(CONFIG / "autoload_configs" / "event_socket.conf.xml").getroot()
    params = {p.get("name"): p.get("value") for p in root.iter("param")}
    assert params["listen-ip"] == "127.0.0.1"
    assert params["apply-inbound-acl"] == "loopback.auto"
    assert params["password"] and params["password"] != "ClueCon"


def test_dialplan_fails_closed() -> None:
    """DESIGN.md, verified on FreeSWITCH 1.10.12: preset DENY, socket, transfer,
    then a check extension whose only way to bridge is callgate_result=ALLOW."""
    root = ET.parse(CONFIG / "dialplan" / "default" / "00_callgate.xml").getroot()
    ext = {e.get("name"): e for e in root.iter("extension")}
    gate = [(a.get("application"), a.get("data")) for a in ext["callgate_outbound"].iter("action")]
    apps = [app for app, _ in gate]
    assert ("set", "callgate_result=DENY") in gate
    assert apps.index("set") < apps.index("socket") < apps.index("transfer")
    assert gate[apps.index("socket")][1] == "127.0.0.1:8084 async full"
    assert "bridge" not in apps  # nothing after the socket may dial out directly
    target = gate[apps.index("transfer")][1].split()[0]

    conditions = list(ext["callgate_check"].iter("condition"))
    assert re.fullmatch(conditions[0].get("expression", ""), target)
    # every condition after the first refuses the call when it does not hold
    for cond in conditions[1:]:
        anti = [(a.get("application"), a.get("data")) for a in cond.iter("anti-action")]
        assert anti == [("hangup", "CALL_REJECTED")]
    result = conditions[1]
    assert result.get("field") == "${callgate_result}"
    assert not re.search(result.get("expression", ""), "DENY")
    assert not re.search(result.get("expression", ""), "")
    assert re.search(result.get("expression", ""), "ALLOW")
    limit = conditions[2]
    assert limit.get("field") == "${callgate_max_seconds}"
    for bad in ("", "0", "-5", "abc"):
        assert not re.search(limit.get("expression", ""), bad)
    actions = [(a.get("application"), a.get("data")) for a in limit.iter("action")]
    assert actions[0] == ("sched_hangup", "+${callgate_max_seconds} ALLOTTED_TIMEOUT")
    assert actions[-1][0] == "bridge" and "${callgate_dest}" in (actions[-1][1] or "")


def test_every_dial_reaches_the_gate_and_the_transfer_lands_on_the_check() -> None:
    """Issue 16: nothing a line dials falls through to the rest of the context (a
    3-digit or ``+`` number, a 16-digit one, a name: callgate refuses what is not a
    number), emergency numbers go first, and the re-hunt after the gate lands on
    the check extension, not on the gate again (the file's order decides)."""
    path = CONFIG / "dialplan" / "default" / "00_callgate.xml"
    order = read_hunt_order(path)
    for number in ("114", "+8613800138000", "13800138000", "7", "1380013810012345",
                   "*97", "operator", ""):
        assert hunt(number, order) == "callgate_outbound", number
    for number in ("110", "112", "119", "120", "122"):
        assert hunt(number, order) == "callgate_emergency", number
    root = ET.parse(path).getroot()
    gate = next(e for e in root.iter("extension") if e.get("name") == "callgate_outbound")
    transfer = next(a.get("data", "") for a in gate.iter("action")
                    if a.get("application") == "transfer")
    assert hunt(transfer.split()[0], order) == "callgate_check"
