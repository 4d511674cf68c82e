"""scripts/bench_lib/map_loop: the forEach scenario runs both sides to SUCCESS and reports two
rates (its assertions check every request was sent). Behaviour only, never a time."""

from __future__ import annotations

from bench_lib import map_loop


async def test_given_a_small_map_scenario_when_measured_then_both_sides_complete() -> None:
    runs_per_s, items_per_s = await map_loop.measure(20, 0.0)

    assert runs_per_s > 0 and items_per_s > 0
