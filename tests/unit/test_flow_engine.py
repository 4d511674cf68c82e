"""The engine under flow control, in memory: the real Flow and its in-memory store on the fake
clock of ``test_engine``. What a step waits for, how long, when it hands the job back, and that
a connection without limits never asks."""

from __future__ import annotations

import asyncio
from typing import Any

from runner.errors import ErrorCode
from runner.flow.gcra import BreakerState, ScopeState
from runner.flow.limits import Acquire, Flow, Settle
from runner.flow.memory import MemoryStore
from runner.http.messages import HttpResponse
from runner.queue.keys import Keys
from runner.testing import MemoryRun, engine_run
from tests.unit.test_engine import (
    API,
    RUN,
    FakeClock,
    FakeTransport,
    Run,
    json_reply,
    plan_of,
)

KEYS = Keys("bull", "q")


class CountingStore(MemoryStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock.now_ms)
        self.acquires = 0
        self.settles = 0

    async def acquire(self, ask: Acquire) -> Any:
        self.acquires += 1
        return await super().acquire(ask)

    async def settle(self, outcome: Settle) -> None:
        self.settles += 1
        await super().settle(outcome)


def plan_with(
    config: dict[str, Any], keys: tuple[str, ...] = ("a", "b", "c"), **action: Any
) -> Any:
    return plan_of(
        [{"key": k, "connectionId": "c"} for k in keys],
        {k: {"endpointTemplate": f"/{k}", **action} for k in keys},
        connections={"c": {"id": "c", "type": "NONE", "config": {"baseUrl": API, **config}}},
    )


async def run_flow(
    plan: Any, transport: FakeTransport, clock: FakeClock, store: MemoryStore, **setup: Any
) -> Run:
    running, run = engine_run(
        plan,
        transport,
        clock,
        run_id=RUN,
        deadline_in_ms=setup.pop("deadline_in_ms", 300_000),
        connections=dict(plan.version.connections),
        flow=Flow(store, KEYS, now_ms=clock.now_ms),
        **setup,
    )
    outcome = await asyncio.wait_for(running, 5)
    return MemoryRun(RUN, outcome, run.sink, run.execlog)


def ok_transport(*keys: str) -> FakeTransport:
    transport = FakeTransport()
    for k in keys:
        transport.route(f"{API}/{k}", json_reply(200, {"k": k}))
    return transport


async def test_given_a_connection_without_limits_then_the_flow_control_is_never_asked() -> None:
    clock = FakeClock()
    store = CountingStore(clock)
    r = await run_flow(plan_with({}), ok_transport("a", "b", "c"), clock, store)
    assert r.outcome.status == "SUCCESS"
    assert (store.acquires, store.settles) == (0, 0)
    assert clock.sleeps_s == []


async def test_given_a_rate_limit_then_steps_are_spaced_by_its_interval_and_say_why() -> None:
    # Given a connection allowed 1 request per 2 s
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_with({"rateLimit": {"requests": 1, "perMs": 2000}})
    # When three steps run through it
    r = await run_flow(plan, ok_transport("a", "b", "c"), clock, store)
    # Then the second and third wait 2 s each, and no settle was needed (nothing to release)
    assert r.outcome.status == "SUCCESS"
    assert clock.sleeps_s == [2.0, 2.0]
    assert (store.acquires, store.settles) == (3, 0)
    # and each wait is told in a RUNNING event with its reason, and in the job log
    waits = [e for e in r.events() if "waitReason" in e]
    assert [(e["stepKey"], e["status"], e["waitReason"]) for e in waits] == [
        ("b", "RUNNING", "rate"),
        ("c", "RUNNING", "rate"),
    ]
    assert waits[0]["waitUntil"] == waits[0]["at"] + 2000
    assert any(
        "b attempt 1 waiting 2000 ms for the connection's rate limit" in line
        for line in r.job.lines
    )


async def test_given_a_wait_past_the_long_wait_threshold_then_the_job_is_handed_back() -> None:
    # Given a connection whose budget is paused for a minute
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_with({"rateLimit": {"requests": 10, "perMs": 1000}}, keys=("a",))
    store.scopes["bull:q:flow:c"] = ScopeState(pause_until=clock.now + 60_000)
    transport = ok_transport("a")
    # When the step runs with a 30 s long-wait threshold
    r = await run_flow(plan, transport, clock, store, long_wait_ms=30_000)
    # Then nothing is sent or slept: the step is deferred with its first attempt still to make
    assert r.outcome.status == "DEFERRED"
    assert transport.sent == [] and clock.sleeps_s == []
    deferred = r.outcome.deferred["a"]
    assert deferred.next_attempt == 1
    assert deferred.resume_at_ms == clock.now + 60_000
    (wait,) = [e for e in r.events() if "waitReason" in e]
    assert (wait["waitReason"], wait["deferred"]) == ("paused", True)


async def test_given_an_open_breaker_with_when_open_fail_then_the_step_fails_circuit_open() -> None:
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_with({"circuitBreaker": {"whenOpen": "FAIL"}}, keys=("a",))
    store.breakers[f"bull:q:breaker:{API}"] = BreakerState(open_until=clock.now + 5000)
    transport = ok_transport("a")
    r = await run_flow(plan, transport, clock, store)
    assert r.outcome.status == "FAILED"
    assert r.error_of("a").code == ErrorCode.CIRCUIT_OPEN
    assert transport.sent == []


async def test_given_an_open_breaker_with_when_open_wait_then_the_step_waits_out_the_cool_down() -> (
    None
):
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_with({"circuitBreaker": {"whenOpen": "WAIT"}}, keys=("a",))
    store.breakers[f"bull:q:breaker:{API}"] = BreakerState(open_until=clock.now + 5000)
    r = await run_flow(plan, ok_transport("a"), clock, store)
    assert r.outcome.status == "SUCCESS"
    assert clock.sleeps_s == [5.0]
    # the attempt was the probe, and its success closed the breaker
    assert f"bull:q:breaker:{API}" not in store.breakers


async def test_given_a_pause_past_the_deadline_then_the_step_fails_workflow_timeout() -> None:
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_with({"rateLimit": {"requests": 10, "perMs": 1000}}, keys=("a",))
    store.scopes["bull:q:flow:c"] = ScopeState(pause_until=clock.now + 20_000)
    r = await run_flow(plan, ok_transport("a"), clock, store, deadline_in_ms=10_000)
    assert r.outcome.status == "FAILED"
    assert r.error_of("a").code == ErrorCode.WORKFLOW_TIMEOUT


async def test_given_a_429_with_retry_after_then_the_retry_waits_once_not_twice() -> None:
    # Given an API that answers 429 Retry-After 2, then 200, and a retrying action
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_with(
        {"rateLimit": {"requests": 10, "perMs": 1000}},
        keys=("a",),
        retryStrategy="FIXED",
        maxAttempts=2,
        initialDelayMs=100,
    )
    transport = FakeTransport().route(
        f"{API}/a",
        HttpResponse(429, {"retry-after": "2"}, b""),
        json_reply(200, {}),
    )
    r = await run_flow(plan, transport, clock, store)
    # Then the budget was paused for everyone (a settle), and the retry's own wait covered it
    assert r.outcome.status == "SUCCESS"
    assert clock.sleeps_s == [2.0]
    assert store.settles == 1
    assert store.scopes["bull:q:flow:c"].pause_until == clock.now


async def test_given_max_concurrency_then_a_step_releases_its_lease_when_done() -> None:
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_with({"maxConcurrency": 1})
    r = await run_flow(plan, ok_transport("a", "b", "c"), clock, store)
    assert r.outcome.status == "SUCCESS"
    assert store.settles == 3
    assert store.leases["bull:q:flow:c:leases"] == {}
