"""Which limits apply to a connection: its ``config`` (CONTRACT: "Flow control"), else the
runner's defaults (``RUNNER_RATE_LIMIT``, ``RUNNER_MAX_CONCURRENCY_PER_CONNECTION``,
``RUNNER_CIRCUIT_BREAKER``). Resolved once per connection and cached by the flow control."""

from __future__ import annotations

from dataclasses import dataclass

from runner.contract import CircuitBreaker, Connection, RateLimit
from runner.flow.gcra import Rate


@dataclass(frozen=True, slots=True)
class Breaker:
    failures: int
    window_ms: int
    cool_down_ms: int
    fail_fast: bool


@dataclass(frozen=True, slots=True)
class Policy:
    rate: Rate | None = None
    max_concurrency: int = 0
    tenant_rate: Rate | None = None
    tenant_max_concurrency: int = 0
    fair_share: bool = False
    active_window_ms: int = 10_000
    breaker: Breaker | None = None

    @property
    def tenant_scoped(self) -> bool:
        return bool(self.tenant_rate or self.tenant_max_concurrency or self.fair_share)

    @property
    def any(self) -> bool:
        return bool(self.rate or self.max_concurrency or self.tenant_scoped or self.breaker)


@dataclass(frozen=True, slots=True)
class Defaults:
    """The runner-wide defaults, for connections whose config sets none of their own."""

    rate_limit: RateLimit | None = None
    max_concurrency: int = 0
    breaker: CircuitBreaker | None = None

    @classmethod
    def parse(cls, rate_limit: str, max_concurrency: int, breaker: str) -> Defaults:
        """From the settings' text; a bad value stops the process naming the variable."""
        return cls(
            _rate_setting(rate_limit) if rate_limit else None,
            max_concurrency,
            _breaker_setting(breaker) if breaker else None,
        )


def policy_of(connection: Connection, defaults: Defaults) -> Policy:
    config = connection.config
    rate_limit = config.rate_limit or defaults.rate_limit
    tenant = config.tenant_limits
    breaker = config.circuit_breaker or defaults.breaker
    return Policy(
        rate=_rate(rate_limit),
        max_concurrency=config.max_concurrency or defaults.max_concurrency,
        tenant_rate=_rate(tenant.rate_limit) if tenant else None,
        tenant_max_concurrency=(tenant.max_concurrency or 0) if tenant else 0,
        fair_share=bool(tenant and tenant.fair_share and rate_limit),
        active_window_ms=tenant.active_window_ms if tenant else 10_000,
        breaker=Breaker(
            breaker.failures, breaker.window_ms, breaker.cool_down_ms, breaker.when_open == "FAIL"
        )
        if breaker
        else None,
    )


def _rate(limit: RateLimit | None) -> Rate | None:
    return Rate.of(limit.requests, limit.per_ms, limit.burst) if limit else None


def _rate_setting(text: str) -> RateLimit:
    parts = text.split("/")
    try:
        numbers = [int(p) for p in parts]
        if len(numbers) not in (2, 3) or min(numbers) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"RUNNER_RATE_LIMIT: expected requests/perMs[/burst] of whole numbers >= 1, got {text!r}"
        ) from None
    return RateLimit(
        requests=numbers[0], per_ms=numbers[1], burst=numbers[2] if len(numbers) == 3 else 1
    )


def _breaker_setting(text: str) -> CircuitBreaker:
    parts = text.split("/")
    when = parts.pop() if parts and parts[-1].upper() in ("WAIT", "FAIL") else "WAIT"
    try:
        numbers = [int(p) for p in parts]
        if len(numbers) != 3 or min(numbers) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(
            "RUNNER_CIRCUIT_BREAKER: expected failures/windowMs/coolDownMs[/WAIT|FAIL] of whole"
            f" numbers >= 1, got {text!r}"
        ) from None
    return CircuitBreaker(
        failures=numbers[0],
        window_ms=numbers[1],
        cool_down_ms=numbers[2],
        when_open="FAIL" if when.upper() == "FAIL" else "WAIT",
    )
