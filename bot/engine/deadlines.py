"""One timer for many deadlines: a heap of (when, callback) behind a single event-loop timer.

Every waiting job has a queue timeout and every generation a job timeout. One ``loop.call_later`` each would
put thousands of timer handles in the loop's own heap and cost a handle, a heap push and a cancel per job;
here arming is a heap push, disarming flips a flag (the entry is dropped lazily when it surfaces, or when the
heap is compacted once most of it is dead), and the loop holds one timer: for the earliest live deadline.

Invariants: ``_timer`` is set exactly when a live entry exists, and fires no later than the earliest one;
``_dead`` counts the cancelled entries still in the heap. Times are the running loop's (``loop.time()``), so a
test that owns the loop's clock owns these deadlines too.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

#: ``Deadline.arg`` when the callback takes none.
_NO_ARG = object()
#: Compact the heap when it holds more dead entries than this and than live ones.
_COMPACT_AT = 64


class Deadline:
    """A handle to one armed deadline; :meth:`cancel` disarms it (idempotent)."""

    __slots__ = ("_owner", "arg", "callback", "when")

    def __init__(
        self, owner: Deadlines, when: float, callback: Callable[..., None], arg: object = _NO_ARG
    ) -> None:
        self._owner: Deadlines | None = owner
        self.when = when
        self.callback: Callable[..., None] | None = callback
        #: Passed to ``callback`` when set (saves a closure or partial per deadline on hot paths).
        self.arg = arg

    @property
    def active(self) -> bool:
        return self.callback is not None

    def cancel(self) -> None:
        if self.callback is None:
            return
        self.callback = None
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._cancelled()

    def __lt__(self, other: Deadline) -> bool:  # only ties on ``when`` reach this (the heap holds tuples)
        return False


class Deadlines:
    """Deadlines on the running loop's clock, served by one loop timer."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._dead = 0
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Live (armed, not yet fired) deadlines."""
        return len(self._heap) - self._dead

    def after(self, delay: float, callback: Callable[..., None], arg: object = _NO_ARG) -> Deadline:
        """Run ``callback`` (``callback(arg)`` when ``arg`` is given) ``delay`` seconds from now (at once, on the
        next loop turn, if ``delay <= 0``)."""
        loop = asyncio.get_running_loop()
        deadline = Deadline(self, loop.time() + max(0.0, delay), callback, arg)
        heapq.heappush(self._heap, (deadline.when, next(self._seq), deadline))
        if self._timer is None or deadline.when < self._timer.when():
            self._schedule(loop, deadline.when)
        return deadline

    def close(self) -> None:
        """Disarm everything (shutdown)."""
        for _, _, deadline in self._heap:
            deadline.callback = None
            deadline._owner = None
        self._heap.clear()
        self._dead = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- internals --------------------------------------------------------------------------------------------
    def _cancelled(self) -> None:
        self._dead += 1
        if self._dead > _COMPACT_AT and self._dead * 2 > len(self._heap):
            self._heap = [item for item in self._heap if item[2].callback is not None]
            heapq.heapify(self._heap)
            self._dead = 0
        if self._dead == len(self._heap):
            # Nothing live left: forget the dead. The loop timer stays armed: re-arming one per deadline costs
            # more than the single idle wake-up it may still cause (it then finds nothing and re-arms nothing).
            self._heap.clear()
            self._dead = 0

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        heap = self._heap
        due: list[tuple[Callable[..., None], object]] = []
        while heap and (heap[0][2].callback is None or heap[0][0] <= now):
            _, _, deadline = heapq.heappop(heap)
            callback = deadline.callback
            if callback is None:
                self._dead -= 1
                continue
            deadline.callback = None
            deadline._owner = None
            due.append((callback, deadline.arg))
        if heap:
            self._schedule(loop, heap[0][0])
        for callback, arg in due:
            try:
                callback() if arg is _NO_ARG else callback(arg)
            except Exception:
                log.exception("deadline callback failed")
