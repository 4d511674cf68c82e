"""A 1,000-item ``forEach`` (``maxParallel`` 50) against 1,000 one-step runs (50 at once):
issue 24's target is the map at >= 0.7x the runs' throughput.

    PYTHONPATH=scripts .venv/bin/python -m bench_lib.map_loop [items] [--latency-ms N]

Both go through the real ``Engine``, ``RunReporter`` and ``RedisStatusSink`` (its connection
answering each batch at once, as in ``reporting_loop``) on uvloop; the transport answers each
request after ``--latency-ms`` (default 5), as a near API would. The map writes one checkpoint
field per item and two events; each run writes its run and step events. What is left out is
what both would share per request (sockets, aiohttp) and BullMQ's cost per job, which only the
runs pay: so this is the map's worst case.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvloop

from bench_lib.reporting_loop import InstantConnection
from runner.contract import Connection, decode_workflow_version
from runner.engine.plan import Plan, compile_plan
from runner.engine.ports import RunContext, SystemClock
from runner.engine.run import Engine
from runner.http.messages import HttpRequest, HttpResponse
from runner.queue.keys import Keys
from runner.redact import Redactor
from runner.reporting.reporter import RunReporter
from runner.reporting.stdout_log import StdoutExecutionLog
from runner.reporting.stream import RedisStatusSink

BODY = b'{"id":"x","ok":true}'
HEADERS = {"content-type": "application/json", "content-length": str(len(BODY))}


class SlowApi:
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.requests = 0

    async def send(
        self,
        request: HttpRequest,
        *,
        connection: Connection | None,
        tenant_id: str,
        timeout_s: float,
    ) -> HttpResponse:
        self.requests += 1
        await asyncio.sleep(self.latency_s)
        return HttpResponse(200, HEADERS, BODY)


def definition(for_each: bool) -> dict[str, Any]:
    step: dict[str, Any] = {
        "key": "put",
        "actionId": "put",
        "input": {"path": {"id": "{{ item.id }}" if for_each else "{{ input.id }}"}},
    }
    if for_each:
        step.update(forEach="input.items", maxParallel=50)
    return {
        "id": "wfv_map" if for_each else "wfv_one",
        "graph": {"steps": [step]},
        "actions": {
            "put": {
                "id": "put",
                "method": "PUT",
                "endpointTemplate": "http://127.0.0.1:8080/items/{id}",
                "idempotencyHeader": "Idempotency-Key",
            }
        },
    }


async def one_run(run_id: str, plan: Plan, engine: Engine, sink: Any, run_input: Any) -> str:
    clock = SystemClock()
    redactor = Redactor()
    reporter = RunReporter(
        run_id=run_id,
        tenant_id="ten_bench",
        version_id=plan.id,
        job_id=run_id,
        worker_id="bench",
        total_steps=len(plan.steps),
        sink=sink,
        execlog=StdoutExecutionLog(redact=redactor.scrubbed),
        redact=redactor,
        now_ms=clock.now_ms,
    )
    started = clock.now_ms()
    ctx = RunContext(
        job_id=run_id,
        run_id=run_id,
        tenant_id="ten_bench",
        version_id=plan.id,
        input=run_input,
        started_ms=started,
        deadline_ms=started + 600_000,
    )
    outcome = await engine.run(plan, ctx, reporter)
    return str(outcome.status)


async def measure(items: int, latency_s: float) -> tuple[float, float]:
    """(runs per second, items per second)."""
    sink = RedisStatusSink(InstantConnection(), stream="bull:bench:status", keys=Keys("bull", "b"))
    api = SlowApi(latency_s)
    engine = Engine(api, SystemClock())
    one = compile_plan(decode_workflow_version(definition(False)))
    mapped = compile_plan(decode_workflow_version(definition(True)))
    slots = asyncio.Semaphore(50)

    async def slot(i: int) -> str:
        async with slots:
            return await one_run(f"run_{i}", one, engine, sink, {"id": f"i{i}"})

    began = time.perf_counter()
    statuses = await asyncio.gather(*(slot(i) for i in range(items)))
    runs_s = time.perf_counter() - began
    assert set(statuses) == {"SUCCESS"}, statuses

    began = time.perf_counter()
    status = await one_run(
        "run_map", mapped, engine, sink, {"items": [{"id": f"i{i}"} for i in range(items)]}
    )
    map_s = time.perf_counter() - began
    assert status == "SUCCESS", status
    assert api.requests == 2 * items
    return items / runs_s, items / map_s


def report(items: int, latency_ms: float = 5.0, rounds: int = 3) -> int:
    """Print each round's rates and ratio; 0 when every round meets the 0.7x target."""
    ratios = []
    for _ in range(rounds):
        runs_per_s, items_per_s = uvloop.run(measure(items, latency_ms / 1000))
        ratios.append(items_per_s / runs_per_s)
        print(
            f"{items:,} one-step runs: {runs_per_s:,.0f}/s; one map of {items:,} items "
            f"(maxParallel 50): {items_per_s:,.0f} items/s; ratio {ratios[-1]:.2f}x"
        )
    return 0 if min(ratios) >= TARGET_RATIO else 1


TARGET_RATIO = 0.7

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench_lib.map_loop")
    parser.add_argument("items", type=int, nargs="?", default=1000)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    ns = parser.parse_args()
    raise SystemExit(report(ns.items, ns.latency_ms))
