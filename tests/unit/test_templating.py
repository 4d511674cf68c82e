"""runner.templating: compiling and rendering templates, references, escaping, truthiness and
the JSONPath subset. Pure functions, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from runner.errors import DefinitionError, ErrorCode, TemplateError
from runner.templating import (
    Arr,
    Const,
    Obj,
    Ref,
    Text,
    Whole,
    compile_jsonpath,
    compile_value,
    refs_of,
    render,
    truthy,
)

CONTEXT: dict[str, Any] = {
    "input": {
        "n": 5,
        "f": 1.5,
        "b": True,
        "off": False,
        "z": None,
        "s": "hi",
        "d": {"a": 1, "b": [1, 2]},
        "l": [1, "x"],
        "items": [{"id": "i0"}, {"id": "i1"}],
    },
    "steps": {
        "fetch": {"status": "SUCCESS", "output": {"status": 200, "body": {"email": "e@x"}}},
        "broken": {"status": "FAILED"},
    },
    "env": {"REGION": "eu"},
    "secrets": {"TOKEN": "tok"},
    "run": {"id": "run_1", "tenantId": "ten_1"},
}


def rendered(value: Any, where: str = "$.w") -> Any:
    return render(compile_value(value, where), CONTEXT)


# --- whole-value templates keep their JSON type -------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ input.n }}", 5),
        ("{{input.n}}", 5),
        ("{{ input.f }}", 1.5),
        ("{{ input.b }}", True),
        ("{{ input.z }}", None),
        ("{{ input.s }}", "hi"),
        ("{{ input.d }}", {"a": 1, "b": [1, 2]}),
        ("{{ input.l }}", [1, "x"]),
        ("{{ run.id }}", "run_1"),
        ("{{ run.tenantId }}", "ten_1"),
        ("{{ env.REGION }}", "eu"),
        ("{{ secrets.TOKEN }}", "tok"),
        ("{{ steps.fetch.output.body.email }}", "e@x"),
    ],
)
def test_given_a_string_that_is_one_template_when_rendered_then_the_value_keeps_its_type(
    template: str, expected: Any
) -> None:
    value = rendered(template)

    assert value == expected
    assert type(value) is type(expected)


# --- templates inside text ----------------------------------------------------------------


def test_given_non_strings_inside_text_when_rendered_then_they_are_compact_json() -> None:
    template = "n={{ input.n }} b={{ input.b }} z={{ input.z }} d={{ input.d }} l={{ input.l }}"

    assert rendered(template) == 'n=5 b=true z=null d={"a":1,"b":[1,2]} l=[1,"x"]'


def test_given_strings_inside_text_when_rendered_then_they_are_inserted_unquoted() -> None:
    assert rendered("{{ input.s }}-{{ env.REGION }}") == "hi-eu"
    assert rendered(" {{ input.s }}") == " hi"


def test_given_a_template_with_surrounding_space_when_compiled_then_it_is_text() -> None:
    # Only an exact "{{ expr }}" keeps the type; any other character makes it text.
    compiled = compile_value(" {{ input.n }}")

    assert isinstance(compiled, Text)
    assert render(compiled, CONTEXT) == " 5"


# --- escaping -----------------------------------------------------------------------------


def test_given_an_escaped_template_when_rendered_then_it_is_literal_braces() -> None:
    compiled = compile_value(r"\{{ input.n }}")

    assert compiled == Const("{{ input.n }}")


def test_given_an_escape_next_to_a_real_template_when_rendered_then_only_the_real_one_renders() -> (
    None
):
    assert rendered(r"use \{{ name }} for {{ input.s }}") == "use {{ name }} for hi"


def test_given_unknown_root_in_an_escaped_template_when_compiled_then_nothing_is_parsed() -> None:
    # An escaped template is text, so a root that would be refused is fine there.
    assert compile_value(r"\{{ nope.x }}") == Const("{{ nope.x }}")


def test_given_braces_without_a_closing_pair_when_compiled_then_they_are_text() -> None:
    assert compile_value("a {{ b") == Const("a {{ b")


# --- indexes ------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["{{ input.items[1].id }}", "{{ input.items.1.id }}"])
def test_given_an_index_when_rendered_then_it_picks_the_element(template: str) -> None:
    assert rendered(template) == "i1"


def test_given_a_quoted_name_in_a_template_when_compiled_then_it_is_refused() -> None:
    # Quoted names are JSONPath only; a template path is dots and indexes.
    with pytest.raises(DefinitionError, match=r"at '\['id'\]'"):
        compile_value("{{ input.items[1]['id'] }}", "$.w")


def test_given_dotted_and_bracketed_indexes_when_parsed_then_they_are_the_same_path() -> None:
    a = compile_value("{{ input.items.0.id }}")
    b = compile_value("{{ input.items[0].id }}")

    assert isinstance(a, Whole) and isinstance(b, Whole)
    assert a.ref.path == b.ref.path == ("items", 0, "id")


# --- compile-time errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", ["{{ foo.bar }}", "{{ }}", "{{ __import__ }}", "x {{ input.s }} {{ job.id }}"]
)
def test_given_an_unknown_root_when_compiled_then_definition_error_names_the_location(
    template: str,
) -> None:
    with pytest.raises(DefinitionError) as info:
        compile_value({"body": {"x": template}}, "$.graph.steps[0].input")

    assert info.value.code == ErrorCode.DEFINITION_INVALID
    assert info.value.message.startswith("$.graph.steps[0].input.body.x: ")
    assert "must start with one of env, input, run, secrets, steps" in info.value.message


@pytest.mark.parametrize(
    ("template", "rest"),
    [
        ("{{ input.n() }}", "()"),
        ("{{ input.s.upper() }}", "()"),
        ("{{ input.l[-1] }}", "[-1]"),
        ("{{ input + 1 }}", " + 1"),
    ],
)
def test_given_an_expression_beyond_a_path_when_compiled_then_it_is_refused(
    template: str, rest: str
) -> None:
    with pytest.raises(DefinitionError) as info:
        compile_value(template, "$.w")

    assert info.value.message.startswith("$.w: cannot parse")
    assert info.value.message.endswith(f"at '{rest}'")


# --- missing references -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "missing"),
    [
        ("{{ input.nope.deep }}", "'input' has no 'nope'"),
        ("{{ input.d.a.deeper }}", "'input.d.a' has no 'deeper'"),
        ("{{ input.items[5].id }}", "'input.items' has no index [5]"),
        ("{{ input.s[0] }}", "'input.s' has no index [0]"),
        ("{{ steps.ghost.output }}", "'steps' has no 'ghost'"),
        ("{{ steps.broken.output.body }}", "'steps.broken' has no 'output'"),
        ("{{ env.NOPE }}", "'env' has no 'NOPE'"),
    ],
)
def test_given_a_missing_reference_when_rendered_then_template_error_names_location_and_segment(
    template: str, missing: str
) -> None:
    with pytest.raises(TemplateError) as info:
        rendered({"q": template}, "$.graph.steps[2].input.query")

    assert info.value.code == ErrorCode.TEMPLATE_ERROR
    assert info.value.message == (
        f"$.graph.steps[2].input.query.q: '{template}' has no value: {missing}"
    )
    # The lookup's own error is not shown as its context.
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_given_a_missing_reference_inside_text_when_rendered_then_it_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match=r"\$\.w: '\{\{ input\.x \}\}' has no value"):
        rendered("id-{{ input.x }}")


def test_given_a_root_absent_from_the_context_when_rendered_then_it_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="'secrets' is not available"):
        render(compile_value("{{ secrets.A }}", "$.w"), {"input": {}})


def test_given_a_value_that_is_null_when_referenced_then_it_is_not_missing() -> None:
    assert rendered("{{ input.z }}") is None


# --- constant folding and refs_of ---------------------------------------------------------


def test_given_a_subtree_without_templates_when_compiled_then_it_is_one_const() -> None:
    value = {"a": 1, "b": [True, None, "x", {"c": "plain"}]}

    compiled = compile_value(value)

    assert compiled == Const({"a": 1, "b": [True, None, "x", {"c": "plain"}]})
    assert compile_value([1, "x", {"c": 2}]) == Const([1, "x", {"c": 2}])
    assert compile_value(7) == Const(7)
    assert compile_value(None) == Const(None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"e": r"\{{ x }}"}, {"e": "{{ x }}"}),
        ([r"\{{ x }}"], ["{{ x }}"]),
        ({"e": r"\{{ x }}", "f": "{{ input.n }}"}, {"e": "{{ x }}", "f": 5}),
    ],
)
def test_given_an_escape_inside_an_object_or_array_when_rendered_then_it_is_unescaped(
    value: Any, expected: Any
) -> None:
    # The same rule as for a lone string: an object made only of constants folds into one
    # Const, and that Const must hold the unescaped strings, not the raw definition.
    assert rendered(value) == expected


def test_given_a_mixed_tree_when_compiled_then_only_template_branches_stay_structured() -> None:
    compiled = compile_value({"keep": {"x": 1}, "t": ["lit", "{{ input.n }}"]}, "$.b")

    assert isinstance(compiled, Obj)
    items = dict(compiled.items)
    assert items["keep"] == Const({"x": 1})
    assert isinstance(items["t"], Arr)
    assert items["t"].items[0] == Const("lit")
    assert isinstance(items["t"].items[1], Whole)
    assert items["t"].items[1].where == "$.b.t[1]"
    assert render(compiled, CONTEXT) == {"keep": {"x": 1}, "t": ["lit", 5]}


def test_given_a_compiled_tree_when_refs_of_then_every_reference_comes_with_its_location() -> None:
    compiled = compile_value(
        {"a": "{{ input.n }}", "b": ["x {{ env.REGION }} {{ run.id }}"], "c": 3}, "$.w"
    )

    found = [(ref.text, where) for ref, where in refs_of(compiled)]

    assert found == [("input.n", "$.w.a"), ("env.REGION", "$.w.b[0]"), ("run.id", "$.w.b[0]")]
    assert refs_of(compile_value({"c": 3})) == []
    ref, _ = refs_of(compiled)[0]
    assert ref == Ref("input.n", "input", ("n",))


# --- truthy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [False, None, 0, 0.0, "", "   ", "false", "FALSE", " False ", "0", [], {}]
)
def test_given_a_falsy_value_when_tested_then_it_is_false(value: Any) -> None:
    assert truthy(value) is False


@pytest.mark.parametrize("value", [True, 1, -1, 0.5, "true", "no", "0.0", "x", [0], {"a": None}])
def test_given_a_truthy_value_when_tested_then_it_is_true(value: Any) -> None:
    assert truthy(value) is True


def test_given_a_false_value_rendered_into_text_when_tested_then_it_is_false() -> None:
    # "{{ x }}" with surrounding text renders false as "false": that must still skip.
    assert truthy(rendered(" {{ input.off }} ")) is False


# --- JSONPath -----------------------------------------------------------------------------

DOC: dict[str, Any] = {
    "status": 200,
    "body": {
        "email": "e@x",
        "items": [{"id": 1}, {"id": 2}, {"id": 3}],
        "a b": {"c": True},
        "o": {"x": 1, "y": 2},
        "n": None,
    },
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("$", DOC),
        ("$.status", 200),
        ("$.body.email", "e@x"),
        ("$['body']['a b'].c", True),
        ('$["body"]["email"]', "e@x"),
        ("$.body.items[0].id", 1),
        ("$.body.items[-1].id", 3),
        ("$.body.items[-3].id", 1),
        ("$.body.items[*].id", [1, 2, 3]),
        ("$.body.items.*.id", [1, 2, 3]),
        ("$.body.o.*", [1, 2]),
        ("$.body.missing[*]", []),
        ("$.body.missing", None),
        ("$.body.items[3]", None),
        ("$.body.items[-4]", None),
        ("$.body.email.deeper", None),
        ("$.body.items.id", None),
    ],
)
def test_given_a_jsonpath_when_found_then_it_yields_the_value_or_a_list_or_none(
    path: str, expected: Any
) -> None:
    assert compile_jsonpath(path, "$.w").find(DOC) == expected


def test_given_a_wildcard_path_when_found_then_it_is_always_a_list() -> None:
    path = compile_jsonpath("$.body.items[*]", "$.w")

    assert path.has_wildcard
    assert path.find({"body": {"items": [{"id": 1}]}}) == [{"id": 1}]
    assert path.find({}) == []


def test_given_a_path_to_an_existing_value_when_checked_then_exists_says_so() -> None:
    assert compile_jsonpath("$.body.email", "$.w").exists(DOC)
    assert not compile_jsonpath("$.body.missing", "$.w").exists(DOC)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("body.x", "must start with '$'"),
        ("$..x", "at '..x'"),
        ("$.a[", "at '['"),
        ("$.a[?(@.x)]", "at '[?(@.x)]'"),
        ("$ .a", "at ' .a'"),
        ("$.a['b]", "at '['b]'"),
    ],
)
def test_given_a_bad_jsonpath_when_compiled_then_definition_error_names_where(
    path: str, fragment: str
) -> None:
    with pytest.raises(DefinitionError) as info:
        compile_jsonpath(path, "$.graph.steps[0].extract.email")

    assert info.value.message.startswith("$.graph.steps[0].extract.email: ")
    assert fragment in info.value.message
