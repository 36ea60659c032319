"""The project's documents stand alone: no links to files a clone does not have, no
"issue N" references, and every relative link points at a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "systemd" / "README.md",
               *ROOT.glob("config/*/README.md"), *ROOT.glob("docs/*.md")])
OUTSIDE = re.compile(r"\.\./shared|shared/traces|shared/DESIGN|shared/pbx|/work/|DESIGN\.md"
                     r"|\b(?i:issues?) \d+(/\d+)?\b")
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_references_outside_the_repository(doc: Path) -> None:
    hits = [f"{doc.name}:{n}: {line.strip()}"
            for n, line in enumerate(doc.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert hits == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = [target for target, _ in LINK.findall(doc.read_text())
              if "://" not in target and not (doc.parent / target).exists()]
    assert broken == []


def test_the_design_document_carries_what_the_code_relies_on() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    for topic in ("AbsoluteTimeout", "sched_api", "AGISTATUS=FAILURE", "billsec",
                  "ceil(billsec / increment)", "Lifecycle", "operator", "max_posting",
                  "ledger init"):
        assert topic in design, topic
