"""Before each attempt of a limited step: wait for the flow control's grant.

A short wait is slept in the slot. A wait longer than the run's ``long_wait_ms`` hands the job
back to BullMQ as delayed (``Deferral``, the same attempt number: waiting costs no attempt); a
wait past the deadline fails the step with ``WORKFLOW_TIMEOUT``; an open circuit breaker with
``whenOpen: FAIL`` fails it with ``CIRCUIT_OPEN``. A wait of a second or more is told in a
status event and the job log (``Reporter.step_waiting``).
"""

from __future__ import annotations

from runner.engine.ports import Clock, Deferral, FlowControl, FlowGate, Grant, Reporter, RunContext
from runner.errors import CircuitOpen, WorkflowTimeout

RESERVE_MS = 5_000
"""How far ahead an attempt may reserve its place and sleep until it comes. Further out it
does not reserve (other tenants' requests may take the earlier places) and asks again later."""
POLL_MS = (25, 200)
"""How soon to ask again for a concurrency slot: the lower bound, doubled up to the upper."""
PROBE_POLL_MS = 500
"""While a half-open breaker's probe is in flight, ask again this often."""
TOLD_MS = 1_000
_BUDGET_REASONS = frozenset({"rate", "tenant-rate", "paused"})
"""A wait at least this long is reported (a status event, a job log line)."""


async def admit(
    flow: FlowControl,
    gate: FlowGate,
    ctx: RunContext,
    *,
    step_key: str,
    attempt: int,
    started_ms: int,
    lease_ms: int,
    clock: Clock,
    reporter: Reporter,
    reserve_ms: int = RESERVE_MS,
) -> tuple[Grant, int]:
    """The grant to send the attempt under, and the milliseconds waited for it."""
    waited_ms = 0
    poll_ms = POLL_MS[0]
    told = False
    reserve = min(reserve_ms, ctx.long_wait_ms)
    while True:
        grant = await gate.acquire(reserve_ms=reserve, lease_ms=lease_ms)
        now = clock.now_ms()
        wait_ms = grant.wait_ms
        if grant.reason == "circuit-probing":
            wait_ms = min(wait_ms, PROBE_POLL_MS)  # the probe may answer any moment
        if not grant.admitted and wait_ms < 0:
            wait_ms = round(poll_ms * (0.5 + clock.random()))
            poll_ms = min(poll_ms * 2, POLL_MS[1])
        if wait_ms <= 0:
            return grant, waited_ms
        if not grant.admitted and grant.reason == "circuit-open" and gate.fail_fast:
            raise CircuitOpen(
                f"the circuit breaker of connection '{gate.name}' is open for"
                f" {wait_ms} ms more (whenOpen FAIL)"
            )
        if now + wait_ms >= ctx.deadline_ms:
            gate.abandon(grant)
            raise WorkflowTimeout(
                f"waiting {wait_ms} ms for {grant.reason} of connection '{gate.name}' would end"
                " past the run's deadline"
            )
        if wait_ms > ctx.long_wait_ms:
            gate.abandon(grant)
            flow.waited(gate, grant.reason, 0)
            await reporter.step_waiting(step_key, attempt, started_ms, grant.reason, wait_ms, True)
            raise Deferral(now + wait_ms, attempt)
        if not told and wait_ms >= TOLD_MS:
            told = True
            await reporter.step_waiting(step_key, attempt, started_ms, grant.reason, wait_ms, False)
        # Beyond the reserve horizon, sleep until the place is within it, then ask again.
        sleep_ms = wait_ms
        if not grant.admitted and wait_ms > reserve and grant.reason in _BUDGET_REASONS:
            sleep_ms = max(wait_ms - reserve // 2, POLL_MS[0])
        await clock.sleep(sleep_ms / 1000)
        waited_ms += sleep_ms
        flow.waited(gate, grant.reason, sleep_ms)
        if grant.admitted:
            if await gate.paused_ms() <= 0:
                return grant, waited_ms
            gate.abandon(grant)  # the API said "none left" while this slept: ask again
