"""``pbx.command_timeout_seconds``, ``command_timeout_max_seconds``, ``dead_after_seconds``:
the slow-or-dead limits of the PBX control link (agent/pbx/liveness.py) in agent.yaml,
validated with the rest of the config (file, line, field) and handed to both adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_agent_config
from agent.daemon import adapter_settings
from agent.pbx.asterisk import AsteriskSettings
from agent.pbx.freeswitch import FreeswitchSettings
from agent.yamlfile import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PBX = {"asterisk": "  ami: {secret: x}\n", "freeswitch": "  esl: {password: x}\n"}


def config(tmp_path: Path, keys: str, kind: str = "asterisk") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"node: n1\npbx:\n  kind: {kind}\n{PBX[kind]}{keys}")
    return path


def limits(settings: AsteriskSettings | FreeswitchSettings) -> tuple[float, float, float]:
    first = (settings.ping_timeout if isinstance(settings, AsteriskSettings)
             else settings.command_timeout)
    return first, settings.timeout_ceiling(), settings.dead_after


@pytest.mark.parametrize("kind", ["asterisk", "freeswitch"])
def test_the_defaults_are_the_adapters_own(tmp_path: Path, kind: str) -> None:
    """Without the keys the adapters behave as before: 5 s, doubled up to 30 s, dead after 30 s."""
    settings = adapter_settings(load_agent_config(config(tmp_path, "", kind)))
    own = AsteriskSettings() if kind == "asterisk" else FreeswitchSettings()
    assert limits(settings) == limits(own) == (5.0, 30.0, 30.0)


@pytest.mark.parametrize("kind", ["asterisk", "freeswitch"])
@pytest.mark.parametrize(("keys", "expected"), [
    ("  command_timeout_seconds: 12.5\n  command_timeout_max_seconds: 90\n"
     "  dead_after_seconds: 60\n", (12.5, 90.0, 60.0)),
    ("  dead_after_seconds: 120\n", (5.0, 120.0, 120.0)),  # the ceiling follows dead_after
    ("  command_timeout_seconds: 20\n  dead_after_seconds: 20\n", (20.0, 20.0, 20.0)),
    ("  command_timeout_seconds: 1\n  command_timeout_max_seconds: 1\n"
     "  dead_after_seconds: 1\n", (1.0, 1.0, 1.0)),
])
def test_the_keys_reach_both_adapters(tmp_path: Path, kind: str, keys: str,
                                      expected: tuple[float, float, float]) -> None:
    assert limits(adapter_settings(load_agent_config(config(tmp_path, keys, kind)))) == expected


@pytest.mark.parametrize(("keys", "line"), [
    ("  command_timeout_seconds: 0.5\n",
     "agent.yaml:5: pbx.command_timeout_seconds: Input should be greater than or equal to 1"),
    ("  command_timeout_seconds: 121\n",
     "agent.yaml:5: pbx.command_timeout_seconds: Input should be less than or equal to 120"),
    ("  command_timeout_max_seconds: 601\n",
     "agent.yaml:5: pbx.command_timeout_max_seconds: Input should be less than or equal to 600"),
    ("  dead_after_seconds: 0\n",
     "agent.yaml:5: pbx.dead_after_seconds: Input should be greater than or equal to 1"),
    ("  dead_after_seconds: 3600\n",
     "agent.yaml:5: pbx.dead_after_seconds: Input should be less than or equal to 600"),
    ("  dead_after_seconds: thirty\n",
     "agent.yaml:5: pbx.dead_after_seconds: Input should be a valid number, unable to parse "
     "string as a number"),
    ("  dead_after_seconds: true\n",
     "agent.yaml:5: pbx.dead_after_seconds: true is not allowed here: write a number or "
     "text, not true/false"),
    ("  command_timeout_seconds: 10\n  dead_after_seconds: 8\n",
     "agent.yaml:6: pbx.dead_after_seconds: 8 s is shorter than pbx.command_timeout_seconds "
     "(10 s): a PBX would be called dead before a command may time out; set it to at least "
     "10 (default 30)"),
    ("  dead_after_seconds: 4\n",  # below the default command timeout, 5 s
     "agent.yaml:5: pbx.dead_after_seconds: 4 s is shorter than pbx.command_timeout_seconds "
     "(5 s): a PBX would be called dead before a command may time out; set it to at least "
     "5 (default 30)"),
    # dead_after_seconds left at its default: named, at the line of pbx:
    ("  command_timeout_seconds: 45\n",
     "agent.yaml:2: pbx.dead_after_seconds: 30 s is shorter than pbx.command_timeout_seconds "
     "(45 s): a PBX would be called dead before a command may time out; set it to at least "
     "45 (default 30)"),
    ("  command_timeout_seconds: 8\n  command_timeout_max_seconds: 6\n",
     "agent.yaml:6: pbx.command_timeout_max_seconds: 6 s is shorter than "
     "pbx.command_timeout_seconds (8 s), the timeout it backs off from"),
])
def test_a_bad_limit_is_one_located_line(tmp_path: Path, keys: str, line: str) -> None:
    path = config(tmp_path, keys)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    assert str(caught.value) == f"{tmp_path}/{line}"


def test_the_commented_example_is_valid_and_says_the_defaults(tmp_path: Path) -> None:
    """config/agent.yaml, its commented pbx limits switched on, loads with today's values."""
    text = (ROOT / "config" / "agent.yaml").read_text()
    for key in ("command_timeout_seconds", "command_timeout_max_seconds", "dead_after_seconds"):
        assert f"  # {key}: " in text, key
        text = text.replace(f"  # {key}: ", f"  {key}: ")
    (tmp_path / "agent.yaml").write_text(text)
    pbx = load_agent_config(tmp_path / "agent.yaml").spec.pbx
    assert pbx.model_fields_set >= {"command_timeout_seconds", "command_timeout_max_seconds",
                                    "dead_after_seconds"}
    assert (pbx.command_timeout_seconds, pbx.command_timeout_max,
            pbx.dead_after_seconds) == (5.0, 30.0, 30.0)
