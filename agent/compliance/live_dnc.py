"""The gate's in-memory copy of the ledger's live do-not-call entries (pure).

Millions of entries stay cheap the way the policy's files do
(:mod:`agent.gate.dnc`): each account's numbers (and those for everyone, under
the account ``""``) are one sorted ``array('Q')``, 8 bytes a number, looked
up by binary search. Changes since that base are two small sets per account
(added, removed keys), consulted first; when they grow past
:data:`COMPACT_AFTER` they are folded into a new base array, so a long-running
agent never pays per change for more than a set lookup.

``seq`` is the number of the last change of the ledger's ordered change log
this copy reflects; :meth:`LiveDnc.apply` takes changes strictly in order and
ignores any it already has, so a poll that overlaps the previous one is
harmless. A gap (a change it never saw) cannot happen: the log is never pruned
and is committed in ``seq`` order (see :mod:`agent.ledger.compliance`).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping

from agent.gate.dnc import DncSet, is_key_number, number_key
from agent.ledger.compliance import GLOBAL, DncChange

COMPACT_AFTER = 50_000  # overlay entries of one account before it is folded into its base


class _Entries:
    __slots__ = ("added", "base", "removed")

    def __init__(self, base: DncSet) -> None:
        self.base = base
        self.added: set[int] = set()
        self.removed: set[int] = set()

    def __contains__(self, key: int) -> bool:
        if key in self.added:
            return True
        return key not in self.removed and self.base.has_key(key)

    def __len__(self) -> int:
        return len(self.base) + len(self.added) - len(self.removed)

    def add(self, key: int) -> None:
        self.removed.discard(key)
        if not self.base.has_key(key):
            self.added.add(key)

    def remove(self, key: int) -> None:
        self.added.discard(key)
        if self.base.has_key(key):
            self.removed.add(key)

    def compact(self) -> None:
        keys = set(self.base.keys())
        keys -= self.removed
        keys |= self.added
        self.base = DncSet(array("Q", sorted(keys)))
        self.added, self.removed = set(), set()


class LiveDnc:
    """Implements :class:`~agent.gate.decision.DncView` for ``decide()``."""

    def __init__(self) -> None:
        self.seq = 0
        self._by_account: dict[str, _Entries] = {}
        self._size = 0

    def load(self, seq: int, keys: Mapping[str, array[int]]) -> None:
        """Replace the whole copy with a snapshot complete up to change ``seq``."""
        by_account: dict[str, _Entries] = {}
        size = 0
        for account, unsorted in keys.items():
            # The ledger's primary key (account, number) makes the keys unique; no set.
            ordered = array("Q", sorted(unsorted))
            by_account[account] = _Entries(DncSet(ordered))
            size += len(ordered)
        self._by_account, self._size, self.seq = by_account, size, seq

    def apply(self, changes: Iterable[DncChange]) -> int:
        """Apply changes in ``seq`` order; those at or below ``self.seq`` are skipped.

        Returns how many were applied. A change whose number cannot be a key
        (a row written before the ledger checked for ASCII digits: ``¹²³``) can
        never match a dialled number, so it is passed over, not raised: one bad
        row must not stop every node's sync.
        """
        applied = 0
        for change in changes:
            if change.seq <= self.seq:
                continue
            if not is_key_number(change.number):
                self.seq = change.seq
                continue
            entries = self._by_account.get(change.account)
            if entries is None:
                entries = self._by_account[change.account] = _Entries(DncSet(array("Q")))
            before = len(entries)
            key = number_key(change.number)
            if change.added:
                entries.add(key)
            else:
                entries.remove(key)
            self._size += len(entries) - before
            if len(entries.added) + len(entries.removed) > COMPACT_AFTER:
                entries.compact()
            self.seq = change.seq
            applied += 1
        return applied

    def listed(self, account: str, number: str) -> bool:
        if not is_key_number(number):
            return False
        key = number_key(number)
        own = self._by_account.get(account)
        if own is not None and key in own:
            return True
        everyone = self._by_account.get(GLOBAL)
        return everyone is not None and key in everyone

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Memory of the base arrays (the overlays are small by construction)."""
        return sum(e.base.nbytes for e in self._by_account.values())
