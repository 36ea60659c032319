"""AMI ingest: events/s through the sans-IO parser, and on into normalized call events.

Input: every message Asterisk 20 sent during the recorded calls (traces 01-08,
the AMI user reading everything, as recorded), whole traces repeated into one
stream and fed in 64 KiB reads, as a socket delivers them.

Figures, all measured in this run on the same bytes:
* ``panoramisk``: panoramisk 1.4's ``AMIProtocol.data_received`` (decode, split,
  dict per message, dispatch to a no-op) -- the library issue 5 replaced;
* ``parser``: :class:`agent.pbx.ami.AmiParser`, whole messages framed and
  typed (headers split lazily, on access);
* ``end_to_end``: parser + :class:`agent.pbx.ami.CallTracker`, i.e. AMI bytes to
  CallRequested / CallAnswered / CallEnded (checked: one end per recorded call);
* the same end to end on the streams the PBX sends with source-side pruning:
  ``Events: call,cdr,system`` at login (what the adapter asks for), and the
  ``eventfilter`` of config/asterisk/manager.conf. For those the useful
  figure is calls/s: the same calls, fewer bytes.

Usage: ``python bench/ingest_ami.py [--events N] [--repeat R]``. The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from panoramisk.ami_protocol import AMIProtocol

from agent.pbx.ami import AmiParser, CallTracker, Message
from agent.sim.asterisk import read_trace

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "tests" / "fixtures" / "asterisk"
FILES = [p.name for p in sorted(TRACES.glob("0*.ami.txt")) if not p.name.startswith("07b")]
READ = 65536
NOW = datetime(2026, 11, 24, tzinfo=UTC)


def eventfilter() -> re.Pattern[bytes]:
    """The eventfilter regex shipped in config/asterisk/manager.conf."""
    text = (ROOT / "config" / "asterisk" / "manager.conf").read_text()
    (pattern,) = re.findall(r"^eventfilter = (.*)$", text, re.M)
    return re.compile(pattern.encode())


def recorded_calls() -> list[list[bytes]]:
    """Per trace: the messages received after login (one call each)."""
    calls = []
    for name in FILES:
        chunks = [c.payload for c in read_trace(TRACES / name) if c.direction == "<<<"]
        calls.append([c for c in chunks[1:] if c.startswith(b"Event: ")])
    return calls


def by_class(message: bytes, classes: set[bytes]) -> bool:
    privilege = message.split(b"\r\n", 2)[1]  # "Privilege: call,all"
    return any(c in classes for c in privilege.partition(b": ")[2].split(b","))


def build(calls: list[list[bytes]], events: int) -> tuple[list[bytes], int, int]:
    """Whole traces repeated until at least ``events`` messages: (reads, messages, calls)."""
    out: list[bytes] = []
    n_calls = 0
    while len(out) < events:
        for call in calls:
            out += call
            n_calls += 1
    stream = b"".join(out)
    return [stream[i : i + READ] for i in range(0, len(stream), READ)], len(out), n_calls


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def dispatch(self, message: object) -> None:
        self.n += 1


def panoramisk(chunks: list[bytes]) -> int:
    proto = AMIProtocol()
    proto.connection_made(None)
    proto.factory = counter = _Counter()
    proto.version = "9.0.0"
    for chunk in chunks:
        proto.data_received(chunk)
    return counter.n


def parser_only(chunks: list[bytes]) -> int:
    parser = AmiParser(expect_banner=False)
    n = 0
    for chunk in chunks:
        parser.receive_data(chunk)
        for m in parser.events():
            if isinstance(m, Message):
                n += 1
    return n


def end_to_end(chunks: list[bytes]) -> int:
    parser = AmiParser(expect_banner=False)
    tracker = CallTracker(cdr_wait=2.0)
    n = 0
    ended = 0
    for chunk in chunks:
        parser.receive_data(chunk)
        for m in parser.events():
            if isinstance(m, Message):
                n += 1
                for event in tracker.feed(m, NOW):
                    ended += type(event).__name__ == "CallEnded"
    end_to_end.ended = ended  # type: ignore[attr-defined]
    return n


def median_rate(fn: Callable[[list[bytes]], int], chunks: list[bytes], expected: int,
                repeat: int) -> float:  # fmt: skip
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn(chunks)
        dt = time.perf_counter() - t0
        assert n == expected, (fn.__name__, n, expected)
        rates.append(n / dt)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    calls = recorded_calls()
    chunks, n, n_calls = build(calls, args.events)
    size = sum(map(len, chunks)) / n
    pano = median_rate(panoramisk, chunks, n, args.repeat)
    parsed = median_rate(parser_only, chunks, n, args.repeat)
    e2e = median_rate(end_to_end, chunks, n, args.repeat)
    assert end_to_end.ended == n_calls, (end_to_end.ended, n_calls)  # type: ignore[attr-defined]

    masked = [[m for m in call if by_class(m, {b"call", b"cdr", b"system"})] for call in calls]
    pattern = eventfilter()
    filtered = [[m for m in call if pattern.search(m)] for call in calls]
    names = {m.split(b"\r\n", 1)[0][7:].decode() for call in filtered for m in call}
    assert {"Hangup", "HangupRequest", "Cdr"} <= names and "SoftHangupRequest" not in names, names
    per_call = {}
    for label, stream_calls in (("all", calls), ("login_mask", masked),
                                ("eventfilter", filtered)):  # fmt: skip
        c_chunks, c_n, c_calls = build(stream_calls, max(2000, args.events * len(
            stream_calls[0]) // max(1, len(calls[0]))))  # fmt: skip
        rate = median_rate(end_to_end, c_chunks, c_n, args.repeat)
        assert end_to_end.ended == c_calls  # type: ignore[attr-defined]
        per_call[label] = {"events_per_call": round(c_n / c_calls, 1),
                           "bytes_per_call": round(sum(map(len, c_chunks)) / c_calls),
                           "events_per_s": round(rate), "calls_per_s": round(rate * c_calls / c_n)}

    print(f"{n} recorded AMI events ({len(FILES)} call traces, {n_calls} calls), "
          f"mean {size:.0f} bytes, median of {args.repeat} runs")
    print(f"  panoramisk 1.4   {pano:12,.0f} events/s")
    print(f"  parser           {parsed:12,.0f} events/s  ({parsed / pano:.2f} x panoramisk)")
    print(f"  end to end       {e2e:12,.0f} events/s  ({e2e / pano:.2f} x panoramisk)")
    print("end to end per call, by what the PBX is allowed to send:")
    for label, fig in per_call.items():
        print(f"  {label:12} {fig['events_per_call']:6} events {fig['bytes_per_call']:7} bytes"
              f"  {fig['calls_per_s']:10,} calls/s")
    base = per_call["all"]["calls_per_s"]
    print(json.dumps({
        "bench": "ingest_ami", "events": n, "mean_event_bytes": round(size),
        "panoramisk_eps": round(pano), "parser_eps": round(parsed),
        "end_to_end_eps": round(e2e), "target_met": e2e >= 30_000,
        "parser_vs_panoramisk": round(parsed / pano, 2),
        "end_to_end_vs_panoramisk": round(e2e / pano, 2),
        "calls_per_s_all": base,
        "calls_per_s_login_mask": per_call["login_mask"]["calls_per_s"],
        "calls_per_s_eventfilter": per_call["eventfilter"]["calls_per_s"],
        "eventfilter_vs_all": round(per_call["eventfilter"]["calls_per_s"] / base, 2),
        "useful_fraction": round(per_call["eventfilter"]["events_per_call"]
                                 / per_call["all"]["events_per_call"], 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
