"""``deadline(delay_s)``: ``asyncio.timeout`` for the runner's hot paths, on one timer per loop.

uvloop gives every ``call_at`` a libuv timer of its own, allocated, started, stopped and closed
again: with the rest of ``asyncio.timeout`` that is about 4.8 µs a use, and the runner bounds
every HTTP attempt and every Redis round trip. Here each event loop keeps one heap of deadlines
and one timer, armed no later than the earliest deadline still pending; a use is a heap push on
entry and a mark on exit, about 1.7 µs (``docs/dev/performance-notebook.md``).

Behaviour is ``asyncio.timeout``'s: when the deadline passes the task is cancelled, and at the
block's exit that ``CancelledError`` becomes ``TimeoutError``, unless the task was cancelled
from elsewhere as well, in which case it stays a ``CancelledError``. A deadline already past
cancels the task at its next ``await``. Deadlines due within a millisecond of the timer firing
fire with it, as asyncio's own loop rounds to its clock's resolution.

A finished block's entry stays in the heap, marked, until it reaches the top: a deadline is the
time a block started plus its timeout, so the blocks that finish first are mostly the ones on
top, and the heap holds about as many entries as there are blocks in flight.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import threading
from types import TracebackType
from typing import Any

_RESOLUTION_S = 0.001


class _Schedule:
    """The deadlines of one event loop and the timer that expires them."""

    __slots__ = ("_heap", "_loop", "_seq", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # [when, seq, block]: block is None once the block has exited. seq keeps two equal
        # deadlines from comparing their blocks.
        self._heap: list[list[Any]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, when: float, block: Deadline) -> list[Any]:
        self._seq += 1
        entry = [when, self._seq, block]
        heap = self._heap
        heapq.heappush(heap, entry)
        while heap[0][2] is None:  # finished blocks that have come to the top
            heapq.heappop(heap)
        if when < self._timer_at:
            self._arm(when)
        return entry

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        # The timer finds the schedule through the thread's slot rather than holding it: through
        # a bound method, schedule and timer would hold each other, a cycle left to the cyclic
        # collector.
        self._timer = self._loop.call_at(when, _fire, self._loop)

    def fire(self) -> None:
        """Expire the blocks whose deadline has come, and arm the timer for the next one."""
        self._timer, self._timer_at = None, math.inf
        due = self._loop.time() + _RESOLUTION_S
        heap = self._heap
        while heap and (heap[0][2] is None or heap[0][0] <= due):
            block = heapq.heappop(heap)[2]
            if block is not None:
                block._expire()
        if heap:
            self._arm(heap[0][0])


# The schedule of the loop running in this thread, as the attribute ``schedule``.
_current = threading.local()


def _schedule_of(loop: asyncio.AbstractEventLoop) -> _Schedule | None:
    schedule: _Schedule | None = getattr(_current, "schedule", None)
    return schedule if schedule is not None and schedule._loop is loop else None


def _fire(loop: asyncio.AbstractEventLoop) -> None:
    schedule = _schedule_of(loop)
    if schedule is not None:
        schedule.fire()


def deadline(delay_s: float) -> Deadline:
    """``async with deadline(delay_s):`` bounds the block as ``asyncio.timeout`` does."""
    loop = asyncio.get_running_loop()
    schedule = _schedule_of(loop)
    if schedule is None:
        schedule = _current.schedule = _Schedule(loop)
    return Deadline(schedule, loop.time() + delay_s)


class Deadline:
    __slots__ = ("_cancelling", "_entry", "_expired", "_schedule", "_task", "_when")

    def __init__(self, schedule: _Schedule, when: float) -> None:
        self._schedule = schedule
        self._when = when
        self._expired = False
        self._task: asyncio.Task[object] | None = None
        self._entry: list[Any] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._schedule._loop)
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._entry = self._schedule.add(self._when, self)
        return self

    @property
    def expired(self) -> bool:
        return self._expired

    def _expire(self) -> None:
        self._expired = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._entry is not None and self._task is not None
        self._entry[2] = None
        if self._expired and self._task.uncancel() <= self._cancelling:
            if exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
