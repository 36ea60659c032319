"""Complaints, live do-not-call entries and suspensions through the API, on both ledger backends.

Over real HTTP on loopback. The refusal tests run the same input through
``callgate complaint|dnc|account …`` and check that the API answers the CLI's
exit-2 message word for word, with a 4xx status, and writes nothing.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from tests.test_web_api import call, post
from tests.web_harness import Served, console_at

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CALLEE = "13800138000"


@pytest.fixture
async def served(ledger_url: str, tmp_path: Path) -> Any:
    async with console_at(ledger_url, tmp_path) as s:
        yield s


def an_hour_ago() -> str:
    return (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0).isoformat()


async def complain(s: Served, account: str = "acme", role: str = "finance",
                   **body: Any) -> tuple[int, Any]:
    return await call(s, "POST", f"/api/v1/accounts/{account}/complaint", role, body)


async def cli(s: Served, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(
        main, ["--policy", str(s.policy_path), "--ledger", s.ledger_url, *argv])
    out, err = capsys.readouterr()
    return code, (err.strip() if code else out)


async def nothing_written(s: Served) -> tuple[Any, ...]:
    ledger = s.console.ledger
    postings = [await ledger.history(b.account) for b in await ledger.balances()]
    return (await ledger.complaints(), await ledger.dnc_list(), postings,
            await ledger.suspension("acme"), await ledger.account_events("acme"))


async def same_refusal(s: Served, capsys: Any, status: int, api: tuple[str, str, dict[str, Any]],
                       argv: list[str]) -> str:
    """The API and the CLI refuse this with the same line; neither writes anything."""
    before = await nothing_written(s)
    method, path, body = api
    got, answer = await call(s, method, path, "admin", body)
    code, err = await cli(s, capsys, *argv)
    assert code == 2, err
    assert got == status, answer
    assert err == f"callgate: error: {answer['error']}", (err, answer)
    assert await nothing_written(s) == before
    return str(answer["error"])


# -- complaints ----------------------------------------------------------------------------
async def test_a_complaint_fines_once_per_ticket_and_puts_the_callee_on_the_list(
        served: Served, capsys: Any) -> None:
    s, at = served, an_hour_ago()
    events: list[tuple[str, dict[str, Any]]] = []
    s.console.publish = lambda topic, payload: events.append((topic, payload))
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    complaint = {"callee": CALLEE, "ticket": "12321-1", "at": at, "note": "harassment"}
    status, body = await complain(s, **complaint)
    assert status == 201, body
    assert (body["created"], body["fine"], body["operator"], body["suspended"]) == (
        True, "1000.0000", "payments", False)
    assert body["balance"]["posted"] == "200.0000"
    # The same request again (a retry): the original, nothing new written.
    status, again = await complain(s, **complaint)
    assert status == 200 and again["created"] is False
    assert again["recorded_at"] == body["recorded_at"]
    # The ticket with other content: refused, nothing written.
    status, conflict = await complain(s, **{**complaint, "callee": "13800138001"})
    assert status == 409 and "other content" in conflict["error"]
    history = [(p.kind.value, p.amount, p.ref, p.operator)
               for p in await s.console.ledger.history("acme")]
    assert history == [("topup", D(1200), "B1", "payments"),
                       ("penalty", D(1000), "complaint:12321-1", "payments")]
    _, dnc = await call(s, "GET", "/api/v1/dnc?account=acme", "read")
    assert [(e["account"], e["number"], e["operator"]) for e in dnc["entries"]] == [
        ("acme", CALLEE, "payments")]
    # What the API recorded is what the CLI shows.
    code, out = await cli(s, capsys, "complaint", "show", "12321-1")
    assert code == 0 and "by payments" in out and "1000.00" in out
    # The second standing complaint in 30 days suspends the account (the policy's rule).
    status, second = await complain(s, callee="13800138002", ticket="12321-2", at=at)
    assert status == 201 and second["suspended"] is True
    assert second["complaints_in_period"] == 2
    _, state = await call(s, "GET", "/api/v1/accounts/acme/suspension", "read")
    assert state["suspended"] is True and "2 complaints" in state["reason"]
    assert [e["action"] for e in state["history"]] == ["suspend"]
    assert [(t, p["action"]) for t, p in events] == [("complaint", "added"),
                                                    ("complaint", "added")]

    # Listing and showing.
    _, listed = await call(s, "GET", "/api/v1/complaints?account=acme", "read")
    assert [c["ticket"] for c in listed["complaints"]] == ["12321-1", "12321-2"]
    today = datetime.now(UTC).date()
    _, none = await call(s, "GET", f"/api/v1/complaints?from={today + timedelta(days=2)}",
                         "read")
    assert none["complaints"] == []
    assert (await call(s, "GET", "/api/v1/complaints/12321-1", "read"))[1]["note"] == (
        "harassment")
    status, missing = await call(s, "GET", "/api/v1/complaints/nope", "read")
    assert status == 404 and missing["error"] == "no complaint with ticket 'nope'"


async def test_a_replay_reports_the_accounts_state_now_in_the_api_and_the_cli(
        served: Served, capsys: Any) -> None:
    s, at = served, an_hour_ago()
    assert (await post(s, "acme", "topup", amount="3000", ref="B1"))[0] == 201
    await complain(s, callee=CALLEE, ticket="R-1", at=at)
    second = {"callee": "13800138002", "ticket": "R-2", "at": at}
    status, body = await complain(s, **second)
    assert status == 201 and (body["suspended"], body["complaints_in_period"]) == (True, 2)
    # A retry writes nothing but does not claim the account is fine.
    status, again = await complain(s, **second)
    assert status == 200 and again["created"] is False
    assert (again["suspended"], again["complaints_in_period"]) == (True, 2)
    code, out = await cli(s, capsys, "complaint", "add", "--account", "acme", "--callee",
                          "13800138002", "--ticket", "R-2", "--at", at, "--json")
    assert code == 0, out
    replay = json.loads(out)
    assert (replay["created"], replay["suspended"], replay["complaints_in_period"]) == (
        False, True, 2)
    # After a withdrawal and a resume, a replay says so too: the state now.
    assert (await call(s, "POST", "/api/v1/complaints/R-1/withdraw", "finance",
                       {"note": "mistake"}))[0] == 200
    assert (await call(s, "POST", "/api/v1/accounts/acme/resume", "finance", {}))[0] == 200
    status, later = await complain(s, **second)
    assert (status, later["suspended"], later["complaints_in_period"]) == (200, False, 1)


async def test_a_retry_without_a_time_is_a_replay(served: Served) -> None:
    """Without "at" the ledger dates the complaint: the same request again is a replay."""
    s = served
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    first = await complain(s, callee=CALLEE, ticket=" T-9 ", note="n")
    again = await complain(s, callee=CALLEE, ticket="T-9", note="n")
    assert (first[0], again[0]) == (201, 200), (first, again)
    assert again[1]["created"] is False and again[1]["at"] == first[1]["at"]
    status, body = await complain(s, callee=CALLEE, ticket="T-9", note="other")
    assert status == 409 and "other content" in body["error"]
    assert len(await s.console.ledger.history("acme")) == 2


async def test_a_closed_account_takes_no_complaint(served: Served) -> None:
    s = served
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    assert (await post(s, "acme", "refund", ref="R1"))[0] == 201
    status, body = await complain(s, callee=CALLEE, ticket="T1")
    assert status == 409 and "is closed" in body["error"], body
    assert await s.console.ledger.complaints() == []


async def test_a_withdrawal_credits_the_fine_back_once(served: Served) -> None:
    s = served
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    assert (await complain(s, callee=CALLEE, ticket="T/1", at=an_hour_ago()))[0] == 201
    path = "/api/v1/complaints/T%2F1/withdraw"
    status, body = await call(s, "POST", path, "finance", {"note": "not ours"})
    assert status == 200 and body["changed"] is True and body["withdrawn_by"] == "payments"
    status, again = await call(s, "POST", path, "finance", {"note": "not ours"})
    assert status == 200 and again["changed"] is False
    assert (await s.console.ledger.balance("acme")).posted == D(1200)
    kinds = [(p.kind.value, p.ref) for p in await s.console.ledger.history("acme")]
    assert kinds[-1] == ("adjustment", "complaint-withdrawn:T/1")
    assert len(kinds) == 3
    # The do-not-call entry stays until someone removes it.
    assert [e.number for e in await s.console.ledger.dnc_list("acme")] == [CALLEE]
    status, missing = await call(s, "POST", "/api/v1/complaints/ghost/withdraw", "finance", {})
    assert status == 404 and missing["error"] == "the ledger has no complaint 'ghost'"


async def test_complaint_refusals_are_the_clis(served: Served, capsys: Any) -> None:
    s, at = served, an_hour_ago()
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201

    def both(account: str, callee: str, ticket: str, when: str | None = at
             ) -> tuple[tuple[str, str, dict[str, Any]], list[str]]:
        body = {"callee": callee, "ticket": ticket, **({"at": when} if when else {})}
        argv = ["complaint", "add", "--account", account, "--callee", callee,
                "--ticket", ticket, *(["--at", when] if when else [])]
        return ("POST", f"/api/v1/accounts/{account}/complaint", body), argv

    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await same_refusal(s, capsys, 400, *both("acme", CALLEE, "  ")) == (
        "--ticket: a ticket is required and must not be blank")
    assert "unknown account 'ghost' (the policy has: acme, beta)" in await same_refusal(
        s, capsys, 404, *both("ghost", CALLEE, "T1"))
    assert await same_refusal(s, capsys, 400, *both("acme", "call me", "T1")) == (
        "--callee: 'call me' is not a phone number")
    assert "is neither a date nor an ISO time" in await same_refusal(
        s, capsys, 400, *both("acme", CALLEE, "T1", "yesterday"))
    assert "is in the future" in await same_refusal(
        s, capsys, 400, *both("acme", CALLEE, "T1", future))
    assert "must be printable" in await same_refusal(
        s, capsys, 400, *both("acme", CALLEE, "T" * 200))
    assert "the ledger has no account 'beta' to fine" in await same_refusal(
        s, capsys, 404, *both("beta", CALLEE, "T1"))


async def test_json_fields_the_cli_has_no_way_to_send(served: Served) -> None:
    s = served
    status, body = await complain(s, callee=CALLEE)
    assert status == 400 and body["error"] == "--ticket is required"
    status, body = await complain(s, callee=CALLEE, ticket="T1", fine="0")
    assert status == 400 and body["error"].startswith("unknown field(s) fine;")
    status, body = await complain(s, callee=5, ticket="T1")
    assert status == 400 and body["error"] == "callee must be a string"
    status, body = await call(s, "POST", "/api/v1/dnc", "finance",
                              {"number": CALLEE, "reason": "r"})
    assert status == 400 and body["error"] == "one of the arguments --account --all is required"
    status, body = await call(s, "POST", "/api/v1/dnc", "finance",
                              {"number": CALLEE, "reason": "r", "all": True, "account": "acme"})
    assert status == 400 and "not allowed with argument --account" in body["error"]
    assert await s.console.ledger.dnc_list() == []


# -- do-not-call and suspension ---------------------------------------------------------------
async def test_dnc_and_suspension_refusals_are_the_clis(served: Served, capsys: Any) -> None:
    s = served
    dnc = "/api/v1/dnc"
    assert await same_refusal(
        s, capsys, 400, ("POST", dnc, {"account": "acme", "number": CALLEE, "reason": " "}),
        ["dnc", "add", CALLEE, "--account", "acme", "--reason", " "]) == (
        "--reason must not be blank")
    assert await same_refusal(
        s, capsys, 400, ("POST", dnc, {"account": "acme", "number": "12ab", "reason": "r"}),
        ["dnc", "add", "12ab", "--account", "acme", "--reason", "r"]) == (
        "number: '12ab' is not a phone number")
    assert "unknown account 'ghost'" in await same_refusal(
        s, capsys, 404, ("POST", dnc, {"account": "ghost", "number": CALLEE, "reason": "r"}),
        ["dnc", "add", CALLEE, "--account", "ghost", "--reason", "r"])
    assert "unknown account 'ghost'" in await same_refusal(
        s, capsys, 404, ("POST", f"{dnc}/remove", {"account": "ghost", "number": CALLEE}),
        ["dnc", "remove", CALLEE, "--account", "ghost"])
    assert await same_refusal(
        s, capsys, 400, ("POST", "/api/v1/accounts/acme/suspend", {"reason": ""}),
        ["account", "suspend", "acme", "--reason", ""]) == "--reason must not be blank"
    assert "unknown account 'ghost'" in await same_refusal(
        s, capsys, 404, ("POST", "/api/v1/accounts/ghost/resume", {}),
        ["account", "resume", "ghost"])


async def test_dnc_entries_for_an_account_and_for_everyone(served: Served) -> None:
    s = served
    body = {"account": "acme", "number": CALLEE, "reason": "asked"}
    status, added = await call(s, "POST", "/api/v1/dnc", "finance", body)
    assert status == 201 and added["added"] is True and added["operator"] == "payments"
    status, again = await call(s, "POST", "/api/v1/dnc", "finance", body)
    assert status == 200 and again["added"] is False and again["seq"] == added["seq"]
    status, everyone = await call(s, "POST", "/api/v1/dnc", "finance",
                                  {"all": True, "number": "13900139000", "reason": "regulator"})
    assert status == 201 and everyone["account"] is None
    _, only_all = await call(s, "GET", "/api/v1/dnc?all=true", "read")
    assert [e["number"] for e in only_all["entries"]] == ["13900139000"]
    _, every = await call(s, "GET", "/api/v1/dnc", "read")
    assert len(every["entries"]) == 2
    status, removed = await call(s, "POST", "/api/v1/dnc/remove", "admin",
                                 {"account": "acme", "number": CALLEE, "reason": "mistake"})
    assert status == 200 and removed == {"account": "acme", "number": CALLEE, "removed": True}
    status, removed = await call(s, "POST", "/api/v1/dnc/remove", "admin",
                                 {"account": "acme", "number": CALLEE})
    assert status == 200 and removed["removed"] is False
    assert [e.number for e in await s.console.ledger.dnc_list()] == ["13900139000"]


async def test_suspend_and_resume_are_recorded_with_the_operator(served: Served) -> None:
    s = served
    path = "/api/v1/accounts/beta"
    status, body = await call(s, "POST", f"{path}/suspend", "finance", {"reason": "unpaid"})
    assert status == 201 and body["changed"] is True and body["operator"] == "payments"
    status, body = await call(s, "POST", f"{path}/suspend", "finance", {"reason": "again"})
    assert status == 200 and body["changed"] is False and body["reason"] == "unpaid"
    status, body = await call(s, "POST", f"{path}/resume", "admin", {"note": "paid"})
    assert status == 200 and body["changed"] is True
    status, body = await call(s, "POST", f"{path}/resume", "finance", {})
    assert status == 200 and body["changed"] is False
    _, state = await call(s, "GET", f"{path}/suspension", "read")
    assert state["suspended"] is False
    assert [(e["action"], e["operator"], e["reason"]) for e in state["history"]] == [
        ("suspend", "payments", "unpaid"), ("resume", "boss", "paid")]


# -- roles --------------------------------------------------------------------------------------
WRITES = [  # (path, body, the least role)
    ("/api/v1/accounts/acme/complaint", {"callee": CALLEE, "ticket": "R1"}, "finance"),
    ("/api/v1/complaints/R1/withdraw", {}, "finance"),
    ("/api/v1/dnc", {"account": "acme", "number": "13800138009", "reason": "r"}, "finance"),
    ("/api/v1/dnc/remove", {"account": "acme", "number": "13800138009"}, "admin"),
    ("/api/v1/accounts/acme/suspend", {"reason": "r"}, "finance"),
    ("/api/v1/accounts/acme/resume", {}, "finance"),
]
READS = ["/api/v1/complaints", "/api/v1/complaints/R1", "/api/v1/dnc",
         "/api/v1/accounts/acme/suspension"]


async def test_401_and_403_per_role(served: Served) -> None:
    s = served
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    order = ["read", "finance", "admin"]
    for path, body, least in WRITES:
        status, answer = await call(s, "POST", path, None, body)
        assert status == 401, (path, answer)
        s.clock.now += 301  # past the failed-authentication window
        for role in order[:order.index(least)]:
            status, answer = await call(s, "POST", path, role, body)
            assert status == 403, (path, role, answer)
            assert answer["error"].endswith(f"has the role {role}; this needs {least}")
        status, answer = await call(s, "POST", path, least, body)
        assert status in (200, 201), (path, least, answer)
    for path in READS:
        assert (await call(s, "GET", path, None))[0] == 401
        s.clock.now += 301
        assert (await call(s, "GET", path, "read"))[0] == 200, path
    ledger = s.console.ledger
    assert [(c.operator, c.withdrawn_by) for c in await ledger.complaints()] == [
        ("payments", "payments")]
    assert [(e.action, e.operator) for e in await ledger.account_events("acme")] == [
        ("suspend", "payments"), ("resume", "payments")]


async def test_the_daemons_publisher_gets_the_clis_events(ledger_url: str,
                                                          tmp_path: Path) -> None:
    """Events go out as the CLI's do; a broken publisher does not undo the record."""
    async with console_at(ledger_url, tmp_path) as s:
        def broken(topic: str, payload: dict[str, Any]) -> None:
            raise RuntimeError("broker gone")

        s.console.publish = broken
        status, body = await call(s, "POST", "/api/v1/accounts/beta/suspend", "finance",
                                  {"reason": "unpaid"})
        assert status == 201 and body["changed"] is True
        assert (await s.console.ledger.suspension("beta")) is not None


async def test_show_and_withdraw_drop_blanks_around_a_ticket_as_the_cli_does(
        served: Served, capsys: Any) -> None:
    """README: blanks around a ticket are dropped by add, show and withdraw alike."""
    s = served
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    assert (await complain(s, callee=CALLEE, ticket=" T-7 ", at=an_hour_ago()))[0] == 201
    code, out = await cli(s, capsys, "complaint", "show", " T-7 ", "--json")
    status, shown = await call(s, "GET", "/api/v1/complaints/%20T-7%20", "read")
    assert code == 0 and status == 200, shown
    assert shown["ticket"] == "T-7" and json.loads(out)["ticket"] == "T-7"
    status, body = await call(s, "POST", "/api/v1/complaints/%20T-7%20/withdraw", "finance", {})
    assert status == 200 and body["changed"] is True, body
    assert await same_refusal(s, capsys, 400, ("GET", "/api/v1/complaints/%20", {}),
                              ["complaint", "show", " "]) == (
        "ticket: a ticket is required and must not be blank")


async def test_a_note_or_reason_of_more_than_one_line_is_bad_input(
        served: Served, capsys: Any) -> None:
    """The CLI's line and exit 2; the API's 400 (bad input), not 422 (a ledger rule)."""
    s = served
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    assert (await complain(s, callee=CALLEE, ticket="T-8", at=an_hour_ago()))[0] == 201
    cases: list[tuple[tuple[str, str, dict[str, Any]], list[str]]] = [
        (("POST", "/api/v1/accounts/acme/complaint",
          {"callee": CALLEE, "ticket": "T-9", "note": "a\nb"}),
         ["complaint", "add", "--account", "acme", "--callee", CALLEE, "--ticket", "T-9",
          "--note", "a\nb"]),
        (("POST", "/api/v1/complaints/T-8/withdraw", {"note": "a\x1b[2Jb"}),
         ["complaint", "withdraw", "T-8", "--note", "a\x1b[2Jb"]),
        (("POST", "/api/v1/dnc", {"account": "acme", "number": "13800138005",
                                  "reason": "a\u2028b"}),
         ["dnc", "add", "13800138005", "--account", "acme", "--reason", "a\u2028b"]),
        (("POST", "/api/v1/dnc/remove", {"account": "acme", "number": CALLEE,
                                         "reason": "a\rb"}),
         ["dnc", "remove", CALLEE, "--account", "acme", "--reason", "a\rb"]),
        (("POST", "/api/v1/accounts/acme/suspend", {"reason": "a\x07b"}),
         ["account", "suspend", "acme", "--reason", "a\x07b"]),
        (("POST", "/api/v1/accounts/acme/resume", {"note": "a\nb"}),
         ["account", "resume", "acme", "--note", "a\nb"]),
    ]
    for api, argv in cases:
        assert "must be one line of text" in await same_refusal(s, capsys, 400, api, argv)


async def test_a_blank_account_or_time_is_refused_not_read_as_not_given(
        served: Served, capsys: Any) -> None:
    """`--account ""` listed every complaint (or the global do-not-call list) and the API's
    `?account=` every one; the API's `"at": ""` recorded a complaint dated now where the
    CLI's `--at ""` is refused. A typo'd blank is never an answer for everything."""
    s = served
    assert (await post(s, "acme", "topup", amount="1200", ref="B1"))[0] == 201
    assert (await complain(s, callee=CALLEE, ticket="T-1", at=an_hour_ago()))[0] == 201
    assert "unknown account ''" in await same_refusal(
        s, capsys, 404, ("GET", "/api/v1/complaints?account=", {}),
        ["complaint", "list", "--account", ""])
    assert "unknown account ''" in await same_refusal(
        s, capsys, 404, ("GET", "/api/v1/dnc?account=", {}), ["dnc", "list", "--account", ""])
    assert "is neither a date nor an ISO time" in await same_refusal(
        s, capsys, 400, ("POST", "/api/v1/accounts/acme/complaint",
                         {"callee": CALLEE, "ticket": "T-2", "at": ""}),
        ["complaint", "add", "--account", "acme", "--callee", CALLEE, "--ticket", "T-2",
         "--at", ""])
    status, body = await call(s, "GET", "/api/v1/dnc?all=maybe", "read")
    assert status == 400 and body["error"] == "all must be true or false"
