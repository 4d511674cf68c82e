"""The retry policy of a step: the policy itself, backoff, classification, Retry-After, decisions.

Pure: no I/O and no clock. The caller passes ``now_ms``, the run's deadline and a ``random``
(``() -> float`` in [0, 1)), and receives a ``RetryDecision`` saying whether to wait and for how
long; it does the sleeping itself.

The policy comes from the Action (``retryStrategy``, ``maxAttempts``, ``initialDelayMs``,
``maxDelayMs``), each field overridable by the step's ``retry`` (``policy_for``).

Is a failed attempt retried? (``is_retryable``; the first row that matches wins)

====  =========================================================  ========================
 #    the error                                                  retried?
====  =========================================================  ========================
 1    code ``CANCELED`` or ``WORKFLOW_TIMEOUT``                  never, whatever its flag
 2    raised with ``retryable=True`` (e.g. the OAuth2 token      yes
      endpoint answering 5xx, 429 or timing out: ``AuthError``)
 3    code ``TIMEOUT`` or ``CONNECTION_ERROR``                   yes
 4    code ``HTTP_ERROR`` with status in ``RETRYABLE_STATUSES``  yes
      (408, 425, 429, 500, 502, 503, 504)
 5    anything else: another status, ``TEMPLATE_ERROR``,         no: fails at once
      ``SCHEMA_VALIDATION``, ``EGRESS_DENIED``, ``AUTH_FAILED``,
      ``RESPONSE_TOO_LARGE``, ``CIRCUIT_OPEN``, ...
====  =========================================================  ========================

Row 1 exists because those codes end the run, not the attempt: no flag may revive it.

How a retryable failure is decided (``decide``, in this order):

1. not retryable (table above)                            -> fail, ``not-retryable``
2. ``failed_attempt >= max_attempts`` (NONE means 1)       -> fail, ``exhausted``
3. status 429 or 503 with a Retry-After                   -> wait that long, clamped to
   ``max_delay_ms`` (``retry-after``); but if the server's own ask would end at or past the
   run's deadline, fail now (``deadline``): it said it will not serve us in time
4. otherwise                                              -> wait ``backoff_ms`` (``backoff``)
5. a wait that would end at or past the deadline           -> fail now (``deadline``), so no
   wait starts that cannot end before the deadline; the engine reports ``WORKFLOW_TIMEOUT``.

Backoff (``backoff_ms``), for the attempt ``n`` (1-based) that just failed::

    NONE         0
    FIXED        initial_delay_ms
    EXPONENTIAL  c = min(max_delay_ms, initial_delay_ms * 2 ** (n - 1))
                 delay = ceil(c / 2) + floor(random() * (floor(c / 2) + 1))   in [ceil(c/2), c]

That is "equal jitter": half the ceiling is always waited, so a retry storm is spread out yet
no retry fires at once. It is integer arithmetic with the exponent bounded by the bit length of
``max_delay_ms`` (past it the cap applies anyway), so ``n = 10_000`` neither overflows nor builds
a huge number (model: hynek/stamina ``_core.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

from runner.contract import Action, RetryOverride, RetryStrategy
from runner.errors import ErrorCode, RunnerError

__all__ = [
    "RETRYABLE_CODES",
    "RETRYABLE_STATUSES",
    "RETRY_AFTER_STATUSES",
    "RetryDecision",
    "RetryPolicy",
    "RetryReason",
    "backoff_ms",
    "decide",
    "is_retryable",
    "parse_retry_after_s",
    "policy_for",
]

RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP statuses that are transient by default (row 4 of the table)."""

RETRY_AFTER_STATUSES: frozenset[int] = frozenset({429, 503})
"""The statuses on which a Retry-After header replaces the computed backoff."""

RETRYABLE_CODES: frozenset[ErrorCode] = frozenset({ErrorCode.TIMEOUT, ErrorCode.CONNECTION_ERROR})
"""Error codes that are transient whatever their status (row 3 of the table)."""

_NEVER_RETRIED: frozenset[ErrorCode] = frozenset({ErrorCode.CANCELED, ErrorCode.WORKFLOW_TIMEOUT})

RetryReason = Literal["backoff", "retry-after", "exhausted", "not-retryable", "deadline"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A step's effective retry policy, after overrides and clamping (see ``policy_for``)."""

    strategy: RetryStrategy
    max_attempts: int
    """Total attempts including the first; at least 1, and exactly 1 for NONE."""
    initial_delay_ms: int
    """FIXED: every wait. EXPONENTIAL: the ceiling of the first wait. At least 0."""
    max_delay_ms: int
    """Cap on any wait, a server's Retry-After included. At least ``initial_delay_ms``."""


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt. ``message`` names codes and numbers, never secrets."""

    retry: bool
    delay_ms: int
    """How long to wait before the next attempt; 0 when not retrying."""
    reason: RetryReason
    message: str


def policy_for(action: Action, override: RetryOverride | None) -> RetryPolicy:
    """The Action's policy with the step's override applied field by field, then clamped."""
    strategy: RetryStrategy = action.retry_strategy
    max_attempts = action.max_attempts
    initial_delay_ms = action.initial_delay_ms
    max_delay_ms = action.max_delay_ms
    if override is not None:
        if override.retry_strategy is not None:
            strategy = override.retry_strategy
        if override.max_attempts is not None:
            max_attempts = override.max_attempts
        if override.initial_delay_ms is not None:
            initial_delay_ms = override.initial_delay_ms
        if override.max_delay_ms is not None:
            max_delay_ms = override.max_delay_ms
    # Definitions are user-edited: a silly value degrades to the nearest sane one rather than
    # failing a run that may never need a retry.
    max_attempts = 1 if strategy == "NONE" else max(1, max_attempts)
    initial_delay_ms = max(0, initial_delay_ms)
    max_delay_ms = max(initial_delay_ms, max_delay_ms)
    return RetryPolicy(strategy, max_attempts, initial_delay_ms, max_delay_ms)


def backoff_ms(policy: RetryPolicy, failed_attempt: int, random: Callable[[], float]) -> int:
    """The wait after attempt ``failed_attempt`` (1-based) failed; formula in the module doc."""
    if failed_attempt < 1:
        raise ValueError(f"failed_attempt is 1-based, got {failed_attempt}")
    if policy.strategy == "NONE":
        return 0
    if policy.strategy == "FIXED":
        return policy.initial_delay_ms
    # Once the shift reaches max_delay_ms's bit length, initial * 2**shift (initial >= 1)
    # exceeds the cap, so a larger exponent cannot change the result: bound it.
    shift = min(failed_attempt - 1, policy.max_delay_ms.bit_length())
    ceiling_ms = min(policy.max_delay_ms, policy.initial_delay_ms << shift)
    half_ms = ceiling_ms // 2
    # An injected random outside [0, 1) must not break the bounds.
    jitter_ms = int(min(max(random(), 0.0), 1.0) * (half_ms + 1))
    return min(ceiling_ms - half_ms + jitter_ms, ceiling_ms)


def parse_retry_after_s(value: str | None, now_ms: int) -> float | None:
    """A Retry-After header in seconds from ``now_ms``: delta-seconds or an HTTP-date.

    A date in the past gives 0.0. Anything else (empty, negative, fractional, junk) gives None,
    so the computed backoff applies. A date without a zone is read as GMT, as HTTP requires.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # float() and not int(): a thousand-digit value becomes inf instead of raising.
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_ms / 1000)


def is_retryable(error: RunnerError) -> bool:
    """The classification table of the module docstring, the one place it is decided."""
    if error.code in _NEVER_RETRIED:
        return False
    if error.retryable:
        return True
    if error.code in RETRYABLE_CODES:
        return True
    return error.code == ErrorCode.HTTP_ERROR and error.status in RETRYABLE_STATUSES


def decide(
    policy: RetryPolicy,
    failed_attempt: int,
    error: RunnerError,
    *,
    now_ms: int,
    deadline_ms: int | None,
    random: Callable[[], float],
) -> RetryDecision:
    """Whether, and after how long, to run attempt ``failed_attempt + 1``; order in module doc."""
    if failed_attempt < 1:
        raise ValueError(f"failed_attempt is 1-based, got {failed_attempt}")
    subject = _subject(error)
    if not is_retryable(error):
        return RetryDecision(False, 0, "not-retryable", f"{subject} is not retryable")
    if failed_attempt >= policy.max_attempts:
        return RetryDecision(
            False,
            0,
            "exhausted",
            f"{subject} is retryable, but attempt {failed_attempt} of {policy.max_attempts}"
            f" was the last (retry strategy {policy.strategy})",
        )
    next_attempt = f"attempt {failed_attempt + 1} of {policy.max_attempts}"

    asked_s = _retry_after_s(error)
    if asked_s is not None:
        asked_ms = asked_s * 1000
        if deadline_ms is not None and now_ms + asked_ms >= deadline_ms:
            return RetryDecision(
                False,
                0,
                "deadline",
                f"{subject}: server asked to retry after {_format_s(asked_ms)},"
                f" past the run's deadline {_until(deadline_ms - now_ms)}",
            )
        # Rounded up: never call back before the time the server named.
        delay_ms = policy.max_delay_ms if asked_ms > policy.max_delay_ms else math.ceil(asked_ms)
        clamped = " clamped to maxDelayMs" if asked_ms > policy.max_delay_ms else ""
        return RetryDecision(
            True,
            delay_ms,
            "retry-after",
            f"{subject} is retryable; {next_attempt} in {delay_ms} ms (server asked to retry"
            f" after {_format_s(asked_ms)}{clamped})",
        )

    delay_ms = backoff_ms(policy, failed_attempt, random)
    if deadline_ms is not None and now_ms + delay_ms >= deadline_ms:
        return RetryDecision(
            False,
            0,
            "deadline",
            f"{subject}: the {delay_ms} ms backoff before {next_attempt} would end past the"
            f" run's deadline {_until(deadline_ms - now_ms)}",
        )
    return RetryDecision(
        True,
        delay_ms,
        "backoff",
        f"{subject} is retryable; {next_attempt} in {delay_ms} ms (backoff)",
    )


def _retry_after_s(error: RunnerError) -> float | None:
    """The server's asked wait, when it counts: on 429 or 503 only, and only if it is sane."""
    asked_s = error.retry_after_s
    if error.status not in RETRY_AFTER_STATUSES or asked_s is None:
        return None
    # NaN or a negative value can only come from a buggy producer: fall back to the backoff.
    if math.isnan(asked_s) or asked_s < 0:
        return None
    return asked_s


def _subject(error: RunnerError) -> str:
    """How a message names the failure: its status for an HTTP error, else its code."""
    if error.code == ErrorCode.HTTP_ERROR and error.status is not None:
        return str(error.status)
    if error.status is not None:
        return f"{error.code} ({error.status})"
    return str(error.code)


def _format_s(duration_ms: float) -> str:
    if duration_ms == math.inf:
        return "an unbounded time"
    seconds = duration_ms / 1000
    if seconds == int(seconds):
        return f"{int(seconds)} s"
    return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.1f} s"


def _until(remaining_ms: int) -> str:
    if remaining_ms <= 0:
        return "which has already passed"
    return f"in {_format_s(remaining_ms)}"
