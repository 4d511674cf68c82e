"""What the engine is handed: a clock, a transport for HTTP, a reporter, and the run's context.

The engine knows nothing of Redis, aiohttp or MongoDB; the composition root (``runner.app``)
plugs real implementations in, tests plug in-memory ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from runner.clock import SystemClock as SystemClock
from runner.contract import Connection
from runner.engine.pagination import Progress, SavedPages
from runner.errors import RunnerError
from runner.http.messages import HttpRequest, HttpResponse
from runner.retry import RetryDecision
from runner.telemetry import NOOP_SPAN, RunSpan

# DEFERRED is internal: the step (or run) stopped to continue on a later delivery of its job
# (a long wait handed back to BullMQ, or a shutdown); it is never reported as a final state.
StepStatus = Literal["SUCCESS", "FAILED", "SKIPPED", "CANCELED", "DEFERRED"]
RunStatus = Literal["SUCCESS", "FAILED", "CANCELED", "DEFERRED"]


class Deferral(Exception):
    """A step's next attempt is too far away to hold the job's slot: hand the job back to
    BullMQ as delayed and continue at ``next_attempt`` once ``resume_at_ms`` comes."""

    def __init__(self, resume_at_ms: int, next_attempt: int) -> None:
        super().__init__(f"resume at {resume_at_ms} with attempt {next_attempt}")
        self.resume_at_ms = resume_at_ms
        self.next_attempt = next_attempt


class Clock(Protocol):
    def now_ms(self) -> int: ...
    async def sleep(self, delay_s: float) -> None: ...
    def random(self) -> float: ...


class Transport(Protocol):
    async def send(
        self,
        request: HttpRequest,
        *,
        connection: Connection | None,
        tenant_id: str,
        timeout_s: float,
    ) -> HttpResponse:
        """Send with the connection's auth; raise only ``RunnerError``."""
        ...


@dataclass(frozen=True, slots=True)
class Grant:
    """The flow control's answer before an attempt. Admitted: the attempt may start after
    ``wait_ms`` (its place is reserved). Not admitted: ask again after ``wait_ms`` (-1: soon,
    a slot held by others must free up first). ``reason`` says what was waited for: ``rate``,
    ``tenant-rate``, ``paused``, ``concurrency``, ``tenant-concurrency``, ``circuit-open``,
    ``circuit-probing``."""

    admitted: bool
    wait_ms: int
    reason: str
    probe: bool = False
    # The flow control's own bookkeeping (a lease, what it read), opaque to the engine.
    token: Any = None


class FlowGate(Protocol):
    """Flow control of one step's requests: a connection (and tenant) and a base URL."""

    @property
    def fail_fast(self) -> bool:
        """While the circuit breaker is open, fail the step (``CIRCUIT_OPEN``) at once."""
        ...

    @property
    def name(self) -> str:
        """What is limited, for messages, spans and metrics: the connection's id."""
        ...

    async def acquire(self, *, reserve_ms: int, lease_ms: int) -> Grant: ...

    async def settle(
        self,
        grant: Grant,
        *,
        status: int | None,
        headers: Mapping[str, str] | None,
        error_code: str | None,
    ) -> None:
        """The attempt's outcome: release its lease, teach the budget what the API said,
        count a failure for the breaker. Never raises."""
        ...

    async def paused_ms(self) -> int:
        """How long an API's pause of the budget still lasts (0: none): asked after sleeping
        until a reserved place, since the API may have said "none left" meanwhile."""
        ...

    def abandon(self, grant: Grant) -> None:
        """The attempt was interrupted: release its lease in the background."""
        ...


class FlowControl(Protocol):
    def gate(self, connection: Connection, tenant_id: str, base_url: str) -> FlowGate | None:
        """The gate of a step's requests; None when nothing limits them (no round trip)."""
        ...

    def waited(self, gate: FlowGate, reason: str, wait_ms: int) -> None:
        """Count time spent waiting (metrics)."""
        ...


@dataclass(slots=True)
class StepResult:
    key: str
    status: StepStatus
    attempts: int = 0
    started_ms: int | None = None
    finished_ms: int | None = None
    output: Any = None
    error: RunnerError | None = None
    # When DEFERRED: the attempt to start with, and when.
    next_attempt: int = 1
    resume_at_ms: int = 0
    # A forEach step's item counts (None for a step that is one call).
    items: ItemCounts | None = None
    # A paginated step: how many pages its checkpoint holds (forgotten once it is finished).
    saved_pages: int = 0

    @property
    def duration_ms(self) -> int:
        if self.started_ms is None or self.finished_ms is None:
            return 0
        return self.finished_ms - self.started_ms


@dataclass(slots=True)
class ItemCounts:
    """A ``forEach`` step's items: how many, and how many have ended each way so far."""

    total: int
    succeeded: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    def as_wire(self) -> dict[str, int]:
        return {"total": self.total, "succeeded": self.succeeded, "failed": self.failed}


@dataclass(slots=True)
class Attempt:
    """One HTTP attempt as recorded in job logs, events and execution logs."""

    step_key: str
    number: int
    method: str
    url: str
    duration_ms: int
    status: int | None = None
    error: RunnerError | None = None
    decision: RetryDecision | None = None
    possible_duplicate: bool = False
    # The response's headers (lower-case names), for the flow control to read.
    headers: Mapping[str, str] | None = None


class Reporter(Protocol):
    async def run_started(self, started_ms: int) -> None: ...
    async def step_running(self, key: str, attempt: int, started_ms: int) -> None: ...
    async def attempt_done(self, attempt: Attempt) -> None: ...
    async def step_waiting(
        self, key: str, attempt: int, started_ms: int, reason: str, wait_ms: int, deferred: bool
    ) -> None:
        """The step waits ``wait_ms`` before its attempt, for ``reason`` (``Grant.reason``);
        ``deferred``: the job goes back to the queue meanwhile."""
        ...

    async def step_done(self, result: StepResult, attempt: int) -> None: ...
    # forEach: the step's one RUNNING event (with its item counts), and each item's end
    # (its checkpoint; progress now and then), never an event per item.
    async def map_running(self, key: str, started_ms: int, counts: ItemCounts) -> None: ...
    async def item_done(
        self, key: str, index: int, result: StepResult, counts: ItemCounts
    ) -> None: ...
    async def page_done(
        self, key: str, progress: Progress, items: list[Any], *, save_within: int | None
    ) -> int | None:
        """A paginated step finished a page that is not its last: a job-log line, and, when
        ``save_within`` is a byte budget, the page in the checkpoint (``progress`` and the
        page's items) if the items checkpointed so far stay within it. Returns the bytes of
        items the checkpoint then holds, or None when it was not saved."""
        ...

    async def run_done(
        self, status: RunStatus, error: RunnerError | None, steps: dict[str, StepResult]
    ) -> None: ...
    def warn(self, message: str, **context: Any) -> None: ...


@dataclass(slots=True)
class RunContext:
    """Everything a run renders from and is bounded by. ``connections`` and ``secrets`` hold
    resolved credentials and live only as long as the run."""

    job_id: str
    run_id: str
    tenant_id: str
    version_id: str
    input: dict[str, Any]
    started_ms: int
    deadline_ms: int
    connections: dict[str, Connection] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    # Outputs of steps finished before this delivery (a resume), by key.
    restored: dict[str, StepResult] = field(default_factory=dict)
    # Steps deferred by an earlier delivery: the attempt each continues with.
    resume_attempts: dict[str, int] = field(default_factory=dict)
    # forEach items finished before this delivery, by step key and index.
    restored_items: dict[str, dict[int, StepResult]] = field(default_factory=dict)
    # A forEach over more items than this fails (RUNNER_MAX_FOREACH_ITEMS).
    max_foreach_items: int = 10_000
    # Paginated steps in flight before this delivery: the pages they finished, by key.
    restored_pages: dict[str, SavedPages] = field(default_factory=dict)
    cancel: Callable[[], asyncio.Future[str]] | None = None
    # Resolves when the process must give the run back (shutdown after the grace period).
    hand_back: Callable[[], asyncio.Future[str]] | None = None
    # A wait longer than this is not slept in the slot: the job is handed back as delayed.
    long_wait_ms: int = 30_000
    # The run's trace (OpenTelemetry when configured, else a shared no-op).
    trace: RunSpan = NOOP_SPAN
