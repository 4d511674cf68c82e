"""JMESPath expressions in templates (runner.expressions through runner.templating): what a
path stays, what an expression adds, the checks at compile time, the evaluation budget, and the
one-pass template scan. Pure, no sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from runner import expressions
from runner.errors import DefinitionError, ErrorCode, TemplateError
from runner.templating import (
    ITEM_ROOTS,
    Const,
    Eval,
    Text,
    Whole,
    _template_spans,
    compile_for_each,
    compile_value,
    exprs_of,
    render,
)

CONTEXT: dict[str, Any] = {
    "input": {
        "n": 5,
        "s": "Hi There",
        "z": None,
        "l": [3, 1, 2],
        "items": [{"id": "i0", "qty": 2}, {"id": "i1", "qty": 0}, {"id": "i2", "qty": 7}],
        "names": ["a", "b"],
        "ts": 1795639999123,
    },
    "steps": {"fetch": {"status": "SUCCESS", "output": {"body": {"tags": ["x", "y"]}}}},
    "env": {"REGION": "eu"},
    "secrets": {"TOKEN": "tok_s3cret"},
    "run": {"id": "run_1", "tenantId": "ten_1"},
}


def rendered(value: Any, context: dict[str, Any] = CONTEXT, **kw: Any) -> Any:
    return render(compile_value(value, "$.w", **kw), context)


@pytest.fixture
def limits() -> Iterator[None]:
    saved = expressions.limits()
    yield
    expressions.configure(*saved)


# --- paths stay paths ---------------------------------------------------------------------


def test_given_a_plain_path_when_compiled_then_it_stays_a_strict_path() -> None:
    # A path that misses is still a TEMPLATE_ERROR, never JMESPath's lenient null.
    assert isinstance(compile_value("{{ input.n }}"), Whole)
    with pytest.raises(TemplateError, match="'input' has no 'nope'"):
        rendered("{{ input.nope }}")


# --- expressions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ length(input.l) }}", 3),
        ("{{ input.items[?qty > `0`].id }}", ["i0", "i2"]),
        ("{{ input.items[?id == 'i1'].qty | [0] }}", 0),
        ("{{ input.l | [-1] }}", 2),
        ("{{ sort(input.l) }}", [1, 2, 3]),
        ("{{ input.missing || 'fallback' }}", "fallback"),
        ("{{ default(input.z, 'd') }}", "d"),
        ("{{ default(input.items[1].qty, `9`) }}", 0),
        ("{{ join(',', input.names) }}", "a,b"),
        ("{{ concat(env.REGION, '-', input.n) }}", "eu-5"),
        ("{{ format('{}/{}', run.id, input.l[0]) }}", "run_1/3"),
        ("{{ format('{1}:{0}', 'a', 'b') }}", "b:a"),
        ("{{ upper(input.s) }}", "HI THERE"),
        ("{{ lower(trim(' X ')) }}", "x"),
        ("{{ split('a,b', ',') }}", ["a", "b"]),
        ("{{ replace(input.s, ' ', '_') }}", "Hi_There"),
        ("{{ format_date(input.ts, '%Y-%m-%d %H:%M') }}", "2026-11-25 20:53"),
        ("{{ format_date(input.ts, 'iso') }}", "2026-11-25T20:53:19.123Z"),
        ("{{ format_date('2026-01-02T03:04:05Z', '%d/%m/%Y') }}", "02/01/2026"),
        ("{{ contains(steps.fetch.output.body.tags, 'y') }}", True),
        ("{{ {id: run.id, count: length(input.items)} }}", {"id": "run_1", "count": 3}),
    ],
)
def test_given_an_expression_when_rendered_then_it_is_jmespath_with_its_json_type(
    template: str, expected: Any
) -> None:
    assert isinstance(compile_value(template), Eval)
    assert rendered(template) == expected


def test_given_an_expression_inside_text_when_rendered_then_it_is_written_as_text() -> None:
    compiled = compile_value("n={{ length(input.l) }} tags={{ steps.fetch.output.body.tags }}")

    assert isinstance(compiled, Text)
    assert render(compiled, CONTEXT) == 'n=3 tags=["x","y"]'


def test_given_now_when_rendered_then_it_reads_the_injected_clock() -> None:
    compiled = compile_value("{{ format_date(now(), 'iso') }}")

    assert render(compiled, CONTEXT, lambda: 0) == "1970-01-01T00:00:00.000Z"


def test_given_item_roots_when_compiled_then_item_and_index_are_names() -> None:
    context = {**CONTEXT, "item": {"id": "i9"}, "index": 4}

    assert rendered("{{ concat(item.id, '#', index) }}", context, roots=ITEM_ROOTS) == "i9#4"
    assert rendered("{{ item.id }}", context, roots=ITEM_ROOTS) == "i9"
    with pytest.raises(DefinitionError, match="must be one of env, input, run, secrets, steps"):
        compile_value("{{ upper(item.id) }}", "$.w")


# --- compile-time checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{{ lenght(input.l) }}", "unknown function lenght()"),
        ("{{ length(input.l, input.s) }}", "length() takes 1 arguments, not 2"),
        ("{{ concat() }}", "concat() takes at least 1 arguments, not 0"),
        ("{{ foo || input.n }}", "refers to 'foo' at its top"),
        ("{{ length(@) }}", "refers to '@' at its top"),
        ("{{ length(input.l }}", "it ends too early"),
        # Not JMESPath, and a path up to the bracket: the path's message says where it stops.
        ("{{ input.items[?qty > ] }}", "' at '[?qty > ]'"),
        ("{{ length(input.l) ) }}", "unexpected ')' (column 17)"),
        ("{{ " + "a" * 5000 + " || b }}", "longer than 4096 characters"),
    ],
)
def test_given_a_bad_expression_when_compiled_then_definition_error_names_where_and_why(
    template: str, reason: str
) -> None:
    with pytest.raises(DefinitionError) as info:
        compile_value({"q": template}, "$.graph.steps[0].input")

    assert info.value.code == ErrorCode.DEFINITION_INVALID
    assert info.value.message.startswith("$.graph.steps[0].input.q: cannot parse '{{ ")
    assert reason in info.value.message


def test_given_names_inside_a_filter_when_compiled_then_they_are_the_elements_not_roots() -> None:
    # `qty` is each element's field, not a root of the run: no error.
    assert isinstance(compile_value("{{ input.items[?qty > `1`] }}"), Eval)
    assert isinstance(compile_value("{{ sort_by(input.items, &qty)[0].id }}"), Eval)


def test_given_a_compiled_tree_when_exprs_of_then_each_expression_comes_with_its_location() -> None:
    compiled = compile_value({"a": "{{ length(input.l) }}", "b": ["x {{ input.l[0] }}"]}, "$.w")

    assert [(e.text, at) for e, at in exprs_of(compiled)] == [("length(input.l)", "$.w.a")]


# --- evaluation errors and bounds ---------------------------------------------------------


def test_given_a_type_error_when_rendered_then_the_message_names_types_not_values() -> None:
    with pytest.raises(TemplateError) as info:
        rendered("{{ abs(secrets.TOKEN) }}")

    assert info.value.code == ErrorCode.TEMPLATE_ERROR
    assert "abs() expects number, not string" in info.value.message
    assert "tok_s3cret" not in info.value.message


def test_given_a_small_budget_when_an_expression_visits_more_then_it_is_a_template_error(
    limits: None,
) -> None:
    expressions.configure(50, 1024 * 1024)
    context = {**CONTEXT, "input": {"big": [{"a": i} for i in range(100)]}}

    with pytest.raises(TemplateError, match=r"RUNNER_EXPRESSION_BUDGET \(50\)"):
        rendered("{{ input.big[*].a }}", context)
    assert rendered("{{ length(input.big) }}", context) == 100


def test_given_a_doubling_expression_when_rendered_then_it_stops_at_the_budget() -> None:
    # Each [@, @] doubles the value by reference; flattening makes the copies real.
    doubling = " | ".join(["input.s"] + ["[@, @]"] * 40 + ["[]"] * 40)

    with pytest.raises(TemplateError, match="RUNNER_EXPRESSION_BUDGET"):
        rendered("{{ " + doubling + " }}")


def test_given_a_shared_reference_result_when_rendered_then_its_size_is_refused() -> None:
    # 2**40 strings by reference: a few nodes visited, a result no body could hold.
    doubling = " | ".join(["input.s"] + ["[@, @]"] * 40)

    with pytest.raises(TemplateError, match="RUNNER_EXPRESSION_MAX_RESULT_BYTES"):
        rendered("{{ " + doubling + " }}")
    with pytest.raises(TemplateError, match="RUNNER_EXPRESSION_MAX_RESULT_BYTES"):
        rendered("{{ to_string(" + doubling + ") }}")


def test_given_a_join_of_many_references_when_rendered_then_it_is_charged_before_it_is_built() -> (
    None
):
    # 2**12 references to one 100 kB string (cheap to make): 400 MB if joined.
    context = {**CONTEXT, "input": {"s": "x" * 100_000}}
    doubling = " | ".join(["[input.s]"] + ["[@, @] | []"] * 12)

    with pytest.raises(TemplateError, match="RUNNER_EXPRESSION_BUDGET"):
        rendered("{{ join('', " + doubling + ") }}", context)


def test_given_a_bad_date_format_when_rendered_then_it_names_the_allowed_directives() -> None:
    with pytest.raises(TemplateError, match="'%c' is not one of"):
        rendered("{{ format_date(input.ts, '%c') }}")


# --- forEach ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{{ input.items }}", "input.items", " input.items "])
def test_given_a_for_each_path_when_compiled_then_bare_and_braced_are_the_same(text: str) -> None:
    assert render(compile_for_each(text, "$.f"), CONTEXT) == CONTEXT["input"]["items"]


def test_given_a_for_each_expression_when_compiled_then_it_is_jmespath() -> None:
    assert render(compile_for_each("input.items[?qty > `0`].id", "$.f"), CONTEXT) == ["i0", "i2"]


@pytest.mark.parametrize("text", ["ids: {{ input.l }}", "{{ input.l }}{{ input.l }}"])
def test_given_a_for_each_with_text_when_compiled_then_it_is_refused(text: str) -> None:
    with pytest.raises(DefinitionError) as info:
        compile_for_each(text, "$.f")

    assert info.value.message.startswith("$.f: must be one expression")


def test_given_item_in_for_each_when_compiled_then_it_is_refused() -> None:
    with pytest.raises(DefinitionError, match="must start with one of"):
        compile_for_each("item.ids", "$.f")


# --- the template scan --------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "text", ["{{ " * 200_000, "{{\n" * 100_000 + "}}", "{{ a\n" * 100_000 + "}}"]
)
def test_given_many_unclosed_openers_when_scanned_then_it_ends(text: str) -> None:
    # The old pattern rescanned to the end from every "{{": hours for these.
    assert len(_template_spans(text)) <= 1
    assert compile_value("{{ " * 200_000) == Const("{{ " * 200_000)
