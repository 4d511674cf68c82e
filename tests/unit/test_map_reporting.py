"""forEach reporting: one RUNNING and one terminal event with item counts, a checkpoint field
per item (with no event), progress about every 5% of the items, and the checkpoint read back.
RunReporter over the in-memory sink. No sockets."""

from __future__ import annotations

from runner.engine.ports import ItemCounts, StepResult
from runner.errors import StepHTTPError
from runner.reporting.checkpoint import parse_checkpoint
from tests.unit.test_reporting import RUN, SECRET, harness


async def test_given_1000_items_when_reported_then_two_events_and_about_20_progress_writes() -> (
    None
):
    h = harness(total_steps=1)
    counts = ItemCounts(total=1000)
    await h.reporter.run_started(1)
    await h.reporter.map_running("each", 1, counts)

    for i in range(1000):
        counts.succeeded += 1
        item = StepResult("each", "SUCCESS", attempts=1, output={"body": {"i": i}})
        await h.reporter.item_done("each", i, item, counts)
        if i == 7:  # every item's end is in the checkpoint, read back by index
            restored = parse_checkpoint(h.checkpoint()).items["each"]
            assert sorted(restored) == list(range(8))
            assert restored[7].output == {"body": {"i": 7}}
    done = StepResult("each", "SUCCESS", attempts=1000, output=[], items=counts)
    await h.reporter.step_done(done, 1)

    events = [e for e in h.events() if e.get("stepKey") == "each"]
    assert [(e["status"], e["items"]) for e in events] == [
        ("RUNNING", {"total": 1000, "succeeded": 0, "failed": 0}),
        ("SUCCESS", {"total": 1000, "succeeded": 1000, "failed": 0}),
    ]
    item_progress = [p for p in h.job.progress_values if p["status"] == "RUNNING"]
    assert len(item_progress) == 20
    assert item_progress[-1]["items"] == {"total": 1000, "succeeded": 1000, "failed": 0}
    assert h.job.progress_values[-1]["status"] == "SUCCESS"
    # The step's result replaced its items' checkpoint fields.
    assert parse_checkpoint(h.checkpoint()).items == {}
    assert "step:each" in h.checkpoint()


async def test_given_a_failed_item_when_reported_then_a_log_line_and_a_redacted_checkpoint() -> (
    None
):
    h = harness(total_steps=1)
    counts = ItemCounts(total=2, failed=1)
    error = StepHTTPError(f"each: item 1: PUT answered 500 for {SECRET}", status=500)

    await h.reporter.item_done("each", 1, StepResult("each", "FAILED", 1, error=error), counts)

    raw = h.checkpoint()["item:each:1"]
    assert SECRET.encode() not in raw
    restored = parse_checkpoint({"item:each:1": raw}).items["each"][1]
    assert restored.status == "FAILED" and restored.error is not None
    assert str(restored.error.code) == "HTTP_ERROR"
    assert any("each item 1 FAILED" in line for line in h.job.lines)
    assert h.events() == []
    assert RUN in h.sink.runs
