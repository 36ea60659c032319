"""The JSON API under ``/api/v1``: balances, accounts, statements, report, live calls, postings.

Every rule is :mod:`agent.finance`'s (the CLI's): the same checks in the same
order with the same one-line messages, as ``{"error": "…"}`` with a 4xx status.
A posting answers 201 with the CLI's ``--json`` object; the same request again
(same reference, same content) answers 200 with the original posting and
``"replayed": true``; the reference reused with other content is 409.
Every posting records the token's name as its operator.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web

from agent import days, finance
from agent.ledger import Balance, CallRecord, PostingKind, UnknownAccount
from agent.money import CURRENCY
from agent.web.auth import Role
from agent.web.server import (
    ApiError,
    console,
    json_response,
    needs,
    principal,
    public,
)

log = structlog.get_logger("callgate.web")

PREFIX = "/api/v1"
# The body fields each posting takes, and which of them is kept as the note.
FIELDS = {
    PostingKind.TOPUP: ("amount", "ref", "note"),
    PostingKind.PENALTY: ("amount", "ref", "reason"),
    PostingKind.REFUND: ("ref", "note"),
    PostingKind.ADJUSTMENT: ("amount", "ref", "reason"),
    PostingKind.REOPEN: ("ref", "note"),
}
PATHS = {PostingKind.TOPUP: "topup", PostingKind.PENALTY: "penalty",
         PostingKind.REFUND: "refund", PostingKind.ADJUSTMENT: "adjustment",
         PostingKind.REOPEN: "reopen"}


# -- shared by the API and the pages -------------------------------------------------
def customer_name(policy: Any, account: str) -> str:
    entry = policy.accounts.get(account)
    return str(entry.name) if entry is not None and entry.name else ""


async def overview(c: Any) -> list[dict[str, Any]]:
    """Every account the ledger or the policy knows, with its customer's name and balance."""
    policy = c.policy()
    balances = {b.account: b for b in await c.ledger.balances()}
    rows = []
    for account in sorted(set(balances) | set(policy.accounts)):
        b = balances.get(account) or Balance(account, Decimal(0), Decimal(0))
        rows.append({**finance.balance_json(b), "name": customer_name(policy, account),
                     "in_policy": account in policy.accounts, "in_ledger": account in balances})
    return rows


async def account_balance(c: Any, account: str) -> tuple[Balance, bool]:
    """The account's balance and whether the ledger has it (a policy account may not yet).

    An account neither knows is the ledger's refusal (404), as ``ledger balance``.
    """
    try:
        return await c.ledger.balance(account), True
    except UnknownAccount:
        if account in c.policy().accounts:
            return Balance(account, Decimal(0), Decimal(0)), False
        raise


def zone_of(c: Any, account: str, named: str | None = None) -> Any:
    """The account's timezone: ``tz`` (``--tz``), the policy's, else UTC (the CLI's rule).
    A blank ``?tz=`` is refused as the CLI's ``--tz ""`` is, never read as not given."""
    if named is not None and not named.strip():
        raise finance.Refused("--tz must not be blank (an IANA name such as Asia/Shanghai)")
    return finance.zone(c.policy(), account, named or None)


def call_json(r: CallRecord, now: datetime) -> dict[str, Any]:
    elapsed = int((now - r.answered_at).total_seconds()) if r.answered_at else None
    paid_until = (r.answered_at + timedelta(seconds=r.paid_seconds)
                  if r.answered_at is not None else None)
    return {"call_id": r.call_id, "account": r.account, "node": r.node, "caller": r.caller,
            "callee": r.callee, "status": r.status.value, "answered_at": r.answered_at,
            "elapsed_seconds": elapsed, "paid_seconds": r.paid_seconds,
            "paid_until": paid_until, "held": r.held, "tariff": r.tariff_name}


def default_period(zone: Any, now: datetime) -> tuple[str, str]:
    """The current month up to today, in the account's timezone."""
    today = now.astimezone(zone).date()
    return today.replace(day=1).isoformat(), today.isoformat()


def csv_text(rows: Any) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def csv_response(text: str, filename: str) -> web.Response:
    return web.Response(text=text, content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def report(c: Any, start: str, end: str) -> dict[str, Any]:
    """Month-end: ``callgate ledger report --json`` over every ledger account, each in its
    own timezone (the policy's, else UTC)."""
    from agent.ledger.report import totals

    first, last = finance.report_days(start, end)
    d = finance.directory_of(c.policy())
    reports = [r for r, _ in await finance.gather(c.ledger, d, first, last)]
    out = finance.report_json(reports, totals(reports), d, first, last)
    out["_csv"] = finance.report_csv_rows(reports, d)  # taken out before it is sent
    return out


def _query(request: web.Request, name: str, *, required: bool = True) -> str:
    value = request.query.get(name)
    if value is None:
        if required:
            raise finance.Refused(f"the query parameter {name!r} is required")
        return ""
    return value


def _format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise finance.Refused(f"format {fmt[:20]!r} is neither json nor csv")
    return fmt


# -- reading ---------------------------------------------------------------------------
async def accounts(request: web.Request) -> web.Response:
    return json_response({"currency": CURRENCY, "accounts": await overview(console(request))})


async def account(request: web.Request) -> web.Response:
    c, name = console(request), request.match_info["account"]
    balance, in_ledger = await account_balance(c, name)
    postings = await c.ledger.history(name) if in_ledger else []
    live = await c.ledger.live_calls(name)
    now = c.now()
    return json_response({
        "account": name, "name": customer_name(c.policy(), name), "in_ledger": in_ledger,
        "balance": finance.balance_json(balance),
        "live_calls": [call_json(r, now) for r in live],
        "recent_postings": [finance.posting_json(p) for p in postings[-20:][::-1]],
    })


async def history(request: web.Request) -> web.Response:
    c, name = console(request), request.match_info["account"]
    zone = zone_of(c, name, request.query.get("tz"))
    since_text = request.query.get("since")  # blank: refused, as the CLI's --since ""
    start = finance.since(since_text, zone) if since_text is not None else None
    postings = await c.ledger.history(name, start)
    return json_response({"account": name, "timezone": str(zone),
                          "postings": [finance.posting_json(p) for p in postings]})


async def statement(request: web.Request) -> web.Response:
    c, name = console(request), request.match_info["account"]
    fmt = _format(request)
    # The CLI's checks, in its order: a blank ?from=/?to= is refused (never the default),
    # and a --from after today without --to names the default --to.
    start, end = request.query.get("from"), request.query.get("to")
    try:
        first, last = days.parse_period(start, end)
    except days.DayError as exc:
        raise finance.Refused(str(exc)) from None
    where = zone_of(c, name, request.query.get("tz"))
    today = c.now().astimezone(where).date()
    if first is not None and last is None and first > today:
        raise finance.Refused(f"--from {first} is after today ({today} in {where}), the "
                              "default --to")
    s = await finance.statement(c.ledger, name, where, start, end, c.now(),
                                customer_name(c.policy(), name))
    if fmt == "csv":
        return csv_response(csv_text(finance.csv_rows(s)),
                            f"{name}-{s.first_day}-{s.last_day}.csv")
    return json_response(finance.statement_json(s))


async def report_route(request: web.Request) -> web.Response:
    fmt = _format(request)
    start, end = _query(request, "from"), _query(request, "to")
    r = await report(console(request), start, end)
    rows = r.pop("_csv")
    if fmt == "csv":
        return csv_response(csv_text(rows), f"report-{start}-{end}.csv")
    return json_response(r)


async def calls(request: web.Request) -> web.Response:
    c = console(request)
    only = request.query.get("account")
    if only is not None:
        await c.ledger.balance(only)  # an account the ledger lacks is refused, as in the CLI
    now = c.now()
    records = await c.ledger.live_calls(only)
    return json_response({"calls": [call_json(r, now) for r in records],
                          "count": len(records), "at": now})


async def whoami(request: web.Request) -> web.Response:
    who = principal(request)
    return json_response({"name": who.name, "role": who.role.label, "kind": who.kind})


@needs(Role.ADMIN)
async def operators(request: web.Request) -> web.Response:
    everyone = console(request).credentials().everyone()
    return json_response({"operators": [{"name": p.name, "role": p.role.label, "kind": p.kind}
                                        for p in everyone]})


@public
async def openapi(request: web.Request) -> web.Response:
    from agent.web.openapi import document

    return json_response(document())


# -- postings ----------------------------------------------------------------------------
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: ``{"ref": "A", "ref": "B"}`` is refused,
    not read as its last value (which of two refs did the client mean?)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise finance.Refused(f"the body has the key {key!r} more than once")
        data[key] = value
    return data


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_keys)


async def body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "send the body as application/json")
    try:
        data = await request.json(loads=_loads)
    except (ValueError, RecursionError):  # "[[[[…" nested thousands deep fits the size limit
        raise finance.Refused("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise finance.Refused("the body must be a JSON object")
    return data


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise finance.Refused(f"{name} must be a string")
    return value


def _amount_text(data: dict[str, Any]) -> str:
    value = data.get("amount", "")
    if isinstance(value, bool):
        raise finance.Refused(f"amount {str(value).lower()} is not an amount: write a decimal "
                              "string, e.g. \"100\" or \"250.50\"")
    if isinstance(value, float):
        raise finance.Refused(f"amount {value!r} must be written as a decimal string, "
                              "not a float")
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise finance.Refused("amount must be a decimal string, e.g. \"100\" or \"250.50\"")
    return value


def checked(kind: PostingKind, account: str, data: dict[str, Any]) -> finance.Request:
    """The body as the CLI's arguments, checked by the CLI's rules."""
    allowed = FIELDS[kind]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise finance.Refused(f"unknown field(s) {', '.join(unknown)[:100]}; "
                              f"a {kind.value} takes {', '.join(allowed)}")
    if "ref" not in data:
        raise finance.Refused("--ref is required (the payment or complaint reference)")
    amount = _amount_text(data) if "amount" in allowed else None
    note = _text(data, "reason" if "reason" in allowed else "note")
    return finance.request(kind, account, amount, _text(data, "ref"), note)


def posting_route(kind: PostingKind) -> Any:
    @needs(Role.FINANCE)
    async def handler(request: web.Request) -> web.Response:
        c, name = console(request), request.match_info["account"]
        req = checked(kind, name, await body(request))
        who = principal(request)
        result = await finance.post(c.ledger, req, at=c.now(), operator=who.name,
                                    policy=c.policy)
        log.info("web.posting", account=name, kind=kind.value, ref=req.ref,
                 amount=str(result.posting.amount), operator=who.name,
                 replayed=result.replayed)
        return json_response(finance.result_json(result),
                             status=200 if result.replayed else 201)

    handler.__name__ = f"post_{kind.value}"
    return handler


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(f"{PREFIX}/openapi.json", openapi)
    r.add_get(f"{PREFIX}/whoami", whoami)
    r.add_get(f"{PREFIX}/operators", operators)
    r.add_get(f"{PREFIX}/accounts", accounts)
    r.add_get(f"{PREFIX}/accounts/{{account}}", account)
    r.add_get(f"{PREFIX}/accounts/{{account}}/history", history)
    r.add_get(f"{PREFIX}/accounts/{{account}}/statement", statement)
    r.add_get(f"{PREFIX}/report", report_route)
    r.add_get(f"{PREFIX}/calls", calls)
    for kind, path in PATHS.items():
        r.add_post(f"{PREFIX}/accounts/{{account}}/{path}", posting_route(kind))
