"""The reporting path of W3 in a loop of its own: what the runner's status reporting costs per
run without any I/O, the number ``docs/dev/performance-notebook.md`` quotes.

    PYTHONPATH=scripts .venv/bin/python -m bench_lib.reporting_loop [runs]

Each simulated run reports as a W3 run does (run RUNNING, three steps RUNNING then SUCCESS with
a typical output, run SUCCESS) through the real ``RunReporter`` and ``RedisStatusSink``, 50 runs
at once on uvloop, so transitions share batches as they do under load. The sink's connection
answers every batch at once; what is timed is the process's CPU, so the numbers cover the
events, checkpoint fields, progress and log lines, their redaction, the batching and the
packing of the commands, and the event loop's share of them.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import uvloop

from runner.engine.ports import StepResult, SystemClock
from runner.queue.keys import Keys
from runner.redact import Redactor
from runner.reporting.reporter import RunReporter
from runner.reporting.stdout_log import StdoutExecutionLog
from runner.reporting.stream import RedisStatusSink
from runner.resp import pack

OUTPUT = {
    "status": 200,
    "headers": {
        "content-type": "application/json",
        "content-length": "60",
        "date": "Thu, 26 Nov 2026 05:38:37 GMT",
        "connection": "keep-alive",
        "keep-alive": "timeout=120",
    },
    "body": {"id": "c_0", "email": "c0@example.com", "name": "Customer 0"},
}
STEPS = ("fetch_customer", "create_ticket", "get_ticket")


class InstantConnection:
    """Packs what it is sent (as the real connection does) and answers OK to each command."""

    def __init__(self) -> None:
        self.events = 0

    async def execute(self, commands: list[Any], *, transaction: bool = False) -> list[Any]:
        # An XADD's name is a bulk string of its own in the packed bytes; JSON inside one
        # cannot hold a raw CR LF.
        self.events += pack(commands).count(b"\r\n$4\r\nXADD\r\n")
        await asyncio.sleep(0)
        return [1] * len(commands)


async def one_run(i: int, sink: RedisStatusSink, redactor: Redactor, clock: SystemClock) -> None:
    run_id = f"run_{i}"
    reporter = RunReporter(
        run_id=run_id,
        tenant_id="ten_bench",
        version_id="wfv_bench_w3",
        job_id=run_id,
        worker_id="bench",
        total_steps=len(STEPS),
        sink=sink,
        # As in the bench: no MongoDB, info lines filtered (the default log level).
        execlog=StdoutExecutionLog(redact=redactor.scrubbed),
        redact=redactor,
        now_ms=clock.now_ms,
    )
    await reporter.run_started(clock.now_ms())
    results = {}
    for key in STEPS:
        started = clock.now_ms()
        await reporter.step_running(key, 1, started)
        await asyncio.sleep(0)  # where the request would be
        result = StepResult(key, "SUCCESS", 1, started, started + 3, OUTPUT)
        results[key] = result
        await reporter.step_done(result, 1)
    await reporter.run_done("SUCCESS", None, results)


async def main(runs: int, connection: InstantConnection | None = None) -> float:
    redactor = Redactor()
    sink = RedisStatusSink(
        connection or InstantConnection(),
        stream="bull:bench:status",
        keys=Keys("bull", "bench"),
    )
    clock = SystemClock()
    slots = asyncio.Semaphore(50)

    async def slot(i: int) -> None:
        async with slots:
            await one_run(i, sink, redactor, clock)

    started = time.process_time()
    await asyncio.gather(*(slot(i) for i in range(runs)))
    return (time.process_time() - started) / runs


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    per_run = [uvloop.run(main(n)) for _ in range(3)]
    print(
        "reporting path, CPU per W3 run (3 loops of "
        f"{n:,}): " + ", ".join(f"{1e6 * v:.0f} µs" for v in per_run)
    )
