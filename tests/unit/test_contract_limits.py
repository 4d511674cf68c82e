"""The limits of the contract (issue 21): the documents name every error code and every limit
with its true default, and ids the runner keys things by are bounded. No sockets."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from runner.contract import decode_job_data
from runner.errors import ErrorCode, PayloadError
from runner.settings import Settings

# --- the documents name every code and limit --------------------------------------------------

_DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_contract_names_every_error_code() -> None:
    contract = (_DOCS / "contract.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in contract]
    assert missing == []


@pytest.mark.parametrize(
    ("setting", "default"),
    [
        ("RUNNER_MAX_JSON_DEPTH", "128"),
        ("RUNNER_MAX_RESPONSE_BYTES", "10 MiB"),
        ("RUNNER_MAX_JOB_BYTES", "1 MiB"),
        ("RUNNER_EGRESS_ALLOW", "none"),
        ("RUNNER_FOLLOW_REDIRECTS", "off"),
        ("RUNNER_MAX_REDIRECTS", "5"),
    ],
)
def test_operations_lists_each_refusal_with_its_setting_and_true_default(
    setting: str, default: str
) -> None:
    # Given the section that says what the runner refuses by default
    operations = (_DOCS / "operations.md").read_text()
    section = operations.split("## What the runner refuses by default, and why", 1)[1]
    section = section.split("\n## ", 1)[0]
    # Then the setting is there with its default, and the default is the settings' own
    row = next(line for line in section.splitlines() if f"`{setting}` ({default}" in line)
    assert row
    field = next(f for f in fields(Settings) if f.metadata["env"] == setting)
    value = {
        "10 MiB": 10 * 1024 * 1024,
        "1 MiB": 1024 * 1024,
        "none": "",
        "off": False,
    }.get(default, default)
    assert str(field.default) == str(value)


def test_every_setting_the_contract_and_the_refusals_name_exists() -> None:
    known = {f.metadata["env"] for f in fields(Settings)}
    operations = (_DOCS / "operations.md").read_text()
    refusals = operations.split("## What the runner refuses by default, and why", 1)[1]
    for text in ((_DOCS / "contract.md").read_text(), refusals.split("\n## ", 1)[0]):
        assert set(re.findall(r"RUNNER_[A-Z0-9_]+", text)) - known == set()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("workflowRunId", "", "expected str of length >= 1"),
        ("tenantId", "", "expected str of length >= 1"),
        ("workflowVersionId", "v" * 513, "expected str of length <= 512"),
    ],
)
def test_given_an_empty_or_huge_id_when_decoded_then_it_is_invalid_payload(
    field: str, value: str, message: str
) -> None:
    # An empty run id would make every such job share one checkpoint and one idempotency key.
    data = {"workflowRunId": "r", "workflowVersionId": "v", "tenantId": "t", "input": {}}
    with pytest.raises(PayloadError) as info:
        decode_job_data({**data, field: value})
    assert str(info.value) == f"INVALID_PAYLOAD: $.{field}: {message}"
