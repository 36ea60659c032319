"""The clerk's pages over real HTTP without a browser: sign-in, CSRF, roles, two-step forms."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.web_harness import PASSWORD, Served, console_at


@pytest.fixture
async def served(tmp_path: Path) -> Any:
    async with console_at(f"sqlite://{tmp_path}/ledger.db", tmp_path) as s:
        yield s


def browser() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for an IP address host (127.0.0.1), as a browser does.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, html[-800:]
    return match.group(1)


async def sign_in(http: aiohttp.ClientSession, s: Served, **form: str) -> tuple[int, str]:
    async with http.get(s.base + "/login") as r:
        nonce = hidden(await r.text(), "nonce")
    async with http.post(s.base + "/login", data={"nonce": nonce, **form}) as r:
        return r.status, await r.text()


async def test_sign_in_with_a_user_and_password(served: Served) -> None:
    async with browser() as http:
        async with http.get(served.base + "/accounts", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login"
        status, _ = await sign_in(http, served, user="clerk", password="wrong password")
        assert status == 401
        status, html = await sign_in(http, served, user="clerk", password=PASSWORD)
        assert status == 200 and "ACME Telemarketing" in html and "clerk (finance)" in html
        cookie = next(c for c in http.cookie_jar if c.key == "callgate_session")
        assert cookie["httponly"] and cookie["samesite"] == "Strict"


async def test_failed_sign_ins_are_limited(served: Served) -> None:
    async with browser() as http:
        for _ in range(10):
            assert (await sign_in(http, served, token="cg_guess"))[0] == 401
        status, html = await sign_in(http, served, user="clerk", password=PASSWORD)
        assert status == 429 and "too many failed sign-ins" in html
        served.clock.now += 301
        assert (await sign_in(http, served, user="clerk", password=PASSWORD))[0] == 200


async def test_a_sign_in_form_from_elsewhere_is_refused(served: Served) -> None:
    async with browser() as http, http.post(served.base + "/login", data={
            "nonce": "forged", "token": served.tokens["finance"]}) as r:
        assert r.status == 403 and "expired" in await r.text()


async def test_review_writes_nothing_and_confirm_needs_the_csrf_token(served: Served) -> None:
    ledger = served.console.ledger
    async with browser() as http:
        await sign_in(http, served, token=served.tokens["finance"])
        async with http.get(served.base + "/accounts/acme/topup") as r:
            csrf = hidden(await r.text(), "csrf")
        form = {"amount": "100", "ref": "B1", "note": "", "csrf": csrf}
        async with http.post(served.base + "/accounts/acme/topup",
                             data={**form, "step": "review"}) as r:
            html = await r.text()
            assert r.status == 200 and 'id="confirm"' in html
        assert await ledger.balances() == []
        for bad in ("", "forged"):
            async with http.post(served.base + "/accounts/acme/topup",
                                 data={**form, "csrf": bad, "step": "confirm"}) as r:
                assert r.status == 403 and "did not come from this site" in await r.text()
        assert await ledger.balances() == []
        async with http.post(served.base + "/accounts/acme/topup",
                             data={**form, "step": "confirm"}) as r:
            html = await r.text()
            assert r.status == 200 and "topped up 100.00 CNY (ref B1, by payments)" in html
        # The same form again (a double click, a reload): the original, nothing new.
        async with http.post(served.base + "/accounts/acme/topup",
                             data={**form, "step": "confirm"}) as r:
            assert "already recorded, nothing new written" in await r.text()
        assert len(await ledger.history("acme")) == 1
        # Signing out needs the token too, and ends the session.
        async with http.post(served.base + "/logout", data={"csrf": csrf}) as r:
            assert r.url.path == "/login"
        async with http.get(served.base + "/accounts/acme", allow_redirects=False) as r:
            assert r.status == 303


async def test_a_read_user_sees_no_forms_and_cannot_post(served: Served) -> None:
    async with browser() as http:
        await sign_in(http, served, user="viewer", password=PASSWORD)
        async with http.get(served.base + "/accounts/acme") as r:
            html = await r.text()
            assert r.status == 200 and "/accounts/acme/topup" not in html
        async with http.get(served.base + "/accounts/acme/topup") as r:
            assert r.status == 403 and "needs finance" in await r.text()
        async with http.post(served.base + "/accounts/acme/topup", data={"amount": "100"}) as r:
            assert r.status == 403
    assert await served.console.ledger.balances() == []


async def test_every_money_form_and_the_refund_of_what_is_left(served: Served) -> None:
    """§10.2 first top-up, §10.3 the fine and the refund of the rest, all from pages."""
    ledger = served.console.ledger

    async def act(http: aiohttp.ClientSession, kind: str, **values: str) -> str:
        async with http.get(f"{served.base}/accounts/acme/{kind}") as r:
            csrf = hidden(await r.text(), "csrf")
        async with http.post(f"{served.base}/accounts/acme/{kind}",
                             data={**values, "csrf": csrf, "step": "confirm"}) as r:
            return await r.text()

    async with browser() as http:
        await sign_in(http, served, token=served.tokens["finance"])
        assert "topped up 1200.00" in await act(http, "topup", amount="1200", ref="B1")
        assert "fined -1000.00" in await act(http, "penalty", amount="1000", ref="12321-1",
                                            note="complaint 12321-1")
        assert "adjusted -0.50" in await act(http, "adjustment", amount="-0.5", ref="A1",
                                            note="rounding")
        async with http.get(f"{served.base}/accounts/acme/refund") as r:
            csrf = hidden(await r.text(), "csrf")
        async with http.post(f"{served.base}/accounts/acme/refund",
                             data={"ref": "R1", "csrf": csrf, "step": "review"}) as r:
            assert "Pay out the available balance (199.50 CNY)" in await r.text()
        html = await act(http, "refund", ref="R1")
        assert "refunded -199.50" in html and "closed" in html
        assert "is closed" in await act(http, "topup", amount="100", ref="B2")
        assert "reopened (ref RO1, by payments)" in await act(http, "reopen", ref="RO1",
                                                                note="returning customer")
        async with http.get(f"{served.base}/report?from=2000-01-01&to=2100-01-01") as r:
            report = await r.text()
            assert r.status == 200 and "ACME Telemarketing" in report
    kinds = [(p.kind.value, p.operator) for p in await ledger.history("acme")]
    assert kinds == [("topup", "payments"), ("penalty", "payments"),
                     ("adjustment", "payments"), ("refund", "payments"), ("reopen", "payments")]


async def test_pages_escape_what_they_show_and_send_safety_headers(served: Served) -> None:
    async with browser() as http:
        await sign_in(http, served, token=served.tokens["finance"])
        async with http.get(served.base + "/accounts/acme/topup") as r:
            csrf = hidden(await r.text(), "csrf")
        async with http.post(served.base + "/accounts/acme/topup", data={
                "amount": "<script>x</script>", "ref": "B1", "csrf": csrf,
                "step": "review"}) as r:
            html = await r.text()
            assert r.status == 400 and "<script>x" not in html and "&lt;script&gt;" in html
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["Cache-Control"] == "no-store"


# -- compliance: complaints, do-not-call, suspension ------------------------------------------
async def form_page(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return hidden(await r.text(), "csrf")


async def test_a_complaint_is_reviewed_then_confirmed_once(served: Served) -> None:
    """The fine (§10.3) and the do-not-call entry from the pages, with a confirmation step."""
    ledger, base = served.console.ledger, served.base
    async with browser() as http:
        await sign_in(http, served, token=served.tokens["finance"])
        csrf = await form_page(http, f"{base}/accounts/acme/topup")
        async with http.post(f"{base}/accounts/acme/topup", data={
                "amount": "1200", "ref": "B1", "csrf": csrf, "step": "confirm"}) as r:
            assert r.status == 200
        url = f"{base}/accounts/acme/complaints/new"
        csrf = await form_page(http, url)
        form = {"callee": "138 0013 8000", "ticket": "12321-9", "at": "", "note": "rude",
                "csrf": csrf}
        async with http.post(url, data={**form, "callee": "nope", "step": "review"}) as r:
            html = await r.text()
            assert r.status == 400 and "--callee: &#x27;nope&#x27; is not a phone number" in html
        async with http.post(url, data={**form, "step": "review"}) as r:
            review = await r.text()
            assert r.status == 200 and 'id="confirm"' in review
            assert "Fine 1000.00 CNY: the balance goes from 1200.00 to 200.00." in review
            assert "13800138000 goes on acme's do-not-call list" in review
        assert await ledger.complaints() == [] and await ledger.dnc_list() == []
        confirm = {**form, "at": hidden(review, "at"), "step": "confirm"}
        async with http.post(url, data={**confirm, "csrf": "forged"}) as r:
            assert r.status == 403
        assert await ledger.complaints() == []
        async with http.post(url, data=confirm) as r:
            page = await r.text()
            assert r.url.path == "/accounts/acme"
            assert ("complaint 12321-9: fined 1000.00 CNY (by payments); 13800138000 is on "
                    "acme&#x27;s do-not-call list") in page
            assert 'id="balance">200.00' in page and "12321-9" in page
        async with http.post(url, data=confirm) as r:  # a double click: the same request
            assert "was already recorded; nothing new written" in await r.text()
        # Withdraw: review, then confirm; the fine comes back by a posting.
        async with http.post(f"{base}/complaints/withdraw", data={
                "ticket": "12321-9", "step": "review", "csrf": csrf}) as r:
            review = await r.text()
            assert "the balance goes from 200.00 to 1200.00" in review
        assert (await ledger.balance("acme")).posted == 200
        # A bad note at the confirm step: the form again with the line, nothing written.
        async with http.post(f"{base}/complaints/withdraw", data={
                "ticket": "12321-9", "step": "confirm", "note": "wrong\nnumber",
                "csrf": csrf}) as r:
            html = await r.text()
            assert r.status == 400 and 'id="error"' in html and 'id="confirm"' in html
            assert "note" in html and "the balance goes from 200.00 to 1200.00" in html
        assert (await ledger.balance("acme")).posted == 200
        async with http.post(f"{base}/complaints/withdraw", data={
                "ticket": "12321-9", "step": "confirm", "note": "wrong number",
                "csrf": csrf}) as r:
            assert "1000.00 CNY credited back to acme" in await r.text()
    assert (await ledger.balance("acme")).posted == 1200
    assert [(p.kind.value, p.operator) for p in await ledger.history("acme")] == [
        ("topup", "payments"), ("penalty", "payments"), ("adjustment", "payments")]
    assert [e.number for e in await ledger.dnc_list("acme")] == ["13800138000"]


async def test_do_not_call_and_suspension_pages_per_role(served: Served) -> None:
    ledger, base = served.console.ledger, served.base
    async with browser() as http:
        await sign_in(http, served, user="viewer", password=PASSWORD)
        async with http.get(f"{base}/accounts/acme") as r:
            html = await r.text()
            assert "Not suspended." in html and "/complaints/new" not in html
        for path in ("complaints/new", "dnc/add", "suspension/suspend"):
            async with http.get(f"{base}/accounts/acme/{path}") as r:
                assert r.status == 403 and "needs finance" in await r.text()
    async with browser() as http:
        await sign_in(http, served, user="clerk", password=PASSWORD)
        csrf = await form_page(http, f"{base}/accounts/acme/dnc/add")
        async with http.post(f"{base}/accounts/acme/dnc/add", data={
                "number": "13800138000", "reason": " ", "csrf": csrf}) as r:
            assert r.status == 400 and "--reason must not be blank" in await r.text()
        async with http.post(f"{base}/accounts/acme/dnc/add", data={
                "number": "13800138000", "reason": "asked", "csrf": csrf}) as r:
            html = await r.text()
            assert "13800138000 is on the do-not-call list of acme" in html
            assert "/dnc/remove" not in html  # removing is admin's
        async with http.post(f"{base}/accounts/acme/dnc/remove", data={
                "number": "13800138000", "csrf": csrf}) as r:
            assert r.status == 403 and "needs admin" in await r.text()
        async with http.post(f"{base}/accounts/acme/suspension/suspend", data={
                "reason": "unpaid", "csrf": csrf}) as r:
            html = await r.text()
            assert "acme suspended" in html and "by clerk: unpaid" in html
        async with http.post(f"{base}/accounts/acme/suspension/resume", data={
                "note": "", "csrf": csrf}) as r:
            assert "acme resumed" in await r.text()
    async with browser() as http:
        await sign_in(http, served, token=served.tokens["admin"])
        csrf = await form_page(http, f"{base}/accounts/acme/dnc/add")
        async with http.post(f"{base}/accounts/acme/dnc/remove", data={
                "number": "13800138000", "csrf": csrf}) as r:
            assert "13800138000 removed from the do-not-call list of acme" in await r.text()
    assert await ledger.dnc_list() == []
    assert [(e.action, e.operator) for e in await ledger.account_events("acme")] == [
        ("suspend", "clerk"), ("resume", "clerk")]


async def test_the_do_not_call_page_for_every_account(ledger_url: str, tmp_path: Path) -> None:
    """`/dnc`: the entries for everyone (`dnc … --all`), added by finance, removed by admin,
    with the per-account pages' rules, messages and CSRF/role checks; on both backends."""
    async with console_at(ledger_url, tmp_path) as served:
        ledger, base, url = served.console.ledger, served.base, served.base + "/dnc"
        # An account's own entry is not one for everyone: not listed here.
        await ledger.dnc_add("acme", "13800138000", reason="asked", operator="boss",
                             at=datetime.now(UTC))
        async with browser() as http:
            await sign_in(http, served, user="viewer", password=PASSWORD)
            async with http.get(f"{base}/accounts") as r:
                assert 'href="/dnc"' in await r.text()  # in the console's navigation
            async with http.get(url) as r:
                html = await r.text()
                assert r.status == 200 and "Live entries (0)" in html
                assert "13800138000" not in html and "/dnc/add" not in html
            async with http.get(f"{url}/add") as r:
                assert r.status == 403 and "needs finance" in await r.text()
        async with browser() as http:
            await sign_in(http, served, user="clerk", password=PASSWORD)
            async with http.get(url) as r:
                assert 'href="/dnc/add"' in await r.text()
            csrf = await form_page(http, f"{url}/add")
            form = {"number": "139 0013 9000", "reason": "regulator", "csrf": csrf}
            before = await ledger.dnc_list()
            for bad, status, line in (
                    ({"number": "12ab"}, 400, "number: &#x27;12ab&#x27; is not a phone number"),
                    ({"reason": " "}, 400, "--reason must not be blank"),
                    ({"reason": "a\nb"}, 400, "must be one line of text"),
                    ({"csrf": "forged"}, 403, "the form has expired")):
                async with http.post(f"{url}/add", data={**form, **bad}) as r:
                    html = await r.text()
                    assert r.status == status and line in html, html[-800:]
                assert await ledger.dnc_list() == before
            async with http.post(f"{url}/add", data=form) as r:
                html = await r.text()
                assert r.url.path == "/dnc"
                assert ('id="flash">13900139000 is on the do-not-call list of everyone (all '
                        "agents within a second)") in html
            [entry] = await ledger.dnc_list("")
            assert (entry.account, entry.number, entry.reason, entry.operator) == (
                "", "13900139000", "regulator", "clerk")
            when = entry.added_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            assert "Added (UTC)" in html and "Live entries (1)" in html
            row = re.search(r'<div id="dnc">.*</div>', html, re.S)
            assert row and all(x in row.group(0) for x in (
                "13900139000", "regulator", "clerk", when)), html[-800:]
            assert "13800138000" not in html
            assert "/dnc/remove" not in html  # removing is admin's
            async with http.post(f"{url}/add", data=form) as r:  # a double click: a replay
                assert ("13900139000 was already on the do-not-call list of everyone"
                        in await r.text())
            assert await ledger.dnc_list("") == [entry]
            async with http.post(f"{url}/remove", data={"number": entry.number,
                                                        "csrf": csrf}) as r:
                assert r.status == 403 and "needs admin" in await r.text()
            assert await ledger.dnc_list("") == [entry]
        async with browser() as http:
            await sign_in(http, served, token=served.tokens["admin"])
            async with http.get(url) as r:
                html = await r.text()
                assert 'action="/dnc/remove"' in html
            csrf = hidden(html, "csrf")
            async with http.post(f"{url}/remove", data={"number": "13900139000",
                                                        "csrf": "forged"}) as r:
                assert r.status == 403
            assert await ledger.dnc_list("") == [entry]
            async with http.post(f"{url}/remove", data={"number": "13900139000",
                                                        "csrf": csrf}) as r:
                html = await r.text()
                assert r.url.path == "/dnc"
                assert "13900139000 removed from the do-not-call list of everyone" in html
                assert "Live entries (0)" in html
            async with http.post(f"{url}/remove", data={"number": "13900139000",
                                                        "csrf": csrf}) as r:
                assert "13900139000 was not on the do-not-call list of everyone" in (
                    await r.text())
        assert [(x.account, x.number) for x in await ledger.dnc_list()] == [
            ("acme", "13800138000")]
