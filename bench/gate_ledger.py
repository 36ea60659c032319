"""The real gate path: Gatekeeper decisions with the ledger reads and writes they make.

Each decision reads the account's state (balance, live calls, attempts for the
caps), runs decide(), admits the call (atomic concurrency check), reserves the
first increment and logs the attempt. Measured on the SQLite ledger (durable:
WAL, synchronous=FULL) and, when reachable, PostgreSQL: decisions/s and latency
p50/p99 at 300/s and 2,000/s offered load and at saturation, each against the
same decisions made by pure decide() in the same run. Calls are hung up
(settled at zero) shortly after admission so rented lines free up, as in life.
The PostgreSQL/SQLite ratio is the median of ``--rounds`` saturation runs of each,
interleaved (``--pg-pool-sizes 2,5,10,20`` adds the pool sizes to the rounds); each
round also gives the CPU per decision, of this process (client; all of it for
SQLite) and of the PostgreSQL backends serving it (server, read from /proc: the
server runs on this machine), a figure far steadier than throughput on a shared
machine.
The socket part of the gate is measured by gate_fastagi.py / gate_esl.py.

``--overload 2,5``: the Gatekeeper alone with its production budget (0.45 s),
saturated, then offered 2x and 5x that rate; each request's budget and latency
count from its scheduled arrival, and every answer counts: served decisions/s
over the saturation's, p99 of every answer over the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import structlog
from _loadgen import HangUps, pin

from agent import eventloop
from agent.calls import CallInfo, Direction
from agent.gate.decide import decide
from agent.gate.decision import AccountState
from agent.gate.policy import load_policy
from agent.gatekeeper import Gatekeeper
from agent.ledger import open_ledger
from agent.meter.clock import WallClock

ACCOUNTS = 50


def policy_text() -> str:
    lines = ["version: 1", "defaults:",
             "  calling_hours: [{days: all, windows: [{start: '00:00', end: '24:00'}]}]",
             "  callee_cap: {max_attempts: 2, period: day}",
             "  rate_cap: {max_attempts: 1000000, period: 1h}",
             "  max_concurrent_calls: 500", "accounts:"]
    lines += [f'  a{i}: {{name: A{i}, caller_ids: ["021{i:08d}"]}}' for i in range(ACCOUNTS)]
    return "\n".join(lines) + "\n"


def summarize(lat: list[float], elapsed: float) -> dict[str, float]:
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"per_s": round(len(lat) / elapsed, 1), "p50_ms": round(q[49] * 1000, 3),
            "p99_ms": round(q[98] * 1000, 3)}


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a local process has used; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """CPU of the PostgreSQL backends serving this ledger (found by application_name;
    the server must run on this machine, as the bench's does)."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.start: dict[int, float] = {}

    async def _pids(self) -> list[int]:
        import asyncpg

        conn = await asyncpg.connect("postgresql://root@127.0.0.1:5432/test")
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                                    self.app)
        finally:
            await conn.close()
        return [r[0] for r in rows]

    async def begin(self) -> None:
        self.start = {pid: _proc_cpu(pid) for pid in await self._pids()}

    async def used(self) -> float:
        # A backend the pool opened during the run counts whole.
        return sum(_proc_cpu(pid) - self.start.get(pid, 0.0) for pid in await self._pids())


async def measure(url: str, seconds: float, rates: list[float], concurrency: int,
                  tmp: Path, saturation_only: bool = False) -> dict[str, object]:
    policy = load_policy(tmp / "policy.yaml")
    server = None
    if url.startswith("postgres"):
        server = ServerCpu(f"gate_ledger_{os.getpid()}_{time.time_ns()}")
        url += f"&application_name={server.app}"
    ledger = await open_ledger(url)
    clock = WallClock()
    for i in range(ACCOUNTS):
        await ledger.topup(f"a{i}", Decimal("100000"), ref=f"bench-{time.time_ns()}-{i}",
                           at=clock.now())
    gate = Gatekeeper(ledger=ledger, policy=lambda: policy, clock=clock, node="bench",
                      budget=30)
    seq = 0
    hangups = HangUps(ledger)

    def request() -> CallInfo:
        nonlocal seq
        seq += 1
        a = seq % ACCOUNTS
        return CallInfo(f"b{time.time_ns()}-{seq}", Direction.OUTBOUND, f"021{a:08d}",
                        f"13{seq:09d}", f"a{a}")

    async def one() -> float:
        call = request()
        t0 = time.perf_counter()
        decision = await gate(call)
        took = time.perf_counter() - t0
        if not decision.allow:
            raise RuntimeError(f"refused: {decision.reason}")
        hangups.later(call, decision.account or "")
        return took

    results: dict[str, object] = {}
    loop = asyncio.get_running_loop()
    for rate in [] if saturation_only else rates:
        lat: list[float] = []
        start = loop.time()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        lat = [x for x in await asyncio.gather(*tasks) if isinstance(x, float)]
        results[f"rate_{int(rate)}"] = summarize(lat, loop.time() - start)
        await hangups.wait()  # the next load starts on a quiet ledger, not on this backlog
    lat = []
    end = loop.time() + seconds

    async def caller() -> None:
        while loop.time() < end:
            lat.append(await one())

    if server is not None:
        await server.begin()
    start = loop.time()
    client_cpu = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    results["saturation"] = summarize(lat, loop.time() - start)
    # CPU per decision during saturation (hang-ups included, as for SQLite): this
    # process (the agent's side; SQLite's worker thread is in it) and the server's.
    cpu = {"client_ms": round((time.process_time() - client_cpu) * 1000 / max(len(lat), 1), 3)}
    if server is not None:
        cpu["server_ms"] = round(await server.used() * 1000 / max(len(lat), 1), 3)
    results["cpu_per_decision"] = cpu
    await hangups.wait()
    results["audit_problems"] = len(await ledger.audit())
    await ledger.close()
    return results


async def overload(url: str, seconds: float, multiples: list[float], concurrency: int,
                   tmp: Path, budget: float = 0.45) -> dict[str, object]:
    """The Gatekeeper alone on ``url`` with its production budget: saturation
    (``concurrency`` callers back to back), then open loops at ``multiples`` of that
    rate. Each request arrives (``CallInfo.received_at``) at its scheduled time, so
    its latency and its budget both count from there, as from a PBX's connection;
    every answer counts, refusals too."""
    policy = load_policy(tmp / "policy.yaml")
    ledger = await open_ledger(url)
    clock = WallClock()
    for i in range(ACCOUNTS):
        await ledger.topup(f"a{i}", Decimal("100000"), ref=f"bench-o-{time.time_ns()}-{i}",
                           at=clock.now())
    gate = Gatekeeper(ledger=ledger, policy=lambda: policy, clock=clock, node="bench",
                      budget=budget)
    hangups = HangUps(ledger)
    loop = asyncio.get_running_loop()
    seq = 0

    async def one(arrived: float) -> tuple[float, bool, str]:
        nonlocal seq
        seq += 1
        a = seq % ACCOUNTS
        call = CallInfo(f"o{time.time_ns()}-{seq}", Direction.OUTBOUND, f"021{a:08d}",
                        f"13{seq:09d}", f"a{a}", received_at=arrived)
        decision = await gate(call)
        if decision.allow:
            hangups.later(call, decision.account or "")
        return loop.time() - arrived, decision.allow, decision.reason.value

    served: list[float] = []
    end = loop.time() + seconds

    async def caller() -> None:
        while loop.time() < end:
            took, ok, _ = await one(loop.time())
            if ok:
                served.append(took)

    start = loop.time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    sat = summarize(served, loop.time() - start)
    out: dict[str, object] = {"sat_per_s": sat["per_s"], "sat_p99_ms": sat["p99_ms"],
                              "budget_ms": budget * 1000}
    met = True
    for m in multiples:
        rate = m * sat["per_s"]
        start = loop.time()
        tasks = []
        for i in range(int(rate * seconds)):
            at = start + i / rate
            if at > loop.time():
                await asyncio.sleep(at - loop.time())
            tasks.append(asyncio.ensure_future(one(at)))
        answers = await asyncio.gather(*tasks)
        elapsed = loop.time() - start
        every = summarize([a[0] for a in answers], elapsed)
        allowed = [a[0] for a in answers if a[1]]
        refused: dict[str, int] = {}
        for _, ok, reason in answers:
            if not ok:
                refused[reason] = refused.get(reason, 0) + 1
        served_ratio = len(allowed) / elapsed / sat["per_s"]
        p99_ratio = every["p99_ms"] / (budget * 1000)
        out[f"{m:g}x"] = {"offered_per_s": round(rate, 1),
                          "served_per_s": round(len(allowed) / elapsed, 1),
                          "served_vs_sat": round(served_ratio, 3), "p50_ms": every["p50_ms"],
                          "p99_ms": every["p99_ms"], "p99_vs_budget": round(p99_ratio, 3),
                          "refused": refused}
        met = met and served_ratio >= 0.9 and p99_ratio <= 1.0
    await hangups.wait()
    out["audit_problems"] = len(await ledger.audit())
    out["overload_target_met"] = met
    await ledger.close()
    return out


def pure_decide_rate(tmp: Path, n: int = 50_000) -> float:
    policy = load_policy(tmp / "policy.yaml")
    now = datetime.now(UTC)
    state = AccountState(balance=Decimal("100"), live_calls=1)
    calls = [CallInfo(f"c{i}", Direction.OUTBOUND, f"021{i % ACCOUNTS:08d}", f"13{i:09d}",
                      f"a{i % ACCOUNTS}") for i in range(1000)]
    t0 = time.perf_counter()
    for i in range(n):
        decide(policy, state, calls[i % 1000], now)
    return n / (time.perf_counter() - t0)


async def postgres_url() -> str | None:
    import asyncpg

    try:
        conn = await asyncpg.connect("postgresql://root@127.0.0.1:5432/test", timeout=3)
    except Exception:
        return None
    schema = f"bench_gate_{time.time_ns()}"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    return f"postgresql://root@127.0.0.1:5432/test?search_path={schema}"


async def drop_schema(url: str) -> None:
    import asyncpg

    schema = url.rsplit("search_path=", 1)[1]
    conn = await asyncpg.connect("postgresql://root@127.0.0.1:5432/test")
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    await conn.close()


async def saturation(url: str, args: argparse.Namespace, tmp: Path
                     ) -> tuple[float, dict[str, float]]:
    """Saturation alone (decisions/s) and the CPU per decision, on a fresh store: a fresh
    schema for PostgreSQL."""
    if url.startswith("sqlite"):
        store = tmp / f"sat-{time.time_ns()}.db"
        result = await measure(f"sqlite://{store}", args.seconds, [], args.concurrency, tmp,
                               saturation_only=True)
        store.unlink()
    else:
        schema_url = await postgres_url()
        assert schema_url is not None
        try:
            result = await measure(schema_url + url, args.seconds, [], args.concurrency, tmp,
                                   saturation_only=True)
        finally:
            await drop_schema(schema_url)
    return (float(result["saturation"]["per_s"]),  # type: ignore[index]
            result["cpu_per_decision"])  # type: ignore[return-value]


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    rates = [float(r) for r in args.rates.split(",")]
    figures: dict[str, object] = {"bench": "gate_ledger", "seconds": args.seconds,
                                  "load_average_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "policy.yaml").write_text(policy_text())
        if args.overload:
            multiples = [float(m) for m in args.overload.split(",")]
            figures["mode"] = "overload"
            figures["pin"] = args.pin or None
            figures["sqlite"] = await overload(f"sqlite://{tmp}/ledger.db", args.seconds,
                                               multiples, args.concurrency, Path(tmp))
            pg_url = await postgres_url()
            if pg_url is not None:
                try:
                    figures["postgres"] = await overload(pg_url, args.seconds, multiples,
                                                         args.concurrency, Path(tmp))
                finally:
                    await drop_schema(pg_url)
            return figures
        figures["pure_decide_per_s"] = round(pure_decide_rate(Path(tmp)))
        sqlite = await measure(f"sqlite://{tmp}/ledger.db", args.seconds, rates,
                               args.concurrency, Path(tmp))
        figures["sqlite"] = sqlite
        pg_url = await postgres_url()
        if pg_url is not None:
            try:
                figures["postgres"] = await measure(pg_url, args.seconds, rates,
                                                    args.concurrency, Path(tmp))
            finally:
                await drop_schema(pg_url)
            # The ratio: saturation alone, SQLite and PostgreSQL (at each pool size asked
            # for, ?pool_size=) one after the other, round after round, so a neighbour's
            # load on a shared machine falls on both; the median of each.
            sizes = [""] + [f"&pool_size={int(x)}" for x in args.pg_pool_sizes.split(",") if x]
            runs: dict[str, list[float]] = {"sqlite": [], **{f"postgres{s}": [] for s in sizes}}
            cpus: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for key, url in [("sqlite", "sqlite"), *((f"postgres{s}", s) for s in sizes)]:
                    per_s, cpu = await saturation(url, args, Path(tmp))
                    runs[key].append(per_s)
                    cpus[key].append(cpu)
            medians = {k: round(statistics.median(v), 1) for k, v in runs.items()}
            cpu_medians = {k: {part: round(statistics.median(c[part] for c in v), 3)
                               for part in v[0]} for k, v in cpus.items()}
            figures["rounds"] = {"count": args.rounds, "saturation_per_s": runs,
                                 "median_per_s": medians, "cpu_per_decision": cpus,
                                 "median_cpu_per_decision_ms": cpu_medians}
            figures["postgres_vs_sqlite"] = round(medians["postgres"] / medians["sqlite"], 2)
    return figures


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rates", default="300,2000")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pg-pool-sizes", default="",
                        help="also measure PostgreSQL saturation at these pool sizes: 2,5,10,20")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved saturation rounds for the PostgreSQL/SQLite ratio")
    parser.add_argument("--overload", default="",
                        help="only the overload run: saturation, then these multiples of it "
                             "offered (e.g. 2,5), every answer counted")
    parser.add_argument("--pin", default="",
                        help="cores for this process (the Gatekeeper, its SQLite worker and "
                             "the in-process load), e.g. 0; PostgreSQL's backends are not "
                             "pinned (default: not pinned)")
    args = parser.parse_args()
    print(pin(args.pin))
    figures = eventloop.run(main_async(args))
    if args.overload:
        for backend in ("sqlite", "postgres"):
            r = figures.get(backend)
            if isinstance(r, dict):
                print(f"{backend}: saturation {r['sat_per_s']} decisions/s (p99 {r['sat_p99_ms']}"
                      f" ms); " + "; ".join(
                          f"offered {k} ({v['offered_per_s']}/s): served {v['served_vs_sat']}x "
                          f"saturation, p99 {v['p99_ms']} ms = {v['p99_vs_budget']}x budget, "
                          f"refused {v['refused']}"
                          for k, v in r.items() if k.endswith("x") and isinstance(v, dict))
                      + f"; target {'met' if r['overload_target_met'] else 'missed'}")
        print(json.dumps(figures))
        return
    for backend in ("sqlite", "postgres"):
        if backend in figures:
            r = figures[backend]
            assert isinstance(r, dict)
            sat = r["saturation"]
            ratio = sat["per_s"] / figures["pure_decide_per_s"]  # type: ignore[operator]
            print(f"{backend}: saturation {sat['per_s']} decisions/s "
                  f"(p50 {sat['p50_ms']} ms, p99 {sat['p99_ms']} ms; {ratio:.3f}x pure decide()); "
                  + "; ".join(f"{k}: p50 {v['p50_ms']} ms p99 {v['p99_ms']} ms at {v['per_s']}/s"
                              for k, v in r.items() if k.startswith("rate_")))
    if "postgres_vs_sqlite" in figures:
        print(f"PostgreSQL / SQLite saturation (medians): {figures['postgres_vs_sqlite']}x")
    rounds = figures.get("rounds")
    if isinstance(rounds, dict):
        for key, value in rounds["median_per_s"].items():
            cpu = rounds["median_cpu_per_decision_ms"][key]
            print(f"saturation alone, median of {rounds['count']} interleaved rounds: "
                  f"{key.replace('&', ' ')}: {value} decisions/s; CPU per decision "
                  + ", ".join(f"{part.removesuffix('_ms')} {ms} ms" for part, ms in cpu.items()))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
