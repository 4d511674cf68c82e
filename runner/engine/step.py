"""One step: decide ``when``, render its request, run its attempts under the retry policy.

The attempt loop is the only place that sleeps between attempts, and it never starts an
attempt or a wait that cannot end before the run's deadline: each attempt's timeout is the
step's ``timeoutMs`` cut down to the time left, and a delay past the deadline fails the step
with ``WORKFLOW_TIMEOUT`` at once (``runner.retry.decide``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import msgspec

from runner import jsonlimits
from runner.contract import Connection
from runner.engine.admission import admit
from runner.engine.plan import StepPlan
from runner.engine.ports import (
    Attempt,
    Clock,
    Deferral,
    FlowControl,
    FlowGate,
    Grant,
    Reporter,
    RunContext,
    StepResult,
    Transport,
)
from runner.engine.schemas import PlanSchemas, check_output, check_request
from runner.errors import (
    DefinitionError,
    ErrorCode,
    ResponseError,
    RunnerError,
    StepHTTPError,
    TemplateError,
    WorkflowTimeout,
)
from runner.http.messages import HttpRequest, HttpResponse
from runner.http.request import base_url_for, build_request
from runner.retry import RetryDecision, decide, parse_retry_after_s
from runner.telemetry import NOOP_STEP_SPAN, AttemptSpan, StepSpan
from runner.templating import render, truthy

_decode_json = msgspec.json.Decoder().decode
_NOT_JSON = object()  # a body that did not decode
_TOO_DEEP = object()  # a body nested deeper than RUNNER_MAX_JSON_DEPTH
_UNSAFE_METHODS = frozenset({"POST", "PATCH"})
LEASE_MARGIN_MS = 5_000
"""A concurrency lease outlives its attempt's timeout by this much, then expires on its own
(a runner killed mid-request does not hold the slot for ever)."""

OFF_LOOP_BYTES = 64 * 1024
"""A response body larger than this is decoded, validated and extracted in a worker thread,
so that one run's large body does not hold the event loop (and every other run) while it is
worked on. Below it the work takes well under a millisecond and a thread hop would cost more
(``scripts/bench`` reports the loop's worst lag)."""


def idempotency_key(run_id: str, step_key: str) -> str:
    """CONTRACT §5: the same on every attempt and after a resume."""
    return f"{run_id}:{step_key}"


def should_run(
    sp: StepPlan, scope: Mapping[str, Any], now_ms: Callable[[], int] | None = None
) -> bool:
    return sp.when is None or truthy(render(sp.when, scope, now_ms))


def prepare_request(
    sp: StepPlan,
    ctx: RunContext,
    scope: Mapping[str, Any],
    schemas: PlanSchemas,
    now_ms: Callable[[], int] | None = None,
    idempotency: str | None = None,
) -> HttpRequest:
    """Render the step's input into a request and check it against the Action's schemas.
    ``now_ms`` is the clock an expression's ``now()`` reads; ``idempotency`` the key to send
    (the step's own by default). Raises ``TemplateError`` or ``SchemaError`` before any I/O."""
    connection = _connection_of(sp, ctx)
    base = connection.config.base_url if connection else None
    if connection is not None and not base:
        raise DefinitionError(
            f"{sp.where}.connectionId: connection '{connection.id}' has no baseUrl"
        )
    base_url = base_url_for(
        sp.action.endpoint_template,
        base,
        f"$.actions.{sp.action.id}",
        f"$.connections.{connection.id}.config" if connection else None,
    )
    extra = {}
    if sp.action.idempotency_header:
        extra[sp.action.idempotency_header] = idempotency or idempotency_key(ctx.run_id, sp.key)
    path = _mapping(render(sp.path, scope, now_ms), f"{sp.where}.input.path")
    query = _mapping(render(sp.query, scope, now_ms), f"{sp.where}.input.query")
    body = render(sp.body, scope, now_ms)
    check_request(schemas, sp.key, path, query, body)
    try:
        return build_request(
            method=sp.action.method,
            base_url=base_url,
            endpoint_template=sp.action.endpoint_template,
            path=path,
            query=query,
            header_layers=(
                _mapping(render(sp.action_headers, scope, now_ms), f"$.actions.{sp.action.id}"),
                _mapping(render(sp.headers, scope, now_ms), f"{sp.where}.input.headers"),
                extra,
            ),
            body=body,
        )
    except TemplateError as err:
        if err.message.startswith("$"):
            raise
        message = f"{sp.where}.input: {err.message}"
    # Raised outside the handler, so it carries no context.
    raise TemplateError(message)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TemplateError(f"{where}: must render to an object")
    return value


def _with_trace_context(
    request: HttpRequest, trace: AttemptSpan, connection: Connection | None
) -> HttpRequest:
    """The request with ``traceparent``/``tracestate`` naming this attempt's span (tracing on),
    unless its connection opts out (``config.propagateTrace: false``) or the step sets its own."""
    if connection is not None and not connection.config.propagate_trace:
        return request
    headers = trace.headers()
    if not headers or any(k.lower() == "traceparent" for k in request.headers):
        return request
    for name, value in headers.items():
        request = request.with_header(name, value)
    return request


def _connection_of(sp: StepPlan, ctx: RunContext) -> Connection | None:
    cid = sp.step.connection_id
    if cid is None:
        return None
    return ctx.connections.get(cid)


def response_output(
    sp: StepPlan, response: HttpResponse, schemas: PlanSchemas | None = None
) -> dict[str, Any]:
    """The step's output from a 2xx response: decoded, checked against ``outputSchema``,
    extracted. What the API sent that cannot be used is a ``ResponseError`` (RESPONSE_INVALID)
    or a ``SchemaError``; never anything else."""
    try:
        return _response_output(sp, response, schemas)
    except RecursionError:
        pass  # a walker past the recursion limit; raised below, outside the handler
    raise ResponseError(
        f"{sp.key}: the response body is {jsonlimits.too_deep_message()}",
        status=response.status,
    )


async def response_output_async(
    sp: StepPlan, response: HttpResponse, schemas: PlanSchemas | None = None
) -> dict[str, Any]:
    """``response_output``, in a worker thread when the body is over ``OFF_LOOP_BYTES``."""
    if len(response.body) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(response_output, sp, response, schemas)
    return response_output(sp, response, schemas)


def _response_output(
    sp: StepPlan, response: HttpResponse, schemas: PlanSchemas | None
) -> dict[str, Any]:
    output: dict[str, Any] = {
        "status": response.status,
        "headers": dict(response.headers),
        "body": _decoded_body(sp, response, schemas),
    }
    for name, path in sp.extract:
        if path.has_wildcard or path.exists(output):
            output[name] = path.find(output)
    return output


def decoded_body(sp: StepPlan, response: HttpResponse, schemas: PlanSchemas | None) -> Any:
    """A 2xx body decoded as its Content-Type says and checked against ``outputSchema``
    (``response_output`` without the output around it); the same errors."""
    try:
        return _decoded_body(sp, response, schemas)
    except RecursionError:
        pass
    raise ResponseError(
        f"{sp.key}: the response body is {jsonlimits.too_deep_message()}",
        status=response.status,
    )


async def decoded_body_async(
    sp: StepPlan, response: HttpResponse, schemas: PlanSchemas | None
) -> Any:
    """``decoded_body``, in a worker thread when the body is over ``OFF_LOOP_BYTES``."""
    if len(response.body) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(decoded_body, sp, response, schemas)
    return decoded_body(sp, response, schemas)


def _decoded_body(sp: StepPlan, response: HttpResponse, schemas: PlanSchemas | None) -> Any:
    content_type = response.headers.get("content-type", "")
    body: Any
    if not response.body:
        body = None
    elif "json" in content_type:
        try:
            body = _decode_json(response.body)
        except msgspec.DecodeError:
            body = _NOT_JSON
        except RecursionError:
            body = _TOO_DEEP
        if body is not _NOT_JSON and body is not _TOO_DEEP:
            if jsonlimits.may_exceed(response.body) and jsonlimits.depth_exceeds(body):
                body = _TOO_DEEP
        if body is _NOT_JSON:  # raised outside the handler: no context (the decoder's) shown
            raise ResponseError(
                f"{sp.key}: the response says Content-Type {content_type.split(';')[0][:100]} "
                "but its body is not valid JSON",
                status=response.status,
            )
        if body is _TOO_DEEP:
            raise ResponseError(
                f"{sp.key}: the response body is {jsonlimits.too_deep_message()}",
                status=response.status,
            )
    else:
        body = response.body.decode("utf-8", errors="replace")
    if schemas is not None:
        check_output(schemas, sp.key, body)
    return body


Shape = Callable[[StepPlan, HttpResponse, "PlanSchemas | None"], Awaitable[Any]]


async def run_attempts(
    sp: StepPlan,
    ctx: RunContext,
    request: HttpRequest,
    *,
    transport: Transport,
    reporter: Reporter,
    clock: Clock,
    result: StepResult,
    schemas: PlanSchemas | None = None,
    span: StepSpan | None = None,
    first_attempt: int = 1,
    shape: Shape = response_output_async,
    announce: bool = True,
    flow: FlowControl | None = None,
) -> Any:
    """Attempts until success, a final failure (raised), or the deadline. Fills ``result``.
    ``shape`` makes the value of a 2xx response (the step's output; a page of a paginated
    step); ``announce`` False: no RUNNING events (the pages after the first: one event per page
    would be a storm; their failed attempts are in the job log and the execution log). With
    ``flow``, each attempt first waits for its grant (``runner.engine.admission``)."""
    connection = _connection_of(sp, ctx)
    gate = None
    if flow is not None and connection is not None:
        gate = flow.gate(connection, ctx.tenant_id, connection.config.base_url or "")
    attempt = first_attempt
    may_have_reached_server = False
    while True:
        grant, waited_ms = None, 0
        if gate is not None and flow is not None:
            if ctx.deadline_ms <= clock.now_ms():
                raise WorkflowTimeout("the run's deadline passed before the next attempt")
            grant, waited_ms = await admit(
                flow,
                gate,
                ctx,
                step_key=sp.key,
                attempt=attempt,
                started_ms=result.started_ms or clock.now_ms(),
                lease_ms=sp.timeout_ms + LEASE_MARGIN_MS,
                clock=clock,
                reporter=reporter,
            )
        now = clock.now_ms()
        remaining_ms = ctx.deadline_ms - now
        if remaining_ms <= 0:
            if grant is not None and gate is not None:
                gate.abandon(grant)
            raise WorkflowTimeout("the run's deadline passed before the next attempt")
        cut_by_deadline = remaining_ms < sp.timeout_ms
        timeout_ms = min(sp.timeout_ms, remaining_ms)
        if announce:
            await reporter.step_running(sp.key, attempt, result.started_ms or now)
        result.attempts = attempt
        record = Attempt(
            step_key=sp.key,
            number=attempt,
            method=request.method,
            url=request.url,
            duration_ms=0,
            possible_duplicate=(
                may_have_reached_server
                and sp.action.method in _UNSAFE_METHODS
                and not sp.action.idempotency_header
            ),
        )
        with (span or NOOP_STEP_SPAN).attempt(request.method, request.url, attempt) as trace:
            if gate is not None and grant is not None:
                trace.flow(gate.name, waited_ms, grant.reason, grant.probe)
            outcome = await _settled(
                gate,
                grant,
                record,
                _attempt(
                    sp,
                    ctx,
                    _with_trace_context(request, trace, connection),
                    connection=connection,
                    transport=transport,
                    reporter=reporter,
                    clock=clock,
                    schemas=schemas,
                    record=record,
                    started_ms=now,
                    timeout_ms=timeout_ms,
                    cut_by_deadline=cut_by_deadline,
                    trace=trace,
                    shape=shape,
                ),
            )
        if not isinstance(outcome, RetryDecision):
            return outcome
        assert record.error is not None
        may_have_reached_server = may_have_reached_server or _may_have_reached(record.error)
        if outcome.delay_ms > ctx.long_wait_ms:
            raise Deferral(clock.now_ms() + outcome.delay_ms, attempt + 1)
        await clock.sleep(outcome.delay_ms / 1000)
        attempt += 1


async def _settled(
    gate: FlowGate | None,
    grant: Grant | None,
    record: Attempt,
    attempt: Coroutine[Any, Any, dict[str, Any] | RetryDecision],
) -> dict[str, Any] | RetryDecision:
    """The attempt, its outcome told to the flow control (a lease released, a budget or a
    failure learnt) however it ends."""
    if gate is None or grant is None:
        return await attempt
    try:
        outcome = await attempt
    except RunnerError:
        await _tell(gate, grant, record)
        raise
    except BaseException:
        gate.abandon(grant)
        raise
    await _tell(gate, grant, record)
    return outcome


async def _tell(gate: FlowGate, grant: Grant, record: Attempt) -> None:
    await gate.settle(
        grant,
        status=record.status,
        headers=record.headers,
        error_code=str(record.error.code) if record.error is not None else None,
    )


async def _attempt(
    sp: StepPlan,
    ctx: RunContext,
    request: HttpRequest,
    *,
    connection: Connection | None,
    transport: Transport,
    reporter: Reporter,
    clock: Clock,
    schemas: PlanSchemas | None,
    record: Attempt,
    started_ms: int,
    timeout_ms: int,
    cut_by_deadline: bool,
    trace: AttemptSpan,
    shape: Shape,
) -> Any:
    """One attempt: its output, or the decision to retry; a final failure is raised."""
    try:
        response = await transport.send(
            request, connection=connection, tenant_id=ctx.tenant_id, timeout_s=timeout_ms / 1000
        )
        trace.response(response.status)
        record.status = response.status
        record.headers = response.headers
        if 200 <= response.status < 300:
            output = await shape(sp, response, schemas)
            record.duration_ms = clock.now_ms() - started_ms
            await reporter.attempt_done(record)
            return output
        raise StepHTTPError(
            f"{sp.action.method} answered {response.status}",
            status=response.status,
            retry_after_s=parse_retry_after_s(response.headers.get("retry-after"), clock.now_ms()),
        )
    except RunnerError as caught:
        err = caught.as_record()
    # What follows runs outside the handler, so what it raises carries no context: the error is
    # reported by its code and message only.
    if err.code == ErrorCode.TIMEOUT and cut_by_deadline:
        err = WorkflowTimeout(f"the run's deadline passed during attempt {record.number}")
    record.error = err
    record.duration_ms = clock.now_ms() - started_ms
    if err.code == ErrorCode.WORKFLOW_TIMEOUT:
        trace.error(str(err.code), None)
        await reporter.attempt_done(record)
        raise err
    decision = decide(
        sp.policy,
        record.number,
        err,
        now_ms=clock.now_ms(),
        deadline_ms=ctx.deadline_ms,
        random=clock.random,
    )
    record.decision = decision
    trace.error(str(err.code), decision.delay_ms if decision.retry else None)
    await reporter.attempt_done(record)
    if decision.retry:
        return decision
    if decision.reason == "deadline":
        raise WorkflowTimeout(decision.message)
    raise err


def _may_have_reached(err: RunnerError) -> bool:
    # A refused connection cannot have reached the server; a reset or a timeout may have.
    return err.code in (ErrorCode.TIMEOUT, ErrorCode.HTTP_ERROR) or (
        err.code == ErrorCode.CONNECTION_ERROR and "refused" not in err.message
    )
