"""``callgate demo``: the real daemon against the built-in PBX simulator, in under a minute.

Sets up a throwaway state directory (SQLite ledger, a compressed demo policy
where a billing increment is 5 s instead of 60 s, an agent config), starts the
Asterisk or FreeSWITCH simulator on loopback, runs the real :class:`Daemon`
against it, and places four calls that show what callgate does:

1. a call outside the account's calling hours: refused (``outside_hours``);
2. a call from an account with no balance: refused (``insufficient_balance``);
3. a metered call: charged per started increment while it talks;
4. a call whose balance runs out: cut off at the end of its last paid increment.

While calls are up it runs ``callgate calls`` in a second process (reading the
same ledger), and at the end ``callgate ledger statement`` and ``balance``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agent.config import load_agent_config
from agent.daemon import Daemon

SHANGHAI = ZoneInfo("Asia/Shanghai")


def _closed_window(now: datetime) -> tuple[str, str]:
    """A one-hour calling window (Shanghai time) that does not contain ``now``."""
    hour = now.astimezone(SHANGHAI).hour
    start = hour + 2 if hour + 3 <= 24 else hour - 3
    return f"{start:02d}:00", f"{start + 1:02d}:00"


def demo_policy(now: datetime) -> str:
    start, end = _closed_window(now)
    return textwrap.dedent(f"""\
        # callgate demo policy: the contract's rules with time compressed 12x
        # (a billing increment is 5 s instead of 60 s). Demo only.
        version: 1
        prepaid:
          first_topup_minimum: "0.10"     # the contract says 100.00; small sums keep the demo short
          complaint_penalty: "1000.00"
          fail_mode: closed
        tariffs:
          demo: {{rate: "0.13", increment: 5, minimum: 5}}
        defaults:
          timezone: Asia/Shanghai
          tariff: demo
          calling_hours: [{{days: all, windows: [{{start: "00:00", end: "24:00"}}]}}]
          destinations: {{deny: ["00", "12", "95"]}}
          low_balance_warning: "0.20"
        accounts:
          acme:   {{name: ACME Telemarketing, caller_ids: ["02158880000"], max_concurrent_calls: 5}}
          tight:  {{name: Tight Budget Ltd, caller_ids: ["02158881111"]}}
          broke:  {{name: No Balance Co, caller_ids: ["02158882222"]}}
          night:
            name: Night Shift Sales
            caller_ids: ["02158883333"]
            calling_hours: [{{days: all, windows: [{{start: "{start}", end: "{end}"}}]}}]
        """)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(state: Path, kind: str, pbx_port: int) -> str:
    if kind == "asterisk":
        pbx = textwrap.dedent(f"""\
            pbx:
              kind: asterisk
              ami: {{host: 127.0.0.1, port: {pbx_port}, username: callgate, secret: demo-secret}}
              fastagi: {{listen: "127.0.0.1:0"}}
            """)
    else:
        pbx = textwrap.dedent(f"""\
            pbx:
              kind: freeswitch
              esl: {{host: 127.0.0.1, port: {pbx_port}, password: demo-secret}}
              outbound_socket: {{listen: "127.0.0.1:0"}}
              outbound_contexts: [default]
            """)
    return (f"node: demo\npolicy: policy.yaml\nledger: sqlite://{state / 'ledger.db'}\n"
            f"state_directory: {state}\n{pbx}log: {{format: console, level: info}}\n"
            f"metrics: {{listen: '127.0.0.1:{_free_port()}'}}\n")


def _say(text: str) -> None:
    print(f"\n\033[1m▶ {text}\033[0m" if sys.stdout.isatty() else f"\n>> {text}", flush=True)


def _shown(base: list[str], *args: str) -> str:
    """The command line an operator would type for ``_cli(*base, *args)``."""
    import shlex

    return shlex.join(["callgate", *base, *args])


async def _cli(*args: str) -> str:
    """Run the real ``callgate`` CLI in a second process, as an operator would."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return out.decode()


async def run_demo(kind: str = "asterisk", keep: bool = False) -> int:
    from agent.logs import configure_logging

    configure_logging("console", "info")
    state = Path(tempfile.mkdtemp(prefix="callgate-demo-"))
    try:
        return await _scenario(kind, state)
    finally:
        if keep:
            print(f"\nstate kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


async def _scenario(kind: str, state: Path) -> int:
    now = datetime.now(UTC)
    (state / "policy.yaml").write_text(demo_policy(now))
    sim: Any
    if kind == "asterisk":
        from agent.sim.asterisk import AsteriskSimulator

        sim = AsteriskSimulator("callgate", "demo-secret", auth_fail_delay=0.1)
        await sim.__aenter__()
        port = sim.ami_address[1]
    else:
        from agent.sim.freeswitch import FreeswitchSimulator

        sim = FreeswitchSimulator("demo-secret")
        await sim.__aenter__()
        port = sim.esl_address[1]
    (state / "agent.yaml").write_text(demo_config(state, kind, port))
    config = load_agent_config(state / "agent.yaml")
    daemon = Daemon(config)
    ledger_url = config.ledger
    base = ["--ledger", ledger_url, "--policy", str(state / "policy.yaml")]
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(10):
            await daemon.ready.wait()
        if kind == "asterisk":
            sim.agi_address = daemon.adapter.fastagi_address
        else:
            sim.outbound_address = daemon.adapter.outbound_address
        _say(f"callgate is up beside a simulated {kind} PBX; ledger {ledger_url}")
        print(await _cli(*base, "ledger", "topup", "acme", "100.00", "--ref", "demo-topup-1"),
              end="")
        print(await _cli(*base, "ledger", "topup", "tight", "0.26", "--ref", "demo-topup-2"),
              end="")

        async def place(caller: str, account: str, destination: str, talk: float) -> Any:
            if kind == "asterisk":
                return await sim.place_call(caller=caller, destination=destination,
                                            accountcode=account, ring_seconds=0.5,
                                            talk_seconds=talk)
            return await sim.place_call(caller=caller, destination=destination,
                                        accountcode=account, ring_seconds=0.5,
                                        talk_seconds=talk)

        _say("1. Night Shift Sales calls outside its calling hours: refused before it rings")
        refused = await (await place("02158883333", "night", "13800138001", 5)).ended()
        print(f"   PBX: call ended with cause {refused.cause}, never answered")

        _say("2. No Balance Co has never topped up: refused")
        broke = await (await place("02158882222", "broke", "13800138002", 5)).ended()
        print(f"   PBX: call ended with cause {broke.cause}, never answered")

        _say("3. ACME talks 12 s (3 started increments of 5 s) and 4. Tight Budget Ltd, "
             "with 0.26 CNY, tries to talk 30 s")
        metered = await place("02158880000", "acme", "13800138003", 12)
        cut = await place("02158881111", "tight", "13800138004", 30)
        await asyncio.sleep(3)
        _say(f"While they talk, from a second shell: {_shown(base, 'calls')}")
        print(await _cli(*base, "calls"), end="")
        metered_result = await metered.ended()
        cut_result = await cut.ended()
        print(f"   ACME call: {metered_result.billsec} s of talk")
        print(f"   Tight Budget call: {cut_result.billsec} s of talk, cut off at its paid "
              "boundary (2 increments = 10 s)")
        await asyncio.sleep(1.0)  # let the meter settle both

        for account in ("acme", "tight"):
            # Printed exactly as run: the command works as shown (with --keep, later too).
            _say(_shown(base, "ledger", "statement", account))
            print(await _cli(*base, "ledger", "statement", account), end="")
        _say(_shown(base, "ledger", "balance"))
        print(await _cli(*base, "ledger", "balance"), end="")
        today = datetime.now(SHANGHAI).date().isoformat()
        report = ("ledger", "report", "--from", today, "--to", today)
        _say(_shown(base, *report) + "   (finance: every account, totals that add up)")
        print(await _cli(*base, *report), end="")
        status = ("-c", str(state / "agent.yaml"), "status")
        _say(f"callgate {' '.join(status)}   (ops: is the running agent healthy?)")
        print(await _cli(*status), end="")
        problems = await daemon.ledger.audit() if daemon.ledger is not None else ["no ledger"]
        balance = await daemon.ledger.balance("tight") if daemon.ledger else None
        ok = (not problems and balance is not None and balance.available == Decimal(0)
              and cut_result.billsec <= 10 and metered_result.billsec >= 11)
        _say("demo finished: " + ("gating, metering and cut-off behaved as the contract says"
                                  if ok else f"something is off: {problems}"))
        return 0 if ok else 1
    finally:
        daemon.request_stop()
        with_timeout = asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        await with_timeout
        await sim.__aexit__(None, None, None)
