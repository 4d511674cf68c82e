"""No secret leaves a real ``python -m runner`` process, and bad credentials fail clearly.

The canary test puts a unique random secret (``canary`` + 24 hex characters, with a ``+`` and a
``/`` so that its URL-encoded form differs from its plain one) into every place a secret can
sit: each auth type, ``envConfig.secretRefs``, the tokens an OAuth2 refresh mints, the control
plane token and the credentials key. Runs succeed, fail on auth, fail with an error that would
naturally quote a URL carrying the key, and echo the secrets back in their outputs. Afterwards
every value of every Redis key of the queue, the runners' stdout and stderr and every execution
log document in MongoDB is scanned: no canary may appear in plain text, base64 or URL-encoded.
Runs use both sealed credentials (ciphertext in the job data) and credentials fetched from the
control plane (the secrets never enter Redis at all).

Two narrower cases follow it: a key echoed past the 16 KiB output-preview limit, where the cut
falls inside a copy of it, and an OAuth2 token echoed by a slow request after the runner
refreshed twice more meanwhile. Last, bad credentials of every kind must fail the run with
``CREDENTIALS_UNAVAILABLE`` and a reason that says what is wrong, quoting no secret.

Jobs are added by the Node peer; completion is read from BullMQ's own event stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from bson import json_util
from pymongo import MongoClient

from runner.credentials import seal
from tests.conftest import b64key, node_peer, read_stream
from tests.workflows import job_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REDACTED = "[REDACTED]"
TENANT = "ten_acme"
CLIENT_ID = "client-scan-test"
SLOW_TIMEOUT_MS = 300
# The slow endpoint answers at the latest after this, so a broken runner cannot hang the test.
SLOW_RELEASE_S = 15.0


def canary() -> str:
    return f"canary{secrets.token_hex(6)}+/{secrets.token_hex(6)}"


# --- the world: an API that echoes, a token endpoint that mints canaries, a control plane ---


@dataclass
class Canaries:
    api_header: str = field(default_factory=canary)
    api_query: str = field(default_factory=canary)
    basic_user: str = field(default_factory=canary)
    basic_pass: str = field(default_factory=canary)
    custom_a: str = field(default_factory=canary)
    custom_b: str = field(default_factory=canary)
    oauth_access: str = field(default_factory=canary)
    oauth_refresh: str = field(default_factory=canary)
    oauth_client_secret: str = field(default_factory=canary)
    signing: str = field(default_factory=canary)
    control_plane_token: str = field(default_factory=canary)
    credentials_key: bytes = field(default_factory=lambda: os.urandom(32))
    minted: list[str] = field(default_factory=list)

    def secrets_of(self, cid: str) -> dict[str, Any]:
        return {
            "conn_hdr": {"apiKey": self.api_header},
            "conn_qry": {"apiKey": self.api_query},
            "conn_basic": {"username": self.basic_user, "password": self.basic_pass},
            "conn_custom": {"headers": {"X-Custom-A": self.custom_a, "X-Custom-B": self.custom_b}},
            "conn_oauth": {
                "accessToken": self.oauth_access,
                "refreshToken": self.oauth_refresh,
                "expiresAt": 1_000_000_000_000,  # long expired: refreshed before use
                "clientSecret": self.oauth_client_secret,
            },
        }[cid]

    def connection(self, base: str, cid: str) -> dict[str, Any]:
        """The connection with its secrets, as resolved for a run."""
        return {**connection_shape(base, cid), "secrets": self.secrets_of(cid)}

    def plain_secrets(self) -> list[str]:
        return [
            self.api_header,
            self.api_query,
            self.basic_user,
            self.basic_pass,
            self.custom_a,
            self.custom_b,
            self.oauth_access,
            self.oauth_refresh,
            self.oauth_client_secret,
            self.signing,
            self.control_plane_token,
            b64key(self.credentials_key),
            *self.minted,
        ]

    def pairs(self) -> list[str]:
        """What Basic auth encodes: the user's pair, and the OAuth2 client's (form-encoded)."""
        return [
            f"{self.basic_user}:{self.basic_pass}",
            f"{CLIENT_ID}:{self.oauth_client_secret}",
            f"{quote(CLIENT_ID, safe='')}:{quote(self.oauth_client_secret, safe='')}",
        ]

    def needles(self) -> dict[str, bytes]:
        """Every form a leak could take, named for the assertion message."""
        out: dict[str, bytes] = {
            "the canary prefix": b"canary",
            # base64 of anything that starts with a canary: a secret alone, or "user:pass"
            "base64 of the canary prefix": base64.b64encode(b"canary"),
        }
        for i, value in enumerate([*self.plain_secrets(), *self.pairs()]):
            for form, needle in forms(value).items():
                out[f"secret #{i} ({form})"] = needle
        return out


def forms(value: str) -> dict[str, bytes]:
    raw = value.encode()
    return {
        "plain": raw,
        "json": json.dumps(value)[1:-1].encode(),
        "url": quote(value, safe="").encode(),
        "url-path": quote(value).encode(),
        "url-plus": quote_plus(value).encode(),
        "url-lower": quote(value, safe="").lower().encode(),
        "base64": base64.b64encode(raw),
        "base64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
    }


def connection_shape(base: str, cid: str) -> dict[str, Any]:
    """A connection as the definition holds it: never with secrets."""
    config: dict[str, Any] = {
        "conn_hdr": {"apiKeyName": "X-API-Key", "apiKeyIn": "header"},
        "conn_qry": {"apiKeyName": "api_key", "apiKeyIn": "query"},
        "conn_basic": {},
        "conn_custom": {},
        "conn_oauth": {"tokenUrl": f"{base}/token", "clientId": CLIENT_ID, "clientAuth": "basic"},
    }[cid]
    kind = {
        "conn_hdr": "API_KEY",
        "conn_qry": "API_KEY",
        "conn_basic": "BASIC",
        "conn_custom": "CUSTOM_HEADER",
        "conn_oauth": "OAUTH2",
    }[cid]
    return {"id": cid, "type": kind, "config": {"baseUrl": base, **config}}


@dataclass
class World:
    canaries: Canaries
    base: str = ""
    api_requests: list[dict[str, Any]] = field(default_factory=list)
    credential_calls: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    token_reports: list[dict[str, Any]] = field(default_factory=list)
    release_slow: asyncio.Event = field(default_factory=asyncio.Event)
    hold_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release_hold: asyncio.Event = field(default_factory=asyncio.Event)
    valid_refresh: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/whoami", self.echo(200))
        app.router.add_post("/sign/{signature:.*}", self.echo(200))
        app.router.add_get("/e401", self.echo(401))
        app.router.add_get("/e403", self.echo(403))
        app.router.add_get("/e500", self.echo(500))
        app.router.add_get("/big", self.big)
        app.router.add_get("/hold", self.hold)
        app.router.add_get("/reset", self.reset)
        app.router.add_get("/slow", self.slow)
        app.router.add_post("/token", self.token)
        app.router.add_post("/runner/v1/runs/{run}/credentials", self.credentials)
        app.router.add_put("/runner/v1/connections/{id}/oauth2-token", self.report)
        return app

    async def record(self, request: web.Request) -> dict[str, Any]:
        seen = {
            "path": request.path,
            "headers": dict(request.headers),
            "query": dict(request.query),
            "body": await request.text(),
        }
        self.api_requests.append(seen)
        return seen

    def echo(self, status: int) -> Any:
        """Answers ``status`` with everything the request carried: headers, query, body."""

        async def handler(request: web.Request) -> web.Response:
            seen = await self.record(request)
            body = json.loads(seen["body"]) if seen["body"] else None
            # Every value again under names that say nothing, so only the value gives it away.
            values = [*seen["headers"].values(), *seen["query"].values(), request.path]
            echo_key = request.headers.get("X-API-Key") or request.headers.get("Authorization")
            return web.json_response(
                {
                    "headers": seen["headers"],
                    "query": seen["query"],
                    "received": body,
                    "values": values,
                },
                status=status,
                headers={"X-Echo-Key": echo_key or "-"},
            )

        return handler

    async def hold(self, request: web.Request) -> web.Response:
        """An echo that answers only once the test says so."""
        self.hold_arrived.set()
        try:
            await asyncio.wait_for(self.release_hold.wait(), SLOW_RELEASE_S)
        except TimeoutError:
            pass
        response: web.Response = await self.echo(200)(request)
        return response

    async def big(self, request: web.Request) -> web.Response:
        """An echo over the 16 KiB preview limit even once redacted (1,600 copies of
        ``"[REDACTED]"`` are about 21 KB): the key again and again, shifted by ``pad``
        characters, so that a cut made before redaction would fall inside one of its copies."""
        await self.record(request)
        pad = "x" * int(request.query.get("pad", "0"))
        key = request.headers.get("X-API-Key", "")
        return web.json_response({"pad": pad, "echo": [key] * 1600})

    async def reset(self, request: web.Request) -> web.Response:
        await self.record(request)
        assert request.transport is not None
        request.transport.abort()  # the client sees the connection drop: no response at all
        return web.Response()

    async def slow(self, request: web.Request) -> web.Response:
        await self.record(request)
        try:
            await asyncio.wait_for(self.release_slow.wait(), SLOW_RELEASE_S)
        except TimeoutError:
            pass
        return web.json_response({"late": True})

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.api_requests.append(
            {"path": request.path, "headers": dict(request.headers), "query": {}, "body": form}
        )
        presented = form.get("refresh_token", "")
        if presented not in self.valid_refresh | {self.canaries.oauth_refresh}:
            return web.json_response(
                {"error": "invalid_grant", "error_description": f"unknown {presented}"},
                status=400,
            )
        access, refresh = canary(), canary()
        self.canaries.minted += [access, refresh]
        self.valid_refresh.add(refresh)
        return web.json_response(
            {"access_token": access, "refresh_token": refresh, "expires_in": 3600}
        )

    async def credentials(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.credential_calls.append(
            (request.match_info["run"], request.headers.get("Authorization"), body)
        )
        return web.json_response(
            {
                "connections": {
                    cid: self.canaries.connection(self.base, cid) for cid in body["connectionIds"]
                },
                "secrets": {"sec_sign": self.canaries.signing},
            }
        )

    async def report(self, request: web.Request) -> web.Response:
        self.token_reports.append(await request.json())
        return web.Response(status=204)


# --- workflows ---------------------------------------------------------------------------------

FAILURES = ("e401", "e403", "e500", "reset", "slow")


def _action(name: str, method: str = "GET", endpoint: str = "") -> dict[str, Any]:
    return {
        "id": f"act_{name}",
        "name": name,
        "method": method,
        "endpointTemplate": endpoint or f"/{name}",
        "retryStrategy": "NONE",
        "timeoutMs": SLOW_TIMEOUT_MS if name == "slow" else 10_000,
    }


def canary_version(base: str, cid: str, final: str | None) -> dict[str, Any]:
    """``whoami`` and ``sign`` echo the secrets back; with a ``final`` failure, every kind of
    failure runs too (``CONTINUE``), then ``final`` fails the run."""
    steps: list[dict[str, Any]] = [
        {"key": "whoami", "actionId": "act_whoami", "connectionId": cid},
        {
            "key": "sign",
            "actionId": "act_sign",
            "connectionId": cid,
            # The signing secret in the path, the query, a header and the body.
            "input": {
                "path": {"signature": "{{ secrets.SIGNING_KEY }}"},
                "query": {"signature": "{{ secrets.SIGNING_KEY }}"},
                "headers": {"X-Signature": "{{ secrets.SIGNING_KEY }}"},
                "body": {"signature": "{{ secrets.SIGNING_KEY }}", "who": cid},
            },
        },
    ]
    if final is not None:
        steps += [
            {"key": kind, "actionId": f"act_{kind}", "connectionId": cid, "onFailure": "CONTINUE"}
            for kind in FAILURES
        ]
        steps.append({"key": "final", "actionId": f"act_{final}", "connectionId": cid})
    return {
        "id": f"wfv_{cid}_{final or 'ok'}",
        "workflowId": "wf_scan",
        "version": 1,
        "timeoutMs": 60_000,
        "envConfig": {"vars": {}, "secretRefs": {"SIGNING_KEY": "sec_sign"}},
        "graph": {"steps": steps},
        "actions": {
            a["id"]: a
            for a in [
                _action("whoami"),
                _action("sign", "POST", "/sign/{signature}"),
                *map(_action, FAILURES),
            ]
        },
        "connections": {cid: connection_shape(base, cid)},
    }


# Each connection's failing run ends on one kind of failure; the query key meets them all,
# since a failure that quotes the URL would carry it.
FINALS: dict[str, tuple[str, ...]] = {
    "conn_hdr": ("e401",),
    "conn_qry": FAILURES,
    "conn_basic": ("e403",),
    "conn_custom": ("e500",),
    "conn_oauth": ("e401",),
}


def canary_jobs(world: World) -> list[dict[str, Any]]:
    jobs = []
    for mode in ("sealed", "fetched"):
        for cid, finals in FINALS.items():
            for final in (None, *finals):
                run_id = f"run_{mode}_{cid}_{final or 'ok'}"
                extra: dict[str, Any] = {}
                if mode == "sealed":
                    creds = {
                        "connections": {cid: world.canaries.connection(world.base, cid)},
                        "secrets": {"sec_sign": world.canaries.signing},
                    }
                    extra["sealedCredentials"] = seal(
                        msgspec.json.encode(creds), world.canaries.credentials_key, run_id
                    )
                data = job_data(run_id, canary_version(world.base, cid, final), **extra)
                jobs.append({"data": data, "opts": {"jobId": run_id}})
    return jobs


# --- scanning ------------------------------------------------------------------------------


@dataclass
class Place:
    where: str
    value: bytes
    kind: str = ""


async def redis_values(redis: aioredis.Redis, queue: str) -> list[Place]:
    """Every key of the queue and every value in it, whatever the type."""
    out: list[Place] = []
    keys = [k async for k in redis.scan_iter(match=f"bull:{queue}:*", count=1000)]
    for key in keys:
        name = key.decode()
        kind = (await redis.type(key)).decode()
        values: Iterable[bytes]
        if kind == "string":
            values = [await redis.get(key)]
        elif kind == "hash":
            values = [b for pair in (await redis.hgetall(key)).items() for b in pair]
        elif kind == "list":
            values = await redis.lrange(key, 0, -1)
        elif kind == "set":
            values = await redis.smembers(key)
        elif kind == "zset":
            values = [m for m, _score in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            entries = await redis.xrange(key)
            values = [b for _id, fields in entries for pair in fields.items() for b in pair]
        else:
            raise AssertionError(f"{name}: unexpected Redis type {kind}")
        out.append(Place(f"key name {name}", key, kind))
        out.extend(Place(f"{name} ({kind})", v, kind) for v in values if v is not None)
    return out


def mongo_documents(url: str) -> list[str]:
    client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        db = client.get_default_database()
        return [
            json_util.dumps(doc) for name in db.list_collection_names() for doc in db[name].find()
        ]
    finally:
        client.close()


def assert_no_leak(needles: dict[str, bytes], places: Iterable[Place]) -> None:
    found = []
    for place in places:
        for what, needle in needles.items():
            at = place.value.find(needle)
            if at >= 0:
                context = place.value[max(at - 60, 0) : at + 100]
                found.append(f"{what} in {place.where}: ...{context!r}...")
    assert not found, f"{len(found)} leaks:\n" + "\n".join(found[:40])


async def add_and_wait(
    redis: aioredis.Redis, queue: str, jobs: list[dict[str, Any]], timeout_s: float = 60
) -> dict[str, tuple[str, str | None]]:
    """Node BullMQ adds the jobs, then ``wait_finished``."""
    report = await node_peer("add", {"queue": queue, "jobs": jobs})
    assert len(report["ids"]) == len(jobs)
    return await wait_finished(redis, queue, report["ids"], timeout_s)


async def wait_finished(
    redis: aioredis.Redis, queue: str, ids: list[str], timeout_s: float = 60
) -> dict[str, tuple[str, str | None]]:
    """BullMQ's own event stream says when each job finished. Returns
    ``{jobId: (state, failedReason)}`` read back from the job hashes. (The Node peer's ``run``
    report is cut at 64 KiB: it exits before a large stdout write drains.)"""
    pending = set(ids)
    last_id = "0-0"
    async with asyncio.timeout(timeout_s):
        while pending:
            answer = await redis.xread({f"bull:{queue}:events": last_id}, block=5000, count=500)
            for _stream, entries in answer:
                for entry_id, fields in entries:
                    last_id = entry_id
                    if fields.get(b"event") in (b"completed", b"failed"):
                        pending.discard(fields[b"jobId"].decode())
    out: dict[str, tuple[str, str | None]] = {}
    for jid in ids:
        completed = await redis.zscore(f"bull:{queue}:completed", jid)
        reason = await redis.hget(f"bull:{queue}:{jid}", "failedReason")
        out[jid] = ("completed" if completed is not None else "failed", reason and reason.decode())
    return out


@pytest.fixture
async def second_queue(redis: aioredis.Redis) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    keys = [k async for k in redis.scan_iter(match=f"bull:{name}:*", count=1000)]
    if keys:
        await redis.delete(*keys)


# --- the canary test -----------------------------------------------------------------------


async def test_no_secret_reaches_redis_logs_stdout_or_mongodb(
    serve: Any,
    runner_process: Any,
    clean_queue: str,
    second_queue: str,
    redis: aioredis.Redis,
    mongo_db_url: str,
) -> None:
    # Given the echoing API, token endpoint and control plane, and two runners holding the
    # control plane token and the credentials key: one logging executions to MongoDB, one to
    # stdout, each on its own queue
    canaries = Canaries()
    world = World(canaries)
    world.base = await serve(world.app())
    env = {
        "RUNNER_CONTROL_PLANE_URL": world.base,
        "RUNNER_CONTROL_PLANE_TOKEN": canaries.control_plane_token,
        "RUNNER_CREDENTIALS_KEY": b64key(canaries.credentials_key),
    }
    to_mongo, to_stdout = await asyncio.gather(
        runner_process(**env, RUNNER_MONGODB_URL=mongo_db_url),
        runner_process(**env, RUNNER_QUEUE=second_queue, RUNNER_LOG_LEVEL="debug"),
    )

    # When the same runs, sealed and fetched, go through each
    jobs = canary_jobs(world)
    try:
        finished = await asyncio.gather(
            *(add_and_wait(redis, queue, jobs) for queue in (clean_queue, second_queue))
        )
    finally:
        world.release_slow.set()
    # Stopping flushes the execution logs and completes stdout.
    codes = await asyncio.gather(*(asyncio.to_thread(r.terminate) for r in (to_mongo, to_stdout)))
    assert codes == [0, 0]

    # Then every run ended as designed
    for outcome in finished:
        for jid, (state, _reason) in outcome.items():
            assert state == ("completed" if jid.endswith("_ok") else "failed"), outcome[jid]
    failed = {jid: reason for jid, (_state, reason) in finished[0].items()}
    assert failed == {jid: reason for jid, (_state, reason) in finished[1].items()}
    for mode in ("sealed", "fetched"):
        assert failed[f"run_{mode}_conn_hdr_e401"] == "HTTP_ERROR: final: GET answered 401"
        assert failed[f"run_{mode}_conn_basic_e403"] == "HTTP_ERROR: final: GET answered 403"
        assert failed[f"run_{mode}_conn_custom_e500"] == "HTTP_ERROR: final: GET answered 500"
        assert failed[f"run_{mode}_conn_oauth_e401"] == "HTTP_ERROR: final: GET answered 401"
        assert failed[f"run_{mode}_conn_qry_reset"] == (
            "CONNECTION_ERROR: final: connection to 127.0.0.1 failed: ServerDisconnectedError"
        )
        assert failed[f"run_{mode}_conn_qry_slow"] == (
            "TIMEOUT: final: no complete response from 127.0.0.1 within 0.3 s"
        )

    # and the secrets really were sent (else the scan below proves nothing): each in the form
    # its auth type puts on the wire. The expired access token is refreshed before any use.
    sent = json.dumps(world.api_requests).encode()
    on_the_wire = [
        canaries.api_header,
        canaries.api_query,
        canaries.custom_a,
        canaries.custom_b,
        canaries.signing,
        canaries.oauth_refresh,
        *canaries.minted[::2],  # every access token minted; the last refresh token is unused
    ]
    for value in on_the_wire:
        assert forms(value)["plain"] in sent, "a canary was never used"
    basic_user, _client, oauth_client_encoded = canaries.pairs()
    assert forms(basic_user)["base64"] in sent
    assert forms(oauth_client_encoded)["base64"] in sent
    assert len(canaries.minted) >= 4  # the first refresh, and at least one after a 401
    assert {auth for _run, auth, _body in world.credential_calls} == {
        f"Bearer {canaries.control_plane_token}"
    }
    assert world.token_reports, "the refreshed OAuth2 tokens were reported"

    # and every echo came back redacted in the status stream's output preview
    for queue in (clean_queue, second_queue):
        events = await read_stream(redis, f"bull:{queue}:status")
        previews = {
            (e["workflowRunId"], e["stepKey"]): e["output"]
            for e in events
            if e["kind"] == "step" and e["status"] == "SUCCESS"
        }
        for mode in ("sealed", "fetched"):
            echoed = {cid: previews[(f"run_{mode}_{cid}_ok", "whoami")]["body"] for cid in FINALS}
            assert echoed["conn_hdr"]["headers"]["X-API-Key"] == REDACTED
            assert echoed["conn_qry"]["query"]["api_key"] == REDACTED
            assert echoed["conn_basic"]["headers"]["Authorization"] == REDACTED
            assert echoed["conn_custom"]["headers"]["X-Custom-A"] == REDACTED
            assert echoed["conn_custom"]["headers"]["X-Custom-B"] == REDACTED
            assert echoed["conn_oauth"]["headers"]["Authorization"] == REDACTED
            # values under names that say nothing are masked by value
            assert REDACTED in echoed["conn_hdr"]["values"]
            assert previews[(f"run_{mode}_conn_hdr_ok", "whoami")]["headers"]["x-echo-key"] == (
                REDACTED
            )
            signed = previews[(f"run_{mode}_conn_hdr_ok", "sign")]["body"]
            assert signed["received"] == {"signature": REDACTED, "who": "conn_hdr"}
            assert signed["query"]["signature"] == REDACTED
            assert signed["headers"]["X-Signature"] == REDACTED
            assert signed["values"][-1] == f"/sign/{REDACTED}"

    # and no canary, in any form, is anywhere: Redis, stdout, stderr, MongoDB
    places: list[Place] = []
    for queue in (clean_queue, second_queue):
        places += await redis_values(redis, queue)
    for name, runner in (("mongo runner", to_mongo), ("stdout runner", to_stdout)):
        places.append(Place(f"{name} stdout", runner.stdout().encode()))
        places.append(Place(f"{name} stderr", runner.stderr().encode()))
    documents = mongo_documents(mongo_db_url)
    places += [Place(f"execution log {doc}", doc.encode()) for doc in documents]
    assert_no_leak(canaries.needles(), places)

    # and the places scanned did hold the runs' records
    assert {"string", "hash", "list", "zset", "stream"} <= {p.kind for p in places}
    run_ids = {job["opts"]["jobId"] for job in jobs}
    assert {json.loads(doc)["workflowRunId"] for doc in documents} == run_ids
    stdout_exec = [e for e in to_stdout.log_events() if e.get("event") == "exec"]
    assert {e.get("runId") for e in stdout_exec} == run_ids


# --- truncation ---------------------------------------------------------------------------

PADS = range(0, 35, 5)  # each copy of the key takes 35 characters of JSON: cover them all


async def test_a_secret_cut_by_the_output_preview_limit_is_not_left_half_visible(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API that echoes the key hundreds of times, past the 16 KiB preview limit
    canaries = Canaries()
    world = World(canaries)
    world.base = await serve(world.app())
    runner = await runner_process(RUNNER_CREDENTIALS_KEY=b64key(canaries.credentials_key))
    run_id = "run_big_echo"
    version = {
        **canary_version(world.base, "conn_hdr", None),
        "id": "wfv_big",
        "envConfig": {},
        "graph": {
            "steps": [
                {
                    "key": f"big_{pad}",
                    "actionId": "act_big",
                    "connectionId": "conn_hdr",
                    "input": {"query": {"pad": pad}},
                }
                for pad in PADS
            ]
        },
    }
    version["actions"] = {"act_big": _action("big")}
    creds = {"connections": {"conn_hdr": canaries.connection(world.base, "conn_hdr")}}
    sealed = seal(msgspec.json.encode(creds), canaries.credentials_key, run_id)
    job = {"data": job_data(run_id, version, sealedCredentials=sealed), "opts": {"jobId": run_id}}

    # When the run echoes it in every step
    finished = await add_and_wait(redis, clean_queue, [job])

    # Then the run succeeded, its outputs travelled as truncated previews
    assert finished == {run_id: ("completed", None)}
    events = await read_stream(redis, f"bull:{clean_queue}:status")
    previews = [e["output"] for e in events if e["kind"] == "step" and e["status"] == "SUCCESS"]
    assert len(previews) == len(PADS)
    assert all(p["truncated"] is True and p["status"] == 200 for p in previews)
    # and no preview ends in the first characters of the key
    cut_short = [p["preview"][-40:] for p in previews if "canary" in p["preview"]]
    assert cut_short == [], "the preview is cut before redaction: a prefix of the key shows"
    places = await redis_values(redis, clean_queue)
    places += [Place("stdout", runner.stdout().encode()), Place("stderr", runner.stderr().encode())]
    assert_no_leak(canaries.needles(), places)


# --- OAuth2 rotation during a request --------------------------------------------------------


async def test_an_oauth2_token_rotated_twice_during_a_slow_request_is_still_redacted(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    """The runner forgets all but the last two refreshed tokens of a connection; a request
    still in flight with an older one must not have its echo of that token go out unmasked."""
    canaries = Canaries()
    world = World(canaries)
    world.base = await serve(world.app())
    runner = await runner_process(
        RUNNER_CREDENTIALS_KEY=b64key(canaries.credentials_key),
        RUNNER_CONTROL_PLANE_URL=world.base,
    )

    def oauth_job(run_id: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
        version = {
            **canary_version(world.base, "conn_oauth", None),
            "id": f"wfv_{run_id}",
            "envConfig": {},
            "graph": {"steps": steps},
        }
        version["actions"] = {"act_hold": _action("hold"), "act_e401": _action("e401")}
        creds = {"connections": {"conn_oauth": canaries.connection(world.base, "conn_oauth")}}
        sealed = seal(msgspec.json.encode(creds), canaries.credentials_key, run_id)
        return {
            "data": job_data(run_id, version, sealedCredentials=sealed),
            "opts": {"jobId": run_id},
        }

    # Given a run whose request, sent with the first refreshed token, is held by the API
    slow = oauth_job(
        "run_slow", [{"key": "hold", "actionId": "act_hold", "connectionId": "conn_oauth"}]
    )
    await node_peer("add", {"queue": clean_queue, "jobs": [slow]})
    await asyncio.wait_for(world.hold_arrived.wait(), SLOW_RELEASE_S)
    # When another run's 401s make the runner refresh twice more meanwhile
    rejected = oauth_job(
        "run_rejected",
        [
            {
                "key": k,
                "actionId": "act_e401",
                "connectionId": "conn_oauth",
                "onFailure": "CONTINUE",
            }
            for k in ("first", "second")
        ],
    )
    await add_and_wait(redis, clean_queue, [rejected])
    assert len(canaries.minted) == 6  # three refreshes
    # and then the held request's answer echoes the token it was sent with
    world.release_hold.set()
    assert await wait_finished(redis, clean_queue, ["run_slow"]) == {
        "run_slow": ("completed", None)
    }

    # Then that token is masked like the others
    [held] = [r for r in world.api_requests if r["path"] == "/hold"]
    assert held["headers"]["Authorization"] == f"Bearer {canaries.minted[0]}"
    places = await redis_values(redis, clean_queue)
    places += [Place("stdout", runner.stdout().encode()), Place("stderr", runner.stderr().encode())]
    assert_no_leak(canaries.needles(), places)


# --- bad credentials -------------------------------------------------------------------------


def api_key_version(base: str, version_id: str = "wfv_bad") -> dict[str, Any]:
    return {
        "id": version_id,
        "workflowId": "wf_bad",
        "version": 1,
        "timeoutMs": 60_000,
        "graph": {"steps": [{"key": "call", "actionId": "act_whoami", "connectionId": "conn_api"}]},
        "actions": {"act_whoami": _action("whoami")},
        "connections": {
            "conn_api": {
                "id": "conn_api",
                "type": "API_KEY",
                "config": {"baseUrl": base, "apiKeyName": "X-API-Key", "apiKeyIn": "header"},
            }
        },
    }


async def test_bad_credentials_fail_the_run_with_a_clear_reason_and_no_secret(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a control plane whose answer depends on the run, and an API that must not be called
    key = os.urandom(32)
    secret = canary()
    api_calls: list[str] = []
    answers: dict[str, tuple[int, dict[str, Any]]] = {}

    async def whoami(request: web.Request) -> web.Response:
        api_calls.append(request.path)
        return web.json_response({})

    async def credentials(request: web.Request) -> web.Response:
        status, body = answers[request.match_info["run"]]
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/runner/v1/runs/{run}/credentials", credentials)
    base = await serve(app)
    version = api_key_version(base)

    def conn(**fields: Any) -> dict[str, Any]:
        return {"id": "conn_api", "type": "API_KEY", "config": {}, **fields}

    def sealed(
        run_id: str, creds: dict[str, Any], *, sealed_key: bytes = key, aad: str = ""
    ) -> str:
        return seal(msgspec.json.encode(creds), sealed_key, aad or run_id)

    answers["run_unknown_type"] = (200, {"connections": {"conn_api": conn(type="SAML")}})
    answers["run_cp_403"] = (403, {"error": f"forbidden {secret}"})
    answers["run_cp_500"] = (500, {"error": f"boom {secret}"})
    answers["run_ghost"] = (200, {"connections": {}, "secrets": {}})
    answers["run_missing_ref"] = (
        200,
        {"connections": {"conn_api": conn(secrets={"apiKey": secret})}, "secrets": {}},
    )
    typo = {"connections": {"conn_api": conn(secrets={"apikey": secret})}}
    good = {"connections": {"conn_api": conn(secrets={"apiKey": secret})}}
    ghost_version = {**api_key_version(base, "wfv_ghost"), "connections": {}}
    ghost_version["graph"] = {
        "steps": [{"key": "call", "actionId": "act_whoami", "connectionId": "conn_ghost"}]
    }
    ref_version = {
        **api_key_version(base, "wfv_ref"),
        "envConfig": {"secretRefs": {"SIGNING_KEY": "sec_sign"}},
    }
    runs: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("run_unknown_type", job_data("run_unknown_type", version), {}),
        (
            "run_missing_field",
            job_data(
                "run_missing_field", version, sealedCredentials=sealed("run_missing_field", typo)
            ),
            {},
        ),
        (
            "run_wrong_key",
            job_data(
                "run_wrong_key",
                version,
                sealedCredentials=sealed("run_wrong_key", good, sealed_key=os.urandom(32)),
            ),
            {},
        ),
        (
            "run_other_run",
            job_data(
                "run_other_run", version, sealedCredentials=sealed("run_x", good, aad="run_x")
            ),
            {},
        ),
        (
            "run_not_envelope",
            job_data("run_not_envelope", version, sealedCredentials="v2.not-sealed"),
            {},
        ),
        ("run_cp_403", job_data("run_cp_403", version), {"attempts": 2}),
        ("run_cp_500", job_data("run_cp_500", version), {"attempts": 2}),
        ("run_ghost", job_data("run_ghost", ghost_version), {}),
        ("run_missing_ref", job_data("run_missing_ref", ref_version), {}),
    ]
    runner = await runner_process(
        RUNNER_CONTROL_PLANE_URL=f"{base}/",
        RUNNER_CONTROL_PLANE_TOKEN=canary(),
        RUNNER_CREDENTIALS_KEY=b64key(key),
    )

    # When each run starts
    report = await node_peer(
        "run",
        {
            "queue": clean_queue,
            "jobs": [{"data": d, "opts": {"jobId": rid, **o}} for rid, d, o in runs],
            "timeoutMs": 30_000,
        },
    )

    # Then each fails with CREDENTIALS_UNAVAILABLE (the control plane's 5xx: its own code)
    # and says what is wrong
    reasons = {jid: job["failedReason"] for jid, job in report["jobs"].items()}
    does_not_decrypt = (
        "CREDENTIALS_UNAVAILABLE: sealedCredentials does not decrypt:"
        " sealed under another key or for another run"
    )
    assert reasons == {
        "run_unknown_type": (
            "CREDENTIALS_UNAVAILABLE: credentials do not decode:"
            " $.connections[\"conn_api\"].type: invalid enum value 'SAML'"
        ),
        "run_missing_field": (
            "CREDENTIALS_UNAVAILABLE: call: connection conn_api (API_KEY): secrets.apiKey is missing"
        ),
        "run_wrong_key": does_not_decrypt,
        "run_other_run": does_not_decrypt,
        "run_not_envelope": (
            "CREDENTIALS_UNAVAILABLE: sealedCredentials is not a v1.<nonce>.<ciphertext> envelope"
        ),
        "run_cp_403": (
            "CREDENTIALS_UNAVAILABLE: control plane answered 403 for the credentials of run"
            " 'run_cp_403'"
        ),
        "run_cp_500": (
            "CONTROL_PLANE_UNAVAILABLE: control plane answered 500 for the credentials of run"
            " 'run_cp_500'"
        ),
        "run_ghost": (
            "CREDENTIALS_UNAVAILABLE: $.graph.steps[0].connectionId: connection 'conn_ghost' is"
            " neither in the definition nor in the run's credentials"
        ),
        "run_missing_ref": (
            "CREDENTIALS_UNAVAILABLE: $.envConfig.secretRefs.SIGNING_KEY: secret ref 'sec_sign'"
            " was not resolved for the run"
        ),
    }
    assert all(job["state"] == "failed" for job in report["jobs"].values())
    # A refusal is final; a control plane 5xx is an infrastructure failure, retried by BullMQ.
    attempts = {jid: job["attemptsMade"] for jid, job in report["jobs"].items()}
    assert attempts == {**{jid: 1 for jid in attempts}, "run_cp_500": 2}
    assert api_calls == []
    # and the status stream says FAILED with the same code for every run
    events = await read_stream(redis, f"bull:{clean_queue}:status")
    final = {
        e["workflowRunId"]: e for e in events if e["kind"] == "run" and e["status"] != "RUNNING"
    }
    assert {rid: (e["status"], e["errorCode"]) for rid, e in final.items()} == {
        **{rid: ("FAILED", "CREDENTIALS_UNAVAILABLE") for rid in reasons},
        "run_cp_500": ("FAILED", "CONTROL_PLANE_UNAVAILABLE"),
    }
    # and no secret went anywhere
    places = await redis_values(redis, clean_queue)
    places += [Place("stdout", runner.stdout().encode()), Place("stderr", runner.stderr().encode())]
    assert_no_leak({"canary": b"canary", "base64 canary": b"Y2FuYXJ5"}, places)
