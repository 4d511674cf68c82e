"""A run's status, told everywhere it is watched (CONTRACT §6-7).

``RunReporter`` is the engine's ``Reporter``. For each transition it builds one ``Transition``
and awaits it: the status event with the run's checkpoint fields (the event's ``seq``, and for
a finished step its result), BullMQ job progress (when a step or the run ends) and its
``job.log`` lines; ``runner.reporting.stream`` writes it in one transaction, batched with other
runs'. Execution-log lines go to their own
buffered sink (MongoDB, stdout, or the in-memory twin).

Everything passes through the run's redactor before it leaves the process. ``seq`` rises
strictly within a run: the counter starts above the checkpoint's last published value.

With ``hold_end``, the run's terminal event is built by ``run_done`` but written only by
``write_end``: the job boundary (``runner.runs``) writes the one ending of a delivery once it
knows how the job ends in BullMQ, and ``drop_end`` discards it when the job is retried instead.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from runner.contract import MapStepEvent, RunEvent, StepEvent, StepWaitEvent
from runner.engine.pagination import Progress
from runner.engine.ports import Attempt, ItemCounts, RunStatus, StepResult
from runner.errors import RunnerError
from runner.log import log
from runner.reporting.execlog import ExecutionLog, Level, LogLine
from runner.reporting.execlog.documents import PREVIEW_CHARS
from runner.reporting.stream import RunState, Transition

PREVIEW_LIMIT_BYTES = 16 * 1024
_STATUS = re.compile(rb'^\{"status":(\d+)')

_encode = msgspec.json.Encoder().encode


class StatusSink(Protocol):
    def write(self, *transitions: Transition) -> Awaitable[None]:
        """Write the transitions in order, all of them atomically; retries through short
        outages; raises if it cannot."""
        ...

    async def run_state(self, run_id: str) -> RunState:
        """The run's checkpoint hash and the reason of a cancel requested before it started."""
        ...


class Redact(Protocol):
    def text(self, value: str) -> str: ...
    def value(self, value: Any) -> Any: ...
    def json(self, value: Any) -> bytes: ...
    def json_checked(self, value: Any) -> tuple[bytes, bool]: ...
    def json_around(self, value: Any, clean: bytes) -> bytes: ...
    def scrubbed(self, value: Any) -> Any: ...


def preview(output: Any, limit_bytes: int = PREVIEW_LIMIT_BYTES) -> Any:
    """The output as it may travel in an event: whole when small, else a text preview.
    ``output`` may be the data or its JSON encoding (``bytes``, embedded as it is)."""
    if output is None:
        return None
    raw = output if isinstance(output, bytes) else _encode(output)
    if len(raw) <= limit_bytes:
        return msgspec.Raw(raw) if isinstance(output, bytes) else output
    result: dict[str, Any] = {"preview": "", "sizeBytes": len(raw), "truncated": True}
    status = _STATUS.match(raw)
    if status is not None:
        result["status"] = int(status.group(1))
    # The preview is text inside JSON: quotes, backslashes and control characters grow when
    # escaped, so shrink until the whole preview object fits.
    cut = limit_bytes // 2
    while cut > 0:
        result["preview"] = raw[:cut].decode("utf-8", errors="ignore")
        if len(_encode(result)) <= limit_bytes:
            break
        cut //= 2
    return result


class RunReporter:
    def __init__(
        self,
        *,
        run_id: str,
        tenant_id: str,
        version_id: str,
        job_id: str,
        worker_id: str,
        total_steps: int,
        sink: StatusSink,
        keep_logs: int = 0,
        execlog: ExecutionLog,
        redact: Redact,
        now_ms: Callable[[], int],
        last_seq: int = 0,
        completed_steps: int = 0,
        hold_end: bool = False,
    ) -> None:
        self.run_id = run_id
        self.tenant_id = tenant_id
        self.version_id = version_id
        self.job_id = job_id
        self.worker_id = worker_id
        self.total_steps = total_steps
        self.sink = sink
        self.keep_logs = keep_logs
        self.execlog = execlog
        # Whether the execution log keeps ``info`` lines: the stdout one drops them unless
        # RUNNER_LOG_LEVEL=debug, and then they are not built (8 per W3 run).
        self._info_kept = execlog.wants("info")
        self.redact = redact
        self.now_ms = now_ms
        self.seq = last_seq
        self.completed = completed_steps
        self.started_ms: int | None = None
        # The run's RUNNING transition, written with the first step's (see ``run_started``).
        self._held: Transition | None = None
        self.hold_end = hold_end
        # The terminal transition built by ``run_done`` under ``hold_end`` (with a RUNNING one
        # still held before it), and whether a terminal event has been written.
        self._ending: tuple[Transition, ...] = ()
        self.ended = False

    # -- the engine's Reporter ------------------------------------------------------------

    async def run_started(self, started_ms: int) -> None:
        """The run's RUNNING event waits for the next transition (its first step's RUNNING,
        or its end) and goes in the same transaction: one write fewer per run, and no step
        event is ever written without it."""
        self.started_ms = started_ms
        self._held = self._transition(
            RunEvent(
                seq=self._next(),
                workflow_run_id=self.run_id,
                tenant_id=self.tenant_id,
                workflow_version_id=self.version_id,
                job_id=self.job_id,
                status="RUNNING",
                at=self.now_ms(),
                started_at=started_ms,
            ),
            {"startedAt": str(started_ms).encode()},
            lines=(f"run RUNNING ({self.total_steps} steps)",),
            renew=True,
        )
        self._exec("info", "run started", {"totalSteps": self.total_steps})

    async def step_running(self, key: str, attempt: int, started_ms: int) -> None:
        await self._publish(
            self._step_event(key, "RUNNING", attempt, started_ms=started_ms),
            None,
            lines=(f"{key} RUNNING attempt {attempt}",),
        )

    async def map_running(self, key: str, started_ms: int, counts: ItemCounts) -> None:
        event = self._step_event(key, "RUNNING", 1, started_ms=started_ms, items=counts)
        await self._publish(event, None, lines=(f"{key} RUNNING over {counts.total} items",))

    async def item_done(self, key: str, index: int, result: StepResult, counts: ItemCounts) -> None:
        """The item's checkpoint, and BullMQ progress about every 5% of the items; no event."""
        output_json = None
        if result.status == "SUCCESS":
            output_json = self.redact.json(result.output)
        checkpoint = {f"item:{key}:{index}": self.redact.json(_checkpoint_of(result, output_json))}
        progress = None
        lines: tuple[str, ...] = ()
        step = max(1, counts.total // 20)
        if counts.finished % step == 0 or counts.finished == counts.total:
            progress = {**self._progress(key, "RUNNING"), "items": counts.as_wire()}
        if result.error is not None:
            lines = (self._line(f"{key} item {index} FAILED: {result.error}"),)
        await self._write(
            Transition(
                self.run_id,
                self.job_id,
                checkpoint=checkpoint,
                progress=_encode(progress) if progress is not None else None,
                log_lines=lines,
                keep_logs=self.keep_logs,
            )
        )

    async def step_waiting(
        self, key: str, attempt: int, started_ms: int, reason: str, wait_ms: int, deferred: bool
    ) -> None:
        now = self.now_ms()
        event = self._step_event(
            key,
            "RUNNING",
            attempt,
            started_ms=started_ms,
            at_ms=now,
            kind=StepWaitEvent,
            wait_reason=reason,
            wait_until=now + wait_ms,
            deferred=deferred,
        )
        how = "handed back to the queue" if deferred else "waiting"
        text = f"{key} attempt {attempt} {how} {wait_ms} ms for {_WAIT_WORDS.get(reason, reason)}"
        await self._publish(event, None, lines=(text,))
        self._exec(
            "info",
            "waiting for flow control",
            {"reason": reason, "waitMs": wait_ms, "deferred": deferred},
            step_key=key,
            attempt=attempt,
        )

    async def attempt_done(self, attempt: Attempt) -> None:
        if attempt.possible_duplicate:
            self.warn(
                f"{attempt.step_key}: attempt {attempt.number} of a {attempt.method} without an "
                "idempotency key follows one that may have reached the server: possible duplicate",
                stepKey=attempt.step_key,
            )
        if attempt.error is not None:
            text = f"{attempt.step_key} attempt {attempt.number} failed: {attempt.error}"
            if attempt.decision is not None:
                text += f"; {attempt.decision.message}"
            await self._write(
                Transition(
                    self.run_id,
                    self.job_id,
                    log_lines=(self._line(text),),
                    keep_logs=self.keep_logs,
                )
            )
        level: Level = "info" if attempt.error is None else "warning"
        if level == "info" and not self._info_kept:
            return
        outcome = str(attempt.status) if attempt.status is not None else None
        if attempt.error is not None:
            outcome = f"{attempt.error.code}" + (f" {attempt.status}" if attempt.status else "")
        context: dict[str, Any] = {
            "method": attempt.method,
            "url": attempt.url,
            "status": attempt.status,
            "error": str(attempt.error) if attempt.error else None,
            "durationMs": attempt.duration_ms,
        }
        if attempt.decision is not None:
            context["retry"] = attempt.decision.retry
            context["delayMs"] = attempt.decision.delay_ms
            context["reason"] = attempt.decision.reason
        if attempt.possible_duplicate:
            context["possibleDuplicate"] = True
        self._exec(
            level,
            f"attempt {attempt.number} {outcome} in {attempt.duration_ms} ms",
            context,
            step_key=attempt.step_key,
            attempt=attempt.number,
        )

    async def step_done(self, result: StepResult, attempt: int) -> None:
        # A CANCELED step did not complete: it neither moves the progress nor counts.
        canceled = result.status == "CANCELED"
        if not canceled:
            self.completed += 1
        error = result.error
        # Encoded and redacted once, for the event and the checkpoint; redacted before the
        # preview cuts it, since a secret split by the cut would escape the redactor.
        # Searched for secrets once: when it was clean as it is, the event and the checkpoint
        # that embed it have only the text around it searched (``Redactor.json_around``).
        output_json, clean = None, False
        if result.status == "SUCCESS":
            output_json, clean = self.redact.json_checked(result.output)
        embedded = output_json if clean else None
        event = self._step_event(
            result.key,
            result.status,
            attempt,
            started_ms=result.started_ms,
            finished_ms=result.finished_ms,
            output=preview(output_json) if output_json is not None else None,
            error=error,
            items=result.items,
        )
        fields = _checkpoint_of(result, output_json)
        checkpoint = {
            f"step:{result.key}": self.redact.json(fields)
            if embedded is None
            else self.redact.json_around(fields, embedded)
        }
        text = f"{result.key} {result.status}"
        if result.status in ("SUCCESS", "FAILED"):
            plural = "" if result.attempts == 1 else "s"
            text += f" after {result.attempts} attempt{plural} in {result.duration_ms} ms"
        if error is not None:
            text += f": {error}"
        progress = None if canceled else self._progress(result.key, result.status)
        if progress is not None and result.items is not None:
            progress["items"] = result.items.as_wire()
        forget: tuple[str, ...] = ()
        if result.saved_pages and result.status in ("SUCCESS", "FAILED", "SKIPPED"):
            # The step's result holds what its pages did: their checkpoint is done with.
            forget = (
                f"page:{result.key}",
                *(f"page:{result.key}:{n}" for n in range(1, result.saved_pages + 1)),
            )
        if result.items is not None and result.status in ("SUCCESS", "FAILED", "SKIPPED"):
            # The step's result holds every item's output: their fields are done with.
            forget += tuple(f"item:{result.key}:{i}" for i in range(result.items.total))
        await self._publish(
            event, checkpoint, progress=progress, lines=(text,), embedded=embedded, forget=forget
        )
        level: Level = "error" if result.status == "FAILED" else "info"
        if level == "info" and not self._info_kept:
            return
        self._exec(
            level,
            f"step {result.status}",
            # The output whole: the execution log keeps large payloads as a preview with their
            # size (its sink truncates and redacts them). One too large for any log line is
            # previewed here from its redacted JSON, which exists already: walking megabytes
            # again to normalise, redact and fit them held the event loop for a second.
            {
                "error": str(error) if error else None,
                "durationMs": result.duration_ms,
                "output": _log_output(result.output, output_json)
                if result.status == "SUCCESS"
                else None,
            },
            step_key=result.key,
            attempt=attempt or None,
        )

    async def page_done(
        self, key: str, progress: Progress, items: list[Any], *, save_within: int | None
    ) -> int | None:
        """A page of a paginated step that is not its last: a job-log line, and the page in the
        checkpoint when its items fit ``save_within`` (``page:{key}:{n}``, then ``page:{key}``
        saying where the step stands), written together, without a status event."""
        text = f"{key} page {progress.pages}: {len(items)} items ({progress.items} in all)"
        checkpoint = None
        saved: int | None = None
        if save_within is not None:
            raw = self.redact.json(items)
            if progress.saved_bytes + len(raw) <= save_within:
                saved = progress.saved_bytes + len(raw)
                state = msgspec.structs.replace(progress, saved_bytes=saved)
                checkpoint = {
                    f"page:{key}:{progress.pages}": raw,
                    f"page:{key}": self.redact.json(state),
                }
            else:
                text += (
                    "; not checkpointed (RUNNER_PAGINATE_CHECKPOINT_BYTES): a resume starts over"
                )
                self.warn(
                    f"{key}: the items of {progress.pages} pages are over the checkpoint's"
                    f" {save_within} bytes: a resumed run fetches the pages after page"
                    f" {progress.pages - 1} again",
                    stepKey=key,
                )
        await self._write(
            Transition(
                self.run_id,
                self.job_id,
                checkpoint=checkpoint,
                log_lines=(self._line(text),),
                keep_logs=self.keep_logs,
                # The attempt a hand-back left for a page is that page's: once it is done, a
                # later delivery starts its next page at attempt 1.
                forget=(f"resume:{key}",),
            )
        )
        return saved

    async def run_done(
        self, status: RunStatus, error: RunnerError | None, steps: dict[str, StepResult]
    ) -> None:
        now = self.now_ms()
        progress = None
        if status != "SUCCESS":
            # The last word in Bull Board's progress is the run's, not a canceled step's.
            failed = next((k for k, s in steps.items() if s.status == "FAILED"), None)
            progress = self._progress(failed, status)
        summary = {k: {"status": s.status, "attempts": s.attempts} for k, s in steps.items()}
        event = RunEvent(
            seq=self._next(),
            workflow_run_id=self.run_id,
            tenant_id=self.tenant_id,
            workflow_version_id=self.version_id,
            job_id=self.job_id,
            status=status,  # type: ignore[arg-type]  # never DEFERRED: the engine reports only final states
            at=now,
            started_at=self.started_ms,
            finished_at=now,
            output={"steps": summary},
            error_code=str(error.code) if error else None,
            error_message=error.message if error else None,
        )
        lines = (f"run {status}" + (f": {error}" if error else ""),)
        if self.hold_end:
            ending = self._transition(event, None, progress=progress, lines=lines)
            held, self._held = self._held, None
            self._ending = (held, ending) if held is not None else (ending,)
        else:
            await self._publish(event, None, progress=progress, lines=lines)
            self.ended = True
        self._exec(
            "error" if status == "FAILED" else "info",
            f"run {status}",
            {"error": str(error) if error else None},
        )

    async def write_end(self) -> None:
        """Write the terminal event ``run_done`` built under ``hold_end`` (no-op without one)."""
        ending, self._ending = self._ending, ()
        if ending:
            await self.sink.write(*ending)
            self.ended = True

    def drop_end(self) -> None:
        """Forget a held terminal event (the job is retried, or ends otherwise); a RUNNING
        event held with it is held again."""
        if len(self._ending) == 2:
            self._held = self._ending[0]
        self._ending = ()

    def warn(self, message: str, **context: Any) -> None:
        self._exec("warning", message, context, step_key=context.get("stepKey"))

    # -- plumbing ---------------------------------------------------------------------------

    def _progress(self, step_key: str | None, status: str) -> dict[str, Any]:
        return {
            "progress": round(100 * self.completed / max(self.total_steps, 1)),
            "stepKey": step_key,
            "status": status,
            "completedSteps": self.completed,
            "totalSteps": self.total_steps,
        }

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _step_event(
        self,
        key: str,
        status: Any,
        attempt: int,
        *,
        started_ms: int | None = None,
        finished_ms: int | None = None,
        output: Any = None,
        error: RunnerError | None = None,
        items: ItemCounts | None = None,
        at_ms: int | None = None,
        kind: type[StepEvent] = StepEvent,
        **extra: Any,
    ) -> StepEvent:
        """A step event; a map step's carries its item counts (``MapStepEvent``), a waiting
        step's is a ``StepWaitEvent`` (``kind`` and its fields in ``extra``)."""
        if items is not None:
            kind, extra = MapStepEvent, {**extra, "items": items.as_wire()}
        return kind(
            seq=self._next(),
            workflow_run_id=self.run_id,
            tenant_id=self.tenant_id,
            workflow_version_id=self.version_id,
            job_id=self.job_id,
            step_key=key,
            step_run_id=f"{self.run_id}:{key}",
            status=status,
            attempt=attempt,
            at=at_ms if at_ms is not None else self.now_ms(),
            started_at=started_ms,
            finished_at=finished_ms,
            output=output,
            error_code=str(error.code) if error else None,
            error_message=error.message if error else None,
            **extra,
        )

    def _publish(
        self,
        event: RunEvent | StepEvent,
        checkpoint: dict[str, bytes] | None,
        *,
        progress: dict[str, Any] | None = None,
        lines: tuple[str, ...] = (),
        embedded: bytes | None = None,
        forget: tuple[str, ...] = (),
    ) -> Awaitable[None]:
        """Write one transition. Not a coroutine, nor is ``_write``: the caller awaits the
        sink's write directly, so a run resumes through two frames fewer when its batch is
        written."""
        transition = self._transition(
            event, checkpoint, progress=progress, lines=lines, embedded=embedded
        )
        transition.forget = forget
        return self._write(transition)

    def _transition(
        self,
        event: RunEvent | StepEvent,
        checkpoint: dict[str, bytes] | None,
        *,
        progress: dict[str, Any] | None = None,
        lines: tuple[str, ...] = (),
        renew: bool = False,
        embedded: bytes | None = None,
    ) -> Transition:
        """The event with its checkpoint fields, progress and log lines, redacted;
        ``embedded``: a clean encoding the event holds (``Redact.json_around``)."""
        return Transition(
            self.run_id,
            self.job_id,
            event=self.redact.json(event)
            if embedded is None
            else self.redact.json_around(event, embedded),
            seq=event.seq,
            checkpoint=checkpoint,
            progress=_encode(progress) if progress is not None else None,
            log_lines=tuple(self._line(text, event.at) for text in lines),
            keep_logs=self.keep_logs,
            renew=renew,
        )

    def _write(self, transition: Transition) -> Awaitable[None]:
        held, self._held = self._held, None
        if held is None:
            return self.sink.write(transition)
        return self.sink.write(held, transition)

    async def flush(self) -> None:
        """Write a held transition now (a run that stops before its first step reports)."""
        held, self._held = self._held, None
        if held is not None:
            await self.sink.write(held)

    def _line(self, text: str, now: int | None = None) -> str:
        """A ``job.log`` line, stamped ``now`` (the time of the event it goes with) or with
        the clock's time."""
        if now is None:
            now = self.now_ms()
        return self.redact.text(f"{_clock_time(now // 1000)}.{_MILLIS[now % 1000]}Z {text}")

    def _exec(
        self,
        level: Level,
        message: str,
        context: dict[str, Any],
        *,
        step_key: str | None = None,
        attempt: int | None = None,
    ) -> None:
        if level == "info" and not self._info_kept:
            return
        # Redacted by the run's own redactor, as its status events are: the execution log's own
        # masks the secrets of every run in flight, a search per set of them for each line.
        self.execlog.write(
            LogLine(
                tenant_id=self.tenant_id,
                workflow_run_id=self.run_id,
                job_id=self.job_id,
                worker_id=self.worker_id,
                level=level,
                message=message,
                context=context,
                timestamp_ms=self.now_ms(),
                step_key=step_key,
                step_run_id=f"{self.run_id}:{step_key}" if step_key else None,
                attempt=attempt,
                trace_ids=log.trace_ids(),
            ),
            self.redact.scrubbed,
        )


_WAIT_WORDS = {
    "rate": "the connection's rate limit",
    "tenant-rate": "the tenant's rate limit on the connection",
    "paused": "the API's budget to reset (it said so)",
    "concurrency": "a free slot of the connection's maxConcurrency",
    "tenant-concurrency": "a free slot of the tenant's maxConcurrency",
    "circuit-open": "the circuit breaker of the base URL to cool down",
    "circuit-probing": "the circuit breaker's probe request",
}

_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))


@functools.lru_cache(maxsize=8)
def _clock_time(epoch_s: int) -> str:
    """HH:MM:SS (UTC) of a second: the same few seconds are asked for many times over."""
    return time.strftime("%H:%M:%S", time.gmtime(epoch_s))


LOG_OUTPUT_WHOLE_BYTES = 64 * 1024


def _log_output(output: Any, redacted_json: bytes | None) -> Any:
    if redacted_json is None or len(redacted_json) <= LOG_OUTPUT_WHOLE_BYTES:
        return output
    text = redacted_json[:PREVIEW_CHARS].decode("utf-8", errors="ignore")
    return {"preview": text, "sizeBytes": len(redacted_json), "truncated": True}


def _checkpoint_of(result: StepResult, output_json: bytes | None) -> dict[str, Any]:
    return {
        "status": result.status,
        "attempts": result.attempts,
        "startedAt": result.started_ms,
        "finishedAt": result.finished_ms,
        "output": msgspec.Raw(output_json) if output_json is not None else None,
        "errorCode": str(result.error.code) if result.error else None,
        "errorMessage": result.error.message if result.error else None,
    }
