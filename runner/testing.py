"""The test kit: what tests (and the bench) need to run the real engine and reporter without
infrastructure, in the package as dramatiq ships its stub broker.

- ``FakeClock``: fixed time that moves only when the run sleeps; sleeps return at once and are
  recorded, so retry tests assert on the sleeps requested, never on wall time.
- ``RecordingClock``: the system clock (it really sleeps) that records every sleep asked for.
- ``FakeTransport``: canned replies per URL (a response, an error, ``Hang``, ``After``), and a
  record of everything sent.
- ``start_run`` / ``run_in_memory``: one run of a plan through ``Engine`` and ``RunReporter``
  over the in-memory status sink and execution log; ``MemoryRun`` is what it reported.

For whole-process tests, ``RUNNER_BURST=true`` makes ``python -m runner`` process what is
queued and exit (``runner.queue.burst``): wait for the process, not for time to pass.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec

from runner.contract import Connection
from runner.engine.plan import Plan
from runner.engine.ports import (
    Clock,
    FlowControl,
    RunContext,
    StepResult,
    SystemClock,
    Transport,
)
from runner.engine.run import Engine, RunOutcome
from runner.errors import RunnerError
from runner.http.messages import HttpRequest, HttpResponse
from runner.redact import Redactor
from runner.reporting.execlog import MemoryExecutionLog
from runner.reporting.reporter import Redact, RunReporter
from runner.reporting.stream import JobView, MemoryStatusSink

T0_MS = 1_795_608_000_000


# --- clocks -------------------------------------------------------------------------------------


class FakeClock:
    """Fixed time that moves only when the run sleeps; sleeps return at once."""

    def __init__(self, now_ms: int = T0_MS, random_value: float = 0.5) -> None:
        self.now = now_ms
        self.sleeps_s: list[float] = []
        self.random_value = random_value

    def now_ms(self) -> int:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps_s.append(delay_s)
        self.now += round(delay_s * 1000)
        await asyncio.sleep(0)

    def random(self) -> float:
        return self.random_value


class RecordingClock:
    """The system clock (it really sleeps) that also records every sleep the run asks for."""

    def __init__(self) -> None:
        self.sleeps_s: list[float] = []
        self._clock = SystemClock()

    def now_ms(self) -> int:
        return self._clock.now_ms()

    async def sleep(self, delay_s: float) -> None:
        self.sleeps_s.append(delay_s)
        await self._clock.sleep(delay_s)

    def random(self) -> float:
        return self._clock.random()


# --- the transport ------------------------------------------------------------------------------


class Hang:
    """A reply that never comes: the request stays in flight until it is cancelled."""


@dataclass
class After:
    """Reply with ``reply`` once ``event`` is set (at most ``limit_s``, so a bug cannot hang)."""

    event: asyncio.Event
    reply: Any
    limit_s: float = 2.0


Reply = HttpResponse | RunnerError | Hang | After


def json_reply(status: int = 200, body: Any = None) -> HttpResponse:
    return HttpResponse(
        status, {"content-type": "application/json"}, msgspec.json.encode(body or {})
    )


@dataclass
class FakeTransport:
    """Canned replies per URL, used in order; the last one repeats."""

    routes: dict[str, list[Reply]] = field(default_factory=dict)
    sent: list[HttpRequest] = field(default_factory=list)
    timeouts_s: list[float] = field(default_factory=list)
    connections: list[Connection | None] = field(default_factory=list)
    tenants: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    _calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _sent_events: dict[str, asyncio.Event] = field(default_factory=dict)

    def route(self, url: str, *replies: Reply) -> FakeTransport:
        self.routes[url] = list(replies)
        return self

    def was_sent(self, url: str) -> asyncio.Event:
        return self._sent_events.setdefault(url, asyncio.Event())

    def urls(self) -> list[str]:
        return [r.url for r in self.sent]

    async def send(
        self,
        request: HttpRequest,
        *,
        connection: Connection | None,
        tenant_id: str,
        timeout_s: float,
    ) -> HttpResponse:
        self.sent.append(request)
        self.timeouts_s.append(timeout_s)
        self.connections.append(connection)
        self.tenants.append(tenant_id)
        self.was_sent(request.url).set()
        replies = self.routes.get(request.url)
        assert replies, f"no route for {request.url}"
        reply = replies[min(self._calls[request.url], len(replies) - 1)]
        self._calls[request.url] += 1
        try:
            return await self._answer(reply)
        except asyncio.CancelledError:
            self.cancelled.append(request.url)
            raise

    async def _answer(self, reply: Reply) -> HttpResponse:
        if isinstance(reply, After):
            await asyncio.wait_for(reply.event.wait(), reply.limit_s)
            return await self._answer(reply.reply)
        if isinstance(reply, Hang):
            await asyncio.Event().wait()
        if isinstance(reply, RunnerError):
            raise reply
        assert isinstance(reply, HttpResponse)
        return reply


# --- one run in memory --------------------------------------------------------------------------


@dataclass
class MemoryRun:
    """What one run reported: its outcome, status events, job progress and log lines, and
    execution-log documents."""

    run_id: str
    outcome: RunOutcome
    sink: MemoryStatusSink
    execlog: MemoryExecutionLog

    @property
    def job(self) -> JobView:
        return self.sink.job(self.run_id)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.sink.events]

    def step_events(self, key: str) -> list[tuple[str, int]]:
        return [(e["status"], e["attempt"]) for e in self.events() if e.get("stepKey") == key]

    def timeline(self) -> list[tuple[str | None, str]]:
        return [(e.get("stepKey"), e["status"]) for e in self.events()]

    def status_of(self, key: str) -> str:
        return self.outcome.steps[key].status

    def error_of(self, key: str) -> RunnerError:
        error = self.outcome.steps[key].error
        assert error is not None
        return error


@dataclass
class RunSetup:
    """A run of a plan, not yet started: its reporter and context, wired as a job's would be."""

    run_id: str
    reporter: RunReporter
    ctx: RunContext
    sink: MemoryStatusSink
    execlog: MemoryExecutionLog


def start_run(
    plan: Plan,
    clock: Clock,
    *,
    run_id: str = "run_1",
    tenant_id: str = "ten_1",
    input: dict[str, Any] | None = None,
    deadline_in_ms: int | None = None,
    restored: dict[str, StepResult] | None = None,
    cancel: Callable[[], asyncio.Future[str]] | None = None,
    last_seq: int = 0,
    redact: Redact | None = None,
    connections: dict[str, Connection] | None = None,
    long_wait_ms: int = 30_000,
) -> RunSetup:
    """The reporter and context of one run of ``plan`` over in-memory sinks."""
    sink = MemoryStatusSink()
    redactor = redact or Redactor()
    execlog = MemoryExecutionLog(redact=redactor.value)
    restored = restored or {}
    reporter = RunReporter(
        run_id=run_id,
        tenant_id=tenant_id,
        version_id=plan.id,
        job_id=run_id,
        worker_id="test-worker",
        total_steps=len(plan.steps),
        sink=sink,
        execlog=execlog,
        redact=redactor,
        now_ms=clock.now_ms,
        last_seq=last_seq,
        completed_steps=len(restored),
    )
    started = clock.now_ms()
    timeout_ms = deadline_in_ms if deadline_in_ms is not None else plan.version.timeout_ms
    ctx = RunContext(
        job_id=run_id,
        run_id=run_id,
        tenant_id=tenant_id,
        version_id=plan.id,
        input=input if input is not None else {},
        started_ms=started,
        deadline_ms=started + timeout_ms,
        restored=restored,
        cancel=cancel,
        connections=dict(connections or {}),
        long_wait_ms=long_wait_ms,
    )
    return RunSetup(run_id, reporter, ctx, sink, execlog)


def engine_run(
    plan: Plan,
    transport: Transport,
    clock: Clock,
    *,
    step_parallelism: int = 8,
    flow: FlowControl | None = None,
    **setup: Any,
) -> tuple[Coroutine[Any, Any, RunOutcome], RunSetup]:
    """The engine's run of ``plan`` (not yet awaited) and its setup."""
    run = start_run(plan, clock, **setup)
    engine = Engine(transport, clock, step_parallelism=step_parallelism, flow=flow)
    return engine.run(plan, run.ctx, run.reporter), run


async def run_in_memory(
    plan: Plan,
    transport: Transport,
    clock: Clock | None = None,
    *,
    limit_s: float = 5.0,
    **setup: Any,
) -> MemoryRun:
    """Run ``plan`` to its end (at most ``limit_s``, so an engine bug fails instead of hanging)
    and return what it reported."""
    running, run = engine_run(plan, transport, clock or FakeClock(), **setup)
    outcome = await asyncio.wait_for(running, limit_s)
    return MemoryRun(run.run_id, outcome, run.sink, run.execlog)
