"""JMESPath expressions inside templates: compiled once, evaluated under a budget.

Why JMESPath (docs/contract.md, "Expressions"): it is pure data in, data out (no assignment, no
loops, no host calls, no regexes), its Python implementation is small, well kept and used by
the AWS CLI, and the Node control plane has the same language on npm (``jmespath``), so an
editor can preview an expression where the workflow is written. JSONata has no maintained
Python implementation whose evaluation can be bounded; CEL is safe but unfamiliar to JSON users.

Bounds, so that a hostile or careless expression cannot hold the event loop or the memory:
- the text is at most ``MAX_EXPRESSION_CHARS``; every function it calls exists, with its arity,
  and every name at its top is a root of the run (checked at compile time);
- evaluation spends a budget (``RUNNER_EXPRESSION_BUDGET`` units: one per node visited, one per
  element a flatten, slice or function builds, one per character a string function builds) and
  its result is at most ``RUNNER_EXPRESSION_MAX_RESULT_BYTES`` (measured without encoding it,
  so a value of shared references such as ``@ | [@, @] | [@, @] | ...`` is refused early).
Whatever goes wrong is an ``ExpressionError`` whose message carries no value from the data.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jmespath
import msgspec
from jmespath import exceptions as jp_errors
from jmespath import functions as jp_functions
from jmespath.visitor import Options, TreeInterpreter

DEFAULT_BUDGET: Final = 100_000
DEFAULT_MAX_RESULT_BYTES: Final = 1024 * 1024
MAX_EXPRESSION_CHARS: Final = 4096

_budget = DEFAULT_BUDGET
_max_result_bytes = DEFAULT_MAX_RESULT_BYTES


def configure(budget: int, max_result_bytes: int) -> None:
    global _budget, _max_result_bytes
    if budget < 1 or max_result_bytes < 1:
        raise ValueError("the expression budget and result size must be above 0")
    _budget, _max_result_bytes = budget, max_result_bytes


def limits() -> tuple[int, int]:
    return _budget, _max_result_bytes


class ExpressionError(Exception):
    """What is wrong with an expression or its evaluation, without any value from the data.
    ``syntax``: the text is not JMESPath at all (as opposed to a check it fails)."""

    def __init__(self, message: str, *, syntax: bool = False) -> None:
        super().__init__(message)
        self.syntax = syntax


class _OverBudget(Exception):
    pass


# --- functions ---------------------------------------------------------------------------

_signature = jp_functions.signature
_PLACEHOLDER = re.compile(r"\{(\d*)\}")
# strftime directives that read only the date and time: no locale-dependent text, no %c/%x.
_DATE_DIRECTIVES = frozenset("YmdHMSjyfzZ%")
_DIRECTIVE = re.compile(r"%(.?)")


def _text(value: Any) -> str:
    # As a template inside a longer string writes it: strings as they are, others compact JSON.
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


class Functions(jp_functions.Functions):  # type: ignore[misc]
    """JMESPath's built-ins plus the transforms workflows keep asking for."""

    def __init__(self, interpreter: _Interpreter | None = None) -> None:
        self._interpreter = interpreter

    def _spend(self, units: int) -> None:
        if self._interpreter is not None:
            self._interpreter.spend(units)

    def call_function(self, function_name: str, resolved_args: list[Any]) -> Any:
        result = super().call_function(function_name, resolved_args)
        if isinstance(result, (list, dict, str)):
            self._spend(len(result))
        return result

    @_signature({"types": []}, {"types": []})  # type: ignore[untyped-decorator]
    def _func_default(self, value: Any, fallback: Any) -> Any:
        """``value`` unless it is null (``||`` also replaces false, "" and empty lists)."""
        return fallback if value is None else value

    @_signature({"types": [], "variadic": True})  # type: ignore[untyped-decorator]
    def _func_concat(self, *values: Any) -> str:
        return "".join(self._bounded_text(v) for v in values)

    @_signature({"types": ["string"]}, {"types": [], "variadic": True})  # type: ignore[untyped-decorator]
    def _func_format(self, template: str, *values: Any) -> str:
        """``format('{}-{}', a, b)`` or ``format('{1}/{0}', a, b)``: placeholders only."""
        auto = iter(range(len(values)))

        def fill(m: re.Match[str]) -> str:
            index = int(m.group(1)) if m.group(1) else next(auto, len(values))
            if index >= len(values):
                raise ExpressionError(f"format(): no value for placeholder {m.group(0)}")
            return self._bounded_text(values[index])

        return _PLACEHOLDER.sub(fill, template)

    @_signature({"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_lower(self, value: str) -> str:
        return value.lower()

    @_signature({"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_upper(self, value: str) -> str:
        return value.upper()

    @_signature({"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_trim(self, value: str) -> str:
        return value.strip()

    @_signature({"types": ["string"]}, {"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_split(self, value: str, separator: str) -> list[str]:
        if not separator:
            raise ExpressionError("split(): the separator is empty")
        return value.split(separator)

    @_signature({"types": ["string"]}, {"types": ["string"]}, {"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_replace(self, value: str, old: str, new: str) -> str:
        if not old:
            raise ExpressionError("replace(): the text to replace is empty")
        if new and value.count(old) * len(new) > _max_result_bytes:
            raise ExpressionError(_too_large())
        return value.replace(old, new)

    @_signature({"types": ["string"]}, {"types": ["array-string"]})  # type: ignore[untyped-decorator]
    def _func_join(self, separator: str, values: list[str]) -> str:
        # Charged before it is built: a list of references to one large string would
        # otherwise be joined into gigabytes first.
        self._spend(sum(len(v) for v in values) + len(separator) * max(len(values) - 1, 0))
        return separator.join(values)

    @_signature({"types": []})  # type: ignore[untyped-decorator]
    def _func_to_string(self, value: Any) -> str:
        return self._bounded_text(value)

    @_signature({"types": ["number", "string"]}, {"types": ["string"]})  # type: ignore[untyped-decorator]
    def _func_format_date(self, when: Any, fmt: str) -> str:
        """UTC. ``when``: epoch milliseconds or ISO 8601 text. ``fmt``: ``iso`` or strftime
        with only %Y %m %d %H %M %S %j %y %f %z %Z %%."""
        moment = _moment(when)
        if fmt == "iso":
            return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for m in _DIRECTIVE.finditer(fmt):
            if m.group(1) not in _DATE_DIRECTIVES:
                raise ExpressionError(
                    f"format_date(): '%{m.group(1)}' is not one of "
                    f"{' '.join('%' + d for d in sorted(_DATE_DIRECTIVES))}"
                )
        if len(fmt) > 200:
            raise ExpressionError("format_date(): the format is longer than 200 characters")
        return moment.strftime(fmt)

    @_signature()  # type: ignore[untyped-decorator]
    def _func_now(self) -> int:
        """Epoch milliseconds, from the run's clock."""
        clock = self._interpreter.now_ms if self._interpreter is not None else None
        return clock() if clock is not None else int(time.time() * 1000)

    def _bounded_text(self, value: Any) -> str:
        if not isinstance(value, str):
            _check_size(value)
        text = _text(value)
        self._spend(len(text))
        return text


def _moment(when: Any) -> _dt.datetime:
    try:
        if isinstance(when, str):
            moment = _dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=_dt.UTC)
            return moment.astimezone(_dt.UTC)
        return _dt.datetime.fromtimestamp(when / 1000, tz=_dt.UTC)
    except (ValueError, OverflowError, OSError):
        raise ExpressionError(
            "format_date(): the time is neither epoch milliseconds nor ISO 8601"
        ) from None


FUNCTION_TABLE: Final[dict[str, Any]] = Functions.FUNCTION_TABLE


# --- evaluation --------------------------------------------------------------------------


class _Interpreter(TreeInterpreter):  # type: ignore[misc]
    """JMESPath's tree walker, charged one unit per node and per element it builds."""

    def __init__(self, budget: int, now_ms: Callable[[], int] | None) -> None:
        super().__init__(Options(custom_functions=Functions(self)))
        self.left = budget
        self.now_ms = now_ms

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _OverBudget

    def visit(self, node: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.spend(1)
        return super().visit(node, *args, **kwargs)

    def visit_flatten(self, node: dict[str, Any], value: Any) -> Any:
        result = super().visit_flatten(node, value)
        if isinstance(result, list):
            self.spend(len(result))
        return result

    def visit_slice(self, node: dict[str, Any], value: Any) -> Any:
        result = super().visit_slice(node, value)
        if isinstance(result, list):
            self.spend(len(result))
        return result


@dataclass(frozen=True, slots=True, eq=False)
class Expression:
    """A compiled expression: its text and JMESPath's tree of it."""

    text: str
    tree: dict[str, Any]

    def evaluate(self, context: Mapping[str, Any], now_ms: Callable[[], int] | None = None) -> Any:
        """The value; raises ``ExpressionError``."""
        interpreter = _Interpreter(_budget, now_ms)
        try:
            result = interpreter.visit(self.tree, context)
        except _OverBudget:
            reason = f"it needs more than RUNNER_EXPRESSION_BUDGET ({_budget}) steps"
        except ExpressionError:
            raise
        except jp_errors.JMESPathTypeError as err:
            # Its own text quotes the value, which may be a secret: name the types only.
            reason = (
                f"{err.function_name}() expects {', '.join(err.expected_types)}, "
                f"not {err.actual_type}"
            )
        except (jp_errors.JMESPathError, TypeError, ArithmeticError):
            reason = "it cannot be evaluated on these values"
        except RecursionError:
            reason = "it nests too deeply"
        else:
            _check_size(result)
            return result
        raise ExpressionError(reason)


def _too_large() -> str:
    return f"its result is larger than RUNNER_EXPRESSION_MAX_RESULT_BYTES ({_max_result_bytes})"


def _check_size(value: Any) -> None:
    """Raise when ``value`` as JSON would exceed the result bound; stops as soon as it does."""
    left = _max_result_bytes
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            left -= len(v) + 2
        elif isinstance(v, dict):
            left -= 2 + len(v)
            for k, item in v.items():
                left -= len(k) + 3
                stack.append(item)
        elif isinstance(v, list):
            left -= 2 + len(v)
            stack.extend(v)
        else:
            left -= 5
        if left < 0:
            raise ExpressionError(_too_large())


# --- compiling ---------------------------------------------------------------------------


def compile_expression(text: str, roots: frozenset[str]) -> Expression:
    """Parse and check; raises ``ExpressionError`` saying what is wrong and where."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = jmespath.compile(text).parsed
    except jp_errors.EmptyExpressionError:
        raise ExpressionError("it is empty", syntax=True) from None
    except jp_errors.IncompleteExpressionError:
        raise ExpressionError("it ends too early", syntax=True) from None
    except jp_errors.LexerError as err:
        raise ExpressionError(
            f"unexpected '{err.lexer_value}' (column {err.lex_position + 1})", syntax=True
        ) from None
    except jp_errors.ParseError as err:
        raise ExpressionError(
            f"unexpected '{err.token_value}' (column {err.lex_position + 1})", syntax=True
        ) from None
    except RecursionError:
        raise ExpressionError("it nests too deeply") from None
    for node in _nodes(tree):
        if node["type"] == "function_expression":
            _check_call(node)
    for node in top_nodes(tree):
        if node["type"] != "field" or node["value"] not in roots:
            shown = node.get("value") if node["type"] == "field" else "@"
            raise ExpressionError(
                f"refers to '{shown}' at its top, which must be one of {', '.join(sorted(roots))}"
            )
    return Expression(text, tree)


def _check_call(node: dict[str, Any]) -> None:
    name = node["value"]
    spec = FUNCTION_TABLE.get(name)
    if spec is None:
        raise ExpressionError(
            f"unknown function {name}() (known: {', '.join(sorted(FUNCTION_TABLE))})"
        )
    signature = spec["signature"]
    given = len(node["children"])
    if signature and signature[-1].get("variadic"):
        if given < len(signature):
            raise ExpressionError(
                f"{name}() takes at least {len(signature)} arguments, not {given}"
            )
    elif given != len(signature):
        raise ExpressionError(f"{name}() takes {len(signature)} arguments, not {given}")


def _nodes(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(c for c in node.get("children", ()) if isinstance(c, dict))


_AGAINST_LEFT: Final = frozenset(
    {
        "subexpression",
        "index_expression",
        "pipe",
        "projection",
        "filter_projection",
        "value_projection",
        "flatten",
    }
)
_AGAINST_CURRENT: Final = frozenset(
    {
        "function_expression",
        "multi_select_list",
        "comparator",
        "or_expression",
        "and_expression",
        "not_expression",
    }
)


def top_nodes(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The nodes evaluated against the run's context itself (not against a value they select):
    each must be a root name."""
    stack = [tree]
    while stack:
        node = stack.pop()
        kind, children = node["type"], node.get("children", [])
        if kind in _AGAINST_LEFT:
            stack.append(children[0])
        elif kind in _AGAINST_CURRENT:
            stack.extend(children)
        elif kind == "multi_select_dict":
            stack.extend(pair["children"][0] for pair in children)
        elif kind in ("literal", "expref"):
            continue
        else:
            yield node


def leading_path(node: dict[str, Any]) -> tuple[str | int, ...]:
    """The names (and indexes) a top node's chain starts with: ``steps.a.output.body.x[0]``
    gives ("steps", "a", "output", "body", "x", 0); used to check references like paths."""
    out: list[str | int] = []
    stack = [node]
    while stack:
        n = stack.pop(0)
        kind = n["type"]
        if kind == "field":
            out.append(n["value"])
        elif kind == "index" and isinstance(n.get("value"), int) and n["value"] >= 0:
            out.append(n["value"])
            return tuple(out)
        elif kind in ("subexpression", "index_expression"):
            stack = list(n["children"]) + stack
            continue
        else:
            return tuple(out)
    return tuple(out)


def root_chains(tree: dict[str, Any]) -> Iterator[tuple[str | int, ...]]:
    """For ``validate``: the leading path of each chain that starts at the context, so that
    ``steps.a.output`` inside an expression is checked as the path would be."""
    stack = [tree]
    while stack:
        node = stack.pop()
        kind, children = node["type"], node.get("children", [])
        if kind in ("subexpression", "index_expression"):
            yield leading_path(node)
        elif kind == "field":
            yield (node["value"],)
        elif kind in _AGAINST_LEFT:
            stack.append(children[0])
        elif kind in _AGAINST_CURRENT:
            stack.extend(children)
        elif kind == "multi_select_dict":
            stack.extend(pair["children"][0] for pair in children)
