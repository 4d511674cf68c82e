"""runner.flow, pure: GCRA's arithmetic, what an answer's headers say of the budget, the
breaker's states, and the in-memory store on an injected clock. No sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
from email.utils import formatdate
from typing import Any

import pytest

from runner.contract import Connection, decode_workflow_version
from runner.errors import DefinitionError
from runner.flow import gcra
from runner.flow.gcra import BreakerState, Rate, ScopeState
from runner.flow.hints import NO_HINT, BudgetHint, budget_hint
from runner.flow.limits import Flow
from runner.flow.memory import MemoryStore
from runner.flow.policy import Defaults, policy_of
from runner.queue.keys import Keys
from runner.validate import validate_source

T0 = 1_795_608_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def now_ms(self) -> int:
        return self.now


def starts_within(rate: Rate, asked_at: list[int]) -> list[int]:
    """When each request asked at those times starts, each taking its place."""
    state = ScopeState()
    starts = []
    for now in asked_at:
        t = gcra.interval_ms(rate.interval_ms, state, now)
        start = gcra.earliest_start(state, t, rate.burst, now)
        gcra.take(state, start, t)
        starts.append(now + gcra.wait_ms(start, now))
    return starts


# --- GCRA ------------------------------------------------------------------------------------


def test_given_20_per_second_burst_5_when_30_ask_at_once_then_5_go_and_the_rest_are_spaced() -> (
    None
):
    starts = starts_within(Rate.of(20, 1000, 5), [0] * 30)
    assert starts[:5] == [0] * 5
    assert [b - a for a, b in itertools.pairwise(starts[4:])] == [50] * 25


def test_given_a_rate_then_no_window_of_per_ms_holds_more_than_requests_plus_burst() -> None:
    # Given requests asked in bursts at random-ish times over 5 s
    rate = Rate.of(20, 1000, 5)
    asked = sorted((i * 7919) % 5000 for i in range(200))
    starts = starts_within(rate, asked)
    # Then any 1000 ms window holds at most 20 + 5 - 1 starts (GCRA's bound)
    for s in starts:
        assert sum(1 for x in starts if s <= x < s + 1000) <= 24
    # and the average over the whole stretch is the rate
    assert (starts[-1] - starts[0]) >= (len(starts) - 5) * 50


def test_given_no_burst_when_asked_together_then_every_request_is_one_interval_apart() -> None:
    assert starts_within(Rate.of(4, 1000), [0, 0, 0, 0]) == [0, 250, 500, 750]


def test_given_a_pause_then_nothing_starts_before_it_ends() -> None:
    state = ScopeState(pause_until=1200)
    assert gcra.earliest_start(state, 50.0, 1, 1000) == 1200


def test_given_a_halved_factor_then_the_interval_doubles_and_recovers_additively() -> None:
    state = ScopeState(factor=gcra.decreased(1.0))
    assert gcra.interval_ms(50.0, state, 0) == 100.0
    for _ in range(10):
        state.factor = gcra.recovered(state.factor)
    assert state.factor == pytest.approx(1.0)
    assert gcra.recovered(1.0) == 1.0


def test_given_many_decreases_then_the_factor_stops_at_its_floor() -> None:
    factor = 1.0
    for _ in range(100):
        factor = gcra.decreased(factor)
    assert factor == gcra.MIN_FACTOR


def test_given_an_api_budget_tighter_than_ours_then_it_rules_until_it_lapses() -> None:
    state = ScopeState(override_interval_ms=400.0, override_until=2000)
    assert gcra.interval_ms(50.0, state, 1999) == 400.0
    assert gcra.interval_ms(50.0, state, 2000) == 50.0


# --- hints -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "hint"),
    [
        (429, {"retry-after": "3"}, BudgetHint(pause_ms=3000)),
        (503, {"retry-after": "2"}, BudgetHint(pause_ms=2000)),
        (500, {"retry-after": "2"}, NO_HINT),
        (429, {}, BudgetHint(back_off=True)),
        (429, {"retry-after": "soon"}, BudgetHint(back_off=True)),
        (200, {}, NO_HINT),
        (200, {"ratelimit-remaining": "0", "ratelimit-reset": "4"}, BudgetHint(pause_ms=4000)),
        (200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1"}, BudgetHint(pause_ms=1000)),
        (
            200,
            {"ratelimit-remaining": "10", "ratelimit-reset": "60"},
            BudgetHint(interval_ms=6000.0, lasts_ms=60000),
        ),
        (200, {"ratelimit-remaining": "10", "ratelimit-reset": "2"}, NO_HINT),
        (200, {"ratelimit": '"default";r=0;t=5'}, BudgetHint(pause_ms=5000)),
        (
            200,
            {"ratelimit": '"default";r=4;t=20'},
            BudgetHint(interval_ms=5000.0, lasts_ms=20000),
        ),
        (200, {"x-ratelimit-remaining": "-1", "x-ratelimit-reset": "2"}, NO_HINT),
        (429, {"ratelimit-remaining": "0"}, BudgetHint(back_off=True)),
    ],
)
def test_given_an_answer_then_its_budget_hint_is_read(
    status: int, headers: dict[str, str], hint: BudgetHint
) -> None:
    assert budget_hint(status, headers, T0) == hint


def test_given_a_reset_as_epoch_seconds_then_it_is_read_as_a_time() -> None:
    reset = str(T0 // 1000 + 7)
    hint = budget_hint(200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}, T0)
    assert hint.pause_ms == 7000


def test_given_a_retry_after_date_then_the_pause_lasts_until_it() -> None:
    hint = budget_hint(429, {"retry-after": formatdate(T0 / 1000 + 5, usegmt=True)}, T0)
    assert hint.pause_ms == 5000


def test_given_an_absurd_reset_then_the_pause_is_capped_at_an_hour() -> None:
    hint = budget_hint(429, {"retry-after": "99999999"}, T0)
    assert hint.pause_ms == 3_600_000


# --- the breaker -----------------------------------------------------------------------------


def fail(state: BreakerState, now: int, probe: bool = False) -> None:
    gcra.breaker_failed(state, now, failures=3, window_ms=1000, cool_down_ms=5000, probe=probe)


def test_given_n_failures_within_the_window_then_it_opens_for_the_cool_down() -> None:
    state = BreakerState()
    for now in (0, 100, 200):
        assert gcra.breaker_gate(state, now)[0] == "closed"
        fail(state, now)
    assert gcra.breaker_gate(state, 300) == ("open", 4900)
    # and after the cool-down one probe may go
    assert gcra.breaker_gate(state, 5200) == ("probe", 0)


def test_given_failures_spread_wider_than_the_window_then_it_stays_closed() -> None:
    state = BreakerState()
    for now in (0, 600, 1200, 1800):
        fail(state, now)
    assert gcra.breaker_gate(state, 1900)[0] == "closed"


def test_given_a_success_between_failures_then_the_count_starts_again() -> None:
    state = BreakerState()
    fail(state, 0)
    fail(state, 10)
    gcra.breaker_succeeded(state)
    fail(state, 20)
    assert gcra.breaker_gate(state, 30)[0] == "closed"


def test_given_a_failed_probe_then_it_opens_again_and_a_good_one_closes_it() -> None:
    state = BreakerState()
    for now in (0, 1, 2):
        fail(state, now)
    fail(state, 5100, probe=True)
    assert gcra.breaker_gate(state, 5200) == ("open", 4900)
    gcra.breaker_succeeded(state)
    assert gcra.breaker_gate(state, 5300) == ("closed", 0)


# --- the definition --------------------------------------------------------------------------


def connection(**config: Any) -> Connection:
    raw = {
        "id": "v",
        "graph": {"steps": []},
        "connections": {"c": {"id": "c", "type": "NONE", "config": config}},
    }
    return decode_workflow_version(raw).connections["c"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"rateLimit": {"requests": 0, "perMs": 1000}},
            '$.connections["c"].config.rateLimit.requests: expected int >= 1',
        ),
        (
            {"rateLimit": {"requests": 5}},
            '$.connections["c"].config.rateLimit: object missing required field perMs',
        ),
        (
            {"rateLimit": {"requests": 5, "perMs": 100, "brust": 2}},
            '$.connections["c"].config.rateLimit: object contains unknown field brust',
        ),
        (
            {"maxConcurrency": 0},
            '$.connections["c"].config.maxConcurrency: expected int >= 1',
        ),
        (
            {"tenantLimits": {"maxConcurrency": "2"}},
            '$.connections["c"].config.tenantLimits.maxConcurrency: expected int | null, got str',
        ),
        (
            {"circuitBreaker": {"whenOpen": "PANIC"}},
            "$.connections[\"c\"].config.circuitBreaker.whenOpen: invalid enum value 'PANIC'",
        ),
    ],
)
def test_given_a_bad_limit_when_decoded_then_it_is_definition_invalid_at_its_path(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(DefinitionError) as info:
        connection(**config)
    assert info.value.message.replace('"', "'") == message.replace('"', "'")


def test_given_bad_limits_when_validated_then_each_is_reported_with_its_path() -> None:
    raw = {
        "id": "v",
        "graph": {"steps": [{"key": "a", "actionId": "x", "connectionId": "c"}]},
        "actions": {"x": {"id": "x", "endpointTemplate": "/a"}},
        "connections": {
            "c": {
                "id": "c",
                "type": "NONE",
                "config": {"baseUrl": "http://a", "maxConcurrency": -1},
            },
            "d": {
                "id": "d",
                "type": "NONE",
                "config": {"baseUrl": "http://a", "rateLimit": {"requests": 1, "perMs": 0}},
            },
        },
    }
    report = validate_source(json.dumps(raw))
    assert not report.ok
    assert "$.connections.c.config.maxConcurrency: expected int >= 1" in report.problems
    assert "$.connections.d.config.rateLimit.perMs: expected int >= 1" in report.problems


def test_given_good_limits_when_validated_then_it_is_ok() -> None:
    raw = {
        "id": "v",
        "graph": {"steps": [{"key": "a", "actionId": "x", "connectionId": "c"}]},
        "actions": {"x": {"id": "x", "endpointTemplate": "/a"}},
        "connections": {
            "c": {
                "id": "c",
                "type": "NONE",
                "config": {
                    "baseUrl": "http://a",
                    "rateLimit": {"requests": 20, "perMs": 1000, "burst": 5},
                    "maxConcurrency": 4,
                    "tenantLimits": {"rateLimit": {"requests": 5, "perMs": 1000}},
                    "circuitBreaker": {"failures": 5, "coolDownMs": 10000, "whenOpen": "FAIL"},
                },
            }
        },
    }
    assert validate_source(json.dumps(raw)).problems == ()


def test_given_no_limits_anywhere_then_there_is_no_gate() -> None:
    flow = Flow(MemoryStore(Clock().now_ms), Keys("bull", "q"))
    assert flow.gate(connection(baseUrl="http://a"), "t", "http://a") is None


def test_given_runner_defaults_then_a_connection_without_limits_gets_them() -> None:
    defaults = Defaults.parse("10/1000/2", 3, "4/1000/2000/FAIL")
    policy = policy_of(connection(), defaults)
    assert policy.rate == Rate(100.0, 2)
    assert policy.max_concurrency == 3
    assert policy.breaker is not None and policy.breaker.fail_fast
    own = policy_of(connection(rateLimit={"requests": 1, "perMs": 10}), defaults)
    assert own.rate == Rate(10.0, 1)


@pytest.mark.parametrize("text", ["10", "10/0", "a/b", "1/2/3/4"])
def test_given_a_bad_default_rate_then_the_setting_is_named(text: str) -> None:
    with pytest.raises(SystemExit, match="RUNNER_RATE_LIMIT"):
        Defaults.parse(text, 0, "")


def test_given_a_bad_default_breaker_then_the_setting_is_named() -> None:
    with pytest.raises(SystemExit, match="RUNNER_CIRCUIT_BREAKER"):
        Defaults.parse("", 0, "3/1000")


# --- the memory store through a gate ---------------------------------------------------------


def gate_of(flow: Flow, tenant: str = "t1", **config: Any) -> Any:
    gate = flow.gate(connection(**config), tenant, "http://api")
    assert gate is not None
    return gate


async def test_given_max_concurrency_then_a_third_request_waits_until_a_lease_is_released() -> None:
    clock = Clock()
    flow = Flow(MemoryStore(clock.now_ms), Keys("bull", "q"), now_ms=clock.now_ms)
    gate = gate_of(flow, maxConcurrency=2)
    first = await gate.acquire(reserve_ms=5000, lease_ms=1000)
    second = await gate.acquire(reserve_ms=5000, lease_ms=1000)
    third = await gate.acquire(reserve_ms=5000, lease_ms=1000)
    assert (first.admitted, second.admitted, third.admitted) == (True, True, False)
    assert third.reason == "concurrency" and third.wait_ms == -1
    await gate.settle(first, status=200, headers={}, error_code=None)
    assert (await gate.acquire(reserve_ms=5000, lease_ms=1000)).admitted


async def test_given_a_lease_never_released_then_it_expires_on_its_own() -> None:
    clock = Clock()
    flow = Flow(MemoryStore(clock.now_ms), Keys("bull", "q"), now_ms=clock.now_ms)
    gate = gate_of(flow, maxConcurrency=1)
    assert (await gate.acquire(reserve_ms=0, lease_ms=1000)).admitted
    assert not (await gate.acquire(reserve_ms=0, lease_ms=1000)).admitted
    clock.now += 1000
    assert (await gate.acquire(reserve_ms=0, lease_ms=1000)).admitted


async def test_given_a_429_with_retry_after_then_every_gate_of_the_connection_pauses() -> None:
    clock = Clock()
    flow = Flow(MemoryStore(clock.now_ms), Keys("bull", "q"), now_ms=clock.now_ms)
    limits = {"rateLimit": {"requests": 100, "perMs": 1000, "burst": 10}}
    one, other = gate_of(flow, "t1", **limits), gate_of(flow, "t2", **limits)
    grant = await one.acquire(reserve_ms=5000, lease_ms=1000)
    await one.settle(grant, status=429, headers={"retry-after": "2"}, error_code=None)
    paused = await other.acquire(reserve_ms=5000, lease_ms=1000)
    assert paused.admitted and paused.wait_ms == 2000 and paused.reason == "paused"
    too_far = await other.acquire(reserve_ms=1000, lease_ms=1000)
    assert not too_far.admitted and too_far.wait_ms >= 2000


async def test_given_429s_without_headers_then_the_budget_backs_off_and_recovers() -> None:
    clock = Clock()
    store = MemoryStore(clock.now_ms)
    flow = Flow(store, Keys("bull", "q"), now_ms=clock.now_ms)
    gate = gate_of(flow, rateLimit={"requests": 10, "perMs": 1000})
    grant = await gate.acquire(reserve_ms=5000, lease_ms=1000)
    await gate.settle(grant, status=429, headers={}, error_code=None)
    # a second 429 within the same second is the same signal
    await gate.settle(grant, status=429, headers={}, error_code=None)
    scope = store.scopes["bull:q:flow:c"]
    assert scope.factor == 0.5
    clock.now += 1000
    await gate.settle(grant, status=429, headers={}, error_code=None)
    assert scope.factor == 0.25
    for _ in range(15):
        clock.now += 1000
        grant = await gate.acquire(reserve_ms=60_000, lease_ms=1000)
        await gate.settle(grant, status=200, headers={}, error_code=None)
    assert scope.factor == pytest.approx(1.0)


async def test_given_a_flooding_tenant_with_fair_share_then_another_tenant_gets_half() -> None:
    # Given a connection of 10 requests/s shared fairly, and tenant A already asking
    clock = Clock()
    flow = Flow(MemoryStore(clock.now_ms), Keys("bull", "q"), now_ms=clock.now_ms)
    limits = {"rateLimit": {"requests": 10, "perMs": 1000}, "tenantLimits": {"fairShare": True}}
    a, b = gate_of(flow, "A", **limits), gate_of(flow, "B", **limits)
    granted = {"A": 0, "B": 0}
    # When both ask every 10 ms for 10 s (A ten times as often as B)
    for tick in range(1000):
        clock.now = T0 + tick * 10
        for name, gate, every in (("A", a, 1), ("B", b, 10)):
            if tick % every == 0:
                grant = await gate.acquire(reserve_ms=0, lease_ms=1000)
                granted[name] += grant.admitted and grant.wait_ms == 0
    # Then the connection's rate is kept, and B got about its half, A no more than its half
    assert 95 <= granted["A"] + granted["B"] <= 101
    assert granted["B"] >= 40, granted
    assert granted["A"] <= 55, granted


async def test_given_breaker_failures_then_it_opens_and_one_probe_closes_it() -> None:
    clock = Clock()
    flow = Flow(MemoryStore(clock.now_ms), Keys("bull", "q"), now_ms=clock.now_ms)
    gate = gate_of(flow, circuitBreaker={"failures": 2, "windowMs": 1000, "coolDownMs": 3000})
    for _ in range(2):
        grant = await gate.acquire(reserve_ms=0, lease_ms=1000)
        await gate.settle(grant, status=None, headers=None, error_code="CONNECTION_ERROR")
    shut = await gate.acquire(reserve_ms=0, lease_ms=1000)
    assert (shut.admitted, shut.reason, shut.wait_ms) == (False, "circuit-open", 3000)
    assert flow.stats.breaker["c"] == "open"
    clock.now += 3000
    probe = await gate.acquire(reserve_ms=0, lease_ms=1000)
    assert probe.admitted and probe.probe
    assert flow.stats.breaker["c"] == "half-open"
    held = await gate.acquire(reserve_ms=0, lease_ms=1000)
    assert (held.admitted, held.reason) == (False, "circuit-probing")
    await gate.settle(probe, status=200, headers={}, error_code=None)
    assert (await gate.acquire(reserve_ms=0, lease_ms=1000)).admitted
    assert flow.stats.breaker["c"] == "closed"


async def test_given_a_5xx_counts_for_the_breaker_and_a_4xx_does_not() -> None:
    clock = Clock()
    flow = Flow(MemoryStore(clock.now_ms), Keys("bull", "q"), now_ms=clock.now_ms)
    gate = gate_of(flow, circuitBreaker={"failures": 1})
    grant = await gate.acquire(reserve_ms=0, lease_ms=1000)
    await gate.settle(grant, status=404, headers={}, error_code="HTTP_ERROR")
    grant = await gate.acquire(reserve_ms=0, lease_ms=1000)
    assert grant.admitted
    await gate.settle(grant, status=502, headers={}, error_code="HTTP_ERROR")
    assert not (await gate.acquire(reserve_ms=0, lease_ms=1000)).admitted


# --- what the metrics read -------------------------------------------------------------------


def test_flow_stats_are_exported_per_connection_and_reason() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from runner.flow.stats import FlowStats
    from runner.telemetry import SdkTelemetry

    reader = InMemoryMetricReader()
    tel = SdkTelemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), "q")
    stats = FlowStats()
    tel.bind_flow(stats)
    stats.waited("crm", "rate", 250)
    stats.waited("crm", "rate", 50)
    stats.adapted("crm", "pause")
    stats.breaker_seen("desk", "open")
    data = reader.get_metrics_data()
    assert data is not None
    found = {
        m.name: [(dict(p.attributes or {}), p.value) for p in m.data.data_points]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    crm_rate = {"workflow.connection": "crm", "workflow.flow.reason": "rate"}
    assert found["workflow.flow.wait"] == [(crm_rate, 300)]
    assert found["workflow.flow.waits"] == [(crm_rate, 2)]
    assert found["workflow.flow.adaptations"] == [
        ({"workflow.connection": "crm", "workflow.flow.adaptation": "pause"}, 1)
    ]
    assert found["workflow.flow.breaker.state"] == [({"workflow.connection": "desk"}, 2)]


async def test_given_a_probe_that_is_abandoned_then_the_next_request_may_probe_at_once() -> None:
    clock = Clock()
    flow = Flow(MemoryStore(clock.now_ms), Keys("bull", "q"), now_ms=clock.now_ms)
    gate = gate_of(flow, circuitBreaker={"failures": 1, "coolDownMs": 1000})
    grant = await gate.acquire(reserve_ms=0, lease_ms=30_000)
    await gate.settle(grant, status=None, headers=None, error_code="TIMEOUT")
    clock.now += 1000
    probe = await gate.acquire(reserve_ms=0, lease_ms=30_000)
    assert probe.probe
    gate.abandon(probe)
    await asyncio.sleep(0)
    again = await gate.acquire(reserve_ms=0, lease_ms=30_000)
    assert again.admitted and again.probe
