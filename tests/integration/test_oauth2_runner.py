"""OAuth2 through real ``python -m runner`` processes: one refresh however many runs and
processes ask, the rotated tokens reported once, a refused refresh ending the run, and a refresh
after a 401.

The other side is one local aiohttp app playing three parts: the identity provider's token
endpoint (it rotates refresh tokens: a used or unknown one gets ``invalid_grant``), the protected
API (401 for any access token it did not issue, the expired one included) and the control plane
(it serves the run's credentials with an expired access token and records the rotated tokens
the runner reports). Jobs come from Node BullMQ through the Node peer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import b64key, node_peer, read_stream
from tests.workflows import job_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TENANT = "ten_acme"
CONNECTION_ID = "conn_oauth"
CLIENT_ID = "client-1"
CLIENT_SECRET = "cs-oauth-runner-7f3a"
EXPIRED_ACCESS = "at-0"
FIRST_REFRESH = "rt-0-b91c"
CONTROL_PLANE_TOKEN = "cp-token-oauth-runner"
# Bounds on how long the fake waits for the runs to line up; past them it answers anyway and the
# assertions, not a hang, report what went wrong.
LINE_UP_TIMEOUT_S = 15.0
EXPIRED_AT_MS = 1_000_000_000_000  # 2001: long expired


@dataclass
class OAuthWorld:
    """Token endpoint, protected API and control plane, with everything they saw."""

    client_auth: str = "body"
    expires_at_ms: int = EXPIRED_AT_MS
    valid_refresh: set[str] = field(default_factory=lambda: {FIRST_REFRESH})
    api_accepts: set[str] = field(default_factory=set)
    issued: int = 0
    token_requests: list[tuple[dict[str, str], str | None]] = field(default_factory=list)
    api_tokens: list[str] = field(default_factory=list)
    credential_calls: list[tuple[str, dict[str, Any], str | None]] = field(default_factory=list)
    puts: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    # Line-ups: the token endpoint answers once this many runs fetched their credentials; the
    # API answers once this many requests are in flight at once.
    token_waits_for_credentials: int = 0
    api_waits_for_requests: int = 0
    lined_up: list[bool] = field(default_factory=list)  # per wait: did the line-up happen?
    _credentials_in: asyncio.Event = field(default_factory=asyncio.Event)
    _api_in_flight: int = 0
    _api_lined_up: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_get("/api/ping", self.api)
        app.router.add_post("/runner/v1/runs/{run}/credentials", self.credentials)
        app.router.add_put("/runner/v1/connections/{id}/oauth2-token", self.report)
        return app

    def connection(self) -> dict[str, Any]:
        return {
            "id": CONNECTION_ID,
            "type": "OAUTH2",
            "config": {
                "baseUrl": self.base_url,
                "tokenUrl": f"{self.base_url}/token",
                "clientId": CLIENT_ID,
                "clientAuth": self.client_auth,
            },
            "secrets": {
                "accessToken": EXPIRED_ACCESS,
                "refreshToken": FIRST_REFRESH,
                "expiresAt": self.expires_at_ms,
                "clientSecret": CLIENT_SECRET,
            },
        }

    async def credentials(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.credential_calls.append(
            (request.match_info["run"], body, request.headers.get("Authorization"))
        )
        if len(self.credential_calls) >= self.token_waits_for_credentials:
            self._credentials_in.set()
        # Always the stale copy, as a control plane that has not seen the report yet would
        # serve it: the runner must prefer the newer token it already holds.
        return web.json_response({"connections": {CONNECTION_ID: self.connection()}, "secrets": {}})

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append((form, request.headers.get("Authorization")))
        if self.token_waits_for_credentials:
            self.lined_up.append(await _bounded(self._credentials_in.wait()))
        presented = form.get("refresh_token", "")
        if form.get("grant_type") != "refresh_token" or presented not in self.valid_refresh:
            # Echoes the token, as some servers do: it must not reach the failedReason.
            return web.json_response(
                {"error": "invalid_grant", "error_description": f"unknown token {presented}"},
                status=400,
            )
        self.valid_refresh.discard(presented)
        self.issued += 1
        access, refresh = f"at-{self.issued}", f"rt-{self.issued}"
        self.valid_refresh.add(refresh)
        self.api_accepts.add(access)
        return web.json_response(
            {
                "access_token": access,
                "refresh_token": refresh,
                "token_type": "Bearer",
                "expires_in": 3600,
            }
        )

    async def api(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.api_tokens.append(token)
        if token not in self.api_accepts:
            return web.json_response({"error": "invalid_token"}, status=401)
        if self.api_waits_for_requests:
            self._api_in_flight += 1
            if self._api_in_flight >= self.api_waits_for_requests:
                self._api_lined_up.set()
            self.lined_up.append(await _bounded(self._api_lined_up.wait()))
        return web.json_response({"ok": True})

    async def report(self, request: web.Request) -> web.Response:
        self.puts.append((request.path, request.headers.get("Authorization"), await request.json()))
        return web.Response(status=204)


def json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


async def _bounded(waiting: Any) -> bool:
    try:
        await asyncio.wait_for(waiting, LINE_UP_TIMEOUT_S)
    except TimeoutError:
        return False
    return True


def ping_version(base_url: str) -> dict[str, Any]:
    """One step calling the protected API through the OAuth2 connection."""
    return {
        "id": "wfv_oauth",
        "workflowId": "wf_oauth",
        "version": 1,
        "timeoutMs": 60_000,
        "graph": {
            "steps": [{"key": "ping", "actionId": "act_ping", "connectionId": CONNECTION_ID}]
        },
        "actions": {
            "act_ping": {
                "id": "act_ping",
                "name": "Ping",
                "method": "GET",
                "endpointTemplate": "/api/ping",
                "retryStrategy": "NONE",
                "timeoutMs": 20_000,
            }
        },
        # The definition names the connection; its config and secrets come with the run.
        "connections": {CONNECTION_ID: {"id": CONNECTION_ID, "type": "OAUTH2"}},
    }


async def start_world(serve: Any, **options: Any) -> OAuthWorld:
    world = OAuthWorld(**options)
    world.base_url = await serve(world.app())
    return world


def runner_env(world: OAuthWorld, **extra: str) -> dict[str, str]:
    return {
        "RUNNER_CONTROL_PLANE_URL": world.base_url,
        "RUNNER_CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN,
        **extra,
    }


async def run_jobs(
    queue: str, world: OAuthWorld, count: int, *, prefix: str = "run_oauth", **opts: Any
) -> dict[str, Any]:
    version = ping_version(world.base_url)
    jobs = [
        {"data": job_data(f"{prefix}_{i}", version), "opts": {"jobId": f"{prefix}_{i}", **opts}}
        for i in range(count)
    ]
    return await node_peer("run", {"queue": queue, "jobs": jobs, "timeoutMs": 45_000})


def assert_one_rotation_reported(world: OAuthWorld) -> None:
    [(path, authorization, body)] = world.puts
    assert path == f"/runner/v1/connections/{CONNECTION_ID}/oauth2-token"
    assert authorization == f"Bearer {CONTROL_PLANE_TOKEN}"
    assert body["tenantId"] == TENANT
    assert (body["accessToken"], body["refreshToken"]) == ("at-1", "rt-1")
    assert isinstance(body["expiresAt"], int) and body["expiresAt"] > EXPIRED_AT_MS


def assert_all_succeeded(report: dict[str, Any], count: int) -> None:
    assert report["unfinished"] == [], report["unfinished"]
    states = {jid: (j["state"], j["failedReason"]) for jid, j in report["jobs"].items()}
    assert len(states) == count
    assert all(state == ("completed", None) for state in states.values()), states
    for job in report["jobs"].values():
        assert job["returnvalue"]["status"] == "SUCCESS"
        assert job["returnvalue"]["steps"]["ping"]["attempts"] == 1


# --- (a) many runs in one process -------------------------------------------------------------


async def test_twenty_concurrent_runs_on_an_expired_token_refresh_once_and_report_once(
    serve: Any, runner_process: Any, clean_queue: str
) -> None:
    # Given an expired connection served with every run, and a token endpoint that answers
    # only once all twenty runs have their credentials (so they all want a token at once)
    world = await start_world(serve, client_auth="basic", token_waits_for_credentials=20)
    runner = await runner_process(**runner_env(world))  # RUNNER_CONCURRENCY: the default, 50

    # When twenty runs share it
    report = await run_jobs(clean_queue, world, 20)

    # Then all succeed, with one refresh, and the API only ever saw the new token
    assert_all_succeeded(report, 20)
    assert world.lined_up == [True]  # the twenty runs were all in flight at once
    assert world.issued == 1 and len(world.token_requests) == 1
    [(form, authorization)] = world.token_requests
    assert form == {"grant_type": "refresh_token", "refresh_token": FIRST_REFRESH}
    expected_basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert authorization == f"Basic {expected_basic}"
    assert world.api_tokens == ["at-1"] * 20
    # and the control plane got the rotated tokens exactly once
    assert_one_rotation_reported(world)
    assert len(world.credential_calls) == 20
    assert {run for run, _body, _auth in world.credential_calls} == set(report["jobs"])
    assert {(json_key(body), auth) for _run, body, auth in world.credential_calls} == {
        (
            json_key({"tenantId": TENANT, "connectionIds": [CONNECTION_ID], "secretRefs": []}),
            f"Bearer {CONTROL_PLANE_TOKEN}",
        )
    }
    # and no token reached the runner's own output
    output = runner.stdout() + runner.stderr()
    for token in ("at-1", "rt-1", FIRST_REFRESH, CLIENT_SECRET, CONTROL_PLANE_TOKEN):
        assert token not in output, token


# --- (b) two processes on one queue -----------------------------------------------------------


async def test_two_runner_processes_on_one_queue_refresh_once(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given two runners with the same credentials key, ten runs in flight each at most, and an
    # API that answers only once twenty requests are in flight (so both runners hold ten runs
    # that all needed the refreshed token)
    world = await start_world(serve, api_waits_for_requests=20)
    key = b64key(os.urandom(32))
    env = runner_env(world, RUNNER_CREDENTIALS_KEY=key, RUNNER_CONCURRENCY="10")
    first, second = await asyncio.gather(runner_process(**env), runner_process(**env))

    # When twenty runs share the expired connection
    report = await run_jobs(clean_queue, world, 20)

    # Then all succeed, both processes ran ten, and there was one refresh, reported once
    assert_all_succeeded(report, 20)
    assert world.lined_up == [True] * 20  # twenty requests in flight at once
    by_worker = Counter(job["processedBy"] for job in report["jobs"].values())
    assert by_worker == {"test-runner-0": 10, "test-runner-1": 10}
    assert world.issued == 1 and len(world.token_requests) == 1
    assert world.api_tokens == ["at-1"] * 20
    assert_one_rotation_reported(world)
    # and the token the two shared sits in Redis sealed, not in plain text
    shared = await redis.get(f"bull:{clean_queue}:oauth2:{TENANT}:{CONNECTION_ID}:token")
    assert shared is not None and shared.startswith(b"v1.")
    for token in (b"at-1", b"rt-1"):
        assert token not in shared and base64.b64encode(token) not in shared
    output = first.stdout() + first.stderr() + second.stdout() + second.stderr()
    assert "at-1" not in output and "rt-1" not in output and key not in output


# --- (c) a refused refresh --------------------------------------------------------------------


async def test_a_refused_refresh_fails_the_run_with_auth_failed_and_is_not_retried(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a token endpoint that refuses the only refresh token the run has
    world = await start_world(serve, valid_refresh=set())
    runner = await runner_process(**runner_env(world))

    # When a run with job attempts to spare needs a token
    report = await run_jobs(clean_queue, world, 1, prefix="run_refused", attempts=3)

    # Then the run fails with AUTH_FAILED, once: a refused grant is not an infrastructure error
    job = report["jobs"]["run_refused_0"]
    assert job["state"] == "failed"
    assert job["failedReason"] == (
        f"AUTH_FAILED: ping: connection {CONNECTION_ID}: token endpoint refused the refresh:"
        " HTTP 400 invalid_grant"
    )
    assert job["attemptsMade"] == 1
    assert len(world.token_requests) == 1
    assert world.api_tokens == []  # the expired token was never sent
    assert world.puts == []
    events = await read_stream(redis, f"bull:{clean_queue}:status")
    assert [(e["kind"], e["status"], e["errorCode"]) for e in events] == [
        ("run", "RUNNING", None),
        ("step", "RUNNING", None),
        ("step", "FAILED", "AUTH_FAILED"),
        ("run", "FAILED", "AUTH_FAILED"),
    ]
    # and the token the endpoint echoed in its error description went nowhere
    text = job["failedReason"] + " ".join(job["logs"]) + str(events)
    text += runner.stdout() + runner.stderr()
    assert FIRST_REFRESH not in text and CLIENT_SECRET not in text


# --- (d) refresh after a 401 ------------------------------------------------------------------


async def test_a_valid_token_refused_with_401_is_refreshed_once_and_the_request_retried(
    serve: Any, runner_process: Any, clean_queue: str
) -> None:
    # Given an access token that has not expired by the clock but was revoked: the API
    # answers 401 to it
    world = await start_world(serve, expires_at_ms=4_000_000_000_000)
    await runner_process(**runner_env(world))

    # When a run calls the API
    report = await run_jobs(clean_queue, world, 1, prefix="run_revoked")

    # Then the runner refreshed once, retried with the new token, and the step succeeded on
    # its first attempt
    assert_all_succeeded(report, 1)
    assert world.api_tokens == [EXPIRED_ACCESS, "at-1"]
    assert len(world.token_requests) == 1 and world.issued == 1
    assert_one_rotation_reported(world)
