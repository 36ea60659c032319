"""The low-balance warning: once per crossing, after settlements, holds and finance postings."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from agent.meter.low_balance import LowBalanceAlarm
from agent.meter.meter import MeterSettings
from tests.meter_harness import Harness, policy_text

START = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
TWENTY = policy_text().replace('low_balance_warning: "0"', 'low_balance_warning: "20"')


def test_the_alarm_fires_once_per_crossing_and_rearms_above_the_line():
    alarm = LowBalanceAlarm()
    line = Decimal(20)
    seen = [alarm.observe("a", Decimal(v), line) for v in
            ("25", "19.99", "14.87", "10", "20", "19", "19", "30", "5")]
    assert seen == [False, True, False, False, False, True, False, False, True]
    assert not alarm.observe("b", Decimal(-5), Decimal(0))  # no line: never


def lows(h):
    return [p for t, p in h.published if t == "balance/low"]


async def test_a_finance_posting_is_noticed_by_the_sweep(tmp_path):
    h = await Harness(tmp_path, START, TWENTY, MeterSettings(balance_check_interval=10)).start()
    try:
        await h.topup("a0", "30")
        await h.advance(11)
        assert lows(h) == []
        await h.penalty("a0", "15.13")  # a fine from the CLI: 14.87, below 20
        await h.advance(11)
        assert [(p["account"], Decimal(p["available"]), Decimal(p["threshold"]))
                for p in lows(h)] == [("a0", Decimal("14.87"), Decimal("20"))]
        _, sim = await h.dial(talk=3, ring=1)  # a 3 s call: no second warning
        await h.advance(60)
        assert sim is not None and sim.ended_at is not None and len(lows(h)) == 1
        await h.topup("a0", "10")  # back above: re-armed
        await h.advance(11)
        await h.penalty("a0", "10")
        await h.advance(11)
        assert len(lows(h)) == 2
        await h.check_invariants()
    finally:
        await h.stop()


async def test_a_settlement_that_crosses_the_line_warns_at_once(tmp_path):
    settings = MeterSettings(balance_check_interval=86400)  # no sweep in this test
    h = await Harness(tmp_path, START, TWENTY, settings).start()
    try:
        await h.topup("a0", "20.05")
        await h.advance(1)
        assert lows(h) == []
        _, sim = await h.dial(talk=3, ring=1)  # the gate holds 0.13; settled: 19.92
        await h.advance(30)
        assert sim is not None and sim.ended_at is not None
        assert [Decimal(p["available"]) for p in lows(h)] == [Decimal("19.92")]
        await h.check_invariants()
    finally:
        await h.stop()
