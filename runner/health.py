"""Optional probes for Kubernetes: ``/healthz`` (the worker loop is alive) and ``/readyz``
(Redis takes the runner's commands), and ``/metrics`` for Prometheus (every instrument, the
queue's depth read at the scrape). Served on ``RUNNER_HEALTH_PORT`` when it is set.

``/readyz`` is false when the probe's ``INFO`` fails or shows an endpoint the runner cannot
work with (a replica after a failover, a sentinel, an evicting Redis: ``runner.redis_connect``),
and while BullMQ's own commands fail (the worker reported an error in the last
``RECENT_ERROR_S``), not only when the socket is closed."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from aiohttp import web

from runner import redis_connect
from runner.log import log

if TYPE_CHECKING:
    from runner.app import Runtime

RECENT_ERROR_S = 10.0


async def serve_health(port: int, runtime: Runtime, host: str = "0.0.0.0") -> web.AppRunner:
    # A client of its own that never retries: a probe must answer at once, with the real error.
    settings = runtime.settings
    target = redis_connect.parse(settings.redis_url)
    probe = redis_connect.client(settings.redis_url, 1.0, retry=False)

    async def healthz(_: web.Request) -> web.Response:
        alive = runtime.worker.alive
        return web.json_response({"alive": alive}, status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(2):
                await redis_connect.check(probe, target, settings.queue_prefix)
        except redis_connect.RedisSetupError as err:
            return web.json_response({"redis": str(err)}, status=503)
        except Exception as err:
            return web.json_response({"redis": redis_connect.describe(err)}, status=503)
        failed_at = runtime.worker.last_error_at
        if failed_at is not None and time.monotonic() - failed_at < RECENT_ERROR_S:
            return web.json_response({"redis": runtime.worker.last_error}, status=503)
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
