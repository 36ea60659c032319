"""Call setup latency on the real PBXs: what the gate adds to a call's setup.

For each PBX (the bundle beside the repository, as the real-PBX tier finds it):
the shipped dialplan with the real ``callgate run`` (SQLite ledger) against a
dialplan that skips the gate, in the same run, with the same sipp caller and trunk:

* allowed: the caller's INVITE -> the trunk's INVITE (both from sipp's own traces,
  one clock);
* refused: the caller's INVITE -> the caller's final refusal (403 / 603 with the
  gate; the baseline refuses at once with ``Hangup(21)`` / ``hangup CALL_REJECTED``).

Calls run one at a time (no queueing in the figures); medians and p95 in ms, and
the ratio gated / baseline. Last line: one JSON object.

    python bench/setup_latency.py [--calls 20] [--pbx asterisk freeswitch]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the harness lives in tests/
    sys.path.insert(0, str(ROOT))

from tests.realpbx.harness import (  # noqa: E402
    Agent,
    policy_yaml,
    running_pbx,
    window_excluding_now,
)

# The baseline dialplans: the same trunk, no gate.
AST_NOGATE = """
[bench-nogate]
exten => _X.,1,Dial(PJSIP/${EXTEN}@carrier,45)
 same => n,Hangup()

[bench-refuse]
exten => _X.,1,Hangup(21)
"""
FS_NOGATE = r"""
      <extension name="bench_nogate">
        <condition field="destination_number" expression="^8(\d+)$">
          <action application="set" data="hangup_after_bridge=true"/>
          <action application="bridge" data="sofia/gateway/carrier/$1"/>
        </condition>
      </extension>
      <extension name="bench_refuse">
        <condition field="destination_number" expression="^7(\d+)$">
          <action application="hangup" data="CALL_REJECTED"/>
        </condition>
      </extension>
"""
NUMBER = "13800138000"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(kind: str, calls: int) -> dict[str, float]:
    extra: dict[str, object] = (
        {"extra_dialplan": AST_NOGATE,
         "extra_endpoints": {"nogate": "bench-nogate", "refuse": "bench-refuse"}}
        if kind == "asterisk" else {"first_extensions": FS_NOGATE})
    with running_pbx(kind, **extra) as (pbx, procs, _ports, workdir):
        agent = Agent(workdir, pbx, procs,
                      policy=policy_yaml(night_window=window_excluding_now()))
        agent.topup("acme", "1000.00")
        agent.start()

        def caller_and_number(case: str) -> tuple[str, str]:
            if kind == "asterisk":
                return {"gated": "acme", "nogate": "nogate", "refused": "broke",
                        "refuse": "refuse"}[case], NUMBER
            prefix = {"gated": "", "nogate": "8", "refused": "", "refuse": "7"}[case]
            return {"refused": "broke"}.get(case, "acme"), prefix + NUMBER

        def allowed(case: str, n: int) -> list[float]:
            account, number = caller_and_number(case)
            out = []
            for _ in range(n):
                uas = pbx.trunk("answer", calls=1, timeout=30)
                trace = pbx.call(number, account=account, hold=0.2).wait()
                uas.wait(30)
                got = uas.invite_times()
                assert trace.status == 200 and got and trace.invite_at, (case, trace)
                out.append((got[0] - trace.invite_at) * 1000)
            return out

        def refused(case: str, n: int) -> list[float]:
            account, number = caller_and_number(case)
            out = []
            for _ in range(n):
                trace = pbx.call(number, account=account).wait()
                final = next(m.at for m in trace.messages
                             if not m.sent and m.first_line.startswith("SIP/2.0")
                             and int(m.first_line.split()[1]) >= 300)
                assert trace.status and trace.status >= 400 and trace.invite_at, (case, trace)
                out.append((final - trace.invite_at) * 1000)
            return out

        # interleave so that load changes hit both sides alike
        figures: dict[str, list[float]] = {"gated": [], "nogate": [], "refused": [],
                                           "refuse": []}
        rounds = 2
        per_round = max(1, calls // rounds)
        for _ in range(rounds):
            for case, fn in (("gated", allowed), ("nogate", allowed),
                             ("refused", refused), ("refuse", refused)):
                figures[case] += fn(case, per_round)
        out = {}
        for case, values in figures.items():
            out[f"{case}_median_ms"] = round(statistics.median(values), 2)
            out[f"{case}_p95_ms"] = round(pct(values, 0.95), 2)
        out["allowed_ratio"] = round(out["gated_median_ms"] / out["nogate_median_ms"], 2)
        out["refused_ratio"] = round(out["refused_median_ms"] / out["refuse_median_ms"], 2)
        out["calls_per_case"] = len(figures["gated"])
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20, help="calls per case and PBX")
    parser.add_argument("--pbx", nargs="*", default=["asterisk", "freeswitch"])
    args = parser.parse_args()
    result: dict[str, object] = {"bench": "setup_latency"}
    started = time.time()
    for kind in args.pbx:
        try:
            figures = measure(kind, args.calls)
        except BaseException as exc:  # pytest's skip when the PBX is missing, or a failure
            print(f"{kind}: not measured: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            result[kind] = None
            continue
        print(f"{kind}: allowed, caller INVITE -> trunk INVITE: gate {figures['gated_median_ms']} "
              f"ms (p95 {figures['gated_p95_ms']}), no gate {figures['nogate_median_ms']} ms "
              f"(p95 {figures['nogate_p95_ms']}): {figures['allowed_ratio']}x")
        print(f"{kind}: refused, caller INVITE -> final refusal: gate "
              f"{figures['refused_median_ms']} ms (p95 {figures['refused_p95_ms']}), dialplan "
              f"refusal {figures['refuse_median_ms']} ms (p95 {figures['refuse_p95_ms']}): "
              f"{figures['refused_ratio']}x")
        result[kind] = figures
    result["wall_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
