"""The early warning (pure): rolling window, minimum sample, edge-triggered alerts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from agent.compliance.risk import RiskMonitor
from agent.gate.policy import RiskLimits

T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
LIMITS = RiskLimits(window=600, short_call_seconds=6, max_short_call_percent=40,
                    min_answer_percent=50, min_calls=5)


def feed(monitor: RiskMonitor, calls: list[tuple[int, bool, int]]) -> list:
    alerts = []
    for second, answered, billsec in calls:
        alerts += monitor.observe(LIMITS, "acme", T0 + timedelta(seconds=second), answered,
                                  billsec)
    return alerts


def test_no_alert_below_the_minimum_sample():
    m = RiskMonitor()
    assert feed(m, [(i, False, 0) for i in range(4)]) == []  # 0 % answered, but only 4 calls
    (alert,) = feed(m, [(4, False, 0)])
    assert (alert.kind, alert.state, alert.value, alert.limit) == (
        "answer_rate", "raised", Decimal("0.0"), 50)


def test_short_call_share_crosses_once_and_clears_once():
    m = RiskMonitor()
    # 5 answered calls: 2 short (5 s) = 40 %: not above the limit
    assert feed(m, [(0, True, 5), (1, True, 5), (2, True, 6), (3, True, 60), (4, True, 60)]) \
        == []
    (raised,) = feed(m, [(5, True, 1)])  # 3 of 6 = 50 %
    assert (raised.kind, raised.state, raised.value) == ("short_calls", "raised",
                                                        Decimal("50.0"))
    assert feed(m, [(6, True, 2)]) == []  # still raised: no repeat
    assert m.raised("acme", "short_calls")
    cleared = feed(m, [(7 + i, True, 120) for i in range(5)])
    assert [(a.kind, a.state) for a in cleared] == [("short_calls", "cleared")]
    payload = raised.payload(LIMITS)
    assert payload["percent"] == Decimal("50.0") and payload["window_seconds"] == 600


def test_calls_leave_the_window():
    m = RiskMonitor()
    feed(m, [(i, False, 0) for i in range(5)])
    assert m.raised("acme", "answer_rate")
    # 601 s later the unanswered burst is out of the 600 s window
    alerts = feed(m, [(605 + i, True, 60) for i in range(5)])
    assert [(a.kind, a.state) for a in alerts] == [("answer_rate", "cleared")]
    reading = m.reading("acme")
    assert (reading.calls, reading.answered, reading.short) == (5, 5, 0)
    assert reading.answer_percent == Decimal("100.0")


def test_accounts_are_watched_separately():
    m = RiskMonitor()
    for i in range(5):
        m.observe(LIMITS, "beta", T0 + timedelta(seconds=i), True, 60)
    feed(m, [(i, False, 0) for i in range(5)])
    assert m.raised("acme", "answer_rate") and not m.raised("beta", "answer_rate")
    assert [r.account for r in m.readings()] == ["acme", "beta"]


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def publish(self, topic: str, payload: dict) -> None:
        self.events.append((topic, payload))


def test_the_daemon_feeds_settled_calls_to_the_warning(tmp_path):
    """call/end events reach the monitor; a crossing is one ``risk`` event and the metrics."""
    from types import SimpleNamespace

    from agent.daemon import Daemon
    from agent.meter.clock import SimClock
    from agent.metrics import Metrics
    from tests.gate_helpers import BASE, policy_from

    daemon = Daemon(SimpleNamespace(node="t1"), clock=SimClock(T0))  # type: ignore[arg-type]
    daemon.policy = policy_from(tmp_path, BASE + "risk: {window: 10m, min_calls: 5, "
                                "min_answer_percent: 50}\n")
    daemon.publisher = _Recorder()
    daemon.metrics = Metrics()
    for i in range(5):
        daemon._publish("call/end", {"call_id": f"c{i}", "account": "acme",
                                     "answered_at": None, "billsec": 0})
    topics = [t for t, _ in daemon.publisher.events]
    assert topics == ["call/end"] * 5 + ["risk"]
    risk = daemon.publisher.events[-1][1]
    assert (risk["account"], risk["kind"], risk["state"], risk["calls"]) == (
        "acme", "answer_rate", "raised", 5)
    text = daemon.metrics.exposition().decode()
    assert 'callgate_risk_alert{account="acme",kind="answer_rate"} 1.0' in text
    assert 'callgate_risk_answer_percent{account="acme"} 0.0' in text
