"""The close under ``at_window_end: cut``: absolute time across DST, joined windows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.gate.decide import decide
from agent.gate.decision import Reason
from agent.gate.hours import CallingHours, Window, parse_time_of_day
from tests.gate_helpers import BASE, call, local, policy_from, rich


def every_day(*windows: tuple[str, str]) -> tuple[tuple[Window, ...], ...]:
    day = tuple(Window(parse_time_of_day(a), parse_time_of_day(b)) for a, b in windows)
    return (day,) * 7


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# (zone, window, now (UTC), true seconds to the close). Each instant is inside a
# window whose end is moved by a DST change before it is reached.
DST_CASES = [
    # New York, spring 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z): 02:30 never shows;
    # the window ends when the clock jumps past it.
    ("America/New_York", ("01:30", "02:30"), "2026-03-08T06:30:00", 1800),
    ("America/New_York", ("00:00", "04:00"), "2026-03-08T05:00:00", 3 * 3600),
    # New York, autumn 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z): 01:30 shows twice;
    # the window runs until 02:30 EST (07:30Z).
    ("America/New_York", ("01:30", "02:30"), "2026-11-01T05:30:00", 7200),
    ("America/New_York", ("01:30", "02:30"), "2026-11-01T06:30:00", 3600),
    ("America/New_York", ("00:00", "03:00"), "2026-11-01T04:00:00", 4 * 3600),
    # Berlin, spring 2026-03-29 02:00 CET -> 03:00 CEST (01:00Z).
    ("Europe/Berlin", ("01:00", "04:00"), "2026-03-29T00:00:00", 2 * 3600),
    ("Europe/Berlin", ("01:30", "02:30"), "2026-03-29T00:45:00", 900),
    # Berlin, autumn 2026-10-25 03:00 CEST -> 02:00 CET (01:00Z).
    ("Europe/Berlin", ("01:00", "04:00"), "2026-10-24T23:00:00", 4 * 3600),
    ("Europe/Berlin", ("02:00", "02:30"), "2026-10-25T00:10:00", 3600 + 1200),
    # Sydney, spring 2026-10-04 02:00 AEST -> 03:00 AEDT (16:00Z the day before).
    ("Australia/Sydney", ("01:00", "04:00"), "2026-10-03T15:00:00", 2 * 3600),
    # Sydney, autumn 2026-04-05 03:00 AEDT -> 02:00 AEST (16:00Z the day before).
    ("Australia/Sydney", ("01:00", "04:00"), "2026-04-04T14:00:00", 4 * 3600),
    # Lord Howe: a half-hour change. Spring 2026-10-04 02:00 -> 02:30 (15:30Z).
    ("Australia/Lord_Howe", ("01:00", "03:00"), "2026-10-03T14:30:00", 3600 + 1800),
    # Lord Howe, autumn 2026-04-05 02:00 +11 -> 01:30 +10:30 (15:00Z the day before).
    ("Australia/Lord_Howe", ("01:00", "03:00"), "2026-04-04T14:00:00", 2 * 3600 + 1800),
]


@pytest.mark.parametrize(("zone", "window", "now", "left"), DST_CASES)
def test_close_is_absolute_time_across_dst(zone, window, now, left):
    hours = CallingHours(ZoneInfo(zone), every_day(window), frozenset())
    instant = utc(now)
    assert hours.is_open(instant)
    assert hours.seconds_to_close(instant) == left
    close = hours.close_at(instant)
    assert close == instant + timedelta(seconds=left)
    assert not hours.is_open(close)  # the close is outside
    assert hours.is_open(close - timedelta(seconds=1))


def test_decide_cut_across_the_new_york_gap(tmp_path):
    text = BASE.replace("accounts:", """defaults:
  timezone: America/New_York
  at_window_end: cut
  calling_hours: [{days: all, windows: [{start: "01:30", end: "02:30"}]}]
accounts:""")
    p = policy_from(tmp_path, text)
    d = decide(p, rich("100"), call(), utc("2026-03-08T06:30:00"))
    assert d.allow and d.until_close == 1800


@pytest.mark.parametrize(("windows", "now", "left"), [
    # adjacent entries on one day
    ([("08:00", "12:00"), ("12:00", "19:30")], "2026-11-24T11:59:00", 7.5 * 3600 + 60),
    # overlapping entries
    ([("08:00", "13:00"), ("12:00", "19:30")], "2026-11-24T09:00:00", 10.5 * 3600),
])
def test_adjacent_and_overlapping_windows_are_joined(windows, now, left):
    hours = CallingHours(ZoneInfo("Asia/Shanghai"), every_day(*windows), frozenset())
    assert hours.seconds_to_close(local(now)) == left


def test_windows_across_midnight_and_days_are_joined(tmp_path):
    text = BASE.replace("accounts:", """defaults:
  at_window_end: cut
  calling_hours:
    - {days: [mon], windows: [{start: "00:00", end: "24:00"}]}
    - {days: [tue], windows: [{start: "00:00", end: "00:30"}]}
accounts:""")
    p = policy_from(tmp_path, text)
    # 2026-11-23 is a Monday: the close is Tuesday 00:30, not Monday midnight.
    d = decide(p, rich("100"), call(), local("2026-11-23T23:00:00"))
    assert d.allow and d.until_close == 5400


def test_a_saturday_window_beside_the_all_days_one(tmp_path):
    text = BASE.replace("accounts:", """defaults:
  at_window_end: cut
  calling_hours:
    - {days: all, windows: [{start: "08:00", end: "19:30"}]}
    - {days: [sat], windows: [{start: "09:00", end: "21:00"}]}
accounts:""")
    p = policy_from(tmp_path, text)
    sat = local("2026-11-28T19:00:00")  # a Saturday
    assert decide(p, rich("100"), call(), sat).until_close == 2 * 3600
    assert decide(p, rich("100"), call(), local("2026-11-27T19:00:00")).until_close == 1800


def test_hours_open_all_week_never_close_within_the_horizon():
    hours = CallingHours(ZoneInfo("Asia/Shanghai"), every_day(("00:00", "24:00")), frozenset())
    left = hours.seconds_to_close(local("2026-11-24T12:00:00"))
    assert left is not None and left > 6 * 86400


def test_a_closed_date_ends_the_open_period_at_its_midnight():
    hours = CallingHours(ZoneInfo("Asia/Shanghai"), every_day(("00:00", "24:00")),
                         frozenset({date(2026, 11, 25)}))
    assert hours.seconds_to_close(local("2026-11-24T23:00:00")) == 3600


# -- never ALLOW with nothing to talk --------------------------------------------------

CUT = BASE.replace("accounts:", "defaults:\n  at_window_end: cut\naccounts:")


@pytest.mark.parametrize("at", ["2026-11-24T19:29:59.500000", "2026-11-24T19:29:59",
                                "2026-11-24T19:29:01"])
def test_no_allow_without_the_first_increment_before_the_close(tmp_path, at):
    p = policy_from(tmp_path, CUT)
    d = decide(p, rich("100"), call(), local(at))
    assert not d.allow and d.reason is Reason.OUTSIDE_HOURS
    assert "close in" in d.message


def test_min_call_seconds_lowers_the_minimum(tmp_path):
    p = policy_from(tmp_path, CUT.replace("at_window_end: cut",
                                          "at_window_end: cut\n  min_call_seconds: 20"))
    d = decide(p, rich("100"), call(), local("2026-11-24T19:29:30"))
    assert d.allow and d.max_seconds == 30 and d.until_close == 30
    d = decide(p, rich("100"), call(), local("2026-11-24T19:29:45"))
    assert not d.allow and d.reason is Reason.OUTSIDE_HOURS


def test_fail_open_under_cut_also_needs_the_minimum(tmp_path):
    text = CUT.replace("version: 1\n", "version: 1\nprepaid: {fail_mode: open}\n")
    p = policy_from(tmp_path, text)
    d = decide(p, rich(None), call(), local("2026-11-24T19:29:59.500000"))
    assert not d.allow and d.reason is Reason.OUTSIDE_HOURS


# -- the meter's hard stop is the same close -------------------------------------------

async def test_the_meter_cuts_at_the_true_close_across_a_dst_gap(tmp_path):
    from tests.meter_harness import Harness, policy_text

    text = policy_text(extra_defaults="  at_window_end: cut\n  timezone: America/New_York\n")
    text = text.replace('"00:00", end: "24:00"', '"01:30", end: "02:30"')
    h = await Harness(tmp_path, utc("2026-03-08T06:30:00"), text).start()
    try:
        await h.topup("a0", "100")
        _, sim = await h.dial(talk=3 * 3600, ring=0)
        await h.advance(4 * 3600)
        assert sim is not None and sim.billsec == 1800  # 07:00Z, not 07:30Z
        cdr = await h.cdr(sim.info.call_id)
        assert cdr.cut_off
        await h.check_invariants()
    finally:
        await h.stop()


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(0, 7 * 86400 * 1000), increment=st.sampled_from([1, 6, 30, 60]),
       windows=st.lists(st.tuples(st.integers(0, 95), st.integers(1, 96)), min_size=1,
                        max_size=4),
       near_end=st.one_of(st.none(), st.tuples(st.integers(0, 6), st.integers(0, 3),
                                               st.integers(0, 120_000))))
def test_never_allowed_with_nothing_to_talk(tmp_path_factory, seconds, increment, windows,
                                            near_end):
    """Whatever the hours, the time and the increment: an allowed call has a limit > 0.
    Half the examples fall in the last two minutes before a window's end (day,
    window, milliseconds before it), where a 0-second allow would be."""
    spans = [(a * 900, b * 900) for a, b in windows if a < b]
    if not spans:
        return
    listed = ", ".join(f'{{start: "{_hm(a)}", end: "{_hm(b)}"}}' for a, b in spans)
    text = f"""\
version: 1
tariffs: {{standard: {{rate: "0.13", increment: {increment}, minimum: {increment}}}}}
defaults:
  at_window_end: cut
  calling_hours: [{{days: all, windows: [{listed}]}}]
accounts:
  acme: {{name: ACME, caller_ids: ["02158880000"]}}
"""
    p = policy_from(tmp_path_factory.mktemp("p"), text)
    now = utc("2026-11-23T00:00:00") + timedelta(milliseconds=seconds)
    if near_end is not None:
        day, which, before_ms = near_end
        end = spans[which % len(spans)][1]
        now = (local("2026-11-23T00:00:00") + timedelta(days=day, seconds=end)
               - timedelta(milliseconds=before_ms))
    for balance in ("100", None):
        d = decide(p, rich(balance), call(), now)
        if d.allow:
            assert d.max_seconds is not None and d.max_seconds > 0
            assert d.until_close is not None and d.until_close >= increment


def _hm(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


async def test_the_live_gate_refuses_a_call_too_close_to_the_close(tmp_path):
    from tests.meter_harness import Harness, policy_text

    text = policy_text(extra_defaults="  at_window_end: cut\n").replace(
        '"00:00", end: "24:00"', '"08:00", end: "19:30"')
    h = await Harness(tmp_path, local("2026-11-24T19:29:59.500000"), text).start()
    try:
        await h.topup("a0", "10")
        decision, sim = await h.dial(talk=30, ring=0)
        assert not decision.allow and decision.reason is Reason.OUTSIDE_HOURS and sim is None
        assert (await h.ledger.balance("a0")).held == 0  # nothing held
        assert await h.ledger.live_calls() == []
    finally:
        await h.stop()
