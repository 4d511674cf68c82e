"""``runner.deadline``: what ``asyncio.timeout`` does, on one timer per loop. On uvloop, as the
runner runs, and on asyncio's own loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from runner import deadline as deadline_module
from runner.deadline import deadline

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[object]], object]:
    def run_on_loop(main: Awaitable[object]) -> object:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(main)  # type: ignore[arg-type]

    return run_on_loop


def test_a_block_that_outlasts_its_deadline_raises_timeout_error(run: Callable) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with deadline(0.05) as block:
                await asyncio.sleep(5)
        assert block.expired
        assert 0.045 <= loop.time() - started < 1
        # The task is not left cancelled: it goes on awaiting.
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        await asyncio.sleep(0)

    run(main())


def test_a_block_that_ends_in_time_is_left_alone(run: Callable) -> None:
    async def main() -> str:
        async with deadline(0.2) as block:
            await asyncio.sleep(0.01)
        assert not block.expired
        # Its deadline passing later cancels nothing.
        await asyncio.sleep(0.3)
        return "done"

    assert run(main()) == "done"


def test_a_cancel_from_elsewhere_stays_a_cancel_even_when_the_deadline_passes_too(
    run: Callable,
) -> None:
    async def main() -> None:
        async def body() -> None:
            async with deadline(0.05):
                try:
                    await asyncio.sleep(5)
                finally:
                    await asyncio.sleep(0.1)  # the deadline passes while it cleans up

        task = asyncio.ensure_future(body())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_a_deadline_already_past_cancels_at_the_first_await(run: Callable) -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with deadline(-1):
                await asyncio.sleep(1)

    run(main())


def test_many_blocks_each_expire_at_their_own_deadline_and_only_they(run: Callable) -> None:
    async def main() -> dict[str, list[int]]:
        outcomes: dict[str, list[int]] = {"timed out": [], "done": []}

        async def block(i: int, timeout_s: float, work_s: float) -> None:
            try:
                async with deadline(timeout_s):
                    await asyncio.sleep(work_s)
                outcomes["done"].append(i)
            except TimeoutError:
                outcomes["timed out"].append(i)

        # Interleaved: short and long deadlines, some blocks slower than theirs. The finished
        # ones stay in the heap until they come to its top.
        plan = [(i, 0.05 if i % 2 else 0.4, 0.2 if i % 3 == 0 else 0.01) for i in range(60)]
        await asyncio.gather(*(block(*p) for p in plan))
        return outcomes

    outcomes = run(main())
    assert isinstance(outcomes, dict)
    expected_timeouts = sorted(i for i in range(60) if i % 2 and i % 3 == 0)
    assert sorted(outcomes["timed out"]) == expected_timeouts
    assert len(outcomes["done"]) == 60 - len(expected_timeouts)


def test_a_later_deadline_still_fires_after_an_earlier_one_has(run: Callable) -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ended: list[float] = []

        async def block(timeout_s: float) -> None:
            with pytest.raises(TimeoutError):
                async with deadline(timeout_s):
                    await asyncio.sleep(2)
            ended.append(loop.time() - started)

        await asyncio.gather(block(0.15), block(0.05))
        return ended

    ended = run(main())
    assert isinstance(ended, list)
    assert 0.045 <= ended[0] < 0.14 and 0.145 <= ended[1] < 1.5, ended


def test_blocks_used_one_after_another_do_not_pile_up(run: Callable) -> None:
    async def main() -> int:
        for _ in range(5000):
            async with deadline(30):
                await asyncio.sleep(0)
        schedule = deadline_module._current.schedule
        assert schedule is not None
        return len(schedule._heap)

    assert run(main()) <= 1


def test_each_loop_gets_a_schedule_of_its_own(run: Callable) -> None:
    async def main() -> object:
        async with deadline(1):
            pass
        return deadline_module._current.schedule

    first, second = run(main()), run(main())
    assert first is not second
