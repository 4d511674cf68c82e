"""What a run's checkpoint hash says, decoded: the last published ``seq``, the first start, and
the steps that finished (SUCCESS, FAILED under CONTINUE, SKIPPED), so that a job delivered again
continues at the first unfinished step and never calls a finished one again.

The hash itself is written by ``runner.reporting.stream`` together with each event; its fields:
``seq``, ``startedAt``, ``step:<key>`` holding the step's result as JSON (redacted), and
``resume:<key>``, the attempt a deferred step continues at (written when the job is handed
back to BullMQ), for a paginated step in flight ``page:<key>`` (where it stands, a
``Progress``) with ``page:<key>:<n>``, the items of its page ``n``, and ``item:<key>:<index>``,
a ``forEach`` item's result, as a step's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from runner.engine.pagination import Progress, SavedPages
from runner.engine.ports import StepResult
from runner.errors import ErrorCode, RunnerError

# A step CANCELED (by a sibling's failure, a cancel or a shutdown) is not finished: a run that
# is delivered again runs it.
_RESUMABLE = frozenset({"SUCCESS", "FAILED", "SKIPPED"})


class _Saved(msgspec.Struct, rename="camel"):
    status: str
    attempts: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    output: object = None
    error_code: str | None = None
    error_message: str | None = None


_decode_saved = msgspec.json.Decoder(_Saved).decode
_decode_progress = msgspec.json.Decoder(Progress).decode
_decode_items = msgspec.json.Decoder(list[object]).decode


@dataclass(slots=True)
class Checkpoint:
    last_seq: int = 0
    started_ms: int | None = None
    steps: dict[str, StepResult] = field(default_factory=dict)
    # Steps that an earlier delivery deferred, with the attempt each continues at.
    resume_attempts: dict[str, int] = field(default_factory=dict)
    # forEach items that finished, by step key and index.
    items: dict[str, dict[int, StepResult]] = field(default_factory=dict)
    # Paginated steps in flight: the pages they finished.
    pages: dict[str, SavedPages] = field(default_factory=dict)


def parse_checkpoint(raw: Mapping[bytes, bytes] | Mapping[str, bytes]) -> Checkpoint:
    cp = Checkpoint()
    page_fields: dict[str, bytes] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        if key == "seq":
            cp.last_seq = int(v)
        elif key == "startedAt":
            cp.started_ms = int(v)
        elif key.startswith("page:"):
            page_fields[key] = v
        elif key.startswith("resume:"):
            cp.resume_attempts[key[7:]] = int(v)
        elif key.startswith("step:"):
            result = _result_of(key[5:], v)
            if result is not None:
                cp.steps[key[5:]] = result
        elif key.startswith("item:"):
            step_key, _, index = key[5:].rpartition(":")
            item = _result_of(step_key, v)
            if item is not None and index.isdigit():
                cp.items.setdefault(step_key, {})[int(index)] = item
    cp.pages = _saved_pages(page_fields)
    return cp


def _result_of(key: str, raw: bytes) -> StepResult | None:
    try:
        saved = _decode_saved(raw)
    except msgspec.DecodeError:
        return None  # an unreadable entry: the step runs again, which is the safe side
    if saved.status not in _RESUMABLE:
        return None
    error = None
    if saved.error_code:
        try:
            code = ErrorCode(saved.error_code)
        except ValueError:
            code = ErrorCode.INTERNAL
        error = RunnerError(saved.error_message or "", code=code)
    return StepResult(
        key=key,
        status=saved.status,  # type: ignore[arg-type]
        attempts=saved.attempts,
        started_ms=saved.started_at,
        finished_ms=saved.finished_at,
        output=saved.output,
        error=error,
    )


def _saved_pages(fields: Mapping[str, bytes]) -> dict[str, SavedPages]:
    """Each step's pages, when its state and the items of every page it counts are readable;
    otherwise the step starts over from its first page (the safe side: pages are reads)."""
    saved: dict[str, SavedPages] = {}
    for name, value in fields.items():
        step = name[5:]
        if ":" in step:
            continue
        try:
            progress = _decode_progress(value)
            items: list[object] = []
            for n in range(1, progress.pages + 1):
                items.extend(_decode_items(fields[f"page:{step}:{n}"]))
        except (msgspec.DecodeError, KeyError):
            continue
        saved[step] = SavedPages(progress, items)
    return saved
