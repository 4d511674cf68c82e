"""A ``forEach`` step: the same request once per item, at most ``maxParallel`` at a time.

Each item is a small step of its own: its scope adds ``item`` and ``index``, its idempotency key
is ``{run}:{key}:{index}``, it has its own attempts under the step's retry policy and timeout,
and its end is checkpointed (``item:{key}:{index}``), so a delivery that resumes the step sends
only the items that had not finished. The step's output is the list of item outputs, in order;
under ``onItemError: continue`` a failed item's entry is ``{"errorCode", "errorMessage"}``.

Reporting stays one step's: one RUNNING event and one terminal event, both with item counts;
attempts log as any step's; BullMQ progress moves about every 5% of the items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

from runner.engine.plan import StepPlan
from runner.engine.ports import (
    Attempt,
    Clock,
    Deferral,
    FlowControl,
    ItemCounts,
    Reporter,
    RunContext,
    StepResult,
    Transport,
)
from runner.engine.schemas import PlanSchemas
from runner.engine.step import prepare_request, run_attempts
from runner.errors import RunnerError, TemplateError
from runner.telemetry import StepSpan
from runner.templating import render


def item_idempotency_key(run_id: str, step_key: str, index: int) -> str:
    return f"{run_id}:{step_key}:{index}"


class ItemFailed(Exception):
    """An item failed under ``onItemError: fail``: the step fails with its error."""

    def __init__(self, error: RunnerError) -> None:
        super().__init__(error.message)
        self.error = error


class _ItemReporter:
    """What an item's attempts report: their attempts, not a RUNNING event each."""

    def __init__(self, reporter: Reporter, total: int) -> None:
        self._reporter = reporter
        # Flow-control waits are told for the first item that waits, then about every 5% of
        # the items: under a tight rate limit every item waits.
        self._wait_every = max(1, total // 20)
        self._waits = 0

    async def step_running(self, key: str, attempt: int, started_ms: int) -> None:
        return None

    async def attempt_done(self, attempt: Attempt) -> None:
        await self._reporter.attempt_done(attempt)

    async def step_waiting(
        self, key: str, attempt: int, started_ms: int, reason: str, wait_ms: int, deferred: bool
    ) -> None:
        self._waits += 1
        if self._waits % self._wait_every == 1 % self._wait_every or deferred:
            await self._reporter.step_waiting(key, attempt, started_ms, reason, wait_ms, deferred)


def _items_of(sp: StepPlan, ctx: RunContext, scope: Mapping[str, Any], clock: Clock) -> list[Any]:
    assert sp.for_each is not None
    items = render(sp.for_each, scope, clock.now_ms)
    where = f"{sp.where}.forEach"
    if not isinstance(items, list):
        kind = "null" if items is None else type(items).__name__.replace("dict", "object")
        raise TemplateError(f"{where}: yields {kind}, not a list")
    if len(items) > ctx.max_foreach_items:
        raise TemplateError(
            f"{where}: yields {len(items)} items, more than RUNNER_MAX_FOREACH_ITEMS "
            f"({ctx.max_foreach_items})"
        )
    return items


def _entry(res: StepResult) -> Any:
    if res.status == "SUCCESS":
        return res.output
    err = res.error
    return {"errorCode": str(err.code) if err else None, "errorMessage": err.message if err else ""}


async def run_items(
    sp: StepPlan,
    ctx: RunContext,
    scope: Mapping[str, Any],
    schemas: PlanSchemas,
    *,
    transport: Transport,
    reporter: Reporter,
    clock: Clock,
    span: StepSpan,
    result: StepResult,
    flow: FlowControl | None = None,
) -> list[Any]:
    """The list of item outputs; fills ``result`` (attempts, items). Raises ``ItemFailed``
    (``onItemError: fail``), ``Deferral`` (an item's next attempt is far away) or what a
    render raises."""
    items = _items_of(sp, ctx, scope, clock)
    counts = ItemCounts(total=len(items))
    result.items = counts
    outputs: list[Any] = [None] * len(items)
    restored = ctx.restored_items.get(sp.key, {})
    for index, done in restored.items():
        if index < len(items):
            outputs[index] = _entry(done)
            if done.status == "SUCCESS":
                counts.succeeded += 1
            else:
                counts.failed += 1
    pending = iter([i for i in range(len(items)) if i not in restored])
    await reporter.map_running(sp.key, result.started_ms or clock.now_ms(), counts)
    item_reporter = _ItemReporter(reporter, len(items))
    continue_on_error = sp.step.on_item_error == "continue"

    async def one(index: int) -> None:
        res = StepResult(sp.key, "FAILED", started_ms=clock.now_ms())
        try:
            request = prepare_request(
                sp,
                ctx,
                {**scope, "item": items[index], "index": index},
                schemas,
                clock.now_ms,
                idempotency=item_idempotency_key(ctx.run_id, sp.key, index),
            )
            res.output = await run_attempts(
                sp,
                ctx,
                request,
                transport=transport,
                reporter=item_reporter,  # type: ignore[arg-type]  # only the two it calls
                clock=clock,
                result=res,
                schemas=schemas,
                span=span,
                flow=flow,
            )
            res.status = "SUCCESS"
        except RunnerError as caught:
            err = caught.as_record()
            if err.message.startswith("$"):  # a JSON path stays first, as for any step
                err.message = f"{err.message} (item {index})"
            else:
                err.message = f"{sp.key}: item {index}: {err.message}"
            res.error = err
        finally:
            result.attempts += res.attempts
        res.finished_ms = clock.now_ms()
        if res.status == "SUCCESS":
            counts.succeeded += 1
        else:
            counts.failed += 1
        outputs[index] = _entry(res)
        await reporter.item_done(sp.key, index, res, counts)
        if res.error is not None and not continue_on_error:
            raise ItemFailed(res.error)

    async def worker(indexes: Iterator[int]) -> None:
        for index in indexes:
            await one(index)

    # Not a TaskGroup: on 3.11 one leaves its task "cancelling" after a child fails, and the
    # walk would read that as the run being stopped.
    workers = [
        asyncio.ensure_future(worker(pending)) for _ in range(min(sp.max_parallel, len(items)))
    ]
    if not workers:  # no items: an empty list
        return outputs
    try:
        await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in workers:
            task.cancel()
        outcomes = await asyncio.gather(*workers, return_exceptions=True)
    errors = [e for e in outcomes if isinstance(e, BaseException)]
    errors = [e for e in errors if not isinstance(e, asyncio.CancelledError)]
    if errors:
        raise _first(errors)
    return outputs


def _first(errors: list[BaseException]) -> BaseException:
    """The error that ended the items: a failure, else a deferral, else whatever it was."""
    for kind in (ItemFailed, Deferral):
        for err in errors:
            if isinstance(err, kind):
                return err
    return errors[0]
