"""The arithmetic of flow control, pure: GCRA reservations, the adaptive factor, the breaker.

``runner.flow.scripts`` runs the same arithmetic inside Redis (one Lua call per attempt, on
Redis's clock, so every runner shares it); ``runner.flow.memory`` runs it here, on an injected
clock, for tests and dry runs. The tests hold the two to the same answers.

GCRA (generic cell rate algorithm), per scope (a connection, or a connection and a tenant)::

    interval  T   = perMs / requests / factor      (ms between requests on average)
    tolerance tau = T * (burst - 1)                (how far ahead of the average a burst may go)
    a request at ``now`` may start at s = max(now, pause_until, tat - tau);
    taking it moves the theoretical arrival time on: tat = max(tat, s) + T

One scope's ``s`` is the latest of all its scopes' (connection and tenant): the request takes
its place in every one of them at once. A caller reserves only when ``s - now`` is within its
reserve horizon; otherwise nothing changes and it is told how long to wait.

Adaptive factor (AIMD): a 429 that says nothing about the budget halves the factor (at least
``MIN_FACTOR``); each success adds ``RECOVERY_STEP`` back, up to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_FACTOR = 1 / 16
"""The adaptive factor never goes below this: a budget backs off to a sixteenth, no lower."""
DECREASE = 0.5
DECREASE_EVERY_MS = 1_000
"""At most one decrease a second: a hundred requests in flight that all meet the same 429 are
one signal, not a hundred."""
RECOVERY_STEP = 0.05
"""Twenty successes bring a halved budget back to whole."""


@dataclass(frozen=True, slots=True)
class Rate:
    """A scope's configured rate, as GCRA reads it."""

    interval_ms: float
    burst: int = 1

    @classmethod
    def of(cls, requests: int, per_ms: int, burst: int = 1) -> Rate:
        if requests < 1 or per_ms < 1 or burst < 1:
            raise ValueError("requests, perMs and burst must be at least 1")
        return cls(per_ms / requests, burst)


@dataclass(slots=True)
class ScopeState:
    """What Redis keeps per scope (the fields of its hash)."""

    tat: float = 0.0
    pause_until: int = 0
    factor: float = 1.0
    override_interval_ms: float = 0.0
    override_until: int = 0
    cut_at: int = 0
    """When the factor was last decreased."""


def interval_ms(base_ms: float, state: ScopeState, now: int) -> float:
    """The scope's effective interval now: the configured one (0: none) divided by the
    adaptive factor, never shorter than an API's own budget while that lasts."""
    t = base_ms / state.factor if base_ms > 0 else 0.0
    if state.override_until > now:
        t = max(t, state.override_interval_ms)
    return t


def earliest_start(state: ScopeState, t: float, burst: int, now: int) -> float:
    """When a request asked at ``now`` may start in this scope of interval ``t``."""
    start = max(float(now), float(state.pause_until))
    if t > 0:
        start = max(start, state.tat - t * (burst - 1))
    return start


def take(state: ScopeState, start: float, t: float) -> None:
    """Reserve the slot at ``start`` in this scope."""
    if t > 0:
        state.tat = max(state.tat, start) + t


def wait_ms(start: float, now: int) -> int:
    """Whole milliseconds from ``now`` to ``start``, rounded up: never start early."""
    return max(0, math.ceil(start - now))


def decreased(factor: float) -> float:
    return max(MIN_FACTOR, factor * DECREASE)


def recovered(factor: float) -> float:
    return min(1.0, factor + RECOVERY_STEP)


# --- the circuit breaker ---------------------------------------------------------------------


@dataclass(slots=True)
class BreakerState:
    failures: int = 0
    first_failure_at: int = 0
    open_until: int = 0
    probe_until: int = 0


def breaker_gate(state: BreakerState, now: int) -> tuple[str, int]:
    """("closed" | "probe" | "open" | "probing", wait_ms): may a request go now? "probe" means
    it may, as the one half-open probe; "open" and "probing" say how long to wait."""
    if state.open_until == 0:
        return "closed", 0
    if now < state.open_until:
        return "open", state.open_until - now
    if state.probe_until > now:
        return "probing", state.probe_until - now
    return "probe", 0


def breaker_failed(
    state: BreakerState, now: int, *, failures: int, window_ms: int, cool_down_ms: int, probe: bool
) -> None:
    """A connect error, timeout or 5xx. A failed probe opens the breaker again at once."""
    if probe or state.open_until:
        state.open_until, state.probe_until, state.failures = now + cool_down_ms, 0, 0
        return
    if state.failures == 0 or now - state.first_failure_at > window_ms:
        state.failures, state.first_failure_at = 1, now
    else:
        state.failures += 1
    if state.failures >= failures:
        state.open_until, state.failures = now + cool_down_ms, 0


def breaker_succeeded(state: BreakerState) -> None:
    """Any answer that is not a failure closes the breaker (the probe's included) and resets
    the count: the failures must be consecutive."""
    state.failures = state.first_failure_at = state.open_until = state.probe_until = 0
