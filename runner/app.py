"""The composition root: builds every client, sink and the engine, runs the worker, stops cleanly.

Nothing else constructs a Redis client, an aiohttp session or a MongoDB client. Signals:
SIGTERM and SIGINT stop taking jobs, let runs in flight finish within the grace period, flush
the execution logs, then exit 0. If the BullMQ loop dies on its own, the process exits 1 so
that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from runner import expressions, jsonlimits, telemetry
from runner.controlplane import ControlPlane
from runner.credentials import CredentialSource, parse_key
from runner.definitions import DefinitionStore
from runner.engine.pagination import PageLimits
from runner.engine.ports import SystemClock
from runner.engine.run import Engine
from runner.flow.limits import Flow
from runner.flow.policy import Defaults
from runner.flow.redis_store import RedisStore
from runner.http.client import HttpTransport, make_session
from runner.http.egress import EgressPolicy
from runner.http.oauth2 import OAuth2TokenManager
from runner.log import log
from runner.looplag import LoopLag
from runner.metrics import RunnerMetrics
from runner.queue import packing
from runner.queue.burst import until_drained
from runner.queue.cancel import CancelWatch
from runner.queue.keys import Keys
from runner.queue.worker import QueueWorker
from runner.redact import SecretRegistry
from runner.redis_connect import RedisSetupError, preflight
from runner.redis_connect import client as redis_client
from runner.reporting.execlog import ExecutionLog, MongoExecutionLog
from runner.reporting.stdout_log import StdoutExecutionLog
from runner.reporting.stream import RedisStatusSink
from runner.resp import RespConnection
from runner.runs import RunService
from runner.settings import Settings


@dataclass
class Runtime:
    """What ``build`` made, for ``serve`` to run and close (and for tests to reach into)."""

    settings: Settings
    redis: aioredis.Redis
    status_connection: RespConnection
    flow_connection: RespConnection
    session: aiohttp.ClientSession
    control_session: aiohttp.ClientSession
    execlog: ExecutionLog
    cancels: CancelWatch
    service: RunService
    worker: QueueWorker
    definitions: DefinitionStore
    tokens: OAuth2TokenManager
    telemetry: telemetry.Telemetry
    metrics: RunnerMetrics | None = None

    async def close(self) -> None:
        await self.cancels.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        with contextlib.suppress(Exception):
            # A rotated refresh token whose report failed gets one more try.
            await self.tokens.flush_reports()
        await self.execlog.shutdown(5.0)
        await asyncio.to_thread(self.telemetry.shutdown)
        await self.session.close()
        await self.control_session.close()
        await self.redis.aclose()
        self.status_connection.close()
        self.flow_connection.close()


async def build(settings: Settings) -> Runtime:
    try:
        jsonlimits.configure(settings.max_json_depth)
    except ValueError as err:
        raise SystemExit(f"RUNNER_MAX_JSON_DEPTH: {err}") from None
    try:
        expressions.configure(settings.expression_budget, settings.expression_max_result_bytes)
    except ValueError as err:
        raise SystemExit(f"RUNNER_EXPRESSION_BUDGET: {err}") from None
    process_secrets = tuple(
        v for v in (settings.control_plane_token, settings.credentials_key) if v
    )
    # The one registry of secrets in flight in this process, handed to everything that writes out.
    secrets = SecretRegistry()
    if process_secrets:
        secrets.register(process_secrets)
    log.configure(
        level=settings.log_level,
        scrub=lambda line: secrets.redactor().text(line),
        worker=settings.name,
    )
    packing.install()
    clock = SystemClock()
    keys = Keys(settings.queue_prefix, settings.queue)
    redis = redis_client(settings.redis_url, settings.redis_socket_timeout_s)
    status_connection = RespConnection(
        settings.redis_url, timeout_s=settings.redis_socket_timeout_s
    )
    policy = EgressPolicy.from_setting(settings.egress_allow)
    session = make_session(policy)
    control_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    control_plane = (
        ControlPlane(control_session, settings.control_plane_url, settings.control_plane_token)
        if settings.control_plane_url
        else None
    )
    key = parse_key(settings.credentials_key) if settings.credentials_key else None
    tokens = OAuth2TokenManager(
        session=session,
        redis=redis,
        key_prefix=keys.oauth2(),
        credentials_key=key,
        control_plane_url=settings.control_plane_url or None,
        control_session=control_session,
        control_plane_token=settings.control_plane_token or None,
        skew_ms=int(settings.oauth2_skew_s * 1000),
        now_ms=clock.now_ms,
        on_warning=lambda message, context: log.warning(
            "oauth2.warning", detail=message, **context
        ),
        secrets_registry=secrets,
    )
    transport = HttpTransport(
        session,
        policy=policy,
        tokens=tokens,
        now_ms=clock.now_ms,
        max_response_bytes=settings.max_response_bytes,
        follow_redirects=settings.follow_redirects,
        max_redirects=settings.max_redirects,
    )
    execlog: ExecutionLog
    if settings.mongodb_url:
        execlog = MongoExecutionLog(
            settings.mongodb_url,
            retention_s=settings.execution_log_retention_s,
            redact=lambda value: secrets.redactor().scrubbed(value),
            on_warning=lambda message, context: log.warning(
                "execlog.warning", detail=message, **context
            ),
        )
    else:
        execlog = StdoutExecutionLog(redact=lambda value: secrets.redactor().scrubbed(value))
    definitions = DefinitionStore(control_plane, cache_size=settings.definition_cache_size)
    tel = telemetry.from_env(
        os.environ,
        queue_name=settings.queue,
        worker_name=settings.name,
        prometheus=bool(settings.health_port),
    )
    cancels = CancelWatch(
        RespConnection(settings.redis_url, timeout_s=settings.redis_socket_timeout_s), keys
    )
    flow_connection = RespConnection(settings.redis_url, timeout_s=settings.redis_socket_timeout_s)
    flow = Flow(
        RedisStore(flow_connection),
        keys,
        Defaults.parse(
            settings.rate_limit, settings.max_concurrency_per_connection, settings.circuit_breaker
        ),
        now_ms=clock.now_ms,
    )
    service = RunService(
        definitions=definitions,
        credentials=CredentialSource(control_plane=control_plane, key=key),
        engine=Engine(
            transport,
            clock,
            step_parallelism=settings.step_parallelism,
            page_limits=PageLimits(
                max_pages=max(1, settings.paginate_max_pages),
                max_items=max(1, settings.paginate_max_items),
                max_bytes=max(1, settings.paginate_max_bytes),
                checkpoint_bytes=settings.paginate_checkpoint_bytes,
            ),
            flow=flow,
        ),
        sink=RedisStatusSink(
            status_connection,
            stream=settings.stream_key,
            keys=keys,
            maxlen=settings.status_stream_maxlen,
            retention_s=settings.checkpoint_retention_s,
        ),
        execlog=execlog,
        clock=clock,
        cancels=cancels,
        worker_id=settings.name,
        max_job_bytes=settings.max_job_bytes,
        long_wait_ms=int(settings.long_wait_s * 1000),
        max_foreach_items=settings.max_foreach_items,
        process_secrets=process_secrets,
        telemetry=tel,
        secrets=secrets,
    )
    metrics = RunnerMetrics(tel, redis, queue_base=keys.base, concurrency=settings.concurrency)
    tel.bind_flow(flow.stats)
    worker = QueueWorker(settings, metrics.wrap(service.handle))
    return Runtime(
        settings=settings,
        redis=redis,
        status_connection=status_connection,
        flow_connection=flow_connection,
        session=session,
        control_session=control_session,
        execlog=execlog,
        cancels=cancels,
        service=service,
        worker=worker,
        definitions=definitions,
        tokens=tokens,
        telemetry=tel,
        metrics=metrics,
    )


# Python's cyclic collector scans its youngest generation every 700 net new container objects:
# on W3 at 50 runs in flight, some 400 passes per 3,000 runs, 6-7% of the worker's CPU, and
# they find nothing, because a run leaves no reference cycles (tests/integration/
# test_no_cycles.py holds that). At 10,000 it passed once in those 3,000 runs; it stays on as
# the backstop for a cycle a library may still make, which it frees within 10,000 objects.
YOUNG_GENERATION_THRESHOLD = 10_000


def tune_collector() -> None:
    """Freeze what start-up built (modules, compiled schemas, clients: it lives as long as the
    process, and the collector's full passes no longer walk it) and raise the youngest
    generation's threshold. Called once the runtime is built, before the first job."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)


async def serve(settings: Settings) -> int:
    try:
        runtime = await build(settings)
    except RedisSetupError as err:
        log.error("redis.unusable", detail=str(err))
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # A wrong endpoint (a sentinel, a cluster node, a replica, an evicting Redis) stops
        # here with one line naming it, rather than looping on errors while /readyz says ok.
        await preflight(settings.redis_url, settings.queue_prefix)
    except RedisSetupError as err:
        log.error("redis.unusable", url=_safe_url(settings.redis_url), detail=str(err))
        with contextlib.suppress(Exception):
            await runtime.close()
        return 1
    await runtime.execlog.startup()
    runtime.cancels.start()
    if runtime.metrics is not None:
        runtime.metrics.start()
    tune_collector()
    lag = LoopLag()
    lag.start()
    await runtime.worker.start()
    log.info(
        "runner.started",
        queue=settings.queue,
        prefix=settings.queue_prefix,
        concurrency=settings.concurrency,
        stream=settings.stream_key,
        telemetry=runtime.telemetry.enabled,
    )
    health = None
    if settings.health_port:
        from runner.health import serve_health

        health = await serve_health(settings.health_port, runtime)
    died = asyncio.ensure_future(runtime.worker.loop_died.wait())
    stopping = asyncio.ensure_future(stop.wait())
    waits: set[asyncio.Future[Any]] = {died, stopping}
    if settings.burst:
        keys = Keys(settings.queue_prefix, settings.queue)
        drained = asyncio.ensure_future(until_drained(runtime.redis, keys))
        waits.add(drained)
    await asyncio.wait(waits, return_when="FIRST_COMPLETED")
    code = 1 if died.done() and not stop.is_set() else 0
    reason = "worker loop died" if code else "signal"
    if settings.burst and drained.done() and not stop.is_set():
        reason = "burst: queue drained"
    log.info("runner.stopping", reason=reason)
    await runtime.worker.close(
        settings.shutdown_grace_s, lambda: runtime.service.hand_back_all("worker shutting down")
    )
    if health is not None:
        await health.cleanup()
    for task in waits:
        task.cancel()
    with contextlib.suppress(Exception):
        await runtime.close()
    await lag.stop()
    log.info("runner.stopped", exitCode=code, maxLoopLagMs=round(lag.max_ms, 1))
    return code


def _safe_url(url: str) -> str:
    from runner.redact import Redactor

    return Redactor().url(url)


def run(settings: Settings) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps a dev box working
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


__all__ = ["Any", "Runtime", "build", "run", "serve"]
