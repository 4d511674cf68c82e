"""JSON Schema validation: input, request parts and response, each failure with its code and
field, values never quoted, schemas compiled once."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest

from runner.contract import WorkflowVersion, decode_workflow_version
from runner.engine.schemas import (
    PlanSchemas,
    check_input,
    check_output,
    check_request,
    clear_compile_cache,
    compile_cache_info,
    compile_schema,
    compile_schemas,
)
from runner.errors import DefinitionError, ErrorCode, SchemaError

SECRET = "s3cr3t-Value-42"

TICKET_BODY = {
    "type": "object",
    "required": ["subject"],
    "properties": {"subject": {"type": "string"}, "priority": {"type": "integer"}},
}


def definition(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "wfv_schemas",
        "parameterSchema": {
            "type": "object",
            "required": ["customerId"],
            "properties": {
                "customerId": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "tier": {"enum": ["gold", "silver"]},
                "note": {"type": "string", "default": "none"},
            },
        },
        "graph": {
            "steps": [
                {"key": "create_ticket", "actionId": "act_create_ticket"},
                {"key": "create_again", "actionId": "act_create_ticket"},
                {"key": "get_ticket", "actionId": "act_get_ticket"},
                {"key": "list_tickets", "actionId": "act_list_tickets"},
                {"key": "plain", "actionId": "act_plain"},
            ]
        },
        "actions": {
            "act_create_ticket": {
                "id": "act_create_ticket",
                "method": "POST",
                "endpointTemplate": "https://desk.example/tickets",
                "bodySchema": TICKET_BODY,
            },
            "act_get_ticket": {
                "id": "act_get_ticket",
                "endpointTemplate": "https://desk.example/tickets/{ticketId}",
                "pathSchema": {
                    "type": "object",
                    "required": ["ticketId"],
                    "properties": {"ticketId": {"type": "string", "pattern": "^T-[0-9]+$"}},
                },
                "outputSchema": {
                    "type": "object",
                    "required": ["id"],
                    "properties": {"id": {"type": "string"}},
                },
            },
            "act_list_tickets": {
                "id": "act_list_tickets",
                "endpointTemplate": "https://desk.example/tickets",
                "querySchema": {
                    "type": "object",
                    "properties": {"limit": {"type": "integer", "maximum": 100}},
                    "additionalProperties": False,
                },
            },
            "act_plain": {"id": "act_plain", "endpointTemplate": "https://desk.example/ping"},
        },
    }
    doc.update(overrides)
    return doc


def version(**overrides: Any) -> WorkflowVersion:
    return decode_workflow_version(definition(**overrides))


@pytest.fixture
def schemas() -> PlanSchemas:
    return compile_schemas(version())


def failure(call: Any, *args: Any) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        call(*args)
    err = info.value
    # The validator's exception carries the value; it must not travel along as the cause.
    assert err.__cause__ is None and err.__suppress_context__
    return err


# --- input ------------------------------------------------------------------------------------


def test_valid_input_passes_and_is_not_modified(schemas: PlanSchemas) -> None:
    value = {"customerId": "c_42", "tags": ["a"]}
    check_input(schemas, value)
    # use_default=False: the schema's default for "note" is not written into the input.
    assert value == {"customerId": "c_42", "tags": ["a"]}


def test_input_missing_a_required_field_is_invalid_input(schemas: PlanSchemas) -> None:
    err = failure(check_input, schemas, {"tags": []})
    assert err.code is ErrorCode.INVALID_INPUT
    assert str(err) == "INVALID_INPUT: $.input: must contain ['customerId'] properties"


def test_input_field_of_the_wrong_type_names_the_field(schemas: PlanSchemas) -> None:
    err = failure(check_input, schemas, {"customerId": 42})
    assert err.code is ErrorCode.INVALID_INPUT
    assert err.message == "$.input.customerId: must be string"


def test_input_error_inside_an_array_names_the_index(schemas: PlanSchemas) -> None:
    err = failure(check_input, schemas, {"customerId": "c", "tags": ["ok", {"k": SECRET}]})
    assert err.message == "$.input.tags[1]: must be string"
    assert SECRET not in str(err)


def test_input_enum_failure_quotes_the_schema_not_the_value(schemas: PlanSchemas) -> None:
    err = failure(check_input, schemas, {"customerId": "c", "tier": SECRET})
    assert err.message == "$.input.tier: must be one of ['gold', 'silver']"


def test_no_parameter_schema_accepts_any_input() -> None:
    schemas = compile_schemas(version(parameterSchema=None))
    check_input(schemas, {"anything": SECRET})


# --- request ----------------------------------------------------------------------------------


def test_valid_request_passes(schemas: PlanSchemas) -> None:
    check_request(schemas, "create_ticket", {}, {}, {"subject": "hi", "priority": 2})
    check_request(schemas, "get_ticket", {"ticketId": "T-12"}, {}, None)
    check_request(schemas, "list_tickets", {}, {"limit": 10}, None)
    check_request(schemas, "plain", {"x": SECRET}, {"y": 1}, [SECRET])


def test_body_of_the_wrong_type_is_schema_validation(schemas: PlanSchemas) -> None:
    err = failure(
        check_request, schemas, "create_ticket", {}, {}, {"subject": "s", "priority": SECRET}
    )
    assert err.code is ErrorCode.SCHEMA_VALIDATION
    assert str(err) == "SCHEMA_VALIDATION: create_ticket: body.priority must be integer"
    assert SECRET not in str(err)


def test_missing_body_fails_a_body_schema(schemas: PlanSchemas) -> None:
    err = failure(check_request, schemas, "create_again", {}, {}, None)
    assert err.message == "create_again: body must be object"


def test_path_parameter_that_breaks_its_pattern(schemas: PlanSchemas) -> None:
    err = failure(check_request, schemas, "get_ticket", {"ticketId": SECRET}, {}, None)
    assert err.code is ErrorCode.SCHEMA_VALIDATION
    assert err.message == "get_ticket: path.ticketId must match pattern ^T-[0-9]+$"
    assert SECRET not in str(err)


def test_query_over_its_maximum(schemas: PlanSchemas) -> None:
    err = failure(check_request, schemas, "list_tickets", {}, {"limit": 1000}, None)
    assert err.message == "list_tickets: query.limit must be smaller than or equal to 100"
    assert "1000" not in err.message


def test_query_with_a_key_the_schema_forbids_names_the_key_only(schemas: PlanSchemas) -> None:
    err = failure(check_request, schemas, "list_tickets", {}, {"page": SECRET}, None)
    assert err.message == "list_tickets: query must not contain {'page'} properties"


def test_a_step_without_schemas_is_not_checked(schemas: PlanSchemas) -> None:
    check_request(schemas, "no_such_step", 1, 2, 3)
    check_output(schemas, "no_such_step", 4)


# --- response ---------------------------------------------------------------------------------


def test_response_body_against_the_output_schema(schemas: PlanSchemas) -> None:
    check_output(schemas, "get_ticket", {"id": "T-1"})
    err = failure(check_output, schemas, "get_ticket", {"id": 7})
    assert err.code is ErrorCode.SCHEMA_VALIDATION
    assert str(err) == "SCHEMA_VALIDATION: get_ticket: response body.id must be string"


def test_response_missing_a_required_field(schemas: PlanSchemas) -> None:
    err = failure(check_output, schemas, "get_ticket", {"title": SECRET})
    assert err.message == "get_ticket: response body must contain ['id'] properties"


def test_no_output_schema_accepts_any_response(schemas: PlanSchemas) -> None:
    check_output(schemas, "create_ticket", SECRET)


# --- compiling --------------------------------------------------------------------------------


def test_each_distinct_schema_compiles_once_across_steps_actions_and_versions() -> None:
    clear_compile_cache()
    doc = definition()
    # A second action with the same body schema, its keys in another order.
    doc["actions"]["act_other"] = {
        "id": "act_other",
        "endpointTemplate": "https://desk.example/other",
        "bodySchema": dict(reversed(list(TICKET_BODY.items()))),
    }
    first = compile_schemas(decode_workflow_version(doc))
    distinct = 5  # parameterSchema, bodySchema (shared), pathSchema, outputSchema, querySchema
    assert compile_cache_info().misses == distinct
    # Two steps of one action share its validators.
    assert first.per_step["create_ticket"] is first.per_step["create_again"]
    assert first.per_step["create_ticket"].body is not None

    second = compile_schemas(decode_workflow_version({**doc, "id": "wfv_other"}))
    assert compile_cache_info().misses == distinct
    assert second.per_step["get_ticket"].output is first.per_step["get_ticket"].output


def test_schema_that_does_not_compile_names_its_location() -> None:
    bad = definition()
    bad["actions"]["act_create_ticket"]["bodySchema"] = {"type": "strin"}
    with pytest.raises(DefinitionError) as info:
        compile_schemas(decode_workflow_version(bad))
    assert info.value.code is ErrorCode.DEFINITION_INVALID
    assert (
        info.value.message
        == "$.actions.act_create_ticket.bodySchema: does not compile: Unknown type"
    )


def test_parameter_schema_with_a_bad_pattern() -> None:
    with pytest.raises(DefinitionError) as info:
        compile_schemas(version(parameterSchema={"type": "string", "pattern": "("}))
    assert info.value.message.startswith("$.parameterSchema: does not compile: invalid pattern: ")


def test_a_remote_ref_is_refused_without_fetching_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[Any] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: fetched.append(a))
    for ref in ("http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "other.json"):
        with pytest.raises(DefinitionError) as info:
            compile_schema({"$ref": ref}, "$.parameterSchema")
        assert info.value.message == (
            f"$.parameterSchema: does not compile: $ref '{ref}' leaves the schema; "
            "only local refs (#/...) are allowed"
        )
    assert fetched == []


def test_a_local_ref_compiles() -> None:
    validate = compile_schema(
        {
            "definitions": {"id": {"type": "string"}},
            "properties": {"a": {"$ref": "#/definitions/id"}},
        },
        "$.parameterSchema",
    )
    validate({"a": "x"})
