"""Real-PBX tier plumbing: where the PBX binaries are, the processes the tier
started (each in its own process group, all stopped by :meth:`Procs.stop_all`),
free loopback ports, and polling with a deadline."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 60.0  # generous: the machine is shared (the bundle's README: ~1-8 s idle)


# --------------------------------------------------------------------------- tools


@dataclass
class Binary:
    path: Path
    lib: Path | None = None  # bundled shared libraries (LD_LIBRARY_PATH)
    modules: Path | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.lib is not None:
            env["LD_LIBRARY_PATH"] = f"{self.lib}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
        return env


@dataclass
class Tools:
    asterisk: Binary | None
    freeswitch: Binary | None
    fs_cli: Binary | None
    sipp: Binary | None
    examples: Path | None  # the bundle's examples/ (pjsip/freeswitch.xml skeletons)
    where: str


def _bundle_dirs() -> list[Path]:
    named = os.environ.get("CALLGATE_PBX_BUNDLE")
    if named:
        return [Path(named)]
    return [REPO.parent / "shared" / "pbx", REPO.parent / "pbx"]


def locate_tools() -> Tools:
    """The PBX binaries this machine has (any of them may be None)."""
    bundle = next((d for d in _bundle_dirs() if (d / "asterisk").is_dir()), None)
    ast = fs = cli = sipp = None
    examples = None
    if bundle is not None:
        examples = bundle / "examples"
        if (bundle / "asterisk/sbin/asterisk").exists():
            ast = Binary(bundle / "asterisk/sbin/asterisk", bundle / "asterisk/lib",
                         bundle / "asterisk/modules")
        if (bundle / "freeswitch/bin/freeswitch").exists():
            fs = Binary(bundle / "freeswitch/bin/freeswitch", bundle / "freeswitch/lib",
                        bundle / "freeswitch/mod")
            cli = Binary(bundle / "freeswitch/bin/fs_cli", bundle / "freeswitch/lib")
        if (bundle / "sipp/bin/sipp").exists():
            sipp = Binary(bundle / "sipp/bin/sipp", bundle / "sipp/lib")
    if os.environ.get("CALLGATE_ASTERISK"):
        ast = Binary(Path(os.environ["CALLGATE_ASTERISK"]), None,
                     Path(os.environ.get("CALLGATE_ASTERISK_MODULES",
                                         "/usr/lib/asterisk/modules")))
    if os.environ.get("CALLGATE_FREESWITCH"):
        fs = Binary(Path(os.environ["CALLGATE_FREESWITCH"]), None,
                    Path(os.environ.get("CALLGATE_FREESWITCH_MODULES",
                                        "/usr/lib/freeswitch/mod")))
    if os.environ.get("CALLGATE_SIPP"):
        sipp = Binary(Path(os.environ["CALLGATE_SIPP"]))
    return Tools(ast, fs, cli, sipp, examples,
                 where=str(bundle) if bundle else "no bundle beside the repository")


def require(kind: str) -> Tools:
    """Tools for ``kind`` ("asterisk"/"freeswitch"), or skip (fail under CI=true)."""
    tools = locate_tools()
    missing = [name for name, have in (
        (kind, getattr(tools, kind)), ("sipp", tools.sipp),
        ("the bundle's examples", tools.examples)) if have is None]
    if missing:
        message = (f"real-PBX tier: no {', '.join(missing)} ({tools.where}; set "
                   "CALLGATE_PBX_BUNDLE or CALLGATE_ASTERISK/CALLGATE_FREESWITCH/CALLGATE_SIPP)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    return tools


# --------------------------------------------------------------------------- processes


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (even by SIGKILL), so a
    killed pytest cannot leave a PBX running; the fixtures stop them normally."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class Procs:
    """Every process the tier started; :meth:`stop_all` ends them (process groups)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None, stdout: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(stdout, "ab") if stdout else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if stdout:
                out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # the group too: a PBX's children, a sipp wrapper's child
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


# --------------------------------------------------------------------------- ports


class Ports:
    """Free loopback ports, each handed out once per process (TCP and UDP both free)."""

    _given: set[int] = set()  # noqa: RUF012 - deliberately shared by every instance

    def one(self) -> int:
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in self._given and self._free(port):
                self._given.add(port)
                return port
        raise RuntimeError("no free loopback port")

    def block(self, count: int) -> int:
        """``count`` consecutive free ports (RTP ranges, sipp media ports); the first."""
        rng = int.from_bytes(os.urandom(2), "big")
        for attempt in range(500):
            base = 20000 + ((rng + attempt * 97) * 2 % 30000)
            span = range(base, base + count)
            if all(p not in self._given and self._free(p) for p in span):
                self._given.update(span)
                return base
        raise RuntimeError(f"no {count} consecutive free loopback ports")

    @staticmethod
    def _free(port: int) -> bool:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    return False
        return True


def short_workdir(prefix: str) -> Path:
    """A short dir under /tmp: Asterisk's control socket path must stay under ~90 chars."""
    return Path(tempfile.mkdtemp(prefix=f"cg{prefix}", dir="/tmp"))


def wait_until(what: str, check, timeout: float, every: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
        except Exception as exc:  # a check may fail until the thing is up
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(every)
