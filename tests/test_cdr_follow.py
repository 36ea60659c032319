"""The CDR file follower: partial lines, rotation, truncation and restarts, on real files."""

from __future__ import annotations

import os
from pathlib import Path

from agent.cdr.follow import (
    MAX_LINE,
    CdrFollower,
    FollowState,
    Line,
    file_lines,
    load_state,
    save_state,
    split_lines,
)


def texts(follower: CdrFollower) -> list[str]:
    return [line.text for line in follower.read()]


def append(path: Path, data: str) -> None:
    with open(path, "a") as out:
        out.write(data)


def test_split_lines_keeps_a_partial_last_line() -> None:
    assert split_lines(b"a\nb\npart") == ([b"a", b"b"], 4)
    assert split_lines(b"part") == ([], 0)
    assert split_lines(b"") == ([], 0)
    assert split_lines(b"a\n") == ([b"a"], 2)


def test_new_complete_lines_once_and_a_partial_line_later(tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    follower = CdrFollower(cdr, FollowState())
    assert texts(follower) == []  # no file yet
    append(cdr, "r1\nr2\nr3-start")
    lines = follower.read()
    assert [(x.text, x.number) for x in lines] == [("r1", 1), ("r2", 2)]
    assert texts(follower) == []
    append(cdr, "-end\r\nr4\n")
    assert texts(follower) == ["r3-start-end", "r4"]
    assert follower.state.offset == cdr.stat().st_size


def test_rotation_by_rename_drains_the_old_file_first(tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    append(cdr, "r1\n")
    follower = CdrFollower(cdr, FollowState())
    assert texts(follower) == ["r1"]
    # The PBX writes one more row, then the file is rotated and a new one started.
    append(cdr, "r2\n")
    os.rename(cdr, tmp_path / "Master.csv.1")
    append(cdr, "n1\n")
    assert texts(follower) == ["r2"]  # the old file to its end first
    assert texts(follower) == ["n1"]
    append(cdr, "n2\n")
    assert texts(follower) == ["n2"]


def test_rotation_with_the_new_file_not_there_yet(tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    append(cdr, "r1\n")
    follower = CdrFollower(cdr, FollowState())
    assert texts(follower) == ["r1"]
    os.rename(cdr, tmp_path / "Master.csv.1")
    assert texts(follower) == []
    append(cdr, "n1\n")
    assert texts(follower) == ["n1"]


def test_copytruncate_rotation_reads_the_file_again_from_its_start(tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    append(cdr, "r1\nr2\n")
    follower = CdrFollower(cdr, FollowState())
    assert texts(follower) == ["r1", "r2"]
    with open(cdr, "w"):
        pass  # truncated in place
    append(cdr, "n1\n")
    assert texts(follower) == ["n1"]


def test_a_restart_resumes_where_the_saved_state_stands(tmp_path: Path) -> None:
    cdr, state_file = tmp_path / "Master.csv", tmp_path / "state.json"
    append(cdr, "r1\nr2\npart")
    first = CdrFollower(cdr, load_state(state_file))
    assert texts(first) == ["r1", "r2"]
    first.state.pending = [("r2", 12.5, 2)]
    save_state(state_file, first.state)
    first.close()
    append(cdr, "ial\nr4\n")
    state = load_state(state_file)
    assert state.pending == [("r2", 12.5, 2)]
    second = CdrFollower(cdr, state)
    assert texts(second) == ["partial", "r4"]  # nothing read twice, nothing lost


def test_a_file_replaced_while_the_agent_was_down_is_read_from_its_start(
        tmp_path: Path) -> None:
    cdr, state_file = tmp_path / "Master.csv", tmp_path / "state.json"
    append(cdr, "r1\n")
    first = CdrFollower(cdr, FollowState())
    assert texts(first) == ["r1"]
    save_state(state_file, first.state)
    first.close()
    os.rename(cdr, tmp_path / "Master.csv.1")
    append(cdr, "n1\n")
    assert texts(CdrFollower(cdr, load_state(state_file))) == ["n1"]


def test_a_file_truncated_while_the_agent_was_down(tmp_path: Path) -> None:
    cdr, state_file = tmp_path / "Master.csv", tmp_path / "state.json"
    append(cdr, "r1\nr2\n")
    first = CdrFollower(cdr, FollowState())
    assert texts(first) == ["r1", "r2"]
    save_state(state_file, first.state)
    first.close()
    with open(cdr, "w") as out:
        out.write("n\n")
    assert texts(CdrFollower(cdr, load_state(state_file))) == ["n"]


def test_an_unreadable_state_file_starts_afresh(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    state_file.write_text("{not json")
    assert load_state(state_file) == FollowState()
    state_file.write_text('{"device": 1}')
    assert load_state(state_file) == FollowState()


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    save_state(state_file, FollowState(1, 2, 3, [("x", 1.0, 7)]))
    assert load_state(state_file) == FollowState(1, 2, 3, [("x", 1.0, 7)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    # A state saved before pending lines kept their line number still loads.
    state_file.write_text('{"device": 1, "inode": 2, "offset": 3, "pending": [["x", 1.0]]}')
    assert load_state(state_file) == FollowState(1, 2, 3, [("x", 1.0, 0)])


def test_reads_are_bounded_and_an_endless_line_is_skipped(tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    append(cdr, "x" * 100 + "\nr2\n")
    follower = CdrFollower(cdr, FollowState(), max_bytes=64)
    assert follower.read() == []  # 64 bytes of one line: skipped
    # The rest of it dropped, reported as a line too long (with its number), the next read.
    assert follower.read() == [Line("", 1, too_long=True), Line("r2", 2)]
    append(cdr, "y" * 200 + "\nr3\n")
    assert [follower.read() for _ in range(5)] == [
        [], [], [], [Line("", 3, too_long=True), Line("r3", 4)], []]
    append(cdr, "z" * (MAX_LINE + 1) + "\nr5\n")  # within one read, past MAX_LINE
    follower.max_bytes = 1 << 20
    assert follower.read() == [Line("", 5, too_long=True), Line("r5", 6)]


def test_file_lines_reads_a_whole_file_line_by_line(tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    cdr.write_bytes(b"r1\r\n" + b"x" * (3 * MAX_LINE) + b"\nr3\n\xff\nlast")
    with open(cdr, "rb") as handle:
        assert list(file_lines(handle)) == [
            Line("r1", 1), Line("", 2, too_long=True), Line("r3", 3), Line("\ufffd", 4),
            Line("last", 5)]


def test_a_first_start_on_an_existing_file_begins_after_its_last_complete_line(
        tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    append(cdr, "old1\nold2\npart")
    follower = CdrFollower(cdr, FollowState(), from_end=True, max_bytes=64)
    assert texts(follower) == []
    append(cdr, "ial\nnew\n")
    assert texts(follower) == ["partial", "new"]


def test_from_end_does_not_skip_a_file_created_later_or_after_rotation(tmp_path: Path) -> None:
    cdr = tmp_path / "Master.csv"
    follower = CdrFollower(cdr, FollowState(), from_end=True)
    assert texts(follower) == []  # no file yet
    append(cdr, "r1\n")
    assert texts(follower) == ["r1"]
    os.rename(cdr, tmp_path / "Master.csv.1")
    append(cdr, "n1\n")
    assert texts(follower) == ["n1"]
