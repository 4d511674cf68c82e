"""The in-memory twin of ``RedisStore``: the same answers as the Lua scripts, for one process,
on an injected clock. Tests and dry runs use it; ``tests/integration/test_flow_scripts.py``
holds the two to the same answers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.engine.ports import Grant
from runner.flow import gcra
from runner.flow.gcra import BreakerState, ScopeState
from runner.flow.limits import Acquire, GateKeys, Reading, Settle


@dataclass
class MemoryStore:
    now_ms: Callable[[], int]
    scopes: dict[str, ScopeState] = field(default_factory=dict)
    leases: dict[str, dict[str, int]] = field(default_factory=dict)
    tenants: dict[str, dict[str, int]] = field(default_factory=dict)
    breakers: dict[str, BreakerState] = field(default_factory=dict)

    def _scope(self, key: str) -> ScopeState:
        return self.scopes.setdefault(key, ScopeState())

    def _full(self, key: str, limit: int, now: int) -> bool:
        if limit <= 0:
            return False
        held = self.leases.setdefault(key, {})
        for lease, expires in list(held.items()):
            if expires <= now:
                del held[lease]
        return len(held) >= limit

    async def acquire(self, ask: Acquire) -> Grant:
        now = self.now_ms()
        p, k = ask.policy, ask.keys
        probe = False
        failures = 0
        if p.breaker is not None:
            b = self.breakers.setdefault(k.breaker, BreakerState())
            failures = b.failures
            state, wait = gcra.breaker_gate(b, now)
            if state == "open":
                return Grant(
                    False, wait, "circuit-open", token=Reading(ask.lease_id, 1.0, failures)
                )
            if state == "probing":
                return Grant(
                    False, wait, "circuit-probing", token=Reading(ask.lease_id, 1.0, failures)
                )
            probe = state == "probe"
        share = 1
        if p.tenant_scoped and p.fair_share:
            seen = self.tenants.setdefault(k.tenants, {})
            seen[ask.tenant_id] = now
            for tenant, at in list(seen.items()):
                if at <= now - p.active_window_ms:
                    del seen[tenant]
            share = len(seen)
        reading = Reading(ask.lease_id, 1.0, failures)
        if self._full(k.connection_leases, p.max_concurrency, now):
            return Grant(False, -1, "concurrency", token=reading)
        if p.tenant_scoped and self._full(k.tenant_leases, p.tenant_max_concurrency, now):
            return Grant(False, -1, "tenant-concurrency", token=reading)
        cs = self._scope(k.connection)
        reading = Reading(ask.lease_id, cs.factor, failures)
        tc = gcra.interval_ms(p.rate.interval_ms if p.rate else 0.0, cs, now)
        start = gcra.earliest_start(cs, tc, p.rate.burst if p.rate else 1, now)
        reason = "paused" if cs.pause_until > now and cs.pause_until >= start else "rate"
        ts, tt = None, 0.0
        if p.tenant_scoped:
            ts = self._scope(k.tenant)
            tt = gcra.interval_ms(p.tenant_rate.interval_ms if p.tenant_rate else 0.0, ts, now)
            if share > 1 and tc * share > tt:
                tt = tc * share
            burst = p.tenant_rate.burst if p.tenant_rate else (p.rate.burst if p.rate else 1)
            st = gcra.earliest_start(ts, tt, burst, now)
            if st > start:
                start = st
                reason = (
                    "paused" if ts.pause_until > now and ts.pause_until >= st else "tenant-rate"
                )
        wait = math.ceil(start - now)
        if wait > ask.reserve_ms:
            return Grant(False, wait, reason, token=reading)
        if tc > 0:
            gcra.take(cs, start, tc)
        if ts is not None and tt > 0:
            gcra.take(ts, start, tt)
        expires = now + wait + ask.lease_ms
        if p.max_concurrency:
            self.leases.setdefault(k.connection_leases, {})[ask.lease_id] = expires
        if p.tenant_scoped and p.tenant_max_concurrency:
            self.leases.setdefault(k.tenant_leases, {})[ask.lease_id] = expires
        if probe:
            self.breakers[k.breaker].probe_until = expires
        return Grant(True, wait, reason, probe, reading)

    async def settle(self, outcome: Settle) -> None:
        now = self.now_ms()
        k, p = outcome.keys, outcome.policy
        if outcome.release:
            self.leases.get(k.connection_leases, {}).pop(outcome.lease_id, None)
            if p.tenant_scoped:
                self.leases.get(k.tenant_leases, {}).pop(outcome.lease_id, None)
        b = p.breaker
        if outcome.breaker == "fail" and b is not None:
            gcra.breaker_failed(
                self.breakers.setdefault(k.breaker, BreakerState()),
                now,
                failures=b.failures,
                window_ms=b.window_ms,
                cool_down_ms=b.cool_down_ms,
                probe=outcome.probe,
            )
        elif outcome.breaker == "ok":
            self.breakers.pop(k.breaker, None)
        elif outcome.breaker == "drop" and k.breaker in self.breakers:
            self.breakers[k.breaker].probe_until = 0
        if outcome.pause_ms or outcome.interval_ms or outcome.back_off or outcome.recover:
            self._adapt(self._scope(k.connection), outcome, now)
            if p.tenant_scoped:
                self._adapt(self._scope(k.tenant), outcome, now)

    async def paused_ms(self, keys: GateKeys, tenant_scoped: bool) -> int:
        now = self.now_ms()
        until = self._scope(keys.connection).pause_until
        if tenant_scoped:
            until = max(until, self._scope(keys.tenant).pause_until)
        return max(0, until - now)

    def _adapt(self, s: ScopeState, o: Settle, now: int) -> None:
        if o.pause_ms and now + o.pause_ms > s.pause_until:
            s.pause_until = now + o.pause_ms
        if o.interval_ms:
            s.override_interval_ms, s.override_until = o.interval_ms, now + o.lasts_ms
        if o.back_off and now - s.cut_at >= gcra.DECREASE_EVERY_MS:
            s.factor, s.cut_at = gcra.decreased(s.factor), now
        elif o.recover and s.factor < 1:
            s.factor = gcra.recovered(s.factor)
