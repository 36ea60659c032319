"""The low-balance warning: once per crossing, after settlements, holds and finance postings."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_agent_config
from agent.ledger import open_ledger
from agent.meter.low_balance import LowBalanceAlarm
from agent.meter.meter import MeterSettings
from agent.yamlfile import ConfigError
from tests.daemon_harness import free_port, scrape_metrics, sim_port, simulator, write_config
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


# -- one periodic read of every balance, shared with the metrics' gauges ------------------

BASE = ("node: n1\npolicy: policy.yaml\nstate_directory: state\n"
        "pbx: {kind: asterisk, ami: {secret: x}}\n")


def test_the_sweep_interval_is_a_validated_config_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(BASE)
    assert load_agent_config(path).spec.meter.balance_check_seconds == 10
    path.write_text(BASE + "meter: {balance_check_seconds: 60}\n")
    assert load_agent_config(path).spec.meter.balance_check_seconds == 60
    for bad in ("0", "0.5", "7200", "'often'", "true"):  # true is not 1 second
        path.write_text(BASE + f"meter: {{balance_check_seconds: {bad}}}\n")
        with pytest.raises(ConfigError) as err:
            load_agent_config(path)
        assert "agent.yaml:5" in str(err.value) and "balance_check_seconds" in str(err.value)



async def test_the_daemon_reads_every_balance_once_per_period_for_warning_and_gauges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The low-balance sweep and the metrics' balance gauges used to read every balance
    each on its own timer; now each ledger read is a sweep that also sets the gauges."""
    import agent.daemon as daemon_module
    from agent.daemon import Daemon
    from agent.metrics import Metrics

    reads: list[float] = []
    refreshes: list[dict[str, Decimal]] = []
    opened = daemon_module.open_ledger

    async def counting_ledger(url: str) -> Any:
        ledger = await opened(url)
        real = ledger.balances

        async def balances() -> Any:
            reads.append(time.monotonic())
            return await real()

        ledger.balances = balances
        return ledger

    real_gauges = Metrics.account_balances

    def gauges(self: Metrics, available: Any, at: float | None = None) -> None:
        refreshes.append(dict(available))
        real_gauges(self, available, at)

    monkeypatch.setattr(daemon_module, "open_ledger", counting_ledger)
    monkeypatch.setattr(Metrics, "account_balances", gauges)
    gate_port, metrics_port = free_port(), free_port()
    async with simulator("asterisk", "s", gate_port) as sim:
        config = write_config(tmp_path, "asterisk", sim_port(sim), gate_port, "s",
                              extra=f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n")
        config.write_text(config.read_text().replace(
            "meter: {lead_seconds: 1}", "meter: {lead_seconds: 1, balance_check_seconds: 1}"))
        ledger = await open_ledger(f"sqlite://{tmp_path / 'ledger.db'}")
        await ledger.topup("acme", Decimal("5"), ref="t1", at=datetime.now(UTC))
        await ledger.close()
        daemon = Daemon(load_agent_config(config))
        run = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(30):
                while len(refreshes) < 3:
                    await asyncio.sleep(0.05)
            samples = await scrape_metrics(metrics_port)
        finally:
            daemon.request_stop()
            assert await asyncio.wait_for(run, 30) == 0
    assert len(reads) == len(refreshes) >= 3, (reads, refreshes)
    assert refreshes[0] == {"acme": Decimal("5")}
    assert samples['callgate_account_available_balance{account="acme"}'] == 5.0
    assert reads[2] - reads[0] >= 1.5  # the configured period, not a tight loop
