"""A WorkflowVersion compiled into a ``Plan``: done once per version, reused by every run.

Compiling checks what can be checked without running: step keys (unique, well-formed), the
actions they name, the graph (known dependencies, no cycle), templates (parseable, known
roots), JSONPaths, schemas. It goes on past a problem and collects them all (``Problems``):
the one rule set, which ``python -m runner validate`` reports in full and adds lint to. Everything a run needs per step is precomputed here: compiled templates,
the retry policy, dependencies.

Ordering: ``dependsOn`` absent means "the step before me", so a plain list is linear.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from runner.contract import Action, Step, WorkflowVersion
from runner.engine.pagination import PaginateSpec, compile_paginate
from runner.engine.schemas import (
    ACTION_SCHEMA_FIELDS,
    PlanSchemas,
    compile_schema,
    compile_schemas,
)
from runner.errors import DefinitionError
from runner.retry import RetryPolicy, policy_for
from runner.templating import (
    ITEM_ROOTS,
    ROOTS,
    Compiled,
    JsonPath,
    compile_for_each,
    compile_jsonpath,
    compile_value,
)

_T = TypeVar("_T")
STEP_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # use with fullmatch


@dataclass(frozen=True, slots=True)
class StepPlan:
    index: int
    key: str
    where: str
    step: Step
    action: Action
    depends_on: tuple[str, ...]
    when: Compiled | None
    path: Compiled
    query: Compiled
    headers: Compiled
    action_headers: Compiled
    body: Compiled
    extract: tuple[tuple[str, JsonPath], ...]
    policy: RetryPolicy
    timeout_ms: int
    # A map step: the expression yielding its items (None: one call), at most this many at once.
    for_each: Compiled | None = None
    max_parallel: int = 1
    paginate: PaginateSpec | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    version: WorkflowVersion
    steps: tuple[StepPlan, ...]
    by_key: dict[str, StepPlan] = field(repr=False)
    connection_ids: frozenset[str]
    secret_refs: dict[str, str]
    schemas: PlanSchemas

    @property
    def id(self) -> str:
        return self.version.id


class Problems:
    """What is wrong with a definition, collected: compiling goes on past a problem, so that one
    pass names every one of them (``python -m runner validate`` prints them all; a run fails
    with the first)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)

    def attempt(self, compile_one: Callable[..., _T], *args: Any) -> _T | None:
        """``compile_one(*args)``, or None with its ``DefinitionError`` collected."""
        try:
            return compile_one(*args)
        except DefinitionError as err:
            self.add(err.message)
            return None


def compile_plan(version: WorkflowVersion) -> Plan:
    """The plan of ``version``; ``DefinitionError`` with the first problem if it has any."""
    problems = Problems()
    plan = plan_or_problems(version, problems)
    if plan is None:
        raise DefinitionError(problems.messages[0])
    return plan


def plan_or_problems(version: WorkflowVersion, problems: Problems) -> Plan | None:
    """The plan of ``version``, or None with every problem found collected in ``problems``."""
    steps: list[StepPlan] = []
    seen: dict[str, int] = {}
    previous: str | None = None
    keys = {s.key for s in version.graph.steps}
    deps: dict[str, tuple[str, ...]] = {}
    for i, step in enumerate(version.graph.steps):
        where = f"$.graph.steps[{i}]"
        if not STEP_KEY.fullmatch(step.key):
            problems.add(f"{where}.key: '{step.key}' must match [A-Za-z_][A-Za-z0-9_]*")
        first = seen.setdefault(step.key, i)
        if first != i:
            problems.add(f"{where}.key: duplicate key '{step.key}' (also $.graph.steps[{first}])")
        action = version.actions.get(step.action_id)
        if action is None:
            problems.add(f"{where}.actionId: unknown action '{step.action_id}'")
        if (
            step.connection_id is not None
            and version.connections
            and (step.connection_id not in version.connections)
        ):
            problems.add(f"{where}.connectionId: unknown connection '{step.connection_id}'")
        if step.depends_on is None:
            depends_on: tuple[str, ...] = (previous,) if previous is not None else ()
        else:
            depends_on = tuple(dict.fromkeys(step.depends_on))
            for dep in depends_on:
                if dep not in keys:
                    problems.add(f"{where}.dependsOn: unknown step '{dep}'")
                elif dep == step.key:
                    problems.add(f"{where}.dependsOn: step '{step.key}' depends on itself")
        if first == i:
            deps[step.key] = tuple(d for d in depends_on if d in keys and d != step.key)
        previous = step.key
        timeout_ms = step.timeout_ms
        if timeout_ms is None and action is not None:
            timeout_ms = action.timeout_ms
        if timeout_ms is not None and timeout_ms <= 0:
            problems.add(f"{where}.timeoutMs: must be above 0")
        built = _step_plan(i, where, step, action, depends_on, problems)
        if built is not None and timeout_ms is not None:
            steps.append(built)
    cycle = find_cycle([_Node(key, d) for key, d in deps.items()])
    if cycle:
        problems.add(f"$.graph.steps: dependency cycle {' -> '.join(cycle)}")
    for schema, at in _schemas_of(version):  # each broken one named, then all at once
        problems.attempt(compile_schema, schema, at)
    schemas = None if problems.messages else problems.attempt(compile_schemas, version)
    if schemas is None:
        return None
    connection_ids = frozenset(s.step.connection_id for s in steps if s.step.connection_id)
    return Plan(
        version=version,
        steps=tuple(steps),
        by_key={s.key: s for s in steps},
        connection_ids=connection_ids,
        secret_refs=dict(version.env_config.secret_refs),
        schemas=schemas,
    )


def _step_plan(
    i: int,
    where: str,
    step: Step,
    action: Action | None,
    depends_on: tuple[str, ...],
    problems: Problems,
) -> StepPlan | None:
    """A step's plan, each template and JSONPath compiled on its own so that each broken one is
    named; None when any is broken (or the action is unknown)."""
    before = len(problems.messages)
    for_each = None
    roots = ROOTS
    if step.for_each is not None:
        for_each = problems.attempt(compile_for_each, step.for_each, f"{where}.forEach")
        roots = ITEM_ROOTS
        if step.max_parallel < 1:
            problems.add(f"{where}.maxParallel: must be 1 or more")
    elif step.max_parallel != 1 or step.on_item_error != "fail":
        problems.add(f"{where}: maxParallel and onItemError need forEach")

    def value(template: Any, at: str, roots: frozenset[str] = roots) -> Compiled:
        try:
            return compile_value(template, at, roots)
        except DefinitionError:
            for text, leaf in string_leaves(template, at):  # name each broken one
                problems.attempt(compile_value, text, leaf, roots)
            return compile_value(None, at)

    # `when` is decided once for the whole step: a forEach filters its items itself.
    when = value(step.when, f"{where}.when", ROOTS) if step.when is not None else None
    path = value(step.input.path, f"{where}.input.path")
    query = value(step.input.query, f"{where}.input.query")
    headers = value(step.input.headers, f"{where}.input.headers")
    body = value(step.input.body, f"{where}.input.body")
    extract = []
    for name, jsonpath in step.extract.items():
        compiled = problems.attempt(compile_jsonpath, jsonpath, f"{where}.extract.{name}")
        if compiled is not None:
            extract.append((name, compiled))
    if action is None:
        return None
    action_headers = value(action.headers_template, f"$.actions.{action.id}.headersTemplate")
    paginate = problems.attempt(
        compile_paginate,
        action.paginate,
        step.paginate,
        f"$.actions.{action.id}.paginate",
        f"{where}.paginate",
    )
    if for_each is not None and paginate is not None:
        # Items call the attempt loop, not the page loop: each would get its first page only.
        problems.add(f"{where}.forEach: a paginated Action cannot run per item (yet)")
    if len(problems.messages) > before:
        return None
    return StepPlan(
        index=i,
        key=step.key,
        where=where,
        step=step,
        action=action,
        depends_on=depends_on,
        when=when,
        path=path,
        query=query,
        headers=headers,
        action_headers=action_headers,
        body=body,
        extract=tuple(extract),
        policy=policy_for(action, step.retry),
        timeout_ms=step.timeout_ms if step.timeout_ms is not None else action.timeout_ms,
        paginate=paginate,
        for_each=for_each,
        max_parallel=step.max_parallel,
    )


def _schemas_of(version: WorkflowVersion) -> Iterator[tuple[Any, str]]:
    if version.parameter_schema is not None:
        yield version.parameter_schema, "$.parameterSchema"
    for action in version.actions.values():
        for attr, wire in ACTION_SCHEMA_FIELDS:
            schema = getattr(action, attr)
            if schema is not None:
                yield schema, f"$.actions.{action.id}.{wire}"


def string_leaves(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string leaf with the location ``compile_value`` would give it."""
    if isinstance(value, str):
        yield value, where
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from string_leaves(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from string_leaves(v, f"{where}[{i}]")


@dataclass(frozen=True, slots=True)
class _Node:
    """What ``find_cycle`` reads of a step."""

    key: str
    depends_on: tuple[str, ...]


def find_cycle(steps: Sequence[StepPlan | _Node]) -> list[str] | None:
    """A cycle as keys, each depending on the next, the first repeated at the end; or None.

    Kahn's algorithm, iterative so that a long list cannot exhaust the stack: whatever cannot
    be ordered has a dependency that cannot be ordered either, and following those must loop.
    """
    deps = {s.key: [d for d in s.depends_on if d != s.key] for s in steps}
    waiting = {key: len(d) for key, d in deps.items()}
    dependents: dict[str, list[str]] = {key: [] for key in deps}
    for key, ds in deps.items():
        for d in ds:
            dependents.setdefault(d, []).append(key)
    ready = [key for key, n in waiting.items() if n == 0]
    while ready:
        key = ready.pop()
        for nxt in dependents.get(key, ()):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    stuck = {key for key, n in waiting.items() if n > 0}
    if not stuck:
        return None
    path: list[str] = []
    seen: dict[str, int] = {}
    key = min(stuck)
    while key not in seen:
        seen[key] = len(path)
        path.append(key)
        key = next(d for d in deps[key] if d in stuck)
    return [*path[seen[key] :], key]
