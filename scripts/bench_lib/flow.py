"""``scripts/bench --flow``: flow control against an API that enforces its budget (issue 23).

A local API allows ``--flow-rate`` requests/s per API key and answers 429 beyond it, with
budget headers (``Retry-After``, ``RateLimit-Remaining``/``-Reset``) in one mode and a bare 429
in the other. ``--flow-runs`` one-step runs go through two runner processes whose connection is
limited to the same rate (headers mode: ten times too generous, so the API's headers must do
the work). Reported, per mode: the share of 429s after the first second, throughput against
the allowed rate, and runs lost. Then the breaker: the API down ``--flow-down-s`` (503), then
up; requests while it was down against one probe per cool-down, time from up to the next
success, runs failed. Smallest setting: ``--flow --flow-runs 60 --flow-down-s 3``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from bench_lib import redisctl

RUNNERS = 2
COOL_DOWN_MS = 2000


class Api:
    def __init__(self, rate: int, *, headers: bool) -> None:
        self.rate = rate
        self.headers = headers
        self.down = False
        self.window = -1
        self.used = 0
        self.log: list[tuple[float, int]] = []  # (monotonic time, status)

    async def handle(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        if self.down:
            self.log.append((now, 503))
            return web.json_response({}, status=503)
        window = int(now)
        if window != self.window:
            self.window, self.used = window, 0
        reset_s = max(1, math.ceil(window + 1 - now))
        if self.used >= self.rate:
            self.log.append((now, 429))
            hdrs = {
                "Retry-After": str(reset_s),
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(reset_s),
            }
            return web.json_response({}, status=429, headers=hdrs if self.headers else {})
        self.used += 1
        self.log.append((now, 200))
        hdrs = {"RateLimit-Remaining": str(self.rate - self.used), "RateLimit-Reset": str(reset_s)}
        return web.json_response({"ok": True}, headers=hdrs if self.headers else {})


def serve_in_thread(api: Api) -> tuple[str, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    ready: dict[str, str] = {}
    started = threading.Event()

    async def start() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", api.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready["url"] = f"http://127.0.0.1:{port}"
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    started.wait(10)
    return ready["url"], loop


def version(base: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "wfv_flow_bench",
        "graph": {"steps": [{"key": "call", "actionId": "get", "connectionId": "c"}]},
        "actions": {
            "get": {
                "id": "get",
                "method": "GET",
                "endpointTemplate": "/x",
                "retryStrategy": "FIXED",
                "maxAttempts": 30,
                "initialDelayMs": 200,
            }
        },
        "connections": {"c": {"id": "c", "type": "NONE", "config": {"baseUrl": base, **config}}},
        "timeoutMs": 300_000,
    }


async def add_runs(redis_url: str, queue: str, v: dict[str, Any], n: int) -> None:
    from bullmq import Queue

    q = Queue(queue, {"connection": redis_url})
    jobs = []
    for i in range(n):
        data = {
            "workflowRunId": f"run_{i}",
            "workflowVersionId": v["id"],
            "tenantId": "ten_bench",
            "input": {},
            "workflowVersion": v,
        }
        jobs.append({"name": "workflow_run", "data": data, "opts": {"jobId": f"run_{i}"}})
    await q.addBulk(jobs)
    await q.close()


def start_runners(
    repo: Path, python: str, redis_url: str, queue: str, log_dir: Path
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(RUNNERS):
        env = {
            **os.environ,
            "RUNNER_REDIS_URL": redis_url,
            "RUNNER_QUEUE": queue,
            "RUNNER_EGRESS_ALLOW": "127.0.0.0/8",
            "RUNNER_WORKER_NAME": f"flow-bench-{i}",
            "RUNNER_CONCURRENCY": "50",
            "RUNNER_LOG_LEVEL": "warning",
        }
        out = (log_dir / f"flow-{queue}-{i}.log").open("wb")
        procs.append(
            subprocess.Popen([python, "-m", "runner"], cwd=repo, env=env, stdout=out, stderr=out)
        )
    return procs


def wait_done(client: Any, queue: str, n: int, timeout_s: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = client.zcard(f"bull:{queue}:completed")
        failed = client.zcard(f"bull:{queue}:failed")
        if done + failed >= n:
            return done, failed
        time.sleep(0.05)
    return client.zcard(f"bull:{queue}:completed"), client.zcard(f"bull:{queue}:failed")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def rate_scenario(ctx: dict[str, Any], *, headers: bool, runs: int, rate: int) -> dict[str, Any]:
    api = Api(rate, headers=headers)
    base, loop = serve_in_thread(api)
    queue = f"flow-{'h' if headers else 'n'}-{uuid.uuid4().hex[:6]}"
    limit = {"requests": rate * 10 if headers else rate, "perMs": 1000}
    v = version(base, {"rateLimit": limit})
    procs = start_runners(ctx["repo"], ctx["python"], ctx["redis_url"], queue, ctx["log_dir"])
    try:
        time.sleep(2.0)  # the runners start
        asyncio.run(add_runs(ctx["redis_url"], queue, v, runs))
        done, failed = wait_done(ctx["client"], queue, runs, 60 + runs / rate * 3)
    finally:
        stop(procs)
        loop.call_soon_threadsafe(loop.stop)
    log = api.log
    t0 = log[0][0] if log else 0.0
    after = [s for t, s in log if t >= t0 + 1.0]
    ok = [t for t, s in log if s == 200]
    span = (ok[-1] - ok[0]) if len(ok) > 1 else 0.0
    throughput = (len(ok) - 1) / span if span else 0.0
    redisctl.delete_queue_keys(ctx["client"], "bull", queue)
    return {
        "mode": "headers" if headers else "no headers",
        "connection rateLimit": f"{limit['requests']}/s",
        "runs": runs,
        "completed": done,
        "failed": failed,
        "requests": len(log),
        "429 share after 1 s": f"{(after.count(429) / len(after) * 100) if after else 0:.1f}%",
        "throughput / allowed": f"{throughput:.1f}/{rate} = {throughput / rate * 100:.0f}%",
    }


def breaker_scenario(ctx: dict[str, Any], *, down_s: float, rate: int) -> dict[str, Any]:
    api = Api(1000, headers=False)
    api.down = True
    base, loop = serve_in_thread(api)
    queue = f"flow-b-{uuid.uuid4().hex[:6]}"
    v = version(
        base,
        {"circuitBreaker": {"failures": 5, "windowMs": 10_000, "coolDownMs": COOL_DOWN_MS}},
    )
    runs = 20
    procs = start_runners(ctx["repo"], ctx["python"], ctx["redis_url"], queue, ctx["log_dir"])
    try:
        time.sleep(2.0)
        asyncio.run(add_runs(ctx["redis_url"], queue, v, runs))
        time.sleep(down_s)
        up_at = time.monotonic()
        api.down = False
        done, failed = wait_done(ctx["client"], queue, runs, 60)
    finally:
        stop(procs)
        loop.call_soon_threadsafe(loop.stop)
    down = [t for t, s in api.log if s == 503]
    first_ok = next((t for t, s in api.log if s == 200), None)
    # Opened at the 5th failure; requests already sent then (the first attempts of every run
    # in flight) land just after it: "while open" counts from 200 ms later.
    opened = down[4] if len(down) >= 5 else None
    while_open = [t for t in down if opened is not None and t > opened + 0.2]
    probes_allowed = math.ceil((up_at - opened) / (COOL_DOWN_MS / 1000)) if opened else 0
    redisctl.delete_queue_keys(ctx["client"], "bull", queue)
    return {
        "down for": f"{down_s:.0f} s",
        "requests while down": len(down),
        "while open": len(while_open),
        "bound (one probe per cool-down)": probes_allowed,
        "recovery after up": f"{(first_ok - up_at):.2f} s" if first_ok else "never",
        "bound (cool-down + 1 s)": f"{COOL_DOWN_MS / 1000 + 1:.0f} s",
        "completed": done,
        "failed": failed,
    }


def run(repo: Path, python: str, redis_url: str, client: Any, log_dir: Path, args: Any) -> int:
    ctx = {
        "repo": repo,
        "python": python,
        "redis_url": redis_url,
        "client": client,
        "log_dir": log_dir,
    }
    rows = [
        rate_scenario(ctx, headers=True, runs=args.flow_runs, rate=args.flow_rate),
        rate_scenario(ctx, headers=False, runs=args.flow_runs, rate=args.flow_rate),
    ]
    breaker = breaker_scenario(ctx, down_s=args.flow_down_s, rate=args.flow_rate)
    out = [
        f"## Flow control: {args.flow_runs} runs over {RUNNERS} runner processes, API allows "
        f"{args.flow_rate} req/s",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
    ]
    out += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    out += ["", "### Breaker", "", "| " + " | ".join(breaker) + " |", "|" + "---|" * len(breaker)]
    out.append("| " + " | ".join(str(v) for v in breaker.values()) + " |")
    print("\n".join(out))
    print(json.dumps({"rate": rows, "breaker": breaker}), file=sys.stderr)
    return 0 if all(r["failed"] == 0 for r in rows) and breaker["failed"] == 0 else 1
