"""runner.contract: decoding job data and definitions, with errors that name the JSON path.
No sockets."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from runner.contract import (
    JobData,
    _located,
    decode_credentials,
    decode_job_data,
    decode_workflow_version,
    path_of,
)
from runner.errors import CredentialsError, DefinitionError, ErrorCode, PayloadError

JOB: dict[str, Any] = {
    "workflowRunId": "run_8f2c",
    "workflowVersionId": "wfv_12",
    "tenantId": "ten_acme",
    "input": {"customerId": "c_42"},
}

VERSION: dict[str, Any] = {
    "id": "wfv_12",
    "graph": {
        "steps": [
            {"key": "a", "actionId": "act_a", "input": {"path": {"id": "{{ input.customerId }}"}}},
            {"key": "b", "actionId": "act_a", "dependsOn": ["a"], "onFailure": "CONTINUE"},
        ]
    },
    "actions": {"act_a": {"id": "act_a", "endpointTemplate": "https://api.test/c/{id}"}},
}


def with_job(**changes: Any) -> dict[str, Any]:
    return {**JOB, **changes}


def without_job(field: str) -> dict[str, Any]:
    return {k: v for k, v in JOB.items() if k != field}


def payload_error(raw: Any) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decode_job_data(raw)
    assert info.value.code == ErrorCode.INVALID_PAYLOAD
    return info.value


# --- job data: success --------------------------------------------------------------------


def test_given_valid_job_data_as_object_or_text_when_decoded_then_fields_are_typed() -> None:
    data = {**JOB, "deadlineAt": 1795640000000, "sealedCredentials": "v1.a.b"}

    for raw in (data, json.dumps(data), json.dumps(data).encode()):
        job = decode_job_data(raw)
        assert job == JobData(
            workflow_run_id="run_8f2c",
            workflow_version_id="wfv_12",
            tenant_id="ten_acme",
            input={"customerId": "c_42"},
            sealed_credentials="v1.a.b",
            deadline_at=1795640000000,
        )


def test_given_unknown_fields_when_decoded_then_they_are_ignored() -> None:
    job = decode_job_data(with_job(priority=3, newColumn={"x": 1}))

    assert job.workflow_run_id == "run_8f2c"
    assert job.deadline_at is None
    assert job.workflow_version is None


def test_given_an_inline_definition_when_decoded_then_it_stays_undecoded() -> None:
    # A bad definition must be DEFINITION_INVALID later, not INVALID_PAYLOAD here.
    job = decode_job_data(with_job(workflowVersion={"id": 5, "junk": True}))

    assert job.workflow_version == {"id": 5, "junk": True}


# --- job data: errors and their paths -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (5, "$: expected object, got int"),
        ([1], "$: expected object, got array"),
        ("[]", "$: expected object, got array"),
        ("null", "$: expected object, got null"),
    ],
)
def test_given_a_root_that_is_not_an_object_when_decoded_then_the_path_is_root(
    raw: Any, message: str
) -> None:
    err = payload_error(raw)

    assert err.message == message
    assert str(err) == f"INVALID_PAYLOAD: {message}"


@pytest.mark.parametrize(
    ("value", "got"), [(5, "int"), ([], "array"), ("x", "str"), (None, "null")]
)
def test_given_input_that_is_not_an_object_when_decoded_then_the_path_is_input(
    value: Any, got: str
) -> None:
    err = payload_error(with_job(input=value))

    assert err.message == f"$.input: expected object, got {got}"


def test_given_input_not_an_object_in_json_text_when_decoded_then_the_path_is_input() -> None:
    err = payload_error(json.dumps(with_job(input=[1, 2])).encode())

    assert err.message == "$.input: expected object, got array"


@pytest.mark.parametrize("field", ["workflowRunId", "workflowVersionId", "tenantId", "input"])
def test_given_a_missing_required_field_when_decoded_then_it_is_named(field: str) -> None:
    err = payload_error(without_job(field))

    assert err.message == f"$: object missing required field {field}"


@pytest.mark.parametrize(
    ("value", "got"), [("soon", "str"), (1.5, "float"), (True, "bool"), ({}, "object")]
)
def test_given_a_deadline_of_the_wrong_type_when_decoded_then_its_path_is_named(
    value: Any, got: str
) -> None:
    err = payload_error(with_job(deadlineAt=value))

    assert err.message == f"$.deadlineAt: expected int | null, got {got}"


def test_given_a_wrong_id_type_when_decoded_then_its_path_is_named() -> None:
    err = payload_error(with_job(tenantId=42))

    assert err.message == "$.tenantId: expected str, got int"


def test_given_text_that_is_not_json_when_decoded_then_it_is_a_root_error() -> None:
    err = payload_error("{nope")

    assert err.message.startswith("$: not valid JSON (")


# --- the definition -----------------------------------------------------------------------


def test_given_a_valid_definition_when_decoded_then_steps_and_defaults_are_typed() -> None:
    version = decode_workflow_version(VERSION)

    a, b = version.graph.steps
    assert a.depends_on is None
    assert a.on_failure == "FAIL_RUN"
    assert a.input.path == {"id": "{{ input.customerId }}"}
    assert b.depends_on == ["a"]
    assert b.on_failure == "CONTINUE"
    assert version.timeout_ms == 300_000
    assert version.actions["act_a"].method == "GET"
    assert version.actions["act_a"].retry_strategy == "NONE"


def test_given_unknown_fields_on_entities_when_decoded_then_they_are_ignored() -> None:
    raw = json.loads(json.dumps(VERSION))
    raw["publishedBy"] = "u_1"
    raw["actions"]["act_a"]["createdAt"] = "2026-01-01"
    raw["actions"]["act_a"]["ownerTeam"] = {"id": 1}

    version = decode_workflow_version(raw)

    assert version.actions["act_a"].endpoint_template == "https://api.test/c/{id}"


def step_typo(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(json.dumps(VERSION))
    raw["graph"]["steps"][1].update(extra)
    return raw


def test_given_a_typo_in_a_step_field_when_decoded_then_it_fails_with_its_path() -> None:
    with pytest.raises(DefinitionError) as info:
        decode_workflow_version(step_typo(dependson=["a"]))

    assert info.value.code == ErrorCode.DEFINITION_INVALID
    assert info.value.message == "$.graph.steps[1]: object contains unknown field dependson"


@pytest.mark.parametrize("raw_kind", ["object", "text"])
def test_given_an_inline_definition_when_it_fails_then_the_path_starts_at_workflow_version(
    raw_kind: str,
) -> None:
    raw: Any = step_typo(dependson=["a"])
    if raw_kind == "text":
        raw = json.dumps(raw)

    with pytest.raises(DefinitionError) as info:
        decode_workflow_version(raw, where="$.workflowVersion")

    assert info.value.message == (
        "$.workflowVersion.graph.steps[1]: object contains unknown field dependson"
    )


def test_given_a_typo_in_step_input_when_decoded_then_the_nested_path_is_named() -> None:
    raw = json.loads(json.dumps(VERSION))
    raw["graph"]["steps"][0]["input"]["pth"] = {}

    with pytest.raises(DefinitionError) as info:
        decode_workflow_version(raw, where="$.workflowVersion")

    assert info.value.message == (
        "$.workflowVersion.graph.steps[0].input: object contains unknown field pth"
    )


def test_given_a_bad_on_failure_value_when_decoded_then_its_path_is_named() -> None:
    with pytest.raises(DefinitionError) as info:
        decode_workflow_version(step_typo(onFailure="IGNORE"))

    assert info.value.message == "$.graph.steps[1].onFailure: invalid enum value 'IGNORE'"


def test_given_a_definition_that_is_not_an_object_when_decoded_then_the_path_is_where() -> None:
    with pytest.raises(DefinitionError) as info:
        decode_workflow_version(7, where="$.workflowVersion")

    assert info.value.message == "$.workflowVersion: expected object, got int"


def test_given_a_definition_that_is_not_json_when_decoded_then_it_says_so_at_where() -> None:
    with pytest.raises(DefinitionError) as info:
        decode_workflow_version("{", where="$.workflowVersion")

    assert info.value.message.startswith("$.workflowVersion: not valid JSON (")


def test_given_a_missing_graph_when_decoded_then_the_field_is_named() -> None:
    with pytest.raises(DefinitionError) as info:
        decode_workflow_version({"id": "wfv"})

    assert info.value.message == "$: object missing required field graph"


# --- mapping keys in error paths -------------------------------------------------------------


def _two_actions(bad: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "v",
        "graph": {"steps": []},
        "actions": {
            "fine": {"id": "fine", "method": "GET", "endpointTemplate": "/a"},
            'odd "key"': bad,
        },
    }


@pytest.mark.parametrize("as_text", [False, True])
def test_given_a_bad_entry_among_many_when_decoded_then_its_key_is_named(as_text: bool) -> None:
    version = _two_actions({"id": "b", "method": "FETCH", "endpointTemplate": "/b"})
    raw = json.dumps(version) if as_text else version

    with pytest.raises(DefinitionError) as caught:
        decode_workflow_version(raw, "$.workflowVersion")

    assert caught.value.message == (
        """$.workflowVersion.actions["odd \\"key\\""].method: invalid enum value 'FETCH'"""
    )


def test_given_a_bad_secret_when_decoded_then_its_name_is_given_and_never_its_value() -> None:
    creds = {"connections": {"ok": {"id": "ok", "type": "NONE"}}, "secrets": {"a": "x", "b": 5}}

    with pytest.raises(CredentialsError) as caught:
        decode_credentials(json.dumps(creds))

    assert (
        caught.value.message == 'credentials do not decode: $.secrets["b"]: expected str, got int'
    )


class _Inner(msgspec.Struct):
    headers: dict[str, str]


class _Outer(msgspec.Struct):
    actions: dict[str, _Inner]


def test_given_bad_keys_at_two_levels_when_located_then_both_keys_are_named() -> None:
    nested = {"actions": {"a": {"headers": {"h1": "v"}}, "b": {"headers": {"h1": "v", "h2": [1]}}}}

    with pytest.raises(msgspec.ValidationError) as invalid:
        msgspec.convert(nested, _Outer)

    assert path_of(invalid.value) == "$.actions[...].headers[...]: expected str, got array"
    assert _located(path_of(invalid.value), nested, _Outer) == (
        '$.actions["b"].headers["h2"]: expected str, got array'
    )


def test_given_a_path_without_a_mapping_key_then_it_is_left_as_it_is() -> None:
    assert _located("$.input: expected object, got int", {"input": 1}, dict) == (
        "$.input: expected object, got int"
    )
