"""Property tests for the gate's pure pieces: windows, prefix tables, DNC sets, normalisation."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.gate.dnc import DncSet, load_file
from agent.gate.hours import CallingHours, Window
from agent.gate.numbers import Normalizer, PrefixTable

digits = st.text(alphabet="0123456789", min_size=1, max_size=12)
seconds_of_day = st.integers(min_value=0, max_value=86400)


@st.composite
def windows(draw):
    cuts = sorted(draw(st.sets(seconds_of_day, min_size=0, max_size=6)))
    pairs = [Window(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    return tuple(pairs)


@given(week=st.lists(windows(), min_size=7, max_size=7),
       instant=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1),
                            timezones=st.just(UTC)),
       tz=st.sampled_from(["Asia/Shanghai", "UTC", "Europe/Berlin", "America/New_York"]))
def test_window_membership_matches_brute_force(week, instant, tz):
    zone = ZoneInfo(tz)
    hours = CallingHours(zone, tuple(week), frozenset())
    local = instant.astimezone(zone)
    second = local.hour * 3600 + local.minute * 60 + local.second
    expected = any(w.start <= second < w.end for w in week[local.weekday()])
    # Wall-clock membership is the truth away from a DST change (the DST cases are
    # pinned in tests/test_gate_hours.py).
    steady = all((instant + timedelta(hours=h)).astimezone(zone).utcoffset()
                 == local.utcoffset() for h in range(-26, 27))
    if steady:
        assert hours.is_open(instant) == expected
    left = hours.seconds_to_close(instant)
    if hours.is_open(instant):
        assert left is not None and left >= 0
        # inside until the close, and the close is outside (joined windows: no gap)
        if steady and left >= 1:
            assert hours.is_open(instant + timedelta(seconds=left - 1))
        close = hours.close_at(instant)
        assert close is not None and not hours.is_open(close)
    else:
        assert left is None


@given(st.dates(min_value=date(2020, 1, 1), max_value=date(2035, 1, 1)))
def test_closed_dates_are_local_days(day):
    tz = ZoneInfo("Asia/Shanghai")
    hours = CallingHours(tz, ((),) * 7, frozenset({day}))
    start = datetime.combine(day, datetime.min.time(), tzinfo=tz)
    assert hours.is_closed_date(start)
    assert hours.is_closed_date(start + timedelta(hours=23, minutes=59, seconds=59))
    assert not hours.is_closed_date(start - timedelta(seconds=1))
    assert not hours.is_closed_date(start + timedelta(days=1))


@given(st.dictionaries(digits, st.integers(), max_size=30), digits)
def test_prefix_table_longest_match_matches_brute_force(entries, number):
    table = PrefixTable(entries)
    matches = [p for p in entries if number.startswith(p)]
    hit = table.longest(number)
    if not matches:
        assert hit is None
    else:
        best = max(matches, key=len)
        assert hit == (best, entries[best])


@given(st.sets(digits, max_size=200), st.lists(digits, max_size=50))
def test_dnc_set_membership_equals_set_membership(numbers, probes):
    dnc = DncSet.of(numbers)
    assert len(dnc) == len(numbers)
    for n in list(numbers) + probes:
        assert (n in dnc) == (n in numbers)


@settings(max_examples=30)
@given(st.sets(st.text(alphabet="0123456789", min_size=5, max_size=15), max_size=100))
def test_dnc_file_round_trip(tmp_path_factory, numbers):
    path = tmp_path_factory.mktemp("dnc") / "list.txt"
    path.write_text("".join(f"{n}\n" for n in numbers))
    dnc = load_file(path, Normalizer.build(["+86"], "00"))
    assert all(n in dnc for n in numbers) and len(dnc) == len(numbers)


def test_leading_zeros_stay_distinct():
    dnc = DncSet.of(["01012345678"])
    assert "01012345678" in dnc and "1012345678" not in dnc


@given(digits)
def test_normalisation_strips_national_prefix_once(rest):
    normalize = Normalizer.build(["+86", "0086"], "00")
    assert normalize("+86" + rest) == rest
    assert normalize("0086" + rest) == rest
    assert normalize("+1" + rest) == "001" + rest
    assert normalize("86-" + rest) == "86" + rest  # bare 86 is not stripped unless configured
