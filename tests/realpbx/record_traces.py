"""Record AMI and FastAGI bytes of real Asterisk 22 (PJSIP) calls with the shipped
dialplan into tests/fixtures/asterisk22/ (run by hand; the files are committed):

    .venv/bin/python -m tests.realpbx.record_traces [OUTDIR]

The real ``callgate run`` is the AMI client (through a recording proxy, so the AMI
files are exactly what callgate's session gets with the shipped manager.conf and
its eventfilter) and the FastAGI server (Asterisk's requests and callgate's
answers, recorded the same way). Two scenarios run the shipped dialplan with the
Dial lines of the past (``SIP/carrier/...``, ``PJSIP/carrier/...``) to record how
Asterisk 22 fails them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.realpbx.harness import Agent, policy_yaml, running_pbx, window_excluding_now
from tests.realpbx.pbx import Asterisk
from tests.realpbx.recorder import Recorder

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "asterisk22"

SCENARIOS = [
    # name, account, trunk behaviour, hold seconds, Dial line (None: shipped), what
    ("21-pjsip-answered-caller-hangup", "acme", "answer", 2.0, None,
     "allowed; the callee answers; the caller hangs up after 2 s"),
    ("22-pjsip-busy", "acme", "busy", 2.0, None, "allowed; the callee is busy (486)"),
    ("23-pjsip-no-answer", "acme", "noanswer", 2.0, None,
     "allowed; the callee rings until TIMEOUT(absolute) (the first increment, 3 s) ends the call"),
    ("24-pjsip-refused-balance", "broke", "answer", 2.0, None,
     "refused: insufficient_balance (Hangup(21))"),
    ("25-pjsip-cutoff", "cut", "answer", 20.0, None,
     "allowed; the balance pays 2 increments (6 s); callgate cuts the call at the boundary"),
    ("26-dial-sip-no-channel-type", "acme", "answer", 2.0,
     "Dial(SIP/${CALLGATE_TRUNK}/${EXTEN},${CALLGATE_RING_SECONDS})",
     "the old Dial line SIP/carrier/NUMBER on Asterisk 22 (no chan_sip)"),
    ("27-dial-pjsip-endpoint-slash-number", "acme", "answer", 2.0,
     "Dial(PJSIP/${CALLGATE_TRUNK}/${EXTEN},${CALLGATE_RING_SECONDS})",
     "the README's old advice PJSIP/carrier/NUMBER: the number is read as a URI"),
]


def record(out: Path) -> None:
    for name, account, trunk, hold, dial_line, what in SCENARIOS:
        with running_pbx("asterisk", dial_line=dial_line) as (pbx, procs, _ports, workdir):
            assert isinstance(pbx, Asterisk)
            version = pbx.cli("core show version").strip().splitlines()[0]
            ami = Recorder(("127.0.0.1", pbx.control_port), out / f"{name}.ami.txt", [])
            agi = Recorder(("127.0.0.1", pbx.gate_port), out / f"{name}.agi.txt", [],
                           pbx_is_client=True, split_ami=False)
            pbx.agent_control_port = ami.port
            pbx.dialplan_gate_port = agi.port
            pbx.stop()
            pbx.start()  # the dialplan now points at the FastAGI recorder
            agent = Agent(workdir, pbx, procs, policy=policy_yaml(
                night_window=window_excluding_now()))
            agent.topup("acme", "5.00")
            agent.topup("cut", "0.26")
            agent.start()
            time.sleep(0.5)
            ami.note("callgate logged in; the call starts")
            uas = pbx.trunk(trunk, calls=1, timeout=40)
            caller = pbx.call("13800138000", account=account, hold=hold)
            trace = caller.wait()
            time.sleep(2.5)  # the Cdr event and the agent's settlement
            agent.stop()
            time.sleep(0.3)
            seen = ", ".join(("> " if m.sent else "< ") + m.first_line.split(" SIP/2.0")[0]
                             for m in caller.messages())
            common = [
                f"callgate real-PBX trace: {what}",
                f"asterisk: {version} (PJSIP), the shipped config/asterisk files "
                "(extensions.conf, manager.conf with its eventfilter, cdr.conf, cdr_manager.conf)"
                + (f"; Dial line replaced by {dial_line}" if dial_line else ""),
                f"caller: PJSIP endpoint {account} (accountcode {account}) dials 13800138000; "
                f"trunk: sipp UAS ({trunk}) as PJSIP endpoint carrier",
                f"SIP seen by the caller (> sent, < received): {seen}",
                f"caller's final status: {trace.status}",
                "callgate: the real `callgate run`, tariff 0.13 per 3 s",
                "Format: tests/fixtures/asterisk/README.md ('#<<<' from Asterisk, '#>>>' to it).",
            ]
            ami.header = [*common, "AMI: callgate's own session (user callgate), byte-exact"]
            agi.header = [*common, "FastAGI: '<<<' Asterisk's request, '>>>' callgate's answer"]
            for r in (ami, agi):
                r.close()
                if r is agi and not agi.chunks:
                    continue  # no gate request (never happens with the shipped dialplan)
                r.save()
            uas.stop()
            print(f"{name}: caller status {trace.status}; {len(ami.chunks)} AMI chunks")
            log = pbx.messages()
            (out / f"{name}.messages.log").write_text(
                "\n".join(line for line in log.splitlines()
                          if "WARNING" in line or "Executing" in line or "ERROR" in line) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
