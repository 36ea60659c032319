"""Group commit for the PostgreSQL ledger: requests of one kind that queue up
while the agent's lanes to the server are busy go together, as one statement.

The SQLite worker commits whatever is queued as one transaction; this is the
same idea for a server that is reached over a socket. A :class:`Lane` has a
fixed number of lanes (statements of its kind in flight at once). A request
that finds a lane free is sent at once and alone, so a quiet agent pays no
added latency; requests that arrive while every lane is busy wait, and the
next lane to come free takes all of them (up to ``max_batch``) as one batch:
one statement, one transaction, one commit, one round trip. What a batch does
per element is the single request's server function (agent/ledger/_pg_schema.py),
so the money rules are the same; if the batch fails as a whole, for any
reason but a lost server, its elements are sent again one by one, so one
request's error reaches that request alone.

A request whose caller gave up while it was still queued is dropped when the
lane's ``abandonable`` says so (an admission nobody waits for any more); any
other request runs regardless (a settlement cancelled at shutdown still stands).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")

# Enough to amortise a commit and the per-statement work across many requests,
# small enough that one batch never holds its rows' locks for long.
MAX_BATCH = 64


class BatchFailed(Exception):
    """A batch statement failed for a reason other than a lost server; its elements
    are sent again one by one."""


class Lane(Generic[Req, Res]):
    """Requests of one kind, sent alone when a lane is free, else batched.

    ``one(req)`` sends one request; ``many(reqs)`` sends several as one statement
    and returns their results in order, or raises :class:`BatchFailed` (its
    elements then go through ``one``) or any other error (given to every element:
    the server was lost, as ``one`` would have said for each).
    """

    def __init__(self, lanes: int, one: Callable[[Req], Awaitable[Res]],
                 many: Callable[[Sequence[Req]], Awaitable[list[Res]]], *,
                 abandonable: bool = False, max_batch: int = MAX_BATCH) -> None:
        if lanes < 1:
            raise ValueError("a lane needs at least one statement in flight")
        self.lanes = lanes
        self._one = one
        self._many = many
        self._abandonable = abandonable
        self._max_batch = max_batch
        self._busy = 0
        self._queue: list[tuple[Req, asyncio.Future[Res]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches of two or more sent (for tests and benches)

    async def submit(self, req: Req) -> Res:
        if self._busy < self.lanes and not self._queue:
            self._busy += 1
            try:
                return await self._one(req)
            finally:
                self._busy -= 1
                self._next()
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.append((req, future))
        return await future

    def _next(self) -> None:
        """A lane came free: give it whatever queued meanwhile."""
        if self._abandonable:
            self._queue = [(r, f) for r, f in self._queue if not f.cancelled()]
        if not self._queue or self._busy >= self.lanes:
            return
        batch, self._queue = self._queue[:self._max_batch], self._queue[self._max_batch:]
        self._busy += 1
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        try:
            if len(batch) == 1:
                await self._alone(*batch[0])
                return
            try:
                self.batches += 1
                results = await self._many([req for req, _ in batch])
            except BatchFailed:
                for req, future in batch:
                    # One whose caller gave up meanwhile is still unsent: dropped, as
                    # from the queue (an admission the PBX was told to refuse).
                    if not (self._abandonable and future.cancelled()):
                        await self._alone(req, future)
                return
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._busy -= 1
            self._next()

    async def _alone(self, req: Req, future: asyncio.Future[Res]) -> None:
        try:
            result = await self._one(req)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    async def wait(self) -> None:
        """Until every batch sent so far is answered (for close)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
