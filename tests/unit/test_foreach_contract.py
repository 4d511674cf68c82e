"""What docs/contract.md says of expressions and forEach, pinned: the Step fields and their
defaults, the map event's item counts, the settings named. No sockets."""

from __future__ import annotations

from pathlib import Path

import msgspec

from runner.contract import MapStepEvent, StepEvent, decode_workflow_version
from runner.settings import Settings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "contract.md").read_text()


def test_given_a_step_without_for_each_when_decoded_then_it_is_one_call() -> None:
    version = decode_workflow_version(
        {"id": "v", "graph": {"steps": [{"key": "a", "actionId": "x"}]}}
    )
    step = version.graph.steps[0]

    assert (step.for_each, step.max_parallel, step.on_item_error) == (None, 1, "fail")


def test_given_a_map_event_when_encoded_then_it_carries_items_and_others_do_not() -> None:
    common = dict(
        seq=1,
        workflow_run_id="r",
        tenant_id="t",
        workflow_version_id="v",
        job_id="r",
        step_key="a",
        step_run_id="r:a",
        status="RUNNING",
        attempt=1,
        at=0,
    )
    mapped = msgspec.json.decode(
        msgspec.json.encode(MapStepEvent(**common, items={"total": 3, "succeeded": 0, "failed": 0}))
    )
    plain = msgspec.json.decode(msgspec.json.encode(StepEvent(**common)))

    assert mapped["items"] == {"total": 3, "succeeded": 0, "failed": 0}
    assert mapped["kind"] == "step"
    assert "items" not in plain


def test_given_the_contract_doc_then_it_names_the_settings_defaults_and_key_format() -> None:
    settings = Settings()
    assert settings.max_foreach_items == 10_000
    assert settings.expression_budget == 100_000
    for text in (
        "## Expressions",
        "## forEach: a step over items",
        "`RUNNER_MAX_FOREACH_ITEMS` (10,000)",
        "`RUNNER_EXPRESSION_BUDGET` (100,000",
        "`RUNNER_EXPRESSION_MAX_RESULT_BYTES` (1 MiB",
        "`{workflowRunId}:{stepKey}:{index}`",
        "`item:{stepKey}:{index}`",
        '"items": {"total", "succeeded", "failed"}',
    ):
        assert text in DOC, text
