"""Optional probes for Kubernetes: ``/healthz`` (the worker loop is alive) and ``/readyz``
(Redis answers). Served on ``RUNNER_HEALTH_PORT`` when it is set."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from runner.app import Runtime


async def serve_health(port: int, runtime: Runtime, host: str = "0.0.0.0") -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        alive = runtime.worker.alive
        return web.json_response({"alive": alive}, status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(2):
                await runtime.redis.ping()
        except Exception as err:
            return web.json_response({"redis": type(err).__name__}, status=503)
        return web.json_response({"redis": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
