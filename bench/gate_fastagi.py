"""FastAGI gate: calls/s and latency over loopback, against a do-nothing FastAGI server.

A load generator in a separate process plays Asterisk's side of
``AGI(agi://127.0.0.1:PORT/gate)``: it connects, writes the recorded request
headers (trace 06-fastagi-deny.agi.txt, ~500 bytes), answers every command with
``200 result=1`` and stops when the server closes the socket (Asterisk waits
for that, trace 06d). Latency is from the TCP connect to that close: how long
the call waits in the dialplan before it may dial.

Servers, measured in the same run on the same load:
* ``adapter``: :class:`agent.pbx.asterisk.AsteriskAdapter`'s gate with a trivial
  gate function (always ALLOW): parse the request, build the CallInfo, decide
  within the budget, ``SET VARIABLE`` x3 each checked for ``200 result=1``, close;
* ``baseline``: a do-nothing server that reads up to the empty line, writes the
  same three commands, reads each reply line unparsed, and closes;
* ``ledger``: the adapter with the real gate: :class:`agent.gatekeeper.Gatekeeper`
  on a durable SQLite ledger (read the account, decide, admit and hold the first
  unit in one commit); each call is settled 0.2 s later, as a hang-up would.
  For it every request carries its own uniqueid and destination.

Loads: 300 calls/s open loop (arrivals on a fixed schedule; more rates with
``--rates``), and saturation (a fixed number of callers back to back). Usage:
``python bench/gate_fastagi.py [--seconds S] [--rates 300,2000] [--concurrency C]
[--ledger-only] [--overload 2,5]`` (``--ledger-only``: the ``ledger`` server's open-loop
rates alone, for A/B runs of a ledger change; ``--overload``: its saturation, then
those multiples of it offered, every answer counted, as in gate_esl.py); the last
line is one JSON object.

Each load's figures carry its CPU per call, server and load generator, and the
cores that cost puts on 2,000 calls/s (see ``_loadgen``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import _leanload
import structlog
from _loadgen import (
    FIGURES,
    Answer,
    add_overload_args,
    client_figures,
    cores_needed,
    cores_note,
    gate_view,
    ledger_gate,
    overload_figures,
    pin,
    run_client,
    run_overload,
    target_verdicts,
    verdict_word,
)

from agent import eventloop
from agent.calls import CallInfo
from agent.gate.decision import Decision, Reason
from agent.pbx.asterisk import AsteriskAdapter, AsteriskSettings
from agent.sim.asterisk import AsteriskSimulator, read_trace

TRACE = (Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "asterisk"
         / "06-fastagi-deny.agi.txt")  # fmt: skip
OK = b"200 result=1\n"
COMMANDS = [b"SET VARIABLE CALLGATE_MAX_SECONDS 600\n", b"SET VARIABLE CALLGATE_REASON allowed\n",
            b"SET VARIABLE CALLGATE_RESULT ALLOW\n"]  # fmt: skip


# -- load generator (runs in its own process) ---------------------------------


def recorded_request() -> bytes:
    """The request headers Asterisk wrote, up to and including the empty line."""
    out = b""
    for chunk in read_trace(TRACE):
        if chunk.direction == "<<<":
            out += chunk.payload
            if chunk.payload == b"\n":
                return out
    raise ValueError(f"no complete request in {TRACE}")


_seq = itertools.count()


def varied(request: bytes) -> bytes:
    """The recorded request as a new call: its own uniqueid, a dialable destination."""
    n = next(_seq)
    return (request.replace(b"agi_uniqueid: 1795557357.38", f"agi_uniqueid: {os.getpid()}.{n}"
                            .encode())
            .replace(b"agi_extension: 1006", f"agi_extension: 138{n % 10**8:08d}".encode()))


async def exchange(host: str, port: int, request: bytes, vary: bool = False) -> Answer:
    """One FastAGI session as Asterisk plays it: its latency, whether the gate set
    ``CALLGATE_RESULT ALLOW``, and the ``CALLGATE_REASON`` it set (``closed``: the
    gate closed having set nothing, so the dialplan's check refuses the call)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(varied(request) if vary else request)
        commands = 0
        allowed = False
        reason = "closed"
        while True:
            try:
                line = await reader.readline()
            except ConnectionResetError:
                if commands:
                    raise
                # Shed unread (agent/pbx/_listener.py): the request still unread, the
                # close is a reset. Asterisk's AGI() fails and the dialplan refuses.
                return time.perf_counter() - t0, False, "reset"
            if not line:
                break
            commands += 1
            allowed |= line.startswith(b"SET VARIABLE CALLGATE_RESULT") and b"ALLOW" in line
            if line.startswith(b"SET VARIABLE CALLGATE_REASON "):
                reason = line.split()[3].decode().strip('"')
            writer.write(OK)
        if commands not in (0, 3):
            raise ConnectionError(f"expected 3 commands, got {commands}")
        return time.perf_counter() - t0, allowed, reason
    finally:
        writer.close()


async def one_call(host: str, port: int, request: bytes, vary: bool = False) -> float:
    latency, allowed, _ = await exchange(host, port, request, vary)
    if not allowed:  # a refusal is quick, and no measure of the gate's work
        raise ConnectionError("the gate did not allow the call")
    return latency


def client_main(argv: list[str]) -> None:
    host, port, mode = argv[0], int(argv[1]), argv[2]
    value, seconds, vary = float(argv[3]), float(argv[4]), argv[5] == "vary"
    request = recorded_request()
    payload = (lambda: varied(request)) if vary else (lambda: request)
    result = run_client(mode, _leanload.AgiPeer, host, port, payload, value, seconds,
                        lambda: exchange(host, port, request, vary),
                        lambda: one_call(host, port, request, vary))
    print(json.dumps(result))


# -- servers ---------------------------------------------------------------------


async def do_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\n\n")
        for command in COMMANDS:
            writer.write(command)
            await reader.readline()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def trivial_gate(call: CallInfo) -> Decision:
    return Decision(True, Reason.ALLOWED, "bench", account="acme", max_seconds=600)


async def drive(address: tuple[str, int], mode: str, value: float,
                seconds: float, vary: bool = False) -> dict[str, object]:  # fmt: skip
    return await client_figures(__file__, address[0], str(address[1]), mode, str(value),
                                str(seconds), "vary" if vary else "same")


async def bench(
    seconds: float, rates: list[float], concurrency: int, ledger_only: bool = False
) -> dict[str, dict[str, object]]:
    # Decisions are logged at info in production; here that would flood stdout.
    # Overload refusals log a warning each (gate.admit_failed): thousands of lines
    # that would bury the figures; the load generator counts them as errors.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    results: dict[str, dict[str, object]] = {}
    base_server = await asyncio.start_server(do_nothing, "127.0.0.1", 0, backlog=4096)
    base_addr = base_server.sockets[0].getsockname()[:2]
    decided = 0

    async def counting_gate(call: CallInfo) -> Decision:
        nonlocal decided
        decided += 1
        return await trivial_gate(call)

    async with AsteriskSimulator("callgate", "bench-secret") as sim:
        settings = AsteriskSettings(ami_port=sim.ami_address[1], secret="bench-secret",
                                    fastagi_listen=("127.0.0.1", 0))  # fmt: skip
        adapter = AsteriskAdapter(settings, counting_gate, lambda e: None)
        task = asyncio.create_task(adapter.run())
        await adapter.wait_connected(5)
        assert adapter.fastagi_address is not None
        servers = [] if ledger_only else [("baseline", base_addr),
                                          ("adapter", adapter.fastagi_address)]
        for name, addr in servers:
            for rate in rates:
                results[f"{name}_{rate:g}"] = await drive(addr, "rate", rate, seconds)
            results[f"{name}_saturation"] = await drive(addr, "closed", concurrency, seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with tempfile.TemporaryDirectory(prefix="callgate-bench-") as tmp_dir:
            async with ledger_gate(Path(tmp_dir)) as gate:
                adapter = AsteriskAdapter(settings, gate, lambda e: None)
                task = asyncio.create_task(adapter.run())
                await adapter.wait_connected(5)
                assert adapter.fastagi_address is not None
                for rate in rates:
                    results[f"ledger_{rate:g}"] = await drive(
                        adapter.fastagi_address, "rate", rate, seconds, vary=True)
                if not ledger_only:
                    results["ledger_saturation"] = await drive(
                        adapter.fastagi_address, "closed", concurrency, seconds, vary=True)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    base_server.close()
    if not ledger_only:
        assert decided >= int(str(results["adapter_saturation"]["calls"]))
    return results


async def overload_bench(seconds: float, concurrency: int, multiples: list[float],
                         generator: str = "lean") -> dict[str, object]:
    """The gate through the SQLite ledger, saturated, then offered ``multiples`` of that
    (see gate_esl.py's ``overload_bench``: the same run over FastAGI)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    loads: dict[str, dict[str, object]] = {}
    async with AsteriskSimulator("callgate", "bench-secret") as sim:
        settings = AsteriskSettings(ami_port=sim.ami_address[1], secret="bench-secret",
                                    fastagi_listen=("127.0.0.1", 0))  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="callgate-bench-") as tmp_dir:
            async with ledger_gate(Path(tmp_dir)) as gate:
                adapter = AsteriskAdapter(settings, gate, lambda e: None)
                task = asyncio.create_task(adapter.run())
                await adapter.wait_connected(5)
                address = adapter.fastagi_address
                assert address is not None
                closed, answers = ("lean-closed", "lean-answers") if generator == "lean" else (
                    "closed", "answers")
                sat = await drive(address, closed, concurrency, seconds, vary=True)
                rate = float(str(sat["calls_per_s"]))
                for m in multiples:
                    async with gate_view(adapter.listener,
                                         getattr(gate, "gatekeeper", None)) as seen:
                        loads[f"{m:g}x"] = await drive(address, answers, m * rate, seconds,
                                                       vary=True)
                    loads[f"{m:g}x"].update(seen)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return overload_figures(sat, loads, settings.decision_budget * 1000)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rates", default="300,2000", help="open-loop arrival rates, calls/s")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--ledger-only", action="store_true",
                    help="only the gate through the SQLite ledger, at the --rates")
    add_overload_args(ap)
    args = ap.parse_args()
    pinned = pin(args.pin)
    print(pinned)
    if args.overload:
        run_overload("gate_fastagi", args, overload_bench)
        return
    rates = [float(x) for x in args.rates.split(",")]
    r = eventloop.run(bench(args.seconds, rates, args.concurrency, args.ledger_only))
    for key, val in r.items():
        print(f"  {key:22s} {val}")
    if args.ledger_only:
        only: dict[str, object] = {"bench": "gate_fastagi", "mode": "ledger_only",
                                   "seconds": args.seconds}
        for key, res in r.items():
            for field in ("calls", "errors", "calls_per_s", "p50_ms", "p99_ms",
                          "server_cpu_ms", "client_cpu_ms"):
                only[f"{key}_{field}"] = res[field]
            only[f"{key}_cores_for_2000"] = cores_needed(res)
        print(cores_note(r))
        print(json.dumps(only))
        return
    a_sat, b_sat = r["adapter_saturation"], r["baseline_saturation"]
    ratio = float(str(a_sat["calls_per_s"])) / float(str(b_sat["calls_per_s"]))
    print(f"saturation ({args.concurrency} callers): adapter {a_sat['calls_per_s']} calls/s "
          f"= {ratio:.2f} x the do-nothing server")  # fmt: skip
    figures: dict[str, object] = {"bench": "gate_fastagi", "seconds": args.seconds,
                                  "concurrency": args.concurrency}  # fmt: skip
    for rate in rates:
        a, b, g = r[f"adapter_{rate:g}"], r[f"baseline_{rate:g}"], r[f"ledger_{rate:g}"]
        print(f"at {rate:g} calls/s: adapter p50 {a['p50_ms']} ms p99 {a['p99_ms']} ms; "
              f"do-nothing p50 {b['p50_ms']} ms p99 {b['p99_ms']} ms; through the SQLite "
              f"ledger p50 {g['p50_ms']} ms p99 {g['p99_ms']} ms at {g['calls_per_s']}/s")
        for side, res in (("adapter", a), ("baseline", b), ("ledger", g)):
            for key in FIGURES:
                figures[f"{side}_{rate:g}_{key}"] = res[key]
    g_sat = r["ledger_saturation"]
    print(f"saturation through the SQLite ledger: {g_sat['calls_per_s']} calls/s "
          f"(p99 {g_sat['p99_ms']} ms)")
    for side, res in (("adapter", a_sat), ("baseline", b_sat), ("ledger", g_sat)):
        for key in FIGURES:
            figures[f"{side}_sat_{key}"] = res[key]
    figures["sat_vs_baseline"] = round(ratio, 3)
    # What the rates cost in CPU, and so how many cores 2,000 calls/s would take at
    # that cost (the server and the load generator share this machine's cores).
    print(cores_note(r))
    for rate in rates:
        figures[f"ledger_{rate:g}_cores_for_2000"] = cores_needed(r[f"ledger_{rate:g}"])
    # The target: 2,000 calls/s at p99 <= 5 ms. The gate's socket path alone, and
    # the whole gate through the durable ledger (the stricter reading), both count.
    figures.update(target_verdicts(r))
    print(f"target 2,000 calls/s at p99 <= 5 ms: socket path "
          f"{verdict_word(figures['target_met_socket'])}, through the ledger "
          f"{verdict_word(figures['target_met_ledger'])}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
