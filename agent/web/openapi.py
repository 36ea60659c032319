"""The OpenAPI 3.1 document of ``/api/v1``, served at ``/api/v1/openapi.json``.

Written by hand, next to the routes it describes; the tests check that every
API route is documented here and every documented path is served.
"""

from __future__ import annotations

from typing import Any

from agent import __version__

_MONEY = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$",
          "description": "an exact decimal amount as a string (never a float); amounts "
                         "shown are signed by their effect on the balance"}
_ERROR = {"description": "refused: one line saying why; nothing was written",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    texts = {400: "bad input (the CLI's exit 2)", 401: "no valid token",
             403: "the token's role is too low", 404: "unknown account (or ticket)",
             409: "the reference (or ticket) was used with other content, or the account "
                  "is closed",
             413: "the body is too large", 415: "the body is not JSON",
             422: "a ledger rule refuses it (first top-up minimum, calls in progress, "
                  "a negative balance)", 429: "too many failed authentications",
             503: "the ledger is unreachable"}
    for code in codes:
        out[str(code)] = {**_ERROR, "description": texts[code]}
    return out


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


_ACCOUNT = {"name": "account", "in": "path", "required": True, "schema": {"type": "string"}}
_PERIOD = [
    {"name": "from", "in": "query", "required": True,
     "schema": {"type": "string", "format": "date"}, "description": "first day, YYYY-MM-DD"},
    {"name": "to", "in": "query", "required": True,
     "schema": {"type": "string", "format": "date"},
     "description": "last day (included), YYYY-MM-DD"},
    {"name": "format", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"}},
]


_TZ = {"name": "tz", "in": "query", "required": False, "schema": {"type": "string"},
       "description": "days and times in this IANA zone (default: the account's in the "
                      "policy, else UTC)"}
_STATEMENT_PERIOD = [
    {**_PERIOD[0], "required": False,
     "description": "first day, YYYY-MM-DD (default: the account's first posting)"},
    {**_PERIOD[1], "required": False, "description": "last day, included (default: today)"},
    _PERIOD[2], _TZ,
]


def _read(summary: str, schema: str, params: list[dict[str, Any]] | None = None,
          errors: tuple[int, ...] = (401, 403), csv: bool = False) -> dict[str, Any]:
    content = _json(schema)
    if csv:
        content["text/csv"] = {"schema": {"type": "string"}}
    op: dict[str, Any] = {"summary": summary, "security": [{"token": []}],
                          "x-role": "read",
                          "responses": {"200": {"description": "OK", "content": content},
                                        **_errors(*errors)}}
    if params:
        op["parameters"] = params
    return {"get": op}


def _posting(summary: str, fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "security": [{"token": []}], "x-role": "finance",
        "parameters": [_ACCOUNT],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "required": required,
            "properties": fields}}}},
        "responses": {
            "201": {"description": "written", "content": _json("PostingResult")},
            "200": {"description": "the same request again: the original posting, "
                                   "nothing written (replayed: true)",
                    "content": _json("PostingResult")},
            **_errors(400, 401, 403, 404, 409, 413, 415, 422, 503)}}}


def _action(summary: str, role: str, fields: dict[str, Any], required: list[str],
            result: str, params: list[dict[str, Any]] | None = None,
            created: bool = True) -> dict[str, Any]:
    """A compliance write (agent/web/compliance.py): 201 when it changed something, 200 when
    it was already so (a replay: nothing written)."""
    responses: dict[str, Any] = {"200": {
        "description": "already so (the same request again): nothing written" if created
        else "done, or already so (changed/removed false: nothing written)",
        "content": _json(result)}}
    if created:
        responses["201"] = {"description": "written", "content": _json(result)}
    op: dict[str, Any] = {
        "summary": summary, "security": [{"token": []}], "x-role": role,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "required": required,
            "properties": fields}}}},
        "responses": {**responses, **_errors(400, 401, 403, 404, 409, 413, 415, 422, 503)}}
    if params:
        op["parameters"] = params
    return {"post": op}


_TICKET = {"name": "ticket", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "the complaint's ticket (a '/' in it is sent as %2F)"}
_SCOPE = {"account": {"type": "string", "description": "the account whose list it is"},
          "all": {"type": "boolean", "description": "true: for every account (instead of "
                                                    "account)"},
          "number": {"type": "string", "description": "normalised with the account's (or "
                                                      "the defaults') number rules"}}
_WHEN = {"type": ["string", "null"], "format": "date-time"}
_COMPLAINT = {"type": "object", "properties": {
    "ticket": {"type": "string"}, "account": {"type": "string"},
    "callee": {"type": "string"}, "at": {"type": "string", "format": "date-time"},
    "fine": _MONEY, "operator": {"type": "string"}, "note": {"type": "string"},
    "recorded_at": {"type": "string", "format": "date-time"},
    "withdrawn": {"type": "boolean"}, "withdrawn_at": _WHEN,
    "withdrawn_by": {"type": ["string", "null"]}, "withdraw_note": {"type": "string"}}}
_DNC_ENTRY = {"type": "object", "properties": {
    "account": {"type": ["string", "null"], "description": "null: for every account"},
    "number": {"type": "string"}, "reason": {"type": "string"},
    "operator": {"type": "string"}, "added_at": {"type": "string", "format": "date-time"},
    "seq": {"type": "integer"}}}
_COMPLIANCE_SCHEMAS: dict[str, Any] = {
    "Complaint": _COMPLAINT,
    "ComplaintResult": {"allOf": [{"$ref": "#/components/schemas/Complaint"}, {
        "type": "object", "properties": {
            "created": {"type": "boolean", "description": "false: the ticket was recorded "
                                                          "before with this content"},
            "complaints_in_period": {"type": "integer"},
            "suspended": {"type": "boolean",
                          "description": "this complaint suspended the account"},
            "balance": {"oneOf": [{"$ref": "#/components/schemas/Balance"},
                                  {"type": "null"}]}}}]},
    "Withdrawn": {"allOf": [{"$ref": "#/components/schemas/Complaint"}, {
        "type": "object", "properties": {"changed": {"type": "boolean"}}}]},
    "Complaints": {"type": "object", "properties": {"complaints": {
        "type": "array", "items": {"$ref": "#/components/schemas/Complaint"}}}},
    "DncEntry": _DNC_ENTRY,
    "DncAdded": {"allOf": [{"$ref": "#/components/schemas/DncEntry"}, {
        "type": "object", "properties": {"added": {"type": "boolean"}}}]},
    "DncRemoved": {"type": "object", "properties": {
        "account": {"type": ["string", "null"]}, "number": {"type": "string"},
        "removed": {"type": "boolean"}}},
    "DncEntries": {"type": "object", "properties": {"entries": {
        "type": "array", "items": {"$ref": "#/components/schemas/DncEntry"}}}},
    "Suspension": {"type": "object", "properties": {
        "account": {"type": "string"}, "suspended": {"type": "boolean"},
        "reason": {"type": ["string", "null"]},
        "history": {"type": "array", "items": {"type": "object", "properties": {
            "action": {"type": "string", "enum": ["suspend", "resume"]},
            "reason": {"type": "string"}, "operator": {"type": "string"},
            "at": {"type": "string", "format": "date-time"}}}}}},
    "SuspendResult": {"type": "object", "properties": {
        "account": {"type": "string"}, "suspended": {"type": "boolean"},
        "changed": {"type": "boolean"}, "reason": {"type": "string"},
        "operator": {"type": "string"}, "at": {"type": "string", "format": "date-time"}}},
    "ResumeResult": {"type": "object", "properties": {
        "account": {"type": "string"}, "suspended": {"type": "boolean"},
        "changed": {"type": "boolean"}}},
}


def _compliance_paths() -> dict[str, Any]:
    return {
        "/api/v1/accounts/{account}/complaint": _action(
            "record a complaint: the policy's fine once per ticket, the callee on the "
            "account's live do-not-call list, a suspension when the policy's threshold is "
            "reached", "finance",
            {"callee": {"type": "string"}, "ticket": {"type": "string", "minLength": 1,
                                                      "description": "the idempotency key"},
             "at": {"type": "string", "description": "when (ISO time; without a zone the "
                                                     "account's; default now)"},
             "note": {"type": "string"}}, ["callee", "ticket"], "ComplaintResult",
            [_ACCOUNT]),
        "/api/v1/complaints": _read(
            "complaints of a period or an account", "Complaints",
            [{"name": "account", "in": "query", "required": False,
              "schema": {"type": "string"}},
             {**_PERIOD[0], "required": False}, {**_PERIOD[1], "required": False}],
            (400, 401, 403, 404)),
        "/api/v1/complaints/{ticket}": _read("one complaint", "Complaint", [_TICKET],
                                             (401, 403, 404)),
        "/api/v1/complaints/{ticket}/withdraw": _action(
            "withdraw a complaint: its fine is credited back by a posting (the do-not-call "
            "entry and any suspension stay)", "finance", {"note": {"type": "string"}}, [],
            "Withdrawn", [_TICKET], created=False),
        "/api/v1/dnc": {
            **_read("the live do-not-call entries (of an account, or only those for "
                    "everyone with all=true)", "DncEntries",
                    [{"name": "account", "in": "query", "required": False,
                      "schema": {"type": "string"}},
                     {"name": "all", "in": "query", "required": False,
                      "schema": {"type": "boolean"}}], (400, 401, 403, 404)),
            **_action("add a live do-not-call entry (in force on every agent within a "
                      "second)", "finance",
                      {**_SCOPE, "reason": {"type": "string", "minLength": 1}},
                      ["number", "reason"], "DncAdded")},
        "/api/v1/dnc/remove": _action(
            "remove a live do-not-call entry", "admin",
            {**_SCOPE, "reason": {"type": "string"}}, ["number"], "DncRemoved",
            created=False),
        "/api/v1/accounts/{account}/suspension": _read(
            "whether the account is suspended in the ledger, and the history", "Suspension",
            [_ACCOUNT], (401, 403, 404)),
        "/api/v1/accounts/{account}/suspend": _action(
            "suspend an account: its calls are refused on every agent", "finance",
            {"reason": {"type": "string", "minLength": 1}}, ["reason"], "SuspendResult",
            [_ACCOUNT]),
        "/api/v1/accounts/{account}/resume": _action(
            "lift a suspension", "finance", {"note": {"type": "string"}}, [],
            "ResumeResult", [_ACCOUNT], created=False),
    }


_REF = {"type": "string", "minLength": 1,
        "description": "the payment, complaint or payout reference: the idempotency key"}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "callgate finance API", "version": __version__,
                 "description": "Balances, statements and the money postings of the prepaid "
                                "ledger, with the same rules as `callgate ledger`."},
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                "Balance": {"type": "object", "properties": {
                    "account": {"type": "string"}, "posted": _MONEY, "held": _MONEY,
                    "available": _MONEY, "closed": {"type": "boolean"}}},
                "Posting": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "account": {"type": "string"},
                    "kind": {"type": "string", "enum": ["topup", "penalty", "refund",
                                                        "adjustment", "reopen", "hold",
                                                        "release", "charge"]},
                    "amount": _MONEY, "at": {"type": "string", "format": "date-time"},
                    "ref": {"type": "string"}, "key": {"type": "string"},
                    "call_id": {"type": ["string", "null"]}, "note": {"type": "string"},
                    "operator": {"type": "string"}}},
                "PostingResult": {"allOf": [{"$ref": "#/components/schemas/Posting"}, {
                    "type": "object", "properties": {
                        "replayed": {"type": "boolean"},
                        "balance": {"$ref": "#/components/schemas/Balance"}}}]},
                "Accounts": {"type": "object", "properties": {
                    "currency": {"type": "string"},
                    "accounts": {"type": "array", "items": {"allOf": [
                        {"$ref": "#/components/schemas/Balance"},
                        {"type": "object", "properties": {
                            "name": {"type": "string"}, "in_policy": {"type": "boolean"},
                            "in_ledger": {"type": "boolean"}}}]}}}},
                "Account": {"type": "object", "properties": {
                    "account": {"type": "string"}, "name": {"type": "string"},
                    "in_ledger": {"type": "boolean"},
                    "balance": {"$ref": "#/components/schemas/Balance"},
                    "live_calls": {"type": "array", "items": {"type": "object"}},
                    "recent_postings": {"type": "array",
                                        "items": {"$ref": "#/components/schemas/Posting"}}}},
                "History": {"type": "object", "properties": {
                    "account": {"type": "string"}, "timezone": {"type": "string"},
                    "postings": {"type": "array",
                                 "items": {"$ref": "#/components/schemas/Posting"}}}},
                "Statement": {"type": "object", "description":
                              "closing = opening + top-ups - calls - penalties - refunds "
                              "+ adjustments, exactly",
                              "properties": {
                                  "account": {"type": "string"}, "timezone": {"type": "string"},
                                  "from": {"type": "string"}, "to": {"type": "string"},
                                  "currency": {"type": "string"}, "opening": _MONEY,
                                  "calls": {"type": "array", "items": {"type": "object"}},
                                  "postings": {"type": "array", "items": {
                                      "$ref": "#/components/schemas/Posting"}},
                                  "totals": {"type": "object",
                                             "additionalProperties": _MONEY},
                                  "closing": _MONEY}},
                "Report": {"type": "object", "properties": {
                    "from": {"type": "string"}, "to": {"type": "string"},
                    "currency": {"type": "string"},
                    "accounts": {"type": "array", "items": {"type": "object"}},
                    "totals": {"type": "object", "additionalProperties": _MONEY}}},
                "Calls": {"type": "object", "properties": {
                    "calls": {"type": "array", "items": {"type": "object"}},
                    "count": {"type": "integer"}, "at": {"type": "string"}}},
                "Whoami": {"type": "object", "properties": {
                    "name": {"type": "string"}, "role": {"type": "string"},
                    "kind": {"type": "string"}}},
                "Operators": {"type": "object", "properties": {
                    "operators": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Whoami"}}}},
                **_COMPLIANCE_SCHEMAS,
            },
        },
        "paths": {
            "/api/v1/openapi.json": {"get": {
                "summary": "this document", "security": [],
                "responses": {"200": {"description": "OK"}}}},
            "/api/v1/whoami": _read("the token's name and role", "Whoami"),
            "/api/v1/operators": {"get": {
                **_read("every token and user with its role (no secrets)", "Operators")["get"],
                "x-role": "admin"}},
            "/api/v1/accounts": _read("every account with its customer's name and balance",
                                      "Accounts"),
            "/api/v1/accounts/{account}": _read(
                "one account: balance, live calls, recent postings", "Account", [_ACCOUNT],
                (401, 403, 404)),
            "/api/v1/accounts/{account}/history": _read(
                "an account's postings", "History",
                [_ACCOUNT, {"name": "since", "in": "query", "required": False,
                            "schema": {"type": "string"},
                            "description": "a day (YYYY-MM-DD, the account's timezone) "
                                           "or an ISO time"}, _TZ], (400, 401, 403, 404)),
            "/api/v1/accounts/{account}/statement": _read(
                "calls and postings of a period with totals that add up (JSON or CSV; "
                "the CSV's amounts sum from opening to closing)", "Statement",
                [_ACCOUNT, *_STATEMENT_PERIOD], (400, 401, 403, 404), csv=True),
            "/api/v1/report": _read(
                "month-end: every account's statement totals for a period", "Report",
                _PERIOD, (400, 401, 403), csv=True),
            "/api/v1/calls": _read(
                "live calls", "Calls",
                [{"name": "account", "in": "query", "required": False,
                  "schema": {"type": "string"}}]),
            "/api/v1/accounts/{account}/topup": _posting(
                "credit a prepaid top-up (an account's first must meet the policy minimum)",
                {"amount": _MONEY, "ref": _REF, "note": {"type": "string"}},
                ["amount", "ref"]),
            "/api/v1/accounts/{account}/penalty": _posting(
                "post a fine (may take the balance below zero)",
                {"amount": _MONEY, "ref": _REF, "reason": {"type": "string"}},
                ["amount", "ref"]),
            "/api/v1/accounts/{account}/refund": _posting(
                "pay out the available balance and close the account",
                {"ref": _REF, "note": {"type": "string"}}, ["ref"]),
            "/api/v1/accounts/{account}/adjustment": _posting(
                "correct a balance by a signed, non-zero amount",
                {"amount": _MONEY, "ref": _REF, "reason": {"type": "string"}},
                ["amount", "ref"]),
            "/api/v1/accounts/{account}/reopen": _posting(
                "open a closed (refunded) account again (a posting of zero)",
                {"ref": _REF, "note": {"type": "string"}}, ["ref"]),
            **_compliance_paths(),
        },
    }
