"""The clerk's pages in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``).

Two flows, kept short because browsers are slow on a shared machine. One: sign in
with a token, top up with a reference through the review-and-confirm step, see
the new balance and the posting in the statement, have a bad amount and a
top-up below the first-top-up minimum refused with their messages and nothing
written, and download the statement CSV and check it adds up. Two: sign in with
a user and password, record a complaint (review, confirm) and see its fine in
the statement and CSV and the callee on the account's do-not-call list.

Without Chromium the test is skipped with one line, except under CI
(``CI=true``), where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from tests.web_harness import PASSWORD, Served, console_at

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> tuple[str, str]:
    binary = next((b for name in BROWSERS if (b := shutil.which(name) or "")), "")
    driver = shutil.which("chromedriver") or ""
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = ""
    if not binary or not driver:
        missing = "the selenium package" if driver == "" and binary else "chromium/chromedriver"
        message = (f"no headless browser ({missing} not installed; "
                   "apt-get install chromium chromium-driver)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    return binary, driver


def _driver(binary: str, driver: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=412,915"):  # a phone's width: the pages must work there
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _flow(browser: Any, s: Served) -> dict[str, Any]:
    """Everything the clerk does, in the browser (runs in a thread: the server is on the loop)."""
    from selenium.webdriver.common.by import By

    def field(element_id: str, text: str) -> None:
        box = browser.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(text)

    def text_of(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def wait_url(suffix: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 15).until(lambda b: b.current_url.endswith(suffix))

    # Each step below waits for an element only the next page has: a click that
    # navigates returns before the new page is there.
    browser.implicitly_wait(15)
    seen: dict[str, Any] = {}
    browser.get(s.base + "/accounts")
    wait_url("/login")
    field("token", s.tokens["finance"])
    browser.find_element(By.ID, "sign-in").click()
    wait_url("/accounts")
    seen["balances"] = browser.find_element(By.TAG_NAME, "main").text
    browser.find_element(By.LINK_TEXT, "acme").click()
    browser.find_element(By.LINK_TEXT, "Top up").click()

    # A refused amount: the rule's message on the form, no confirmation step.
    field("amount", "-5")
    field("ref", "BANK-7")
    browser.find_element(By.ID, "review").click()
    seen["bad_amount"] = text_of("error")
    browser.implicitly_wait(0)
    assert not browser.find_elements(By.ID, "confirm")
    browser.implicitly_wait(15)

    field("amount", "150.50")
    field("ref", "BANK-7")
    field("note", "wire 7")
    browser.find_element(By.ID, "review").click()
    seen["summary"] = text_of("summary")
    browser.find_element(By.ID, "confirm").click()
    seen["flash"] = text_of("flash")
    seen["balance"] = text_of("balance")
    seen["statement"] = browser.find_element(By.TAG_NAME, "main").text
    seen["viewport_overflow"] = browser.execute_script(
        "return document.documentElement.scrollWidth > window.innerWidth + 1")
    seen["csv"] = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('csv').href).then(r => r.text()).then(done);")

    # A top-up the ledger refuses at confirmation (beta's first is below the minimum).
    browser.get(s.base + "/accounts/beta/topup")
    field("amount", "99")
    field("ref", "BANK-8")
    browser.find_element(By.ID, "review").click()
    browser.find_element(By.ID, "confirm").click()
    seen["below_minimum"] = text_of("error")
    return seen


async def test_a_clerk_tops_up_and_reads_the_statement_in_a_browser(tmp_path: Path) -> None:
    binary, driver = _browser()
    async with console_at(f"sqlite://{tmp_path}/ledger.db", tmp_path) as s:
        browser = await asyncio.to_thread(_driver, binary, driver)
        try:
            seen = await asyncio.wait_for(asyncio.to_thread(_flow, browser, s), 90)
        finally:
            await asyncio.to_thread(browser.quit)
        ledger = s.console.ledger
        acme = await ledger.history("acme")
        beta = [b for b in await ledger.balances() if b.account == "beta"]
    assert "ACME Telemarketing" in seen["balances"] and "Beta Sales" in seen["balances"]
    assert seen["bad_amount"] == "amount '-5' must not be negative"
    assert seen["summary"] == "Top up 150.50 CNY: the balance goes from 0.00 to 150.50."
    assert seen["flash"] == "topped up 150.50 CNY (ref BANK-7, by payments)"
    assert seen["balance"] == "150.50"
    assert "BANK-7" in seen["statement"] and "wire 7" in seen["statement"]
    assert "payments" in seen["statement"]  # the operator: the token's name
    assert seen["viewport_overflow"] is False
    rows = list(csv.DictReader(io.StringIO(seen["csv"])))
    assert [r["type"] for r in rows] == ["opening", "topup", "closing"]
    assert sum(D(r["amount"]) for r in rows[:-1]) == D(rows[-1]["amount"]) == D("150.50")
    assert seen["below_minimum"] == ("the first top-up of account 'beta' must be at least "
                                     "100.00 (got 99.00)")
    assert [(p.ref, p.amount, p.operator) for p in acme] == [("BANK-7", D("150.50"), "payments")]
    assert beta == []


def _complaint_flow(browser: Any, s: Served) -> dict[str, Any]:
    """Record a complaint from the account page: review, confirm, then read the page."""
    from selenium.webdriver.common.by import By

    def field(element_id: str, text: str) -> None:
        box = browser.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(text)

    browser.implicitly_wait(15)
    seen: dict[str, Any] = {}
    browser.get(s.base + "/login")
    field("user", "clerk")
    field("password", PASSWORD)
    browser.find_element(By.ID, "sign-in").click()
    browser.find_element(By.LINK_TEXT, "acme").click()
    browser.find_element(By.LINK_TEXT, "Record a complaint").click()
    field("callee", "13800138000")
    field("ticket", "12321-77")
    field("note", "called after opt-out")
    browser.find_element(By.ID, "review").click()
    seen["summary"] = browser.find_element(By.ID, "summary").text
    browser.find_element(By.ID, "confirm").click()
    seen["flash"] = browser.find_element(By.ID, "flash").text
    seen["balance"] = browser.find_element(By.ID, "balance").text
    seen["page"] = browser.find_element(By.TAG_NAME, "main").text
    seen["dnc"] = browser.find_element(By.ID, "dnc").text
    seen["viewport_overflow"] = browser.execute_script(
        "return document.documentElement.scrollWidth > window.innerWidth + 1")
    seen["csv"] = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('csv').href).then(r => r.text()).then(done);")
    return seen


async def test_a_clerk_records_a_complaint_in_a_browser(tmp_path: Path) -> None:
    """§10.3: the fine shows in the statement, the callee is on the do-not-call list."""
    from datetime import UTC, datetime

    binary, driver = _browser()
    async with console_at(f"sqlite://{tmp_path}/ledger.db", tmp_path) as s:
        ledger = s.console.ledger
        await ledger.topup("acme", D(1500), ref="BANK-1", at=datetime.now(UTC),
                           first_minimum=D(100), operator="payments")
        browser = await asyncio.to_thread(_driver, binary, driver)
        try:
            seen = await asyncio.wait_for(asyncio.to_thread(_complaint_flow, browser, s), 90)
        finally:
            await asyncio.to_thread(browser.quit)
        history = await ledger.history("acme")
        entries = await ledger.dnc_list("acme")
    assert "Fine 1000.00 CNY: the balance goes from 1500.00 to 500.00." in seen["summary"]
    assert seen["flash"] == ("complaint 12321-77: fined 1000.00 CNY (by clerk); 13800138000 "
                             "is on acme's do-not-call list")
    assert seen["balance"] == "500.00"
    # The statement on the page lists the fine with its reference and operator.
    assert "penalty -1000.00 complaint:12321-77 complaint 12321-77 clerk" in seen["page"]
    assert "13800138000" in seen["dnc"] and "complaint 12321-77" in seen["dnc"]
    assert seen["viewport_overflow"] is False
    rows = list(csv.DictReader(io.StringIO(seen["csv"])))
    assert [(r["type"], r["amount"], r["reference"]) for r in rows[1:-1]] == [
        ("topup", "1500.0000", "BANK-1"), ("penalty", "-1000.0000", "complaint:12321-77")]
    assert sum(D(r["amount"]) for r in rows[:-1]) == D(rows[-1]["amount"]) == D(500)
    assert [(p.kind.value, p.ref, p.operator) for p in history][-1] == (
        "penalty", "complaint:12321-77", "clerk")
    assert [(e.number, e.operator) for e in entries] == [("13800138000", "clerk")]
