"""Retries, backoff, Retry-After, timeouts and idempotency, against a real local API.

Each test scripts a local aiohttp server to misbehave on purpose (503s, 429s, hangs, a body
that drips), runs a workflow through the real engine and the real HTTP transport
(``tests.integration.harness``), and checks what the server saw and what the run reported.
Waits are measured where they happen, on the server, and kept to a second or two.
"""

from __future__ import annotations

import asyncio
import math
import time
from email.utils import formatdate
from typing import Any

import pytest

from tests.integration.harness import (
    RUN_ID,
    Api,
    action,
    drip,
    hang,
    reply,
    run_workflow,
    step,
    version,
    with_headers,
)

pytestmark = pytest.mark.integration

EXPONENTIAL_100_400: dict[str, Any] = {
    "retryStrategy": "EXPONENTIAL",
    "maxAttempts": 3,
    "initialDelayMs": 100,
    "maxDelayMs": 400,
}


def one_step(url: str, key: str = "fetch", **action_fields: Any) -> dict[str, Any]:
    return version([step(key)], [action(url, **action_fields)])


async def test_503_twice_then_200_succeeds_on_the_third_attempt_within_backoff_bounds(
    serve: Any,
) -> None:
    # Given an API that answers 503 twice, then 200
    api = Api(reply(503), reply(503), reply(200, {"ok": True}))
    base = await serve(api.app())

    # When a step with EXPONENTIAL backoff (initial 100 ms, max 400 ms) calls it
    record = await run_workflow(one_step(f"{base}/things", **EXPONENTIAL_100_400))

    # Then the third attempt succeeds
    assert record.outcome.status == "SUCCESS", record.job_log
    fetch = record.outcome.steps["fetch"]
    assert fetch.attempts == 3
    assert fetch.output["body"] == {"ok": True}
    assert len(api.hits) == 3

    # and each wait is in [ceil(c/2), c] for the attempt's ceiling c = min(400, 100 * 2^(n-1))
    delays_ms = [round(s * 1000) for s in record.sleeps_s]
    assert len(delays_ms) == 2
    for n, delay_ms in enumerate(delays_ms, start=1):
        ceiling_ms = min(400, 100 * 2 ** (n - 1))
        assert math.ceil(ceiling_ms / 2) <= delay_ms <= ceiling_ms, (n, delays_ms)

    # and the server saw the attempts at least that far apart
    for gap_s, delay_ms in zip(api.gaps_s(), delays_ms, strict=True):
        assert gap_s >= delay_ms / 1000 - 0.005, (api.gaps_s(), delays_ms)

    # and the execution log names the same delays, as backoff
    failed = [d for d in record.attempt_docs("fetch") if d["context"]["status"] == 503]
    assert [d["context"]["delayMs"] for d in failed] == delays_ms
    assert [d["context"]["reason"] for d in failed] == ["backoff", "backoff"]


async def test_every_attempt_is_recorded_with_its_outcome_delay_and_reason(serve: Any) -> None:
    # Given an API that answers 503 (no hint), then 429 asking for 1 s, then 200
    api = Api(
        reply(503),
        reply(429, headers={"Retry-After": "1"}),
        reply(200, {"id": 7}),
    )
    base = await serve(api.app())

    # When a step with room for three attempts calls it
    record = await run_workflow(
        one_step(
            f"{base}/orders",
            retryStrategy="EXPONENTIAL",
            maxAttempts=3,
            initialDelayMs=50,
            maxDelayMs=2000,
        )
    )
    assert record.outcome.status == "SUCCESS", record.job_log

    # Then RUNNING events carry attempts 1, 2, 3 and the terminal event the last attempt
    running = record.step_events("fetch", "RUNNING")
    assert [e["attempt"] for e in running] == [1, 2, 3]
    assert [e["seq"] for e in record.events] == sorted({e["seq"] for e in record.events})
    (done,) = record.step_events("fetch", "SUCCESS")
    assert done["attempt"] == 3

    # and a job log line per failed attempt names the outcome, the delay and its reason
    lines = [line for line in record.job_log if "fetch attempt" in line]
    assert len(lines) == 2, record.job_log
    first, second = lines
    first_delay_ms = round(record.sleeps_s[0] * 1000)
    assert "attempt 1 failed: HTTP_ERROR: GET answered 503" in first
    assert f"attempt 2 of 3 in {first_delay_ms} ms (backoff)" in first
    assert "attempt 2 failed: HTTP_ERROR: GET answered 429" in second
    assert "attempt 3 of 3 in 1000 ms (server asked to retry after 1 s)" in second

    # and the execution log has one document per attempt with the request and the decision
    docs = record.attempt_docs("fetch")
    assert [d["attempt"] for d in docs] == [1, 2, 3]
    for doc in docs:
        context = doc["context"]
        assert context["method"] == "GET"
        assert context["url"] == f"{base}/orders"
        assert isinstance(context["durationMs"], int) and context["durationMs"] >= 0
    assert [d["context"]["status"] for d in docs] == [503, 429, 200]
    assert [d["level"] for d in docs] == ["warning", "warning", "info"]
    assert [(d["context"]["delayMs"], d["context"]["reason"]) for d in docs[:2]] == [
        (first_delay_ms, "backoff"),
        (1000, "retry-after"),
    ]
    assert "delayMs" not in docs[2]["context"]


async def test_429_with_retry_after_seconds_waits_about_that_long(serve: Any) -> None:
    # Given an API that answers 429 with Retry-After: 1, then 200
    api = Api(reply(429, headers={"Retry-After": "1"}), reply(200, {"ok": True}))
    base = await serve(api.app())

    # When a step whose own backoff would be 100 ms calls it
    record = await run_workflow(
        one_step(
            f"{base}/rate-limited",
            retryStrategy="EXPONENTIAL",
            maxAttempts=2,
            initialDelayMs=100,
            maxDelayMs=5000,
        )
    )

    # Then the second request arrives about a second after the first, not 100 ms
    assert record.outcome.status == "SUCCESS", record.job_log
    (gap_s,) = api.gaps_s()
    assert 0.95 <= gap_s < 2.0, gap_s
    assert record.sleeps_s == [1.0]


async def test_a_retry_after_above_max_delay_is_clamped_to_it(serve: Any) -> None:
    # Given an API that asks for 30 s, and a policy whose longest wait is 200 ms
    api = Api(reply(503, headers={"Retry-After": "30"}), reply(200, {"ok": True}))
    base = await serve(api.app())

    # When a step calls it (the run's deadline is a minute away)
    record = await run_workflow(
        one_step(
            f"{base}/busy",
            retryStrategy="EXPONENTIAL",
            maxAttempts=2,
            initialDelayMs=100,
            maxDelayMs=200,
        )
    )

    # Then it waits maxDelayMs, and says so
    assert record.outcome.status == "SUCCESS", record.job_log
    assert record.sleeps_s == [0.2]
    (gap_s,) = api.gaps_s()
    assert 0.2 - 0.005 <= gap_s < 1.0
    assert any(
        "(server asked to retry after 30 s clamped to maxDelayMs)" in line
        for line in record.job_log
    ), record.job_log


async def test_retry_after_as_an_http_date_is_honoured(serve: Any) -> None:
    # Given an API that answers 503 with Retry-After two seconds ahead as an HTTP-date
    # (whole seconds: the date names the start of its second, so the wait is in (1, 2] s)
    named_s: list[float] = []

    def two_seconds_ahead() -> dict[str, str]:
        when_s = float(int(time.time() + 2))
        named_s.append(when_s)
        return {"Retry-After": formatdate(when_s, usegmt=True)}

    api = Api(with_headers(two_seconds_ahead, 503), reply(200, {"ok": True}))
    base = await serve(api.app())

    # When a step with a short backoff of its own calls it
    record = await run_workflow(
        one_step(
            f"{base}/busy",
            retryStrategy="FIXED",
            maxAttempts=2,
            initialDelayMs=50,
            maxDelayMs=5000,
        )
    )

    # Then the retry arrives no earlier than the date the server named, and not long after
    assert record.outcome.status == "SUCCESS", record.job_log
    second = api.hits[1]
    assert second.at_wall_s >= named_s[0] - 0.02, (second.at_wall_s, named_s)
    assert second.at_wall_s < named_s[0] + 1.0
    (slept_s,) = record.sleeps_s
    assert 1.0 <= slept_s <= 2.0
    doc = record.attempt_docs("fetch")[0]
    assert doc["context"]["reason"] == "retry-after"


async def test_400_fails_after_exactly_one_attempt_with_http_error(serve: Any) -> None:
    # Given an API that answers 400 to everything
    api = Api(reply(400, {"error": "bad request"}))
    base = await serve(api.app())

    # When a step with room for three attempts calls it
    record = await run_workflow(one_step(f"{base}/things", **EXPONENTIAL_100_400))

    # Then the step fails at once, without a retry
    assert record.outcome.status == "FAILED"
    assert record.error_code("fetch") == "HTTP_ERROR"
    error = record.outcome.steps["fetch"].error
    assert error is not None and error.status == 400
    assert record.outcome.steps["fetch"].attempts == 1
    assert len(api.hits) == 1
    assert record.sleeps_s == []
    (doc,) = record.attempt_docs("fetch")
    assert doc["context"]["reason"] == "not-retryable"
    (failed,) = record.step_events("fetch", "FAILED")
    assert failed["errorCode"] == "HTTP_ERROR"
    assert failed["errorMessage"] == "fetch: GET answered 400"


async def test_a_hanging_request_times_out_and_the_retry_answers(serve: Any) -> None:
    # Given an API whose first request never gets headers and whose second answers
    api = Api(hang(max_s=5), reply(200, {"ok": True}))
    base = await serve(api.app())

    # When a step with a 300 ms timeout and one retry calls it
    record = await run_workflow(
        one_step(
            f"{base}/slow",
            timeoutMs=300,
            retryStrategy="FIXED",
            maxAttempts=2,
            initialDelayMs=50,
        )
    )

    # Then the first attempt times out, the second succeeds
    assert record.outcome.status == "SUCCESS", record.job_log
    assert record.outcome.steps["fetch"].attempts == 2
    first = record.attempt_docs("fetch")[0]
    assert first["context"]["error"].startswith("TIMEOUT: no complete response from 127.0.0.1")
    assert first["context"]["reason"] == "backoff"
    assert any(
        "fetch attempt 1 failed: TIMEOUT: no complete response" in line
        and "attempt 2 of 2 in 50 ms (backoff)" in line
        for line in record.job_log
    ), record.job_log
    (gap_s,) = api.gaps_s()
    assert 0.3 + 0.05 - 0.01 <= gap_s < 1.0, gap_s
    # and the hung request's connection was closed by the client, not left open
    await asyncio.wait_for(api.disconnected.wait(), 2)


async def test_a_body_slower_than_the_timeout_is_cut_off_and_retried(serve: Any) -> None:
    # Given an API whose first answer sends headers at once but drips its body
    api = Api(drip(every_s=0.05, max_s=5), reply(200, {"ok": True}))
    base = await serve(api.app())

    # When a step with a 300 ms timeout and one retry calls it
    record = await run_workflow(
        one_step(
            f"{base}/drip",
            timeoutMs=300,
            retryStrategy="FIXED",
            maxAttempts=2,
            initialDelayMs=20,
        )
    )

    # Then the attempt timeout covers the body read: the first attempt is a TIMEOUT
    assert record.outcome.status == "SUCCESS", record.job_log
    first, second = record.attempt_docs("fetch")
    assert first["context"]["error"].startswith("TIMEOUT:"), first
    assert first["context"]["status"] is None
    assert 300 <= first["context"]["durationMs"] < 1000
    assert second["context"]["status"] == 200
    # although the server had begun answering
    assert api.streamed_bytes > 0


async def test_a_deadline_before_the_backoff_ends_fails_the_run_without_waiting(
    serve: Any,
) -> None:
    # Given an API that answers 503, a 5 s backoff, and a run deadline 1 s away
    api = Api(reply(503), then=reply(200, {"ok": True}))
    base = await serve(api.app())
    definition = version(
        [step("first"), step("second"), step("third")],
        [
            action(
                f"{base}/x",
                retryStrategy="FIXED",
                maxAttempts=3,
                initialDelayMs=5000,
                maxDelayMs=5000,
            )
        ],
    )

    # When the run starts
    record = await run_workflow(definition, deadline_in_ms=1000)

    # Then it ends with WORKFLOW_TIMEOUT well before the backoff (or even the deadline) would
    assert record.elapsed_s < 1.5, record.elapsed_s
    assert record.outcome.status == "FAILED"
    assert record.outcome.error is not None
    assert str(record.outcome.error.code) == "WORKFLOW_TIMEOUT"
    assert all(s < 1.0 for s in record.sleeps_s), record.sleeps_s
    assert len(api.hits) == 1
    # and the failing step is FAILED with WORKFLOW_TIMEOUT, the steps never started CANCELED
    assert record.error_code("first") == "WORKFLOW_TIMEOUT"
    assert record.outcome.steps["second"].status == "CANCELED"
    assert record.outcome.steps["third"].status == "CANCELED"
    assert [e["status"] for e in record.step_events("second")] == ["CANCELED"]
    assert [e["status"] for e in record.step_events("third")] == ["CANCELED"]
    run_done = record.events[-1]
    assert (run_done["kind"], run_done["status"], run_done["errorCode"]) == (
        "run",
        "FAILED",
        "WORKFLOW_TIMEOUT",
    )


async def test_the_deadline_cuts_an_attempt_that_runs_past_it(serve: Any) -> None:
    # Given an API that answers 503 and then hangs, and a run deadline 800 ms away
    api = Api(reply(503), then=hang(max_s=5))
    base = await serve(api.app())
    definition = version(
        [step("first"), step("second")],
        [
            action(
                f"{base}/x",
                timeoutMs=10_000,
                retryStrategy="FIXED",
                maxAttempts=3,
                initialDelayMs=100,
            )
        ],
    )

    # When the run starts
    record = await run_workflow(definition, deadline_in_ms=800)

    # Then the retry started after the backoff is cut at the deadline, not its own 10 s timeout
    assert len(api.hits) == 2
    assert record.elapsed_s < 1.5, record.elapsed_s
    assert record.outcome.status == "FAILED"
    assert record.error_code("first") == "WORKFLOW_TIMEOUT"
    assert record.outcome.steps["second"].status == "CANCELED"


async def test_a_retry_after_past_the_deadline_fails_now_with_a_clear_message(
    serve: Any,
) -> None:
    # Given an API that answers 503 asking for 30 s, and a run deadline 2 s away
    api = Api(reply(503, headers={"Retry-After": "30"}))
    base = await serve(api.app())

    # When a step with retries left calls it
    record = await run_workflow(
        one_step(
            f"{base}/maintenance",
            retryStrategy="EXPONENTIAL",
            maxAttempts=5,
            initialDelayMs=100,
            maxDelayMs=60_000,
        ),
        deadline_in_ms=2000,
    )

    # Then it fails at once, saying the server's ask lies past the deadline
    assert record.elapsed_s < 1.0, record.elapsed_s
    assert record.sleeps_s == []
    assert len(api.hits) == 1
    assert record.outcome.status == "FAILED"
    error = record.outcome.steps["fetch"].error
    assert error is not None
    assert str(error.code) == "WORKFLOW_TIMEOUT"
    assert "server asked to retry after 30 s" in error.message
    assert "past the run's deadline" in error.message
    (doc,) = record.attempt_docs("fetch")
    assert doc["context"]["reason"] == "deadline"


async def test_the_idempotency_key_is_the_same_on_every_attempt(serve: Any) -> None:
    # Given an API that answers a POST with 503 twice, then 201
    api = Api(reply(503), reply(503), reply(201, {"id": "t_1"}))
    base = await serve(api.app())
    definition = version(
        [step("create_ticket", input={"body": {"subject": "hello"}})],
        [
            action(
                f"{base}/tickets",
                method="POST",
                idempotencyHeader="Idempotency-Key",
                retryStrategy="FIXED",
                maxAttempts=3,
                initialDelayMs=20,
            )
        ],
    )

    # When the step runs
    record = await run_workflow(definition)

    # Then every attempt carried the same key, {runId}:{stepKey}, and the same body
    assert record.outcome.status == "SUCCESS", record.job_log
    assert [h.method for h in api.hits] == ["POST"] * 3
    assert [h.headers.get("Idempotency-Key") for h in api.hits] == [f"{RUN_ID}:create_ticket"] * 3
    assert len({h.body for h in api.hits}) == 1
    # and, being idempotent, its retries are not flagged as possible duplicates
    assert not any(d["context"].get("possibleDuplicate") for d in record.exec_docs)


async def test_a_post_without_idempotency_key_retried_after_503_warns_of_a_duplicate(
    serve: Any,
) -> None:
    # Given an API that answers a POST with 503, then 201
    api = Api(reply(503), reply(201, {"id": "t_1"}))
    base = await serve(api.app())
    definition = version(
        [step("create_ticket", input={"body": {"subject": "hello"}})],
        [
            action(
                f"{base}/tickets",
                method="POST",
                retryStrategy="FIXED",
                maxAttempts=2,
                initialDelayMs=20,
            )
        ],
    )

    # When the step runs without an idempotency header
    record = await run_workflow(definition)

    # Then it succeeds, and the execution log warns that the retry may have duplicated
    assert record.outcome.status == "SUCCESS", record.job_log
    assert len(api.hits) == 2
    assert all("Idempotency-Key" not in h.headers for h in api.hits)
    warnings = [
        d
        for d in record.exec_docs
        if d["level"] == "warning" and "possible duplicate" in d["message"]
    ]
    assert len(warnings) == 1, [d["message"] for d in record.exec_docs]
    (warning,) = warnings
    assert warning["stepKey"] == "create_ticket"
    assert "attempt 2 of a POST without an idempotency key" in warning["message"]
    second = record.attempt_docs("create_ticket")[1]
    assert second["context"]["possibleDuplicate"] is True
