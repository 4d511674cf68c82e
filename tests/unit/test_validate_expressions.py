"""``validate`` and ``compile_plan`` on expressions and ``forEach``: every problem with its JSON
path, before anything runs. No sockets."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from runner.contract import decode_workflow_version
from runner.engine.plan import compile_plan
from runner.errors import DefinitionError
from runner.templating import Eval, Whole
from runner.validate import validate_source

ACTIONS = {"act": {"id": "act", "endpointTemplate": "https://api.test/x"}}


def doc(*steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "wfv_1",
        "parameterSchema": {"type": "object", "properties": {"ids": {"type": "array"}}},
        "graph": {"steps": list(steps)},
        "actions": ACTIONS,
    }


def problems(d: dict[str, Any]) -> list[str]:
    return list(validate_source(msgspec.json.encode(d)).problems)


def step(key: str, **fields: Any) -> dict[str, Any]:
    return {"key": key, "actionId": "act", **fields}


def test_given_good_expressions_and_a_for_each_when_validated_then_it_is_ok() -> None:
    d = doc(
        step("a", input={"query": {"n": "{{ length(input.ids) }}"}}),
        step(
            "each",
            forEach="input.ids[?@ != `null`]",
            maxParallel=5,
            onItemError="continue",
            when="{{ steps.a.output.status == `200` }}",
            input={"query": {"id": "{{ item }}", "i": "{{ index }}", "t": "{{ upper(item) }}"}},
        ),
    )

    assert problems(d) == []
    plan = compile_plan(decode_workflow_version(d))
    each = plan.by_key["each"]
    assert isinstance(each.for_each, Eval) and each.max_parallel == 5


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (
            step("b", input={"query": {"n": "{{ lenght(input.ids) }}"}}),
            "$.graph.steps[1].input.query.n: cannot parse '{{ lenght(input.ids) }}': "
            "unknown function lenght()",
        ),
        (
            step("b", input={"query": {"n": "{{ length(input.nope) }}"}}),
            "$.graph.steps[1].input.query.n: '{{ length(input.nope) }}' refers to input field "
            "'nope', which $.parameterSchema does not declare",
        ),
        (
            step("b", dependsOn=[], input={"body": "{{ steps.a.output.body || `{}` }}"}),
            "$.graph.steps[1].input.body: '{{ steps.a.output.body || `{}` }}' refers to step "
            "'a', which is not upstream of 'b'",
        ),
        (
            step("b", input={"query": {"x": "{{ item.id }}"}}),
            "$.graph.steps[1].input.query.x: '{{ item.id }}' must start with one of env, input, "
            "run, secrets, steps",
        ),
        (
            step("b", forEach="{{ item }}"),
            "$.graph.steps[1].forEach: '{{ item }}' must start with one of env, input, run, "
            "secrets, steps",
        ),
        (
            step("b", forEach="length(", input={}),
            "$.graph.steps[1].forEach: cannot parse '{{ length( }}': it ends too early",
        ),
        (
            step("b", forEach="input.ids", maxParallel=0),
            "$.graph.steps[1].maxParallel: must be 1 or more",
        ),
        (step("b", maxParallel=3), "$.graph.steps[1]: maxParallel and onItemError need forEach"),
    ],
)
def test_given_a_bad_expression_or_for_each_when_validated_then_its_path_is_named(
    bad: dict[str, Any], expected: str
) -> None:
    d = doc(step("a"), bad)

    found = problems(d)

    assert any(p.startswith(expected) for p in found), found
    if "refers to" not in expected:  # what only validate can know: declared fields, upstream
        with pytest.raises(DefinitionError):
            compile_plan(decode_workflow_version(d))


def test_given_on_item_error_outside_its_values_when_decoded_then_it_is_definition_invalid() -> (
    None
):
    found = problems(doc(step("a", forEach="input.ids", onItemError="skip")))

    assert found and found[0].startswith("$.graph.steps[0].onItemError: invalid enum value")


def test_given_a_path_for_each_when_compiled_then_it_is_a_strict_path() -> None:
    plan = compile_plan(decode_workflow_version(doc(step("a", forEach="{{ input.ids }}"))))

    assert isinstance(plan.by_key["a"].for_each, Whole)


def test_given_for_each_on_a_paginated_action_when_compiled_then_it_is_refused() -> None:
    d = doc(step("a", forEach="input.ids"))
    d["actions"]["act"] = {
        **ACTIONS["act"],
        "paginate": {"mode": "page", "pageParam": "page"},
    }

    with pytest.raises(DefinitionError, match=r"forEach: a paginated Action cannot run per item"):
        compile_plan(decode_workflow_version(d))
