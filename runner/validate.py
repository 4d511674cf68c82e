"""``python -m runner validate FILE`` (``-`` for stdin): check a WorkflowVersion without running it.

A control plane can run it when a workflow is published. It prints every problem it finds, one
per line with its JSON location, and exits 1; or prints ``ok: N steps`` and exits 0. Exit 2 is a
usage error (no file, or a file that cannot be read).

The rules are compiling's own: ``plan_or_problems`` (``runner.engine.plan``) goes on past
each problem and collects them all, so a rule lives in one place, and a run fails with the first
problem of the same list. This module adds what only a linter can say:

1. The text is JSON and decodes as a WorkflowVersion. When it does not, each step, action and
   connection is decoded on its own so that every broken one is named.
2. Everything ``compile_plan`` checks: step keys, actions and connections known, ``dependsOn``,
   cycles, ``timeoutMs``, every template and JSONPath, every schema, and ``paginate`` (the
   step's over its Action's, complete and sound for its mode: ``runner.engine.pagination``).
3. Lint: each template reference can exist at that step:
   - ``input.<field>``: a top-level field that ``parameterSchema.properties`` (or ``required``)
     declares. Lenient on purpose when the schema cannot say which fields exist: no
     ``parameterSchema``, no ``properties``, ``patternProperties``, or ``additionalProperties``
     set to ``true`` or a schema (absent ``additionalProperties`` is read as "the properties
     are the fields": a typo is likelier than an undeclared field).
   - ``steps.<key>.output...`` or ``steps.<key>.status`` of an upstream step, i.e. a transitive
     dependency, since only those are sure to have finished.
   - ``env.<NAME>`` declared in ``envConfig.vars``; ``secrets.<NAME>`` in ``envConfig.secretRefs``.
   - ``run.id`` or ``run.tenantId``.
   In a JMESPath expression, the head of each chain is checked so (compiling checks its
   functions, arity and roots, and ``forEach``).
4. Lint: each Action's path parameters: every ``{param}`` of ``endpointTemplate`` is given by
   each step's ``input.path`` and no other key is; a ``pathSchema``'s ``required`` names exactly
   the parameters. The endpoint fits the step's connection (relative to a ``baseUrl``, else
   absolute).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from runner import jsonlimits
from runner.contract import (
    Action,
    Connection,
    Step,
    WorkflowVersion,
    decode_workflow_version,
    path_of,
)
from runner.engine.plan import Problems, plan_or_problems, string_leaves
from runner.errors import DefinitionError
from runner.expressions import root_chains
from runner.http.request import base_url_for, path_params
from runner.templating import (
    ITEM_ROOTS,
    ROOTS,
    Compiled,
    Ref,
    compile_for_each,
    compile_value,
    exprs_of,
    refs_of,
)

USAGE = "usage: python -m runner validate FILE    (FILE '-' reads standard input)"


@dataclass(frozen=True, slots=True)
class Report:
    problems: tuple[str, ...]
    steps: int

    @property
    def ok(self) -> bool:
        return not self.problems


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    source = argv[0]
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as err:
        print(f"validate: cannot read {source}: {err.strerror or err}", file=sys.stderr)
        return 2
    report = validate_source(raw)
    for problem in report.problems:
        print(problem)
    if not report.ok:
        return 1
    print(f"ok: {report.steps} step{'' if report.steps == 1 else 's'}")
    return 0


def validate_source(raw: bytes | str) -> Report:
    """Every problem of a WorkflowVersion given as JSON text."""
    try:
        jsonlimits.check_text(raw)
        doc = msgspec.json.decode(raw)
    except jsonlimits.JsonLimitError as err:
        return Report((f"$: {err}",), 0)
    except RecursionError:
        return Report((f"$: {jsonlimits.too_deep_message()}",), 0)
    except msgspec.DecodeError as err:
        return Report((f"$: not valid JSON ({err})",), 0)
    try:
        version = decode_workflow_version(doc)
    except DefinitionError as err:
        return Report(tuple(_decode_problems(doc) or [err.message]), 0)
    return Report(tuple(check_version(version)), len(version.graph.steps))


def check_version(version: WorkflowVersion) -> list[str]:
    """Every problem of a decoded WorkflowVersion (empty when it would compile and run)."""
    problems = Problems()
    plan_or_problems(version, problems)
    linter = _Linter(version, problems)
    linter.run()
    return list(problems.messages)


# --- decoding ----------------------------------------------------------------------------------


def _decode_problems(doc: Any) -> list[str]:
    """msgspec reports one error per document; decode the parts one by one to name them all."""
    if not isinstance(doc, dict):
        return []
    problems: list[str] = []
    rest = dict(doc)
    parts: list[tuple[str, Any, type[msgspec.Struct]]] = []
    graph = doc.get("graph")
    if isinstance(graph, dict) and isinstance(graph.get("steps"), list):
        parts += [(f"$.graph.steps[{i}]", s, Step) for i, s in enumerate(graph["steps"])]
        rest["graph"] = {**graph, "steps": []}
    mappings: tuple[tuple[str, type[msgspec.Struct]], ...] = (
        ("actions", Action),
        ("connections", Connection),
    )
    for name, struct in mappings:
        entries = doc.get(name)
        if isinstance(entries, dict):
            parts += [(f"$.{name}.{key}", value, struct) for key, value in entries.items()]
            rest[name] = {}
    top: tuple[str, Any, type[msgspec.Struct]] = ("$", rest, WorkflowVersion)
    for where, value, struct in [top, *parts]:
        try:
            msgspec.convert(value, struct)
        except msgspec.ValidationError as err:
            problems.append(where + path_of(err)[1:])
    return problems


# --- the checks --------------------------------------------------------------------------------


class _Linter:
    def __init__(self, version: WorkflowVersion, problems: Problems) -> None:
        self.version = version
        self.problems = problems
        self.steps = {s.key for s in version.graph.steps}
        self.input_fields = _declared_input_fields(version.parameter_schema)

    def add(self, problem: str) -> None:
        self.problems.add(problem)

    def run(self) -> None:
        upstream = _upstream(_declared_deps(self.version))
        for i, step in enumerate(self.version.graph.steps):
            self._templates(i, step, upstream.get(step.key, set()))
            self._endpoint(i, step)
        self._actions()

    def _templates(self, i: int, step: Step, upstream: set[str]) -> None:
        where = f"$.graph.steps[{i}]"
        fields: list[tuple[Any, str]] = [
            (step.input.path, f"{where}.input.path"),
            (step.input.query, f"{where}.input.query"),
            (step.input.headers, f"{where}.input.headers"),
            (step.input.body, f"{where}.input.body"),
        ]
        if step.when is not None:
            fields.insert(0, (step.when, f"{where}.when"))
        action = self.version.actions.get(step.action_id)
        if action is not None:
            fields.append((action.headers_template, f"$.actions.{action.id}.headersTemplate"))
        item_roots = ITEM_ROOTS if step.for_each is not None else ROOTS
        for value, at in fields:
            roots = ROOTS if at.endswith(".when") else item_roots
            for text, leaf in string_leaves(value, at):
                try:
                    compiled = compile_value(text, leaf, roots)
                except DefinitionError:
                    continue  # compiling reported it
                self._references(compiled, step.key, upstream)
        if step.for_each is not None:
            try:
                compiled = compile_for_each(step.for_each, f"{where}.forEach")
            except DefinitionError:
                return  # compiling reported it
            self._references(compiled, step.key, upstream)

    def _references(self, compiled: Compiled, step_key: str, upstream: set[str]) -> None:
        """Each reference, a path's or the head of an expression's chain, can exist here."""
        found = [(ref, at) for ref, at in refs_of(compiled)]
        for expr, at in exprs_of(compiled):
            for chain in root_chains(expr.tree):
                if chain and isinstance(chain[0], str):
                    found.append((Ref(expr.text, chain[0], chain[1:]), at))
        for ref, ref_where in found:
            problem = self._ref_problem(ref, ref_where, step_key, upstream)
            if problem:
                self.add(f"{ref_where}: '{{{{ {ref.text} }}}}' {problem}")

    def _ref_problem(self, ref: Ref, where: str, step_key: str, upstream: set[str]) -> str | None:
        path = ref.path
        first = path[0] if path else None
        env = self.version.env_config
        if ref.root == "input":
            if first is None:
                return None
            if isinstance(first, int):
                return "indexes input, which is an object"
            if self.input_fields is not None and first not in self.input_fields:
                return f"refers to input field '{first}', which $.parameterSchema does not declare"
        elif ref.root == "steps":
            if not isinstance(first, str):
                return "must name a step: steps.<key>.output or steps.<key>.status"
            if first not in upstream:
                missing = "" if first in self.steps else " (there is no such step)"
                return f"refers to step '{first}', which is not upstream of '{step_key}'{missing}"
            if len(path) < 2 or path[1] not in ("output", "status"):
                return f"must go on with .output or .status after 'steps.{first}'"
            if path[1] == "status" and len(path) > 2:
                return "goes past a step's status, which is a string"
        elif ref.root == "env":
            return _named(path, "env var", "$.envConfig.vars", env.vars)
        elif ref.root == "secrets":
            return _named(path, "secret", "$.envConfig.secretRefs", env.secret_refs)
        elif ref.root == "run" and path not in (("id",), ("tenantId",)):
            return "must be run.id or run.tenantId"
        return None

    def _endpoint(self, i: int, step: Step) -> None:
        where = f"$.graph.steps[{i}]"
        action = self.version.actions.get(step.action_id)
        if action is None:
            return
        template = action.endpoint_template
        params = path_params(template)
        given = step.input.path
        # A path that is one whole template is an object only at run time: nothing to compare.
        if isinstance(given, dict):
            for name in dict.fromkeys(params):
                if name not in given:
                    self.add(f"{where}.input.path: missing path parameter '{name}' of '{template}'")
            for name in given:
                if name not in params:
                    self.add(
                        f"{where}.input.path.{name}: '{name}' is not a parameter of '{template}'"
                    )
        base: str | None = None
        if step.connection_id is not None:
            connection = self.version.connections.get(step.connection_id)
            if connection is None:
                return  # resolved with the credentials at run time: its baseUrl is unknown here
            base = connection.config.base_url
            if not base:
                self.add(f"{where}.connectionId: connection '{connection.id}' has no baseUrl")
                return
        try:
            base_url_for(
                template,
                base,
                f"$.actions.{action.id}",
                f"$.connections.{step.connection_id}.config" if base is not None else None,
            )
        except DefinitionError as err:
            self.add(err.message)

    def _actions(self) -> None:
        for action in self.version.actions.values():
            schema = action.path_schema
            if schema is None:
                continue
            required = schema.get("required", [])
            if not isinstance(required, list):
                continue  # compile_schema reports it
            params = path_params(action.endpoint_template)
            where = f"$.actions.{action.id}.pathSchema"
            for name in required:
                if name not in params:
                    self.add(
                        f"{where}.required: '{name}' is not a parameter of "
                        f"'{action.endpoint_template}'"
                    )
            for name in dict.fromkeys(params):
                if name not in required:
                    self.add(
                        f"{where}.required: path parameter '{name}' of "
                        f"'{action.endpoint_template}' is not required"
                    )


def _named(path: tuple[str | int, ...], kind: str, declared_at: str, names: Any) -> str | None:
    if not path or not isinstance(path[0], str):
        return f"must name a {kind}"
    if path[0] not in names:
        return f"refers to {kind} '{path[0]}', which {declared_at} does not declare"
    if len(path) > 1:
        return f"goes past {kind} '{path[0]}', which is a string"
    return None


def _declared_input_fields(schema: dict[str, Any] | None) -> frozenset[str] | None:
    """The top-level input fields a reference may name; None when any may exist."""
    if schema is None:
        return None
    properties = schema.get("properties")
    additional = schema.get("additionalProperties")
    if (
        not isinstance(properties, dict)
        or "patternProperties" in schema
        or additional is True
        or isinstance(additional, dict)
    ):
        return None
    required = schema.get("required")
    names = set(properties)
    if isinstance(required, list):
        names.update(r for r in required if isinstance(r, str))
    return frozenset(names)


def _declared_deps(version: WorkflowVersion) -> dict[str, tuple[str, ...]]:
    """Each step's dependencies as compiling reads them (absent: the step before), known steps
    only, the first step of a duplicated key."""
    keys = {s.key for s in version.graph.steps}
    deps: dict[str, tuple[str, ...]] = {}
    previous: str | None = None
    for step in version.graph.steps:
        if step.depends_on is None:
            declared: tuple[str, ...] = (previous,) if previous is not None else ()
        else:
            declared = tuple(dict.fromkeys(step.depends_on))
        deps.setdefault(step.key, tuple(d for d in declared if d in keys and d != step.key))
        previous = step.key
    return deps


def _upstream(deps: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """Each step's transitive dependencies (itself excluded, even inside a cycle)."""
    result: dict[str, set[str]] = {}
    for key in deps:
        seen: set[str] = set()
        stack = list(deps[key])
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.add(dep)
                stack.extend(deps.get(dep, ()))
        seen.discard(key)
        result[key] = seen
    return result
