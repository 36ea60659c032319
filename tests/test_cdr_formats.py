"""CDR rows as real PBXs wrote them (tests/fixtures/cdr, sources in its README), parsed."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cdr.formats import CdrFormatError, make_layout, parse_lines, parse_row, preset
from agent.cdr.settle import merge_rows

FIXTURES = Path(__file__).parent / "fixtures" / "cdr"


def rows_of(name: str, layout: str) -> list:
    text = (FIXTURES / name).read_text()
    rows, errors = parse_lines(text.splitlines(), preset(layout), source=name)
    assert errors == []
    return rows


def test_asterisk_cdr_custom_rows() -> None:
    rows = rows_of("asterisk-cdr_custom.csv", "asterisk-custom")
    assert [(r.call_id, r.disposition, r.billsec, r.answered) for r in rows] == [
        ("1796289172.0", "ANSWERED", 2, True),
        ("1796289177.2", "BUSY", 0, False),
        ("1796289177.2", "BUSY", 0, False),
        ("1796289179.4", "NO ANSWER", 0, False),
        ("1796289179.4", "NO ANSWER", 0, False),
    ]
    answered = rows[0]
    assert (answered.accountcode, answered.caller, answered.destination, answered.context) == (
        "test", "1000", "5551234", "from-caller")
    assert answered.answer == datetime(2026, 12, 3, 9, 12, 52, 916726, tzinfo=UTC)
    assert answered.end == datetime(2026, 12, 3, 9, 12, 54, 923333, tzinfo=UTC)
    assert answered.duration == 2 and answered.line == 1
    assert rows[1].answer is None  # "0.000000": never answered


def test_asterisk_cdr_csv_rows_match_cdr_custom() -> None:
    """The same three calls through Asterisk's fixed cdr_csv layout (usegmtime = yes)."""
    csv_rows = rows_of("asterisk-cdr_csv.csv", "asterisk-csv")
    custom = rows_of("asterisk-cdr_custom.csv", "asterisk-custom")
    assert [(r.call_id, r.billsec, r.disposition, r.destination) for r in csv_rows] == [
        (r.call_id, r.billsec, r.disposition, r.destination) for r in custom]
    assert csv_rows[0].answer == datetime(2026, 12, 3, 9, 12, 52, tzinfo=UTC)  # whole seconds
    assert csv_rows[1].answer is None  # an empty field


def test_freeswitch_mod_cdr_csv_rows() -> None:
    rows = rows_of("freeswitch-mod_cdr_csv.csv", "freeswitch-csv")
    assert [(r.destination, r.disposition, r.billsec, r.answered) for r in rows] == [
        ("5551234", "NORMAL_CLEARING", 2, True),
        ("5551235", "USER_BUSY", 0, False),
        ("5551236", "NORMAL_CLEARING", 0, False),
    ]
    assert rows[0].call_id == "31c25c97-6f32-4394-bcf8-f3d7eff799ca"
    assert rows[0].answer == datetime.fromtimestamp(1796289195, UTC)
    assert rows[1].answer is None  # answer_epoch 0
    assert rows[0].accountcode == ""


def test_the_rows_of_one_asterisk_call_merge_into_one() -> None:
    merged = merge_rows(rows_of("asterisk-cdr_custom.csv", "asterisk-custom"))
    assert [(r.call_id, r.billsec, r.answered) for r in merged] == [
        ("1796289172.0", 2, True), ("1796289177.2", 0, False), ("1796289179.4", 0, False)]
    busy = merged[1]
    assert busy.end == datetime(2026, 12, 3, 9, 12, 57, 570457, tzinfo=UTC)  # the later row's


def test_local_stamps_take_the_layout_timezone() -> None:
    layout = preset("freeswitch-example", timezone="Asia/Shanghai")
    row = parse_row('"Agent","1000","5551234","default","2026-12-03 17:00:00",'
                    '"2026-12-03 17:00:05","2026-12-03 17:01:03","63","58","NORMAL_CLEARING",'
                    '"uuid-1","","acme","PCMU","PCMU"', layout)
    assert (row.call_id, row.accountcode, row.billsec) == ("uuid-1", "acme", 58)
    assert row.answer == datetime(2026, 12, 3, 9, 0, 5, tzinfo=UTC)


def test_a_custom_layout_by_pbx_variable_names() -> None:
    layout = make_layout("mine", ["uuid", "billsec", "destination_number", "answer_epoch"])
    row = parse_row("abc,61,13800138000,1796289195.5", layout)
    assert (row.call_id, row.billsec, row.destination) == ("abc", 61, "13800138000")
    assert row.answer == datetime(2026, 12, 3, 9, 13, 15, 500000, tzinfo=UTC)


@pytest.mark.parametrize(("columns", "message"), [
    (["billsec"], "no 'call_id'"),
    (["uuid", "uniqueid", "billsec"], "named twice"),
])
def test_bad_layouts_say_what_is_wrong(columns: list[str], message: str) -> None:
    with pytest.raises(CdrFormatError, match=message):
        make_layout("bad", columns)


def test_unknown_format_and_timezone() -> None:
    with pytest.raises(CdrFormatError, match="unknown CDR format 'nope'"):
        preset("nope")
    with pytest.raises(CdrFormatError, match="unknown timezone"):
        preset("asterisk-csv", timezone="Mars/Olympus")


@pytest.mark.parametrize(("line", "message"), [
    ('"a","b"', "line 7: 2 columns, but the 'freeswitch-csv' layout has 13"),
    ('"","","c","5","d","1","1","2","1","x","N","s","b"', "line 7: the call_id column is empty"),
    ('"u","","c","5","d","1","1","2","1","-3","N","s","b"', "billsec '-3' is not a whole"),
    ('"u","","c","5","d","1","1","2","1","2.5","N","s","b"', "billsec '2.5' is not a whole"),
    ('"u","","c","5","d","1","yesterday","2","1","2","N","s","b"', "answer 'yesterday' is"),
    ('"u","","c","5","d","1","1","2","1","2","N","s","b', "not a CSV row"),
])
def test_bad_rows_name_file_line_and_column(line: str, message: str) -> None:
    with pytest.raises(CdrFormatError, match=message) as caught:
        parse_row(line, preset("freeswitch-csv"), line=7, source="Master.csv")
    assert str(caught.value).startswith("Master.csv line 7: ")
    assert "\n" not in str(caught.value)


def test_one_bad_row_does_not_hide_the_others() -> None:
    text = (FIXTURES / "freeswitch-mod_cdr_csv.csv").read_text().splitlines()
    rows, errors = parse_lines([text[0], "garbage", "", text[1]], preset("freeswitch-csv"),
                               source="Master.csv")
    assert len(rows) == 2 and [r.line for r in rows] == [1, 4]
    assert len(errors) == 1 and "line 2" in str(errors[0])


def fs_line(**fields: str) -> str:
    """A freeswitch-csv row of good values, some replaced (by role name)."""
    values = {"call_id": "u", "accountcode": "", "caller": "c", "destination": "5",
              "context": "d", "start": "1764752400", "answer": "1764752403",
              "end": "1764752463", "duration": "63", "billsec": "60"}
    values.update(fields)
    cells = [values["call_id"], values["accountcode"], values["caller"],
             values["destination"], values["context"], values["start"], values["answer"],
             values["end"], values["duration"], values["billsec"], "N", "s", "b"]
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="").writerow(cells)
    return out.getvalue()


@pytest.mark.parametrize(("fields", "message"), [
    ({"start": "253402300800"}, "start '253402300800' is past the year 9999"),
    ({"end": "1e999999999"}, "end '1e999999999' is neither epoch seconds"),
    ({"billsec": "1e30", "duration": ""}, "billsec '1e30' is not a whole number"),
    ({"billsec": "-5"}, "billsec '-5' is not a whole number"),
    ({"billsec": "١٢"}, "billsec '١٢' is not a whole number"),  # Arabic-Indic digits
    ({"duration": "¹²³"}, "duration '¹²³' is not a whole number"),  # superscripts
    ({"billsec": "31622401", "duration": ""}, "billsec '31622401' is more than a year"),
    ({"billsec": "61", "duration": "59"}, "billsec 61 is more than the duration 59"),
    ({"call_id": "c\x00"}, "call_id 'c\\x00' holds control characters"),
    ({"destination": "5" * 100_000}, "destination is 100000 characters long"),
    ({"caller": "9" * 200_000}, "not a CSV row"),  # past the csv module's field limit
    ({"answer": "0001-01-01 00:00:00+05:00"}, "answer '0001-01-01 00:00:00+05:00' is nei"),
    ({"end": "9999-12-31 23:00:00-05:00"}, "end '9999-12-31 23:00:00-05:00' is neither"),
    ({"start": "２０２６-１２-０３ ０１:００:００"}, "(ASCII only)"),  # full-width digits
])
def test_a_damaged_row_is_one_clipped_error_naming_line_and_field(
        fields: dict[str, str], message: str) -> None:
    with pytest.raises(CdrFormatError) as caught:
        parse_row(fs_line(**fields), preset("freeswitch-csv"), line=7, source="Master.csv")
    text = str(caught.value)
    assert text.startswith("Master.csv line 7: ") and message in text, text
    assert "\n" not in text and len(text) < 200, text  # the value is clipped to ~40


def test_the_bounds_themselves_are_rows() -> None:
    year = 366 * 86400
    row = parse_row(fs_line(billsec=str(year), duration=str(year)), preset("freeswitch-csv"))
    assert row.billsec == year
    # Asterisk's initiatedseconds rounds billsec up alone: one second over the duration.
    assert parse_row(fs_line(billsec="61", duration="60"), preset("freeswitch-csv")).billsec == 61
    row = parse_row(fs_line(end="253402300799.999999"), preset("freeswitch-csv"))
    assert row.end == datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.from_regex(r"-?[0-9.e+]{0,25}"),
                          st.integers(-10**20, 10**20).map(str)),
                min_size=13, max_size=13))
def test_parse_row_raises_nothing_but_a_one_line_format_error(cells: list[str]) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)
    try:
        row = parse_row(out.getvalue(), preset("freeswitch-csv"), line=3, source="f")
    except CdrFormatError as exc:
        assert str(exc).startswith("f line 3: ") and "\n" not in str(exc)
        assert len(str(exc)) < 400
    else:
        assert 0 <= row.billsec <= 366 * 86400 and row.call_id
