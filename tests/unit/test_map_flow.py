"""A forEach's items go through the connection's flow control as any attempt does: a rate limit
spaces them, and each wait is told. The real Flow on its in-memory store, fake clock."""

from __future__ import annotations

from tests.unit.test_engine import API, FakeClock, FakeTransport, json_reply, plan_of
from tests.unit.test_flow_engine import CountingStore, run_flow


async def test_given_a_rate_limit_when_a_map_runs_then_its_items_are_spaced_by_it() -> None:
    # Given a connection allowed 1 request per 2 s, and a map of three items, 3 at once
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_of(
        [
            {
                "key": "each",
                "connectionId": "c",
                "forEach": "input.ids",
                "maxParallel": 3,
                "input": {"path": {"id": "{{ item }}"}},
            }
        ],
        {"each": {"endpointTemplate": "/items/{id}"}},
        connections={
            "c": {
                "id": "c",
                "type": "NONE",
                "config": {"baseUrl": API, "rateLimit": {"requests": 1, "perMs": 2000}},
            }
        },
    )
    transport = FakeTransport()
    for name in "xyz":
        transport.route(f"{API}/items/{name}", json_reply())

    # When it runs
    r = await run_flow(plan, transport, clock, store, input={"ids": ["x", "y", "z"]})

    # Then every item asked the flow control, and two of them waited for the rate
    assert r.outcome.status == "SUCCESS"
    assert store.acquires == 3
    assert clock.sleeps_s == [2.0, 2.0]
    waits = [e for e in r.events() if "waitReason" in e]
    assert [(e["stepKey"], e["waitReason"]) for e in waits] == [("each", "rate")] * 2


async def test_given_a_rate_limit_over_100_items_then_about_20_waits_are_told_not_100() -> None:
    clock = FakeClock()
    store = CountingStore(clock)
    plan = plan_of(
        [
            {
                "key": "each",
                "connectionId": "c",
                "forEach": "input.ids",
                "maxParallel": 10,
                "input": {"path": {"id": "{{ item }}"}},
            }
        ],
        {"each": {"endpointTemplate": "/items/{id}"}},
        connections={
            "c": {
                "id": "c",
                "type": "NONE",
                "config": {"baseUrl": API, "rateLimit": {"requests": 1, "perMs": 2000}},
            }
        },
    )
    transport = FakeTransport()
    ids = [f"i{i}" for i in range(100)]
    for name in ids:
        transport.route(f"{API}/items/{name}", json_reply())

    r = await run_flow(plan, transport, clock, store, input={"ids": ids})

    assert r.outcome.status == "SUCCESS"
    # 99 items waited 2 s or more, each worth telling; a map tells about every 5th
    told = [e for e in r.events() if "waitReason" in e]
    assert len(clock.sleeps_s) >= 99
    assert 15 <= len(told) <= 21
