"""A paginated step: every page through the step's own attempt loop, then the items gathered.

Each page is one ``run_attempts`` call, so it has what any request has: the connection's auth
(an OAuth2 token that expires between pages is refreshed for the next), the egress policy, the
retry policy (attempts counted per page), the step's ``timeoutMs`` per attempt, the run's
deadline and the response cap. The state machine between pages is ``runner.engine.pagination``.

After each page that is not the last, the reporter checkpoints where the step stands and that
page's items (``page:{key}`` and ``page:{key}:{n}``), while the items checkpointed stay within
``RUNNER_PAGINATE_CHECKPOINT_BYTES``; a later delivery continues after the last page saved.
The pages after the first send no RUNNING event: one per page would be a storm.

``result.attempts`` is the current page's attempt while a page is in flight (what a hand-back
continues at) and the attempts of every page once the step ends.
"""

from __future__ import annotations

from typing import Any

import msgspec

from runner.engine.pagination import (
    Page,
    PageLimits,
    Progress,
    SavedPages,
    advance,
    first_position,
    origin_of,
    output_of,
    request_for,
)
from runner.engine.plan import StepPlan
from runner.engine.ports import Clock, FlowControl, Reporter, RunContext, StepResult, Transport
from runner.engine.schemas import PlanSchemas
from runner.engine.step import decoded_body_async, idempotency_key, run_attempts
from runner.errors import RunnerError
from runner.http.messages import HttpRequest, HttpResponse
from runner.telemetry import StepSpan


async def _page_of(sp: StepPlan, response: HttpResponse, schemas: PlanSchemas | None) -> Page:
    body = await decoded_body_async(sp, response, schemas)
    return Page(response.status, response.headers, body, len(response.body))


async def run_pages(
    sp: StepPlan,
    ctx: RunContext,
    request: HttpRequest,
    *,
    transport: Transport,
    reporter: Reporter,
    clock: Clock,
    result: StepResult,
    limits: PageLimits,
    schemas: PlanSchemas | None = None,
    span: StepSpan | None = None,
    first_attempt: int = 1,
    restored: SavedPages | None = None,
    flow: FlowControl | None = None,
) -> dict[str, Any]:
    spec = sp.paginate
    assert spec is not None
    origin = origin_of(request.url)
    if restored is not None:
        progress, items = restored.progress, list(restored.items)
        result.saved_pages = progress.pages
    else:
        progress, items = Progress(position=first_position(spec)), []
    saving = limits.checkpoint_bytes > 0
    announce = True
    attempt = first_attempt
    while True:
        number = progress.pages + 1
        page_request = request_for(spec, request, progress.position)
        if sp.action.idempotency_header and number > 1:
            # A key per page: an API that dedupes by key must not answer page 1 again.
            key = f"{idempotency_key(ctx.run_id, sp.key)}:page:{number}"
            page_request = page_request.with_header(sp.action.idempotency_header, key)
        try:
            page: Page = await run_attempts(
                sp,
                ctx,
                page_request,
                transport=transport,
                reporter=reporter,
                clock=clock,
                result=result,
                schemas=schemas,
                span=span,
                first_attempt=attempt,
                shape=_page_of,
                announce=announce,
                flow=flow,
            )
            attempts = progress.attempts + result.attempts
            step = advance(spec, limits, progress, page, page_request, origin)
        except RunnerError:
            result.attempts += progress.attempts
            raise
        announce, attempt = False, 1
        items.extend(step.items)
        progress = msgspec.structs.replace(step.progress, attempts=attempts)
        if step.stop is not None:
            result.attempts = progress.attempts
            return _output(sp, output_of(progress, items, step.stop, step.truncated))
        saved = await reporter.page_done(
            sp.key, progress, step.items, save_within=limits.checkpoint_bytes if saving else None
        )
        if saved is None:
            saving = False  # later pages cannot resume without this one's items
        else:
            progress = msgspec.structs.replace(progress, saved_bytes=saved)
            result.saved_pages = progress.pages


def _output(sp: StepPlan, output: dict[str, Any]) -> dict[str, Any]:
    for name, path in sp.extract:
        if path.has_wildcard or path.exists(output):
            output[name] = path.find(output)
    return output
