"""The clerk's compliance pages: complaints, live do-not-call entries, suspensions.

The account page gets a compliance section (:func:`section`): whether the
account is suspended, its complaints and its live do-not-call entries, with
the actions the clerk's role allows (the API's roles, agent/web/compliance.py).
The entries for every account (``callgate dnc … --all``) have their own page,
``/dnc`` (:func:`everyone_page`): the same table, add form and remove button as
an account's, by the same handlers with no account (:func:`_scope` is None).

A complaint posts a fine and a withdrawal credits it back, so both are two
steps like the money forms: the form is checked by the CLI's rules
(:mod:`agent.compliance.actions`) and a confirmation page shows what will be
written (the fine, the balance after it, the do-not-call entry, a suspension
the policy's threshold would bring); only "Confirm" writes. The review fixes
the complaint's time, so a second "Confirm" (a double click, a reload) is the
same request again: a replay that writes nothing. Adding a do-not-call entry,
suspending and resuming move no money: one step. Every form carries the
session's CSRF token; a refusal shows the rule's one-line message and writes
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from agent import finance
from agent.compliance import actions
from agent.ledger import LedgerError
from agent.ledger.compliance import GLOBAL, DncEntry
from agent.money import CURRENCY, format_amount
from agent.web import api
from agent.web import compliance as core
from agent.web.auth import Role
from agent.web.pages import (
    _account_url,
    _check_csrf,
    _form,
    _session,
    _table,
    csrf_field,
    e,
    flash,
    money,
    render,
)
from agent.web.server import console, needs, one_line, principal, status_of


def _error(message: str) -> str:
    return f'<p class="error" role="alert" id="error">{e(message)}</p>' if message else ""


def _input(name: str, label: str, values: dict[str, str], required: bool = False,
           hint: str = "") -> str:
    return (f'<label for="{name}">{e(label)}</label>'
            f'<input type="text" id="{name}" name="{name}"{" required" if required else ""} '
            f'value="{e(values.get(name, ""))}">'
            + (f"<small> {e(hint)}</small>" if hint else ""))


EVERYONE_URL = "/dnc"  # the page of the do-not-call entries for every account


def _scope(request: web.Request) -> str | None:
    """The account a do-not-call page is for; None on the pages for every account."""
    return request.match_info.get("account")


def _back(account: str | None) -> str:
    """Where a form returns: the account's page, or the page of the entries for everyone."""
    return EVERYONE_URL if account is None else _account_url(account)


def _whose(account: str | None) -> str:
    """Whose do-not-call list it is, in a message: the CLI's words ("everyone")."""
    return "everyone" if account is None else account


def _done(request: web.Request, account: str | None, message: str) -> web.StreamResponse:
    _session(request).flash = message
    raise web.HTTPSeeOther(_back(account))


def _hidden(values: dict[str, str]) -> str:
    return "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">'
                   for k, v in values.items())


# -- the account page's section ---------------------------------------------------------------
async def section(request: web.Request, account: str) -> str:
    """Suspension, complaints and live do-not-call entries of a policy account, with actions."""
    c = console(request)
    policy = c.policy()
    if account not in policy.accounts:
        return ""
    zone = actions.policy_account(policy, account)
    who = principal(request)
    url = _account_url(account)
    suspension = await c.ledger.suspension(account)
    parts = ["<h2>Compliance</h2>"]
    if suspension is None:
        parts.append('<p id="suspension">Not suspended.</p>')
    else:
        parts.append(f'<p class="error" id="suspension">Suspended since '
                     f"{e(finance.local(suspension.at, zone))} by {e(suspension.operator)}: "
                     f"{e(suspension.reason)}. Its calls are refused on every agent.</p>")
    if who.role >= Role.FINANCE:
        links = [f'<a href="{e(url)}/complaints/new">Record a complaint</a>',
                 f'<a href="{e(url)}/dnc/add">Add to do-not-call</a>',
                 f'<a href="{e(url)}/suspension/{"suspend" if suspension is None else "resume"}"'
                 f'>{"Suspend" if suspension is None else "Resume"}</a>']
        parts.append(f'<p class="actions">{"".join(links)}</p>')
    complaints = await c.ledger.complaints(account)
    rows = []
    for x in complaints[::-1][:50]:
        action = ""
        if who.role >= Role.FINANCE and not x.withdrawn:
            action = ('<form method="post" action="/complaints/withdraw">'
                      f"{csrf_field(request)}{_hidden({'ticket': x.ticket, 'step': 'review'})}"
                      '<button type="submit">Withdraw</button></form>')
        rows.append([e(x.ticket), e(x.callee), e(finance.local(x.at, zone)), money(x.fine),
                     "withdrawn" if x.withdrawn else "standing", e(x.operator), action])
    parts.append(f"<h3>Complaints ({len(complaints)})</h3>" + (
        _table(["Ticket", "Callee", "At", "Fine", "Status", "Operator", ""], rows, {3})
        if rows else "<p>None.</p>"))
    entries = await c.ledger.dnc_list(account)
    parts.append(f"<h3>Live do-not-call entries ({len(entries)})</h3>"
                 + _dnc_table(request, entries, zone, f"{url}/dnc/remove", "Added"))
    return "".join(parts)


def _dnc_table(request: web.Request, entries: Sequence[DncEntry], zone: ZoneInfo,
               remove_url: str, added: str) -> str:
    """Live do-not-call entries (the first 200), a "Remove" button on each for an admin."""
    admin = principal(request).role >= Role.ADMIN
    rows = []
    for entry in entries[:200]:
        action = ""
        if admin:
            action = (f'<form method="post" action="{e(remove_url)}">'
                      f"{csrf_field(request)}{_hidden({'number': entry.number})}"
                      '<button type="submit">Remove</button></form>')
        rows.append([e(entry.number), e(finance.local(entry.added_at, zone)),
                     e(entry.operator), e(entry.reason), action])
    more = f"<p>The first 200 of {len(entries)}.</p>" if len(entries) > 200 else ""
    return '<div id="dnc">' + (
        _table(["Number", e(added), "Operator", "Reason", ""], rows, set())
        if rows else "<p>None.</p>") + more + "</div>"


# -- the do-not-call entries for every account -------------------------------------------------
async def everyone_page(request: web.Request) -> web.Response:
    """The live entries that apply to every account (``callgate dnc list --all``).

    Their times are in UTC, as the CLI lists them: they belong to no account's zone."""
    c = console(request)
    c.policy()  # a usable policy, as the CLI's ``dnc list`` checks
    entries = await c.ledger.dnc_list(GLOBAL)
    parts = [flash(request),
             "<p>A number here is refused for every account, on every agent within a "
             "second, until an admin removes it.</p>"]
    if principal(request).role >= Role.FINANCE:
        parts.append(f'<p class="actions"><a href="{EVERYONE_URL}/add">Add to do-not-call'
                     "</a></p>")
    parts.append(f"<h2>Live entries ({len(entries)})</h2>"
                 + _dnc_table(request, entries, ZoneInfo("UTC"), f"{EVERYONE_URL}/remove",
                              "Added (UTC)"))
    return render(request, "Do-not-call for every account", "".join(parts))


# -- complaints ----------------------------------------------------------------------------------
COMPLAINT_FIELDS = ("callee", "ticket", "at", "note")


def _complaint_form(request: web.Request, values: dict[str, str], error: str = "",
                    status: int = 200) -> web.Response:
    name = request.match_info["account"]
    body = _error(error) + (
        f'<form method="post" action="">{csrf_field(request)}'
        '<input type="hidden" name="step" value="review">'
        + _input("callee", "Callee (the number that complained)", values, True)
        + _input("ticket", "Ticket (the 12321 complaint number)", values, True)
        + _input("at", "When (YYYY-MM-DDTHH:MM in the account's timezone; empty: now)", values)
        + _input("note", "Note", values)
        + '<p class="actions"><button type="submit" id="review">Review</button>'
        f'<a href="{e(_account_url(name))}">Cancel</a></p></form>')
    return render(request, f"Record a complaint: {name}", body, status)


@needs(Role.FINANCE)
async def complaint_form(request: web.Request) -> web.Response:
    return _complaint_form(request, {})


@needs(Role.FINANCE)
async def complaint_post(request: web.Request) -> web.StreamResponse:
    c, name = console(request), request.match_info["account"]
    form = await _form(request)
    _check_csrf(request, form)
    values = {k: form.get(k, "") for k in COMPLAINT_FIELDS}
    try:
        req = actions.complaint(c.policy(), name, values["callee"], values["ticket"],
                                values["at"] or None, values["note"], c.now())
        if form.get("step") != "confirm":
            return await _complaint_confirm(request, req, values)
        outcome = await core.record_complaint(c, req, principal(request).name)
    except (finance.Refused, LedgerError) as exc:
        return _complaint_form(request, values, one_line(str(exc)), status_of(exc))
    x = outcome.complaint
    if not outcome.created:
        return _done(request, name, f"complaint {x.ticket} was already recorded; "
                                    "nothing new written")
    fined = f"fined {format_amount(x.fine)} {CURRENCY}" if x.fine else "no fine (policy: 0)"
    message = (f"complaint {x.ticket}: {fined} (by {x.operator}); {x.callee} is on "
               f"{x.account}'s do-not-call list")
    if outcome.newly_suspended:
        message += (f"; {x.account} is now suspended ({outcome.complaints_in_period} "
                    "complaints in the policy's period)")
    return _done(request, name, message)


async def _complaint_confirm(request: web.Request, req: actions.ComplaintRequest,
                             values: dict[str, str]) -> web.Response:
    c, name = console(request), req.account
    balance, in_ledger = await api.account_balance(c, name)
    zone = actions.policy_account(c.policy(), name)
    when = req.at or c.now()
    lines = [f"Record complaint <strong>{e(req.ticket)}</strong> against {e(name)}: callee "
             f"{e(req.callee)}, at {e(finance.local(when, zone))}."]
    if req.fine:
        after = balance.posted - req.fine
        lines.append(f"Fine {money(req.fine)} {CURRENCY}: the balance goes from "
                     f"{money(balance.posted)} to {money(after)}."
                     + ("" if in_ledger else " (The ledger has no such account yet: it "
                        "will be refused.)"))
    lines.append(f"{e(req.callee)} goes on {e(name)}'s do-not-call list at once.")
    if req.suspend is not None and await c.ledger.suspension(name) is None:
        standing = [x for x in await c.ledger.complaints(name, when - req.suspend.period,
                                                          when)
                    if not x.withdrawn and x.ticket != req.ticket]
        if req.suspend.due(len(standing) + 1):
            lines.append(f"It is complaint {len(standing) + 1} within the policy's period: "
                         f"{e(name)} will be suspended.")
    # The review fixes the time: confirming twice is the same request (a replay).
    fixed = {**values, "at": when.astimezone(UTC).isoformat(), "step": "confirm"}
    body = ('<div id="summary">' + "".join(f"<p>{line}</p>" for line in lines) + "</div>"
            + (f"<p>Note: {e(req.note)}</p>" if req.note else "")
            + f'<form method="post" action="">{csrf_field(request)}{_hidden(fixed)}'
            '<p class="actions"><button type="submit" id="confirm">Confirm</button>'
            f'<a href="{e(_account_url(name))}/complaints/new">Back</a></p></form>')
    return render(request, f"Confirm: complaint {req.ticket}", body)


@needs(Role.FINANCE)
async def withdraw_post(request: web.Request) -> web.StreamResponse:
    c = console(request)
    form = await _form(request)
    _check_csrf(request, form)
    ticket, note = form.get("ticket", ""), form.get("note", "")
    found = await c.ledger.complaint(ticket)
    if found is None:
        raise finance.NotFound(f"the ledger has no complaint {ticket!r}")
    if form.get("step") == "confirm":
        try:
            x, changed = await core.withdraw_complaint(c, ticket, note,
                                                       principal(request).name)
        except (finance.Refused, LedgerError) as exc:
            # A bad note (or a ledger refusal): the same form again with the line,
            # as every other form does, not a bare error page.
            return await _withdraw_form(request, found, note, one_line(str(exc)),
                                        status_of(exc))
        return _done(request, x.account, (
            f"complaint {x.ticket} withdrawn: {format_amount(x.fine)} {CURRENCY} credited back "
            f"to {x.account}; {x.callee} stays on its do-not-call list") if changed else
            f"complaint {x.ticket} was already withdrawn; nothing new written")
    return await _withdraw_form(request, found, note)


async def _withdraw_form(request: web.Request, found: Any, note: str, error: str = "",
                         status: int = 200) -> web.Response:
    """The confirm step of a withdrawal: what it does to the balance, and the note."""
    balance, _ = await api.account_balance(console(request), found.account)
    what = (f"Withdraw complaint <strong>{e(found.ticket)}</strong> of {e(found.account)}: "
            f"the fine of {money(found.fine)} {CURRENCY} is credited back, the balance goes "
            f"from {money(balance.posted)} to {money(balance.posted + found.fine)}. "
            f"{e(found.callee)} stays on the do-not-call list.")
    body = _error(error) + (
        f'<p id="summary">{what}</p><form method="post" action="/complaints/withdraw">'
        f"{csrf_field(request)}{_hidden({'ticket': found.ticket, 'step': 'confirm'})}"
        + _input("note", "Why (kept with the complaint)", {"note": note})
        + '<p class="actions"><button type="submit" id="confirm">Confirm</button>'
        f'<a href="{e(_account_url(found.account))}">Back</a></p></form>')
    return render(request, f"Confirm: withdraw complaint {found.ticket}", body, status)


# -- do-not-call and suspension (no money: one step) --------------------------------------------
SIMPLE = {  # path: (title, fields (name, label, required))
    "dnc/add": ("Add to do-not-call", [("number", "Number", True),
                                       ("reason", "Reason (kept with the entry)", True)]),
    "suspension/suspend": ("Suspend", [("reason", "Reason", True)]),
    "suspension/resume": ("Resume", [("note", "Note", False)]),
}


def _simple_form(request: web.Request, path: str, values: dict[str, str], error: str = "",
                 status: int = 200) -> web.Response:
    name = _scope(request)
    title, fields = SIMPLE[path]
    body = _error(error) + (
        f'<form method="post" action="">{csrf_field(request)}'
        + "".join(_input(f, label, values, required) for f, label, required in fields)
        + f'<p class="actions"><button type="submit" id="submit">{e(title)}</button>'
        f'<a href="{e(_back(name))}">Cancel</a></p></form>')
    return render(request, f"{title}: {'every account' if name is None else name}", body,
                  status)


def simple_routes(path: str) -> tuple[Any, Any]:
    @needs(Role.FINANCE)
    async def show(request: web.Request) -> web.Response:
        return _simple_form(request, path, dict(request.query))

    @needs(Role.FINANCE)
    async def act(request: web.Request) -> web.StreamResponse:
        c, name = console(request), _scope(request)  # None: the list of every account
        form = await _form(request)
        _check_csrf(request, form)
        values = {f: form.get(f, "") for f, _, _ in SIMPLE[path][1]}
        who = principal(request).name
        try:
            if path == "dnc/add":
                entry, added = await core.add_dnc(c, name, values["number"], values["reason"],
                                                  who)
                whose = _whose(name)
                message = (f"{entry.number} is on the do-not-call list of {whose} (all "
                           "agents within a second)" if added else
                           f"{entry.number} was already on the do-not-call list of {whose}")
            elif path == "suspension/suspend":
                account = request.match_info["account"]
                _, changed = await core.suspend_account(c, account, values["reason"], who)
                message = (f"{account} suspended: its calls are refused on every agent"
                           if changed else f"{account} was already suspended")
            else:
                account = request.match_info["account"]
                changed = await core.resume_account(c, account, values["note"], who)
                message = f"{account} resumed" if changed else f"{account} was not suspended"
        except (finance.Refused, LedgerError) as exc:
            return _simple_form(request, path, values, one_line(str(exc)), status_of(exc))
        return _done(request, name, message)

    return show, act


@needs(Role.ADMIN)
async def dnc_remove_post(request: web.Request) -> web.StreamResponse:
    c, name = console(request), _scope(request)  # None: the list of every account
    form = await _form(request)
    _check_csrf(request, form)
    _, number, removed = await core.remove_dnc(c, name, form.get("number", ""),
                                               form.get("reason", ""), principal(request).name)
    whose = _whose(name)
    return _done(request, name, f"{number} removed from the do-not-call list of {whose}"
                 if removed else f"{number} was not on the do-not-call list of {whose}")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/accounts/{account}/complaints/new", complaint_form)
    r.add_post("/accounts/{account}/complaints/new", complaint_post)
    r.add_post("/complaints/withdraw", withdraw_post)
    for path in SIMPLE:
        show, act = simple_routes(path)
        r.add_get(f"/accounts/{{account}}/{path}", show)
        r.add_post(f"/accounts/{{account}}/{path}", act)
    r.add_post("/accounts/{account}/dnc/remove", dnc_remove_post)
    # The entries for every account: the same add form and remove, with no account.
    r.add_get(EVERYONE_URL, everyone_page)
    show, act = simple_routes("dnc/add")
    r.add_get(f"{EVERYONE_URL}/add", show)
    r.add_post(f"{EVERYONE_URL}/add", act)
    r.add_post(f"{EVERYONE_URL}/remove", dnc_remove_post)

