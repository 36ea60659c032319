"""The shipped dialplans on real PBXs: real SIP calls through real Asterisk (PJSIP) and
FreeSWITCH, metered by the real ``callgate run``, money checked against the PBX's own CDR."""

from __future__ import annotations

import pytest

from tests.realpbx.conftest import INCREMENT, RATE, Tier
from tests.realpbx.harness import tariff_charge

pytestmark = pytest.mark.realpbx


def test_metered_call_is_charged_from_the_pbx_cdr(t: Tier) -> None:
    uas = t.pbx.trunk("answer", calls=1)
    call = t.pbx.call("13800138001", account="acme", hold=4.0).wait()
    assert call.status == 200, call
    row = t.pbx.wait_cdr(lambda r: r.dst == "13800138001" and r.billsec > 0)
    charge = t.agent.wait_settled("acme", row.call_id)
    assert charge == tariff_charge(row.billsec, INCREMENT, RATE)
    assert uas.invites() == 1
