"""Agent outages on real PBXs: after the restart and the PBX's own CDR, every call is
charged exactly the rating of the PBX's billsec (the agent follows the CDR file).

Real Asterisk 22 (``cdr_custom``) and FreeSWITCH 1.10 (``mod_cdr_csv``), the real
``callgate run`` with ``cdr:`` in its agent.yaml, real SIP calls from sipp. The
tariff is 0.13 per 10 s and the meter reserves 5 s ahead (``lead_seconds``), so
a call holds its second increment at answer + 5 s: a caller who hangs up at
+9 s, while the agent is down, has paid 20 s but talked one increment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.realpbx.harness import (
    Agent,
    Pbx,
    policy_yaml,
    running_pbx,
    tariff_charge,
    wait_until,
    window_excluding_now,
)

pytestmark = pytest.mark.realpbx

INCREMENT = 10
RATE = "0.13"
LEAD = 5
ACCOUNTS = ("killed", "spare", "spare2")


@dataclass
class CdrTier:
    pbx: Pbx
    agent: Agent
    cdr_file: Path
    layout: str


@pytest.fixture(scope="module", params=["asterisk", "freeswitch"])
def tier(request: pytest.FixtureRequest) -> Iterator[CdrTier]:
    with running_pbx(request.param) as (pbx, procs, _ports, workdir):
        agent = Agent(workdir, pbx, procs, grace=2, lead=LEAD,
                      policy=policy_yaml(increment=INCREMENT, rate=RATE,
                                         night_window=window_excluding_now()))
        if request.param == "asterisk":
            cdr_file, layout = pbx.rundir / "log/cdr-custom/Master.csv", "asterisk-custom"
        else:
            cdr_file, layout = pbx.rundir / "log/cdr-csv/Master.csv", "freeswitch-csv"
        with open(agent.config, "a") as out:
            out.write(f"cdr: {{file: '{cdr_file}', format: {layout}, poll_seconds: 0.5,"
                      " state_file: cdr-position.json}\n")
        agent.cli("ledger", "init")  # only `run` and `ledger init` create a ledger
        for account in ACCOUNTS:
            agent.topup(account, "5.00")
        agent.start()
        yield CdrTier(pbx, agent, cdr_file, layout)


@pytest.fixture
def t(tier: CdrTier) -> CdrTier:
    if tier.agent.proc is None or tier.agent.proc.poll() is not None:
        tier.agent.start()
    return tier


def live_call(agent: Agent, account: str, paid: int) -> dict[str, Any] | None:
    """The account's live call once the ledger says it is paid for ``paid`` seconds."""
    calls = json.loads(agent.cli("calls", "--account", account, "--json"))["calls"]
    return next((c for c in calls if c["paid_seconds"] >= paid), None)


def paid_calls(agent: Agent, paid: int, *accounts: str) -> dict[str, str] | None:
    """Account -> call id, once each account's live call is paid for ``paid`` seconds."""
    calls = json.loads(agent.cli("calls", "--json"))["calls"]
    found = {c["account"]: c["call_id"] for c in calls if c["paid_seconds"] >= paid}
    return found if all(a in found for a in accounts) else None


def settled(agent: Agent, account: str, call_id: str) -> dict[str, Any]:
    """The call's statement line (today, UTC): final amount, PBX billsec, flags.

    Amounts are signed by their effect on the balance (a call's are negative)."""
    day = datetime.now(UTC).date().isoformat()
    data = json.loads(agent.cli("ledger", "statement", account, "--from", day, "--to", day,
                                "--json"))
    return next(c for c in data["calls"] if c["call_id"] == call_id)


def corrected(t: CdrTier, account: str, call_id: str) -> dict[str, Any]:
    t.agent.wait_log("cdr.call_settled_from_pbx", timeout=30, call_id=call_id)
    return settled(t.agent, account, call_id)


def test_sigkill_between_increments_caller_hangs_up_while_dead(t: CdrTier) -> None:
    t.pbx.trunk("answer", calls=1)
    caller = t.pbx.call("13800138201", account="killed", hold=9.0)
    # The second increment is held at answer + 5 s (paid 20 s); then SIGKILL.
    call = wait_until("the second increment", lambda: live_call(t.agent, "killed", 20), 20,
                      every=0.2)
    t.agent.kill()
    trace = caller.wait()  # the caller hangs up at + 9 s, nobody watching
    assert trace.status == 200 and trace.bye_from_pbx is False, trace
    row = t.pbx.wait_cdr(lambda r: r.call_id == call["call_id"] and r.end > 0)
    assert 8 <= row.billsec <= 10, row
    t.agent.start()  # settles it provisionally (what was paid), then the CDR corrects it
    line = corrected(t, "killed", call["call_id"])
    assert {"ended_while_away", "billsec_assumed_paid"} <= set(line["flags"]), line
    assert -Decimal(line["amount"]) == Decimal("0.26")  # settled at the 20 s paid
    assert line["pbx_billsec"] == row.billsec
    assert -Decimal(line["final_amount"]) == tariff_charge(row.billsec, INCREMENT, RATE,
                                                           INCREMENT)
    assert Decimal(line["correction"]) == Decimal("0.13")  # given back


def test_graceful_restart_mid_call(t: CdrTier) -> None:
    t.pbx.trunk("answer", calls=2)
    short = t.pbx.call("13800138202", account="spare", hold=9.0)    # ends while it is down
    long = t.pbx.call("13800138203", account="spare2", hold=30.0)   # outlives the restart
    ids = wait_until("the second increments",
                     lambda: paid_calls(t.agent, 20, "spare", "spare2"), 20, every=0.2)
    short_id, long_id = ids["spare"], ids["spare2"]
    assert t.agent.stop() == 0  # SIGTERM mid-call
    short_row = t.pbx.wait_cdr(lambda r: r.call_id == short_id and r.end > 0)
    t.agent.start()
    t.agent.wait_log("meter.adopted", call_id=long_id)
    short_line = corrected(t, "spare", short_id)
    assert "ended_while_away" in short_line["flags"], short_line
    assert short_line["pbx_billsec"] == short_row.billsec
    assert -Decimal(short_line["final_amount"]) == tariff_charge(short_row.billsec, INCREMENT, RATE,
                                                          INCREMENT)
    assert long.wait().status == 200 and short.wait().status == 200
    long_row = t.pbx.wait_cdr(lambda r: r.call_id == long_id and r.end > 0)
    t.agent.wait_log("meter.settled", call_id=long_id)
    time.sleep(1.5)  # the CDR source's next polls: the adopted call needs no correction
    long_line = settled(t.agent, "spare2", long_id)
    assert "adopted" in long_line["flags"] and long_line["pbx_billsec"] is None, long_line
    assert -Decimal(long_line["final_amount"]) == tariff_charge(long_row.billsec, INCREMENT, RATE,
                                                         INCREMENT)
    # Finance's view of the same day: the PBX's CDR file and the ledger agree.
    day = datetime.now(UTC).date().isoformat()
    flag = "--asterisk-cdr" if t.layout.startswith("asterisk") else "--freeswitch-cdr"
    report = json.loads(t.agent.cli("ledger", "reconcile", flag, str(t.cdr_file), "--from",
                                    day, "--to", day, "--json"))
    assert report["unexplained"] == 0, report
    assert report["counts"]["corrected"] >= 1, report
