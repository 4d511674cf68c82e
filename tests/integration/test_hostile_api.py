"""Hostile APIs: huge bodies, lying lengths, slow drips, bad JSON, SSRF, path injection.

Each test aims a workflow step, through the real engine and the real HTTP transport
(``tests.integration.harness``), at a local aiohttp server that misbehaves on purpose, and
checks that the run fails with the right errorCode, quickly, and that the server saw only what
it should have.
"""

from __future__ import annotations

import asyncio
import tracemalloc
import zlib
from typing import Any

import pytest
from aiohttp import web

from tests.integration.harness import (
    Api,
    action,
    declare_length,
    drip,
    redirect,
    reply,
    run_workflow,
    step,
    stream,
    version,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
# A retry policy that would retry anything retryable: the failures below must not be retried.
RETRYING: dict[str, Any] = {"retryStrategy": "FIXED", "maxAttempts": 3, "initialDelayMs": 10}


def one_step(url: str, key: str = "fetch", **action_fields: Any) -> dict[str, Any]:
    return version([step(key)], [action(url, **action_fields)])


async def test_a_50_mb_streamed_body_fails_response_too_large_with_flat_memory(
    serve: Any,
) -> None:
    # Given an API that streams 50 MB in chunks without a Content-Length
    api = Api(stream(50 * MiB))
    base = await serve(api.app())

    # When a step reads it with a 1 MiB response cap, memory traced throughout
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        record = await run_workflow(
            one_step(f"{base}/export", **RETRYING), max_response_bytes=1 * MiB
        )
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Then the step fails RESPONSE_TOO_LARGE on its only attempt
    assert record.outcome.status == "FAILED"
    assert record.error_code("fetch") == "RESPONSE_TOO_LARGE"
    error = record.outcome.steps["fetch"].error
    assert error is not None
    assert error.message == "fetch: response from 127.0.0.1 is over the 1048576-byte limit"
    assert len(api.hits) == 1
    # and memory stayed flat: the body was never held whole
    assert peak_bytes < 8 * MiB, f"peak {peak_bytes / MiB:.1f} MiB"
    # and the client hung up instead of draining the rest
    await asyncio.wait_for(api.disconnected.wait(), 2)
    assert api.streamed_bytes < 50 * MiB


async def test_a_compressed_body_that_inflates_past_the_cap_fails_with_flat_memory(
    serve: Any,
) -> None:
    # Given an API that sends 50 MB of zeros gzipped into about 50 KB (a decompression bomb)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = packer.compress(bytes(50 * MiB)) + packer.flush()
    assert len(bomb) < 1 * MiB

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=bomb,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        )

    api = Api(gzipped)
    base = await serve(api.app())
    del packer

    # When a step reads it with a 1 MiB cap, memory traced throughout
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        record = await run_workflow(one_step(f"{base}/bomb"), max_response_bytes=1 * MiB)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Then the cap applies to the inflated body, and inflating stopped near it
    assert record.error_code("fetch") == "RESPONSE_TOO_LARGE"
    assert peak_bytes < 8 * MiB, f"peak {peak_bytes / MiB:.1f} MiB"


async def test_a_content_length_over_the_cap_fails_before_the_body_is_read(serve: Any) -> None:
    # Given an API that declares 50 MB and then sends nothing
    api = Api(declare_length(50 * MiB, max_s=5))
    base = await serve(api.app())

    # When a step with a 1 MiB cap and a 5 s timeout calls it
    record = await run_workflow(
        one_step(f"{base}/export", timeoutMs=5000, **RETRYING), max_response_bytes=1 * MiB
    )

    # Then it fails at once from the header alone (reading would wait for the timeout)
    assert record.elapsed_s < 1.0, record.elapsed_s
    assert record.error_code("fetch") == "RESPONSE_TOO_LARGE"
    error = record.outcome.steps["fetch"].error
    assert error is not None
    assert "declares 52428800 bytes, over the 1048576-byte limit" in error.message
    assert len(api.hits) == 1


async def test_a_slow_drip_is_cut_off_by_the_timeout(serve: Any) -> None:
    # Given an API that sends headers and then one byte every 50 ms, for ever
    api = Api(drip(every_s=0.05, chunk=b"x", max_s=5, content_type="text/plain"))
    base = await serve(api.app())

    # When a step with a 400 ms timeout and no retry calls it
    record = await run_workflow(one_step(f"{base}/feed", timeoutMs=400))

    # Then the attempt ends as TIMEOUT close to its timeout, and the connection is dropped
    assert record.outcome.status == "FAILED"
    assert record.error_code("fetch") == "TIMEOUT"
    assert 0.4 <= record.elapsed_s < 1.5, record.elapsed_s
    assert record.outcome.steps["fetch"].attempts == 1
    assert api.streamed_bytes > 0
    await asyncio.wait_for(api.disconnected.wait(), 2)


async def test_a_json_content_type_with_a_body_that_is_not_json_is_response_invalid(
    serve: Any,
) -> None:
    # Given an API that says application/json but sends HTML
    api = Api(reply(200, text="<html>oops</html>", content_type="application/json"))
    base = await serve(api.app())

    # When a step calls it
    record = await run_workflow(one_step(f"{base}/thing", **RETRYING))

    # Then the step fails RESPONSE_INVALID, once, saying what was wrong
    assert record.outcome.status == "FAILED"
    assert record.error_code("fetch") == "RESPONSE_INVALID"
    error = record.outcome.steps["fetch"].error
    assert error is not None and error.status == 200
    assert "Content-Type application/json but its body is not valid JSON" in error.message
    assert len(api.hits) == 1
    (failed,) = record.step_events("fetch", "FAILED")
    assert failed["errorMessage"] == error.message


async def test_a_step_aimed_at_cloud_metadata_is_egress_denied(serve: Any) -> None:
    # Given the default egress policy (only loopback allowed, for the tests' own servers)
    # When a step aims at the cloud metadata address
    record = await run_workflow(
        one_step("http://169.254.169.254/latest/meta-data/iam/", timeoutMs=5000, **RETRYING)
    )

    # Then it is refused before any connection attempt (one would hang), and not retried
    assert record.elapsed_s < 1.0, record.elapsed_s
    assert record.error_code("fetch") == "EGRESS_DENIED"
    error = record.outcome.steps["fetch"].error
    assert error is not None
    assert error.message == "fetch: 169.254.169.254 is link-local"
    assert record.outcome.steps["fetch"].attempts == 1
    assert record.sleeps_s == []


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "127.0.0.1 is loopback"),
        ("localhost", "localhost is a loopback name"),
        ("0x7f.1", "0x7f.1 (127.0.0.1) is loopback"),
    ],
)
async def test_loopback_without_the_allow_list_is_egress_denied_and_nothing_arrives(
    serve: Any, host: str, reason: str
) -> None:
    # Given a real server on 127.0.0.1 and an egress policy without an allow list
    api = Api(reply(200, {"secret": "internal"}))
    base = await serve(api.app())
    port = base.rsplit(":", 1)[1]

    # When a step aims at it
    record = await run_workflow(
        one_step(f"http://{host}:{port}/admin", **RETRYING), egress_allow=()
    )

    # Then it fails EGRESS_DENIED and the server received nothing
    assert record.error_code("fetch") == "EGRESS_DENIED"
    error = record.outcome.steps["fetch"].error
    assert error is not None and error.message == f"fetch: {reason}"
    assert api.hits == []
    assert record.outcome.steps["fetch"].attempts == 1


async def test_a_redirect_within_the_policy_is_followed(serve: Any) -> None:
    # The control for the denials below: redirects are followed when enabled.
    api = Api(redirect("/final"), reply(200, {"ok": True}))
    base = await serve(api.app())

    record = await run_workflow(one_step(f"{base}/start"), follow_redirects=True)

    assert record.outcome.status == "SUCCESS", record.job_log
    assert [h.path for h in api.hits] == ["/start", "/final"]


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://10.0.0.1/admin", "10.0.0.1 is private"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is link-local"),
        ("http://localhost:{port}/internal", "localhost is a loopback name"),
    ],
)
async def test_a_redirect_to_a_private_address_is_egress_denied(
    serve: Any, target: str, reason: str
) -> None:
    # Given an allowed API that redirects to a denied destination (for localhost, itself)
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    port = base.rsplit(":", 1)[1]
    api.script = (redirect(target.format(port=port)),)

    # When a step calls it with redirects followed
    record = await run_workflow(
        one_step(f"{base}/start", timeoutMs=5000, **RETRYING), follow_redirects=True
    )

    # Then the hop is refused: EGRESS_DENIED, at once, and the target received nothing
    assert record.elapsed_s < 1.0, record.elapsed_s
    assert record.error_code("fetch") == "EGRESS_DENIED"
    error = record.outcome.steps["fetch"].error
    assert error is not None and error.message == f"fetch: {reason}"
    assert [h.path for h in api.hits] == ["/start"]


@pytest.mark.parametrize(
    ("value", "segment"),
    [
        ("../admin", "..%2Fadmin"),
        ("a/b?c#d@e", "a%2Fb%3Fc%23d%40e"),
        ("%2e%2e", "%252e%252e"),
        ("..%2Fadmin", "..%252Fadmin"),
    ],
)
async def test_a_path_parameter_cannot_change_the_path(
    serve: Any, value: str, segment: str
) -> None:
    # Given an API that records the raw request target
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    definition = version(
        [step("get_item", input={"path": {"itemId": "{{ input.itemId }}"}})],
        [action(f"{base}/items/{{itemId}}/detail")],
    )

    # When a step fills the path parameter with a hostile value
    record = await run_workflow(definition, run_input={"itemId": value})

    # Then the server sees one encoded segment in place, and the path around it unchanged
    assert record.outcome.status == "SUCCESS", record.job_log
    (hit,) = api.hits
    assert hit.raw_path == f"/items/{segment}/detail"


@pytest.mark.parametrize("value", ["..", ".", ""])
async def test_a_dot_segment_path_parameter_is_refused(serve: Any, value: str) -> None:
    # Given an API behind a templated path
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    definition = version(
        [step("get_item", input={"path": {"itemId": "{{ input.itemId }}"}})],
        [action(f"{base}/items/{{itemId}}/detail")],
    )

    # When the value would be normalised away as a dot segment (or is empty)
    record = await run_workflow(definition, run_input={"itemId": value})

    # Then the step fails before sending anything
    assert record.error_code("get_item") == "TEMPLATE_ERROR"
    error = record.outcome.steps["get_item"].error
    assert error is not None
    assert "may not be empty, '.' or '..'" in error.message
    assert api.hits == []
