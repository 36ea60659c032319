"""A meter wired to a real SQLite ledger, the in-process PBX and a simulated clock."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.calls import CallInfo, Direction
from agent.gate.policy import Policy, load_policy
from agent.gatekeeper import Gatekeeper
from agent.ledger import open_ledger
from agent.meter.clock import SimClock
from agent.meter.meter import Meter, MeterSettings
from agent.rating import rate
from agent.sim.memory import MemoryPbx, SimCall

POLICY = """\
version: 1
prepaid: {first_topup_minimum: "0.01"}
defaults:
  calling_hours: [{days: all, windows: [{start: "00:00", end: "24:00"}]}]
  max_concurrent_calls: 50
  low_balance_warning: "0"
accounts:
"""


def policy_text(accounts: int = 1, extra_defaults: str = "") -> str:
    text = POLICY.replace("defaults:\n", "defaults:\n" + extra_defaults)
    for i in range(accounts):
        text += f"  a{i}: {{name: A{i}, caller_ids: [\"0215888{i:04d}\"]}}\n"
    return text


class Harness:
    def __init__(self, tmp_path: Path, start: datetime, text: str | None = None,
                 settings: MeterSettings | None = None) -> None:
        self.tmp_path = tmp_path
        self.clock = SimClock(start)
        path = tmp_path / "policy.yaml"
        path.write_text(textwrap.dedent(text or policy_text()))
        self.policy: Policy = load_policy(path)
        self.settings = settings or MeterSettings()
        self.pbx = MemoryPbx(self.clock)
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.seq = 0
        self.calls: dict[str, SimCall] = {}
        # A test may stand between the PBX and the meter to duplicate or reorder events.
        self.event_filter: Any = None

    def _deliver(self, event: Any) -> None:
        if self.event_filter is None:
            self.meter.on_event(event)
        else:
            self.event_filter(event, self.meter.on_event)

    async def start(self) -> Harness:
        self.ledger = await open_ledger(f"sqlite:///{self.tmp_path / 'ledger.db'}")
        self._start_agent()
        return self

    def _start_agent(self) -> None:
        self.meter = Meter(ledger=self.ledger, pbx=self.pbx, policy=lambda: self.policy,
                           clock=self.clock, node="n1", settings=self.settings,
                           publish=lambda t, p: self.published.append((t, p)))
        self.gate = Gatekeeper(ledger=self.ledger, policy=lambda: self.policy,
                               clock=self.clock, node="n1", budget=30)
        self.pbx.sink = self._deliver
        self.clock.settle = self.meter.wait_idle
        self.task = asyncio.create_task(self.meter.run())
        self.pbx.reconnect()  # like the adapters: PbxConnected with the live calls first

    async def kill_agent(self) -> None:
        """The agent dies: nothing hears the PBX until restart."""
        self.pbx.sink = None
        self.clock.settle = None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def restart_agent(self) -> None:
        self._start_agent()
        await self.meter.wait_idle()

    async def stop(self) -> None:
        await self.kill_agent()
        await self.ledger.close()

    async def topup(self, account: str, amount: str) -> None:
        self.seq += 1
        await self.ledger.topup(account, Decimal(amount), ref=f"t{self.seq}",
                                at=self.clock.now())

    async def penalty(self, account: str, amount: str) -> None:
        self.seq += 1
        await self.ledger.penalty(account, Decimal(amount), ref=f"p{self.seq}",
                                  at=self.clock.now())

    async def dial(self, account: str = "a0", *, talk: float | None, ring: float = 3,
                   destination: str = "13800138000",
                   gated: bool = True) -> tuple[Any, SimCall | None]:
        self.seq += 1
        index = int(account[1:])
        info = CallInfo(f"call-{self.seq}", Direction.OUTBOUND, f"0215888{index:04d}",
                        destination, account)
        if not gated:
            call = self.pbx.place(info, ring_seconds=ring, talk_seconds=talk)
            self.calls[info.call_id] = call
            return None, call
        decision = await self.gate(info)
        if not decision.allow:
            return decision, None
        call = self.pbx.place(info, ring_seconds=ring, talk_seconds=talk,
                              max_seconds=decision.max_seconds)
        self.calls[info.call_id] = call
        return decision, call

    async def advance(self, seconds: float) -> None:
        await self.clock.advance(seconds)
        await self.meter.wait_idle()

    async def cdr(self, call_id: str) -> Any:
        record = await self.ledger.get_call(call_id)
        if record is None:
            return None
        start, end = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
        for cdr in await self.ledger.cdrs(record.account, start, end):
            if cdr.call_id == call_id:
                return cdr
        return None

    async def check_invariants(self, note: str = "") -> None:
        """The five money invariants, against the PBX's own truth."""
        grace = self.settings.grace_seconds
        problems: list[str] = []
        for call_id, call in self.calls.items():
            if call.ended_at is None:
                problems.append(f"{call_id}: still up on the PBX")
                continue
            record = await self.ledger.get_call(call_id)
            if record is None:
                problems.append(f"{call_id}: unknown to the ledger")
                continue
            cdr = await self.cdr(call_id)
            if cdr is None:
                problems.append(f"{call_id}: ended on the PBX but not settled (orphan)")
                continue
            tariff_rate = rate(_tariff(record), call.billsec)
            paid = record.paid_seconds
            if "outcome_unknown" in cdr.flags:
                # answered and ended while the agent was dead: not charged, flagged for
                # finance; the PBX-side limit still kept its talk within what was held.
                if call.billsec > paid + grace:
                    problems.append(f"{call_id}: talked {call.billsec} s, paid {paid} s")
                continue
            # (2) no talk beyond what was paid (the grace is the PBX-side tolerance)
            if call.billsec > paid + grace:
                problems.append(f"{call_id}: talked {call.billsec} s, paid {paid} s")
            # (1) exact charge from the PBX's billsec
            if "grace" in cdr.flags or "billsec_assumed_paid" in cdr.flags:
                expected = rate(_tariff(record), min(call.billsec, paid))
            else:
                expected = tariff_rate
            if cdr.amount != expected and "unpaid" not in cdr.flags:
                problems.append(f"{call_id}: charged {cdr.amount}, billsec {call.billsec} "
                                f"rates {expected} (flags {cdr.flags})")
        # (3) no balance below zero through calls: replay each account's postings
        for balance in await self.ledger.balances():
            posted = held = Decimal(0)
            for p in await self.ledger.history(balance.account):
                kind = p.kind.value
                if kind == "topup":
                    posted += p.amount
                elif kind in ("penalty", "refund"):
                    posted -= p.amount
                elif kind == "adjustment":
                    posted += p.amount
                elif kind == "hold":
                    held += p.amount
                    if posted - held < 0:
                        problems.append(f"{balance.account}: hold {p.key} overdrew to "
                                        f"{posted - held}")
                elif kind == "charge":
                    posted -= p.amount
                    held -= p.amount
                elif kind == "release":
                    held -= p.amount
            # (5) no open hold once every call has ended
            if balance.held != 0:
                problems.append(f"{balance.account}: {balance.held} still held")
        # (4) postings sum to balances
        problems += await self.ledger.audit()
        left = [c.call_id for c in await self.ledger.live_calls()]
        if left:
            problems.append(f"live calls left in the ledger: {left}")
        assert not problems, f"{note}\n" + "\n".join(problems[:30])


def _tariff(record: Any) -> Any:
    from agent.rating import Tariff

    return Tariff(record.tariff_name, record.rate, record.increment, record.minimum)
