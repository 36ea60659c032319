"""CPU per call beside a real PBX: callgate's CPU seconds per 1,000 calls at a fixed
sipp load, with the PBX's own CPU in the same run as the baseline.

For each PBX (the bundle beside the repository, as the real-PBX tier finds it): the
shipped config, the real ``callgate run`` (SQLite ledger, JSON log at info), a sipp
trunk that answers, and one sipp caller placing ``--rate`` calls/s of ``--hold`` s
for ``--duration`` s (about rate x hold calls live). CPU is read from
``/proc/<pid>/stat`` (utime + stime, every thread) of callgate and of the PBX, from
the first INVITE until every call has ended and the agent has settled it.

``--pbx kamailio`` measures the peer, Kamailio with its cnxcc credit-control module
(Debian's ``kamailio``, ``kamailio-cnxcc-modules``, and ``redis-server``, which cnxcc
keeps its credit in), on the same load: a proxy from the caller to the trunk with
every call under one shared customer's credit. Its config is written to a temp dir
(``KAMAILIO_CFG`` below); all its processes count, and redis's CPU is reported apart.

Figures: CPU seconds per 1,000 calls, callgate / PBX (the target: <= 0.02 on
FreeSWITCH) and callgate / Kamailio+cnxcc (the target: <= 3). Last line: one JSON object.

    python bench/cpu_per_call.py [--rate 5] [--hold 30] [--duration 120]
                                 [--pbx freeswitch asterisk kamailio] [--increment 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the harness lives in tests/
    sys.path.insert(0, str(ROOT))

from tests.realpbx.harness import (  # noqa: E402
    Agent,
    Asterisk,
    FreeSwitch,
    Pbx,
    Ports,
    Procs,
    locate_tools,
    policy_yaml,
    require,
    window_excluding_now,
)
from tests.realpbx.sip import SCENARIOS, uac_scenario  # noqa: E402
from tests.realpbx.tools import short_workdir  # noqa: E402

NUMBER = "13800138000"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int], which: tuple[int, ...] = (11, 12)) -> float:
    """utime + stime of each process (all its threads), in seconds; gone ones count 0."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(fields[i]) for i in which)  # utime, stime (fields 14, 15)
    return total / TICK


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (Kamailio forks its workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:
            out.append(int(entry))
    return out


class Load:
    """One sipp caller at a fixed rate and one answering sipp trunk (no message traces)."""

    def __init__(self, procs: Procs, ports: Ports, workdir: Path, *, target: str,
                 trunk_port: int, from_user: str, rate: float, hold: float,
                 duration: float) -> None:
        tools = locate_tools()
        assert tools.sipp is not None
        self.calls = max(1, round(rate * duration))
        self.dir = workdir / "load"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stats = self.dir / "uac_stats.csv"
        self.trunk_stats = self.dir / "uas_stats.csv"
        limit = int(rate * (hold + 10)) + 50

        def sipp(name: str, scenario: Path, port: int, args: list[str]) -> subprocess.Popen[bytes]:
            argv = [str(tools.sipp.path), *args, "-sf", str(scenario),  # type: ignore[union-attr]
                    "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(port),
                    "-mp", str(ports.block(4)), "-cp", str(ports.one()), "-nostdin",
                    "-trace_err", "-error_file", str(self.dir / f"{name}_errors.log")]
            return procs.start(argv, env=tools.sipp.env(), cwd=self.dir,  # type: ignore[union-attr]
                               stdout=self.dir / f"{name}.log")

        self.trunk = sipp("uas", SCENARIOS / "uas_answer.xml", trunk_port,
                          ["-m", str(self.calls), "-l", str(limit),
                           "-trace_stat", "-stf", str(self.trunk_stats), "-fd", "3600"])
        time.sleep(0.5)  # the trunk listens before the first INVITE
        self.caller = sipp("uac", uac_scenario(workdir, hold), ports.one(),
                           [target, "-s", NUMBER, "-key", "from_user", from_user,
                            "-r", str(rate), "-m", str(self.calls), "-l", str(limit),
                            "-timeout", f"{int(duration + hold + 120)}s", "-timeout_error",
                            "-trace_stat", "-stf", str(self.stats), "-fd", "3600"])

    def wait(self, timeout: float) -> dict[str, int]:
        try:
            self.caller.wait(timeout)
        except subprocess.TimeoutExpired:
            Procs.stop(self.caller)
        try:  # the trunk ends by itself after its last call (-m)
            self.trunk.wait(15)
        except subprocess.TimeoutExpired:
            Procs.stop(self.trunk, timeout=5)  # SIGTERM: sipp writes its last statistics
        caller, trunk = self.counts(self.stats), self.counts(self.trunk_stats)
        # A call the PBX refuses (e.g. 503 at its session limit) ends the caller's
        # scenario too: only the calls the trunk answered and saw hung up count.
        return {"ok": trunk["ok"], "failed": caller["ok"] + caller["failed"] - trunk["ok"]}

    @staticmethod
    def counts(path: Path) -> dict[str, int]:
        """Successful and failed calls from sipp's own statistics file (last row)."""
        with contextlib.suppress(FileNotFoundError, StopIteration, ValueError, IndexError):
            lines = [x for x in path.read_text().splitlines() if x.strip()]
            head = lines[0].split(";")
            last = lines[-1].split(";")
            row = dict(zip(head, last, strict=False))
            return {"ok": int(row["SuccessfulCall(C)"]), "failed": int(row["FailedCall(C)"])}
        return {"ok": 0, "failed": 0}


def bench_policy(increment: int) -> str:
    """The tier's policy with a realistic tariff and caps no load reaches."""
    text = policy_yaml(increment=increment, rate="0.10", night_window=window_excluding_now())
    text = text.replace("max_attempts: 1000, period: day", "max_attempts: 1000000, period: day")
    return text.replace("max_attempts: 10000, period: 1h", "max_attempts: 1000000, period: 1h")


RTP_PORTS = 2000  # the tier's 100 RTP ports carry ~25 calls; the load has ~150 live


class LoadAsterisk(Asterisk):
    def config_files(self) -> dict[str, str]:
        files = super().config_files()
        last = self.rtp + RTP_PORTS - 1
        files["rtp.conf"] = f"[general]\nrtpstart = {self.rtp}\nrtpend = {last}\n"
        return files


class LoadFreeSwitch(FreeSwitch):
    def config_files(self) -> dict[str, str]:
        files = super().config_files()
        xml = files["freeswitch.xml"].replace(
            f'"rtp-end-port" value="{self.rtp + 99}"',
            f'"rtp-end-port" value="{self.rtp + RTP_PORTS - 1}"')
        # the example's 200 sessions are ~100 bridged calls: the load has ~150
        files["freeswitch.xml"] = xml.replace('"max-sessions" value="200"',
                                              '"max-sessions" value="2000"')
        return files


@contextlib.contextmanager
def loaded_pbx(kind: str) -> Iterator[tuple[Pbx, Procs, Ports, Path]]:
    """As the tier's running_pbx, with RTP ports for the whole load."""
    tools = require(kind)
    workdir = short_workdir(kind[:2])
    procs, ports = Procs(), Ports()
    cls = LoadAsterisk if kind == "asterisk" else LoadFreeSwitch
    pbx = cls(tools, workdir, ports, procs)
    pbx.rtp = ports.block(RTP_PORTS)
    try:
        pbx.start()
        yield pbx, procs, ports, workdir
    finally:
        procs.stop_all()
        if os.environ.get("CALLGATE_REALPBX_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def measure_pbx(kind: str, args: argparse.Namespace) -> dict[str, object]:
    with loaded_pbx(kind) as (pbx, procs, ports, workdir):
        agent = Agent(workdir, pbx, procs, policy=bench_policy(args.increment))
        agent.topup("acme", "100000.00")
        agent.start()
        assert agent.proc is not None and pbx.proc is not None
        time.sleep(3)  # let both settle after boot
        agent_pid, pbx_pid = agent.proc.pid, pbx.proc.pid
        idle0 = (cpu_seconds([agent_pid]), cpu_seconds([pbx_pid]), time.monotonic())
        time.sleep(args.idle)
        idle1 = (cpu_seconds([agent_pid]), cpu_seconds([pbx_pid]), time.monotonic())
        start = idle1
        kernel0 = cpu_seconds([agent_pid], (12,))
        load = Load(procs, ports, workdir, target=f"127.0.0.1:{pbx.sip_port}",
                    trunk_port=pbx.trunk_port, from_user=pbx.caller("acme"), rate=args.rate,
                    hold=args.hold, duration=args.duration)
        counts = load.wait(args.duration + args.hold + 180)

        # every call settled (or, if some never are, no new settlement for 10 s)
        settled, last_change, last = 0, time.monotonic(), -1
        expected = max(counts["ok"], len(pbx.cdr_rows()))
        while settled < expected and time.monotonic() - last_change < 10:
            settled = sum(1 for ln in agent.lines() if ln.get("event") == "meter.settled")
            if settled != last:
                last, last_change = settled, time.monotonic()
            time.sleep(1)
        end = (cpu_seconds([agent_pid]), cpu_seconds([pbx_pid]), time.monotonic())
        kernel = cpu_seconds([agent_pid], (12,)) - kernel0
        reconnects = sum(1 for ln in agent.lines() if ln.get("event") in (
            "freeswitch.esl_down", "ami.disconnected"))
        # the PBX's own CDR: the calls it answered (the trunk's count can miss a few)
        calls = sum(1 for row in pbx.cdr_rows() if row.answer is not None)
        agent_cpu, pbx_cpu = end[0] - start[0], end[1] - start[1]
        idle_s = idle1[2] - idle0[2]
        return {
            "calls": calls, "trunk_answered": counts["ok"], "settled": settled,
            "wall_s": round(end[2] - start[2], 1),
            "callgate_cpu_s": round(agent_cpu, 2), "callgate_kernel_cpu_s": round(kernel, 2),
            "pbx_cpu_s": round(pbx_cpu, 2),
            "callgate_cpu_per_1000": round(agent_cpu / calls * 1000, 2) if calls else None,
            "pbx_cpu_per_1000": round(pbx_cpu / calls * 1000, 2) if calls else None,
            "callgate_over_pbx": round(agent_cpu / pbx_cpu, 4) if pbx_cpu else None,
            "callgate_idle_cpu_pct": round((idle1[0] - idle0[0]) / idle_s * 100, 2),
            "pbx_idle_cpu_pct": round((idle1[1] - idle0[1]) / idle_s * 100, 2),
            "esl_or_ami_reconnects": reconnects,
        }


KAMAILIO_CFG = """#!KAMAILIO
debug=0
log_stderror=yes
fork=yes
children=2
auto_aliases=no
listen=udp:127.0.0.1:{port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
loadmodule "textops.so"
loadmodule "xlog.so"
loadmodule "dialog.so"
loadmodule "cnxcc.so"
modparam("dialog", "dlg_match_mode", 2)
modparam("cnxcc", "redis", "addr=127.0.0.1;port={redis};db=1")
modparam("cnxcc", "credit_check_period", 1)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (is_method("INVITE") && !has_totag()) {{
        dlg_manage();
        # one shared credit for every call, as callgate's one account: per second,
        # a pulse of 60 s (the tariff's increment)
        if (!cnxcc_set_max_credit("acme", "100000", "0", "{per_second}", "{increment}",
                                  "{increment}")) {{
            sl_send_reply("403", "No credit");
            exit;
        }}
    }}
    $du = "sip:127.0.0.1:{trunk}";
    if (!t_relay()) {{
        sl_reply_error();
    }}
    exit;
}}
"""


def measure_kamailio(args: argparse.Namespace) -> dict[str, object]:
    kamailio = shutil.which("kamailio") or "/usr/sbin/kamailio"
    redis = shutil.which("redis-server")
    if not Path(kamailio).exists() or redis is None:
        raise RuntimeError("no kamailio or redis-server (apt-get install kamailio "
                           "kamailio-cnxcc-modules redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="cgkam", dir="/tmp"))
    procs, ports = Procs(), Ports()
    try:
        # cnxcc reads the redis port as a signed 16-bit number: one below 32768
        redis_port = next(p for p in range(16379, 32767, 7) if Ports._free(p))
        sip_port, trunk_port = ports.one(), ports.one()
        rproc = procs.start([redis, "--port", str(redis_port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            cwd=workdir, stdout=workdir / "redis.log")
        time.sleep(0.5)
        cfg = workdir / "kamailio.cfg"
        cfg.write_text(KAMAILIO_CFG.format(
            port=sip_port, redis=redis_port, trunk=trunk_port, increment=args.increment,
            per_second=f"{0.10 / args.increment:.6f}"))
        kproc = procs.start([kamailio, "-f", str(cfg), "-DD", "-E", "-m", "64", "-M", "8",
                             "-Y", str(workdir), "-P", str(workdir / "k.pid")],
                            cwd=workdir, stdout=workdir / "kamailio.log")
        time.sleep(2)
        pids = group_pids(kproc.pid)
        if kproc.poll() is not None or len(pids) < 4:
            raise RuntimeError("kamailio did not start: "
                               + (workdir / "kamailio.log").read_text()[-800:])
        start = (cpu_seconds(pids), cpu_seconds([rproc.pid]), time.monotonic())
        load = Load(procs, ports, workdir, target=f"127.0.0.1:{sip_port}",
                    trunk_port=trunk_port, from_user="acme", rate=args.rate, hold=args.hold,
                    duration=args.duration)
        counts = load.wait(args.duration + args.hold + 180)
        time.sleep(2)  # cnxcc's per-second check sees the last calls go
        pids = sorted(set(pids) | set(group_pids(kproc.pid)))
        end = (cpu_seconds(pids), cpu_seconds([rproc.pid]), time.monotonic())
        calls = counts["ok"]
        kcpu, rcpu = end[0] - start[0], end[1] - start[1]
        return {
            "calls": calls, "failed": counts["failed"], "wall_s": round(end[2] - start[2], 1),
            "kamailio_processes": len(pids), "kamailio_cpu_s": round(kcpu, 2),
            "redis_cpu_s": round(rcpu, 2),
            "kamailio_cpu_per_1000": round(kcpu / calls * 1000, 2) if calls else None,
            "kamailio_redis_cpu_per_1000": round((kcpu + rcpu) / calls * 1000, 2)
            if calls else None,
        }
    finally:
        procs.stop_all()
        if os.environ.get("CALLGATE_REALPBX_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5.0, help="calls per second")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds each call talks")
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds during which calls are placed")
    parser.add_argument("--increment", type=int, default=60, help="tariff increment, s")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds of idle CPU measured before the load")
    parser.add_argument("--pbx", nargs="*", default=["freeswitch", "asterisk", "kamailio"])
    args = parser.parse_args()
    result: dict[str, object] = {"bench": "cpu_per_call", "rate": args.rate,
                                 "hold": args.hold, "duration": args.duration,
                                 "increment": args.increment}
    started = time.time()
    for kind in args.pbx:
        try:
            figures = measure_kamailio(args) if kind == "kamailio" else measure_pbx(kind, args)
        except BaseException as exc:  # pytest's skip when the PBX is missing, or a failure
            print(f"{kind}: not measured: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            result[kind] = None
            continue
        result[kind] = figures
        if kind == "kamailio":
            print(f"kamailio+cnxcc: {figures['calls']} calls, "
                  f"{figures['kamailio_cpu_per_1000']} CPU s per 1,000 calls "
                  f"({figures['kamailio_processes']} processes; with redis "
                  f"{figures['kamailio_redis_cpu_per_1000']})")
        else:
            print(f"{kind}: {figures['calls']} calls answered: callgate "
                  f"{figures['callgate_cpu_per_1000']} CPU s per 1,000 calls, the PBX "
                  f"{figures['pbx_cpu_per_1000']}: callgate/PBX {figures['callgate_over_pbx']}; "
                  f"idle: callgate {figures['callgate_idle_cpu_pct']} % of a core")
    kam = result.get("kamailio")
    for kind in ("freeswitch", "asterisk"):
        fig = result.get(kind)
        if isinstance(fig, dict) and isinstance(kam, dict) and kam.get("kamailio_cpu_per_1000") \
                and fig.get("callgate_cpu_per_1000"):
            ratio = round(float(fig["callgate_cpu_per_1000"])
                          / float(kam["kamailio_cpu_per_1000"]), 2)
            fig["callgate_over_kamailio"] = ratio
            print(f"{kind}: callgate / Kamailio+cnxcc = {ratio}x")
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
