"""The finance API over real HTTP on loopback, on both ledger backends.

The refusal tests run the same input through ``callgate ledger …`` and check
that the API answers the CLI's exit-2 message word for word, with its 4xx
status, and writes nothing.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.cli import main
from agent.ledger import CallRecord, Cdr, open_ledger
from agent.web.server import Settings
from tests.web_harness import Served, console_at

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
async def served(ledger_url: str, tmp_path: Path) -> Any:
    async with console_at(ledger_url, tmp_path) as s:
        yield s


async def call(s: Served, method: str, path: str, role: str | None = "finance",
               body: Any = None, **kw: Any) -> tuple[int, Any]:
    headers = {**(s.auth(role) if role else {}), **kw.pop("headers", {})}
    async with aiohttp.ClientSession() as http, http.request(
            method, s.base + path, headers=headers, json=body, **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def post(s: Served, account: str, kind: str, role: str = "finance",
               **body: Any) -> tuple[int, Any]:
    return await call(s, "POST", f"/api/v1/accounts/{account}/{kind}", role, body)


async def cli(s: Served, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(
        main, ["--policy", str(s.policy_path), "--ledger", s.ledger_url, *argv])
    _, err = capsys.readouterr()
    return code, err.strip()


async def postings(s: Served, account: str = "acme") -> list[dict[str, Any]]:
    status, body = await call(s, "GET", f"/api/v1/accounts/{account}/history", "read")
    return body["postings"] if status == 200 else []


def cli_argv(kind: str, account: str, amount: str | None, ref: str, note: str) -> list[str]:
    argv = ["ledger", {"adjustment": "adjust"}.get(kind, kind), account]
    if amount is not None:
        argv.append(amount)
    argv += ["--ref", ref]
    argv += ["--reason" if kind in ("penalty", "adjustment") else "--note", note]
    return argv


async def same_refusal(s: Served, capsys: pytest.CaptureFixture[str], status: int, kind: str,
                       account: str, amount: str | None, ref: str, note: str = "n") -> str:
    """The API and the CLI refuse this input with the same line; neither writes anything."""
    before = len(await postings(s, account))
    body: dict[str, Any] = {"ref": ref, "reason" if kind in ("penalty", "adjustment")
                            else "note": note}
    if amount is not None:
        body["amount"] = amount
    got, answer = await post(s, account, kind, **body)
    code, err = await cli(s, capsys, *cli_argv(kind, account, amount, ref, note))
    assert code == 2, err
    assert err == f"callgate: error: {answer['error']}", (err, answer)
    assert got == status, answer
    assert "\n" not in answer["error"]
    assert len(await postings(s, account)) == before
    return str(answer["error"])


# -- the CLI's refusals ----------------------------------------------------------------------
@pytest.mark.parametrize(("amount", "fragment"), [
    ("-5", "must not be negative"), ("0", "greater than zero"), ("abc", "not a number"),
    ("1.00001", "more decimal places"), ("nan", "not a number"), ("", "not a number"),
    ("1e3", "not a number"), ("+5", "not a number"), ("１００", "not a number"),
    ("99999999999999999999", "too large"),
])
async def test_bad_amounts_are_the_clis_refusals(served: Served, capsys: Any, amount: str,
                                                 fragment: str) -> None:
    assert (await post(served, "acme", "topup", amount="100", ref="B0"))[0] == 201
    for kind in ("topup", "penalty"):
        assert fragment in await same_refusal(served, capsys, 400, kind, "acme", amount, "X1")


async def test_every_other_refusal_of_the_cli(served: Served, capsys: Any) -> None:
    s = served
    assert ("unknown account 'ghost': not in the ledger, and the policy has: acme, beta"
            in await same_refusal(s, capsys, 404, "topup", "ghost", "100", "B1"))
    assert "no account 'ghost'" in await same_refusal(s, capsys, 404, "refund", "ghost", None,
                                                      "R1")
    assert "at least 100.00 (got 99.99)" in await same_refusal(
        s, capsys, 422, "topup", "acme", "99.99", "B1")
    assert "no account 'beta'" in await same_refusal(s, capsys, 404, "penalty", "beta", "5", "P1")
    assert "--ref must not be blank" in await same_refusal(
        s, capsys, 400, "topup", "acme", "100", "  ")
    assert "must be printable and at most 128" in await same_refusal(
        s, capsys, 400, "topup", "acme", "100", "R" * 129)
    assert "is not an account id" in await same_refusal(
        s, capsys, 400, "penalty", "a b", "5", "P0")
    assert (await post(s, "acme", "topup", amount="100", ref="B1", note="n"))[0] == 201
    assert "'B1' was already used" in await same_refusal(
        s, capsys, 409, "topup", "acme", "200", "B1")
    assert "must not be zero" in await same_refusal(
        s, capsys, 400, "adjustment", "acme", "0", "A1", "typo")
    assert (await post(s, "acme", "penalty", amount="1000", ref="P1"))[0] == 201
    assert "negative balance (-900.00)" in await same_refusal(
        s, capsys, 422, "refund", "acme", None, "R1")
    assert (await post(s, "acme", "adjustment", amount="950", ref="A2", reason="waived"))[0] == 201
    assert (await post(s, "acme", "refund", ref="R2"))[0] == 201
    for kind, amount in (("topup", "100"), ("penalty", "5"), ("adjustment", "1"),
                         ("refund", None)):
        assert "is closed" in await same_refusal(s, capsys, 409, kind, "acme", amount, "C9")
    status, body = await post(s, "acme", "reopen", ref="RO1", note="back")
    assert status == 201 and body["balance"]["closed"] is False and body["amount"] == "0.0000"
    assert (await post(s, "acme", "topup", amount="100", ref="B9"))[0] == 201


async def test_a_refund_waits_for_calls_in_progress(served: Served, capsys: Any) -> None:
    assert (await post(served, "acme", "topup", amount="100", ref="B1"))[0] == 201
    at = datetime.now(UTC)
    ledger = served.console.ledger
    await ledger.admit_call(CallRecord("c1", "acme", "pbx-1", "02158880000", "13800138000",
                                       "standard", D("0.13"), 60, 60, at), None)
    status, live = await call(served, "GET", "/api/v1/calls", "read")
    assert status == 200 and [c["call_id"] for c in live["calls"]] == ["c1"]
    assert "1 call(s) in progress" in await same_refusal(served, capsys, 422, "refund", "acme",
                                                         None, "R1")
    await ledger.settle_call(Cdr("c1", "acme", "02158880000", "13800138000", None, at, 0, 0,
                                 D(0), "NO_ANSWER"))
    status, body = await post(served, "acme", "refund", ref="R1")
    assert status == 201 and body["amount"] == "-100.0000" and body["balance"]["closed"]


async def test_statement_periods_are_the_clis(served: Served, capsys: Any) -> None:
    assert (await post(served, "acme", "topup", amount="100", ref="B1"))[0] == 201
    for start, end, fragment in (("2026-12-02", "2026-12-01", "is before --from"),
                                 ("12/01/2026", "2026-12-01", "is not a date")):
        status, body = await call(served, "GET", f"/api/v1/accounts/acme/statement?from={start}"
                                  f"&to={end}", "read")
        code, err = await cli(served, capsys, "ledger", "statement", "acme", "--from", start,
                              "--to", end)
        assert (status, code) == (400, 2) and fragment in body["error"]
        assert err == f"callgate: error: {body['error']}"
    status, body = await call(served, "GET", "/api/v1/accounts/acme/history?since=yesterday",
                              "read")
    code, err = await cli(served, capsys, "ledger", "history", "acme", "--since", "yesterday")
    assert (status, code) == (400, 2) and "neither a date nor an ISO time" in body["error"]
    assert err == f"callgate: error: {body['error']}"


async def test_json_fields_that_are_not_the_clis(served: Served) -> None:
    assert (await post(served, "acme", "topup", amount=100.5, ref="B1"))[1]["error"] == (
        "amount 100.5 must be written as a decimal string, not a float")
    status, body = await post(served, "acme", "topup", amount="100", ref="B1", colour="red")
    assert status == 400 and "unknown field(s) colour" in body["error"]
    status, body = await post(served, "acme", "topup", amount="100")
    assert status == 400 and "--ref is required" in body["error"]
    status, body = await call(served, "POST", "/api/v1/accounts/acme/topup", "finance",
                              data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"] == "the body is not valid JSON"
    # A key twice: refused, not "the last one wins" (which ref did the client mean?).
    for data, key in ((b'{"amount": "100", "ref": "A", "ref": "B"}', "ref"),
                      (b'{"amount": "100", "ref": "A", "x": {"k": 1, "k": 2}}', "k")):
        status, body = await call(served, "POST", "/api/v1/accounts/acme/topup", "finance",
                                  data=data, headers={"Content-Type": "application/json"})
        assert (status, body["error"]) == (
            400, f"the body has the key {key!r} more than once"), body
    status, body = await call(served, "POST", "/api/v1/accounts/acme/topup", "finance",
                              data=b"amount=100&ref=B1")
    assert status == 415
    assert await postings(served) == []
    # An integer amount is as exact as a string.
    status, body = await post(served, "acme", "topup", amount=100, ref="B1")
    assert status == 201 and body["amount"] == "100.0000"


# -- idempotency ----------------------------------------------------------------------------
async def test_a_replay_returns_the_original_and_other_content_is_409(served: Served) -> None:
    first = await post(served, "acme", "topup", amount="150", ref="BANK-1", note="wire")
    again = await post(served, "acme", "topup", amount="150", ref="BANK-1", note="wire")
    assert first[0] == 201 and again[0] == 200
    assert again[1]["replayed"] is True and first[1]["replayed"] is False
    assert {k: v for k, v in again[1].items() if k != "replayed"} == {
        k: v for k, v in first[1].items() if k != "replayed"}
    status, body = await post(served, "acme", "topup", amount="150", ref="BANK-1", note="cash")
    assert status == 409 and "other content" in body["error"]
    history = await postings(served)
    assert [(p["amount"], p["operator"]) for p in history] == [("150.0000", "payments")]


async def test_two_clients_same_reference_at_once_make_one_posting(served: Served) -> None:
    async def one(http: aiohttp.ClientSession, ref: str, amount: str) -> tuple[int, Any]:
        async with http.post(f"{served.base}/api/v1/accounts/acme/topup",
                             headers=served.auth("finance"),
                             json={"amount": amount, "ref": ref}) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as a, aiohttp.ClientSession() as b:
        # The first top-up creates the account: both clients race to create it too.
        for n in range(8):
            ref, amount = f"PAY-{n}", "100" if n == 0 else f"{n}.5"
            results = await asyncio.gather(one(a, ref, amount), one(b, ref, amount))
            assert sorted(s for s, _ in results) == [200, 201], results
            assert results[0][1]["id"] == results[1][1]["id"]
    history = await postings(served)
    assert len(history) == 8
    _, body = await call(served, "GET", "/api/v1/accounts/acme", "read")
    assert body["balance"]["posted"] == str(D(100) + sum(D(f"{n}.5") for n in range(1, 8))
                                            ) + "000"


# -- authentication and roles ---------------------------------------------------------------
async def test_401_and_403_per_role(served: Served) -> None:
    s = served
    status, body = await call(s, "GET", "/api/v1/accounts", None)
    assert status == 401 and "valid API token" in body["error"]
    async with aiohttp.ClientSession() as http, http.get(
            s.base + "/api/v1/accounts", headers={"Authorization": "Bearer cg_wrong"}) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    for role in ("read", "finance", "admin"):
        assert (await call(s, "GET", "/api/v1/accounts", role))[0] == 200
        assert (await call(s, "GET", "/api/v1/whoami", role))[1]["role"] == role
    status, body = await post(s, "acme", "topup", role="read", amount="100", ref="B1")
    assert status == 403 and body["error"] == (
        "token 'auditor' has the role read; this needs finance")
    assert (await post(s, "acme", "topup", role="admin", amount="100", ref="B1"))[0] == 201
    assert (await post(s, "acme", "penalty", role="finance", amount="1", ref="P1"))[0] == 201
    assert (await call(s, "GET", "/api/v1/operators", "finance"))[0] == 403
    status, body = await call(s, "GET", "/api/v1/operators", "admin")
    assert status == 200 and {(o["name"], o["role"]) for o in body["operators"]} >= {
        ("auditor", "read"), ("payments", "finance"), ("boss", "admin"), ("clerk", "finance")}
    assert "sha256" not in json.dumps(body) and "argon2" not in json.dumps(body)
    assert [p["operator"] for p in await postings(s)] == ["boss", "payments"]


async def test_failed_authentications_are_limited_per_client(ledger_url: str,
                                                             tmp_path: Path) -> None:
    settings = Settings(failed_logins=3, failed_logins_window=60)
    async with console_at(ledger_url, tmp_path, settings) as s, aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(s.base + "/api/v1/accounts",
                                headers={"Authorization": "Bearer cg_guess"}) as r:
                assert r.status == 401
        async with http.get(s.base + "/api/v1/accounts", headers=s.auth("read")) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) == 60
            assert "too many failed authentications" in (await r.json())["error"]
        s.clock.now += 61
        async with http.get(s.base + "/api/v1/accounts", headers=s.auth("read")) as r:
            assert r.status == 200


async def test_behind_a_proxy_the_forwarded_address_is_the_client(ledger_url: str,
                                                                   tmp_path: Path) -> None:
    settings = Settings(failed_logins=2, behind_proxy=True)
    async with console_at(ledger_url, tmp_path, settings) as s, aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(s.base + "/api/v1/accounts", headers={
                    "Authorization": "Bearer cg_guess",
                    "X-Forwarded-For": "203.0.113.5, 198.51.100.7"}) as r:
                assert r.status == 401
        async with http.get(s.base + "/api/v1/accounts", headers={
                **s.auth("read"), "X-Forwarded-For": "198.51.100.7"}) as r:
            assert r.status == 429
        async with http.get(s.base + "/api/v1/accounts", headers={
                **s.auth("read"), "X-Forwarded-For": "198.51.100.8"}) as r:
            assert r.status == 200


async def test_a_token_file_edit_takes_effect_without_a_restart(served: Served) -> None:
    tokens = served.policy_path.parent / "tokens.txt"
    kept = [line for line in tokens.read_text().splitlines() if not line.startswith("auditor")]
    tokens.write_text("\n".join(kept) + "\n")
    assert (await call(served, "GET", "/api/v1/accounts", "read"))[0] == 401
    tokens.write_text("this line is broken\n")  # a bad edit keeps the last good file
    assert (await call(served, "GET", "/api/v1/accounts", "finance"))[0] == 200


# -- limits ---------------------------------------------------------------------------------
async def test_bodies_are_bounded(served: Served) -> None:
    big = {"amount": "100", "ref": "B1", "note": "x" * 20_000}
    status, body = await post(served, "acme", "topup", **big)
    assert status == 413 and "larger than 16384 bytes" in body["error"]

    async def chunks() -> Any:  # no Content-Length: the limit holds while reading
        yield b'{"amount": "100", "ref": "B1", "note": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    async with aiohttp.ClientSession() as http, http.post(
            served.base + "/api/v1/accounts/acme/topup", data=chunks(),
            headers={**served.auth("finance"), "Content-Type": "application/json"}) as r:
        assert r.status == 413
    # Nested thousands deep inside the size limit: bad JSON (400), not an internal error.
    status, body = await call(served, "POST", "/api/v1/accounts/acme/topup", "finance",
                              data=b"[" * 15_000,
                              headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"] == "the body is not valid JSON", body
    assert await postings(served) == []


async def test_a_slow_ledger_is_a_503_not_a_hang(ledger_url: str, tmp_path: Path) -> None:
    class Slow:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def balances(self) -> Any:
            await asyncio.sleep(5)

    async with console_at(ledger_url, tmp_path, Settings(request_timeout=0.3), Slow) as s:
        status, body = await call(s, "GET", "/api/v1/accounts", "read")
        assert status == 503 and body["error"] == "the request took too long; try again"


# -- reading --------------------------------------------------------------------------------
async def test_statement_and_report_are_the_clis_and_add_up(served: Served, capsys: Any) -> None:
    shanghai_day = "2026-11-15T10:00:00+08:00"
    at = datetime.fromisoformat(shanghai_day)
    ledger = served.console.ledger
    await ledger.topup("acme", D("100"), ref="B0", at=at)
    record = CallRecord("c1", "acme", "pbx-1", "02158880000", "13800138000", "standard",
                        D("0.13"), 60, 60, at)
    await ledger.admit_call(record, None)
    await ledger.answer_call("c1", at)
    assert await ledger.hold("c1", 0, D("0.13"), 60, at)
    assert await ledger.hold("c1", 1, D("0.13"), 120, at)
    await ledger.settle_call(Cdr("c1", "acme", "02158880000", "13800138000", at,
                                 at.replace(minute=2), 120, 120, D("0.26"), "NORMAL_CLEARING"))
    await ledger.penalty("acme", D("10"), ref="12321-1", at=at.replace(hour=12), note="fine")
    query = "from=2026-11-01&to=2026-11-30"
    status, api = await call(served, "GET", f"/api/v1/accounts/acme/statement?{query}", "read")
    assert status == 200
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--policy", str(served.policy_path), "--ledger",
                                          served.ledger_url, "ledger", "statement", "acme",
                                          "--from", "2026-11-01", "--to", "2026-11-30",
                                          "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out) == api
    assert api["closing"] == "89.7400"
    status, text = await call(served, "GET",
                              f"/api/v1/accounts/acme/statement?{query}&format=csv", "read")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sum(D(r["amount"]) for r in rows[:-1]) == D(rows[-1]["amount"]) == D("89.74")
    status, report = await call(served, "GET", f"/api/v1/report?{query}", "read")
    assert status == 200
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--policy", str(served.policy_path), "--ledger",
                                          served.ledger_url, "ledger", "report", "--from",
                                          "2026-11-01", "--to", "2026-11-30", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out) == report
    assert [(a["account"], a["name"], a["closing"]) for a in report["accounts"]] == [
        ("acme", "ACME Telemarketing", "89.7400")]
    status, text = await call(served, "GET", f"/api/v1/report?{query}&format=csv", "read")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["type"] == "opening" and rows[-1]["type"] == "closing"
    moved = sum(D(r["amount"]) for r in rows if r["type"] not in ("opening", "closing"))
    assert D(rows[0]["balance"]) + moved == D(rows[-1]["balance"]) == D("89.74")


async def test_accounts_list_has_customer_names_and_policy_accounts(served: Served) -> None:
    assert (await post(served, "beta", "topup", amount="120", ref="B1"))[0] == 201
    status, body = await call(served, "GET", "/api/v1/accounts", "read")
    assert status == 200
    assert [(a["account"], a["name"], a["available"], a["in_ledger"])
            for a in body["accounts"]] == [("acme", "ACME Telemarketing", "0.0000", False),
                                           ("beta", "Beta Sales", "120.0000", True)]
    _, body = await call(served, "GET", "/api/v1/accounts/beta", "read")
    assert body["name"] == "Beta Sales" and body["recent_postings"][0]["ref"] == "B1"
    assert (await call(served, "GET", "/api/v1/accounts/ghost", "read"))[0] == 404


# -- the OpenAPI document -------------------------------------------------------------------
async def test_the_openapi_document_matches_the_routes(served: Served) -> None:
    status, doc = await call(served, "GET", "/api/v1/openapi.json", None)
    assert status == 200 and doc["openapi"].startswith("3.")
    app_routes = set()
    for route in served_app_routes(served):
        if route[1].startswith("/api/"):
            app_routes.add(route)
    documented = {(method.upper(), path) for path, ops in doc["paths"].items()
                  for method in ops}
    assert documented == app_routes
    # The role each operation states is the one its handler enforces.
    roles = served_app_roles(served)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path != "/api/v1/openapi.json":
                assert op["x-role"] == roles[(method.upper(), path)], (method, path)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (method, path)
            if path != "/api/v1/openapi.json":
                assert op["security"] == [{"token": []}]
                assert "401" in op["responses"] and "403" in op["responses"]
            for response in op["responses"].values():
                for media in response.get("content", {}).values():
                    ref = media["schema"].get("$ref", "")
                    if ref:
                        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]


def served_app_routes(served: Served) -> set[tuple[str, str]]:
    from agent.web.server import build_app

    app = build_app(served.console)
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource is not None and r.method != "HEAD"}


def served_app_roles(served: Served) -> dict[tuple[str, str], str]:
    from agent.web.auth import Role
    from agent.web.server import build_app

    app = build_app(served.console)
    return {(r.method, r.resource.canonical): getattr(r.handler, "role", Role.READ).label
            for r in app.router.routes() if r.resource is not None and r.method != "HEAD"}


async def test_the_ledgers_view_is_shared_with_the_cli(served: Served, capsys: Any) -> None:
    """A top-up through the API is what 'callgate ledger balance' shows, with its operator."""
    assert (await post(served, "acme", "topup", amount="100", ref="B1"))[0] == 201
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--policy", str(served.policy_path), "--ledger",
                                          served.ledger_url, "ledger", "history", "acme",
                                          "--json"])
    history = json.loads(capsys.readouterr().out)["postings"]
    assert code == 0 and [(p["ref"], p["operator"]) for p in history] == [("B1", "payments")]
    other = await open_ledger(served.ledger_url)
    try:
        assert (await other.balance("acme")).posted == D(100)
    finally:
        await other.close()


async def test_a_note_or_reason_is_one_line_and_blanks_around_a_reference_are_dropped(
        served: Served, capsys: Any) -> None:
    """A newline split `ledger history`'s row and an escape sequence repainted the terminal
    showing it; a pasted "B1 " next to a retried "B1" made two top-ups."""
    s = served
    assert "must be one line of printable text" in await same_refusal(
        s, capsys, 400, "topup", "acme", "100", "B1", "wire\nfrom bank")
    assert (await post(s, "acme", "topup", amount="100", ref="B1"))[0] == 201
    assert "must be one line of printable text" in await same_refusal(
        s, capsys, 400, "penalty", "acme", "5", "P1", "late\x1b[2J")
    status, body = await post(s, "acme", "topup", amount="100", ref=" B1 ")
    assert status == 200 and body["replayed"] is True and body["ref"] == "B1", body
    code, err = await cli(s, capsys, "ledger", "topup", "acme", "100", "--ref", "B1\t")
    assert code == 0, err
    assert len(await postings(s)) == 1
    status, body = await post(s, "acme", "topup", amount=True, ref="B2")
    assert status == 400 and body["error"].startswith("amount true is not an amount"), body


async def test_read_routes_refuse_what_the_cli_refuses(served: Served, capsys: Any) -> None:
    """A blank ?since=, ?tz=, ?from= was read as "not given" (every posting, the policy's
    zone, the default period), an unknown ?account= of /calls answered no calls, and a
    --from after today had another message: the CLI refuses each with its line."""
    s = served
    assert (await post(s, "acme", "topup", amount="100", ref="B1"))[0] == 201
    future = (datetime.now(UTC) + timedelta(days=40)).date().isoformat()
    cases = [
        ("/api/v1/accounts/acme/history?since=", ["ledger", "history", "acme", "--since", ""]),
        ("/api/v1/accounts/acme/history?tz=", ["ledger", "history", "acme", "--tz", ""]),
        ("/api/v1/accounts/acme/statement?tz=%20",
         ["ledger", "statement", "acme", "--tz", " "]),
        ("/api/v1/accounts/acme/statement?from=", ["ledger", "statement", "acme", "--from", ""]),
        (f"/api/v1/accounts/acme/statement?from={future}",
         ["ledger", "statement", "acme", "--from", future]),
        ("/api/v1/calls?account=ghost", ["calls", "--account", "ghost"]),
        ("/api/v1/complaints?from=", ["complaint", "list", "--from", ""]),
    ]
    for path, argv in cases:
        status, body = await call(s, "GET", path, "read")
        code, err = await cli(s, capsys, *argv)
        assert code == 2 and 400 <= status < 500, (path, status, body, err)
        assert err == f"callgate: error: {body['error']}", (path, body, err)
