"""The in-memory live DNC copy (pure) and the sync shell that keeps it fresh."""

from __future__ import annotations

import asyncio
from array import array
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.compliance import live_dnc as live_module
from agent.compliance.dnc_sync import DncSync
from agent.compliance.live_dnc import LiveDnc
from agent.gate.dnc import number_key
from agent.ledger import LedgerUnavailable
from agent.ledger.compliance import GLOBAL, DncChange

T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)

accounts = st.sampled_from(["acme", "beta", GLOBAL])
numbers = st.text(alphabet="0123", min_size=1, max_size=4)


@settings(max_examples=200)
@given(base=st.lists(st.tuples(accounts, numbers), max_size=20, unique=True),
       ops=st.lists(st.tuples(accounts, numbers, st.booleans()), max_size=40),
       compact_after=st.integers(1, 10),
       probes=st.lists(st.tuples(st.sampled_from(["acme", "beta"]), numbers), max_size=20))
def test_the_copy_equals_a_set_of_entries(base, ops, compact_after, probes):
    model = set(base)
    keys: dict[str, array[int]] = {}
    for account, number in base:
        keys.setdefault(account, array("Q")).append(number_key(number))
    copy = LiveDnc()
    copy.load(5, keys)
    old = live_module.COMPACT_AFTER
    live_module.COMPACT_AFTER = compact_after  # fold overlays often: the compaction path too
    try:
        changes = [DncChange(6 + i, a, n, added) for i, (a, n, added) in enumerate(ops)]
        copy.apply(changes[: len(changes) // 2])
        copy.apply(changes)  # overlapping polls: already applied changes are skipped
    finally:
        live_module.COMPACT_AFTER = old
    for account, number, added in ops:
        if added:
            model.add((account, number))
        else:
            model.discard((account, number))
    assert len(copy) == len(model)
    for account, number in probes + [(a or "acme", n) for a, n in model]:
        expected = (account, number) in model or (GLOBAL, number) in model
        assert copy.listed(account, number) is expected
    assert copy.seq == (6 + len(ops) - 1 if ops else 5)


def test_changes_at_or_below_the_copy_seq_are_ignored():
    copy = LiveDnc()
    copy.load(10, {"acme": array("Q", [number_key("138")])})
    assert copy.apply([DncChange(9, "acme", "138", False)]) == 0
    assert copy.listed("acme", "138")
    assert copy.apply([DncChange(11, "acme", "138", False)]) == 1
    assert not copy.listed("acme", "138") and len(copy) == 0


def test_a_million_entries_cost_8_bytes_each():
    copy = LiveDnc()
    copy.load(1, {"acme": array("Q", range(10**12, 10**12 + 1_000_000))})
    assert copy.nbytes == 8_000_000 and len(copy) == 1_000_000
    assert copy.listed("acme", str(10**12 + 999_999)[1:])


class _FlakyLedger:
    """A ledger whose DNC reads can be made to fail (the sync's only calls)."""

    def __init__(self) -> None:
        self.down = False
        self.log: list[DncChange] = []

    async def dnc_snapshot(self) -> Any:
        if self.down:
            raise LedgerUnavailable("down")
        keys: dict[str, array[int]] = {}
        return (self.log[-1].seq if self.log else 0), keys

    async def dnc_changes(self, after: int, limit: int = 10_000) -> list[DncChange]:
        if self.down:
            raise LedgerUnavailable("down")
        return [c for c in self.log if c.seq > after][:limit]


async def test_an_unreachable_ledger_keeps_the_last_copy_and_catches_up():
    ledger = _FlakyLedger()
    ticks = [0.0]
    sync = DncSync(ledger, interval=0.01, monotonic=lambda: ticks[0])  # type: ignore[arg-type]
    ledger.down = True
    task = asyncio.create_task(sync.run())
    await asyncio.sleep(0.05)
    assert not sync.loaded and sync.age() == float("inf")  # never loaded: not ready
    ledger.down = False
    ledger.log.append(DncChange(1, "acme", "13800138000", True))
    await asyncio.sleep(0.05)
    assert sync.loaded  # the snapshot said seq 1 but carried no keys; the entry comes next
    ledger.log.append(DncChange(2, "acme", "13900139000", True))
    await asyncio.sleep(0.05)
    assert sync.live.listed("acme", "13900139000")
    ledger.down = True
    ticks[0] = 30.0
    await asyncio.sleep(0.05)
    assert sync.live.listed("acme", "13900139000")  # still in force
    assert sync.age() == 30.0
    ledger.log.append(DncChange(3, GLOBAL, "13700137000", True))
    ledger.down = False
    await asyncio.sleep(0.05)
    assert sync.live.listed("beta", "13700137000") and sync.age() == 0.0
    task.cancel()


def test_a_change_that_is_not_ascii_digits_is_passed_over():
    copy = LiveDnc()
    copy.load(1, {})
    changes = [DncChange(2, "acme", "¹²³", True), DncChange(3, "acme", "١٢٣٤٥", True),
               DncChange(4, "acme", "13800138000", True)]
    assert copy.apply(changes) == 1  # a row an older ledger let in must not stop the sync
    assert copy.seq == 4 and len(copy) == 1
    assert copy.listed("acme", "13800138000")
    copy.apply([DncChange(5, "acme", "12345", True)])
    assert copy.listed("acme", "12345") and not copy.listed("acme", "١٢٣٤٥")


class _BuggyLedger(_FlakyLedger):
    """Fails its first polls with an error that is no outage (a bug somewhere)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def dnc_changes(self, after: int, limit: int = 10_000) -> list[DncChange]:
        if self.failures:
            self.failures -= 1
            raise ValueError("invalid literal for int() with base 10: '1¹²³'")
        return await super().dnc_changes(after, limit)


async def test_any_error_is_logged_once_and_the_sync_goes_on():
    ledger = _BuggyLedger(failures=3)
    sync = DncSync(ledger, interval=0.01)  # type: ignore[arg-type]
    with capture_logs() as logs:
        task = asyncio.create_task(sync.run())
        await asyncio.sleep(0.1)
        ledger.log.append(DncChange(1, "acme", "13800138000", True))
        await asyncio.sleep(0.05)
        assert not task.done()
        assert sync.live.listed("acme", "13800138000")
        task.cancel()
    events = [e["event"] for e in logs]
    assert events.count("dnc.sync_failed") == 1 and "dnc.sync_restored" in events
    (failed,) = [e for e in logs if e["event"] == "dnc.sync_failed"]
    assert failed["log_level"] == "error" and "1¹²³" in failed["error"]
