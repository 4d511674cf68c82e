"""A WorkflowVersion compiled into a ``Plan``: done once per version, reused by every run.

Compiling checks what can be checked without running: step keys (unique, well-formed), the
actions they name, the graph (known dependencies, no cycle), templates (parseable, known
roots), JSONPaths. Everything a run needs per step is precomputed here: compiled templates,
the retry policy, dependencies.

Ordering: ``dependsOn`` absent means "the step before me", so a plain list is linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from runner.contract import Action, Step, WorkflowVersion
from runner.engine.pagination import PaginateSpec, compile_paginate
from runner.engine.schemas import PlanSchemas, compile_schemas
from runner.errors import DefinitionError
from runner.retry import RetryPolicy, policy_for
from runner.templating import Compiled, JsonPath, compile_jsonpath, compile_value

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


def compile_plan(version: WorkflowVersion) -> Plan:
    steps: list[StepPlan] = []
    seen: dict[str, int] = {}
    previous: str | None = None
    for i, step in enumerate(version.graph.steps):
        where = f"$.graph.steps[{i}]"
        if not STEP_KEY.fullmatch(step.key):
            raise DefinitionError(f"{where}.key: '{step.key}' must match [A-Za-z_][A-Za-z0-9_]*")
        if step.key in seen:
            raise DefinitionError(
                f"{where}.key: duplicate key '{step.key}' (also $.graph.steps[{seen[step.key]}])"
            )
        seen[step.key] = i
        action = version.actions.get(step.action_id)
        if action is None:
            raise DefinitionError(f"{where}.actionId: unknown action '{step.action_id}'")
        if (
            step.connection_id is not None
            and version.connections
            and (step.connection_id not in version.connections)
        ):
            raise DefinitionError(
                f"{where}.connectionId: unknown connection '{step.connection_id}'"
            )
        if step.depends_on is None:
            depends_on: tuple[str, ...] = (previous,) if previous is not None else ()
        else:
            depends_on = tuple(dict.fromkeys(step.depends_on))
        timeout_ms = step.timeout_ms if step.timeout_ms is not None else action.timeout_ms
        if timeout_ms <= 0:
            raise DefinitionError(f"{where}.timeoutMs: must be above 0")
        steps.append(
            StepPlan(
                index=i,
                key=step.key,
                where=where,
                step=step,
                action=action,
                depends_on=depends_on,
                when=compile_value(step.when, f"{where}.when") if step.when is not None else None,
                path=compile_value(step.input.path, f"{where}.input.path"),
                query=compile_value(step.input.query, f"{where}.input.query"),
                headers=compile_value(step.input.headers, f"{where}.input.headers"),
                action_headers=compile_value(
                    action.headers_template, f"$.actions.{action.id}.headersTemplate"
                ),
                body=compile_value(step.input.body, f"{where}.input.body"),
                extract=tuple(
                    (name, compile_jsonpath(path, f"{where}.extract.{name}"))
                    for name, path in step.extract.items()
                ),
                policy=policy_for(action, step.retry),
                timeout_ms=timeout_ms,
                paginate=compile_paginate(
                    action.paginate,
                    step.paginate,
                    f"$.actions.{action.id}.paginate",
                    f"{where}.paginate",
                ),
            )
        )
        previous = step.key
    by_key = {s.key: s for s in steps}
    for s in steps:
        for dep in s.depends_on:
            if dep not in by_key:
                raise DefinitionError(f"{s.where}.dependsOn: unknown step '{dep}'")
            if dep == s.key:
                raise DefinitionError(f"{s.where}.dependsOn: step '{s.key}' depends on itself")
    cycle = find_cycle(steps)
    if cycle:
        raise DefinitionError(f"$.graph.steps: dependency cycle {' -> '.join(cycle)}")
    connection_ids = frozenset(s.step.connection_id for s in steps if s.step.connection_id)
    return Plan(
        version=version,
        steps=tuple(steps),
        by_key=by_key,
        connection_ids=connection_ids,
        secret_refs=dict(version.env_config.secret_refs),
        schemas=compile_schemas(version),
    )


def find_cycle(steps: list[StepPlan]) -> list[str] | None:
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
