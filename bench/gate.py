"""Gate decisions per second on a large policy, and the cost of a 1,000,000-number DNC list.

Builds (in a temp dir) a policy of 1,000 accounts, 100 destination prefix rules
and a do-not-call file of 1,000,000 numbers; reports the DNC load time and the
memory it holds (tracemalloc), then decide() calls per second on one core over
a mix of allowed and refused requests, with the ratio to a baseline that only
does the dict lookups every decision must do (account match + DNC probe).
Targets (issue 2): >= 50,000 decisions/s; DNC loads in <= 3 s and holds <= 50 MB.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from agent.calls import CallInfo, Direction
from agent.gate.decide import decide
from agent.gate.decision import AccountState
from agent.gate.dnc import _cache as _dnc_cache
from agent.gate.dnc import load_file
from agent.gate.policy import load_policy


def build(directory: Path, accounts: int, prefixes: int, dnc: int, rng: random.Random) -> Path:
    dnc_file = directory / "dnc.txt"
    with dnc_file.open("w") as handle:
        for _ in range(dnc):
            handle.write(f"13{rng.randrange(10**9):09d}\n")
    deny = [f'"{p}"' for p in ("00", "10", "11", "12", "95", "96")]
    deny += [f'"{1700 + i}"' for i in range(prefixes - len(deny) - 4)]
    allow = ['"13"', '"15"', '"18"', '"0"']
    lines = [
        "version: 1",
        "defaults:",
        "  destinations:",
        f"    allow: [{', '.join(allow)}]",
        f"    deny: [{', '.join(deny)}]",
        "  do_not_call: {files: [dnc.txt]}",
        "  callee_cap: {max_attempts: 2, period: day}",
        "  rate_cap: {max_attempts: 600, period: 1h}",
        "accounts:",
    ]
    for i in range(accounts):
        lines.append(f"  a{i}: {{name: Account {i}, caller_ids: [\"021{i:08d}\"], "
                     f"max_concurrent_calls: 30}}")
    path = directory / "policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--prefixes", type=int, default=100)
    parser.add_argument("--dnc", type=int, default=1_000_000)
    parser.add_argument("--decisions", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), args.accounts, args.prefixes, args.dnc, rng)
        started = time.perf_counter()
        policy = load_policy(path)
        load_seconds = time.perf_counter() - started
        dnc_file = Path(tmp) / "dnc.txt"
        started = time.perf_counter()
        load_file(dnc_file, policy.accounts["a0"].normalize)  # cached: the reload cost
        reload_seconds = time.perf_counter() - started
        _dnc_cache.clear()
        started = time.perf_counter()
        load_file(dnc_file, policy.accounts["a0"].normalize)
        dnc_seconds = time.perf_counter() - started
        _dnc_cache.clear()
        del policy
        tracemalloc.start()  # memory measured on a second load (tracemalloc slows it)
        policy = load_policy(path)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    dnc_bytes = policy.accounts["a0"].dnc.nbytes

    now = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai
    attempts = 1  # allowed attempts within each cap's period
    requests = []
    for i in range(1000):
        account = rng.randrange(args.accounts)
        kind = rng.random()
        destination = (
            f"13{rng.randrange(10**9):09d}" if kind < 0.8
            else "0012125550100" if kind < 0.9 else f"1700{rng.randrange(10**6):06d}"
        )
        requests.append(CallInfo(f"c{i}", Direction.OUTBOUND, f"021{account:08d}",
                                 destination, f"a{account}"))
    state = AccountState(balance=Decimal("50"), live_calls=3, callee_attempts=attempts,
                         account_attempts=attempts)
    n = args.decisions
    allowed = 0
    started = time.perf_counter()
    for i in range(n):
        if decide(policy, state, requests[i % 1000], now).allow:
            allowed += 1
    decide_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for i in range(n):
        r = requests[i % 1000]
        account = policy.accounts[policy.by_accountcode[r.accountcode]]
        _ = r.destination in account.dnc
    baseline_seconds = time.perf_counter() - started

    rate = n / decide_seconds
    figures = {
        "bench": "gate",
        "accounts": args.accounts,
        "prefix_rules": args.prefixes,
        "dnc_numbers": len(policy.accounts["a0"].dnc),
        "policy_load_seconds": round(load_seconds, 3),
        "dnc_load_seconds": round(dnc_seconds, 3),
        "dnc_reload_unchanged_seconds": round(reload_seconds, 4),
        "policy_load_mb_held": round(held / 2**20, 1),
        "policy_load_mb_peak": round(peak / 2**20, 1),
        "dnc_array_mb": round(dnc_bytes / 2**20, 1),
        "decisions_per_second": round(rate),
        "allowed_share": round(allowed / n, 3),
        "ratio_to_lookup_baseline": round(baseline_seconds / decide_seconds, 3),
        "target_decisions_per_second": 50_000,
        "target_met": rate >= 50_000 and dnc_seconds <= 3 and held <= 50 * 2**20,
    }
    print(f"policy with {args.accounts} accounts, {args.prefixes} prefix rules, "
          f"{figures['dnc_numbers']:,} DNC numbers: whole policy loads in {load_seconds:.2f} s, "
          f"the DNC file alone in {dnc_seconds:.2f} s (unchanged on reload: "
          f"{reload_seconds * 1000:.1f} ms)")
    print(f"memory held after load {figures['policy_load_mb_held']} MB, peak while loading "
          f"{figures['policy_load_mb_peak']} MB (DNC array {figures['dnc_array_mb']} MB)")
    print(f"decide(): {rate:,.0f} decisions/s on one core "
          f"({figures['ratio_to_lookup_baseline']:.2f}x the speed of the bare lookups)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
