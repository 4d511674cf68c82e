"""A run, failed or not, leaves no reference cycles behind.

Why it matters twice: a cycle keeps a run's objects (its context with the connections'
credentials, the request with its headers, a failed socket) in memory after the run, until
Python's cyclic collector happens to pass, against CONTRACT §4 ("secrets live in memory for
the run only"); and because runs leave none, the runner can ask that collector to pass rarely
(``runner.app.tune_collector``), which saves about 6% of its CPU.

Each test runs with the collector off, then asks it what it would have had to free, and fails
naming any runner object, frame or function among it, an aiohttp request (it holds the
headers) or an open socket.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from bullmq import Queue
from sample_api import SampleApi

import runner
from runner.app import YOUNG_GENERATION_THRESHOLD, build, tune_collector
from runner.contract import decode_job_data
from runner.credentials import seal
from runner.definitions import DefinitionStore
from runner.errors import DefinitionError
from runner.redact import Redactor
from runner.settings import Settings
from tests.conftest import REDIS_URL, b64key, free_port
from tests.integration.harness import Api, action, hang, reply, run_workflow, step, version
from tests.workflows import job_data, three_step_version

pytestmark = pytest.mark.integration

PACKAGE = str(Path(runner.__file__).parent) + "/"


def _describe(obj: Any) -> str | None:
    """What ``obj`` is, if it is something a run must not leave in a cycle; else None."""
    if isinstance(obj, type(gc.get_referrers)):  # builtin functions and methods
        return None
    if type(obj).__name__ == "frame":
        code = obj.f_code
        if code.co_filename.startswith(PACKAGE):
            return f"frame of {code.co_name} ({code.co_filename.removeprefix(PACKAGE)})"
        return None
    if isinstance(obj, socket.socket) and obj.fileno() != -1:
        return f"open socket {obj!r}"
    module = getattr(type(obj), "__module__", "") or ""
    if type(obj).__name__ == "function":
        module = obj.__module__ or ""
        if module.startswith("runner"):
            return f"function {obj.__qualname__} ({module})"
        return None
    if module.startswith("runner") or type(obj).__name__ == "ClientRequest":
        return f"{type(obj).__name__} ({module})"
    return None


@contextmanager
def no_cycles_left() -> Iterator[None]:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = sorted({d for d in map(_describe, gc.garbage) if d is not None})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert not found, "left in reference cycles:\n" + "\n".join(found)


def _one_step(base: str, **action_fields: Any) -> dict[str, Any]:
    return version(
        [step("s", input={"query": {"q": "{{ input.q }}"}})],
        [action(f"{base}/thing", **{"timeoutMs": 200, **action_fields})],
    )


RETRIED = {"retryStrategy": "FIXED", "maxAttempts": 2, "initialDelayMs": 10}


@pytest.mark.parametrize(
    ("answer", "action_fields"),
    [
        pytest.param(reply(200, {"id": 1}), {}, id="success"),
        pytest.param(reply(500, {"error": "boom"}), {}, id="http-500"),
        pytest.param(reply(503, {"error": "busy"}), RETRIED, id="http-503-retried"),
        pytest.param(reply(404, {"error": "gone"}), {}, id="http-404"),
        pytest.param(hang(2.0), {}, id="attempt-timeout"),
    ],
)
async def test_a_run_leaves_no_cycles_whatever_the_api_answers(
    serve: Any, answer: Any, action_fields: dict[str, Any]
) -> None:
    # Given an API that answers this way (a hang is cut by the action's 200 ms timeout)
    base = await serve(Api(then=answer).app())
    definition = _one_step(base, **action_fields)
    # When a run goes through the real engine and HTTP transport with the collector off
    with no_cycles_left():
        record = await run_workflow(definition, run_input={"q": "x"})
        del record
    # Then nothing of it waits in a cycle (the context manager checks)


async def test_a_refused_connection_leaves_no_cycles() -> None:
    # Given nothing listening at the action's port (aiohttp's happy-eyeballs failure path keeps
    # its exceptions in a list its frames hold: a cycle holding the request and the socket)
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with no_cycles_left():
        record = await run_workflow(_one_step(base), run_input={"q": "x"})
        assert record.error_code("s") == "CONNECTION_ERROR"
        del record


async def test_a_template_error_leaves_no_cycles(serve: Any) -> None:
    base = await serve(Api(then=reply(200, {})).app())
    with no_cycles_left():
        record = await run_workflow(_one_step(base), run_input={})  # no input.q
        assert record.error_code("s") == "TEMPLATE_ERROR"
        del record


async def test_a_definition_that_cannot_be_loaded_leaves_no_cycles() -> None:
    # Given a store with no control plane, asked for a version the job does not carry
    store = DefinitionStore(None)
    job = decode_job_data(
        {"workflowRunId": "run_c", "workflowVersionId": "wfv_x", "tenantId": "t", "input": {}}
    )
    with no_cycles_left():
        with pytest.raises(DefinitionError):
            await store.plan_for(job)
        await asyncio.sleep(0)


def test_a_redactor_of_secrets_leaves_no_cycles() -> None:
    # A run's redactor compiles its secrets into a pattern; the words must go with it
    with no_cycles_left():
        redactor = Redactor(["s3cr3t-value-0001", "another-s3cret-02"], ["X-Api-Key"])
        assert redactor.text("a s3cr3t-value-0001 b") != "a s3cr3t-value-0001 b"
        del redactor


def test_tune_collector_freezes_start_up_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_the_whole_runner_leaves_no_cycles_for_runs_that_succeed_or_fail(
    serve: Any, clean_queue: str, credentials_key: bytes
) -> None:
    # Given the runner's runtime, built as `python -m runner` builds it, in this process
    api_key = "k-cycles-0001"
    good = await serve(SampleApi(api_key).app())
    failing = await serve(Api(then=reply(500, {"error": "boom"})).app())
    settings = Settings.from_env(
        {
            "RUNNER_REDIS_URL": REDIS_URL,
            "RUNNER_QUEUE": clean_queue,
            "RUNNER_EGRESS_ALLOW": "127.0.0.0/8",
            "RUNNER_CREDENTIALS_KEY": b64key(credentials_key),
            "RUNNER_LOG_LEVEL": "error",
        }
    )
    runtime = await build(settings)
    queue = Queue(clean_queue, {"connection": REDIS_URL})

    def sealed(run_id: str) -> str:
        connection = {"id": "conn_api", "type": "API_KEY", "config": {}}
        connection["secrets"] = {"apiKey": api_key}
        creds = {"connections": {"conn_api": connection}, "secrets": {}}
        return seal(msgspec.json.encode(creds), credentials_key, run_id)

    # and jobs that succeed (with sealed credentials), fail on a 500, name a definition that
    # cannot be loaded, or are not a run at all
    jobs: list[dict[str, Any]] = []
    for i in range(4):
        for base, kind in ((good, "ok"), (failing, "500")):
            run_id = f"run_{kind}_{i}"
            v = three_step_version(base, version_id=f"wfv_{kind}")
            v["connections"]["conn_api"]["config"]["baseUrl"] = base
            jobs.append(job_data(run_id, v, sealedCredentials=sealed(run_id)))
        jobs.append(job_data(f"run_missing_{i}", None))
        jobs.append({"workflowRunId": i})
    try:
        await runtime.execlog.startup()
        runtime.cancels.start()
        await runtime.worker.start()
        # When they all run with the collector off
        with no_cycles_left():
            for data in jobs:
                await queue.add("workflow_run", data, {"attempts": 1})
            for _ in range(200):
                counts = await queue.getJobCounts("completed", "failed")
                if counts["completed"] + counts["failed"] == len(jobs):
                    break
                await asyncio.sleep(0.05)
            # Then they ran as expected, and nothing of theirs waits in a cycle
            assert counts == {"completed": 4, "failed": 12}, counts
    finally:
        await runtime.worker.close(5.0)
        await runtime.close()
        await queue.close()
