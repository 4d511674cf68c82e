"""JSON Schema validation of a run's input, each step's request and its response.

A WorkflowVersion's schemas (``parameterSchema``; each Action's ``pathSchema``, ``querySchema``,
``bodySchema``, ``outputSchema``) are compiled with fastjsonschema once per plan into
``PlanSchemas``. fastjsonschema compiles a schema to Python source and ``exec``s it, which is
slow next to validating, so compiled validators are also kept in an LRU keyed by the schema's
canonical JSON: identical schemas across versions and actions compile once per process.

Policy:
- ``use_default=False``: validating never writes defaults into the data it checks.
- A ``$ref`` that leaves the schema (``http:``, ``file:``, a relative URI) is refused when the
  schema compiles; fastjsonschema would otherwise fetch it with urllib, past the egress policy.
- Unknown ``format`` names are ignored (as JSON Schema says); known ones are asserted.
- Every regex runs on RE2 (``google-re2``), in time linear in the text: ``pattern``,
  ``patternProperties`` and the ``format`` checks. fastjsonschema compiles them with Python's
  backtracking ``re``, where ``^(a+)+$`` against ``"a" * 30 + "!"`` took 26 s and froze every
  run of the process. fastjsonschema is kept (its generated validators are fast, and its
  messages name the location); after it compiles a schema, each pattern in the validator's
  ``REGEX_PATTERNS`` is swapped for its RE2 compilation, and the formats are passed as RE2
  checks. A pattern RE2 cannot run (backreferences, lookaround) is refused when the schema
  compiles, ``DefinitionError`` naming the pattern's JSON path. RE2's ``$`` is the end of the
  text, as ECMA-262's is (fastjsonschema rewrites ``$`` to Python's ``\\Z`` for the same
  reason); a pattern must also be one Python's ``re`` parses, since fastjsonschema reads it.

Errors name the location, never the value (it could be a secret). fastjsonschema's messages
quote only the schema (``must be one of ['a']``) and, for ``additionalProperties``, the
offending key names, never the value; its exception's ``value`` is dropped here:

- ``check_input``: ``SchemaError(INVALID_INPUT)`` ``$.input.customerId: must be string``
- ``check_request``: ``SchemaError(SCHEMA_VALIDATION)`` ``create_ticket: body.priority must be
  integer``
- ``check_output``: ``SchemaError(SCHEMA_VALIDATION)`` ``get_ticket: response body.id must be
  string``
- ``compile_schemas`` / ``compile_schema``: ``DefinitionError`` ``$.actions.act_x.bodySchema:
  does not compile: ...``
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import fastjsonschema
import msgspec
import re2
from fastjsonschema import JsonSchemaDefinitionException, JsonSchemaValueException

from runner.contract import Action, WorkflowVersion
from runner.errors import DefinitionError, ErrorCode, SchemaError

Validator: TypeAlias = Callable[[Any], Any]

CACHE_SIZE = 512
_MAX_MESSAGE = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_encode_sorted = functools.partial(msgspec.json.encode, order="sorted")

# The Action fields that hold schemas, with their wire names for error locations.
ACTION_SCHEMA_FIELDS: tuple[tuple[str, str], ...] = (
    ("path_schema", "pathSchema"),
    ("query_schema", "querySchema"),
    ("body_schema", "bodySchema"),
    ("output_schema", "outputSchema"),
)


@dataclass(frozen=True, slots=True)
class StepSchemas:
    path: Validator | None = None
    query: Validator | None = None
    body: Validator | None = None
    output: Validator | None = None


@dataclass(frozen=True, slots=True)
class PlanSchemas:
    """Compiled once per plan. ``per_step`` maps a step key to its Action's validators; steps
    of the same Action share one ``StepSchemas``."""

    input: Validator | None
    per_step: dict[str, StepSchemas]


# --- compiling ----------------------------------------------------------------------------------


def _refuse_remote(uri: str) -> Any:
    raise JsonSchemaDefinitionException(
        f"$ref '{uri[:100]}' leaves the schema; only local refs (#/...) are allowed"
    )


class _NoRemoteRefs(Mapping[str, Callable[[str], Any]]):
    """A handler for every URI scheme, so fastjsonschema never falls back to urllib."""

    def __getitem__(self, scheme: str) -> Callable[[str], Any]:
        return _refuse_remote

    def __contains__(self, scheme: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


_HANDLERS = _NoRemoteRefs()

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # an unsupported pattern is reported to the author, not stderr
_RE2_OPTIONS.max_mem = 8 << 20  # a pattern whose program needs more is refused, not built


class PatternRefused(Exception):
    """A ``pattern`` or ``patternProperties`` key that RE2 cannot run."""

    def __init__(self, pattern: str, reason: str) -> None:
        super().__init__(reason)
        self.pattern = pattern
        self.reason = reason


def _re2(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as err:
        reason = err.args[0] if err.args else str(err)
        text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        raise PatternRefused(pattern, text) from None


def _format_checks() -> dict[str, Callable[[str], bool]]:
    """fastjsonschema's own format regexes, run by RE2. Two of them use lookaround, which RE2
    lacks; they are rewritten without it (same language)."""
    from fastjsonschema.draft07 import CodeGeneratorDraft07

    checks: dict[str, Callable[[str], bool]] = {}
    for name, regex in CodeGeneratorDraft07.FORMAT_REGEXS.items():
        if name in ("email", "idn-hostname"):
            continue
        compiled = re2.compile(regex.replace("\\Z", "\\z"), _RE2_OPTIONS)
        checks[name] = functools.partial(_matches, compiled)
    email = re2.compile(r"^[^@.][^@]*@[^@]+\.[^@]+\z", _RE2_OPTIONS)

    def is_email(value: str) -> bool:
        if email.match(value) is None:
            return False
        local = value.split("@", 1)[0]
        return ".." not in local and not local.endswith(".")

    label = r"(?:[a-zA-Z0-9][a-zA-Z0-9\-]{0,49}|[a-zA-Z0-9][a-zA-Z0-9-]{0,29}\.[a-zA-Z]{2,})"
    idn_hostname = re2.compile(
        r"^(xn--)?[a-zA-Z0-9][a-zA-Z0-9-_]{0,61}[a-zA-Z0-9]{0,1}\."
        rf"(?:{label}|xn--(?:[a-zA-Z0-9\-]{{1,50}}|[a-zA-Z0-9-]{{1,30}}\.[a-zA-Z]{{2,}}))$",
        _RE2_OPTIONS,
    )
    checks["email"] = is_email
    checks["idn-hostname"] = functools.partial(_matches, idn_hostname)
    checks["regex"] = _is_re2_regex
    return checks


def _matches(compiled: Any, value: str) -> bool:
    return compiled.match(value) is not None


def _is_re2_regex(value: str) -> bool:
    try:
        _re2(value)
    except PatternRefused:
        return False
    return True


_FORMATS = _format_checks()


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compile_canonical(canonical: str) -> Validator:
    # Keyed by text so that equal schemas share one entry; decoded again because
    # fastjsonschema wants the object.
    schema = msgspec.json.decode(canonical)
    validator: Validator = fastjsonschema.compile(
        schema, handlers=_HANDLERS, formats=_FORMATS, use_default=False
    )
    # The generated code looks its regexes up in this module-level dict at each call, by the
    # pattern as written in the schema (``REGEX_PATTERNS[pattern].search(value)``).
    function = getattr(validator, "func", validator)  # formats make it a functools.partial
    patterns: dict[str, Any] = function.__globals__["REGEX_PATTERNS"]
    for pattern in list(patterns):
        patterns[pattern] = _re2(pattern)
    return validator


def compile_cache_info() -> Any:
    """``functools`` cache statistics: ``misses`` counts compilations (failed ones included)."""
    return _compile_canonical.cache_info()


def clear_compile_cache() -> None:
    _compile_canonical.cache_clear()


def compile_schema(schema: Any, where: str) -> Validator:
    """One schema, through the LRU. Raises ``DefinitionError`` naming ``where``."""
    if not isinstance(schema, dict):
        raise DefinitionError(f"{where}: does not compile: a schema must be an object")
    try:
        canonical = _encode_sorted(schema).decode()
        return _compile_canonical(canonical)
    except PatternRefused as err:
        at = _pattern_location(schema, err.pattern)
        raise DefinitionError(
            f"{where}{at}: pattern {_clean(repr(err.pattern))} cannot run in linear time "
            f"(RE2: {_clean(err.reason)}); backreferences and lookaround are not supported"
        ) from None
    except re.error as err:
        detail = f"invalid pattern: {err}"
    except RecursionError:
        detail = "nested too deeply"
    except Exception as err:  # fastjsonschema raises assorted errors on malformed schemas
        detail = str(err) or type(err).__name__
    raise DefinitionError(f"{where}: does not compile: {_clean(detail)}")


def _pattern_location(schema: Any, pattern: str) -> str:
    """Where ``pattern`` is written in ``schema``, as a path suffix (``.properties.x.pattern``);
    empty when not found. Breadth first, so the shallowest use is named."""
    queue: list[tuple[Any, str]] = [(schema, "")]
    while queue:
        node, at = queue.pop(0)
        if isinstance(node, dict):
            if node.get("pattern") == pattern:
                return f"{at}.pattern"
            props = node.get("patternProperties")
            if isinstance(props, dict) and pattern in props:
                return f"{at}.patternProperties"
            queue.extend((v, f"{at}.{k}") for k, v in node.items())
        elif isinstance(node, list):
            queue.extend((v, f"{at}[{i}]") for i, v in enumerate(node))
    return ""


def compile_schemas(version: WorkflowVersion) -> PlanSchemas:
    """Every schema of the version: ``parameterSchema`` and each Action's, each Action once
    however many steps use it. Raises ``DefinitionError`` on the first that does not compile."""
    input_validator = (
        compile_schema(version.parameter_schema, "$.parameterSchema")
        if version.parameter_schema is not None
        else None
    )
    by_action = {aid: _action_schemas(action) for aid, action in version.actions.items()}
    per_step: dict[str, StepSchemas] = {}
    for i, step in enumerate(version.graph.steps):
        schemas = by_action.get(step.action_id)
        if schemas is None:
            raise DefinitionError(f"$.graph.steps[{i}].actionId: unknown action '{step.action_id}'")
        per_step[step.key] = schemas
    return PlanSchemas(input=input_validator, per_step=per_step)


def _action_schemas(action: Action) -> StepSchemas:
    compiled: dict[str, Validator | None] = {}
    for attr, wire in ACTION_SCHEMA_FIELDS:
        schema = getattr(action, attr)
        where = f"$.actions.{action.id}.{wire}"
        compiled[attr.removesuffix("_schema")] = (
            compile_schema(schema, where) if schema is not None else None
        )
    return StepSchemas(**compiled)


# --- checking -----------------------------------------------------------------------------------


def check_input(schemas: PlanSchemas, value: Any) -> None:
    """The run's ``input`` against ``parameterSchema``, before any step runs."""
    if schemas.input is None:
        return
    try:
        schemas.input(value)
    except JsonSchemaValueException as err:
        where, text = _explain(err, "$.input")
        raise SchemaError(f"{where}: {text}", code=ErrorCode.INVALID_INPUT) from None


def check_request(schemas: PlanSchemas, step_key: str, path: Any, query: Any, body: Any) -> None:
    """A step's rendered path, query and body, before the request is sent."""
    step = schemas.per_step.get(step_key)
    if step is None:
        return
    for part, validator, value in (
        ("path", step.path, path),
        ("query", step.query, query),
        ("body", step.body, body),
    ):
        if validator is None:
            continue
        try:
            validator(value)
        except JsonSchemaValueException as err:
            where, text = _explain(err, part)
            raise SchemaError(f"{step_key}: {where} {text}") from None


def check_output(schemas: PlanSchemas, step_key: str, body: Any) -> None:
    """A response body against the Action's ``outputSchema``, when it has one."""
    step = schemas.per_step.get(step_key)
    if step is None or step.output is None:
        return
    try:
        step.output(body)
    except JsonSchemaValueException as err:
        where, text = _explain(err, "body")
        raise SchemaError(f"{step_key}: response {where} {text}") from None


def _explain(err: JsonSchemaValueException, root: str) -> tuple[str, str]:
    """fastjsonschema says ``data.a[1] must be integer``; we say (``root.a[1]``, ``must be
    integer``). Only ``message`` and ``name`` are read: ``value`` may be a secret."""
    name = err.name or "data"
    where = root + name[len("data") :] if name.startswith("data") else root
    message = err.message or ""
    if message.startswith(name):
        text = message[len(name) :].lstrip()
    else:
        text = message.replace(name, where)
    return _clean(where), _clean(text or "is invalid")


def _clean(text: str) -> str:
    # Key names come from the data: keep them on one line and short.
    text = _CONTROL.sub("?", text)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
