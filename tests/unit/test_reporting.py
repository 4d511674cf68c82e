"""runner.reporting: RunReporter over the in-memory status sink, a recording job channel and
the in-memory execution log; the output preview; the checkpoint and its parsing. No sockets."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from runner.engine.ports import Attempt, StepResult
from runner.errors import ErrorCode, RunnerError, StepHTTPError, TemplateError
from runner.log import LEVELS, log
from runner.redact import REDACTED, Redactor
from runner.reporting.checkpoint import parse_checkpoint
from runner.reporting.execlog import MemoryExecutionLog
from runner.reporting.reporter import PREVIEW_LIMIT_BYTES, RunReporter, preview
from runner.reporting.stdout_log import StdoutExecutionLog
from runner.reporting.stream import JobView, MemoryStatusSink, Transition
from runner.retry import RetryDecision

RUN = "run_8f2c"
SECRET = "tok_live_9f8e7d6c5b4a3921"
# 2026-11-25 12:00:00 UTC
T0 = 1_795_608_000_000

STEP_FIELDS = {"stepKey", "stepRunId", "attempt"}


@dataclass
class Ticker:
    """A clock that moves 10 ms every time it is read, so timestamps differ."""

    now: int = T0

    def __call__(self) -> int:
        self.now += 10
        return self.now


@dataclass
class Harness:
    sink: MemoryStatusSink
    job: JobView
    execlog: MemoryExecutionLog
    reporter: RunReporter

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.sink.events]

    def checkpoint(self) -> dict[str, bytes]:
        return self.sink.runs[RUN]


def harness(
    *,
    total_steps: int = 3,
    last_seq: int = 0,
    completed_steps: int = 0,
    execlog_class: type[MemoryExecutionLog] = MemoryExecutionLog,
) -> Harness:
    redactor = Redactor([SECRET])
    sink = MemoryStatusSink()
    job = sink.job(RUN)
    execlog = execlog_class(redact=redactor.value)
    reporter = RunReporter(
        run_id=RUN,
        tenant_id="ten_acme",
        version_id="wfv_12",
        job_id=RUN,
        worker_id="w1",
        total_steps=total_steps,
        sink=sink,
        execlog=execlog,
        redact=redactor,
        now_ms=Ticker(),
        last_seq=last_seq,
        completed_steps=completed_steps,
    )
    return Harness(sink, job, execlog, reporter)


class _SpiedSink:
    """The harness's sink, its writes going through a spy first."""

    def __init__(self, sink: MemoryStatusSink, spy: Callable[..., Awaitable[None]]) -> None:
        self.write = spy
        self.run_state = sink.run_state


def spy_on_writes(h: Harness, spy: Callable[..., Awaitable[None]]) -> None:
    # The reporter's sink is swapped, so the twin itself stays as it is.
    h.reporter.sink = _SpiedSink(h.sink, spy)


def ok(key: str, output: Any = None, attempts: int = 1) -> StepResult:
    return StepResult(
        key,
        "SUCCESS",
        attempts=attempts,
        started_ms=T0 + 100,
        finished_ms=T0 + 220,
        output=output if output is not None else {"status": 200, "headers": {}, "body": {"id": 1}},
    )


async def a_short_run(h: Harness) -> None:
    """run RUNNING; a RUNNING, SUCCESS; b RUNNING x2, FAILED; c CANCELED; run FAILED."""
    r = h.reporter
    await r.run_started(T0)
    await r.step_running("a", 1, T0 + 100)
    await r.attempt_done(Attempt("a", 1, "GET", "https://api.test/a", 120, status=200))
    await r.step_done(ok("a"), 1)
    await r.step_running("b", 1, T0 + 300)
    error = StepHTTPError("POST answered 503", status=503)
    await r.attempt_done(
        Attempt(
            "b",
            1,
            "POST",
            "https://api.test/b",
            30,
            status=503,
            error=error,
            decision=RetryDecision(True, 75, "backoff", "503 is retryable; attempt 2 in 75 ms"),
        )
    )
    await r.step_running("b", 2, T0 + 300)
    final = StepHTTPError("POST answered 400", status=400)
    b = StepResult("b", "FAILED", 2, T0 + 300, T0 + 500, None, final)
    await r.step_done(b, 2)
    c = StepResult("c", "CANCELED")
    await r.step_done(c, 0)
    steps = {"a": ok("a"), "b": b, "c": c}
    await r.run_done("FAILED", final, steps)


# --- sequencing ---------------------------------------------------------------------------


async def test_given_a_run_when_reported_then_events_follow_the_state_machine() -> None:
    h = harness()

    await a_short_run(h)

    assert [(e["kind"], e.get("stepKey"), e["status"], e.get("attempt")) for e in h.events()] == [
        ("run", None, "RUNNING", None),
        ("step", "a", "RUNNING", 1),
        ("step", "a", "SUCCESS", 1),
        ("step", "b", "RUNNING", 1),
        ("step", "b", "RUNNING", 2),
        ("step", "b", "FAILED", 2),
        ("step", "c", "CANCELED", 0),
        ("run", None, "FAILED", None),
    ]


async def test_given_no_checkpoint_when_reported_then_seq_starts_at_1_and_rises_by_one() -> None:
    h = harness()

    await a_short_run(h)

    assert [e["seq"] for e in h.events()] == list(range(1, 9))


async def test_given_a_resume_when_reported_then_seq_continues_above_the_last_one() -> None:
    h = harness(last_seq=41)

    await a_short_run(h)

    seqs = [e["seq"] for e in h.events()]
    assert seqs[0] == 42
    assert seqs == list(range(42, 50))


async def test_given_every_event_when_published_then_the_checkpoint_seq_follows_it() -> None:
    h = harness(last_seq=5)
    seen: list[bytes] = []
    write = h.sink.write

    async def spy(*transitions: Transition) -> None:
        # Written one by one, to see the checkpoint after each.
        for transition in transitions:
            await write(transition)
            if transition.event is not None:
                assert json.loads(transition.event)["seq"] == transition.seq
                seen.append(h.sink.runs[transition.run_id]["seq"])

    spy_on_writes(h, spy)

    await a_short_run(h)

    assert seen == [str(n).encode() for n in range(6, 14)]


async def test_given_a_run_start_then_its_event_is_written_with_the_first_step_in_one_write() -> (
    None
):
    h = harness()
    writes: list[list[str]] = []
    write = h.sink.write

    async def spy(*transitions: Transition) -> None:
        writes.append([json.loads(t.event)["status"] if t.event else "log" for t in transitions])
        await write(*transitions)

    spy_on_writes(h, spy)

    await h.reporter.run_started(1000)
    assert writes == []  # held
    await h.reporter.step_running("a", 1, 1001)
    assert writes == [["RUNNING", "RUNNING"]]
    assert [e["kind"] for e in h.events()] == ["run", "step"]


async def test_given_a_run_then_only_its_start_renews_the_checkpoint_retention() -> None:
    h = harness()
    renewed: list[bool] = []
    write = h.sink.write

    async def spy(*transitions: Transition) -> None:
        renewed.extend(t.renew for t in transitions if t.event is not None)
        await write(*transitions)

    spy_on_writes(h, spy)

    await a_short_run(h)

    assert renewed[0] is True
    assert not any(renewed[1:])


async def test_given_a_held_run_start_when_flushed_then_it_is_written_alone() -> None:
    h = harness()
    await h.reporter.run_started(1000)
    await h.reporter.flush()
    await h.reporter.flush()
    assert [(e["kind"], e["status"]) for e in h.events()] == [("run", "RUNNING")]


async def test_given_run_events_when_published_then_they_carry_no_step_fields() -> None:
    h = harness()

    await a_short_run(h)

    run_events = [e for e in h.events() if e["kind"] == "run"]
    assert len(run_events) == 2
    for event in run_events:
        assert STEP_FIELDS.isdisjoint(event)
        assert event["v"] == 1
        assert event["workflowRunId"] == RUN
        assert event["tenantId"] == "ten_acme"
        assert event["workflowVersionId"] == "wfv_12"
        assert event["jobId"] == RUN
        assert event["startedAt"] == T0
    started, done = run_events
    assert started["finishedAt"] is None and started["errorCode"] is None
    assert done["errorCode"] == "HTTP_ERROR"
    assert done["errorMessage"] == "POST answered 400"
    assert done["finishedAt"] == done["at"]


async def test_given_step_events_when_published_then_they_carry_step_run_id_and_times() -> None:
    h = harness()

    await a_short_run(h)

    by_status = {(e["stepKey"], e["status"]): e for e in h.events() if e["kind"] == "step"}
    running = by_status[("a", "RUNNING")]
    assert running["stepRunId"] == f"{RUN}:a"
    assert running["startedAt"] == T0 + 100
    assert running["output"] is None and running["finishedAt"] is None
    success = by_status[("a", "SUCCESS")]
    assert success["startedAt"] == T0 + 100 and success["finishedAt"] == T0 + 220
    assert success["output"] == {"status": 200, "headers": {}, "body": {"id": 1}}
    assert success["errorCode"] is None and success["errorMessage"] is None
    failed = by_status[("b", "FAILED")]
    assert failed["output"] is None
    assert (failed["errorCode"], failed["errorMessage"]) == ("HTTP_ERROR", "POST answered 400")
    canceled = by_status[("c", "CANCELED")]
    assert canceled["startedAt"] is None and canceled["output"] is None


# --- the output preview -------------------------------------------------------------------


def test_given_a_small_output_when_previewed_then_it_travels_whole() -> None:
    output = {"status": 200, "headers": {"a": "b"}, "body": {"x": [1, 2]}}

    assert preview(output) is output
    assert preview(None) is None


def test_given_an_output_of_exactly_the_limit_when_previewed_then_it_travels_whole() -> None:
    base = len(msgspec.json.encode({"body": ""}))
    output = {"body": "x" * (PREVIEW_LIMIT_BYTES - base)}
    assert len(msgspec.json.encode(output)) == PREVIEW_LIMIT_BYTES

    assert preview(output) == output


def test_given_an_output_over_the_limit_when_previewed_then_it_is_a_marked_preview() -> None:
    output = {"status": 201, "headers": {}, "body": "y" * 40_000}
    size = len(msgspec.json.encode(output))

    result = preview(output)

    assert set(result) == {"preview", "sizeBytes", "truncated", "status"}
    assert result["sizeBytes"] == size
    assert result["truncated"] is True
    assert result["status"] == 201
    assert result["preview"].startswith('{"status":201,"headers":{},"body":"yyy')
    assert len(msgspec.json.encode(result)) <= PREVIEW_LIMIT_BYTES


def test_given_a_large_non_object_output_when_previewed_then_it_has_no_status() -> None:
    result = preview(list(range(10_000)))

    assert set(result) == {"preview", "sizeBytes", "truncated"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('"' * 20_000, id="quotes"),
        pytest.param("\\" * 20_000, id="backslashes"),
        pytest.param("\x01" * 20_000, id="control-chars"),
        pytest.param("é" * 20_000, id="non-ascii"),
    ],
)
def test_given_a_body_that_grows_when_escaped_when_previewed_then_it_stays_within_16_kib(
    body: str,
) -> None:
    # CONTRACT §6: the output in an event is at most 16 KiB, however its text escapes.
    result = preview({"status": 200, "headers": {}, "body": body})

    assert result["truncated"] is True
    assert len(msgspec.json.encode(result)) <= PREVIEW_LIMIT_BYTES


async def test_given_a_large_output_when_the_step_succeeds_then_the_event_carries_the_preview() -> (
    None
):
    h = harness()
    big = {"status": 200, "headers": {}, "body": {"rows": ["r" * 100] * 500}}

    await h.reporter.step_done(ok("a", big), 1)

    (event,) = h.events()
    assert event["output"]["truncated"] is True
    assert event["output"]["status"] == 200
    assert event["output"]["sizeBytes"] == len(msgspec.json.encode(big))
    assert len(msgspec.json.encode(event["output"])) <= PREVIEW_LIMIT_BYTES
    # The checkpoint keeps the whole output: a resumed run renders templates from it.
    saved = json.loads(h.checkpoint()["step:a"])
    assert saved["output"] == big


# --- checkpoint fields --------------------------------------------------------------------


async def test_given_a_run_when_reported_then_the_checkpoint_holds_start_seq_and_results() -> None:
    h = harness()

    await a_short_run(h)

    cp = h.checkpoint()
    assert set(cp) == {"seq", "startedAt", "step:a", "step:b", "step:c"}
    assert cp["seq"] == b"8"
    assert cp["startedAt"] == str(T0).encode()
    assert json.loads(cp["step:a"]) == {
        "status": "SUCCESS",
        "attempts": 1,
        "startedAt": T0 + 100,
        "finishedAt": T0 + 220,
        "output": {"status": 200, "headers": {}, "body": {"id": 1}},
        "errorCode": None,
        "errorMessage": None,
    }
    assert json.loads(cp["step:b"])["errorCode"] == "HTTP_ERROR"
    assert json.loads(cp["step:c"])["status"] == "CANCELED"


async def test_given_a_running_event_when_published_then_only_seq_is_written() -> None:
    h = harness()
    await h.reporter.run_started(T0)

    await h.reporter.step_running("a", 1, T0 + 1)

    assert set(h.checkpoint()) == {"seq", "startedAt"}
    assert h.checkpoint()["seq"] == b"2"


async def test_given_a_written_checkpoint_when_parsed_then_finished_steps_come_back() -> None:
    h = harness()
    await a_short_run(h)
    skipped = StepResult("d", "SKIPPED")
    await h.reporter.step_done(skipped, 0)

    cp = parse_checkpoint(h.checkpoint())

    assert cp.last_seq == 9
    assert cp.started_ms == T0
    assert set(cp.steps) == {"a", "b", "d"}  # c was CANCELED: it runs again
    assert cp.steps["a"] == ok("a")
    b = cp.steps["b"]
    assert (b.status, b.attempts, b.started_ms, b.finished_ms) == ("FAILED", 2, T0 + 300, T0 + 500)
    assert b.error is not None and b.error.code == ErrorCode.HTTP_ERROR
    assert b.error.message == "POST answered 400"
    assert cp.steps["d"].status == "SKIPPED"


def test_given_byte_keys_and_bad_entries_when_parsed_then_they_are_handled_safely() -> None:
    raw = {
        b"seq": b"12",
        b"startedAt": b"1000",
        b"step:a": b'{"status":"SUCCESS","attempts":1,"output":{"x":1}}',
        b"step:b": b"not json",
        b"step:c": b'{"status":"FAILED","errorCode":"SOMETHING_NEW","errorMessage":"m"}',
        b"step:d": b'{"status":"CANCELED"}',
        b"step:e": b'{"status":"RUNNING"}',
    }

    cp = parse_checkpoint(raw)

    assert (cp.last_seq, cp.started_ms) == (12, 1000)
    assert set(cp.steps) == {"a", "c"}
    assert cp.steps["a"].output == {"x": 1}
    assert cp.steps["c"].error is not None
    assert cp.steps["c"].error.code == ErrorCode.INTERNAL


def test_given_an_empty_checkpoint_when_parsed_then_it_is_a_fresh_run() -> None:
    cp = parse_checkpoint({})

    assert (cp.last_seq, cp.started_ms, cp.steps) == (0, None, {})


# --- BullMQ progress and job log ----------------------------------------------------------


async def test_given_finished_steps_when_reported_then_progress_counts_them() -> None:
    h = harness(total_steps=4)

    await a_short_run(h)

    assert h.job.progress_values == [
        {"progress": 25, "stepKey": "a", "status": "SUCCESS", "completedSteps": 1, "totalSteps": 4},
        {"progress": 50, "stepKey": "b", "status": "FAILED", "completedSteps": 2, "totalSteps": 4},
        # The CANCELED step c does not count; the run's end has the last word, naming the
        # step that failed it.
        {"progress": 50, "stepKey": "b", "status": "FAILED", "completedSteps": 2, "totalSteps": 4},
    ]


async def test_given_a_resume_when_a_step_finishes_then_progress_counts_restored_steps() -> None:
    h = harness(total_steps=3, completed_steps=2)

    await h.reporter.step_done(ok("c"), 1)

    assert h.job.progress_values == [
        {"progress": 100, "stepKey": "c", "status": "SUCCESS", "completedSteps": 3, "totalSteps": 3}
    ]


async def test_given_a_run_when_reported_then_one_job_log_line_per_transition() -> None:
    h = harness()

    await a_short_run(h)

    # Each line starts with the UTC time to the millisecond (the ticker moves 10 ms a read).
    stamp = re.compile(r"^12:00:00\.\d{3}Z ")
    assert all(stamp.match(line) for line in h.job.lines)
    assert [stamp.sub("", line) for line in h.job.lines] == [
        "run RUNNING (3 steps)",
        "a RUNNING attempt 1",
        "a SUCCESS after 1 attempt in 120 ms",
        "b RUNNING attempt 1",
        "b attempt 1 failed: HTTP_ERROR: POST answered 503; 503 is retryable; attempt 2 in 75 ms",
        "b RUNNING attempt 2",
        "b FAILED after 2 attempts in 200 ms: HTTP_ERROR: POST answered 400",
        "c CANCELED",
        "run FAILED: HTTP_ERROR: POST answered 400",
    ]


# --- execution log ------------------------------------------------------------------------


async def test_given_a_run_when_reported_then_execution_log_lines_name_step_and_attempt() -> None:
    h = harness()

    await a_short_run(h)

    docs = h.execlog.for_run(RUN)
    summary = [(d["level"], d["stepKey"], d["attempt"], d["message"]) for d in docs]
    assert summary == [
        ("info", None, None, "run started"),
        ("info", "a", 1, "attempt 1 200 in 120 ms"),
        ("info", "a", 1, "step SUCCESS"),
        ("warning", "b", 1, "attempt 1 HTTP_ERROR 503 in 30 ms"),
        ("error", "b", 2, "step FAILED"),
        ("info", "c", None, "step CANCELED"),
        ("error", None, None, "run FAILED"),
    ]
    retry = docs[3]["context"]
    assert (retry["retry"], retry["delayMs"], retry["reason"]) == (True, 75, "backoff")
    assert all(d["stepRunId"] == (f"{RUN}:{d['stepKey']}" if d["stepKey"] else None) for d in docs)


class _KeepsNoInfo(MemoryExecutionLog):
    """An execution log that drops ``info`` lines, as the stdout one does at its default level,
    and fails a test that hands it one anyway."""

    def wants(self, level: Any) -> bool:
        return level != "info"

    def write(self, line: Any, redact: Any = None) -> None:
        assert line.level != "info", f"an info line was built: {line.message}"
        super().write(line, redact)


async def test_given_an_execution_log_without_info_when_reported_then_no_info_line_is_built() -> (
    None
):
    h = harness(execlog_class=_KeepsNoInfo)

    await a_short_run(h)
    await h.reporter.attempt_done(
        Attempt("b", 3, "POST", "https://api.test/b", 5, status=201, possible_duplicate=True)
    )

    summary = [(d["level"], d["stepKey"], d["message"][:20]) for d in h.execlog.documents]
    assert summary == [
        ("warning", "b", "attempt 1 HTTP_ERROR"),
        ("error", "b", "step FAILED"),
        ("error", None, "run FAILED"),
        ("warning", "b", "b: attempt 3 of a PO"),
    ]
    assert len(h.job.lines) == 9  # the job's log lines are not the execution log's


def test_the_stdout_execution_log_wants_info_lines_only_at_debug() -> None:
    # The process log's level is restored after each test (tests/conftest.py).
    stdout_log = StdoutExecutionLog()
    assert log.threshold == LEVELS["info"]  # the default, whatever a test before set
    assert [stdout_log.wants(level) for level in ("debug", "info", "warning", "error")] == [
        False,
        False,
        True,
        True,
    ]
    log.threshold = LEVELS["debug"]  # RUNNER_LOG_LEVEL=debug
    assert stdout_log.wants("info") and stdout_log.wants("debug")
    log.threshold = LEVELS["error"]
    assert not stdout_log.wants("warning") and stdout_log.wants("error")


async def test_given_a_retry_without_idempotency_when_reported_then_a_warning_is_logged() -> None:
    h = harness()

    await h.reporter.attempt_done(
        Attempt("b", 2, "POST", "https://api.test/b", 5, status=201, possible_duplicate=True)
    )

    warnings = [d for d in h.execlog.documents if d["level"] == "warning"]
    assert len(warnings) == 1
    assert "possible duplicate" in warnings[0]["message"]
    assert warnings[0]["stepKey"] == "b"


# --- secrets never leave ------------------------------------------------------------------


async def test_given_a_secret_everywhere_when_reported_then_it_appears_nowhere() -> None:
    h = harness()
    r = h.reporter
    leaky_output = {
        "status": 200,
        "headers": {"x-echo": f"Bearer {SECRET}"},
        "body": {"token": SECRET, "nested": [f"k={SECRET}"]},
        "extracted": SECRET,
    }
    error = TemplateError(f"$.graph.steps[1].input.body: value {SECRET} is wrong")
    url = f"https://api.test/b?apikey={SECRET}"

    await r.run_started(T0)
    await r.step_running("a", 1, T0)
    await r.attempt_done(Attempt("a", 1, "GET", url, 5, status=200))
    await r.step_done(ok("a", leaky_output), 1)
    await r.step_running("b", 1, T0)
    await r.attempt_done(Attempt("b", 1, "GET", url, 5, error=error))
    failed = StepResult("b", "FAILED", 1, T0, T0 + 1, None, error)
    await r.step_done(failed, 1)
    r.warn(f"something about {SECRET}", stepKey="b", detail=SECRET)
    await r.run_done("FAILED", RunnerError(f"because {SECRET}"), {"a": ok("a"), "b": failed})

    everything = [
        *h.sink.events,
        *h.checkpoint().values(),
        *(line.encode() for line in h.job.lines),
        json.dumps(h.job.progress_values).encode(),
        json.dumps(h.execlog.documents, default=str).encode(),
    ]
    assert all(SECRET.encode() not in blob for blob in everything)
    # And the places it was are masked, not dropped.
    (success,) = [e for e in h.events() if e.get("status") == "SUCCESS"]
    assert success["output"]["body"]["token"] == REDACTED
    assert json.loads(h.checkpoint()["step:a"])["output"]["extracted"] == REDACTED
    assert REDACTED in json.loads(h.sink.events[-1])["errorMessage"]


class _KnowsNoSecret(MemoryExecutionLog):
    """An execution log whose own redaction knows none of the run's secrets."""

    def __init__(self, *, redact: Any = None) -> None:
        super().__init__(redact=None)


async def test_given_a_log_that_knows_no_secret_when_a_run_logs_then_the_run_masks_its_lines() -> (
    None
):
    # The process-wide redaction of the execution log searches once per set of secrets in
    # flight; a run's lines are masked by the run's own redactor, as its events are.
    h = harness(execlog_class=_KnowsNoSecret)
    url = f"https://api.test/b?apikey={SECRET}"

    await h.reporter.step_running("a", 1, T0)
    await h.reporter.attempt_done(Attempt("a", 1, "GET", url, 5, status=200))
    h.reporter.warn(f"something about {SECRET}", stepKey="a", detail=SECRET)

    documents = json.dumps(h.execlog.documents, default=str)
    assert len(h.execlog.documents) >= 2
    assert SECRET not in documents
    assert REDACTED in documents


# --- a paginated step's pages ----------------------------------------------------------------


async def test_given_pages_when_reported_then_each_is_checkpointed_redacted_without_an_event() -> (
    None
):
    from runner.engine.pagination import Progress

    h = harness()
    await h.reporter.run_started(T0)
    await h.reporter.step_running("list", 1, T0)
    h.sink.runs[RUN]["resume:list"] = b"2"  # a hand-back's attempt for the page now done
    events_before = len(h.sink.events)
    first = Progress(pages=1, items=2, position="c2", status=200)
    saved = await h.reporter.page_done("list", first, [1, {"t": SECRET}], save_within=1000)
    second = msgspec.structs.replace(first, pages=2, items=3, saved_bytes=saved or 0)
    saved2 = await h.reporter.page_done("list", second, [3], save_within=1000)

    assert len(h.sink.events) == events_before  # no status event per page
    cp = h.checkpoint()
    assert "resume:list" not in cp
    assert json.loads(cp["page:list:1"]) == [1, {"t": REDACTED}]
    assert json.loads(cp["page:list:2"]) == [3]
    state = json.loads(cp["page:list"])
    assert (state["pages"], state["position"], state["savedBytes"]) == (2, "c2", saved2)
    assert saved2 == len(cp["page:list:1"]) + len(cp["page:list:2"])
    assert [line.split(" ", 1)[1] for line in h.job.lines[-2:]] == [
        "list page 1: 2 items (2 in all)",
        "list page 2: 1 items (3 in all)",
    ]
    restored = parse_checkpoint(cp).pages["list"]
    assert restored.items == [1, {"t": REDACTED}, 3] and restored.progress.pages == 2

    # When the step ends, its pages leave the checkpoint with the result in one write
    done = ok("list", output={"items": [1, 2, 3]})
    done.saved_pages = 2
    await h.reporter.step_done(done, 1)
    assert not [k for k in h.checkpoint() if k.startswith("page:")]
    assert "step:list" in h.checkpoint()


async def test_given_pages_over_the_checkpoint_budget_then_the_last_that_fit_stays() -> None:
    from runner.engine.pagination import Progress

    h = harness()
    await h.reporter.run_started(T0)
    first = Progress(pages=1, items=1, position=1)
    saved = await h.reporter.page_done("list", first, ["x" * 10], save_within=30)
    assert saved is not None
    second = Progress(pages=2, items=2, position=2, saved_bytes=saved)
    assert await h.reporter.page_done("list", second, ["y" * 20], save_within=30) is None

    cp = h.checkpoint()
    assert json.loads(cp["page:list"])["pages"] == 1  # a resume continues after page 1
    assert "page:list:2" not in cp
    assert "not checkpointed" in h.job.lines[-1]
    [warning] = [d for d in h.execlog.for_run(RUN) if d["level"] == "warning"]
    assert "over the checkpoint's 30 bytes" in warning["message"]
