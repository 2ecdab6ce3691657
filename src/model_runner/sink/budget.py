"""The bytes of request bodies that the writes sharing a client may hold at once, served first come, first served."""

from __future__ import annotations

import itertools
from collections import deque

import anyio

__all__ = ["BudgetHold", "ByteBudget"]


class ByteBudget:
    """
    Bytes of request bodies that the uploads sharing it may hold at once, e.g. every write of a sink.

    Waiters are served in the order they came, so a large body is never overtaken forever by smaller ones; a
    body larger than the whole budget goes alone. A body takes its bytes as they arrive (:meth:`hold`) and gives
    nothing back before it is sent: when every byte held belongs to bodies waiting for more, none of them could
    ever finish, so the oldest goes on over the limit, alone, until the budget is back within it. The bytes held
    thus never exceed ``limit`` plus the largest body one holder builds (for a write, the larger of
    ``multipart_threshold`` and the part size, plus one encoded batch); :attr:`peak` records the most held.

    :param limit: The budget in bytes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes held now.
        self.used = 0
        #: The most bytes held at once so far.
        self.peak = 0
        self._queue: deque[_Waiter] = deque()
        self._held_by_waiters = 0
        # The body that may go over the limit; only one at a time, which is what bounds the excess.
        self._over: BudgetHold | None = None
        self._ages = itertools.count()

    def hold(self) -> BudgetHold:
        """
        Start a body that takes its bytes as they arrive.

        :return: An empty hold on this budget.
        """
        return BudgetHold(self)

    async def acquire(self, size: int) -> None:
        """
        Wait for the turn of a body of ``size`` bytes, and take them; give them back with :meth:`release`.

        :param size: Bytes of the body about to be built.
        """
        await BudgetHold(self).grow(size)

    def release(self, size: int) -> None:
        """
        Give bytes back once their body is sent or dropped.

        :param size: Bytes taken by :meth:`acquire`.
        """
        self._give_back(size)

    async def _grow(self, hold: BudgetHold, size: int) -> None:
        if not self._queue and self._fits(size):
            self._take(hold, size)
            return
        waiter = _Waiter(hold, size)
        self._queue.append(waiter)
        self._held_by_waiters += hold.size
        self._serve()
        try:
            await waiter.served.wait()
        except BaseException:
            # Served as the cancellation came, the bytes stay in the hold, which its owner releases.
            if not waiter.served.is_set():
                self._queue.remove(waiter)
                self._held_by_waiters -= hold.size
                self._serve()
            raise

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def _serve(self) -> None:
        while self._queue:
            waiter: _Waiter | None = self._queue[0]
            assert waiter is not None
            if not self._fits(waiter.size):
                waiter = self._stuck_waiter()
                if waiter is None:
                    return
            self._queue.remove(waiter)
            self._held_by_waiters -= waiter.hold.size
            self._take(waiter.hold, waiter.size)
            waiter.served.set()

    def _stuck_waiter(self) -> _Waiter | None:
        if self.used != self._held_by_waiters:
            return None  # some bytes are being sent: they come back without anyone's help
        waiters = [waiter for waiter in self._queue if waiter.hold.size]
        chosen = None
        if self.used > self.limit:
            chosen = next((waiter for waiter in waiters if waiter.hold is self._over), None)
        if chosen is None:
            chosen = min(waiters, key=lambda waiter: waiter.hold.age)
            self._over = chosen.hold
        return chosen

    def _take(self, hold: BudgetHold, size: int) -> None:
        if not hold.size:
            hold.age = next(self._ages)
        hold.size += size
        self.used += size
        self.peak = max(self.peak, self.used)

    def _give_back(self, size: int) -> None:
        self.used -= size
        if self.used <= self.limit:
            self._over = None
        self._serve()


class BudgetHold:
    """
    The bytes one body holds in a :class:`ByteBudget`: taken as the body is built, given back when it is sent.

    :param budget: The budget the bytes come from.
    """

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        #: Bytes held.
        self.size = 0
        #: When the body got its first bytes, on the budget's own count: the oldest goes on when all are stuck.
        self.age = 0

    async def grow(self, size: int) -> None:
        """
        Wait for this body's turn, then take ``size`` bytes more.

        :param size: Bytes just added to the body.
        """
        await self.budget._grow(self, size)

    def split(self, size: int) -> BudgetHold:
        """
        Hand the first ``size`` bytes to a body of their own, e.g. a complete part about to be sent; what remains
        starts a new body.

        :param size: Bytes to hand over, at most :attr:`size`.
        :return: A hold of ``size`` bytes.
        """
        if not 0 <= size <= self.size:
            raise ValueError(f"cannot split {size} bytes from a hold of {self.size}")
        part = BudgetHold(self.budget)
        part.size, part.age = size, self.age
        self.size -= size
        self.age = next(self.budget._ages)
        return part

    def release(self) -> None:
        """Give every byte back: the body was sent or dropped. Idempotent."""
        size, self.size = self.size, 0
        if size:
            self.budget._give_back(size)


class _Waiter:
    __slots__ = ("hold", "served", "size")

    def __init__(self, hold: BudgetHold, size: int) -> None:
        self.hold = hold
        self.size = size
        self.served = anyio.Event()
