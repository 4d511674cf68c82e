"""The BullMQ boundary's guards, without Redis: the processor wrapper, the watchdog, the
worker name added to ``moveToFinished``'s packed options."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from bullmq.custom_errors import DelayedError, UnrecoverableError

from runner.queue.naming import _with_map_entry, node_client_name, queue_client_name
from runner.queue.worker import QueueWorker, redis_options
from runner.settings import Settings


class Job:
    id = "job-1"

    def updateStacktrace(self) -> None:
        raise AssertionError("still the stock method")


def worker_with(handler: Any) -> QueueWorker:
    return QueueWorker(Settings(), handler)


async def test_given_a_cancellation_escaping_a_run_when_processed_then_the_loop_sees_an_error() -> (
    None
):
    async def handler(job: Any, token: str) -> None:
        raise asyncio.CancelledError

    with pytest.raises(RuntimeError, match=r"^INTERNAL: the run was interrupted$"):
        await worker_with(handler)._process(Job(), "t")


async def test_given_an_unexpected_exception_when_processed_then_it_is_internal_and_names_only_its_type() -> (
    None
):
    async def handler(job: Any, token: str) -> None:
        raise KeyError("secret-value-9")

    with pytest.raises(RuntimeError) as caught:
        await worker_with(handler)._process(Job(), "t")
    assert str(caught.value) == "INTERNAL: KeyError"


async def test_given_a_runs_own_failure_when_processed_then_it_stays_unrecoverable_without_a_traceback() -> (
    None
):
    async def handler(job: Any, token: str) -> None:
        raise UnrecoverableError("HTTP_ERROR: fetch: GET answered 400")

    job = Job()
    with pytest.raises(UnrecoverableError):
        await worker_with(handler)._process(job, "t")
    job.updateStacktrace()  # replaced by a no-op: Bull Board shows the reason, not our frames


async def test_given_a_hand_back_when_processed_then_delayed_error_passes_through() -> None:
    async def handler(job: Any, token: str) -> None:
        raise DelayedError()

    with pytest.raises(DelayedError):
        await worker_with(handler)._process(Job(), "t")


class DeadLoop:
    """Stands in for bullmq's Worker whose run() loop ended on its own."""

    running = False

    async def run(self) -> None:
        return None


async def test_given_a_worker_loop_that_died_when_watched_then_the_watchdog_reports_it() -> None:
    qw = worker_with(lambda job, token: None)
    qw.worker = DeadLoop()  # type: ignore[assignment]
    await qw.start()
    await asyncio.wait_for(qw.loop_died.wait(), timeout=5)
    assert not qw.alive


async def test_given_a_closing_worker_when_the_loop_ends_then_the_watchdog_stays_quiet() -> None:
    qw = worker_with(lambda job, token: None)
    qw.worker = DeadLoop()  # type: ignore[assignment]
    qw.closing = True
    await qw.start()
    await asyncio.sleep(1.2)
    assert not qw.loop_died.is_set()


def test_client_names_are_the_ones_node_and_bull_board_use() -> None:
    assert queue_client_name("bull", "workflow-runs") == "bull:d29ya2Zsb3ctcnVucw=="
    assert node_client_name("bull", "workflow-runs", "w1") == "bull:d29ya2Zsb3ctcnVucw==:w:w1"


def test_the_socket_timeout_outlasts_bullmqs_longest_blocking_read() -> None:
    opts = redis_options("redis://:pw@127.0.0.1:6380/2", 30.0)
    assert opts["socket_timeout"] > 10  # BZPOPMIN blocks up to 10 s
    assert (opts["host"], opts["port"], opts["db"], opts["password"]) == (
        "127.0.0.1",
        6380,
        2,
        "pw",
    )


@pytest.mark.parametrize("entries", [0, 1, 14, 15, 16, 70_000])
def test_given_packed_options_of_any_size_when_named_then_the_name_is_one_more_entry(
    entries: int,
) -> None:
    options = {f"k{i}": i for i in range(entries)}
    entry = msgpack.packb("name") + msgpack.packb("host-1", use_bin_type=True)

    named = _with_map_entry(msgpack.packb(options, use_bin_type=True), entry)

    assert msgpack.unpackb(named, raw=False) == {**options, "name": "host-1"}


@pytest.mark.parametrize(
    ("job_id", "repeat_job_key", "expected"),
    [
        ("run_1", None, "run_1"),  # named by the control plane
        ("17", None, "run_1"),  # an id of BullMQ's counter: still the run its data names
        ("repeat:sched:1795639999000", "sched", "run_1:repeat:sched:1795639999000"),
        ("repeat:9f2c1e:1795639999000", "9f2c1e", "run_1:repeat:9f2c1e:1795639999000"),
        ("custom-iteration", "legacy-key", "run_1:custom-iteration"),  # a repeat with a jobId
        ("repeat:run_1", None, "run_1:repeat:run_1"),
    ],
)
def test_given_a_job_when_identified_then_only_jobs_bullmq_made_get_a_run_of_their_own(
    job_id: str, repeat_job_key: str | None, expected: str
) -> None:
    from runner.contract import JobData
    from runner.runs import run_identity

    data = JobData(workflow_run_id="run_1", workflow_version_id="v", tenant_id="t", input={})
    job = Job()
    job.id = job_id
    job.repeatJobKey = repeat_job_key
    # A retry is the same job id: the same run, so it resumes the same checkpoint.
    assert run_identity(job, data) == run_identity(job, data) == expected
