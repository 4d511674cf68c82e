"""runner.engine: whole runs in memory. A fake Transport answers per URL (or raises, or hangs),
a fake Clock records the sleeps it is asked for and returns at once, and the reporter is the
real RunReporter over the in-memory status sink. No sockets, no wall-time waits except the
one deadline test, which needs a real (0.2 s) deadline to pass."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import pytest

from runner.contract import decode_workflow_version
from runner.engine.plan import Plan, compile_plan
from runner.engine.ports import StepResult
from runner.engine.run import RunOutcome
from runner.errors import ErrorCode, StepHTTPError, TransportError
from runner.reporting.execlog import MemoryExecutionLog
from runner.reporting.stream import MemoryStatusSink
from runner.testing import (
    T0_MS,
    After,
    FakeClock,
    FakeTransport,
    Hang,
    MemoryRun,
    engine_run,
    json_reply,
)

RUN = "run_1"
T0 = T0_MS
API = "https://api.test"
# Every run is bounded so that an engine bug fails the test instead of hanging it.
RUN_LIMIT_S = 5.0


# --- building runs ------------------------------------------------------------------------


def action(key: str, **fields: Any) -> dict[str, Any]:
    return {"id": f"act_{key}", "endpointTemplate": f"{API}/{key}", **fields}


def plan_of(
    steps: list[dict[str, Any]],
    actions: dict[str, dict[str, Any]] | None = None,
    **extra: Any,
) -> Plan:
    """Steps name their action by key; an action not given is ``GET {API}/{key}``."""
    actions = dict(actions or {})
    for s in steps:
        s.setdefault("actionId", f"act_{s['key']}")
        name = s["actionId"].removeprefix("act_")
        actions.setdefault(name, action(name))
    raw = {
        "id": "wfv_1",
        "graph": {"steps": steps},
        "actions": {f"act_{k}": {**a, "id": f"act_{k}"} for k, a in actions.items()},
        "envConfig": {"vars": {"REGION": "eu"}},
        **extra,
    }
    return compile_plan(decode_workflow_version(raw))


Run = MemoryRun


def start(
    plan: Plan,
    transport: FakeTransport,
    clock: FakeClock | None = None,
    *,
    input: dict[str, Any] | None = None,
    deadline_in_ms: int = 300_000,
    restored: dict[str, StepResult] | None = None,
    cancel: Callable[[], asyncio.Future[str]] | None = None,
    last_seq: int = 0,
) -> tuple[Coroutine[Any, Any, RunOutcome], MemoryStatusSink]:
    """The engine's run of ``plan``, not yet awaited, and the sink it reports to."""
    running, setup = engine_run(
        plan,
        transport,
        clock or FakeClock(),
        run_id=RUN,
        input=input,
        deadline_in_ms=deadline_in_ms,
        restored=restored,
        cancel=cancel,
        last_seq=last_seq,
    )
    return running, setup.sink


async def run(
    plan: Plan, transport: FakeTransport, clock: FakeClock | None = None, **kw: Any
) -> Run:
    running, sink = start(plan, transport, clock, **kw)
    outcome = await asyncio.wait_for(running, RUN_LIMIT_S)
    assert set(transport.tenants) <= {"ten_1"}
    return MemoryRun(RUN, outcome, sink, MemoryExecutionLog())


def assert_seq_rises(r: Run, first: int = 1) -> None:
    seqs = [e["seq"] for e in r.events()]
    assert seqs == list(range(first, first + len(seqs)))


# --- a linear run -------------------------------------------------------------------------


async def test_given_three_linear_steps_when_run_then_templates_flow_from_step_to_step() -> None:
    # Given a fetch, a create that uses the fetch's output, and a read that uses the create's.
    plan = plan_of(
        [
            {
                "key": "fetch",
                "input": {"path": {"id": "{{ input.customerId }}"}},
                "extract": {"email": "$.body.email"},
            },
            {
                "key": "create",
                "input": {
                    "headers": {"X-Run": "{{ run.id }}"},
                    "body": {
                        "requester": "{{ steps.fetch.output.email }}",
                        "region": "{{ env.REGION }}",
                        "orders": "{{ steps.fetch.output.body.orders }}",
                        "note": "for {{ input.customerId }} in {{ env.REGION }}",
                    },
                },
            },
            {
                "key": "read",
                "input": {
                    "path": {"ticketId": "{{ steps.create.output.body.id }}"},
                    "query": {"tenant": "{{ run.tenantId }}"},
                },
            },
        ],
        {
            "fetch": action("fetch", endpointTemplate=f"{API}/customers/{{id}}"),
            "create": action(
                "create",
                method="POST",
                endpointTemplate=f"{API}/tickets",
                idempotencyHeader="Idempotency-Key",
            ),
            "read": action("read", endpointTemplate=f"{API}/tickets/{{ticketId}}"),
        },
    )
    transport = (
        FakeTransport()
        .route(f"{API}/customers/c%2042", json_reply(200, {"email": "e@x", "orders": 3}))
        .route(f"{API}/tickets", json_reply(201, {"id": "T/1 é"}))
        .route(f"{API}/tickets/T%2F1%20%C3%A9", json_reply(200, {"state": "open"}))
    )

    # When the run goes.
    r = await run(plan, transport, input={"customerId": "c 42"})

    # Then each step sent once, in order, with the values of the step before it.
    assert r.outcome.status == "SUCCESS" and r.outcome.error is None
    assert transport.urls() == [
        f"{API}/customers/c%2042",
        f"{API}/tickets",
        f"{API}/tickets/T%2F1%20%C3%A9",
    ]
    create = transport.sent[1]
    assert create.method == "POST"
    assert msgspec.json.decode(create.body or b"") == {
        "requester": "e@x",
        "region": "eu",
        "orders": 3,  # a whole-value template keeps the JSON type
        "note": "for c 42 in eu",
    }
    assert create.headers["X-Run"] == RUN
    assert create.headers["Idempotency-Key"] == f"{RUN}:create"
    assert transport.sent[2].query == (("tenant", "ten_1"),)
    assert transport.connections == [None, None, None]
    assert r.outcome.steps["fetch"].output == {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": {"email": "e@x", "orders": 3},
        "email": "e@x",
    }
    assert r.outcome.steps["read"].output["body"] == {"state": "open"}
    assert r.timeline() == [
        (None, "RUNNING"),
        ("fetch", "RUNNING"),
        ("fetch", "SUCCESS"),
        ("create", "RUNNING"),
        ("create", "SUCCESS"),
        ("read", "RUNNING"),
        ("read", "SUCCESS"),
        (None, "SUCCESS"),
    ]
    assert_seq_rises(r)
    assert [p["progress"] for p in r.job.progress_values] == [33, 67, 100]


# --- retries ------------------------------------------------------------------------------


async def test_given_503_503_200_and_exponential_policy_when_run_then_three_attempts() -> None:
    # Given an action that retries exponentially from 100 ms, and a server that is busy twice.
    plan = plan_of(
        [{"key": "a"}],
        {
            "a": action(
                "a",
                method="POST",
                retryStrategy="EXPONENTIAL",
                maxAttempts=5,
                initialDelayMs=100,
                maxDelayMs=1000,
                idempotencyHeader="Idempotency-Key",
            )
        },
    )
    transport = FakeTransport().route(
        f"{API}/a", json_reply(503), json_reply(503), json_reply(200, {"ok": True})
    )
    clock = FakeClock(random_value=0.5)

    # When the run goes.
    r = await run(plan, transport, clock)

    # Then three attempts, with waits inside the equal-jitter band of each attempt.
    assert r.outcome.status == "SUCCESS"
    assert len(transport.sent) == 3
    assert r.outcome.steps["a"].attempts == 3
    first, second = clock.sleeps_s
    assert 0.050 <= first <= 0.100
    assert 0.100 <= second <= 0.200
    # The same idempotency key on every attempt.
    assert {req.headers["Idempotency-Key"] for req in transport.sent} == {f"{RUN}:a"}
    assert r.step_events("a") == [("RUNNING", 1), ("RUNNING", 2), ("RUNNING", 3), ("SUCCESS", 3)]
    assert_seq_rises(r)


async def test_given_a_connection_error_then_success_when_run_then_it_is_retried() -> None:
    plan = plan_of(
        [{"key": "a"}], {"a": action("a", retryStrategy="FIXED", maxAttempts=2, initialDelayMs=7)}
    )
    transport = FakeTransport().route(
        f"{API}/a",
        TransportError("connection reset", code=ErrorCode.CONNECTION_ERROR),
        json_reply(),
    )
    clock = FakeClock()

    r = await run(plan, transport, clock)

    assert r.outcome.status == "SUCCESS"
    assert clock.sleeps_s == [0.007]
    assert len(transport.sent) == 2


async def test_given_a_400_when_run_then_one_attempt_and_the_rest_are_canceled() -> None:
    # Given a retrying policy, a 400 is not retryable.
    plan = plan_of(
        [{"key": "a"}, {"key": "b"}, {"key": "c"}],
        {"a": action("a", retryStrategy="EXPONENTIAL", maxAttempts=5, initialDelayMs=100)},
    )
    transport = FakeTransport().route(f"{API}/a", json_reply(400, {"error": "bad"}))
    clock = FakeClock()

    r = await run(plan, transport, clock)

    assert r.outcome.status == "FAILED"
    assert r.outcome.error is not None
    assert r.outcome.error.code == ErrorCode.HTTP_ERROR
    assert r.outcome.error.status == 400
    assert transport.urls() == [f"{API}/a"]
    assert clock.sleeps_s == []
    assert r.status_of("a") == "FAILED" and r.outcome.steps["a"].attempts == 1
    assert r.status_of("b") == r.status_of("c") == "CANCELED"
    # Steps that never started get only their CANCELED event.
    assert r.step_events("b") == [("CANCELED", 0)]
    assert r.step_events("c") == [("CANCELED", 0)]
    last = r.events()[-1]
    assert (last["kind"], last["status"], last["errorCode"]) == ("run", "FAILED", "HTTP_ERROR")


# --- templates ----------------------------------------------------------------------------


async def test_given_a_missing_reference_when_run_then_the_step_fails_before_sending() -> None:
    plan = plan_of(
        [
            {"key": "a"},
            {"key": "b", "input": {"body": {"x": "{{ steps.a.output.body.nope }}"}}},
            {"key": "c"},
        ]
    )
    transport = FakeTransport().route(f"{API}/a", json_reply(200, {"id": 1}))

    r = await run(plan, transport)

    assert transport.urls() == [f"{API}/a"]  # b never reached the transport
    error = r.error_of("b")
    assert error.code == ErrorCode.TEMPLATE_ERROR
    assert error.message == (
        "$.graph.steps[1].input.body.x: '{{ steps.a.output.body.nope }}' has no value: "
        "'steps.a.output.body' has no 'nope'"
    )
    assert r.step_events("b") == [("RUNNING", 1), ("FAILED", 1)]
    assert r.status_of("c") == "CANCELED"
    assert r.outcome.status == "FAILED"
    assert r.outcome.error is error


async def test_given_a_continue_step_fails_when_run_then_the_run_goes_on() -> None:
    # Given a CONTINUE step that fails, a step reading its status, and one reading its output.
    plan = plan_of(
        [
            {"key": "a", "onFailure": "CONTINUE"},
            {"key": "b", "dependsOn": ["a"], "input": {"body": {"prev": "{{ steps.a.status }}"}}},
            {"key": "c", "dependsOn": ["b"], "input": {"body": "{{ steps.a.output.body }}"}},
        ]
    )
    transport = (
        FakeTransport().route(f"{API}/a", json_reply(400)).route(f"{API}/b", json_reply(200))
    )

    r = await run(plan, transport)

    # Then b runs and sees FAILED, and c's reference to a's output is a TEMPLATE_ERROR.
    assert transport.urls() == [f"{API}/a", f"{API}/b"]
    assert msgspec.json.decode(transport.sent[1].body or b"") == {"prev": "FAILED"}
    assert r.status_of("a") == "FAILED" and r.status_of("b") == "SUCCESS"
    assert r.error_of("c").code == ErrorCode.TEMPLATE_ERROR
    assert "'steps.a' has no 'output'" in r.error_of("c").message
    assert r.outcome.status == "FAILED"
    assert r.outcome.error is not None
    assert r.outcome.error.code == ErrorCode.TEMPLATE_ERROR


async def test_given_only_continue_steps_fail_when_run_then_the_run_succeeds() -> None:
    plan = plan_of([{"key": "a", "onFailure": "CONTINUE"}, {"key": "b"}])
    transport = (
        FakeTransport().route(f"{API}/a", json_reply(404)).route(f"{API}/b", json_reply(200))
    )

    r = await run(plan, transport)

    assert r.outcome.status == "SUCCESS" and r.outcome.error is None
    assert r.status_of("a") == "FAILED"
    assert r.events()[-1]["status"] == "SUCCESS"


# --- when ---------------------------------------------------------------------------------


@pytest.mark.parametrize("go", [False, None, 0, "", "false"])
async def test_given_when_is_falsy_when_run_then_the_step_is_skipped_and_nothing_sent(
    go: Any,
) -> None:
    plan = plan_of(
        [
            {"key": "a", "when": "{{ input.go }}"},
            {"key": "b", "input": {"body": {"a": "{{ steps.a.status }}"}}},
        ]
    )
    transport = FakeTransport().route(f"{API}/b", json_reply(200))

    r = await run(plan, transport, input={"go": go})

    assert transport.urls() == [f"{API}/b"]
    assert r.status_of("a") == "SKIPPED"
    assert r.step_events("a") == [("SKIPPED", 0)]
    assert msgspec.json.decode(transport.sent[0].body or b"") == {"a": "SKIPPED"}
    assert r.outcome.status == "SUCCESS"


async def test_given_when_is_true_when_run_then_the_step_runs() -> None:
    plan = plan_of([{"key": "a", "when": "{{ input.go }}"}])
    transport = FakeTransport().route(f"{API}/a", json_reply(200))

    r = await run(plan, transport, input={"go": True})

    assert transport.urls() == [f"{API}/a"]
    assert r.status_of("a") == "SUCCESS"


# --- graph --------------------------------------------------------------------------------


async def test_given_a_diamond_when_run_then_branches_overlap_and_the_join_waits() -> None:
    # Given a; b and c after a; d after b and c. b answers only once c was sent, which can
    # happen only if b and c are in flight together.
    plan = plan_of(
        [
            {"key": "a"},
            {"key": "b", "dependsOn": ["a"]},
            {"key": "c", "dependsOn": ["a"]},
            {"key": "d", "dependsOn": ["b", "c"]},
        ]
    )
    transport = FakeTransport()
    transport.route(f"{API}/a", json_reply())
    transport.route(f"{API}/b", After(transport.was_sent(f"{API}/c"), json_reply()))
    transport.route(f"{API}/c", json_reply())
    transport.route(f"{API}/d", json_reply())

    r = await run(plan, transport)

    assert r.outcome.status == "SUCCESS"
    urls = transport.urls()
    assert urls[0] == f"{API}/a"
    assert set(urls[1:3]) == {f"{API}/b", f"{API}/c"}
    assert urls[3] == f"{API}/d"
    timeline = r.timeline()
    d_running = timeline.index(("d", "RUNNING"))
    assert timeline.index(("b", "SUCCESS")) < d_running
    assert timeline.index(("c", "SUCCESS")) < d_running
    assert timeline.index(("a", "SUCCESS")) < timeline.index(("b", "RUNNING"))


async def test_given_a_fail_run_failure_when_a_sibling_is_in_flight_then_it_is_canceled() -> None:
    # Given two independent steps: b hangs, c fails with a 400 once b is in flight; d joins them.
    plan = plan_of(
        [
            {"key": "b", "dependsOn": []},
            {"key": "c", "dependsOn": []},
            {"key": "d", "dependsOn": ["b", "c"]},
        ]
    )
    transport = FakeTransport()
    transport.route(f"{API}/b", Hang())
    transport.route(f"{API}/c", After(transport.was_sent(f"{API}/b"), json_reply(400)))

    r = await run(plan, transport)

    # Then b's request is aborted and b is CANCELED; d never starts; the run fails with c's error.
    assert transport.cancelled == [f"{API}/b"]
    assert r.status_of("b") == "CANCELED"
    assert r.outcome.steps["b"].error is None
    assert r.step_events("b") == [("RUNNING", 1), ("CANCELED", 1)]
    assert r.status_of("c") == "FAILED"
    assert r.step_events("d") == [("CANCELED", 0)]
    assert r.outcome.status == "FAILED"
    assert r.outcome.error is r.error_of("c")
    assert r.events()[-1]["errorCode"] == "HTTP_ERROR"
    assert_seq_rises(r)


# --- deadline -----------------------------------------------------------------------------


async def test_given_a_deadline_near_when_a_step_hangs_then_workflow_timeout() -> None:
    # Given 200 ms left (real time: the engine waits on the deadline) and a hanging first step.
    plan = plan_of([{"key": "a"}, {"key": "b"}, {"key": "c"}])
    transport = FakeTransport().route(f"{API}/a", Hang())

    r = await run(plan, transport, deadline_in_ms=200)

    # Then the step in flight fails with WORKFLOW_TIMEOUT and the unstarted ones are CANCELED.
    assert r.outcome.status == "FAILED"
    assert r.outcome.error is not None
    assert r.outcome.error.code == ErrorCode.WORKFLOW_TIMEOUT
    assert r.error_of("a").code == ErrorCode.WORKFLOW_TIMEOUT
    assert transport.cancelled == [f"{API}/a"]
    assert r.step_events("b") == [("CANCELED", 0)]
    assert r.step_events("c") == [("CANCELED", 0)]
    # The attempt's own timeout was cut to the time left.
    assert transport.timeouts_s == [0.2]
    assert r.events()[-1]["errorCode"] == "WORKFLOW_TIMEOUT"


async def test_given_the_deadline_has_passed_when_run_then_nothing_is_sent() -> None:
    plan = plan_of([{"key": "a"}, {"key": "b"}])
    transport = FakeTransport().route(f"{API}/a", json_reply())

    r = await run(plan, transport, deadline_in_ms=0)

    assert transport.sent == []
    assert r.outcome.status == "FAILED"
    assert r.outcome.error is not None
    assert r.outcome.error.code == ErrorCode.WORKFLOW_TIMEOUT
    assert r.status_of("b") == "CANCELED"
    assert set(r.outcome.steps) == {"a", "b"}


async def test_given_a_backoff_past_the_deadline_when_run_then_no_wait_starts() -> None:
    # Given 60 ms left and a FIXED 100 ms backoff (FIXED: no jitter can bring it under 60).
    plan = plan_of(
        [{"key": "a"}],
        {"a": action("a", retryStrategy="FIXED", maxAttempts=3, initialDelayMs=100)},
    )
    transport = FakeTransport().route(f"{API}/a", json_reply(503))
    clock = FakeClock()

    r = await run(plan, transport, clock, deadline_in_ms=60)

    assert clock.sleeps_s == []
    assert len(transport.sent) == 1
    assert r.error_of("a").code == ErrorCode.WORKFLOW_TIMEOUT
    assert r.outcome.status == "FAILED"


# --- cancel -------------------------------------------------------------------------------


async def test_given_a_cancel_while_a_step_is_in_flight_when_run_then_all_is_canceled() -> None:
    plan = plan_of([{"key": "a"}, {"key": "b"}, {"key": "c"}])
    transport = FakeTransport().route(f"{API}/a", json_reply()).route(f"{API}/b", Hang())
    requested: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def cancel_once_b_is_sent() -> None:
        await transport.was_sent(f"{API}/b").wait()
        requested.set_result("user asked")

    canceller = asyncio.create_task(cancel_once_b_is_sent())
    r = await run(plan, transport, cancel=lambda: requested)
    await canceller

    assert r.outcome.status == "CANCELED"
    assert r.outcome.error is not None
    assert r.outcome.error.code == ErrorCode.CANCELED
    assert r.outcome.error.message == "user asked"
    assert r.status_of("a") == "SUCCESS"
    assert r.status_of("b") == "CANCELED"
    assert r.status_of("c") == "CANCELED"
    assert transport.cancelled == [f"{API}/b"]
    assert r.step_events("c") == [("CANCELED", 0)]
    last = r.events()[-1]
    assert (last["kind"], last["status"], last["errorCode"]) == ("run", "CANCELED", "CANCELED")


async def test_given_the_run_itself_is_cancelled_while_a_step_is_in_flight_then_no_step_follows() -> (
    None
):
    # Given a linear run whose second step hangs (each step runs in the walk's own task)
    plan = plan_of([{"key": "a"}, {"key": "b"}, {"key": "c"}])
    transport = FakeTransport().route(f"{API}/a", json_reply()).route(f"{API}/b", Hang())
    engine_run, sink = start(plan, transport)
    running = asyncio.create_task(engine_run)
    await asyncio.wait_for(transport.was_sent(f"{API}/b").wait(), RUN_LIMIT_S)

    # When the task running it is cancelled (a forced shutdown), not the run by a cancel request
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    # Then the request in flight is abandoned, c is never sent, and both end CANCELED
    assert transport.cancelled == [f"{API}/b"]
    assert [r.url for r in transport.sent] == [f"{API}/a", f"{API}/b"]
    steps = [msgspec.json.decode(e) for e in sink.events]
    assert [(e.get("stepKey"), e["status"]) for e in steps if e["kind"] == "step"][-2:] == [
        ("b", "CANCELED"),
        ("c", "CANCELED"),
    ]


# --- resume -------------------------------------------------------------------------------


async def test_given_restored_steps_when_resumed_then_they_are_not_sent_and_feed_templates() -> (
    None
):
    # Given a checkpoint in which a succeeded and s was skipped.
    plan = plan_of(
        [
            {"key": "a", "extract": {"email": "$.body.email"}},
            {"key": "s", "when": "{{ input.never }}"},
            {
                "key": "b",
                "input": {
                    "body": {
                        "id": "{{ steps.a.output.body.id }}",
                        "email": "{{ steps.a.output.email }}",
                        "s": "{{ steps.s.status }}",
                    }
                },
            },
        ]
    )
    restored = {
        "a": StepResult(
            "a",
            "SUCCESS",
            attempts=2,
            started_ms=T0 - 5000,
            finished_ms=T0 - 4000,
            output={"status": 200, "headers": {}, "body": {"id": "A1"}, "email": "e@x"},
        ),
        "s": StepResult("s", "SKIPPED"),
    }
    transport = FakeTransport().route(f"{API}/b", json_reply())

    # When the run is delivered again.
    r = await run(plan, transport, restored=restored, last_seq=4)

    # Then only b is sent, with a's restored output, and seq continues above the checkpoint.
    assert transport.urls() == [f"{API}/b"]
    assert msgspec.json.decode(transport.sent[0].body or b"") == {
        "id": "A1",
        "email": "e@x",
        "s": "SKIPPED",
    }
    assert r.outcome.status == "SUCCESS"
    assert r.outcome.steps["a"] is restored["a"]
    assert r.step_events("a") == [] and r.step_events("s") == []
    assert_seq_rises(r, first=5)
    assert r.job.progress_values[-1]["completedSteps"] == 3


async def test_given_a_restored_continue_failure_when_resumed_then_the_run_goes_on() -> None:
    plan = plan_of([{"key": "a", "onFailure": "CONTINUE"}, {"key": "b"}])
    restored = {"a": StepResult("a", "FAILED", 1, T0, T0, None, StepHTTPError("x", status=500))}
    transport = FakeTransport().route(f"{API}/b", json_reply())

    r = await run(plan, transport, restored=restored)

    assert transport.urls() == [f"{API}/b"]
    assert r.outcome.status == "SUCCESS"


async def test_given_a_restored_fail_run_failure_when_resumed_then_the_run_stays_failed() -> None:
    # Given a checkpoint written after a FAIL_RUN step failed, but before the run's own end
    # was published (the worker died in between).
    plan = plan_of([{"key": "a"}, {"key": "b"}])
    failure = StepHTTPError("GET answered 400", status=400)
    restored = {"a": StepResult("a", "FAILED", 1, T0, T0, None, failure)}
    transport = FakeTransport().route(f"{API}/b", json_reply())

    # When the run is delivered again.
    r = await run(plan, transport, restored=restored)

    # Then it must not go on past the failure: b is not sent and the run is FAILED.
    assert transport.sent == []
    assert r.status_of("b") == "CANCELED"
    assert r.outcome.status == "FAILED"
    assert r.outcome.error is not None
    assert r.outcome.error.code == ErrorCode.HTTP_ERROR
