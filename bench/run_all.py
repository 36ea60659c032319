"""Run every benchmark in bench/ and write bench/RESULTS.md (``make bench``).

Each script prints its figures and, as its last line, one JSON object
(``{"bench": "<name>", ...}``). This runner records the machine, the date and
every script's figures side by side. Figures are ratios to a baseline measured
in the same run wherever a script has one (raw sqlite3/asyncpg, a do-nothing
FastAGI or ESL peer, panoramisk's parser): the machines are shared and noisy,
absolute numbers move from run to run.

``python bench/run_all.py [--only NAME ...] [--quick]``; ``--quick`` passes
smaller sizes to the scripts that take them (a smoke run, not for the report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK_ARGS = {"meter": ["--calls", "1000", "--ramp", "3"], "gate": ["--dnc", "100000"],
              "soak": ["--minutes", "1"],
              "mqtt_publish": ["--publish-events", "10000", "--drain-events", "1000"],
              "report": ["--accounts", "5", "--calls", "200"],
              "reconcile_cdr": ["--calls", "1000"],
              "cpu_per_call": ["--duration", "30", "--hold", "20"]}
# The report's soak is bounded and runs at the CPU target's load (100 CPS, about 2,000
# live calls, the contract tariff); the hour-long one at 50 CPS runs on demand:
# bench/soak.py --minutes 60
DEFAULT_ARGS = {"soak": ["--minutes", "4", "--cps", "100", "--talk-mean", "24",
                         "--tariff", "contract"]}
KEPT = "## Before and after"
"""The hand-written record of targets missed, profiled and fixed: a new report keeps it."""
TIMEOUT = 1800


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}: {os.cpu_count()} cores, {cpu}; Python "
            f"{platform.python_version()}; load average at start {load:.2f}")


def run(script: Path, extra: list[str]) -> tuple[dict[str, object] | None, str, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=HERE.parent)
    elapsed = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    figures = None
    if lines:
        try:
            figures = json.loads(lines[-1])
        except json.JSONDecodeError:
            figures = None
    text = "\n".join(lines[:-1] if figures else lines)
    if proc.returncode != 0:
        text += f"\n(exit {proc.returncode})\n{proc.stderr[-2000:]}"
    return figures, text, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    scripts = sorted(p for p in HERE.glob("*.py")
                     if p.name != "run_all.py" and not p.name.startswith("_"))
    if args.only:
        scripts = [p for p in scripts if p.stem in args.only]
    sections = []
    summary = []
    for script in scripts:
        extra = (QUICK_ARGS if args.quick else DEFAULT_ARGS).get(script.stem, [])
        print(f"== {script.name} {' '.join(extra)}", flush=True)
        figures, text, elapsed = run(script, extra)
        print(text, flush=True)
        met = figures.get("target_met") if figures else None
        summary.append(f"| `{script.name}` | {elapsed:.0f} s | "
                       f"{'yes' if met else 'no' if met is False else '—'} |")
        body = "\n".join(f"    {line}" for line in text.splitlines())
        shown = json.dumps(figures, indent=2) if figures else "(no JSON figures: it failed)"
        sections.append(f"## {script.name}\n\n{body}\n\n```json\n{shown}\n```\n")
    report = [
        "# Benchmark results",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {machine()}",
        f"- command: `python bench/run_all.py{' --quick' if args.quick else ''}`",
        "",
        "Ratios are to a baseline measured in the same run; absolute figures vary with the",
        "load of this shared machine. Each section is the script's own output.",
        "",
        "| script | wall time | targets met |",
        "|---|---|---|",
        *summary,
        "",
        *sections,
    ]
    out = Path(args.out)
    if out.exists() and KEPT in (old := out.read_text()):
        report += ["", old[old.index(KEPT):].rstrip(), ""]
    out.write_text("\n".join(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
