"""runner.retry: policy, backoff, classification, Retry-After, decisions. No sockets, no clock."""

from __future__ import annotations

import math
import random as random_module
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.contract import Action, RetryOverride, RetryStrategy
from runner.errors import (
    AuthError,
    Canceled,
    ErrorCode,
    RunnerError,
    SchemaError,
    StepHTTPError,
    TemplateError,
    TransportError,
    WorkflowTimeout,
)
from runner.retry import (
    RETRYABLE_STATUSES,
    RetryDecision,
    RetryPolicy,
    backoff_ms,
    decide,
    is_retryable,
    parse_retry_after_s,
    policy_for,
)

# Wed, 21 Oct 2015 07:28:00 GMT
NOW_MS = 1_445_412_480_000


def exponential(
    *, max_attempts: int = 5, initial_delay_ms: int = 100, max_delay_ms: int = 10_000
) -> RetryPolicy:
    return RetryPolicy("EXPONENTIAL", max_attempts, initial_delay_ms, max_delay_ms)


def seeded(seed: int = 1234) -> Callable[[], float]:
    return random_module.Random(seed).random


def constant(value: float) -> Callable[[], float]:
    return lambda: value


def no_random() -> float:
    raise AssertionError("random() must not be consulted here")


def http(status: int, retry_after_s: float | None = None) -> StepHTTPError:
    return StepHTTPError(
        f"GET /things answered {status}", status=status, retry_after_s=retry_after_s
    )


def action(
    strategy: RetryStrategy = "EXPONENTIAL",
    max_attempts: int = 4,
    initial_delay_ms: int = 200,
    max_delay_ms: int = 5_000,
) -> Action:
    return Action(
        id="act_1",
        endpoint_template="/things",
        retry_strategy=strategy,
        max_attempts=max_attempts,
        initial_delay_ms=initial_delay_ms,
        max_delay_ms=max_delay_ms,
    )


# --- backoff_ms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failed_attempt", "ceiling_ms"),
    [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1_600), (7, 6_400), (8, 10_000), (30, 10_000)],
)
def test_given_exponential_policy_when_attempt_fails_then_delay_is_in_equal_jitter_band(
    failed_attempt: int, ceiling_ms: int
) -> None:
    policy = exponential(initial_delay_ms=100, max_delay_ms=10_000)
    draw = seeded(failed_attempt)

    delays = [backoff_ms(policy, failed_attempt, draw) for _ in range(500)]

    floor_ms = ceiling_ms - ceiling_ms // 2
    assert all(floor_ms <= d <= ceiling_ms for d in delays)
    # The jitter really spreads: both ends of the band are approached.
    assert min(delays) < floor_ms + ceiling_ms * 0.05
    assert max(delays) > ceiling_ms - ceiling_ms * 0.05


def test_given_random_at_its_extremes_when_backing_off_then_band_ends_are_reached() -> None:
    policy = exponential(initial_delay_ms=1_000, max_delay_ms=60_000)

    assert backoff_ms(policy, 3, constant(0.0)) == 2_000
    assert backoff_ms(policy, 3, constant(0.999_999_9)) == 4_000
    assert backoff_ms(policy, 3, constant(0.5)) == 3_000


def test_given_a_random_out_of_range_when_backing_off_then_the_cap_still_holds() -> None:
    policy = exponential(initial_delay_ms=1_000, max_delay_ms=60_000)

    assert backoff_ms(policy, 1, constant(7.0)) == 1_000
    assert backoff_ms(policy, 1, constant(-3.0)) == 500


def test_given_a_seed_when_backing_off_twice_then_delays_are_identical() -> None:
    policy = exponential()

    first = [backoff_ms(policy, n, seeded(7)) for n in range(1, 10)]
    second = [backoff_ms(policy, n, seeded(7)) for n in range(1, 10)]

    assert first == second


@pytest.mark.parametrize("failed_attempt", [10_000, 1_000_000, 10**18])
def test_given_huge_attempt_number_when_backing_off_then_capped_without_overflow(
    failed_attempt: int,
) -> None:
    # Unbounded, 250 << 10**18 would exhaust memory; the exponent is bounded instead.
    policy = exponential(initial_delay_ms=250, max_delay_ms=2**63 - 1)

    delay = backoff_ms(policy, failed_attempt, seeded())

    assert 2**62 <= delay <= 2**63 - 1


def test_given_huge_attempt_and_small_cap_when_backing_off_then_delay_is_in_cap_band() -> None:
    policy = exponential(initial_delay_ms=100, max_delay_ms=30_000)

    assert 15_000 <= backoff_ms(policy, 10_000, seeded()) <= 30_000


def test_given_exponential_with_zero_initial_delay_when_backing_off_then_no_wait() -> None:
    assert backoff_ms(exponential(initial_delay_ms=0, max_delay_ms=0), 5, seeded()) == 0


@pytest.mark.parametrize("failed_attempt", [1, 2, 9, 10_000])
def test_given_fixed_policy_when_any_attempt_fails_then_delay_is_initial_delay(
    failed_attempt: int,
) -> None:
    policy = RetryPolicy("FIXED", 5, 750, 10_000)

    assert backoff_ms(policy, failed_attempt, no_random) == 750


def test_given_none_policy_when_backing_off_then_no_wait() -> None:
    assert backoff_ms(RetryPolicy("NONE", 1, 750, 10_000), 1, no_random) == 0


def test_given_a_zero_based_attempt_when_backing_off_then_value_error() -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_ms(exponential(), 0, seeded())


@given(
    initial_delay_ms=st.integers(0, 10**6),
    extra_ms=st.integers(0, 10**7),
    failed_attempt=st.integers(1, 100_000),
    draw=st.floats(0.0, 1.0, exclude_max=True),
)
def test_given_any_exponential_policy_when_backing_off_then_delay_between_half_cap_and_cap(
    initial_delay_ms: int, extra_ms: int, failed_attempt: int, draw: float
) -> None:
    policy = exponential(
        initial_delay_ms=initial_delay_ms, max_delay_ms=initial_delay_ms + extra_ms
    )
    ceiling_ms = min(policy.max_delay_ms, initial_delay_ms * 2 ** min(failed_attempt - 1, 64))

    delay = backoff_ms(policy, failed_attempt, constant(draw))

    assert math.ceil(ceiling_ms / 2) <= delay <= ceiling_ms


# --- is_retryable --------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(RETRYABLE_STATUSES))
def test_given_transient_status_when_classified_then_retryable(status: int) -> None:
    assert is_retryable(http(status))


@pytest.mark.parametrize(
    "status", [400, 401, 403, 404, 405, 409, 410, 412, 413, 415, 422, 426, 428, 451, 501, 505, 511]
)
def test_given_other_status_when_classified_then_not_retryable(status: int) -> None:
    assert not is_retryable(http(status))


def test_the_retryable_statuses_are_exactly_the_documented_ones() -> None:
    assert frozenset({408, 425, 429, 500, 502, 503, 504}) == RETRYABLE_STATUSES


def test_given_http_error_without_status_when_classified_then_not_retryable() -> None:
    assert not is_retryable(StepHTTPError("no status"))


@pytest.mark.parametrize(
    ("code", "expected"),
    [(code, code in {ErrorCode.TIMEOUT, ErrorCode.CONNECTION_ERROR}) for code in ErrorCode],
)
def test_given_error_code_without_flag_when_classified_then_only_transport_codes_retry(
    code: ErrorCode, expected: bool
) -> None:
    # HTTP_ERROR without a status is not retryable; statuses are covered above.
    assert is_retryable(RunnerError("boom", code=code)) is expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [(code, code not in {ErrorCode.CANCELED, ErrorCode.WORKFLOW_TIMEOUT}) for code in ErrorCode],
)
def test_given_error_raised_retryable_when_classified_then_retried_unless_run_is_over(
    code: ErrorCode, expected: bool
) -> None:
    assert is_retryable(RunnerError("boom", code=code, retryable=True)) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (AuthError("token endpoint answered 503", status=503, retryable=True), True),
        (AuthError("token endpoint timed out", retryable=True), True),
        (AuthError("token endpoint answered 503", status=503), False),
        (AuthError("401 after refresh", status=401), False),
        (StepHTTPError("404 flagged", status=404, retryable=True), True),
        (TemplateError("steps.a.output.x is missing"), False),
        (SchemaError("$.body: expected object"), False),
        (TransportError("10.0.0.1 is internal", code=ErrorCode.EGRESS_DENIED), False),
        (TransportError("body over 10 MiB", code=ErrorCode.RESPONSE_TOO_LARGE), False),
        (TransportError("timed out", code=ErrorCode.TIMEOUT), True),
        (TransportError("connection refused"), True),
        (Canceled("by user", retryable=True), False),
        (WorkflowTimeout("deadline passed", retryable=True), False),
    ],
    ids=lambda value: str(value) if isinstance(value, RunnerError) else None,
)
def test_given_error_from_the_tree_when_classified_then_precedence_table_holds(
    error: RunnerError, expected: bool
) -> None:
    assert is_retryable(error) is expected


# --- parse_retry_after_s -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("  7\t", 7.0),
        ("Wed, 21 Oct 2015 07:29:00 GMT", 60.0),  # IMF-fixdate
        ("Wednesday, 21-Oct-15 07:28:30 GMT", 30.0),  # obsolete RFC 850
        ("Wed Oct 21 07:30:00 2015", 120.0),  # obsolete asctime, no zone: GMT
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # now
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # past: no negative wait
    ],
)
def test_given_retry_after_value_when_parsed_then_seconds_from_now(
    value: str, expected_s: float
) -> None:
    assert parse_retry_after_s(value, NOW_MS) == pytest.approx(expected_s)


@pytest.fixture
def far_from_gmt(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone set far from GMT, so a zoneless date read as local time shows."""
    monkeypatch.setenv("TZ", "XYZ-14")  # POSIX spelling of UTC+14: needs no tzdata
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_from_gmt")
@pytest.mark.parametrize(
    "value", ["Wed Oct 21 07:30:00 2015", "Wed, 21 Oct 2015 07:30:00 -0000", "21 Oct 2015 07:30:00"]
)
def test_given_date_without_zone_when_local_zone_is_not_gmt_then_read_as_gmt(value: str) -> None:
    assert parse_retry_after_s(value, NOW_MS) == pytest.approx(120.0)


def test_given_http_date_when_now_moves_then_wait_shrinks() -> None:
    value = "Wed, 21 Oct 2015 07:29:00 GMT"

    assert parse_retry_after_s(value, NOW_MS + 45_500) == pytest.approx(14.5)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "-5",
        "+5",
        "1.5",
        "120s",
        "120 seconds",
        "soon",
        "Wed, 32 Oct 2015 07:28:00 GMT",
        "\u0661\u0662\u0660",  # Arabic-Indic digits: isdigit() but not delta-seconds
    ],
)
def test_given_junk_retry_after_when_parsed_then_none(value: str | None) -> None:
    assert parse_retry_after_s(value, NOW_MS) is None


def test_given_absurdly_long_delta_when_parsed_then_infinite_not_an_exception() -> None:
    assert parse_retry_after_s("9" * 5_000, NOW_MS) == math.inf


# --- decide --------------------------------------------------------------------------------


def decide_now(
    policy: RetryPolicy,
    failed_attempt: int,
    error: RunnerError,
    *,
    deadline_ms: int | None = None,
    random: Callable[[], float] = no_random,
) -> RetryDecision:
    return decide(
        policy, failed_attempt, error, now_ms=NOW_MS, deadline_ms=deadline_ms, random=random
    )


def test_given_retryable_failure_with_attempts_left_when_deciding_then_backoff() -> None:
    policy = exponential(max_attempts=3, initial_delay_ms=1_000, max_delay_ms=60_000)

    decision = decide_now(policy, 1, http(503), random=constant(0.0))

    assert decision == RetryDecision(
        True, 500, "backoff", "503 is retryable; attempt 2 of 3 in 500 ms (backoff)"
    )


def test_given_seeded_random_when_deciding_then_delay_is_the_backoff() -> None:
    policy = exponential(max_attempts=6)

    decision = decide_now(
        policy, 4, TransportError("timed out", code=ErrorCode.TIMEOUT), random=seeded(3)
    )

    assert decision.retry and decision.reason == "backoff"
    assert decision.delay_ms == backoff_ms(policy, 4, seeded(3))
    assert (
        decision.message
        == f"TIMEOUT is retryable; attempt 5 of 6 in {decision.delay_ms} ms (backoff)"
    )


def test_given_non_retryable_failure_when_deciding_then_fail_at_once() -> None:
    decision = decide_now(exponential(), 1, http(404))

    assert decision == RetryDecision(False, 0, "not-retryable", "404 is not retryable")


def test_given_template_error_when_deciding_then_fail_at_once_naming_the_code() -> None:
    decision = decide_now(exponential(), 1, TemplateError("steps.a.output.x is missing"))

    assert (decision.retry, decision.reason) == (False, "not-retryable")
    assert decision.message == "TEMPLATE_ERROR is not retryable"


def test_given_retryable_auth_error_when_deciding_then_retried_naming_code_and_status() -> None:
    error = AuthError("token endpoint answered 502", status=502, retryable=True)

    decision = decide_now(exponential(), 1, error, random=constant(0.0))

    assert (decision.retry, decision.reason, decision.delay_ms) == (True, "backoff", 50)
    assert decision.message.startswith("AUTH_FAILED (502) is retryable; attempt 2 of 5")


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_given_last_attempt_failed_when_deciding_then_exhausted(max_attempts: int) -> None:
    policy = exponential(max_attempts=max_attempts)

    decision = decide_now(policy, max_attempts, http(500))

    assert (decision.retry, decision.delay_ms, decision.reason) == (False, 0, "exhausted")
    assert decision.message == (
        f"500 is retryable, but attempt {max_attempts} of {max_attempts} was the last"
        " (retry strategy EXPONENTIAL)"
    )


def test_given_attempt_beyond_max_when_deciding_then_exhausted() -> None:
    assert decide_now(exponential(max_attempts=2), 5, http(500)).reason == "exhausted"


def test_given_none_strategy_when_retryable_failure_then_exhausted_after_one() -> None:
    policy = policy_for(action("NONE", max_attempts=9), None)

    decision = decide_now(policy, 1, http(503, retry_after_s=1))

    assert (decision.retry, decision.reason) == (False, "exhausted")


def test_given_zero_based_attempt_when_deciding_then_value_error() -> None:
    with pytest.raises(ValueError, match="1-based"):
        decide_now(exponential(), 0, http(500))


@pytest.mark.parametrize("status", [429, 503])
def test_given_retry_after_on_429_or_503_when_deciding_then_it_replaces_backoff(
    status: int,
) -> None:
    decision = decide_now(exponential(max_attempts=3), 1, http(status, retry_after_s=2))

    assert decision == RetryDecision(
        True,
        2_000,
        "retry-after",
        f"{status} is retryable; attempt 2 of 3 in 2000 ms (server asked to retry after 2 s)",
    )


def test_given_retry_after_shorter_than_backoff_when_deciding_then_server_wins() -> None:
    policy = RetryPolicy("FIXED", 3, 5_000, 10_000)

    assert decide_now(policy, 1, http(429, retry_after_s=0)).delay_ms == 0


def test_given_fractional_retry_after_when_deciding_then_rounded_up_never_early() -> None:
    assert decide_now(exponential(), 1, http(503, retry_after_s=0.0011)).delay_ms == 2


@pytest.mark.parametrize("asked_s", [120.0, math.inf])
def test_given_retry_after_above_max_delay_when_deciding_then_clamped(asked_s: float) -> None:
    policy = exponential(max_delay_ms=10_000)

    decision = decide_now(policy, 1, http(429, retry_after_s=asked_s))

    assert (decision.retry, decision.delay_ms, decision.reason) == (True, 10_000, "retry-after")
    assert "clamped to maxDelayMs" in decision.message


@pytest.mark.parametrize("status", [408, 425, 500, 502, 504])
def test_given_retry_after_on_other_retryable_status_when_deciding_then_ignored(
    status: int,
) -> None:
    decision = decide_now(exponential(), 1, http(status, retry_after_s=3), random=constant(0.0))

    assert (decision.delay_ms, decision.reason) == (50, "backoff")


def test_given_retry_after_on_error_without_status_when_deciding_then_ignored() -> None:
    error = TransportError("timed out", code=ErrorCode.TIMEOUT, retry_after_s=3)

    decision = decide_now(exponential(), 1, error, random=constant(0.0))

    assert (decision.delay_ms, decision.reason) == (50, "backoff")


def test_given_retryable_auth_error_429_with_retry_after_when_deciding_then_honoured() -> None:
    error = AuthError("token endpoint answered 429", status=429, retry_after_s=4, retryable=True)

    decision = decide_now(exponential(), 1, error)

    assert (decision.delay_ms, decision.reason) == (4_000, "retry-after")


@pytest.mark.parametrize("asked_s", [-1.0, math.nan])
def test_given_insane_retry_after_on_error_when_deciding_then_backoff(asked_s: float) -> None:
    decision = decide_now(exponential(), 1, http(503, retry_after_s=asked_s), random=constant(0.0))

    assert (decision.delay_ms, decision.reason) == (50, "backoff")


def test_given_retry_after_past_deadline_when_deciding_then_fail_now() -> None:
    decision = decide_now(
        exponential(max_delay_ms=120_000),
        1,
        http(503, retry_after_s=60),
        deadline_ms=NOW_MS + 3_000,
    )

    assert decision == RetryDecision(
        False,
        0,
        "deadline",
        "503: server asked to retry after 60 s, past the run's deadline in 3 s",
    )


def test_given_retry_after_past_deadline_but_clamp_fits_when_deciding_then_still_fail_now() -> None:
    # The server said it will not serve us before then; calling back early would only burn
    # the rest of the run's time.
    policy = exponential(max_delay_ms=10_000)

    decision = decide_now(policy, 1, http(429, retry_after_s=60), deadline_ms=NOW_MS + 30_000)

    assert (decision.retry, decision.reason) == (False, "deadline")
    assert (
        decision.message == "429: server asked to retry after 60 s, past the run's deadline in 30 s"
    )


def test_given_retry_after_within_deadline_when_deciding_then_retry() -> None:
    decision = decide_now(exponential(), 1, http(503, retry_after_s=2), deadline_ms=NOW_MS + 2_001)

    assert (decision.retry, decision.delay_ms) == (True, 2_000)


def test_given_retry_after_ending_exactly_at_deadline_when_deciding_then_fail_now() -> None:
    decision = decide_now(exponential(), 1, http(503, retry_after_s=2), deadline_ms=NOW_MS + 2_000)

    assert decision.reason == "deadline"


@pytest.mark.parametrize(
    ("deadline_in_ms", "expected_reason"),
    [(3_001, "backoff"), (3_000, "deadline"), (1_500, "deadline")],
)
def test_given_backoff_near_deadline_when_deciding_then_no_wait_starts_that_cannot_end(
    deadline_in_ms: int, expected_reason: str
) -> None:
    policy = RetryPolicy("FIXED", 3, 3_000, 3_000)

    decision = decide_now(policy, 1, http(502), deadline_ms=NOW_MS + deadline_in_ms)

    assert decision.reason == expected_reason
    assert decision.retry is (expected_reason == "backoff")


def test_given_backoff_past_deadline_when_deciding_then_message_names_both() -> None:
    policy = RetryPolicy("FIXED", 3, 3_000, 3_000)

    decision = decide_now(policy, 1, http(502), deadline_ms=NOW_MS + 1_500)

    assert decision == RetryDecision(
        False,
        0,
        "deadline",
        "502: the 3000 ms backoff before attempt 2 of 3 would end past the run's deadline in 1.5 s",
    )


def test_given_deadline_already_passed_when_deciding_then_fail_now() -> None:
    policy = RetryPolicy("FIXED", 3, 0, 0)

    decision = decide_now(policy, 1, http(502), deadline_ms=NOW_MS - 10)

    assert (decision.retry, decision.reason) == (False, "deadline")
    assert decision.message.endswith("which has already passed")


def test_given_no_deadline_when_retry_after_is_long_then_clamped_retry() -> None:
    decision = decide_now(exponential(max_delay_ms=30_000), 1, http(503, retry_after_s=86_400))

    assert (decision.retry, decision.delay_ms) == (True, 30_000)


def test_given_exhausted_and_past_deadline_when_deciding_then_exhausted_wins() -> None:
    decision = decide_now(exponential(max_attempts=2), 2, http(503), deadline_ms=NOW_MS - 1)

    assert decision.reason == "exhausted"


def test_given_not_retryable_and_exhausted_when_deciding_then_not_retryable_wins() -> None:
    assert decide_now(exponential(max_attempts=1), 1, http(400)).reason == "not-retryable"


def test_given_error_with_a_secret_in_its_message_when_deciding_then_message_omits_it() -> None:
    error = StepHTTPError("GET /x?api_key=sk_live_123 answered 503", status=503)

    for failed_attempt in (1, 5):
        decision = decide_now(exponential(), failed_attempt, error, random=constant(0.3))
        assert "sk_live_123" not in decision.message


# --- policy_for ----------------------------------------------------------------------------


def test_given_no_override_when_building_policy_then_action_fields_apply() -> None:
    assert policy_for(action(), None) == RetryPolicy("EXPONENTIAL", 4, 200, 5_000)


def test_given_empty_override_when_building_policy_then_action_fields_apply() -> None:
    assert policy_for(action(), RetryOverride()) == RetryPolicy("EXPONENTIAL", 4, 200, 5_000)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (RetryOverride(retry_strategy="FIXED"), RetryPolicy("FIXED", 4, 200, 5_000)),
        (RetryOverride(max_attempts=7), RetryPolicy("EXPONENTIAL", 7, 200, 5_000)),
        (RetryOverride(initial_delay_ms=50), RetryPolicy("EXPONENTIAL", 4, 50, 5_000)),
        (RetryOverride(max_delay_ms=60_000), RetryPolicy("EXPONENTIAL", 4, 200, 60_000)),
        (
            RetryOverride(retry_strategy="FIXED", max_attempts=2, initial_delay_ms=0),
            RetryPolicy("FIXED", 2, 0, 5_000),
        ),
    ],
)
def test_given_step_override_when_building_policy_then_only_given_fields_change(
    override: RetryOverride, expected: RetryPolicy
) -> None:
    assert policy_for(action(), override) == expected


def test_given_none_strategy_when_building_policy_then_one_attempt_whatever_max_attempts() -> None:
    assert policy_for(action("NONE", max_attempts=5), None).max_attempts == 1
    assert policy_for(action(), RetryOverride(retry_strategy="NONE")).max_attempts == 1
    assert (
        policy_for(action(), RetryOverride(retry_strategy="NONE", max_attempts=9)).max_attempts == 1
    )


def test_given_none_action_overridden_to_exponential_when_building_then_action_attempts() -> None:
    policy = policy_for(action("NONE", max_attempts=3), RetryOverride(retry_strategy="EXPONENTIAL"))

    assert policy == RetryPolicy("EXPONENTIAL", 3, 200, 5_000)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (RetryOverride(max_attempts=0), RetryPolicy("EXPONENTIAL", 1, 200, 5_000)),
        (RetryOverride(max_attempts=-4), RetryPolicy("EXPONENTIAL", 1, 200, 5_000)),
        (RetryOverride(initial_delay_ms=-10), RetryPolicy("EXPONENTIAL", 4, 0, 5_000)),
        (RetryOverride(max_delay_ms=-10), RetryPolicy("EXPONENTIAL", 4, 200, 200)),
        (RetryOverride(max_delay_ms=100), RetryPolicy("EXPONENTIAL", 4, 200, 200)),
        (RetryOverride(initial_delay_ms=9_000), RetryPolicy("EXPONENTIAL", 4, 9_000, 9_000)),
        (
            RetryOverride(initial_delay_ms=-1, max_delay_ms=-1),
            RetryPolicy("EXPONENTIAL", 4, 0, 0),
        ),
    ],
)
def test_given_silly_values_when_building_policy_then_clamped(
    override: RetryOverride, expected: RetryPolicy
) -> None:
    assert policy_for(action(), override) == expected
