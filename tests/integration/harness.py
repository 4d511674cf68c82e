"""An in-process runner for integration tests: the real engine, the real HTTP transport.

``run_workflow(definition)`` decodes and compiles a definition dict the way a job's inline
``workflowVersion`` is, then runs it through ``Engine`` with:

- ``HttpTransport`` over a real aiohttp session from ``make_session`` (``GuardedResolver`` in
  the connector) and an ``EgressPolicy`` that by default allows ``127.0.0.0/8`` only;
- ``RecordingClock`` (``runner.testing``): the system clock, which really sleeps, and also
  records each sleep asked;
- ``RunReporter`` over ``MemoryStatusSink`` and ``MemoryExecutionLog``, wired by the test kit
  (``runner.testing.engine_run``) as every in-memory run is.

It returns a ``RunRecord``: the outcome, the decoded status events, the job log lines, the
progress values and the execution-log documents, plus the requested sleeps and the wall time.

``Api`` is the other side: a local HTTP API whose answers are scripted request by request
(``reply``, ``hang``, ``drip``, ...) and which records every request it receives with its
arrival time, so tests measure waits where they happen, on the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from runner.contract import decode_workflow_version
from runner.engine.plan import compile_plan
from runner.engine.run import RunOutcome
from runner.http.client import HttpTransport, make_session
from runner.http.egress import EgressPolicy
from runner.http.oauth2 import OAuth2TokenManager
from runner.testing import RecordingClock, engine_run

RUN_ID = "run_it_1"
TENANT_ID = "ten_it"
LOOPBACK_ALLOWED = ("127.0.0.0/8",)

# --- definitions ----------------------------------------------------------------------------


def action(
    endpoint: str, *, action_id: str = "act", method: str = "GET", **fields: Any
) -> dict[str, Any]:
    """An Action as the control plane sends it; ``fields`` use the wire's camelCase names."""
    return {
        "id": action_id,
        "name": action_id,
        "method": method,
        "endpointTemplate": endpoint,
        **fields,
    }


def step(key: str, action_id: str = "act", **fields: Any) -> dict[str, Any]:
    return {"key": key, "actionId": action_id, **fields}


def version(
    steps: Sequence[Mapping[str, Any]],
    actions: Sequence[Mapping[str, Any]],
    *,
    timeout_ms: int = 60_000,
    version_id: str = "wfv_it",
) -> dict[str, Any]:
    return {
        "id": version_id,
        "workflowId": "wf_it",
        "version": 1,
        "timeoutMs": timeout_ms,
        "graph": {"steps": list(steps)},
        "actions": {a["id"]: dict(a) for a in actions},
        "connections": {},
    }


# --- the runner side ------------------------------------------------------------------------


@dataclass
class RunRecord:
    outcome: RunOutcome
    events: list[dict[str, Any]]
    job_log: list[str]
    progress: list[dict[str, Any]]
    exec_docs: list[dict[str, Any]]
    sleeps_s: list[float]
    elapsed_s: float

    def step_events(self, key: str, status: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("stepKey") == key and (status is None or e["status"] == status)
        ]

    def attempt_docs(self, key: str) -> list[dict[str, Any]]:
        """The execution-log documents of finished attempts (they carry the request's method)."""
        return [d for d in self.exec_docs if d["stepKey"] == key and "method" in d["context"]]

    def error_code(self, key: str) -> str | None:
        error = self.outcome.steps[key].error
        return str(error.code) if error is not None else None


async def run_workflow(
    definition: Mapping[str, Any],
    *,
    run_input: Mapping[str, Any] | None = None,
    run_id: str = RUN_ID,
    deadline_in_ms: int | None = None,
    max_response_bytes: int = 10 * 1024 * 1024,
    follow_redirects: bool = False,
    egress_allow: Sequence[str] = LOOPBACK_ALLOWED,
    step_parallelism: int = 8,
) -> RunRecord:
    """Run ``definition`` once, in this process, and record everything it reported."""
    plan = compile_plan(decode_workflow_version(dict(definition)))
    clock = RecordingClock()
    policy = EgressPolicy(tuple(egress_allow))
    session = make_session(policy)
    try:
        tokens = OAuth2TokenManager(
            session=session,
            redis=None,
            key_prefix="it:oauth2",
            credentials_key=None,
            control_plane_url=None,
            control_plane_token=None,
            now_ms=clock.now_ms,
        )
        transport = HttpTransport(
            session,
            policy=policy,
            tokens=tokens,
            now_ms=clock.now_ms,
            max_response_bytes=max_response_bytes,
            follow_redirects=follow_redirects,
        )
        running, setup = engine_run(
            plan,
            transport,
            clock,
            run_id=run_id,
            tenant_id=TENANT_ID,
            input=dict(run_input or {}),
            deadline_in_ms=deadline_in_ms,
            step_parallelism=step_parallelism,
        )
        began = time.monotonic()
        outcome = await running
        elapsed_s = time.monotonic() - began
    finally:
        await session.close()
    job = setup.sink.job(run_id)
    return RunRecord(
        outcome=outcome,
        events=[json.loads(raw) for raw in setup.sink.events],
        job_log=job.lines,
        progress=job.progress_values,
        exec_docs=setup.execlog.for_run(run_id),
        sleeps_s=clock.sleeps_s,
        elapsed_s=elapsed_s,
    )


# --- the API side ---------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Hit:
    """One request as the server received it."""

    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes
    at_s: float  # time.monotonic() on arrival
    at_wall_s: float  # time.time() on arrival

    @property
    def path(self) -> str:
        return self.raw_path.split("?", 1)[0]


class Api:
    """A local API: request ``i`` is answered by ``script[i]``, later ones by ``then`` (by
    default the script's last handler). Every request is recorded in ``hits``, and every byte
    of body a handler streamed is counted in ``streamed_bytes``."""

    def __init__(self, *script: Handler, then: Handler | None = None) -> None:
        if not script and then is None:
            raise ValueError("an Api needs at least one handler")
        self.script = script
        self.then = then if then is not None else script[-1]
        self.hits: list[Hit] = []
        self.streamed_bytes = 0
        self.disconnects = 0
        # Set when a handler sees its client hang up, so a test can await it.
        self.disconnected = asyncio.Event()

    def saw_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.hits.append(
            Hit(
                method=request.method,
                raw_path=request.raw_path,
                headers=dict(request.headers),
                body=body,
                at_s=time.monotonic(),
                at_wall_s=time.time(),
            )
        )
        index = len(self.hits) - 1
        handler = self.script[index] if index < len(self.script) else self.then
        request[_API] = self
        return await handler(request)

    def gaps_s(self) -> list[float]:
        """Seconds between consecutive arrivals, as the server measured them."""
        return [b.at_s - a.at_s for a, b in zip(self.hits, self.hits[1:], strict=False)]


_API = web.RequestKey("api", Api)


def reply(
    status: int = 200,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    text: str | None = None,
    content_type: str | None = None,
) -> Handler:
    """A complete answer: JSON ``body`` or raw ``text``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if text is not None:
            return web.Response(
                status=status,
                text=text,
                content_type=content_type or "text/plain",
                headers=dict(headers or {}),
            )
        if body is None:
            return web.Response(status=status, headers=dict(headers or {}))
        return web.json_response(body, status=status, headers=dict(headers or {}))

    return handler


def with_headers(make_headers: Callable[[], Mapping[str, str]], status: int) -> Handler:
    """An empty answer whose headers are computed when the request arrives."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=dict(make_headers()))

    return handler


async def until_disconnected(request: web.Request, max_s: float) -> bool:
    """Wait until the client hangs up (True) or ``max_s`` passes (False).

    aiohttp does not cancel a handler when its client goes away, so a handler that stalls on
    purpose polls for it; the bound keeps a server's shutdown from waiting on a stuck handler.
    """
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        if request.transport is None or request.transport.is_closing():
            api = request.get(_API)
            if api is not None:
                api.saw_disconnect()
            return True
        await asyncio.sleep(0.01)
    return False


def hang(max_s: float = 5.0) -> Handler:
    """Never send headers: hold the request until the client gives up."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await until_disconnected(request, max_s)
        return web.Response(status=200)

    return handler


def drip(
    *,
    every_s: float = 0.05,
    chunk: bytes = b" ",
    max_s: float = 5.0,
    content_type: str = "application/json",
) -> Handler:
    """Headers at once, then the body a few bytes at a time until the client hangs up."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await response.prepare(request)
        api = request[_API]
        deadline = time.monotonic() + max_s
        try:
            while time.monotonic() < deadline:
                await response.write(chunk)
                api.streamed_bytes += len(chunk)
                if await until_disconnected(request, every_s):
                    break
        except ConnectionError:
            api.saw_disconnect()
        return response

    return handler


def stream(total_bytes: int, *, chunk_bytes: int = 64 * 1024) -> Handler:
    """``total_bytes`` of body in chunks, chunked encoding (no Content-Length). Stops when the
    client hangs up; ``Api.streamed_bytes`` counts what went out."""
    piece = b"x" * chunk_bytes

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/octet-stream"}
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        api = request[_API]
        sent = 0
        try:
            while sent < total_bytes:
                if request.transport is None or request.transport.is_closing():
                    api.saw_disconnect()
                    break
                size = min(chunk_bytes, total_bytes - sent)
                await response.write(piece if size == chunk_bytes else piece[:size])
                sent += size
                api.streamed_bytes += size
        except ConnectionError:
            api.saw_disconnect()
        return response

    return handler


def declare_length(content_length: int, *, max_s: float = 5.0) -> Handler:
    """Headers declaring ``content_length`` bytes, then no body at all until the client hangs
    up: a client that waits for the body before checking the size stalls here."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.content_length = content_length
        await response.prepare(request)
        await until_disconnected(request, max_s)
        return response

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return handler
