"""runner.engine.plan: a WorkflowVersion compiled into a Plan. Step keys, actions, the
dependency graph, compiled templates. No sockets."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from runner.contract import decode_workflow_version
from runner.engine.plan import Plan, Problems, compile_plan, plan_or_problems
from runner.errors import DefinitionError, ErrorCode
from runner.templating import Const, Whole

ACTIONS: dict[str, Any] = {
    "act": {"id": "act", "endpointTemplate": "https://api.test/x"},
    "act_retry": {
        "id": "act_retry",
        "endpointTemplate": "https://api.test/y",
        "retryStrategy": "FIXED",
        "maxAttempts": 3,
        "initialDelayMs": 10,
        "timeoutMs": 5000,
    },
}


def plan_of(steps: list[dict[str, Any]], **extra: Any) -> Plan:
    raw = {"id": "wfv_1", "graph": {"steps": steps}, "actions": ACTIONS, **extra}
    return compile_plan(decode_workflow_version(raw))


def step(key: str, **fields: Any) -> dict[str, Any]:
    return {"key": key, "actionId": "act", **fields}


def definition_error(steps: list[dict[str, Any]]) -> str:
    with pytest.raises(DefinitionError) as info:
        plan_of(steps)
    assert info.value.code == ErrorCode.DEFINITION_INVALID
    return info.value.message


# --- keys and actions ---------------------------------------------------------------------


def test_given_a_duplicate_key_when_compiled_then_both_places_are_named() -> None:
    message = definition_error([step("a"), step("b"), step("a")])

    assert message == "$.graph.steps[2].key: duplicate key 'a' (also $.graph.steps[0])"


@pytest.mark.parametrize(
    "key", ["1st", "has-dash", "has space", "", "dotted.key", "é", "trailing_newline\n"]
)
def test_given_a_key_outside_the_pattern_when_compiled_then_it_is_refused(key: str) -> None:
    message = definition_error([step("ok"), step(key)])

    assert message == f"$.graph.steps[1].key: '{key}' must match [A-Za-z_][A-Za-z0-9_]*"
    # The key becomes part of stepRunId and of a checkpoint field name: nothing may slip by.


@pytest.mark.parametrize("key", ["a", "_private", "Fetch_Customer_2"])
def test_given_a_key_inside_the_pattern_when_compiled_then_it_is_accepted(key: str) -> None:
    assert plan_of([step(key)]).steps[0].key == key


def test_given_an_unknown_action_when_compiled_then_it_is_named() -> None:
    message = definition_error([step("a"), {"key": "b", "actionId": "act_nope"}])

    assert message == "$.graph.steps[1].actionId: unknown action 'act_nope'"


# --- the graph ----------------------------------------------------------------------------


def test_given_an_unknown_dependency_when_compiled_then_it_is_named() -> None:
    message = definition_error([step("a"), step("b", dependsOn=["a", "ghost"])])

    assert message == "$.graph.steps[1].dependsOn: unknown step 'ghost'"


def test_given_a_self_dependency_when_compiled_then_it_is_named() -> None:
    message = definition_error([step("a"), step("b", dependsOn=["b"])])

    assert message == "$.graph.steps[1].dependsOn: step 'b' depends on itself"


def test_given_a_cycle_when_compiled_then_the_message_walks_the_cycle() -> None:
    # a depends on c, c on b, b on a.
    message = definition_error(
        [step("a", dependsOn=["c"]), step("b", dependsOn=["a"]), step("c", dependsOn=["b"])]
    )

    assert message == "$.graph.steps: dependency cycle a -> c -> b -> a"


def test_given_a_cycle_beside_a_valid_chain_when_compiled_then_only_the_cycle_is_named() -> None:
    message = definition_error(
        [
            step("root", dependsOn=[]),
            step("ok", dependsOn=["root"]),
            step("x", dependsOn=["y", "root"]),
            step("y", dependsOn=["x"]),
            step("after", dependsOn=["x"]),
        ]
    )

    assert message == "$.graph.steps: dependency cycle x -> y -> x"


def test_given_no_depends_on_when_compiled_then_each_step_follows_the_one_before() -> None:
    plan = plan_of([step("a"), step("b"), step("c")])

    assert [(s.key, s.depends_on) for s in plan.steps] == [
        ("a", ()),
        ("b", ("a",)),
        ("c", ("b",)),
    ]


def test_given_explicit_depends_on_when_compiled_then_it_replaces_the_implicit_one() -> None:
    plan = plan_of(
        [
            step("a"),
            step("b", dependsOn=[]),
            step("c", dependsOn=["a", "b", "a"]),
            step("d"),
        ]
    )

    assert plan.by_key["b"].depends_on == ()
    assert plan.by_key["c"].depends_on == ("a", "b")  # duplicates dropped, order kept
    assert plan.by_key["d"].depends_on == ("c",)


def test_given_a_dependency_on_a_later_step_when_compiled_then_it_is_allowed() -> None:
    plan = plan_of([step("a", dependsOn=["b"]), step("b", dependsOn=[])])

    assert plan.by_key["a"].depends_on == ("b",)


def test_given_3000_linear_steps_when_compiled_then_no_recursion_limit_is_hit() -> None:
    count = max(3000, sys.getrecursionlimit() * 3)
    steps = [
        step(f"s{i}", input={"body": {"prev": f"{{{{ input.n }}}}-{i}"}}) for i in range(count)
    ]

    plan = plan_of(steps)

    assert len(plan.steps) == count
    assert plan.steps[-1].depends_on == (f"s{count - 2}",)


def test_given_a_3000_step_cycle_when_compiled_then_it_is_found_without_recursion() -> None:
    count = 3000
    steps = [step(f"s{i}", dependsOn=[f"s{(i + 1) % count}"]) for i in range(count)]

    message = definition_error(steps)

    assert message.startswith("$.graph.steps: dependency cycle s0 -> s1 -> s2 -> ")
    assert message.endswith(f"-> s{count - 1} -> s0")


# --- what a step plan holds ---------------------------------------------------------------


def test_given_a_step_when_compiled_then_templates_policy_and_timeout_are_ready() -> None:
    plan = plan_of(
        [
            {
                "key": "a",
                "actionId": "act_retry",
                "input": {
                    "path": {"id": "{{ input.id }}"},
                    "query": {"fixed": "1"},
                    "body": {"n": "{{ input.n }}"},
                },
                "when": "{{ input.go }}",
                "retry": {"maxAttempts": 5},
                "extract": {"email": "$.body.email"},
            }
        ],
        envConfig={"vars": {"R": "eu"}, "secretRefs": {"KEY": "sec_1"}},
    )

    sp = plan.by_key["a"]
    assert isinstance(sp.when, Whole)
    assert sp.query == Const({"fixed": "1"})
    assert sp.policy.strategy == "FIXED"
    assert sp.policy.max_attempts == 5  # the step's override wins field by field
    assert sp.policy.initial_delay_ms == 10
    assert sp.timeout_ms == 5000
    assert [name for name, _ in sp.extract] == ["email"]
    assert plan.secret_refs == {"KEY": "sec_1"}
    assert plan.id == "wfv_1"


def test_given_a_template_with_an_unknown_root_when_compiled_then_its_step_path_is_named() -> None:
    message = definition_error([step("a"), step("b", input={"body": {"x": "{{ job.id }}"}})])

    assert message.startswith("$.graph.steps[1].input.body.x: ")


def test_given_a_bad_extract_path_when_compiled_then_its_name_is_named() -> None:
    message = definition_error([step("a", extract={"email": "body.email"})])

    assert message == "$.graph.steps[0].extract.email: JSONPath 'body.email' must start with '$'"


def test_given_a_zero_step_timeout_when_compiled_then_it_is_refused() -> None:
    message = definition_error([step("a", timeoutMs=0)])

    assert message == "$.graph.steps[0].timeoutMs: must be above 0"


def test_compiling_names_every_problem_in_one_pass_and_a_run_fails_with_the_first() -> None:
    # Given a definition with five problems in three steps and a schema
    raw = {
        "id": "wfv_1",
        "graph": {
            "steps": [
                step("a", input={"body": {"x": "{{ nope.x }}", "y": "{{ steps..z }}"}}),
                step("a", dependsOn=["ghost"]),
                step("c", actionId="nope", extract={"v": "$[?("}),
            ]
        },
        "actions": ACTIONS,
        "parameterSchema": {"type": "object", "properties": {"n": {"pattern": "(a"}}},
    }
    version = decode_workflow_version(raw)
    problems = Problems()

    # When it is compiled in collecting mode, and as a run compiles it
    assert plan_or_problems(version, problems) is None
    with pytest.raises(DefinitionError) as info:
        compile_plan(version)

    # Then each problem is named at its place, and the run's error is the first of them
    where = [m.split(":", 1)[0] for m in problems.messages]
    assert where == [
        "$.graph.steps[0].input.body.x",
        "$.graph.steps[0].input.body.y",
        "$.graph.steps[1].key",
        "$.graph.steps[1].dependsOn",
        "$.graph.steps[2].actionId",
        "$.graph.steps[2].extract.v",
        "$.parameterSchema",
    ]
    assert info.value.message == problems.messages[0]
