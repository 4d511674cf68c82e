"""A W3 run's engine and reporting in a loop of their own: the runner's CPU per run without the
queue, without sockets and without aiohttp.

    PYTHONPATH=scripts .venv/bin/python -m bench_lib.engine_loop [runs] [--documents]

The bench's W3 definition (``scripts/bench_node/workloads.mjs``, read through Node) is compiled
once, as the definition cache does; each run goes through the real ``Engine`` (templating, schema checks,
request building, output extraction, retries' bookkeeping) and the real ``RunReporter`` and
``RedisStatusSink``. The transport answers each request at once with what the bench's API
answers, and the sink's connection answers each batch at once (``reporting_loop``). 50 runs at
once on uvloop. Subtract ``reporting_loop``'s number to get the engine's own.

Execution-log lines are dropped as the bench's runner drops them (no ``RUNNER_MONGODB_URL``, info
lines filtered); ``--documents`` builds each line's document as the MongoDB sink does (into
memory, nothing written), which is what a runner with MongoDB configured pays on top.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
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
from runner.reporting.execlog import ExecutionLog
from runner.reporting.execlog.memory import MemoryExecutionLog
from runner.reporting.reporter import RunReporter
from runner.reporting.stdout_log import StdoutExecutionLog
from runner.reporting.stream import RedisStatusSink

BASE_URL = "http://127.0.0.1:8080"
HEADERS = {
    "content-type": "application/json",
    "date": "Thu, 26 Nov 2026 05:38:37 GMT",
    "connection": "keep-alive",
    "keep-alive": "timeout=120",
}


def w3_definition() -> dict[str, Any]:
    """The bench's own W3 WorkflowVersion, from ``workloads.mjs`` (so both measure the same)."""
    script = (
        "import { workflowVersion } from './workloads.mjs';"
        f"console.log(JSON.stringify(workflowVersion('w3', '{BASE_URL}', 'none')));"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=Path(__file__).resolve().parents[1] / "bench_node",
        capture_output=True,
        text=True,
        check=True,
    )
    definition: dict[str, Any] = json.loads(done.stdout)
    return definition


class InstantApi:
    """The engine's ``Transport``, answering as the bench's API does, at once."""

    def __init__(self) -> None:
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
        await asyncio.sleep(0)
        path = request.url[len(BASE_URL) :]
        if request.method == "POST":
            body = {"id": f"t_{self.requests}", **json.loads(request.body or b"{}")}
            status = 201
        elif path.startswith("/customers/"):
            cid = path.rsplit("/", 1)[1]
            body = {"id": cid, "email": f"{cid}@example.com", "name": f"Customer {cid}"}
            status = 200
        else:
            body = {"id": path.rsplit("/", 1)[1], "status": "open"}
            status = 200
        raw = json.dumps(body).encode()
        return HttpResponse(status, {**HEADERS, "content-length": str(len(raw))}, raw)


async def one_run(
    i: int,
    plan: Plan,
    engine: Engine,
    sink: RedisStatusSink,
    clock: SystemClock,
    redactor: Redactor,
    execlog: ExecutionLog,
) -> str:
    run_id = f"run_{i}"
    reporter = RunReporter(
        run_id=run_id,
        tenant_id="ten_bench",
        version_id=plan.id,
        job_id=run_id,
        worker_id="bench",
        total_steps=len(plan.steps),
        sink=sink,
        execlog=execlog,
        redact=redactor,
        now_ms=clock.now_ms,
    )
    started = clock.now_ms()
    ctx = RunContext(
        job_id=run_id,
        run_id=run_id,
        tenant_id="ten_bench",
        version_id=plan.id,
        input={"customerId": f"c_{i}", "orderNo": i, "priority": 2},
        started_ms=started,
        deadline_ms=started + plan.version.timeout_ms,
        connections=dict(plan.version.connections),
    )
    outcome = await engine.run(plan, ctx, reporter)
    return str(outcome.status)


async def main(
    runs: int, api: InstantApi | None = None, *, documents: bool = False
) -> tuple[float, dict[str, int]]:
    plan = compile_plan(decode_workflow_version(w3_definition()))
    clock = SystemClock()
    engine = Engine(api or InstantApi(), clock)
    sink = RedisStatusSink(
        InstantConnection(),
        stream="bull:bench:status",
        keys=Keys("bull", "bench"),
    )
    # A run without secrets shares the process's redactor, as RunService does.
    redactor = Redactor()
    execlog: ExecutionLog = StdoutExecutionLog(redact=redactor.scrubbed)
    memory = MemoryExecutionLog(redact=redactor.scrubbed)
    if documents:
        execlog = memory
    slots = asyncio.Semaphore(50)
    statuses: dict[str, int] = {}

    async def slot(i: int) -> None:
        async with slots:
            status = await one_run(i, plan, engine, sink, clock, redactor, execlog)
            statuses[status] = statuses.get(status, 0) + 1
            memory.documents.clear()

    started = time.process_time()
    await asyncio.gather(*(slot(i) for i in range(runs)))
    return (time.process_time() - started) / runs, statuses


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 10_000
    with_documents = "--documents" in sys.argv
    results = [uvloop.run(main(n, documents=with_documents)) for _ in range(3)]
    what = "with execution-log documents" if with_documents else "execution log off"
    print(
        f"engine and reporting ({what}), CPU per W3 run (3 loops of {n:,}): "
        + ", ".join(f"{1e6 * per_run:.0f} µs" for per_run, _ in results)
        + f"; outcomes {results[-1][1]}"
    )
