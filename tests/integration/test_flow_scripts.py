"""runner.flow's Lua scripts on a real Redis, held to the in-memory twin's answers: the same
questions at the same (given) times get the same grants, for rates, bursts, pauses, the
adaptive factor, leases, fair share and the breaker. Keys carry a hash tag, as on a Cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from runner.contract import decode_workflow_version
from runner.engine.ports import Grant
from runner.flow.limits import Acquire, Flow, Reading, Settle, acquire_args, grant_of, settle_args
from runner.flow.memory import MemoryStore
from runner.flow.scripts import ACQUIRE, SETTLE
from runner.queue.keys import Keys
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration
T0 = 1_795_608_000_000


class Clock:
    now = T0

    def now_ms(self) -> int:
        return self.now


class TimedRedisStore:
    """The Lua scripts with ``now`` given, so both stores see the same clock."""

    def __init__(self, client: aioredis.Redis, clock: Clock) -> None:
        self.client = client
        self.clock = clock

    async def acquire(self, ask: Acquire) -> Grant:
        keys = ask.keys.all()
        reply = await self.client.eval(
            ACQUIRE.text, len(keys), *keys, *acquire_args(ask, self.clock.now)
        )
        return grant_of(reply, ask.lease_id)

    async def settle(self, outcome: Settle) -> None:
        keys = outcome.keys.all()
        await self.client.eval(SETTLE.text, len(keys), *keys, *settle_args(outcome, self.clock.now))


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    tag = f"{{t-{uuid.uuid4().hex[:8]}}}"
    yield tag
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{tag}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def connection(config: dict[str, Any]) -> Any:
    raw = {
        "id": "v",
        "graph": {"steps": []},
        "connections": {"c": {"id": "c", "type": "NONE", "config": config}},
    }
    return decode_workflow_version(raw).connections["c"]


def same(a: Grant, b: Grant) -> tuple[Any, ...]:
    assert isinstance(a.token, Reading) and isinstance(b.token, Reading)
    assert (a.admitted, a.wait_ms, a.reason, a.probe) == (b.admitted, b.wait_ms, b.reason, b.probe)
    assert a.token.factor == pytest.approx(b.token.factor)
    return (a.admitted, a.wait_ms, a.reason)


async def replay(prefix: str, config: dict[str, Any], script: list[tuple[Any, ...]]) -> list[Any]:
    """Run the script of (ms, tenant, what, ...) on both stores; the grants must agree."""
    clock = Clock()
    client = aioredis.Redis.from_url(REDIS_URL)
    flows = [
        Flow(MemoryStore(clock.now_ms), Keys(prefix, "q"), now_ms=clock.now_ms),
        Flow(TimedRedisStore(client, clock), Keys(prefix, "q"), now_ms=clock.now_ms),
    ]
    conn = connection(config)
    seen: list[Any] = []
    held: dict[str, tuple[Grant, Grant]] = {}
    try:
        for at, tenant, what, *rest in script:
            clock.now = T0 + at
            gates = [f.gate(conn, tenant, "http://api") for f in flows]
            assert gates[0] is not None and gates[1] is not None
            if what == "ask":
                reserve = rest[0] if rest else 5000
                grants = [await g.acquire(reserve_ms=reserve, lease_ms=1000) for g in gates]
                seen.append(same(*grants))
                held[f"{tenant}{at}{len(seen)}"] = (grants[0], grants[1])
                if grants[0].admitted:
                    held["last"] = (grants[0], grants[1])
            elif what == "drop":
                for gate, grant in zip(gates, held["last"], strict=True):
                    gate.abandon(grant)
                await asyncio.sleep(0.05)  # the release goes in the background
            else:
                status, headers, code = rest
                for gate, grant in zip(gates, held["last"], strict=True):
                    await gate.settle(grant, status=status, headers=headers, error_code=code)
    finally:
        await client.aclose()
    return seen


async def test_rate_and_burst_agree(prefix: str) -> None:
    config = {"rateLimit": {"requests": 20, "perMs": 1000, "burst": 3}}
    script = [(0, "t", "ask")] * 6 + [(120, "t", "ask"), (500, "t", "ask", 10)]
    seen = await replay(prefix, config, script)
    assert [w for _, w, _ in seen[:6]] == [0, 0, 0, 50, 100, 150]


async def test_pause_and_override_from_headers_agree(prefix: str) -> None:
    config = {"rateLimit": {"requests": 100, "perMs": 1000}}
    script = [
        (0, "t", "ask"),
        (0, "t", "tell", 429, {"retry-after": "2"}, "HTTP_ERROR"),
        (10, "t", "ask"),
        (10, "t", "ask", 1000),
        (3000, "t", "ask"),
        (3000, "t", "tell", 200, {"ratelimit-remaining": "4", "ratelimit-reset": "20"}, None),
        (3000, "t", "ask"),
        (3001, "t", "ask"),
    ]
    seen = await replay(prefix, config, script)
    assert seen[1] == (True, 1990, "paused")
    assert seen[2][:2] == (False, 2000)  # behind the reservation made at the pause's end
    assert seen[5][1] == 5009  # the API said 4 in 20 s: 5 s apart, after the one at 3010


async def test_back_off_and_recovery_agree(prefix: str) -> None:
    config = {"rateLimit": {"requests": 10, "perMs": 1000}}
    script: list[tuple[Any, ...]] = [
        (0, "t", "ask"),
        (0, "t", "tell", 429, {}, "HTTP_ERROR"),
        (0, "t", "ask", 60_000),
        (1000, "t", "tell", 429, {}, "HTTP_ERROR"),
        (1000, "t", "ask", 60_000),
    ]
    for i in range(5):
        script += [
            (2000 + i * 500, "t", "ask", 60_000),
            (2000 + i * 500, "t", "tell", 200, {}, None),
        ]
    script.append((9000, "t", "ask", 60_000))
    seen = await replay(prefix, config, script)
    assert seen[1][1] == 100  # the first request's interval; the next ones are twice as far


async def test_leases_and_fair_share_agree(prefix: str) -> None:
    config = {
        "rateLimit": {"requests": 10, "perMs": 1000},
        "maxConcurrency": 2,
        "tenantLimits": {"maxConcurrency": 1, "fairShare": True},
    }
    script = [
        (0, "A", "ask", 0),
        (0, "A", "ask", 0),
        (0, "B", "ask", 0),
        (0, "C", "ask", 0),
        (100, "B", "tell", 200, {}, None),
        (250, "C", "ask", 0),
        (1500, "A", "ask", 0),
    ]
    seen = await replay(prefix, config, script)
    assert seen[1] == (False, -1, "tenant-concurrency")
    assert seen[2] == (False, 100, "rate")


async def test_breaker_agrees(prefix: str) -> None:
    config = {"circuitBreaker": {"failures": 2, "windowMs": 1000, "coolDownMs": 3000}}
    script = [
        (0, "t", "ask"),
        (0, "t", "tell", None, None, "CONNECTION_ERROR"),
        (10, "t", "ask"),
        (10, "t", "tell", 503, {}, "HTTP_ERROR"),
        (20, "t", "ask"),
        (3010, "t", "ask"),
        (3020, "t", "ask"),
        (3030, "t", "tell", 200, {}, None),
        (3040, "t", "ask"),
    ]
    seen = await replay(prefix, config, script)
    assert seen[2] == (False, 2990, "circuit-open")
    assert seen[3][0] is True
    assert seen[4][2] == "circuit-probing"
    assert seen[5] == (True, 0, "rate")


async def test_the_scripts_run_on_redis_time_when_no_time_is_given(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [f"{prefix}:q:flow:c{i}" for i in range(6)]
        reply = await client.eval(
            ACQUIRE.text, 6, *keys, 0, 5000, "l1", 1000, "t", "100.0", 1, 0, 0, 1, 0, 0, 1, 0, 0
        )
        assert reply[0] == 1
        assert float(await client.hget(keys[0], "tat")) > T0 - 10**12  # an epoch time in ms
    finally:
        await client.aclose()


async def test_the_pause_check_agrees(prefix: str) -> None:
    clock = Clock()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        stores = [MemoryStore(clock.now_ms), TimedRedisStore(client, clock)]
        conn = connection({"rateLimit": {"requests": 10, "perMs": 1000}})
        flows = [Flow(s, Keys(prefix, "q"), now_ms=clock.now_ms) for s in stores]  # type: ignore[arg-type]
        gates = [f.gate(conn, "t", "http://api") for f in flows]
        for gate in gates:
            assert gate is not None
            grant = await gate.acquire(reserve_ms=5000, lease_ms=1000)
            await gate.settle(grant, status=429, headers={"retry-after": "3"}, error_code=None)
        clock.now += 1000
        memory = await stores[0].paused_ms(gates[0].keys, False)  # type: ignore[union-attr]
        keys = gates[1].keys.all()  # type: ignore[union-attr]
        from runner.flow.scripts import PAUSED

        in_redis = await client.eval(PAUSED.text, len(keys), *keys, clock.now, 0)
        assert memory == in_redis == 2000
    finally:
        await client.aclose()


async def test_an_abandoned_probe_gives_its_turn_back_in_both(prefix: str) -> None:
    config = {"circuitBreaker": {"failures": 1, "coolDownMs": 1000}}
    script = [
        (0, "t", "ask"),
        (0, "t", "tell", None, None, "TIMEOUT"),
        (1000, "t", "ask"),
        (1000, "t", "drop"),
        (1001, "t", "ask"),
    ]
    seen = await replay(prefix, config, script)
    assert seen[1][0] is True and seen[2][0] is True
