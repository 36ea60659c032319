"""The clerk's pages: sign-in, balances, an account, statements, money forms, the report.

Server-rendered HTML with no JavaScript; one small stylesheet inline, readable
on a phone (a viewport, tables that scroll sideways, forms one field a line).
Every value from a user or the ledger goes through :func:`e` (HTML escaping).

A money action is two steps: the form is checked by the finance rules (the
CLI's) and a confirmation page shows exactly what will be written and the
balance after it; only "Confirm" writes. A refusal shows the rule's one-line
message on the form again, and nothing is written. Every form carries the
session's CSRF token (the sign-in form a double-submit cookie), and the session
cookie is ``HttpOnly; SameSite=Strict`` (``Secure`` behind HTTPS).
"""

from __future__ import annotations

import math
import secrets
from datetime import timedelta
from decimal import Decimal
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from agent import finance
from agent.ledger import LedgerError, PostingKind
from agent.money import CURRENCY, format_amount
from agent.web import api
from agent.web.auth import Principal, Role, same
from agent.web.server import (
    PRINCIPAL,
    SESSION,
    SESSION_COOKIE,
    ApiError,
    client,
    console,
    needs,
    one_line,
    principal,
    public,
    status_of,
)

LOGIN_COOKIE = "callgate_login"
KINDS = {"topup": PostingKind.TOPUP, "penalty": PostingKind.PENALTY,
         "refund": PostingKind.REFUND, "adjustment": PostingKind.ADJUSTMENT,
         "reopen": PostingKind.REOPEN}
TITLES = {PostingKind.TOPUP: "Top up", PostingKind.PENALTY: "Fine",
          PostingKind.REFUND: "Refund and close", PostingKind.ADJUSTMENT: "Adjust",
          PostingKind.REOPEN: "Reopen"}
NO_AMOUNT = (PostingKind.REFUND, PostingKind.REOPEN)

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:0 1rem 2rem;max-width:60rem;
line-height:1.4;color:#111}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;padding:.6rem 0;
border-bottom:1px solid #ccc;margin-bottom:1rem}
header a{text-decoration:none}
header form{margin-left:auto}
.scroll{overflow-x:auto}
table{border-collapse:collapse;min-width:100%}
th,td{padding:.3rem .5rem;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.error{background:#fde8e8;border:1px solid #e0a0a0;padding:.6rem;margin:.6rem 0}
.ok{background:#e6f4e6;border:1px solid #9c9;padding:.6rem;margin:.6rem 0}
label{display:block;margin:.6rem 0 .2rem}
input,button{font-size:1rem;padding:.45rem;max-width:100%}
input[type=text],input[type=password],input[type=date]{width:20rem}
button{cursor:pointer}
.actions a,.actions button{display:inline-block;margin:.25rem .4rem .25rem 0}
.actions a{padding:.45rem .7rem;border:1px solid #99b;border-radius:4px}
.neg{color:#a00}
"""


def e(value: Any) -> str:
    return escape(str(value), quote=True)


def money(amount: Decimal) -> str:
    text = format_amount(amount)
    return f'<span class="neg">{text}</span>' if amount < 0 else text


def _session(request: web.Request) -> Any:
    return request.get(SESSION)


def csrf_field(request: web.Request) -> str:
    session = _session(request)
    return f'<input type="hidden" name="csrf" value="{e(session.csrf)}">' if session else ""


def render(request: web.Request, title: str, body: str, status: int = 200,
           headers: dict[str, str] | None = None) -> web.Response:
    who: Principal | None = request.get(PRINCIPAL)
    nav = ""
    if who is not None:
        nav = (f'<a href="/accounts">Balances</a><a href="/report">Month-end report</a>'
               '<a href="/dnc">Do-not-call for every account</a>'
               f'<span>{e(who.name)} ({e(who.role.label)})</span>'
               f'<form method="post" action="/logout">{csrf_field(request)}'
               '<button type="submit">Sign out</button></form>')
    html = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)} · callgate</title><style>{STYLE}</style></head><body>"
            f"<header><strong>callgate finance</strong>{nav}</header>"
            f"<main><h1>{e(title)}</h1>{body}</main></body></html>")
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status,
                        headers=headers)


def error_page(request: web.Request, status: int, message: str,
               headers: dict[str, str] | None = None) -> web.Response:
    back = '<p><a href="/accounts">Back to the balances</a></p>' if request.get(
        PRINCIPAL) else '<p><a href="/login">Sign in</a></p>'
    return render(request, f"Error {status}", f'<p class="error" role="alert">{e(message)}</p>'
                  + back, status, headers)


def flash(request: web.Request) -> str:
    """The message of the last write, shown once on the page the form returned to."""
    session = _session(request)
    if session is None or not session.flash:
        return ""
    message, session.flash = session.flash, ""
    return f'<p class="ok" role="status" id="flash">{e(message)}</p>'


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f'<th class="n">{h}</th>' if i in numeric else f"<th>{h}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                     for i, c in enumerate(row)) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


async def _form(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _check_csrf(request: web.Request, form: dict[str, str]) -> None:
    session = _session(request)
    if session is None or not same(form.get("csrf", ""), session.csrf):
        raise ApiError(403, "the form has expired or did not come from this site; "
                            "reload the page and try again")


def _secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


# -- sign in and out ----------------------------------------------------------------------
def _login_page(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    nonce = secrets.token_urlsafe(24)
    body = (f'<p class="error" role="alert">{e(error)}</p>' if error else "") + (
        '<form method="post" action="/login">'
        f'<input type="hidden" name="nonce" value="{e(nonce)}">'
        '<label for="token">API token</label>'
        '<input type="password" id="token" name="token" autocomplete="off">'
        "<p>or</p>"
        '<label for="user">User</label><input type="text" id="user" name="user" '
        'autocomplete="username">'
        '<label for="password">Password</label><input type="password" id="password" '
        'name="password" autocomplete="current-password">'
        '<p><button type="submit" id="sign-in">Sign in</button></p></form>')
    response = render(request, "Sign in", body, status)
    response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="Strict", path="/login",
                        secure=_secure(request), max_age=3600)
    return response


@public
async def login_form(request: web.Request) -> web.StreamResponse:
    return _login_page(request)


@public
async def login(request: web.Request) -> web.StreamResponse:
    c = console(request)
    form = await _form(request)
    if not same(form.get("nonce", "-"), request.cookies.get(LOGIN_COOKIE, "")):
        return _login_page(request, "the sign-in form expired; try again", 403)
    now = c.monotonic()
    wait = c.failures.blocked_for(client(request), now)
    if wait:
        return _login_page(request, f"too many failed sign-ins; try again in {math.ceil(wait)} s",
                           429)
    credentials = c.credentials()
    token = form.get("token", "").strip()
    if token:
        who = credentials.by_token(token)
    else:
        who = credentials.by_password(form.get("user", "").strip(), form.get("password", ""))
    if who is None:
        c.failures.failed(client(request), now)
        return _login_page(request, "wrong token, user or password", 401)
    sid = c.sessions.start(who, now)
    response = web.HTTPSeeOther("/accounts")
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="Strict", path="/",
                        secure=_secure(request))
    response.del_cookie(LOGIN_COOKIE, path="/login")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    _check_csrf(request, await _form(request))
    console(request).sessions.end(request.cookies.get(SESSION_COOKIE, ""))
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


@public
async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/accounts")


# -- balances and the account page ---------------------------------------------------------
def _account_url(account: str, **query: str) -> str:
    url = f"/accounts/{quote(account, safe='')}"
    return f"{url}?{urlencode(query)}" if query else url


async def balances(request: web.Request) -> web.Response:
    rows = []
    for a in await api.overview(console(request)):
        status = "closed" if a["closed"] else ("no top-up yet" if not a["in_ledger"] else "open")
        if not a["in_policy"]:
            status += ", not in the policy"
        rows.append([f'<a href="{e(_account_url(a["account"]))}">{e(a["account"])}</a>',
                     e(a["name"]), money(a["posted"]), money(a["held"]),
                     money(a["available"]), e(status)])
    body = (_table(["Account", "Customer", "Balance", "Held", "Available", "Status"], rows,
                   {2, 3, 4}) if rows else "<p>No accounts yet.</p>")
    return render(request, f"Balances ({CURRENCY})", body)


def _statement_html(s: finance.Statement) -> str:
    call_rows = [[e(finance.local(c.answered_at or c.ended_at, s.zone)), e(c.callee),
                  str(c.billsec), money(-c.amount), "cut off" if c.cut_off else ""]
                 for c in s.calls]
    post_rows = [[e(finance.local(p.at, s.zone)), e(p.kind.value), money(finance.signed(p)),
                  e(p.ref), e(p.note), e(p.operator)] for p in s.postings]
    t = s.totals
    # Signed by their effect, as in the CLI's statement: closing = opening + the rest.
    totals = [["Opening balance", money(s.opening)], ["Top-ups", money(t["topup"])],
              ["Calls", money(t["calls"])], ["Fines", money(t["penalty"])],
              ["Refunds", money(t["refund"])], ["Adjustments", money(t["adjustment"])],
              ["Closing balance", f'<strong id="closing">{money(s.closing)}</strong>']]
    return (f"<p>{e(s.first_day)} to {e(s.last_day)}, times in {e(s.zone)}</p>"
            f"<h3>Postings ({len(s.postings)})</h3>"
            + (_table(["Time", "Kind", "Amount", "Reference", "Note", "Operator"], post_rows,
                      {2}) if post_rows else "<p>None.</p>")
            + f"<h3>Calls ({len(s.calls)})</h3>"
            + (_table(["Answered", "Callee", "Billsec", "Amount", ""], call_rows, {2, 3})
               if call_rows else "<p>None.</p>")
            + "<h3>Totals</h3>" + _table(["", CURRENCY], totals, {1}))


async def account_page(request: web.Request) -> web.Response:
    c, name = console(request), request.match_info["account"]
    policy = c.policy()
    balance, in_ledger = await api.account_balance(c, name)
    who = principal(request)
    parts = [flash(request), _table(["Balance", "Held", "Available", "Status"], [[
        f'<span id="balance">{money(balance.posted)}</span>', money(balance.held),
        f'<span id="available">{money(balance.available)}</span>',
        "closed" if balance.closed else ("open" if in_ledger else "no top-up yet")]], {0, 1, 2})]
    if who.role >= Role.FINANCE:
        # A closed account takes no posting until it is reopened (the ledger's rule).
        links = "".join(f'<a href="{e(_account_url(name))}/{k}">{e(TITLES[kind])}</a>'
                        for k, kind in KINDS.items()
                        if (kind is PostingKind.REOPEN) == balance.closed)
        parts.append(f'<p class="actions">{links}</p>')
    live = await c.ledger.live_calls(name)
    now = c.now()
    if live:
        rows = [[e(r.callee), e(r.status.value), str(api.call_json(r, now)["elapsed_seconds"]
                                                     or "-"), str(r.paid_seconds), money(r.held)]
                for r in live]
        parts.append("<h2>Live calls</h2>" + _table(
            ["Callee", "Status", "Elapsed s", "Paid s", "Held"], rows, {2, 3, 4}))
    if in_ledger:
        zone = api.zone_of(c, name)
        recent = await c.ledger.cdrs(name, now - timedelta(days=7), now)
        rows = [[e(finance.local(x.answered_at or x.ended_at, zone)), e(x.callee),
                 str(x.billsec), money(-x.amount)] for x in recent[-20:][::-1]]
        parts.append("<h2>Recent calls (7 days)</h2>" + (
            _table(["Answered", "Callee", "Billsec", "Amount"], rows, {2, 3}) if rows
            else "<p>None.</p>"))
        default_from, default_to = api.default_period(zone, now)
        start = request.query.get("from") or default_from
        end = request.query.get("to") or default_to
        parts.append(
            '<h2>Statement</h2><form method="get" action="">'
            f'<label for="from">From</label><input type="date" id="from" name="from" '
            f'value="{e(start)}"><label for="to">To (included)</label>'
            f'<input type="date" id="to" name="to" value="{e(end)}">'
            '<p class="actions"><button type="submit">Show</button>'
            f'<a id="csv" href="{e(_account_url(name))}/statement.csv?'
            f'{e(urlencode({"from": start, "to": end}))}">Download CSV</a></p></form>')
        try:
            s = await finance.statement(c.ledger, name, zone, start, end, now)
            parts.append(_statement_html(s))
        except finance.Refused as exc:
            parts.append(f'<p class="error" role="alert">{e(exc)}</p>')
    from agent.web.compliance_pages import section

    parts.append(await section(request, name))
    title = f"{name} — {api.customer_name(policy, name)}".rstrip(" —")
    return render(request, title, "".join(parts))


async def statement_csv(request: web.Request) -> web.Response:
    c, name = console(request), request.match_info["account"]
    start, end = request.query.get("from") or None, request.query.get("to") or None
    s = await finance.statement(c.ledger, name, api.zone_of(c, name), start, end, c.now(),
                                api.customer_name(c.policy(), name))
    return api.csv_response(api.csv_text(finance.csv_rows(s)),
                            f"{name}-{s.first_day}-{s.last_day}.csv")


# -- money forms ---------------------------------------------------------------------------------
def _kind(request: web.Request) -> PostingKind:
    kind = KINDS.get(request.match_info["kind"])
    if kind is None:
        raise web.HTTPNotFound()
    return kind


def _fields(kind: PostingKind, values: dict[str, str]) -> str:
    html = ""
    if kind not in NO_AMOUNT:
        hint = " (signed: -12.50 takes money off)" if kind is PostingKind.ADJUSTMENT else ""
        html += (f'<label for="amount">Amount in {CURRENCY}{hint}</label>'
                 f'<input type="text" id="amount" name="amount" inputmode="decimal" required '
                 f'value="{e(values.get("amount", ""))}">')
    html += ('<label for="ref">Reference (payment, complaint or payout number)</label>'
             f'<input type="text" id="ref" name="ref" required value="{e(values.get("ref", ""))}">')
    note = "reason" if kind in (PostingKind.PENALTY, PostingKind.ADJUSTMENT) else "note"
    required = " required" if kind is PostingKind.ADJUSTMENT else ""
    html += (f'<label for="note">{note.capitalize()}</label>'
             f'<input type="text" id="note" name="note"{required} '
             f'value="{e(values.get("note", ""))}">')
    return html


async def _form_page(request: web.Request, kind: PostingKind, values: dict[str, str],
                     error: str = "", status: int = 200) -> web.Response:
    c, name = console(request), request.match_info["account"]
    balance, _ = await api.account_balance(c, name)
    body = (f'<p class="error" role="alert" id="error">{e(error)}</p>' if error else "") + (
        f"<p>Available now: {money(balance.available)} {CURRENCY}</p>"
        f'<form method="post" action="">{csrf_field(request)}'
        '<input type="hidden" name="step" value="review">'
        f"{_fields(kind, values)}"
        '<p class="actions"><button type="submit" id="review">Review</button>'
        f'<a href="{e(_account_url(name))}">Cancel</a></p></form>')
    return render(request, f"{TITLES[kind]}: {name}", body, status)


@needs(Role.FINANCE)
async def money_form(request: web.Request) -> web.Response:
    return await _form_page(request, _kind(request), {})


@needs(Role.FINANCE)
async def money_post(request: web.Request) -> web.StreamResponse:
    c, name, kind = console(request), request.match_info["account"], _kind(request)
    form = await _form(request)
    _check_csrf(request, form)
    values = {k: form.get(k, "") for k in ("amount", "ref", "note")}
    try:
        req = finance.request(kind, name, None if kind in NO_AMOUNT else values["amount"],
                              values["ref"], values["note"])
        if form.get("step") != "confirm":
            return await _confirm_page(request, kind, req, values)
        result = await finance.post(c.ledger, req, at=c.now(),
                                    operator=principal(request).name, policy=c.policy)
    except (finance.Refused, LedgerError) as exc:
        return await _form_page(request, kind, values, one_line(str(exc)), status_of(exc))
    _session(request).flash = finance.summary(result)
    raise web.HTTPSeeOther(_account_url(name))


async def _confirm_page(request: web.Request, kind: PostingKind, req: finance.Request,
                        values: dict[str, str]) -> web.Response:
    c, name = console(request), req.account
    balance, _ = await api.account_balance(c, name)
    if kind is PostingKind.REOPEN:
        what = "Open the closed account again: it takes calls and postings from now on."
    elif kind is PostingKind.REFUND:
        what = (f"Pay out the available balance ({money(balance.available)} {CURRENCY}) "
                "and close the account. It will take no new calls or top-ups.")
    else:
        assert req.amount is not None
        effect = req.amount if kind in (PostingKind.TOPUP, PostingKind.ADJUSTMENT) else -req.amount
        what = (f"{e(TITLES[kind])} {money(req.amount)} {CURRENCY}: the balance goes from "
                f"{money(balance.posted)} to {money(balance.posted + effect)}.")
    hidden = "".join(f'<input type="hidden" name="{k}" value="{e(v)}">' for k, v in values.items())
    body = (f'<p id="summary">{what}</p><p>Account {e(name)}, reference '
            f'<strong>{e(req.ref)}</strong>' + (f", {e(req.note)}" if req.note else "") + "</p>"
            f'<form method="post" action="">{csrf_field(request)}{hidden}'
            '<input type="hidden" name="step" value="confirm">'
            '<p class="actions"><button type="submit" id="confirm">Confirm</button>'
            f'<a href="{e(_account_url(name))}/{e(request.match_info["kind"])}">Back</a></p>'
            "</form>")
    return render(request, f"Confirm: {TITLES[kind].lower()} {name}", body)


# -- month-end --------------------------------------------------------------------------------
async def report_page(request: web.Request) -> web.Response:
    c = console(request)
    now = c.now()
    first = (now.date().replace(day=1) - timedelta(days=1)).replace(day=1)
    start = request.query.get("from") or first.isoformat()
    end = request.query.get("to") or (now.date().replace(day=1) - timedelta(days=1)).isoformat()
    form = ('<form method="get" action="/report"><label for="from">From</label>'
            f'<input type="date" id="from" name="from" value="{e(start)}">'
            '<label for="to">To (included)</label>'
            f'<input type="date" id="to" name="to" value="{e(end)}">'
            '<p class="actions"><button type="submit">Show</button>'
            f'<a href="/report.csv?{e(urlencode({"from": start, "to": end}))}">Download CSV</a>'
            "</p></form>")
    try:
        r = await api.report(c, start, end)
    except finance.Refused as exc:
        return render(request, "Month-end report", form + f'<p class="error">{e(exc)}</p>', 400)
    columns = [f for f, _ in finance.REPORT_COLUMNS]

    def cell(value: Any) -> str:
        return money(value) if isinstance(value, Decimal) else e(value)

    rows = [[e(a["account"]), e(a["name"] or ""), *(cell(a[k]) for k in columns)]
            for a in r["accounts"]]
    rows.append(["<strong>Total</strong>", "", *(cell(r["totals"][k]) for k in columns)])
    body = form + _table(["Account", "Customer", *(h.capitalize() for _, h in
                                                   finance.REPORT_COLUMNS)],
                         rows, set(range(2, 2 + len(columns))))
    return render(request, "Month-end report", body)


async def report_csv(request: web.Request) -> web.Response:
    start, end = request.query.get("from", ""), request.query.get("to", "")
    r = await api.report(console(request), start, end)
    return api.csv_response(api.csv_text(r["_csv"]), f"report-{start}-{end}.csv")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", root)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/accounts", balances)
    r.add_get("/accounts/{account}", account_page)
    r.add_get("/accounts/{account}/statement.csv", statement_csv)
    r.add_get("/accounts/{account}/{kind}", money_form)
    r.add_post("/accounts/{account}/{kind}", money_post)
    r.add_get("/report", report_page)
    r.add_get("/report.csv", report_csv)
