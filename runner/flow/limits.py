"""The engine's ``FlowControl``: a gate per step's connection, tenant and base URL, enforced
by a store: ``RedisStore`` (the Lua scripts of ``runner.flow.scripts``, batched with other
runs' calls into one round trip) or ``runner.flow.memory.MemoryStore`` (one process).

Round trips per attempt: none for a connection without limits (``gate`` returns None); one
``ACQUIRE`` for one with limits; one ``SETTLE`` more only when there is something to write
(a lease to release, a failure for the breaker, a budget the API announced, a factor to
restore).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.contract import Connection, ConnectionConfig
from runner.engine.ports import FlowGate, Grant
from runner.flow.hints import budget_hint
from runner.flow.policy import Defaults, Policy, policy_of
from runner.flow.stats import FlowStats
from runner.log import log
from runner.queue.keys import Keys

_BREAKER_CODES = frozenset({"TIMEOUT", "CONNECTION_ERROR"})
FAIR_RESERVE_MIN_MS = 50
"""With fair share, how far ahead a place may be reserved: two intervals (times the burst), at
least this."""


@dataclass(frozen=True, slots=True)
class GateKeys:
    connection: str
    connection_leases: str
    tenant: str
    tenant_leases: str
    tenants: str
    breaker: str

    def all(self) -> tuple[str, ...]:
        return (
            self.connection,
            self.connection_leases,
            self.tenant,
            self.tenant_leases,
            self.tenants,
            self.breaker,
        )


@dataclass(frozen=True, slots=True)
class Acquire:
    keys: GateKeys
    policy: Policy
    tenant_id: str
    reserve_ms: int
    lease_id: str
    lease_ms: int


@dataclass(frozen=True, slots=True)
class Settle:
    keys: GateKeys
    policy: Policy
    lease_id: str
    release: bool
    breaker: str  # "ok", "fail", "drop" (a probe that was not sent) or "-"
    probe: bool
    pause_ms: int = 0
    interval_ms: float = 0.0
    lasts_ms: int = 0
    back_off: bool = False
    recover: bool = False


@dataclass(frozen=True, slots=True)
class Reading:
    """What ``ACQUIRE`` read besides its answer, for deciding whether to ``SETTLE``."""

    lease_id: str
    factor: float
    breaker_failures: int


class Store(Protocol):
    async def acquire(self, ask: Acquire) -> Grant: ...
    async def settle(self, outcome: Settle) -> None: ...
    async def paused_ms(self, keys: GateKeys, tenant_scoped: bool) -> int: ...


class Gate:
    __slots__ = ("_name", "base_url", "control", "keys", "policy", "tenant_id")

    def __init__(
        self,
        control: Flow,
        name: str,
        policy: Policy,
        keys: GateKeys,
        tenant_id: str,
        base_url: str,
    ) -> None:
        self.control = control
        self._name = name
        self.policy = policy
        self.keys = keys
        self.tenant_id = tenant_id
        self.base_url = base_url

    @property
    def name(self) -> str:
        return self._name

    @property
    def fail_fast(self) -> bool:
        return self.policy.breaker is not None and self.policy.breaker.fail_fast

    async def acquire(self, *, reserve_ms: int, lease_ms: int) -> Grant:
        p = self.policy
        if p.fair_share and p.rate is not None:
            # Shared fairly, a place is reserved only just ahead: a flood reserving seconds
            # ahead would hold every place a tenant arriving later could take.
            reserve_ms = min(
                reserve_ms, max(FAIR_RESERVE_MIN_MS, round(2 * p.rate.interval_ms * p.rate.burst))
            )
        ask = Acquire(
            self.keys, self.policy, self.tenant_id, reserve_ms, os.urandom(8).hex(), lease_ms
        )
        try:
            grant = await self.control.store.acquire(ask)
        except Exception as err:
            # Redis unreachable past the batch's outage: the step goes on unlimited rather
            # than failing on the runner's own trouble (the API's 429s still slow it down).
            log.warning("flow.acquire_failed", connection=self._name, error=type(err).__name__)
            return Grant(True, 0, "unavailable")
        if self.policy.breaker is not None:
            state = "closed"
            if grant.reason == "circuit-open":
                state = "open"
            elif grant.reason == "circuit-probing" or grant.probe:
                state = "half-open"
            self.control.stats.breaker_seen(self._name, state)
        return grant

    async def settle(
        self,
        grant: Grant,
        *,
        status: int | None,
        headers: Mapping[str, str] | None,
        error_code: str | None,
    ) -> None:
        outcome = self._outcome(grant, status, headers, error_code)
        if outcome is None:
            return
        try:
            await self.control.store.settle(outcome)
        except Exception as err:  # the lease expires on its own; the next answer teaches again
            log.warning("flow.settle_failed", connection=self._name, error=type(err).__name__)

    async def paused_ms(self) -> int:
        if not (self.policy.rate or self.policy.tenant_scoped):
            return 0
        try:
            return await self.control.store.paused_ms(self.keys, self.policy.tenant_scoped)
        except Exception:
            return 0

    def abandon(self, grant: Grant) -> None:
        reading = grant.token
        if not isinstance(reading, Reading) or not (self._leased() or grant.probe):
            return
        # A probe that never went out gives its turn back at once, not when its lease ends.
        breaker = "drop" if grant.probe else "-"
        outcome = Settle(self.keys, self.policy, reading.lease_id, self._leased(), breaker, False)
        self.control.spawn(self.control.store.settle(outcome))

    def _leased(self) -> bool:
        p = self.policy
        return bool(p.max_concurrency or p.tenant_max_concurrency)

    def _outcome(
        self,
        grant: Grant,
        status: int | None,
        headers: Mapping[str, str] | None,
        error_code: str | None,
    ) -> Settle | None:
        reading = grant.token
        if not isinstance(reading, Reading):
            return None
        p = self.policy
        breaker = "-"
        if p.breaker is not None:
            failed = error_code in _BREAKER_CODES or (status is not None and status >= 500)
            if failed:
                breaker = "fail"
            elif (grant.probe or reading.breaker_failures) and status is not None:
                breaker = "ok"
        hint = None
        if status is not None and headers is not None and (p.rate or p.tenant_scoped):
            hint = budget_hint(status, headers, self.control.now_ms())
        pause_ms = interval_ms = lasts_ms = 0
        back_off = recover = False
        if hint is not None:
            pause_ms, back_off = hint.pause_ms, hint.back_off
            base = p.rate.interval_ms / reading.factor if p.rate else 0.0
            if hint.interval_ms > base:
                interval_ms, lasts_ms = hint.interval_ms, hint.lasts_ms  # type: ignore[assignment]
            recover = not hint.any and reading.factor < 1 and 200 <= (status or 0) < 400
        release = self._leased()
        if not (release or breaker != "-" or pause_ms or interval_ms or back_off or recover):
            return None
        if pause_ms or interval_ms or back_off:
            self.control.stats.adapted(
                self._name, "pause" if pause_ms else "lower" if interval_ms else "back-off"
            )
        return Settle(
            self.keys,
            p,
            reading.lease_id,
            release,
            breaker,
            grant.probe,
            pause_ms,
            interval_ms,
            lasts_ms,
            back_off,
            recover,
        )


@dataclass
class Flow:
    """The ``FlowControl`` the composition root hands the engine."""

    store: Store
    keys: Keys
    defaults: Defaults = field(default_factory=Defaults)
    stats: FlowStats = field(default_factory=FlowStats)
    now_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000))
    _policies: dict[ConnectionConfig, Policy] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def gate(self, connection: Connection, tenant_id: str, base_url: str) -> FlowGate | None:
        # Cached by the config's value (a frozen Struct): a run's resolved connections are new
        # objects each time, with the same config.
        cache_key = connection.config
        policy = self._policies.get(cache_key)
        if policy is None:
            if len(self._policies) > 10_000:
                self._policies.clear()
            policy = self._policies[cache_key] = policy_of(connection, self.defaults)
        if not policy.any:
            return None
        k = self.keys
        scope = k.flow(connection.id)
        tenant = k.flow_tenant(connection.id, tenant_id)
        keys = GateKeys(
            scope,
            f"{scope}:leases",
            tenant,
            f"{tenant}:leases",
            f"{scope}:tenants",
            k.breaker(base_url),
        )
        return Gate(self, connection.id, policy, keys, tenant_id, base_url)

    def waited(self, gate: FlowGate, reason: str, wait_ms: int) -> None:
        self.stats.waited(gate.name, reason, wait_ms)

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def acquire_args(ask: Acquire, now_ms: int = 0) -> list[str | int]:
    p = ask.policy
    return [
        now_ms,
        ask.reserve_ms,
        ask.lease_id,
        ask.lease_ms,
        ask.tenant_id,
        repr(p.rate.interval_ms) if p.rate else 0,
        p.rate.burst if p.rate else 1,
        p.max_concurrency,
        repr(p.tenant_rate.interval_ms) if p.tenant_rate else 0,
        p.tenant_rate.burst if p.tenant_rate else (p.rate.burst if p.rate else 1),
        p.tenant_max_concurrency,
        1 if p.fair_share else 0,
        p.active_window_ms,
        1 if p.tenant_scoped else 0,
        1 if p.breaker else 0,
    ]


def settle_args(s: Settle, now_ms: int = 0) -> list[str | int]:
    b = s.policy.breaker
    return [
        now_ms,
        s.lease_id,
        1 if s.release else 0,
        1 if s.policy.tenant_scoped else 0,
        s.breaker,
        1 if s.probe else 0,
        b.failures if b else 0,
        b.window_ms if b else 0,
        b.cool_down_ms if b else 0,
        s.pause_ms,
        repr(float(s.interval_ms)),
        s.lasts_ms,
        1 if s.back_off else 0,
        1 if s.recover else 0,
    ]


def grant_of(reply: Sequence[Any], lease_id: str) -> Grant:
    admitted, wait, reason, probe, factor, failures = reply
    text = reason.decode() if isinstance(reason, bytes) else str(reason)
    factor_text = factor.decode() if isinstance(factor, bytes) else str(factor)
    return Grant(
        bool(admitted),
        int(wait),
        text,
        bool(probe),
        Reading(lease_id, float(factor_text), int(failures)),
    )
