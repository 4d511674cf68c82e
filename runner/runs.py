"""One job, one run: the boundary where a BullMQ job becomes a workflow run and back.

``RunService.handle`` decodes the job once, loads the plan and the run's checkpoint, resolves
credentials, hands the run to the engine, and sorts the outcome into what BullMQ keeps:

- SUCCESS: the returnvalue, a small summary (CONTRACT §6);
- FAILED or CANCELED by the run's own logic: ``UnrecoverableError("<code>: <message>")``, so
  BullMQ does not run it again;
- an infrastructure failure (the control plane or Redis unreachable) with job attempts left: a
  plain exception, so BullMQ retries the job; the checkpoint makes the retry resume.

Bad job data fails at once with ``INVALID_PAYLOAD`` and the JSON path. Every message that
leaves passes through the run's redactor.
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
from runner.errors import PayloadError, RetryLater, RunnerError
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
            outcome, redactor = await self._run(job, data, run_id, span)
            if outcome.status != "DEFERRED":
                span.end(outcome.status, str(outcome.error.code) if outcome.error else None)
                _log_run_end(job, data, outcome, self.clock.now_ms() - started_ms)
        if outcome.status == "DEFERRED":
            await self._defer(job, token, run_id, outcome)
        return self._settle(run_id, outcome, redactor)

    async def _run(
        self, job: Any, data: JobData, run_id: str, span: RunSpan
    ) -> tuple[RunOutcome, Redactor]:
        """Load, resolve and run. A failure before the first step (definition, credentials,
        input) is reported and returned as a FAILED outcome, unless it is an infrastructure
        failure with job attempts left: then BullMQ retries the job."""
        raw_checkpoint, cancel_reason = await self.sink.run_state(run_id)
        checkpoint = parse_checkpoint(raw_checkpoint)
        redactor = self._base_redactor()
        reporter = self._reporter(job, data, run_id, redactor, checkpoint, total_steps=0)
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
            redactor = self.secrets.run_redactor(handle)
            # OAuth2 refreshes mint secrets mid-run; they are known to the registry only.
            oauth2 = any(c.type == "OAUTH2" for c in connections.values())
            reporter.redact = LayeredRedactor(redactor, self.secrets) if oauth2 else redactor
            ctx = self._context(job, data, run_id, plan, checkpoint, connections, secrets)
            ctx.trace = span
            if cancel_reason is not None:
                return (
                    await self._canceled_before_start(plan, reporter, ctx, cancel_reason),
                    redactor,
                )
            return await self._run_engine(plan, ctx, reporter), redactor
        except RunnerError as caught:
            err = caught.as_record()
            if err.retryable and _attempts_left(job):
                log.warning("run.retry_later", runId=run_id, error=redactor.text(str(err)))
                raise RetryLater(redactor.text(str(err))) from None
            if reporter.seq == checkpoint.last_seq:
                await reporter.run_started(self.clock.now_ms())
            await reporter.run_done("FAILED", err, {})
            return RunOutcome("FAILED", err, {}), redactor
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
        may run, and a later delivery resumes there."""
        resume = {f"resume:{k}": b"%d" % r.next_attempt for k, r in outcome.deferred.items()}
        if resume:
            await self.sink.write(Transition(run_id, str(job.id), checkpoint=resume))
        resume_at = max(outcome.resume_at_ms, self.clock.now_ms())
        await job.moveToDelayed(resume_at, token)
        log.info(
            "run.handed_back",
            runId=run_id,
            resumeInMs=resume_at - self.clock.now_ms(),
            steps=sorted(outcome.deferred),
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
            restored_pages={
                k: v for k, v in checkpoint.pages.items() if k in plan.by_key and k not in restored
            },
            long_wait_ms=self.long_wait_ms,
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
