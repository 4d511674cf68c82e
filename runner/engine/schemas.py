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


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compile_canonical(canonical: str) -> Validator:
    # Keyed by text so that equal schemas share one entry; decoded again because
    # fastjsonschema wants the object.
    schema = msgspec.json.decode(canonical)
    validator: Validator = fastjsonschema.compile(schema, handlers=_HANDLERS, use_default=False)
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
    except re.error as err:
        detail = f"invalid pattern: {err}"
    except RecursionError:
        detail = "nested too deeply"
    except Exception as err:  # fastjsonschema raises assorted errors on malformed schemas
        detail = str(err) or type(err).__name__
    raise DefinitionError(f"{where}: does not compile: {_clean(detail)}")


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
