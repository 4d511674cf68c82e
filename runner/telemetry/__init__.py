"""OpenTelemetry for the runner: one trace per run, and the run, step and HTTP metrics.

The engine talks to a ``Telemetry`` and never to OpenTelemetry itself::

    with telemetry.run_span(carrier_json=job.opts.get("tm"), run_id=..., tenant_id=...,
                            version_id=..., job_id=job.id, queue_wait_ms=...) as run:
        with run.step("fetch_customer") as step:            # in the step's own asyncio task
            with step.attempt("GET", redacted_url, 1) as attempt:
                attempt.response(503)
                attempt.error("HTTP_ERROR", 1000)
            with step.attempt("GET", redacted_url, 2) as attempt:
                attempt.response(200)
            step.end("SUCCESS", 2, 1234, None)
        run.end("SUCCESS", None)
    telemetry.shutdown()                                    # blocking: flushes what is queued

Off by default, and then free: ``NOOP`` does nothing and the SDK is never imported. ``from_env``
turns it on from the standard ``OTEL_*`` variables.

The package, by concern: ``interface`` (the protocols and ``NOOP``), ``config`` (the ``OTEL_*``
decision), ``instruments`` (the tracer and the metrics), ``tracing`` (the run, step and attempt
spans), ``sdk`` (``from_env`` and ``SdkTelemetry``). Import from here.
"""

from runner.telemetry.config import TelemetryConfig, config_from_env
from runner.telemetry.interface import (
    NOOP,
    NOOP_SPAN,
    NOOP_STEP_SPAN,
    AttemptSpan,
    RunSpan,
    StepSpan,
    Telemetry,
)
from runner.telemetry.sdk import SdkTelemetry, from_env

__all__ = [
    "NOOP",
    "NOOP_SPAN",
    "NOOP_STEP_SPAN",
    "AttemptSpan",
    "RunSpan",
    "SdkTelemetry",
    "StepSpan",
    "Telemetry",
    "TelemetryConfig",
    "config_from_env",
    "from_env",
]
