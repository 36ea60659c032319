"""The low-balance warning: ``balance/low`` once each time an account goes below its line.

An account's ``low_balance_warning`` is a line; the warning is published when
the available balance is seen below it, once, and re-armed when the balance is
seen at or above it again (a top-up). The balance is looked at after every
hold and every settlement the meter makes, and every ``interval`` seconds for
all accounts in one ledger read: finance postings (top-ups, penalties, refunds,
adjustments) are made by the CLI in another process, so the sweep is how the
daemon notices them, within ``interval`` (``meter.balance_check_seconds``). Each
node watches on its own.

That read is the daemon's only periodic read of every balance: whoever else
wants the balances on that beat (the metrics' per-account gauges) is handed the
same rows (``on_balances``) instead of reading them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import structlog

from agent.gate.policy import Policy
from agent.ledger import Balance, Ledger, LedgerError
from agent.money import format_amount

log = structlog.get_logger("callgate.meter")

Publish = Callable[[str, dict[str, Any]], None]
BalancesHook = Callable[[Sequence[Balance]], None]


class LowBalanceAlarm:
    """Pure crossing detector: which observations must be published."""

    def __init__(self) -> None:
        self._below: set[str] = set()  # accounts warned and not back above the line since

    def observe(self, account: str, available: Decimal, line: Decimal) -> bool:
        """True when this observation crosses below ``line`` (publish it)."""
        if line <= 0 or available >= line:
            self._below.discard(account)
            return False
        if account in self._below:
            return False
        self._below.add(account)
        return True


class LowBalanceWatch:
    """The alarm fed from the ledger, publishing ``balance/low``."""

    def __init__(self, ledger: Ledger, policy: Callable[[], Policy], publish: Publish,
                 on_balances: BalancesHook | None = None) -> None:
        self.ledger = ledger
        self.policy = policy
        self.publish = publish
        self.on_balances = on_balances  # also handed every sweep's rows
        self.alarm = LowBalanceAlarm()

    def _seen(self, account_id: str, available: Decimal) -> None:
        account = self.policy().accounts.get(account_id)
        line = account.low_balance_warning if account is not None else Decimal(0)
        if self.alarm.observe(account_id, available, line):
            self.publish("balance/low", {"account": account_id, "available": str(available),
                                         "threshold": str(line)})
            log.warning("meter.balance_low", account=account_id,
                        available=format_amount(available), threshold=format_amount(line))

    async def check(self, account_id: str) -> None:
        """After a hold or a settlement of this account."""
        account = self.policy().accounts.get(account_id)
        if account is None or account.low_balance_warning <= 0:
            return
        try:
            balance = await self.ledger.balance(account_id)
        except LedgerError:
            return  # the sweep looks again
        self._seen(account_id, balance.available)

    async def sweep(self, timeout: float | None = None) -> None:
        """Every account in one read (finance postings made elsewhere), handed to
        ``on_balances`` too. A read not done within ``timeout`` seconds is given up
        (the next sweep reads again)."""
        try:
            async with asyncio.timeout(timeout):
                balances = await self.ledger.balances()
        except (LedgerError, TimeoutError) as exc:
            log.warning("meter.balance_sweep_failed", error=str(exc) or type(exc).__name__)
            return
        if self.on_balances is not None:
            self.on_balances(balances)
        for balance in balances:
            self._seen(balance.account, balance.available)
