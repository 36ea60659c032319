"""README's policy reference and reason-code table name every key and every reason."""

from __future__ import annotations

import re
from pathlib import Path

from agent.gate.decision import Reason
from agent.gate.schema import PolicySpec, PrepaidSpec, RulesSpec

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(title)
    end = README.index("\n## ", start)
    return README[start:end]


def test_every_reason_code_is_in_the_table():
    table = _section("### Decisions and reason codes")
    codes = set(re.findall(r"`([a-z_]+)`", table))
    missing = [r.value for r in Reason if r.value not in codes]
    assert missing == [], f"README's reason table lacks {missing}"


def test_every_policy_key_is_in_the_reference():
    start = README.index("| key | meaning |", README.index("## The policy"))
    reference = README[start:README.index("\n\n", start)]  # the table alone
    keys = set(re.findall(r"`(?:…|[a-z_]+\.)?([a-z_]+)", reference))
    keys |= set(re.findall(r"`([a-z_]+)\.", reference))  # `prepaid.…`
    wanted = set(PolicySpec.model_fields) | set(RulesSpec.model_fields) | set(
        PrepaidSpec.model_fields)
    missing = sorted(wanted - keys)
    assert missing == [], f"README's policy reference lacks {missing}"


def test_every_pbx_and_meter_key_is_in_the_agent_config_reference() -> None:
    from agent.config import MeterSpec, PbxSpec

    start = README.index("| key | meaning |", README.index("## Configuration"))
    reference = README[start:README.index("\n\n", start)]  # the table alone
    named = " ".join(re.findall(r"^\| (.*?) \|", reference, re.M))  # the key column
    for section, spec in (("pbx", PbxSpec), ("meter", MeterSpec)):
        keys = set(re.findall(rf"`{section}\.([a-z_]+)", named))
        missing = sorted(set(spec.model_fields) - keys)
        assert missing == [], f"README's agent config reference lacks {section}.{missing}"
