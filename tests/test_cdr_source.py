"""The daemon's CDR source: after an agent outage the ledger converges to the PBX's CDR.

A meter on a simulated clock and PBX (tests/meter_harness.py) is killed while
calls run; the calls end while it is dead; it restarts and settles them
provisionally; the PBX's CDR file (written here in FreeSWITCH's ``mod_cdr_csv``
layout from the simulator's own figures) then corrects each to exactly
``rate(billsec)``. The source's bookkeeping (pending rows, replays, restarts)
runs on both ledger backends.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from agent.cdr.follow import FollowState, save_state
from agent.cdr.formats import preset
from agent.cdr.source import CdrSource
from agent.meter.clock import SimClock
from agent.metrics import Metrics
from agent.rating import Tariff, rate
from agent.sim.memory import SimCall
from tests.meter_harness import Harness
from tests.test_ledger_contract import answered, at, cdr, funded

START = datetime(2026, 11, 24, 2, 0, 0, tzinfo=UTC)


def fs_row(call_id: str, billsec: int, answer: datetime | None, end: datetime,
           accountcode: str = "", destination: str = "13800138000",
           caller: str = "02158880000") -> str:
    """A row in the layout of callgate's mod_cdr_csv template (freeswitch-csv)."""
    start = (answer or end) - timedelta(seconds=3)
    answer_epoch = int(answer.timestamp()) if answer else 0
    return (f'"{call_id}","{accountcode}","{caller}","{destination}","callgate",'
            f'"{int(start.timestamp())}","{answer_epoch}","{int(end.timestamp())}",'
            f'"{billsec + 3}","{billsec}","NORMAL_CLEARING","recv_bye","bridge"\n')


def sim_row(call: SimCall) -> str:
    assert call.ended_at is not None
    return fs_row(call.info.call_id, call.billsec, call.answered_at, call.ended_at)


def source_for(ledger: Any, tmp_path: Path, clock: Any, metrics: Any = None,
               **kw: Any) -> CdrSource:
    """A source that was following the file already (a saved state from before its rows;
    a very first start would begin at the end of an existing file)."""
    if not (tmp_path / "cdr.json").exists():
        save_state(tmp_path / "cdr.json", FollowState())
    return CdrSource(ledger=ledger, path=tmp_path / "Master.csv",
                     layout=preset("freeswitch-csv"), state_path=tmp_path / "cdr.json",
                     clock=clock, metrics=metrics, **kw)


async def test_after_a_sigkill_the_cdr_brings_every_call_to_the_pbx_billsec(
        tmp_path: Path) -> None:
    h = await Harness(tmp_path, START).start()
    try:
        await h.topup("a0", "10")
        _, long_call = await h.dial(talk=3000, ring=1)   # the PBX deadline ends it
        _, short_call = await h.dial(talk=58, ring=1)    # the caller hangs up while it is dead
        _, mid_call = await h.dial(talk=100, ring=1)     # held 2 increments, talked 100 s
        # Answered while the agent is dead; the limit armed at setup (60 s, ringing
        # included) ends it 2 s later.
        _, ringing = await h.dial(talk=20, ring=58)
        await h.advance(57)         # the second increments were held at answer + 55 s
        await h.kill_agent()        # SIGKILL at answer + 56 s
        await h.clock.advance(400)
        calls = [long_call, short_call, mid_call, ringing]
        assert [c.billsec for c in calls] == [120 + 2, 58, 100, 2]  # 122: paid + grace
        await h.restart_agent()
        await h.advance(10)
        provisional = {c.info.call_id: await h.cdr(c.info.call_id) for c in calls}
        assert all("ended_while_away" in x.flags for x in provisional.values())
        assert provisional[short_call.info.call_id].amount == D("0.26")  # paid, not talked
        unknown = provisional[ringing.info.call_id]
        assert "outcome_unknown" in unknown.flags and unknown.amount == 0
        (tmp_path / "Master.csv").write_text("".join(sim_row(c) for c in calls))
        metrics = Metrics()
        source = source_for(h.ledger, tmp_path, h.clock, metrics)
        report = await source.step()
        assert report.outcomes == {"corrected": 4}
        tariff = Tariff("t", D("0.13"), 60, 60)
        for call in calls:
            settled = await h.cdr(call.info.call_id)
            assert settled.pbx_billsec == call.billsec
            assert settled.charged == rate(tariff, call.billsec), call.info.call_id
        # short: -0.13, long: +0.13, ringing (never seen answered): +0.13
        assert metrics.cdr_corrections._value.get() == 3
        assert await h.ledger.audit() == []
        # Read again from the start (a rotated file, copytruncate): nothing new is written.
        (tmp_path / "cdr.json").unlink()
        again = await source_for(h.ledger, tmp_path, h.clock).step()
        assert again.outcomes == {"replayed": 4}
        assert await h.ledger.audit() == []
    finally:
        await h.stop()


async def test_rows_of_calls_still_open_wait_and_survive_a_restart(
        ledger: Any, tmp_path: Path) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 1, D("0.13"), 60, at(5))
    assert await ledger.hold("c1", 2, D("0.13"), 120, at(60))
    (tmp_path / "Master.csv").write_text(fs_row("c1", 58, at(5), at(63)))
    first = source_for(ledger, tmp_path, clock)
    report = await first.step()
    assert (report.outcomes, report.pending) == ({"pending": 1}, 1)
    # The agent restarts before the meter settled the call: the row is not lost.
    second = source_for(ledger, tmp_path, clock)
    assert (await second.step()).outcomes == {"pending": 1}
    await ledger.settle_call(cdr("c1", "0.26", billsec=120, billed_seconds=120,
                                 ended_at=at(200), flags=("ended_while_away",
                                                          "billsec_assumed_paid")))
    report = await second.step()
    assert (report.outcomes, report.pending) == ({"corrected": 1}, 0)
    settled = await ledger.call_cdr("c1")
    assert (settled.pbx_billsec, settled.charged) == (58, D("0.13"))
    assert await ledger.audit() == []


async def test_calls_settled_live_are_left_alone_and_mismatches_counted(
        ledger: Any, tmp_path: Path) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    for call_id in ("live-ok", "live-off"):
        await answered(ledger, call_id)
        assert await ledger.hold(call_id, 1, D("0.13"), 60, at(5))
        await ledger.settle_call(cdr(call_id, "0.13", billsec=40, billed_seconds=60))
    (tmp_path / "Master.csv").write_text(
        fs_row("live-ok", 40, at(5), at(45))
        + fs_row("live-off", 70, at(5), at(75))                       # the PBX disagrees
        + fs_row("escaped", 30, at(5), at(35), accountcode="acme")    # never gated
        + fs_row("inbound", 30, at(5), at(35))                        # no accountcode
        + "garbage\n")
    metrics = Metrics()
    report = await source_for(ledger, tmp_path, clock, metrics).step()
    assert report.outcomes == {"unreadable": 1, "not_needed": 2, "not_ours": 2}
    for call_id in ("live-ok", "live-off"):
        assert (await ledger.call_cdr(call_id)).pbx_billsec is None  # untouched
    counted = {s.labels["kind"]: s.value for m in metrics.registry.collect()
               if m.name == "callgate_reconcile_mismatches" for s in m.samples
               if s.name.endswith("_total")}
    assert counted == {"unreadable": 1.0, "charged_differently": 1.0,
                       "missing_in_ledger": 1.0}


async def test_a_pending_row_is_dropped_after_its_maximum_age(
        ledger: Any, tmp_path: Path) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await answered(ledger, "c1")
    (tmp_path / "Master.csv").write_text(fs_row("c1", 58, at(5), at(63)))
    source = source_for(ledger, tmp_path, clock, pending_max_age=60)
    assert (await source.step()).pending == 1
    await clock.advance(61)
    report = await source.step()
    assert (report.outcomes, report.pending) == ({"dropped": 1}, 0)


@pytest.mark.parametrize("cut", [10, 40, 81])
async def test_a_row_split_by_a_partial_write_is_applied_once(
        ledger: Any, tmp_path: Path, cut: int) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 1, D("0.13"), 60, at(5))
    await ledger.settle_call(cdr("c1", "0.13", flags=("ended_while_away",
                                                      "billsec_assumed_paid")))
    row = fs_row("c1", 61, at(5), at(66))
    path = tmp_path / "Master.csv"
    path.write_text(row[:cut])
    source = source_for(ledger, tmp_path, clock)
    assert (await source.step()).outcomes == {}
    with open(path, "a") as out:
        out.write(row[cut:])
    assert (await source.step()).outcomes == {"corrected": 1}
    assert (await source.step()).outcomes == {}
    assert (await ledger.call_cdr("c1")).charged == D("0.26")


async def test_a_lasting_failure_is_logged_once_and_the_source_goes_on(
        ledger: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 1, D("0.13"), 60, at(5))
    await ledger.settle_call(cdr("c1", "0.13", flags=("ended_while_away",
                                                      "billsec_assumed_paid")))
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state directory should be")
    source = CdrSource(ledger=ledger, path=tmp_path / "Master.csv",
                       layout=preset("freeswitch-csv"), state_path=blocked / "cdr.json",
                       clock=clock, poll_seconds=0.01)
    task = asyncio.create_task(source.run())
    await asyncio.sleep(0.05)  # following the file before the PBX writes the row
    (tmp_path / "Master.csv").write_text(fs_row("c1", 61, at(5), at(66)))
    await asyncio.sleep(0.3)  # many polls, each failing to save its position
    blocked.unlink()
    blocked.mkdir()
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    out = capsys.readouterr().out
    assert out.count("cdr.poll_failed") == 1 and "cdr.poll_recovered" in out
    assert (await ledger.call_cdr("c1")).charged == D("0.26")  # applied once, replayed since
    assert (blocked / "cdr.json").exists()


async def test_only_the_very_first_start_skips_an_existing_file(
        ledger: Any, tmp_path: Path) -> None:
    """First start with no CDR file yet; killed; the PBX writes a row; the restart reads it."""
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 1, D("0.13"), 60, at(5))
    await ledger.settle_call(cdr("c1", "0.13", flags=("ended_while_away",
                                                      "billsec_assumed_paid")))
    state, path = tmp_path / "cdr.json", tmp_path / "Master.csv"

    def fresh() -> CdrSource:
        return CdrSource(ledger=ledger, path=path, layout=preset("freeswitch-csv"),
                         state_path=state, clock=clock)

    assert (await fresh().step()).read == 0  # no file yet
    assert state.exists()
    path.write_text(fs_row("c1", 61, at(5), at(66)))  # while the agent is down
    assert (await fresh().step()).outcomes == {"corrected": 1}
    # A first start ever, on a file with history: that is for reconcile --apply.
    state.unlink()
    with open(path, "a") as out:
        out.write(fs_row("c2", 61, at(5), at(66)))
    assert (await fresh().step()).outcomes == {}


async def test_a_closed_account_is_refused_and_counted(ledger: Any, tmp_path: Path) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 1, D("0.13"), 60, at(5))
    assert await ledger.hold("c1", 2, D("0.13"), 120, at(60))
    await ledger.settle_call(cdr("c1", "0.26", billsec=120, billed_seconds=120, ended_at=at(200),
                                 flags=("ended_while_away", "billsec_assumed_paid")))
    await ledger.refund("acme", ref="R1", at=at(300))
    (tmp_path / "Master.csv").write_text(fs_row("c1", 58, at(5), at(63)))
    metrics = Metrics()
    report = await source_for(ledger, tmp_path, clock, metrics).step()
    assert (report.outcomes, report.pending) == ({"refused": 1}, 0)
    assert metrics.reconcile_mismatches.labels("refused")._value.get() == 1
    assert (await ledger.call_cdr("c1")).pbx_billsec is None


DAMAGED = [  # each a freeswitch-csv row some field of which no PBX writes
    '"d1","","c","5","d","253402300800","0","253402300900","3","1","N","s","b"',
    '"d2","","c","5","d","1e999999999","0","1","3","1","N","s","b"',
    '"d3","","c","5","d","1","1","2","","1e30","N","s","b"',
    '"d4","","c","5","d","1","1","2","3","-1","N","s","b"',
    '"d5","","c","5","d","1","1","2","3","١","N","s","b"',
    '"d\x006","","c","5","d","1","1","2","3","1","N","s","b"',
    '"d7","","c","' + "5" * 5000 + '","d","1","1","2","3","1","N","s","b"',
    '"d8","","c","5","d","1","1","2","3","99","N","s","b"',  # billsec > duration
]


async def provisional(ledger: Any, call_id: str) -> None:
    await answered(ledger, call_id)
    assert await ledger.hold(call_id, 1, D("0.13"), 60, at(5))
    await ledger.settle_call(cdr(call_id, "0.13", flags=("ended_while_away",
                                                         "billsec_assumed_paid")))


async def test_damaged_rows_are_reported_and_never_cost_the_other_rows(
        ledger: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await provisional(ledger, "c1")
    await provisional(ledger, "c2")
    (tmp_path / "Master.csv").write_text(
        fs_row("c1", 61, at(5), at(66)) + "".join(f"{line}\n" for line in DAMAGED)
        + "x" * 70_000 + "\n"  # longer than a line may be
        + fs_row("c2", 61, at(5), at(66)))
    metrics = Metrics()
    source = source_for(ledger, tmp_path, clock, metrics)
    report = await source.step()
    damaged = len(DAMAGED) + 1
    assert report.outcomes == {"unreadable": damaged, "corrected": 2}
    assert report.pending == 0
    for call_id in ("c1", "c2"):
        assert (await ledger.call_cdr(call_id)).charged == D("0.26")
    assert metrics.reconcile_mismatches.labels("unreadable")._value.get() == damaged
    logged = [x for x in capsys.readouterr().out.splitlines() if "cdr.unreadable_row" in x]
    assert len(logged) == damaged
    assert f"line {damaged + 1}: longer than 65536 bytes" in "".join(logged)
    for n in range(2, damaged + 2):  # file, line number, field; values clipped
        [line] = [x for x in logged if f"Master.csv line {n}: " in x]
        assert f"Master.csv line {n}: " in line and len(line) < 400, line
    assert (await source.step()).outcomes == {}  # reported once, not read again


class Flaky:
    """A ledger whose call_cdr fails unexpectedly (a bug, not an outage) for some calls."""

    def __init__(self, ledger: Any, failing: set[str]) -> None:
        self._ledger, self.failing = ledger, failing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def call_cdr(self, call_id: str) -> Any:
        if call_id in self.failing:
            raise RuntimeError(f"injected failure for {call_id}")
        return await self._ledger.call_cdr(call_id)


async def test_an_unexpected_failure_loses_no_row_and_stops_no_other(
        ledger: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    for call_id in ("c1", "c2", "c3"):
        await provisional(ledger, call_id)
    (tmp_path / "Master.csv").write_text(
        "".join(fs_row(c, 61, at(5), at(66)) for c in ("c1", "c2", "c3")))
    flaky = Flaky(ledger, {"c2"})
    source = source_for(flaky, tmp_path, clock)
    report = await source.step()
    assert (report.outcomes, report.pending) == ({"corrected": 2, "failed": 1}, 1)
    assert (await source.step()).outcomes == {"failed": 1}  # tried again, logged once
    assert capsys.readouterr().out.count("cdr.row_failed") == 1
    # A restart keeps it too (the pending line is in the saved state).
    source = source_for(flaky, tmp_path, clock)
    assert (await source.step()).outcomes == {"failed": 1}
    flaky.failing.clear()
    assert (await source.step()).outcomes == {"corrected": 1}
    for call_id in ("c1", "c2", "c3"):
        assert (await ledger.call_cdr(call_id)).charged == D("0.26")
    assert await ledger.audit() == []


async def test_a_failure_outside_any_row_keeps_every_line_read(
        ledger: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever fails after the read, the lines stay the source's: the next poll has them."""
    from agent.cdr import source as source_module

    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await provisional(ledger, "c1")
    (tmp_path / "Master.csv").write_text(fs_row("c1", 61, at(5), at(66)))
    source = source_for(ledger, tmp_path, clock)

    def broken(rows: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(source_module, "merge_rows", broken)
    with pytest.raises(RuntimeError):
        await source.step()
    monkeypatch.undo()
    report = await source.step()
    assert (report.read, report.outcomes) == (0, {"corrected": 1})
    assert (await ledger.call_cdr("c1")).charged == D("0.26")


async def test_the_loop_logs_an_unexpected_error_once_and_goes_on(
        ledger: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await provisional(ledger, "c1")
    source = source_for(ledger, tmp_path, clock, poll_seconds=0.01)
    calls = 0
    real = source.step

    async def step() -> Any:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise KeyError("injected")  # not a ledger, OS or format error
        return await real()

    monkeypatch.setattr(source, "step", step)
    task = asyncio.create_task(source.run())
    (tmp_path / "Master.csv").write_text(fs_row("c1", 61, at(5), at(66)))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if (await ledger.call_cdr("c1")).pbx_billsec is not None:
            break
    await asyncio.sleep(0.05)  # the poll that applied it returns: "recovered"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    out = capsys.readouterr().out
    assert out.count("cdr.poll_failed") == 1 and "cdr.poll_recovered" in out
    assert (await ledger.call_cdr("c1")).charged == D("0.26")


async def test_a_correction_above_max_posting_is_refused_not_retried(
        ledger: Any, tmp_path: Path) -> None:
    clock = SimClock(datetime(2026, 3, 2, 1, 10, tzinfo=UTC))
    await funded(ledger)
    await provisional(ledger, "c1")
    ledger.max_posting = D("1")
    (tmp_path / "Master.csv").write_text(fs_row("c1", 6000, at(5), at(6005)))
    metrics = Metrics()
    report = await source_for(ledger, tmp_path, clock, metrics).step()
    assert (report.outcomes, report.pending) == ({"refused": 1}, 0)
    assert metrics.reconcile_mismatches.labels("refused")._value.get() == 1
    assert (await ledger.call_cdr("c1")).pbx_billsec is None


async def test_a_vanished_call_is_settled_from_the_cdr_when_it_arrives(tmp_path: Path) -> None:
    """Issue 15 item 3: the meter settles a call whose hang-up was lost with the PBX link
    as ``vanished`` (what was paid); its CDR row then brings it to rate(pbx billsec)."""
    h = await Harness(tmp_path, START).start()
    try:
        await h.topup("a0", "10")
        _, call = await h.dial(talk=100, ring=1)
        await h.advance(50)
        h.pbx.disconnect()
        await h.clock.advance(100)  # the PBX ends it at its deadline; the event is lost
        h.pbx.reconnect()
        await h.advance(10)
        settled = await h.cdr(call.info.call_id)
        assert "vanished" in settled.flags and settled.amount == D("0.13")
        assert call.billsec == 62 and settled.pbx_billsec is None
        (tmp_path / "Master.csv").write_text(sim_row(call))
        report = await source_for(h.ledger, tmp_path, h.clock).step()
        assert report.outcomes == {"corrected": 1}
        settled = await h.cdr(call.info.call_id)
        assert settled.pbx_billsec == 62
        assert settled.charged == rate(Tariff("t", D("0.13"), 60, 60), 62) == D("0.26")
        assert await h.ledger.audit() == []
        await h.check_invariants()
    finally:
        await h.stop()
