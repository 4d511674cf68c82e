"""Run one workflow: walk the graph, bound it by the deadline, honour a cancel.

A step starts once every step it depends on has finished (SUCCESS, FAILED with ``CONTINUE``,
or SKIPPED), up to ``step_parallelism`` steps at a time; a plain list is therefore linear.
Steps that run beside others get a task each; a step that is the only one to run (every step
of a linear run) runs in the walk's own task.

Endings:
- a step fails with ``FAIL_RUN``: running siblings are cancelled (CANCELED), steps not started
  are CANCELED, the run is FAILED with that step's error;
- the deadline passes: the steps in flight fail with ``WORKFLOW_TIMEOUT``, the rest are
  CANCELED, the run is FAILED with ``WORKFLOW_TIMEOUT``;
- a cancel arrives: everything unfinished is CANCELED and so is the run;
- a step's next attempt is further away than ``long_wait_ms``, or the process must give the
  run back (``hand_back``, a shutdown past its grace period): no new step starts, steps in
  flight finish (or, on hand-back, are interrupted and will be sent again), and the outcome is
  DEFERRED with nothing final reported: the job goes back to BullMQ and a later delivery
  continues from the checkpoint.

Templates see ``steps.<key>.status`` for every finished step and ``steps.<key>.output`` only
for a step that succeeded, so reading the output of a failed or skipped step is a
``TEMPLATE_ERROR`` for the step that reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from runner.engine.map import ItemFailed, run_items
from runner.engine.paged import run_pages
from runner.engine.pagination import PageLimits
from runner.engine.plan import Plan, StepPlan
from runner.engine.ports import (
    Clock,
    Deferral,
    FlowControl,
    Reporter,
    RunContext,
    RunStatus,
    StepResult,
    Transport,
)
from runner.engine.step import prepare_request, run_attempts, should_run
from runner.errors import Canceled, RunnerError, WorkflowTimeout
from runner.telemetry import StepSpan


class RunOutcome:
    """How a run ended."""

    __slots__ = ("deferred", "error", "status", "steps")

    def __init__(
        self,
        status: RunStatus,
        error: RunnerError | None,
        steps: dict[str, StepResult],
        # DEFERRED: the steps to continue, each with its next attempt and when it may start.
        deferred: dict[str, StepResult] | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.steps = steps
        self.deferred: dict[str, StepResult] = deferred if deferred is not None else {}

    def __repr__(self) -> str:
        return f"RunOutcome({self.status!r}, {self.error!r}, steps={list(self.steps)!r})"

    @property
    def resume_at_ms(self) -> int:
        return max((r.resume_at_ms for r in self.deferred.values()), default=0)


class HandBack(RunnerError):
    """Why a run stopped without ending: the process gives it back to the queue."""


class _State:
    """One walk's state."""

    __slots__ = ("ctx", "deferred", "failure", "plan", "reporter", "results", "scope", "stop")

    def __init__(
        self,
        plan: Plan,
        ctx: RunContext,
        reporter: Reporter,
        results: dict[str, StepResult],
        scope: dict[str, Any],
    ) -> None:
        self.plan = plan
        self.ctx = ctx
        self.reporter = reporter
        self.results = results
        self.scope = scope
        self.stop: RunnerError | None = None
        self.failure: RunnerError | None = None
        self.deferred: dict[str, StepResult] = {}

    @property
    def handing_back(self) -> bool:
        return bool(self.deferred) or isinstance(self.stop, HandBack)


class Engine:
    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        *,
        step_parallelism: int = 8,
        page_limits: PageLimits | None = None,
        flow: FlowControl | None = None,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.step_parallelism = max(1, step_parallelism)
        self.page_limits = page_limits or PageLimits()
        self.flow = flow

    async def run(self, plan: Plan, ctx: RunContext, reporter: Reporter) -> RunOutcome:
        results = dict(ctx.restored)
        steps_scope: dict[str, Any] = {}
        for key, res in results.items():
            steps_scope[key] = _scope_entry(res)
        state = _State(
            plan=plan,
            ctx=ctx,
            reporter=reporter,
            results=results,
            scope={
                "input": ctx.input,
                "steps": steps_scope,
                "env": dict(plan.version.env_config.vars),
                "secrets": ctx.secrets,
                "run": {"id": ctx.run_id, "tenantId": ctx.tenant_id},
            },
        )
        for key, res in results.items():
            sp = plan.by_key.get(key)
            if res.status == "FAILED" and sp is not None and sp.step.on_failure == "FAIL_RUN":
                # The run had already failed before this delivery: it stays failed.
                state.failure = res.error or RunnerError(f"step '{key}' failed")
                break
        await reporter.run_started(ctx.started_ms)
        walk = asyncio.ensure_future(self._walk(state))
        cancel = ctx.cancel() if ctx.cancel else None
        hand_back = ctx.hand_back() if ctx.hand_back else None
        waiters: set[asyncio.Future[Any]] = {walk}
        if cancel is not None:
            waiters.add(cancel)
        if hand_back is not None:
            waiters.add(hand_back)
        timeout_s = max(0.0, (ctx.deadline_ms - self.clock.now_ms()) / 1000)
        interrupted: BaseException | None = None
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when="FIRST_COMPLETED")
        except BaseException as err:  # this task was cancelled: the walk goes with it
            interrupted, done = err, set()
        failure = walk.exception() if walk in done else None
        if walk not in done:
            if interrupted is None:
                state.stop = _why_stopped(done, cancel, hand_back)
            if not walk.done():
                walk.cancel()
                await _settled(walk)
        for future in (cancel, hand_back):
            if future is not None and not future.done():
                future.cancel()
        if interrupted is not None or failure is not None:
            try:
                raise interrupted or failure  # type: ignore[misc]
            finally:
                interrupted = failure = None  # a frame holding its own error: a cycle
        status: RunStatus
        error: RunnerError | None
        if state.handing_back:
            return RunOutcome("DEFERRED", None, state.results, state.deferred)
        if isinstance(state.stop, Canceled):
            status, error = "CANCELED", state.stop
        elif state.stop is not None:
            status, error = "FAILED", state.stop
        elif state.failure is not None:
            status, error = "FAILED", state.failure
        else:
            status, error = "SUCCESS", None
        await reporter.run_done(status, error, state.results)
        return RunOutcome(status, error, state.results)

    async def _walk(self, state: _State) -> None:
        pending = [sp for sp in state.plan.steps if sp.key not in state.results]
        running: dict[asyncio.Task[StepResult], StepPlan] = {}
        stopped: BaseException | None = None
        try:
            await self._walk_steps(state, pending, running)
        except BaseException as err:
            stopped = err
        # Reached on success, on a FAIL_RUN failure, and when the run is cancelled or times out
        # (the CancelledError passes on after the bookkeeping).
        if running:
            await self._cancel_running(state, running)
        for sp in pending:
            if sp.key not in state.results and not state.handing_back:
                res = StepResult(sp.key, "CANCELED")
                state.results[sp.key] = res
                await state.reporter.step_done(res, 0)
        if stopped is not None:
            try:
                raise stopped
            finally:
                stopped = None  # a frame holding its own error would be a reference cycle

    async def _walk_steps(
        self,
        state: _State,
        pending: list[StepPlan],
        running: dict[asyncio.Task[StepResult], StepPlan],
    ) -> None:
        while pending or running:
            ready: list[StepPlan] = []
            if state.failure is None and not state.deferred:
                ready = [sp for sp in pending if all(dep in state.results for dep in sp.depends_on)]
            if len(ready) == 1 and not running:
                # One step and nothing beside it, as every step of a linear run: it runs
                # in this task, without a task of its own to start and wait for.
                sp = ready[0]
                pending.remove(sp)
                self._settle(state, sp, await self._step(state, sp))
                walk = asyncio.current_task()
                if state.stop is not None or (walk is not None and walk.cancelling()):
                    # The walk was cancelled while the step ran; the step ended on it.
                    raise asyncio.CancelledError
                continue
            for sp in ready:
                if len(running) >= self.step_parallelism:
                    break
                pending.remove(sp)
                running[asyncio.ensure_future(self._step(state, sp))] = sp
            if not running:
                break
            done, _ = await asyncio.wait(running, return_when="FIRST_COMPLETED")
            for task in done:
                sp = running.pop(task)
                if self._settle(state, sp, task.result()):
                    await self._cancel_running(state, running)

    async def _cancel_running(
        self, state: _State, running: dict[asyncio.Task[StepResult], StepPlan]
    ) -> None:
        for task in running:
            task.cancel()
        outcomes = await asyncio.gather(*running, return_exceptions=True)
        for sp, res in zip(list(running.values()), outcomes, strict=True):
            if isinstance(res, StepResult):
                if res.status == "DEFERRED":
                    state.deferred[sp.key] = res
                else:
                    self._finish(state, sp, res)
        running.clear()

    def _settle(self, state: _State, sp: StepPlan, res: StepResult) -> bool:
        """Record a step's result; True when it fails the run (``FAIL_RUN``)."""
        if res.status == "DEFERRED":
            state.deferred[sp.key] = res
            return False
        self._finish(state, sp, res)
        if res.status == "FAILED" and sp.step.on_failure == "FAIL_RUN" and state.failure is None:
            state.failure = res.error
            return True
        return False

    def _finish(self, state: _State, sp: StepPlan, res: StepResult) -> None:
        state.results[sp.key] = res
        state.scope["steps"][sp.key] = _scope_entry(res)

    async def _step(self, state: _State, sp: StepPlan) -> StepResult:
        with state.ctx.trace.step(sp.key) as span:
            res = await self._step_in_span(state, sp, span)
            if res.status != "DEFERRED":
                code = str(res.error.code) if res.error is not None else None
                span.end(res.status, res.attempts, res.duration_ms, code)
            return res

    async def _step_in_span(self, state: _State, sp: StepPlan, span: StepSpan) -> StepResult:
        ctx, reporter = state.ctx, state.reporter
        res = StepResult(sp.key, "FAILED", started_ms=self.clock.now_ms())
        failed_unsent = False
        try:
            if not should_run(sp, state.scope, self.clock.now_ms):
                res.status = "SKIPPED"
                res.started_ms = None
                await reporter.step_done(res, 0)
                return res
            if sp.for_each is not None:
                res.output = await run_items(
                    sp,
                    ctx,
                    state.scope,
                    state.plan.schemas,
                    transport=self.transport,
                    reporter=reporter,
                    clock=self.clock,
                    span=span,
                    result=res,
                    flow=self.flow,
                )
                res.status = "SUCCESS"
                return await self._ended(reporter, res)
            request = prepare_request(sp, ctx, state.scope, state.plan.schemas, self.clock.now_ms)
            if sp.paginate is not None:
                res.output = await run_pages(
                    sp,
                    ctx,
                    request,
                    transport=self.transport,
                    reporter=reporter,
                    clock=self.clock,
                    result=res,
                    limits=self.page_limits,
                    schemas=state.plan.schemas,
                    span=span,
                    first_attempt=ctx.resume_attempts.get(sp.key, 1),
                    restored=ctx.restored_pages.get(sp.key),
                    flow=self.flow,
                )
            else:
                res.output = await run_attempts(
                    sp,
                    ctx,
                    request,
                    transport=self.transport,
                    reporter=reporter,
                    clock=self.clock,
                    result=res,
                    schemas=state.plan.schemas,
                    span=span,
                    first_attempt=ctx.resume_attempts.get(sp.key, 1),
                    flow=self.flow,
                )
            res.status = "SUCCESS"
        except Deferral as deferral:
            res.status = "DEFERRED"
            res.next_attempt, res.resume_at_ms = deferral.next_attempt, deferral.resume_at_ms
            return res
        except ItemFailed as failed:
            res.status, res.error = "FAILED", failed.error
        except RunnerError as caught:
            err = caught.as_record()
            if not err.message.startswith(("$", f"{sp.key}:")):
                # Say which step, so a failedReason or a run event reads on its own.
                err.message = f"{sp.key}: {err.message}"
            res.status, res.error = "FAILED", err
            failed_unsent = res.attempts == 0
        except asyncio.CancelledError:
            stop = state.stop
            if isinstance(stop, HandBack):
                # Interrupted in flight: the same attempt is sent again on the next delivery,
                # with the same idempotency key.
                res.status, res.next_attempt = "DEFERRED", max(res.attempts, 1)
                res.resume_at_ms = self.clock.now_ms()
                return res
            if isinstance(stop, WorkflowTimeout):
                res.status, res.error = "FAILED", stop
            else:
                res.status, res.error = "CANCELED", stop if isinstance(stop, Canceled) else None
        if failed_unsent:
            # Failed before any request (template, definition): still one RUNNING event, so
            # that every started step has one before its terminal state.
            res.attempts = 1
            await reporter.step_running(sp.key, 1, res.started_ms or self.clock.now_ms())
            res.attempts = 0
        return await self._ended(reporter, res)

    async def _ended(self, reporter: Reporter, res: StepResult) -> StepResult:
        res.finished_ms = self.clock.now_ms()
        attempt = max(res.attempts, 1) if res.started_ms else 0
        if res.items is not None:
            attempt = 1  # a map's events are the step's one RUNNING and its end
        await reporter.step_done(res, attempt)
        return res


def _why_stopped(
    done: set[asyncio.Future[Any]],
    cancel: asyncio.Future[str] | None,
    hand_back: asyncio.Future[str] | None,
) -> RunnerError:
    """Why the walk is stopped before it ended: a cancel, a hand-back, or the deadline."""
    if cancel is not None and cancel in done:
        return Canceled(cancel.result() or "canceled")
    if hand_back is not None and hand_back in done:
        return HandBack(hand_back.result() or "handed back")
    return WorkflowTimeout("the run passed its deadline")


async def _settled(task: asyncio.Future[Any]) -> None:
    """Wait for a task that was cancelled to end, its ``CancelledError`` swallowed."""
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _scope_entry(res: StepResult) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": res.status}
    if res.status == "SUCCESS":
        entry["output"] = res.output
    return entry
