"""The compliance part of ``/api/v1``: complaints, live do-not-call entries, suspensions.

The same actions as ``callgate complaint|dnc|account``, with their rules
(:mod:`agent.compliance.actions` and the ledger's): the same checks in the same
order with the same one-line messages, as ``{"error": "…"}`` with a 4xx status,
and nothing written. The operator recorded is the token's (or user's) name.

Roles (the least each needs; roles are ordered read < finance < admin):

- ``read``: list and show complaints, the live do-not-call list, an account's
  suspension and its history.
- ``finance``: record a complaint (it posts the policy's fine) and withdraw one
  (the fine is credited back); add a do-not-call entry; suspend and resume an
  account (issue 20: "until finance or ops resume it").
- ``admin``: remove a do-not-call entry. Taking a number off the list lets the
  account call someone who asked not to be called again: that is a compliance
  decision, not a clerk's.

Idempotency: a complaint is recorded once per ticket (the same ticket with the
same content again answers 200 with the original and ``"created": false``;
with other content 409). Its ``complaints_in_period`` and ``suspended`` are the
account's state now, on a replay too (withdrawals and suspensions since count).
Adding an entry that exists, removing one that does not, suspending a suspended
account and resuming an active one write nothing and answer 200 with
``"added"``/``"removed"``/``"changed": false``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from agent import finance
from agent.compliance import actions
from agent.ledger.compliance import ComplaintOutcome, typed_ticket
from agent.web.auth import Role
from agent.web.server import console, json_response, needs, principal

log = structlog.get_logger("callgate.web")

PREFIX = "/api/v1"


def fields(data: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...],
           what: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise finance.Refused(f"unknown field(s) {', '.join(unknown)[:100]}; "
                              f"{what} takes {', '.join(allowed)}")
    for name in required:
        if name not in data:
            raise finance.Refused(f"--{name} is required")


def text(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise finance.Refused(f"{name} must be a string")
    return value


def publish(c: Any, topic: str, payload: dict[str, Any]) -> None:
    """The event the CLI publishes for the same action (best effort; a daemon's broker)."""
    if c.publish is not None:
        try:
            c.publish(topic, payload)
        except Exception as exc:  # the ledger record stands; the broker is best effort
            log.warning("web.publish_failed", topic=topic, error=str(exc))


# -- complaints ----------------------------------------------------------------------------
async def record_complaint(c: Any, req: actions.ComplaintRequest,
                           operator: str) -> ComplaintOutcome:
    """Record a checked complaint (fine, DNC, suspension) and publish it, as the CLI does."""
    outcome: ComplaintOutcome = await c.ledger.add_complaint(
        account=req.account, callee=req.callee, ticket=req.ticket, at=req.at, fine=req.fine,
        operator=operator, note=req.note, recorded_at=c.now(), suspend=req.suspend)
    if outcome.created:
        publish(c, "complaint", {"action": "added", **actions.complaint_json(outcome.complaint),
                                 "complaints_in_period": outcome.complaints_in_period,
                                 "suspended": outcome.suspended})
    log.info("web.complaint", account=req.account, ticket=req.ticket, operator=operator,
             created=outcome.created, suspended=outcome.suspended)
    return outcome


async def withdraw_complaint(c: Any, ticket: str, note: str, operator: str) -> tuple[Any, bool]:
    actions.one_line(note, "a note")
    complaint, changed = await c.ledger.withdraw_complaint(ticket, operator=operator,
                                                           at=c.now(), note=note)
    if changed:
        publish(c, "complaint", {"action": "withdrawn", **actions.complaint_json(complaint)})
    log.info("web.complaint_withdrawn", ticket=ticket, operator=operator, changed=changed)
    return complaint, changed


@needs(Role.FINANCE)
async def add_complaint(request: web.Request) -> web.Response:
    from agent.web.api import body

    c, name = console(request), request.match_info["account"]
    data = await body(request)
    fields(data, ("callee", "ticket", "at", "note"), ("callee", "ticket"), "a complaint")
    req = actions.complaint(c.policy(), name, text(data, "callee"), text(data, "ticket"),
                            # "at": "" is the CLI's --at "": refused, not "now"
                            None if data.get("at") is None else text(data, "at"),
                            text(data, "note"), c.now())
    outcome = await record_complaint(c, req, principal(request).name)
    balance = await c.ledger.balance(name) if req.fine else None
    return json_response({
        **actions.complaint_json(outcome.complaint), "created": outcome.created,
        "complaints_in_period": outcome.complaints_in_period, "suspended": outcome.suspended,
        "balance": finance.balance_json(balance) if balance is not None else None,
    }, status=201 if outcome.created else 200)


async def list_complaints(request: web.Request) -> web.Response:
    c = console(request)
    # ?account= (blank) is an unknown account, as the CLI's --account "": never "all"
    account = request.query.get("account")
    policy = c.policy()
    zone: Any = (actions.policy_account(policy, account) if account is not None
                 else ZoneInfo("UTC"))
    start_text, end_text = request.query.get("from"), request.query.get("to")
    # A blank ?from=/?to= is refused, as the CLI's --from "": never "no bound".
    start = (finance.start_of(finance.day(start_text, "--from"), zone)
             if start_text is not None else None)
    end = (finance.start_of(finance.day(end_text, "--to") + timedelta(days=1), zone)
           if end_text is not None else None)
    if start and end and end <= start:
        raise finance.Refused("--to is before --from")
    found = await c.ledger.complaints(account, start, end)
    return json_response({"complaints": [actions.complaint_json(x) for x in found]})


async def show_complaint(request: web.Request) -> web.Response:
    # As typed, like ``complaint show``: blanks around the ticket dropped.
    ticket = actions.checked("ticket", typed_ticket, request.match_info["ticket"])
    found = await console(request).ledger.complaint(ticket)
    if found is None:
        raise finance.NotFound(f"no complaint with ticket {ticket!r}")
    return json_response(actions.complaint_json(found))


@needs(Role.FINANCE)
async def withdraw(request: web.Request) -> web.Response:
    from agent.web.api import body

    c = console(request)
    ticket = actions.checked("ticket", typed_ticket, request.match_info["ticket"])
    data = await body(request)
    fields(data, ("note",), (), "a withdrawal")
    actions.one_line(text(data, "note"), "a note")  # before the look-up, as the CLI's ledger
    if await c.ledger.complaint(ticket) is None:
        raise finance.NotFound(f"the ledger has no complaint {ticket!r}")
    complaint, changed = await withdraw_complaint(c, ticket, text(data, "note"),
                                                  principal(request).name)
    return json_response({**actions.complaint_json(complaint), "changed": changed})


# -- live do-not-call ------------------------------------------------------------------------
def dnc_scope(data: dict[str, Any]) -> str | None:
    """The body's ``account`` or ``"all": true`` (exactly one, as ``--account``/``--all``)."""
    everyone = data.get("all", False)
    if not isinstance(everyone, bool):
        raise finance.Refused("all must be true or false")
    if everyone and "account" in data:
        raise finance.Refused("argument --all: not allowed with argument --account")
    if not everyone and "account" not in data:
        raise finance.Refused("one of the arguments --account --all is required")
    return None if everyone else text(data, "account")


async def add_dnc(c: Any, account: str | None, number: str, reason: str,
                  operator: str) -> tuple[Any, bool]:
    actions.not_blank(reason, "--reason")
    scope, normalized = actions.dnc_target(c.policy(), account, number)
    actions.one_line(reason, "a reason")  # the CLI's order: the ledger checks it next
    entry, added = await c.ledger.dnc_add(scope, normalized, reason=reason, operator=operator,
                                          at=c.now())
    log.info("web.dnc_add", account=scope or "*", operator=operator, added=added)
    return entry, added


async def remove_dnc(c: Any, account: str | None, number: str, reason: str,
                     operator: str) -> tuple[str, str, bool]:
    scope, normalized = actions.dnc_target(c.policy(), account, number)
    actions.one_line(reason, "a reason")
    removed = await c.ledger.dnc_remove(scope, normalized, operator=operator, at=c.now(),
                                        reason=reason)
    log.info("web.dnc_remove", account=scope or "*", operator=operator, removed=removed)
    return scope, normalized, bool(removed)


async def dnc_list(request: web.Request) -> web.Response:
    c = console(request)
    account = request.query.get("account")  # blank: an unknown account, as in the CLI
    flag = request.query.get("all", "false")
    if flag not in ("true", "false", "1", "0"):
        raise finance.Refused("all must be true or false")
    everyone = flag in ("true", "1")
    if account is not None and everyone:
        raise finance.Refused("argument --all: not allowed with argument --account")
    if account is not None:
        actions.policy_account(c.policy(), account)
    entries = await c.ledger.dnc_list("" if everyone else account)
    return json_response({"entries": [actions.entry_json(x) for x in entries]})


@needs(Role.FINANCE)
async def dnc_add(request: web.Request) -> web.Response:
    from agent.web.api import body

    c = console(request)
    data = await body(request)
    fields(data, ("account", "all", "number", "reason"), ("number", "reason"),
           "a do-not-call entry")
    entry, added = await add_dnc(c, dnc_scope(data), text(data, "number"),
                                 text(data, "reason"), principal(request).name)
    return json_response({**actions.entry_json(entry), "added": added},
                         status=201 if added else 200)


@needs(Role.ADMIN)
async def dnc_remove(request: web.Request) -> web.Response:
    from agent.web.api import body

    c = console(request)
    data = await body(request)
    fields(data, ("account", "all", "number", "reason"), ("number",), "a removal")
    scope, number, removed = await remove_dnc(c, dnc_scope(data), text(data, "number"),
                                              text(data, "reason"), principal(request).name)
    return json_response({"account": scope or None, "number": number, "removed": removed})


# -- suspension ------------------------------------------------------------------------------
async def suspend_account(c: Any, account: str, reason: str, operator: str) -> tuple[Any, bool]:
    actions.not_blank(reason, "--reason")
    actions.policy_account(c.policy(), account)
    actions.one_line(reason, "a reason")
    suspension, changed = await c.ledger.suspend(account, reason=reason, operator=operator,
                                                 at=c.now())
    if changed:
        publish(c, "account", {"action": "suspend", "account": account, "reason": reason,
                               "operator": operator})
    log.info("web.suspend", account=account, operator=operator, changed=changed)
    return suspension, changed


async def resume_account(c: Any, account: str, note: str, operator: str) -> bool:
    actions.policy_account(c.policy(), account)
    actions.one_line(note, "a note")
    changed = bool(await c.ledger.resume(account, operator=operator, at=c.now(), note=note))
    if changed:
        publish(c, "account", {"action": "resume", "account": account, "note": note,
                               "operator": operator})
    log.info("web.resume", account=account, operator=operator, changed=changed)
    return changed


async def suspension(request: web.Request) -> web.Response:
    c, name = console(request), request.match_info["account"]
    actions.policy_account(c.policy(), name)
    current = await c.ledger.suspension(name)
    events = await c.ledger.account_events(name)
    return json_response({"account": name, "suspended": current is not None,
                          "reason": current.reason if current else None,
                          "history": [{"action": e.action, "reason": e.reason,
                                       "operator": e.operator, "at": e.at} for e in events]})


@needs(Role.FINANCE)
async def suspend(request: web.Request) -> web.Response:
    from agent.web.api import body

    c, name = console(request), request.match_info["account"]
    data = await body(request)
    fields(data, ("reason",), ("reason",), "a suspension")
    s, changed = await suspend_account(c, name, text(data, "reason"), principal(request).name)
    return json_response({"account": name, "suspended": True, "changed": changed,
                          "reason": s.reason, "operator": s.operator, "at": s.at},
                         status=201 if changed else 200)


@needs(Role.FINANCE)
async def resume(request: web.Request) -> web.Response:
    from agent.web.api import body

    c, name = console(request), request.match_info["account"]
    data = await body(request)
    fields(data, ("note",), (), "a resumption")
    changed = await resume_account(c, name, text(data, "note"), principal(request).name)
    return json_response({"account": name, "suspended": False, "changed": changed})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post(f"{PREFIX}/accounts/{{account}}/complaint", add_complaint)
    r.add_get(f"{PREFIX}/complaints", list_complaints)
    # A ticket may hold '/' (sent as %2F): the path parameter takes the rest of the path.
    r.add_post(f"{PREFIX}/complaints/{{ticket:.+}}/withdraw", withdraw)
    r.add_get(f"{PREFIX}/complaints/{{ticket:.+}}", show_complaint)
    r.add_get(f"{PREFIX}/dnc", dnc_list)
    r.add_post(f"{PREFIX}/dnc", dnc_add)
    r.add_post(f"{PREFIX}/dnc/remove", dnc_remove)
    r.add_get(f"{PREFIX}/accounts/{{account}}/suspension", suspension)
    r.add_post(f"{PREFIX}/accounts/{{account}}/suspend", suspend)
    r.add_post(f"{PREFIX}/accounts/{{account}}/resume", resume)
