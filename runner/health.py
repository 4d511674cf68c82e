"""Optional probes for Kubernetes: ``/healthz`` (the worker loop is alive) and ``/readyz``
(Redis answers), and ``/metrics`` for Prometheus (every instrument, the queue's depth read at the
scrape). Served on ``RUNNER_HEALTH_PORT`` when it is set."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from aiohttp import web

from runner.log import log
from runner.queue.worker import redis_options

if TYPE_CHECKING:
    from runner.app import Runtime


async def serve_health(port: int, runtime: Runtime, host: str = "0.0.0.0") -> web.AppRunner:
    # A client of its own that never retries: a probe must answer at once, with the real error.
    probe = aioredis.Redis(**{**redis_options(runtime.settings.redis_url, 1.0), "retry": None})

    async def healthz(_: web.Request) -> web.Response:
        alive = runtime.worker.alive
        return web.json_response({"alive": alive}, status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(1):
                await probe.ping()
        except Exception as err:
            return web.json_response({"redis": type(err).__name__}, status=503)
        return web.json_response({"redis": "ok"})

    async def metrics(_: web.Request) -> web.Response:
        scraped = await runtime.metrics.scrape() if runtime.metrics is not None else None
        if scraped is None:
            return web.json_response({"metrics": "off"}, status=404)
        body, content_type = scraped
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def close_probe(_: web.Application) -> None:
        await probe.aclose()

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.on_cleanup.append(close_probe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("health.listening", port=port)
    return runner
