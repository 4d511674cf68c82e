"""The engine's forEach: outputs in item order whatever order items end in, the first failure
under onItemError fail cancels the items in flight and starts no more, and a far retry wait of
one item defers the step with the finished items checkpointed. Fake transport and clock."""

from __future__ import annotations

import json
from typing import Any

from runner.errors import ErrorCode
from tests.unit.test_engine import (
    API,
    RUN,
    After,
    FakeTransport,
    Hang,
    json_reply,
    plan_of,
    run,
)


def map_plan(**fields: Any) -> Any:
    return plan_of(
        [
            {
                "key": "each",
                "forEach": "input.ids",
                "input": {"path": {"id": "{{ item }}"}, "body": {"i": "{{ index }}"}},
                **fields,
            }
        ],
        {"each": {"endpointTemplate": f"{API}/each/{{id}}", "method": "POST"}},
    )


async def test_given_items_that_end_out_of_order_when_mapped_then_outputs_are_in_item_order() -> (
    None
):
    transport = FakeTransport()
    # Item a answers only once item b was sent: b ends first.
    transport.route(
        f"{API}/each/a", After(transport.was_sent(f"{API}/each/b"), json_reply(body={"n": "a"}))
    )
    transport.route(f"{API}/each/b", json_reply(body={"n": "b"}))

    r = await run(map_plan(maxParallel=2), transport, input={"ids": ["a", "b"]})

    assert r.status_of("each") == "SUCCESS"
    assert [o["body"]["n"] for o in r.outcome.steps["each"].output] == ["a", "b"]
    assert [json_body(req) for req in transport.sent] == [{"i": 0}, {"i": 1}]


async def test_given_a_failed_item_under_fail_when_mapped_then_in_flight_items_are_cancelled() -> (
    None
):
    transport = FakeTransport()
    transport.route(f"{API}/each/a", Hang())
    transport.route(f"{API}/each/b", json_reply(500))
    for name in "cde":
        transport.route(f"{API}/each/{name}", json_reply())

    r = await run(map_plan(maxParallel=2), transport, input={"ids": list("abcde")})

    assert r.status_of("each") == "FAILED"
    assert r.error_of("each").code == ErrorCode.HTTP_ERROR
    assert r.error_of("each").message == "each: item 1: POST answered 500"
    assert transport.cancelled == [f"{API}/each/a"]
    assert transport.urls() == [f"{API}/each/a", f"{API}/each/b"]
    assert r.outcome.status == "FAILED"


async def test_given_an_item_with_a_far_retry_when_mapped_then_the_step_defers_with_items_saved() -> (
    None
):
    transport = FakeTransport()
    transport.route(f"{API}/each/a", json_reply())
    transport.route(f"{API}/each/b", json_reply(503))
    plan = map_plan(retry={"retryStrategy": "FIXED", "maxAttempts": 3, "initialDelayMs": 60_000})

    r = await run(plan, transport, input={"ids": ["a", "b"]})

    assert r.outcome.status == "DEFERRED"
    assert r.outcome.deferred["each"].resume_at_ms > 0
    saved = r.sink.runs[RUN]
    assert "item:each:0" in saved  # finished: not sent again on the next delivery
    assert "item:each:1" not in saved  # waiting for its retry: sent again
    assert "step:each" not in saved


def json_body(request: Any) -> Any:
    return json.loads(request.body)


async def test_given_no_items_when_mapped_then_the_output_is_an_empty_list() -> None:
    r = await run(map_plan(), FakeTransport(), input={"ids": []})

    assert r.status_of("each") == "SUCCESS"
    assert r.outcome.steps["each"].output == []
    assert [e["items"] for e in r.events() if e.get("stepKey") == "each"] == [
        {"total": 0, "succeeded": 0, "failed": 0}
    ] * 2


async def test_given_a_for_each_that_is_not_a_list_when_mapped_then_it_is_a_template_error() -> (
    None
):
    r = await run(map_plan(), FakeTransport(), input={"ids": {"a": 1}})

    assert r.error_of("each").code == ErrorCode.TEMPLATE_ERROR
    assert r.error_of("each").message == ("$.graph.steps[0].forEach: yields object, not a list")
