"""``resp.Batches``: what the status sink and the completions are written through. One batch in
flight at a time, in the order of submission, sent again through a connection failure."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from runner.resp import Batches


class FlakyExecute:
    """Fails the first ``failures`` calls with ``ConnectionError``, then answers each item."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[list[str]] = []

    async def __call__(self, batch: list[str]) -> list[Any]:
        self.batches.append(list(batch))
        await asyncio.sleep(0.01)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection reset by peer")
        return [f"ok {item}" for item in batch]


async def test_given_items_submitted_during_a_batch_then_they_go_out_together_next() -> None:
    execute = FlakyExecute()
    batches = Batches(execute, name="test")

    first = batches.submit("a")
    await asyncio.sleep(0.005)  # the first batch is in flight
    second, third = batches.submit("b"), batches.submit("c", "d")

    assert await asyncio.gather(first, second, third) == ["ok a", "ok b", "ok d"]
    assert execute.batches == [["a"], ["b", "c", "d"]]


async def test_given_a_connection_failure_when_sent_then_the_batch_goes_again() -> None:
    execute = FlakyExecute(failures=2)
    batches = Batches(execute, name="test")

    assert await batches.submit("a", "b") == "ok b"
    assert execute.batches == [["a", "b"]] * 3
    assert batches.sent == 1


async def test_given_a_retry_waiting_when_other_tasks_run_then_they_see_no_handled_error() -> None:
    # While the batch waits to go again, the connection's error must not stay the thread's
    # handled exception (as it would if a compiled coroutine awaited inside its handler): the
    # other tasks' errors would carry it as their context.
    execute = FlakyExecute(failures=1)
    batches = Batches(execute, name="test")
    sent = batches.submit("a")
    seen: list[Any] = []

    async def another_task() -> None:
        for _ in range(20):
            seen.append(sys.exc_info()[1])
            try:
                raise ValueError("unrelated")
            except ValueError as err:
                seen.append(err.__context__)
            await asyncio.sleep(0.005)

    await asyncio.gather(sent, another_task())

    assert execute.batches == [["a"], ["a"]]
    assert seen == [None] * 40


async def test_given_an_outage_longer_than_allowed_when_sent_then_every_item_fails() -> None:
    execute = FlakyExecute(failures=1000)
    batches = Batches(execute, name="test", outage_s=0.1)

    with pytest.raises(ConnectionError):
        await batches.submit("a", "b")
