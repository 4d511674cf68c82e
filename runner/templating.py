"""Templates (``{{ input.x }}``) and JSONPath extraction: compiled once, rendered per run.

Rules (CONTRACT §5):
- A string that is exactly one ``{{ expr }}`` takes the referenced value with its JSON type.
- A template inside a longer string is text: strings as they are, other values as compact JSON
  (``true``, ``null``, ``{"a":1}``).
- ``\\{{`` writes a literal ``{{``.
- An expression made only of names, dots and indexes is a path: a root (``input``, ``steps``,
  ``env``, ``secrets``, ``run``; ``item`` and ``index`` in a ``forEach`` step), then ``.name``
  or ``[index]`` segments. A reference to a missing value is a ``TemplateError`` that names
  the template's location and the first missing segment.
- Any other expression is JMESPath (``runner.expressions``): filters, pipes, functions, ``||``
  for defaults. It is lenient as JMESPath is (a missing name is null), it can reach only the
  run's context, and its evaluation is bounded.

JSONPath is the subset a mapping needs: ``$``, ``.name``, ``['name']``, ``[n]``, ``[*]``, ``.*``.
A path with a wildcard yields a list; one without yields the value, or nothing when missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import msgspec

from runner.errors import DefinitionError, TemplateError
from runner.expressions import Expression, ExpressionError, compile_expression

ROOTS: Final = frozenset({"input", "steps", "env", "secrets", "run"})
ITEM_ROOTS: Final = ROOTS | {"item", "index"}
"""The roots inside a ``forEach`` step: the item and its position."""

# A path as section 5 has it, plus what it refuses (a negative index, a quoted name) so that
# those keep their path error instead of becoming lenient JMESPath.
_PATH_SHAPED = re.compile(
    r"[A-Za-z_][A-Za-z0-9_\-]*"
    r"(?:\.[A-Za-z0-9_\-]+|\[-?\d+\]|\['[^'\]]*'\]|\[\"[^\"\]]*\"\])*"
)
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]|\.(\d+)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_MISSING: Final = object()
_json_encode = msgspec.json.Encoder().encode

Segment: TypeAlias = str | int


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference such as ``steps.fetch.output.body.id``."""

    text: str
    root: str
    path: tuple[Segment, ...]

    def resolve(self, context: Mapping[str, Any]) -> Any:
        """The value, or raises ``LookupError`` naming how far it got."""
        value: Any = context.get(self.root, _MISSING)
        walked = self.root
        if value is _MISSING:
            raise LookupError(f"'{walked}' is not available")
        for seg in self.path:
            if isinstance(seg, int):
                if not isinstance(value, list) or not -len(value) <= seg < len(value):
                    raise LookupError(f"'{walked}' has no index [{seg}]")
                value = value[seg]
                walked += f"[{seg}]"
            else:
                if not isinstance(value, dict) or seg not in value:
                    raise LookupError(f"'{walked}' has no '{seg}'")
                value = value[seg]
                walked += f".{seg}"
        return value


def parse_ref(expr: str, where: str, roots: frozenset[str] = ROOTS) -> Ref:
    root_match = _IDENT.match(expr)
    if not root_match or root_match.group(0) not in roots:
        raise DefinitionError(
            f"{where}: '{{{{ {expr} }}}}' must start with one of {', '.join(sorted(roots))}"
        )
    path: list[Segment] = []
    pos = root_match.end()
    while pos < len(expr):
        m = _SEGMENT.match(expr, pos)
        if not m:
            raise DefinitionError(f"{where}: cannot parse '{{{{ {expr} }}}}' at '{expr[pos:]}'")
        name, index, dotted_index = m.groups()
        path.append(name if name is not None else int(index or dotted_index))
        pos = m.end()
    return Ref(expr, root_match.group(0), tuple(path))


# --- compiled values --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Const:
    value: Any


@dataclass(frozen=True, slots=True)
class Whole:
    ref: Ref
    where: str


@dataclass(frozen=True, slots=True)
class Eval:
    """A string that is exactly one JMESPath expression: its value with its JSON type."""

    expr: Expression
    where: str


@dataclass(frozen=True, slots=True)
class Text:
    parts: tuple[str | Ref | Expression, ...]
    where: str


@dataclass(frozen=True, slots=True)
class Obj:
    items: tuple[tuple[str, Compiled], ...]


@dataclass(frozen=True, slots=True)
class Arr:
    items: tuple[Compiled, ...]


Compiled: TypeAlias = Const | Whole | Eval | Text | Obj | Arr


def compile_value(value: Any, where: str = "$", roots: frozenset[str] = ROOTS) -> Compiled:
    """Compile a JSON value whose strings may hold templates. Constant subtrees stay ``Const``
    so that rendering them costs nothing."""
    if isinstance(value, str):
        return _compile_string(value, where, roots)
    if isinstance(value, dict):
        items = tuple((k, compile_value(v, f"{where}.{k}", roots)) for k, v in value.items())
        if all(isinstance(c, Const) for _, c in items):
            # Fold the children's values, not the source: escapes (\{{) are already undone.
            return Const({k: c.value for k, c in items if isinstance(c, Const)})
        return Obj(items)
    if isinstance(value, list):
        arr = tuple(compile_value(v, f"{where}[{i}]", roots) for i, v in enumerate(value))
        if all(isinstance(c, Const) for c in arr):
            return Const([c.value for c in arr if isinstance(c, Const)])
        return Arr(arr)
    return Const(value)


def _compile_string(text: str, where: str, roots: frozenset[str]) -> Compiled:
    if "{{" not in text:
        return Const(text)
    matches = _template_spans(text)
    if not matches:
        return Const(_unescape(text))
    if len(matches) == 1 and matches[0][:2] == (0, len(text)):
        ref = compile_reference(matches[0][2], where, roots)
        return Whole(ref, where) if isinstance(ref, Ref) else Eval(ref, where)
    parts: list[str | Ref | Expression] = []
    pos = 0
    for start, end, expr in matches:
        if start > pos:
            parts.append(_unescape(text[pos:start]))
        parts.append(compile_reference(expr, where, roots))
        pos = end
    if pos < len(text):
        parts.append(_unescape(text[pos:]))
    return Text(tuple(parts), where)


def compile_reference(expr: str, where: str, roots: frozenset[str] = ROOTS) -> Ref | Expression:
    """What is between the braces: a path (strict) when it is shaped like one, else JMESPath."""
    if not expr or _PATH_SHAPED.fullmatch(expr):
        return parse_ref(expr, where, roots)
    try:
        return compile_expression(expr, roots)
    except ExpressionError as err:
        reason, syntax = str(err), err.syntax
    # Not JMESPath either: when it starts as a path, say where the path grammar stopped.
    try:
        parse_ref(expr, where, roots)
    except DefinitionError as path_err:
        at = path_err.message.rfind(" at '")
        if at >= 0 and "cannot parse" in path_err.message:
            if syntax:
                raise
            reason += path_err.message[at:]
    raise DefinitionError(f"{where}: cannot parse '{{{{ {expr} }}}}': {reason}")


def compile_for_each(text: str, where: str) -> Compiled:
    """A ``forEach``: one whole template (``{{ input.ids }}``) or a bare expression
    (``input.ids``). It sees the run's roots, not ``item``: it makes the items."""
    if "{{" in text:
        compiled = _compile_string(text, where, ROOTS)
        if not isinstance(compiled, (Whole, Eval)):
            raise DefinitionError(f"{where}: must be one expression, '{{{{ ... }}}}' or bare")
        return compiled
    ref = compile_reference(text.strip(), where, ROOTS)
    return Whole(ref, where) if isinstance(ref, Ref) else Eval(ref, where)


def _template_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, expression)`` of each ``{{ ... }}`` not escaped as ``\\{{``, in one pass.

    A template runs from ``{{`` to the next ``}}``; once no ``}}`` follows, nothing after can
    close. The regex this replaces (a lazy ``.*?`` looking for ``}}``) rescanned the rest of
    the text from every unclosed ``{{``: 20,000 of them took 8 s, a definition-sized string
    of unclosed expressions nearly a minute, on the event loop."""
    spans: list[tuple[int, int, str]] = []
    pos = 0
    while True:
        start = text.find("{{", pos)
        if start < 0:
            return spans
        if start > 0 and text[start - 1] == "\\":
            pos = start + 1
            continue
        close = text.find("}}", start + 2)
        if close < 0:
            return spans
        spans.append((start, close + 2, text[start + 2 : close].strip()))
        pos = close + 2


def _unescape(text: str) -> str:
    return text.replace("\\{{", "{{")


def render(
    compiled: Compiled, context: Mapping[str, Any], now_ms: Callable[[], int] | None = None
) -> Any:
    """Render against ``context`` (the run's roots); ``now_ms`` is the clock ``now()`` reads.
    Raises ``TemplateError``."""
    if isinstance(compiled, Const):
        return compiled.value
    if isinstance(compiled, Whole):
        return _resolve(compiled.ref, context, compiled.where)
    if isinstance(compiled, Eval):
        return _evaluate(compiled.expr, context, compiled.where, now_ms)
    if isinstance(compiled, Text):
        out: list[str] = []
        for part in compiled.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Ref):
                out.append(_as_text(_resolve(part, context, compiled.where)))
            else:
                out.append(_as_text(_evaluate(part, context, compiled.where, now_ms)))
        return "".join(out)
    if isinstance(compiled, Obj):
        return {k: render(v, context, now_ms) for k, v in compiled.items}
    return [render(v, context, now_ms) for v in compiled.items]


def _resolve(ref: Ref, context: Mapping[str, Any], where: str) -> Any:
    try:
        return ref.resolve(context)
    except LookupError as err:
        missing = err.args[0]
    # Raised outside the handler, so it has no context to hide.
    raise TemplateError(f"{where}: '{{{{ {ref.text} }}}}' has no value: {missing}")


def _evaluate(
    expr: Expression, context: Mapping[str, Any], where: str, now_ms: Callable[[], int] | None
) -> Any:
    try:
        return expr.evaluate(context, now_ms)
    except ExpressionError as err:
        reason = str(err)
    raise TemplateError(f"{where}: '{{{{ {expr.text} }}}}' cannot be evaluated: {reason}")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return _json_encode(value).decode()


def refs_of(compiled: Compiled) -> list[tuple[Ref, str]]:
    """Every reference in a compiled value with its location (for ``validate``)."""
    if isinstance(compiled, Whole):
        return [(compiled.ref, compiled.where)]
    if isinstance(compiled, Text):
        return [(p, compiled.where) for p in compiled.parts if isinstance(p, Ref)]
    if isinstance(compiled, Obj):
        return [r for _, c in compiled.items for r in refs_of(c)]
    if isinstance(compiled, Arr):
        return [r for c in compiled.items for r in refs_of(c)]
    return []


def exprs_of(compiled: Compiled) -> list[tuple[Expression, str]]:
    """Every JMESPath expression in a compiled value with its location (for ``validate``)."""
    if isinstance(compiled, Eval):
        return [(compiled.expr, compiled.where)]
    if isinstance(compiled, Text):
        return [(p, compiled.where) for p in compiled.parts if isinstance(p, Expression)]
    if isinstance(compiled, Obj):
        return [e for _, c in compiled.items for e in exprs_of(c)]
    if isinstance(compiled, Arr):
        return [e for c in compiled.items for e in exprs_of(c)]
    return []


def truthy(value: Any) -> bool:
    """How a ``when`` value decides: JSON falsiness (false, null, 0, "", [], {}), and the
    strings "false" and "0", which is what a templated text renders a false value to."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0")
    return bool(value)


# --- JSONPath ---------------------------------------------------------------------------------

_JP_SEGMENT = re.compile(
    r"\.(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)"
    r"|\.(?P<star>\*)"
    r"|\[(?P<index>-?\d+)\]"
    r"|\[\*\]"
    r"|\['(?P<sq>[^']*)'\]"
    r'|\["(?P<dq>[^"]*)"\]'
)

_WILDCARD: Final = object()


@dataclass(frozen=True, slots=True)
class JsonPath:
    text: str
    segments: tuple[Any, ...]

    @property
    def has_wildcard(self) -> bool:
        return any(seg is _WILDCARD for seg in self.segments)

    def find(self, doc: Any) -> Any:
        """The value; a list for wildcard paths; ``None`` when the path does not exist."""
        values = self._matches(doc)
        if self.has_wildcard:
            return values
        return values[0] if values else None

    def exists(self, doc: Any) -> bool:
        """Wildcard paths always exist (maybe empty); others when they match, null included."""
        return self.has_wildcard or bool(self._matches(doc))

    def _matches(self, doc: Any) -> list[Any]:
        values = [doc]
        for seg in self.segments:
            nxt: list[Any] = []
            for v in values:
                if seg is _WILDCARD:
                    if isinstance(v, dict):
                        nxt.extend(v.values())
                    elif isinstance(v, list):
                        nxt.extend(v)
                elif isinstance(seg, int):
                    if isinstance(v, list) and -len(v) <= seg < len(v):
                        nxt.append(v[seg])
                elif isinstance(v, dict) and seg in v:
                    nxt.append(v[seg])
            values = nxt
        return values


def compile_jsonpath(text: str, where: str) -> JsonPath:
    if not text.startswith("$"):
        raise DefinitionError(f"{where}: JSONPath '{text}' must start with '$'")
    segments: list[Any] = []
    pos = 1
    while pos < len(text):
        m = _JP_SEGMENT.match(text, pos)
        if not m:
            raise DefinitionError(f"{where}: cannot parse JSONPath '{text}' at '{text[pos:]}'")
        if m.group("name") is not None:
            segments.append(m.group("name"))
        elif m.group("index") is not None:
            segments.append(int(m.group("index")))
        elif m.group("sq") is not None:
            segments.append(m.group("sq"))
        elif m.group("dq") is not None:
            segments.append(m.group("dq"))
        else:
            segments.append(_WILDCARD)
        pos = m.end()
    return JsonPath(text, tuple(segments))
