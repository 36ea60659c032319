"""Whatever a policy file holds, loading it is a policy or a located ConfigError.

The general hole was validation raising something other than the policy error
family (ValueError from the YAML date constructor, RecursionError, OSError from
a timezone name, ValueError from a NUL in a file name): ``policy check`` printed
a traceback and the daemon's watcher died. Each case here is one line, exit 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.gate.policy import load_policy
from agent.yamlfile import ConfigError

ACCOUNT = 'accounts:\n  acme: {name: ACME, caller_ids: ["02158880000"]}\n'

CASES = {
    "month 13": ("version: 1\ndefaults:\n  closed_dates: [2026-13-01]\n" + ACCOUNT,
                 "policy.yaml:3: defaults.closed_dates[0]:"),
    "february 30": ("version: 1\ndefaults:\n  closed_dates: [2026-02-30]\n" + ACCOUNT,
                    "policy.yaml:3: defaults.closed_dates[0]:"),
    "a date where a list goes": ("version: 1\ndefaults:\n  closed_dates: 2026-01-01\n" + ACCOUNT,
                                 "policy.yaml:3: defaults.closed_dates:"),
    "deep flow nesting": ("version: 1\naccounts: " + "[" * 5000 + "]" * 5000 + "\n",
                          "policy.yaml:2: nested too deeply"),
    "deep mapping nesting": ("version: 1\naccounts: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
                             "policy.yaml:2: nested too deeply"),
    "deep block nesting": ("version: 1\nx:\n" + "".join(" " * i + "- \n" for i in range(1, 200)),
                           "nested too deeply"),
    "huge timezone": ("version: 1\ndefaults:\n  timezone: " + "A" * 100_000 + "\n" + ACCOUNT,
                      "policy.yaml:3: defaults.timezone: unknown timezone"),
    "huge unknown key": ("version: 1\n" + "k" * 200_000 + ": 1\n" + ACCOUNT,
                         "policy.yaml:2: YAML syntax"),
    "NUL in a DNC file name": ('version: 1\ndefaults:\n  do_not_call: {files: ["a\\0b"]}\n'
                               + ACCOUNT, "policy.yaml:3: defaults.do_not_call.files[0]:"),
    "a period too long": ("version: 1\ndefaults:\n  rate_cap: {max_attempts: 1, period: "
                          "99999999999d}\n" + ACCOUNT, "policy.yaml:3: defaults.rate_cap.period"),
    "top level list": ("- 1\n- 2\n", "policy.yaml:1:"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_policy_check_gives_one_located_line(tmp_path, capsys, name):
    text, where = CASES[name]
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    started = time.monotonic()
    assert main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 700, err[:500]
    assert where in lines[0], lines[0][:300]
    assert time.monotonic() - started < 20  # and cheaply: no quadratic parse


@pytest.mark.parametrize("data", [b"version: 1\n\xff\xfe\x00binary\n",
                                  b"version: 1\naccounts: {\x00: 1}\n",
                                  b"version: 1\n\x1b[31m\n"])
def test_binary_bytes_are_a_config_error(tmp_path, data):
    path = tmp_path / "policy.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert str(info.value).startswith(str(path))


def test_an_oversized_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\n# " + "x" * (5 * 2**20) + "\n")
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_policy(path)


def test_an_unforeseen_failure_while_compiling_is_still_a_config_error(tmp_path, monkeypatch):
    import agent.gate.policy as policy_module

    def boom(*args: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(policy_module, "compile_policy", boom)
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\n" + ACCOUNT)
    with pytest.raises(ConfigError, match="cannot compile: KeyError"):
        load_policy(path)


def test_a_validator_that_fails_unforeseen_is_a_config_error(tmp_path, monkeypatch):
    from agent.gate import schema

    def boom(name: str) -> None:
        raise KeyError(name)  # not a ValueError: pydantic lets it through

    monkeypatch.setattr(schema, "ZoneInfo", boom)
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\ndefaults: {timezone: Europe/Berlin}\n" + ACCOUNT)
    with pytest.raises(ConfigError, match="cannot validate: KeyError"):
        load_policy(Path(path))
