"""The finance console: an authenticated HTTP API and server-rendered pages for clerks.

- :mod:`agent.web.server` builds the aiohttp application and runs it on the
  event loop it is started from (the daemon's, or ``callgate serve``'s): the
  middlewares for authentication, roles, body and time limits and errors.
- :mod:`agent.web.api` is the JSON API under ``/api/v1``;
  :mod:`agent.web.openapi` its OpenAPI document.
- :mod:`agent.web.pages` the HTML pages (sign-in, balances, account, forms).
- :mod:`agent.web.compliance` the API's complaints, live do-not-call entries and
  suspensions; :mod:`agent.web.compliance_pages` their pages.
- :mod:`agent.web.auth` tokens, users, roles, sessions, failed sign-in limits.
- :mod:`agent.web.listen` where it may listen without TLS.

Every money rule is :mod:`agent.finance`'s, every compliance input rule
:mod:`agent.compliance.actions`'s (and the ledger's): the same the CLI applies.
"""
