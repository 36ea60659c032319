"""Several nodes, one balance: N real ``callgate run`` agents on one PostgreSQL ledger (issue 21).

For each N (default 1, 2, 4) a fresh schema in the PostgreSQL on loopback
holds the ledger; N agents run as their own processes, each with its own
FreeSWITCH simulator (agent/sim/, in this process), all selling from the same
few accounts. Calls arrive at ``--cps`` in total (the same offered load for
every N, spread round-robin over the nodes) for ``--seconds``, with talk times
of 0.5-2.5 s; the accounts' balances are sized to run out about half way, and
their ``max_concurrent_calls`` to be hit, so both cross-node guarantees are
exercised all along.

Reported per N: decisions/s (every gate decision the agents logged, over the
placing time), decision latency p50/p99 (the agents' own ``gate.decision``
``ms``), refusals by reason, CPU per call placed of the agents and of the
PostgreSQL backends, the whole call (gate, meter holds each 1 s increment,
settlement) from /proc (the backends by their application_name, and the WAL
writer): on a shared machine that, not a rate, says what a node
and a server can carry; and the checks:

- overdraw: after every call has ended, no account's posted balance below
  zero and the ledger audit clean (every balance the sum of its postings);
- cross-node concurrency cap: the most calls of one account live in the
  ledger at once, sampled from the ledger every 20 ms, and the most talking
  at once on all the PBXs together (exact: every simulator runs in this
  process on one clock), never above the cap.

``python bench/nodes.py [--nodes 1,2,4] [--cps 60] [--seconds 10]``. Loopback
only, bounded (each N stops after its calls end, at most ``--seconds`` + 60 s),
exits 1 when a check fails; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the daemon harness lives in tests/
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from agent import eventloop  # noqa: E402
from agent.ledger import open_ledger  # noqa: E402
from agent.sim.freeswitch import CallResult, FreeswitchSimulator  # noqa: E402
from tests.daemon_harness import (  # noqa: E402
    cpu_seconds,
    free_port,
    read_until,
    sim_port,
    start_agent,
    write_config,
)

BASE_URL = "postgresql://root@127.0.0.1:5432/test"
RATE = Decimal("0.01")  # per second of talk (1 s increments): balances run out in seconds
SECRET = "nodes-secret"
FINISH_BOUND = 60.0  # seconds after placing stops for the last calls to end and settle


def policy_yaml(accounts: int, max_live: int) -> str:
    lines = ["version: 1", 'prepaid: {first_topup_minimum: "0.01"}', "tariffs:",
             f'  per_second: {{rate: "{RATE}", increment: 1, minimum: 1}}', "defaults:",
             "  tariff: per_second",
             "  calling_hours: [{days: all, windows: [{start: '00:00', end: '24:00'}]}]",
             f"  max_concurrent_calls: {max_live}", '  low_balance_warning: "0"', "accounts:"]
    lines += [f'  s{i}: {{name: S{i}, caller_ids: ["021{i:08d}"]}}' for i in range(accounts)]
    return "\n".join(lines) + "\n"


class PgCpu:
    """CPU of the PostgreSQL backends serving this run's agents (found by their
    application_name: the server is shared with other work), summed per pid, and
    of the server's own WAL writer, which every commit wakes."""

    def __init__(self, conn: asyncpg.Connection, application: str) -> None:
        self.conn = conn
        self.application = application
        self.seen: dict[int, float] = {}

    async def sample(self) -> float:
        pids = [r[0] for r in await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
            " OR backend_type = 'walwriter'", self.application)]
        tick = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            self.seen[pid] = (int(fields[11]) + int(fields[12])) / tick
        return sum(self.seen.values())


async def _drain(proc: asyncio.subprocess.Process, latencies: list[float],
                 reasons: Counter[str], problems: list[str]) -> None:
    """Read an agent's JSON log lines (a full pipe would stall it): its decisions."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "gate.decision":
            latencies.append(float(record["ms"]))
            reasons[str(record.get("reason"))] += 1
        elif record.get("level") in ("error", "critical"):
            problems.append(f"agent logged {record.get('event')}: {record}"[:300])


async def _live_sampler(url: str, peak: dict[str, int]) -> None:
    """The most calls per account live in the ledger at once, from its own snapshots."""
    conn = await asyncpg.connect(url)
    try:
        while True:
            for account, live in await conn.fetch(
                    "SELECT account, count(*) FROM calls WHERE status <> 'ended'"
                    " GROUP BY account"):
                peak[account] = max(peak.get(account, 0), live)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end before a start at the same time)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def run_n(n: int, cps: float, seconds: float, accounts: int, max_live: int,
                schema_tag: str) -> dict[str, Any]:
    schema = f"bench_nodes_{schema_tag}_{n}"
    admin = await asyncpg.connect(BASE_URL)
    await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    application = f"callgate-{schema}"  # the agents' connections, for their server CPU
    own_url = f"{BASE_URL}?search_path={schema}"  # this process's: not counted
    url = f"{own_url}&application_name={application}"
    talk_mean = 1.5
    # Each account spends cps/accounts * talk_mean * RATE per second; this runs out
    # about half way through the placing time.
    balance = (Decimal(str(cps / accounts * talk_mean * seconds / 2)) * RATE).quantize(RATE)
    problems: list[str] = []
    latencies: list[float] = []
    reasons: Counter[str] = Counter()
    results: list[tuple[str, CallResult]] = []
    procs: list[asyncio.subprocess.Process] = []
    sims: list[FreeswitchSimulator] = []
    drains: list[asyncio.Task[None]] = []
    peak_live: dict[str, int] = {}
    pg_cpu = PgCpu(admin, application)
    ledger = await open_ledger(own_url)
    try:
        for i in range(accounts):
            await ledger.topup(f"s{i}", balance, ref=f"nodes-{i}", at=datetime.now(UTC))
        with tempfile.TemporaryDirectory(prefix="callgate-nodes-") as tmp_dir:
            for i in range(n):
                gate_port = free_port()
                sim = FreeswitchSimulator(SECRET, ("127.0.0.1", gate_port))
                await sim.start()
                sims.append(sim)
                home = Path(tmp_dir) / f"n{i}"
                home.mkdir()
                config = write_config(home, "freeswitch", sim_port(sim), gate_port, SECRET,
                                      ledger=url, node=f"n{i}",
                                      policy=policy_yaml(accounts, max_live))
                procs.append(await start_agent(config))
            for proc in procs:
                await read_until(proc, "daemon.ready", [], timeout=60)
                drains.append(asyncio.create_task(_drain(proc, latencies, reasons, problems)))
            sampler = asyncio.create_task(_live_sampler(own_url, peak_live))
            agent_cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            pg_cpu0 = await pg_cpu.sample()
            loop = asyncio.get_running_loop()
            calls: set[asyncio.Task[None]] = set()

            async def one(k: int) -> None:
                account = f"s{k % accounts}"
                talk = 0.5 + (k * 7919 % 1000) / 500  # 0.5-2.5 s, spread evenly
                handle = await sims[k % n].place_call(
                    caller=f"021{k % accounts:08d}", destination=f"13{k:09d}",
                    accountcode=account, talk_seconds=talk)
                results.append((account, await handle.ended()))

            t0 = loop.time()
            total = int(cps * seconds)
            for k in range(total):
                delay = t0 + k / cps - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(k))
                calls.add(task)
                task.add_done_callback(calls.discard)
                if k % 50 == 0:
                    await pg_cpu.sample()
            placing = loop.time() - t0
            decided = len(latencies)
            async with asyncio.timeout(FINISH_BOUND):
                while calls:
                    await asyncio.sleep(0.2)
                    await pg_cpu.sample()
                while await ledger.live_calls():
                    await asyncio.sleep(0.2)
                    await pg_cpu.sample()
            agent_cpu = sum(cpu_seconds(p.pid) for p in procs) - agent_cpu0
            server_cpu = await pg_cpu.sample() - pg_cpu0
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                if await asyncio.wait_for(proc.wait(), 30) != 0:
                    problems.append(f"an agent exited {proc.returncode} on SIGTERM")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for task in drains:
            task.cancel()
        for sim in sims:
            await sim.stop()
    # The checks, from the ledger (and the PBXs' own record of who talked when).
    audit = await ledger.audit()
    problems += [f"ledger audit: {line}" for line in audit]
    overdrawn = {b.account: b.posted for b in await ledger.balances() if b.posted < 0}
    if overdrawn:
        problems.append(f"overdrawn accounts: {overdrawn}")
    await ledger.close()
    await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await admin.close()
    talking: dict[str, list[tuple[datetime, datetime]]] = {}
    for account, res in results:
        if res.answered_at is not None:
            talking.setdefault(account, []).append((res.answered_at, res.ended_at))
    peak_talking = max((most_at_once(v) for v in talking.values()), default=0)
    peak_ledger = max(peak_live.values(), default=0)
    if peak_ledger > max_live or peak_talking > max_live:
        problems.append(f"concurrency cap {max_live} broken: {peak_ledger} live in the ledger, "
                        f"{peak_talking} talking on the PBXs")
    answered = sum(1 for _, r in results if r.answered_at is not None)
    if len(results) != total:
        problems.append(f"{total - len(results)} of {total} calls never ended")
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {
        "nodes": n, "offered_cps": cps, "calls": total, "answered": answered,
        "decisions_per_s": round(decided / placing, 1),
        "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2),
        "reasons": dict(reasons),
        "agent_cpu_ms_per_call": round(agent_cpu * 1000 / max(total, 1), 3),
        "pg_cpu_ms_per_call": round(server_cpu * 1000 / max(total, 1), 3),
        "max_live_ledger": peak_ledger, "max_talking_pbx": peak_talking, "cap": max_live,
        "overdraw": sum(-v for v in overdrawn.values()) if overdrawn else 0,
        "audit_problems": len(audit), "cap_held": peak_ledger <= max_live
        and peak_talking <= max_live, "problems": problems[:10],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    try:
        probe = await asyncpg.connect(BASE_URL, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        return {"bench": "nodes", "skipped": f"no PostgreSQL at {BASE_URL}: {exc}"}
    await probe.close()
    tag = str(time.time_ns())
    runs = []
    for n in (int(x) for x in args.nodes.split(",")):
        run = await run_n(n, args.cps, args.seconds, args.accounts, args.max_live, tag)
        runs.append(run)
        print(f"{n} node(s): {run['decisions_per_s']} decisions/s offered {args.cps:g}/s "
              f"(p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms); CPU per call: agents "
              f"{run['agent_cpu_ms_per_call']} ms, PostgreSQL "
              f"{run['pg_cpu_ms_per_call']} ms; {run['answered']} of {run['calls']} "
              f"answered, refusals {run['reasons']}; overdraw {run['overdraw']}, most live "
              f"{run['max_live_ledger']} (ledger) / {run['max_talking_pbx']} (PBXs) of cap "
              f"{run['cap']}", flush=True)
        for problem in run["problems"]:
            print(f"  PROBLEM: {problem}", flush=True)
    ok = all(not r["problems"] for r in runs)
    return {"bench": "nodes", "seconds": args.seconds, "offered_cps": args.cps,
            "accounts": args.accounts, "load_average_1m": round(os.getloadavg()[0], 2),
            "cores": os.cpu_count(), "ok": ok, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,4")
    parser.add_argument("--cps", type=float, default=60.0, help="calls/s offered, all nodes")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=4)
    parser.add_argument("--max-live", type=int, default=20,
                        help="max_concurrent_calls of each account")
    args = parser.parse_args()
    figures = eventloop.run(main_async(args))
    print(json.dumps(figures))
    if figures.get("ok") is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
