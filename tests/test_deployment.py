"""The README's install-to-systemd path, run as written so it cannot drift.

The install block is read from README.md (and must equal systemd/README.md's
step 2), run in a scratch directory with its absolute paths moved under
``tmp_path``; then the shipped unit, with the same paths moved, must pass
``systemd-analyze verify`` with the binary the block created (no stand-in), and
``callgate config check`` must pass the shipped example configuration with the
``callgate`` the block put on the PATH. Under CI a missing ``systemd-analyze``
is a failure (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "callgate.service"


def sh_block_after(text: str, heading: str) -> str:
    """The first ```sh block after ``heading``."""
    start = text.index(heading)
    match = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert match, f"no sh block after {heading!r}"
    return match.group(1)


def install_block() -> str:
    return sh_block_after((ROOT / "README.md").read_text(), "## Install")


def test_both_readmes_give_the_same_install_steps() -> None:
    assert install_block() == sh_block_after(
        (ROOT / "systemd" / "README.md").read_text(), "## 2. Install the software")


def test_the_unit_starts_what_the_install_block_creates() -> None:
    block = install_block()
    exec_start = re.search(r"^ExecStart=(\S+)", UNIT.read_text(), re.M)
    assert exec_start is not None
    binary = exec_start.group(1)
    venv = re.search(r"python3 -m venv (\S+)", block)
    assert venv is not None and binary == f"{venv.group(1)}/bin/callgate"
    assert re.search(r"^ln -sf \S+ /usr/local/bin/callgate$", block, re.M)  # on the PATH


def _relocated(text: str, tmp: Path) -> str:
    return (text.replace("/opt/callgate", f"{tmp}/opt/callgate")
                .replace("/usr/local/bin", f"{tmp}/bin")
                .replace("/path/to/callgate", str(ROOT)))


def test_install_block_then_unit_then_config_check(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    script = _relocated(install_block(), tmp_path)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CALLGATE_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{tmp_path}/bin:{Path(sys.executable).parent}:/usr/bin:/bin"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^callgate \d+\.\d+", done.stdout, re.M), done.stdout  # --version ran
    assert "project.license" not in done.stdout + done.stderr  # no deprecated license table
    binary = tmp_path / "opt" / "callgate" / "venv" / "bin" / "callgate"
    assert os.access(binary, os.X_OK)
    assert shutil.which("callgate", path=env["PATH"]) == f"{tmp_path}/bin/callgate"

    # The unit, pointing at what the block installed: systemd-analyze must accept it.
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing; CI must verify the unit", pytrace=False)
    else:
        unit = tmp_path / "callgate.service"
        unit.write_text(_relocated(UNIT.read_text(), tmp_path))
        verify = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True,
                                text=True, timeout=60, check=False)
        problems = [line for line in (verify.stderr + verify.stdout).splitlines()
                    if "callgate.service" in line]
        assert problems == [], "\n".join(problems)

    # Step 3: the shipped example config, checked by the installed `callgate` on the PATH.
    etc = tmp_path / "etc" / "callgate"
    etc.mkdir(parents=True)
    for name in ("agent.yaml", "policy.yaml"):
        shutil.copy(ROOT / "config" / name, etc / name)
    env["STATE_DIRECTORY"] = str(tmp_path / "state")
    check = subprocess.run(["callgate", "-c", str(etc / "agent.yaml"), "config", "check"],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stderr
    assert "is valid" in check.stdout and "systemd credential" in check.stdout
    # …and a broken agent.yaml is exit 1 there, though the policy alone is fine.
    (etc / "agent.yaml").write_text((etc / "agent.yaml").read_text().replace(
        "mqtt://127.0.0.1:1883", "http://127.0.0.1:1883"))
    bad = subprocess.run(["callgate", "-c", str(etc / "agent.yaml"), "config", "check"],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1 and "mqtt" in bad.stderr and "Traceback" not in bad.stderr
    policy_only = subprocess.run(["callgate", "-c", str(etc / "agent.yaml"), "policy", "check"],
                                 env=env, capture_output=True, text=True, timeout=120,
                                 check=False)
    assert policy_only.returncode == 0
