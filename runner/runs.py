"""One job, one run: the boundary where a BullMQ job becomes a workflow run and back.

``RunService.handle`` decodes the job once, loads the plan and the run's checkpoint, resolves
credentials, hands the run to the engine, and sorts the outcome into what BullMQ keeps:

- SUCCESS: the returnvalue, a small summary (CONTRACT §6);
- FAILED or CANCELED by the run's own logic: ``UnrecoverableError("<code>: <message>")``, so
  BullMQ does not run it again;
- an infrastructure failure (the control plane or Redis unreachable) or an internal error with
  job attempts left: a plain exception, so BullMQ retries the job; the checkpoint makes the
  retry resume, and no terminal event is written;
- the same on the job's last attempt: the run is reported FAILED with that code and the job
  fails with ``UnrecoverableError("<code>: <message>")``.

Every ending is reported, by construction: the run's terminal event is held by its reporter
(``hold_end``) and written in one place, ``_ended``, once the boundary knows how the job ends
in BullMQ. Whatever layer failed (plan, credentials, engine, reporting, the bookkeeping after
the run), a job that ends failed has a terminal event on the status stream; a job that is
retried or handed back has none. Bad job data fails at once with ``INVALID_PAYLOAD`` and the
JSON path: it names no run, so nothing was reported RUNNING and nothing is reported. Every
message that leaves passes through the run's redactor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec
from bullmq.custom_errors import DelayedError, UnrecoverableError

from runner.contract import JOB_DATA_NOT_TEXT, JOB_NAME, Connection, JobData, decode_job_data
from runner.credentials import CredentialSource, connections_for_run, secrets_for_run
from runner.definitions import DefinitionStore
from runner.engine.plan import Plan
from runner.engine.ports import Clock, RunContext, StepResult
from runner.engine.run import Engine, RunOutcome
from runner.engine.schemas import check_input
from runner.errors import ErrorCode, PayloadError, RetryLater, RunnerError
from runner.http.auth import secret_values, sensitive_names
from runner.log import log
from runner.queue.cancel import CancelWatch
from runner.redact import LayeredRedactor, Redactor, SecretRegistry
from runner.reporting.checkpoint import Checkpoint, parse_checkpoint
from runner.reporting.execlog import ExecutionLog
from runner.reporting.reporter import RunReporter, StatusSink
from runner.reporting.stream import Transition
from runner.telemetry import NOOP, RunSpan, Telemetry

_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class RunService:
    definitions: DefinitionStore
    credentials: CredentialSource
    engine: Engine
    sink: StatusSink
    execlog: ExecutionLog
    clock: Clock
    cancels: CancelWatch
    worker_id: str
    max_job_bytes: int
    long_wait_ms: int = 30_000
    max_foreach_items: int = 10_000
    process_secrets: tuple[str, ...] = ()
    telemetry: Telemetry = NOOP
    # The process's registry of secrets in flight (one per process, from the composition root).
    secrets: SecretRegistry = field(default_factory=SecretRegistry)
    _hand_backs: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    _no_secrets: Redactor | None = None

    def _base_redactor(self) -> Redactor:
        """The redactor of a run without secrets of its own: only the process's, so it is built
        once (compiling one costs more than a run's status writes)."""
        if self._no_secrets is None:
            self._no_secrets = Redactor(self.process_secrets)
        return self._no_secrets

    def hand_back_all(self, reason: str) -> int:
        """Ask every run in flight to stop and go back to the queue (shutdown past its grace)."""
        count = 0
        for future in self._hand_backs.values():
            if not future.done():
                future.set_result(reason)
                count += 1
        return count

    async def handle(self, job: Any, token: str) -> dict[str, Any]:
        data = self.decode(job)
        run_id = run_identity(job, data)
        run = _Delivery(self._base_redactor())
        own_end: Exception | None = None
        result: dict[str, Any] = {}
        try:
            result = await self._deliver(job, token, data, run_id, run)
        except (DelayedError, asyncio.CancelledError):
            # A hand-back (the run continues on a later delivery), or this task cancelled (a
            # forced shutdown: the job is left for the stalled check): no ending.
            raise
        except UnrecoverableError as ended:  # the run ended FAILED or CANCELED (_settle)
            own_end = ended
        except Exception as err:  # an error from any layer
            raise await self._ended(job, data, run_id, run, err) from None
        try:
            if run.reporter is not None:
                await run.reporter.write_end()
        except Exception as err:
            raise await self._ended(job, data, run_id, run, err) from None
        if own_end is not None:
            try:
                raise own_end
            finally:
                own_end = None  # this frame holding its own error would be a reference cycle
        return result

    async def _deliver(
        self, job: Any, token: str, data: JobData, run_id: str, run: _Delivery
    ) -> dict[str, Any]:
        opts = job.opts or {}
        started_ms = self.clock.now_ms()
        with self.telemetry.run_span(
            carrier_json=opts.get("tm"),
            run_id=run_id,
            tenant_id=data.tenant_id,
            version_id=data.workflow_version_id,
            job_id=str(job.id),
            queue_wait_ms=self.clock.now_ms() - int(job.timestamp or 0),
        ) as span:
            outcome = await self._run(job, data, run_id, span, run)
            if outcome.status != "DEFERRED":
                span.end(outcome.status, str(outcome.error.code) if outcome.error else None)
                _log_run_end(job, data, outcome, self.clock.now_ms() - started_ms)
        if outcome.status == "DEFERRED":
            await self._defer(job, token, run_id, outcome)
        return self._settle(run_id, outcome, run.redactor)

    async def _ended(
        self, job: Any, data: JobData, run_id: str, run: _Delivery, err: Exception
    ) -> Exception:
        """The one place a failed delivery is sorted: what to raise to BullMQ for ``err``, from
        any layer. With job attempts left and an error worth retrying (infrastructure, or
        internal), nothing is reported: the next delivery ends the run. Otherwise the run's
        terminal event is FAILED with the code the job fails with, written here unless an
        ending was written already. Never raises itself."""
        record = _as_runner_error(err)
        if not isinstance(err, RunnerError):
            log.internal_error("job.internal_error", err, jobId=job.id, runId=run_id)
        text = run.redactor.text(str(record))
        # An internal error is retried as an infrastructure failure is (a worker bug or a
        # Redis blip may not repeat); a run's own errors are not.
        if (record.retryable or record.code == ErrorCode.INTERNAL) and _attempts_left(job):
            if run.reporter is not None:
                run.reporter.drop_end()
            log.warning("run.retry_later", runId=run_id, error=text)
            return RetryLater(text)
        try:
            reporter = run.reporter or await self._late_reporter(job, data, run_id, run)
            if not reporter.ended:
                # Whatever the run's own end said, the job fails with ``record``: so does the run.
                reporter.drop_end()
                if reporter.started_ms is None:
                    await reporter.run_started(self.clock.now_ms())
                await reporter.run_done("FAILED", record, {})
                await reporter.write_end()
        except Exception as report_err:
            log.error(
                "run.unreported",
                runId=run_id,
                jobId=job.id,
                errorCode=str(record.code),
                error=type(report_err).__name__,
            )
        return _unrecoverable(text)

    async def _late_reporter(
        self, job: Any, data: JobData, run_id: str, run: _Delivery
    ) -> RunReporter:
        """A reporter for a run that failed before its own was built (the checkpoint read)."""
        raw_checkpoint, _ = await self.sink.run_state(run_id)
        run.reporter = self._reporter(
            job, data, run_id, run.redactor, parse_checkpoint(raw_checkpoint), total_steps=0
        )
        return run.reporter

    async def _run(
        self, job: Any, data: JobData, run_id: str, span: RunSpan, run: _Delivery
    ) -> RunOutcome:
        """Load, resolve and run. A failure before the first step (definition, credentials,
        input) is raised, and the job boundary sorts it (``_ended``)."""
        raw_checkpoint, cancel_reason = await self.sink.run_state(run_id)
        checkpoint = parse_checkpoint(raw_checkpoint)
        reporter = self._reporter(job, data, run_id, run.redactor, checkpoint, total_steps=0)
        run.reporter = reporter
        handle = None
        try:
            plan = await self.definitions.plan_for(data)
            reporter.total_steps = len(plan.steps)
            check_input(plan.schemas, data.input)
            creds = await self.credentials.resolve(data, plan)
            connections = connections_for_run(plan, creds)
            secrets = secrets_for_run(plan, creds)
            values, names = _secret_material(connections.values(), creds.secrets.values())
            handle = self.secrets.register(values, names, extra=self.process_secrets)
            run.redactor = redactor = self.secrets.run_redactor(handle)
            # OAuth2 refreshes mint secrets mid-run; they are known to the registry only.
            oauth2 = any(c.type == "OAUTH2" for c in connections.values())
            reporter.redact = LayeredRedactor(redactor, self.secrets) if oauth2 else redactor
            ctx = self._context(job, data, run_id, plan, checkpoint, connections, secrets)
            ctx.trace = span
            if cancel_reason is not None:
                return await self._canceled_before_start(plan, reporter, ctx, cancel_reason)
            return await self._run_engine(plan, ctx, reporter)
        finally:
            if handle is not None:
                self.secrets.unregister(handle)

    async def _run_engine(self, plan: Plan, ctx: RunContext, reporter: RunReporter) -> RunOutcome:
        hand_back: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._hand_backs[ctx.run_id] = hand_back
        try:
            with self.cancels.watch(ctx.run_id, ctx.job_id) as cancel:
                ctx.cancel = cancel
                ctx.hand_back = lambda: hand_back
                outcome = await self.engine.run(plan, ctx, reporter)
                await reporter.flush()  # a run handed back before its first step reported
                return outcome
        finally:
            self._hand_backs.pop(ctx.run_id, None)

    async def _defer(self, job: Any, token: str, run_id: str, outcome: RunOutcome) -> None:
        """Checkpoint where each deferred step continues, then give the job back to BullMQ as
        delayed (not failed, not completed): it comes due at the earliest time a deferred step
        may run, and a later delivery resumes there.

        Raises ``DelayedError`` and nothing else, so that BullMQ does nothing more with the
        job: either it moved to delayed under this delivery's lock, or (the lock is gone, Redis
        failed) it is left to the stalled check, which delivers it again once its lock expires.
        The ``run.handed_back`` line says which (``to``)."""
        steps = sorted(outcome.deferred)
        try:
            resume = {f"resume:{k}": b"%d" % r.next_attempt for k, r in outcome.deferred.items()}
            if resume:
                await self.sink.write(Transition(run_id, str(job.id), checkpoint=resume))
            resume_at = max(outcome.resume_at_ms, self.clock.now_ms())
            await job.moveToDelayed(resume_at, token)
        except Exception as err:
            log.warning(
                "run.handed_back",
                runId=run_id,
                jobId=str(job.id),
                to="stalled-check",
                reason=f"{type(err).__name__}: {str(err)[:200]}",
                steps=steps,
            )
        else:
            log.info(
                "run.handed_back",
                runId=run_id,
                jobId=str(job.id),
                to="delayed",
                resumeInMs=resume_at - self.clock.now_ms(),
                steps=steps,
            )
        raise DelayedError()

    def decode(self, job: Any) -> JobData:
        try:
            if job.name != JOB_NAME:
                raise PayloadError(f"$: job name '{job.name}' is not '{JOB_NAME}'")
            # JSON text as Redis holds it (FetchNextWorker), or what bullmq parsed (a job
            # scheduler's iteration): measured and decoded as UTF-8 JSON either way.
            data = job.data
            try:
                raw = data.encode("utf-8") if isinstance(data, str) else _encode(data)
            except (UnicodeEncodeError, TypeError):
                raise PayloadError(JOB_DATA_NOT_TEXT) from None
            if len(raw) > self.max_job_bytes:
                raise PayloadError(
                    f"$: job data is {len(raw)} bytes, over the {self.max_job_bytes}-byte limit"
                )
            return decode_job_data(raw)
        except PayloadError as err:
            log.warning("job.invalid", jobId=job.id, error=str(err))
            raise UnrecoverableError(str(err)) from None

    def _reporter(
        self,
        job: Any,
        data: JobData,
        run_id: str,
        redactor: Redactor,
        checkpoint: Checkpoint,
        total_steps: int,
    ) -> RunReporter:
        return RunReporter(
            run_id=run_id,
            tenant_id=data.tenant_id,
            version_id=data.workflow_version_id,
            job_id=str(job.id),
            worker_id=self.worker_id,
            total_steps=total_steps,
            sink=self.sink,
            keep_logs=int((job.opts or {}).get("keepLogs") or 0),
            execlog=self.execlog,
            redact=redactor,
            now_ms=self.clock.now_ms,
            last_seq=checkpoint.last_seq,
            completed_steps=len(checkpoint.steps),
            hold_end=True,
        )

    def _context(
        self,
        job: Any,
        data: JobData,
        run_id: str,
        plan: Plan,
        checkpoint: Checkpoint,
        connections: dict[str, Connection],
        secrets: dict[str, str],
    ) -> RunContext:
        started = checkpoint.started_ms or self.clock.now_ms()
        restored = {k: v for k, v in checkpoint.steps.items() if k in plan.by_key}
        deadline = (
            data.deadline_at if data.deadline_at is not None else started + plan.version.timeout_ms
        )
        return RunContext(
            job_id=str(job.id),
            run_id=run_id,
            tenant_id=data.tenant_id,
            version_id=data.workflow_version_id,
            input=data.input,
            started_ms=started,
            deadline_ms=deadline,
            connections=connections,
            secrets=secrets,
            restored=restored,
            resume_attempts=checkpoint.resume_attempts,
            restored_items=checkpoint.items,
            restored_pages={
                k: v for k, v in checkpoint.pages.items() if k in plan.by_key and k not in restored
            },
            long_wait_ms=self.long_wait_ms,
            max_foreach_items=self.max_foreach_items,
        )

    async def _canceled_before_start(
        self, plan: Plan, reporter: RunReporter, ctx: RunContext, reason: str
    ) -> RunOutcome:
        from runner.errors import Canceled

        await reporter.run_started(ctx.started_ms)
        steps = dict(ctx.restored)
        for sp in plan.steps:
            if sp.key not in steps:
                steps[sp.key] = StepResult(sp.key, "CANCELED")
                await reporter.step_done(steps[sp.key], 0)
        error = Canceled(reason)
        await reporter.run_done("CANCELED", error, steps)
        return RunOutcome("CANCELED", error, steps)

    def _settle(self, run_id: str, outcome: RunOutcome, redactor: Redactor) -> dict[str, Any]:
        if outcome.status != "SUCCESS":
            error = outcome.error
            text = str(error) if error is not None else f"{outcome.status}: the run did not succeed"
            raise UnrecoverableError(redactor.text(text))
        finished = self.clock.now_ms()
        started = min(
            (s.started_ms for s in outcome.steps.values() if s.started_ms), default=finished
        )
        return {
            "workflowRunId": run_id,
            "status": outcome.status,
            "durationMs": finished - started,
            "steps": {
                key: {"status": s.status, "attempts": s.attempts, "durationMs": s.duration_ms}
                for key, s in outcome.steps.items()
            },
        }


@dataclass(slots=True)
class _Delivery:
    """What one delivery's boundary needs to report its ending: the run's redactor and its
    reporter, once each is built."""

    redactor: Redactor
    reporter: RunReporter | None = None


def _unrecoverable(reason: str) -> Exception:
    error: Exception = UnrecoverableError(reason)
    return error


def _as_runner_error(err: BaseException) -> RunnerError:
    """``err`` as a reportable error: a ``RunnerError`` as it is, anything else ``INTERNAL``
    naming only its type (its message may hold anything, a secret included)."""
    if isinstance(err, RunnerError):
        return err.as_record()
    return RunnerError(f"{type(err).__name__}", code=ErrorCode.INTERNAL)


def run_identity(job: Any, data: JobData) -> str:
    """The run a job is (CONTRACT "Run identity"). A job the control plane added is the run its
    data names, whatever its job id; a job BullMQ made (a job scheduler's or a legacy
    repeatable job's iteration, ``repeat:...`` with a ``repeatJobKey``) repeats the data of
    its template, so each iteration is a run of its own, ``{workflowRunId}:{jobId}``. The job
    id stays the same across the job's retries, so a retry resumes the same run."""
    job_id = str(job.id)
    if job_id == data.workflow_run_id:
        return job_id
    if job_id.startswith("repeat:") or getattr(job, "repeatJobKey", None):
        return f"{data.workflow_run_id}:{job_id}"
    return data.workflow_run_id


def _secret_material(connections: Any, secret_values_: Any) -> tuple[list[str], list[str]]:
    values: list[str] = [v for v in secret_values_ if isinstance(v, str)]
    names: list[str] = []
    for conn in connections:
        values.extend(secret_values(conn))
        names.extend(sensitive_names(conn))
    return values, names


def _log_run_end(job: Any, data: JobData, outcome: RunOutcome, duration_ms: int) -> None:
    """The one info line per run end: what an operator greps for first."""
    log.info(
        "run.finished",
        runId=data.workflow_run_id,
        tenantId=data.tenant_id,
        jobId=str(job.id),
        status=outcome.status,
        errorCode=str(outcome.error.code) if outcome.error is not None else None,
        durationMs=duration_ms,
        steps=len(outcome.steps),
        attempts=sum(s.attempts for s in outcome.steps.values()),
        jobAttempt=int(job.attemptsMade or 0) + 1,
    )


def _attempts_left(job: Any) -> bool:
    return int(job.attemptsMade) + 1 < int((job.opts or {}).get("attempts", 1) or 1)


__all__ = ["RunService", "run_identity"]
