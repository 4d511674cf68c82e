"""The interface the engine uses (``Telemetry`` → ``RunSpan`` → ``StepSpan`` → ``AttemptSpan``),
and its off state.

Off is free: ``NOOP`` and the spans it hands out are shared singletons whose methods do nothing,
and nothing here imports OpenTelemetry.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol


class AttemptSpan(Protocol):
    def response(self, status_code: int) -> None:
        """The attempt got an HTTP response (any status)."""

    def error(self, error_code: str, retry_delay_ms: int | None) -> None:
        """The attempt failed with ``error_code``; ``retry_delay_ms`` is set when another
        attempt follows after that delay."""

    def flow(self, connection: str, waited_ms: int, reason: str, probe: bool) -> None:
        """The attempt went under flow control: what it waited for, how long, and whether it
        is a circuit breaker's probe."""

    def headers(self) -> dict[str, str]:
        """The W3C trace context headers (``traceparent``, ``tracestate``) naming this attempt,
        to send with its request; empty when tracing is off."""


class StepSpan(Protocol):
    def attempt(
        self, method: str, url_redacted: str, attempt_no: int
    ) -> AbstractContextManager[AttemptSpan]:
        """One HTTP attempt (``attempt_no`` from 1); ``url_redacted`` must already be redacted."""

    def end(self, status: str, attempts: int, duration_ms: int, error_code: str | None) -> None:
        """The step's terminal state; records ``workflow.step.duration``."""


class RunSpan(Protocol):
    def step(self, key: str) -> AbstractContextManager[StepSpan]:
        """A step of this run; safe to enter from any asyncio task."""

    def end(self, status: str, error_code: str | None) -> None:
        """The run's terminal state; records ``workflow.runs``."""


class Telemetry(Protocol):
    @property
    def enabled(self) -> bool: ...

    @property
    def tracing(self) -> bool:
        """Spans are recorded and exported (not only metrics)."""

    def job_finished(self, state: str, job_name: str, duration_ms: int) -> None:
        """A delivery of a job ended as ``state`` (BullMQ's: completed, failed, delayed,
        retried); records ``bullmq.jobs.<state>`` and ``bullmq.job.duration``."""

    def bind_gauges(self, queue_counts: Any, active: Any, free_slots: Any) -> None:
        """What the gauges read: a mapping state → count kept fresh by the caller, and two
        callables for the runs in flight and the free slots."""

    def bind_flow(self, stats: Any) -> None:
        """What the flow control instruments read: a ``runner.flow.stats.FlowStats``."""

    def prometheus_text(self) -> tuple[bytes, str] | None:
        """The Prometheus exposition of every instrument and its content type; ``None`` when
        the Prometheus reader is not installed."""

    def run_span(
        self,
        *,
        carrier_json: str | None,
        run_id: str,
        tenant_id: str,
        version_id: str,
        job_id: str,
        queue_wait_ms: int | None,
    ) -> AbstractContextManager[RunSpan]:
        """A run, continuing the trace in ``carrier_json`` (the job's opts ``tm``) if any."""

    def shutdown(self) -> None:
        """Flush and stop exporting. Blocking (network I/O): call it off the event loop."""


# --- off: shared singletons that do nothing ---------------------------------------------------


class _NoopSpan:
    """Run, step and attempt at once: every hook returns this one object or ``None``."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def step(self, key: str) -> _NoopSpan:
        return self

    def attempt(self, method: str, url_redacted: str, attempt_no: int) -> _NoopSpan:
        return self

    def response(self, status_code: int) -> None:
        return None

    def error(self, error_code: str, retry_delay_ms: int | None) -> None:
        return None

    def flow(self, connection: str, waited_ms: int, reason: str, probe: bool) -> None:
        return None

    def end(self, status: str, *args: Any) -> None:
        return None

    def headers(self) -> dict[str, str]:
        return {}


_NOOP_SPAN = _NoopSpan()
# The no-op run span, for code that runs without telemetry (tests, the engine's default).
NOOP_SPAN: RunSpan = _NOOP_SPAN
NOOP_STEP_SPAN: StepSpan = _NOOP_SPAN


class _NoopTelemetry:
    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    @property
    def tracing(self) -> bool:
        return False

    def job_finished(self, state: str, job_name: str, duration_ms: int) -> None:
        return None

    def bind_gauges(self, queue_counts: Any, active: Any, free_slots: Any) -> None:
        return None

    def bind_flow(self, stats: Any) -> None:
        return None

    def prometheus_text(self) -> tuple[bytes, str] | None:
        return None

    def run_span(
        self,
        *,
        carrier_json: str | None,
        run_id: str,
        tenant_id: str,
        version_id: str,
        job_id: str,
        queue_wait_ms: int | None,
    ) -> _NoopSpan:
        return _NOOP_SPAN

    def shutdown(self) -> None:
        return None


NOOP: Telemetry = _NoopTelemetry()
