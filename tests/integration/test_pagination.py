"""Pagination through real ``python -m runner`` processes, Redis and Node BullMQ, against a
local API that paginates in every mode: all pages in order, the Link header, caps, a 429 and a
500 on page 3 retried, an OAuth2 token expiring between pages, next URLs to another origin
refused, and a run killed mid-pagination resumed at the page it was on."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import node_peer, read_stream
from tests.integration import harness
from tests.workflows import job_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ITEMS = [{"id": i} for i in range(1, 11)]  # ten items: pages of 3 are 3, 3, 3, 1
PAGE = 3


@dataclass
class PagedApi:
    """Lists ``ITEMS`` by cursor, offset, page number, next URL in the body or in Link.
    ``fail[(route, page)]`` answers those statuses first (``"hang"``: hold the request until
    the client goes away); ``hang`` holds one page's first request so; every request is recorded in ``hits``."""

    fail: dict[tuple[str, int], list[int | str]] = field(default_factory=dict)
    next_override: dict[int, str] = field(default_factory=dict)  # page -> next URL to send
    hang: tuple[str, int] | None = None
    hits: list[tuple[str, int, dict[str, str], dict[str, str]]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    bearer: Any = None  # a callable(token) -> bool: the API checks tokens when set
    retry_after: str = "0"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{route}", self.handle)
        return app

    def pages(self, route: str) -> list[int]:
        return [number for r, number, _q, _h in self.hits if r == route]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route, q = request.match_info["route"], dict(request.query)
        start, number = self._where(route, q)
        self.hits.append((route, number, q, dict(request.headers)))
        if self.bearer is not None:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not await self.bearer(token, number):
                return web.json_response({"error": "invalid_token"}, status=401)
        script = self.fail.get((route, number))
        behaviour: int | str | None = script.pop(0) if script else None
        if self.hang == (route, number):
            self.hang, behaviour = None, "hang"
        if behaviour == "hang":
            self.arrived.set()
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.02)
            return web.Response(status=503)
        if isinstance(behaviour, int):
            return web.json_response(
                {"error": "scripted"}, status=behaviour, headers={"Retry-After": self.retry_after}
            )
        chunk = ITEMS[start : start + PAGE]
        following = start + PAGE if start + PAGE < len(ITEMS) else None
        if route == "cursor":
            return web.json_response(
                {"data": chunk, "next": f"c{following}" if following else None}
            )
        if route == "offset":
            return web.json_response({"rows": ITEMS[start : start + int(q["limit"])]})
        if route == "page":
            return web.json_response({"items": chunk, "has_more": following is not None})
        url = self.next_override.get(number) or (
            f"/{route}?page={number + 1}" if following is not None else None
        )
        if route == "next":
            return web.json_response({"results": chunk, "links": {"next": url}})
        headers = {"Link": f'<{url}>; rel="next", </link?page=1>; rel="first"'} if url else {}
        return web.json_response(chunk, headers=headers)

    @staticmethod
    def _where(route: str, q: dict[str, str]) -> tuple[int, int]:
        """The first item's index and the page number a request asks for."""
        if route == "cursor":
            start = int(q.get("cursor", "c0")[1:])
        elif route == "offset":
            start = int(q["offset"])
        else:
            start = (int(q.get("page", "1")) - 1) * PAGE
        return start, start // PAGE + 1


MODES: dict[str, dict[str, Any]] = {
    "cursor": {"mode": "cursor", "items": "$.data[*]", "cursorPath": "$.next"},
    "offset": {"mode": "offset", "items": "$.rows", "limit": PAGE},
    "page": {"mode": "page", "items": "$.items[*]", "hasMorePath": "$.has_more"},
    "next": {"mode": "nextUrl", "items": "$.results[*]", "nextUrlPath": "$.links.next"},
    "link": {"mode": "nextUrl"},
}


def paged_version(
    base: str,
    route: str,
    *,
    version_id: str | None = None,
    step_paginate: dict[str, Any] | None = None,
    connection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    step: dict[str, Any] = {
        "key": "list",
        "actionId": "act_list",
        "connectionId": "c",
        "extract": {"ids": "$.items[*].id"},
    }
    if step_paginate is not None:
        step["paginate"] = step_paginate
    return {
        "id": version_id or f"wfv_pages_{route}",
        "timeoutMs": 60_000,
        "graph": {"steps": [step]},
        "actions": {
            "act_list": {
                "id": "act_list",
                "method": "GET",
                "endpointTemplate": f"/{route}",
                "retryStrategy": "FIXED",
                "maxAttempts": 3,
                "initialDelayMs": 10,
                "idempotencyHeader": "Idempotency-Key",
                "timeoutMs": 20_000,
                "paginate": MODES[route],
            }
        },
        "connections": {
            "c": connection or {"id": "c", "type": "NONE", "config": {"baseUrl": base}}
        },
    }


async def run_jobs(queue: str, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec = [
        {"data": job_data(run_id, version), "opts": {"jobId": run_id}}
        for run_id, version in jobs.items()
    ]
    report = await node_peer("run", {"queue": queue, "jobs": spec, "timeoutMs": 45_000})
    assert report["unfinished"] == [], report["unfinished"]
    return dict(report["jobs"])


async def step_output(redis: aioredis.Redis, queue: str, run_id: str) -> Any:
    events = await read_stream(redis, f"bull:{queue}:status")
    [done] = [
        e
        for e in events
        if e["workflowRunId"] == run_id and e.get("stepKey") == "list" and e["status"] != "RUNNING"
    ]
    return done


async def test_every_mode_gathers_every_page_in_order(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = PagedApi()
    base = await serve(api.app())
    await runner_process()

    jobs = await run_jobs(clean_queue, {f"run_{r}": paged_version(base, r) for r in MODES})

    for route in MODES:
        job = jobs[f"run_{route}"]
        assert job["state"] == "completed", (route, job["failedReason"])
        done = await step_output(redis, clean_queue, f"run_{route}")
        output = done["output"]
        assert output["items"] == ITEMS, route
        assert output["ids"] == list(range(1, 11))
        assert (output["pages"], output["itemCount"], output["truncated"]) == (4, 10, False)
        assert api.pages(route) == [1, 2, 3, 4], route
        assert job["returnvalue"]["steps"]["list"]["attempts"] == 4
        # One RUNNING event for the step, not one per page; a job-log line per page.
        events = await read_stream(redis, f"bull:{clean_queue}:status")
        running = [
            e for e in events if e["workflowRunId"] == f"run_{route}" and e["status"] == "RUNNING"
        ]
        assert len(running) == 2  # the run's and the step's
        assert sum(" page " in line for line in job["logs"]) == 3
    assert MODES["offset"]["limit"] == 3
    assert {q.get("limit") for r, _n, q, _h in api.hits if r == "offset"} == {"3"}
    # Every page has its own idempotency key; the first keeps the step's.
    keys = [h["Idempotency-Key"] for r, _n, _q, h in api.hits if r == "cursor"]
    assert keys == ["run_cursor:list"] + [f"run_cursor:list:page:{n}" for n in (2, 3, 4)]
    # The checkpoint kept no page once the step had finished.
    fields = await redis.hkeys(f"bull:{clean_queue}:run:run_cursor")
    assert not [f for f in fields if f.startswith(b"page:")], fields


async def test_caps_truncate_or_fail_with_pagination_limit(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = PagedApi()
    base = await serve(api.app())
    await runner_process(RUNNER_PAGINATE_MAX_PAGES="3")

    jobs = await run_jobs(
        clean_queue,
        {
            "run_pages": paged_version(base, "cursor", step_paginate={"maxPages": 2}),
            "run_items": paged_version(base, "page", step_paginate={"maxItems": 5}),
            "run_ceiling": paged_version(base, "next", step_paginate={"maxPages": 50}),
            "run_fail": paged_version(
                base, "offset", step_paginate={"maxPages": 2, "onLimit": "FAIL"}
            ),
        },
    )

    out = (await step_output(redis, clean_queue, "run_pages"))["output"]
    assert (out["items"], out["truncated"], out["stoppedBy"]) == (ITEMS[:6], True, "maxPages")
    out = (await step_output(redis, clean_queue, "run_items"))["output"]
    assert (out["items"], out["truncated"], out["stoppedBy"]) == (ITEMS[:5], True, "maxItems")
    out = (await step_output(redis, clean_queue, "run_ceiling"))["output"]
    assert (out["pages"], out["stoppedBy"]) == (3, "maxPages")  # RUNNER_PAGINATE_MAX_PAGES
    job = jobs["run_fail"]
    assert job["state"] == "failed"
    assert job["failedReason"] == (
        "PAGINATION_LIMIT: list: maxPages (2) reached after 2 pages and 6 items (onLimit FAIL)"
    )
    assert api.pages("offset") == [1, 2]


async def test_a_429_and_a_500_on_page_3_are_retried_and_every_page_gathered(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = PagedApi(fail={("cursor", 3): [500, 429], ("link", 2): [503]})
    base = await serve(api.app())
    await runner_process()

    jobs = await run_jobs(
        clean_queue,
        {"run_retry": paged_version(base, "cursor"), "run_l": paged_version(base, "link")},
    )

    job = jobs["run_retry"]
    assert job["state"] == "completed", job["failedReason"]
    assert api.pages("cursor") == [1, 2, 3, 3, 3, 4]
    assert (await step_output(redis, clean_queue, "run_retry"))["output"]["items"] == ITEMS
    assert job["returnvalue"]["steps"]["list"]["attempts"] == 6
    failed = [line for line in job["logs"] if "failed" in line]
    assert len(failed) == 2 and "500" in failed[0] and "429" in failed[1], failed
    # The same page is asked for again with the same key.
    keys = {h["Idempotency-Key"] for r, n, _q, h in api.hits if r == "cursor" and n == 3}
    assert keys == {"run_retry:list:page:3"}
    assert jobs["run_l"]["state"] == "completed"
    assert api.pages("link") == [1, 2, 2, 3, 4]


async def test_a_next_url_to_another_origin_or_a_denied_host_is_refused(
    serve: Any, runner_process: Any, clean_queue: str
) -> None:
    elsewhere = PagedApi()
    other = await serve(elsewhere.app())
    api = PagedApi(next_override={2: f"{other}/next?page=3"})
    base = await serve(api.app())
    metadata = PagedApi(next_override={1: "http://169.254.169.254/latest/meta-data"})
    base_meta = await serve(metadata.app())
    key = "k-pages-secret-4d1"
    conn = {
        "id": "c",
        "type": "API_KEY",
        "config": {"baseUrl": base, "apiKeyName": "X-API-Key", "apiKeyIn": "header"},
        "secrets": {"apiKey": key},
    }

    async def credentials(request: web.Request) -> web.Response:
        return web.json_response({"connections": {"c": conn}, "secrets": {}})

    control = web.Application()
    control.router.add_post("/runner/v1/runs/{run}/credentials", credentials)
    control_url = await serve(control)
    await runner_process(RUNNER_CONTROL_PLANE_URL=control_url, RUNNER_CONTROL_PLANE_TOKEN="cp")

    jobs = await run_jobs(
        clean_queue,
        {
            "run_other": paged_version(base, "next", connection=conn),
            "run_link": paged_version(base, "link", connection=conn, version_id="wfv_l2"),
            "run_meta": paged_version(base_meta, "next", version_id="wfv_meta"),
        },
    )

    for run_id in ("run_other", "run_link"):
        job = jobs[run_id]
        assert job["state"] == "failed"
        assert job["failedReason"] == (
            "EGRESS_DENIED: list: the next page's URL is on another origin (127.0.0.1): refused,"
            " since the connection's credentials go to its own origin only"
        )
    assert elsewhere.hits == []  # never called, so the key never went there
    assert [h["X-API-Key"] for _r, _n, _q, h in api.hits] == [key] * 4
    assert jobs["run_meta"]["failedReason"].startswith(
        "EGRESS_DENIED: list: the next page's URL is on another origin (169.254.169.254)"
    )


# --- OAuth2: the token expires between pages ----------------------------------------------


@dataclass
class TokenWorld:
    """Token endpoint (rotating refresh tokens, short-lived access tokens), control plane."""

    base: str = ""
    ttl_s: float = 1.0
    issued: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    refresh: str = "rt-0"
    count: int = 0
    puts: list[dict[str, Any]] = field(default_factory=list)
    seen: list[tuple[int, str]] = field(default_factory=list)  # (page, token)

    def app(self, api: PagedApi) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/runner/v1/runs/{run}/credentials", self.credentials)
        app.router.add_put("/runner/v1/connections/{id}/oauth2-token", self.report)
        app.router.add_get("/{route}", api.handle)
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("refresh_token") != self.refresh:
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.count += 1
        access, self.refresh = f"at-{self.count}", f"rt-{self.count}"
        self.issued[access] = time.monotonic() + self.ttl_s
        return web.json_response(
            {"access_token": access, "refresh_token": self.refresh, "expires_in": self.ttl_s}
        )

    async def credentials(self, request: web.Request) -> web.Response:
        conn = {
            "id": "c",
            "type": "OAUTH2",
            "config": {"baseUrl": self.base, "tokenUrl": f"{self.base}/token", "clientId": "cl"},
            "secrets": {
                "accessToken": "at-0",
                "refreshToken": "rt-0",
                "expiresAt": 1_000_000_000_000,
                "clientSecret": "cs-1",
            },
        }
        return web.json_response({"connections": {"c": conn}, "secrets": {}})

    async def report(self, request: web.Request) -> web.Response:
        self.puts.append(await request.json())
        return web.Response(status=204)

    async def check(self, token: str, page: int) -> bool:
        self.seen.append((page, token))
        ok = self.issued.get(token, 0) > time.monotonic()
        if ok and page == 1:
            # Answer page 1 only once its token has expired: page 2 needs a new one.
            await asyncio.sleep(max(0.0, self.issued[token] - time.monotonic()) + 0.1)
        return ok


async def test_an_oauth2_token_expiring_between_pages_is_refreshed_for_the_next(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    world = TokenWorld()
    api = PagedApi(bearer=world.check)
    world.base = await serve(world.app(api))
    await runner_process(
        RUNNER_CONTROL_PLANE_URL=world.base,
        RUNNER_CONTROL_PLANE_TOKEN="cp-pages",
        RUNNER_OAUTH2_SKEW_S="0",
    )
    version = paged_version(world.base, "page")
    version["connections"] = {"c": {"id": "c", "type": "OAUTH2"}}
    version["actions"]["act_list"]["retryStrategy"] = "NONE"

    jobs = await run_jobs(clean_queue, {"run_oauth_pages": version})

    job = jobs["run_oauth_pages"]
    assert job["state"] == "completed", job["failedReason"]
    out = (await step_output(redis, clean_queue, "run_oauth_pages"))["output"]
    assert out["items"] == ITEMS
    pages_by_token = {page: token for page, token in world.seen if token in world.issued}
    assert pages_by_token[1] == "at-1" and pages_by_token[2] != "at-1"
    assert world.count >= 2 and len(world.puts) == world.count
    assert job["returnvalue"]["steps"]["list"]["attempts"] == 4  # no attempt was lost to it


# --- resume ---------------------------------------------------------------------------------


async def test_a_run_killed_mid_pagination_resumes_at_the_page_it_was_on(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = PagedApi(hang=("cursor", 3))
    base = await serve(api.app())
    fast_locks = {"RUNNER_LOCK_DURATION_MS": "1500", "RUNNER_STALLED_INTERVAL_MS": "500"}
    first = await runner_process(**fast_locks)
    run_id = "run_pages_kill"
    data = job_data(run_id, paged_version(base, "cursor"))
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )

    # When the runner dies while page 3 is in flight
    await asyncio.wait_for(api.arrived.wait(), 15)
    run_key = f"bull:{clean_queue}:run:{run_id}"
    assert await redis.hexists(run_key, "page:list:2")
    first.terminate(signal.SIGKILL)
    await runner_process(**fast_locks)

    # Then another runner continues at page 3, without fetching pages 1 and 2 again
    deadline = time.monotonic() + 20
    while await redis.zscore(f"bull:{clean_queue}:completed", run_id) is None:
        assert time.monotonic() < deadline, "the run did not complete on the second runner"
        await asyncio.sleep(0.05)
    assert api.pages("cursor") == [1, 2, 3, 3, 4]
    done = await step_output(redis, clean_queue, run_id)
    assert done["status"] == "SUCCESS"
    assert done["output"]["items"] == ITEMS and done["output"]["pages"] == 4
    keys = [h["Idempotency-Key"] for _r, n, _q, h in api.hits if n == 3]
    assert keys == [f"{run_id}:list:page:3"] * 2
    fields = await redis.hkeys(run_key)
    assert not [f for f in fields if f.startswith(b"page:")], fields


async def test_a_long_retry_after_on_a_page_hands_the_job_back_and_it_continues_there(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given page 3 answering 429 with a wait longer than the runner holds a slot for
    api = PagedApi(fail={("offset", 3): [429]}, retry_after="2")
    base = await serve(api.app())
    await runner_process(RUNNER_LONG_WAIT_S="1")
    version = paged_version(base, "offset")
    version["actions"]["act_list"]["maxDelayMs"] = 5000

    # When the run gets there
    jobs = await run_jobs(clean_queue, {"run_pages_later": version})

    # Then the job was handed back as delayed and the next delivery went on at page 3,
    # attempt 2, without pages 1 and 2 again
    job = jobs["run_pages_later"]
    assert job["state"] == "completed", job["failedReason"]
    assert api.pages("offset") == [1, 2, 3, 3, 4]
    done = await step_output(redis, clean_queue, "run_pages_later")
    assert done["output"]["items"] == ITEMS
    assert job["returnvalue"]["steps"]["list"]["attempts"] == 5
    events = await read_stream(redis, f"bull:{clean_queue}:status")
    running = [
        e["attempt"]
        for e in events
        if e["workflowRunId"] == "run_pages_later" and e.get("stepKey") and e["status"] == "RUNNING"
    ]
    assert running == [1, 2]  # the first delivery's first page, the second's resumed page


# --- the response cap and timeouts apply per page (in-process engine, real HTTP) -------------


async def test_the_response_cap_and_the_step_timeout_apply_to_every_page(serve: Any) -> None:
    def listing(base: str, **fields: Any) -> dict[str, Any]:
        act = harness.action(
            f"{base}/x",
            paginate={"mode": "nextUrl"},
            retryStrategy="FIXED",
            maxAttempts=2,
            initialDelayMs=10,
            **fields,
        )
        return harness.version([harness.step("list")], [act])

    more = {"Link": '</x?page=2>; rel="next"'}
    big = harness.Api(harness.reply(200, [1], headers=more), harness.reply(200, ["y" * 5000]))
    base = await serve(big.app())
    record = await harness.run_workflow(listing(base), max_response_bytes=2000)
    assert record.error_code("list") == "RESPONSE_TOO_LARGE"
    assert len(big.hits) == 2  # not retryable: page 2 once

    slow = harness.Api(harness.reply(200, [1], headers=more), harness.hang(5.0), harness.hang(5.0))
    base = await serve(slow.app())
    record = await harness.run_workflow(listing(base, timeoutMs=300))
    assert record.error_code("list") == "TIMEOUT"
    assert [h.raw_path for h in slow.hits] == ["/x", "/x?page=2", "/x?page=2"]
    assert record.outcome.steps["list"].attempts == 3  # page 1 once, page 2 twice


async def test_a_shutdown_mid_pagination_hands_back_the_page_at_the_attempt_it_was_on(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given page 3 failing once, then hanging on its second attempt, then failing once more:
    # with maxAttempts 3, the run succeeds only if the hand-back continues page 3 at attempt 2
    api = PagedApi(fail={("page", 3): [500, "hang", 500]})
    base = await serve(api.app())
    first = await runner_process(RUNNER_SHUTDOWN_GRACE_S="0.5")
    run_id = "run_pages_term"
    data = job_data(run_id, paged_version(base, "page"))
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )
    await asyncio.wait_for(api.arrived.wait(), 15)

    # When the runner is told to stop while page 3 hangs past the grace period
    await runner_process()
    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.proc.wait, 20) == 0

    deadline = time.monotonic() + 20
    while await redis.zscore(f"bull:{clean_queue}:completed", run_id) is None:
        assert time.monotonic() < deadline, "the handed-back run did not complete"
        await asyncio.sleep(0.05)
    assert api.pages("page") == [1, 2, 3, 3, 3, 3, 4]
    done = await step_output(redis, clean_queue, run_id)
    assert done["output"]["items"] == ITEMS
    # Every page's attempts: 1 + 1 + 3 + 1; the interrupted attempt 2 was sent again as 2.
    assert done["attempt"] == 6
