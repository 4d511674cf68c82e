"""The benchmark's own tools still run against the current code (they are run on demand, so
nothing else would notice them break)."""

from __future__ import annotations

import asyncio

from bench_lib import reporting_loop


def test_the_reporting_loop_reports_each_run_as_w3_does() -> None:
    connection = reporting_loop.InstantConnection()
    per_run_s = asyncio.run(reporting_loop.main(20, connection))
    # Run RUNNING, then RUNNING and SUCCESS for each of the three steps, then run SUCCESS.
    assert connection.events == 20 * 8
    assert per_run_s > 0


def test_the_engine_loop_runs_w3_to_success_with_three_requests_each() -> None:
    from bench_lib import engine_loop

    api = engine_loop.InstantApi()
    _, outcomes = asyncio.run(engine_loop.main(10, api))
    assert outcomes == {"SUCCESS": 10}
    assert api.requests == 30
