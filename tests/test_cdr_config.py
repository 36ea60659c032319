"""``cdr:`` in agent.yaml: validated with the rest of the config, wired into the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_agent_config
from agent.daemon import _make_cdr_source
from agent.meter.clock import SimClock
from agent.yamlfile import ConfigError

BASE = """\
node: n1
policy: policy.yaml
state_directory: state
pbx:
  kind: {kind}
{pbx}
"""
PBX = {"asterisk": "  ami: {secret: x}\n", "freeswitch": "  esl: {password: x}\n"}


def config(tmp_path: Path, cdr: str, kind: str = "asterisk") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(BASE.format(kind=kind, pbx=PBX[kind]) + cdr)
    return path


@pytest.mark.parametrize(("kind", "layout"), [("asterisk", "asterisk-custom"),
                                              ("freeswitch", "freeswitch-csv")])
def test_the_format_defaults_by_pbx_kind_and_paths_are_relative(
        tmp_path: Path, kind: str, layout: str) -> None:
    loaded = load_agent_config(config(tmp_path, "cdr: {file: cdr/Master.csv}\n", kind))
    assert loaded.spec.cdr is not None
    assert loaded.spec.cdr.layout(kind).name == layout
    assert loaded.cdr_file == tmp_path / "cdr" / "Master.csv"
    assert loaded.cdr_state_file == tmp_path / "state" / "cdr-position.json"


def test_a_custom_layout_and_state_file(tmp_path: Path) -> None:
    loaded = load_agent_config(config(
        tmp_path, "cdr:\n  file: /var/log/x.csv\n  columns: [uuid, billsec, answer_epoch]\n"
                  "  timezone: Asia/Shanghai\n  state_file: pos.json\n"))
    assert loaded.spec.cdr is not None
    assert loaded.spec.cdr.layout("asterisk").columns == ("call_id", "billsec", "answer")
    assert loaded.cdr_state_file == tmp_path / "pos.json"


@pytest.mark.parametrize(("cdr", "message"), [
    ("cdr: {file: x.csv, format: nope}\n", "format"),
    ("cdr: {file: x.csv, columns: [billsec]}\n", "no 'call_id' column"),
    ("cdr: {file: x.csv, timezone: Mars/Base}\n", "unknown timezone"),
    ("cdr: {file: x.csv, poll_seconds: 0}\n", "poll_seconds"),
    ("cdr: {format: asterisk-csv}\n", "file"),
])
def test_a_bad_cdr_section_is_a_located_error(tmp_path: Path, cdr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_agent_config(config(tmp_path, cdr))
    assert "agent.yaml" in str(caught.value)


@pytest.mark.parametrize(("contexts", "expected"), [("", [True, False, False]),
                                                    ("  outbound_contexts: [out]\n",
                                                     [False, True, False])])
def test_the_daemon_source_takes_outbound_calls_as_the_pbx_config_says(
        tmp_path: Path, contexts: str, expected: list[bool]) -> None:
    from datetime import UTC, datetime

    from agent.cdr.formats import CdrRow

    path = tmp_path / "agent.yaml"
    path.write_text(BASE.format(kind="asterisk", pbx=PBX["asterisk"] + contexts)
                    + "cdr: {file: Master.csv}\n")
    loaded = load_agent_config(path)
    source = _make_cdr_source(loaded, ledger=None,  # type: ignore[arg-type]
                              clock=SimClock(datetime(2026, 1, 1, tzinfo=UTC)), metrics=None)
    rows = [CdrRow("a", 1, accountcode="acme", context="in"), CdrRow("b", 1, context="out"),
            CdrRow("c", 1, context="in")]
    assert [source.outbound(r) for r in rows] == expected
    assert (tmp_path / "state").is_dir()


def test_config_check_notes_what_keeps_the_cdr_source_from_reading(tmp_path: Path) -> None:
    from agent.daemon import cdr_notes

    loaded = load_agent_config(config(tmp_path, "cdr: {file: pbx-log/Master.csv}\n"))
    assert cdr_notes(loaded) == [
        f"cdr.file: no directory {tmp_path / 'pbx-log'}; is the PBX's CDR backend enabled?"]
    (tmp_path / "pbx-log").mkdir()
    assert "does not exist yet" in cdr_notes(loaded)[0]
    (tmp_path / "pbx-log" / "Master.csv").write_text("")
    assert cdr_notes(loaded) == []
    assert cdr_notes(load_agent_config(config(tmp_path, ""))) == []
