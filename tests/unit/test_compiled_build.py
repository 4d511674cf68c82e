"""The compiled build: which modules it compiles, that those avoid what mypyc does differently,
and that each pass of the suite tests the build it says it does.

``scripts/test`` runs the suite twice: in the source tree (pure Python) and in the tree
``scripts/compile`` lays out (the image's build), with ``RUNNER_EXPECT_COMPILED=1``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import tomllib
from pathlib import Path

import pytest

from runner.app import build_kind

ROOT = Path(__file__).resolve().parents[2]
EXPECT_COMPILED = os.environ.get("RUNNER_EXPECT_COMPILED") == "1"


def _listed() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        modules: list[str] = tomllib.load(f)["tool"]["runner"]["compiled"]["modules"]
    return modules


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def test_the_compiled_modules_exist_and_are_runner_modules() -> None:
    listed = _listed()
    assert listed, "pyproject.toml lists no compiled modules"
    for path in listed:
        assert path.startswith("runner/") and path.endswith(".py"), path
        assert (ROOT / path).is_file(), f"{path} is listed under [tool.runner.compiled] but absent"


@pytest.mark.parametrize("path", _listed())
def test_a_compiled_module_does_not_raise_from_none(path: str) -> None:
    # mypyc leaves ``__suppress_context__`` unset on ``raise ... from None``, so the error
    # would show the context the runner hides on purpose (it may carry a secret). Raise after
    # the handler instead.
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    offending = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Raise)
        and isinstance(node.cause, ast.Constant)
        and node.cause.value is None
    ]
    assert not offending, f"{path}: 'raise ... from None' at lines {offending}"


def _awaits_inside_handlers(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try | ast.TryStar):
            bodies = [handler.body for handler in node.handlers] + [node.finalbody]
            for body in bodies:
                for statement in body:
                    lines += [
                        inner.lineno
                        for inner in ast.walk(statement)
                        if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor)
                    ]
    return sorted(lines)


def _async_withs_of_others(tree: ast.AST) -> list[int]:
    # An ``async with`` awaits its ``__aexit__`` while the body's error is being handled.
    # ``deadline``'s never suspends; another's may (aiohttp's response waits for its writer).
    return sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncWith)
        for item in node.items
        if not (
            isinstance(item.context_expr, ast.Call)
            and isinstance(item.context_expr.func, ast.Name)
            and item.context_expr.func.id == "deadline"
        )
    )


@pytest.mark.parametrize("path", _listed())
def test_a_compiled_module_does_not_await_while_handling_an_error(path: str) -> None:
    # A compiled coroutine that suspends inside ``except`` or ``finally`` leaves the error set
    # as the thread's handled exception while other tasks run (mypyc 2.4.1; a Python frame
    # swaps it out at each suspension): their errors then carry it as ``__context__`` (it may
    # hold a secret, and keeps its frames alive), and a compiled ``with`` hands it to
    # ``__exit__`` in place of the real one (a run's cancel escaped ``contextlib.suppress``).
    # Keep the await after the handler.
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    assert not _awaits_inside_handlers(tree), (
        f"{path}: await inside except/finally at lines {_awaits_inside_handlers(tree)}"
    )
    assert not _async_withs_of_others(tree), (
        f"{path}: async with other than deadline() at lines {_async_withs_of_others(tree)}"
    )


def test_the_await_check_finds_what_it_looks_for() -> None:
    source = """
async def f():
    try:
        await g()
    except OSError:
        await h()
    finally:
        async with lock:
            pass
    async with deadline(1):
        await g()
    async with session.get(url):
        pass
"""
    tree = ast.parse(source)
    assert _awaits_inside_handlers(tree) == [6, 8]
    assert _async_withs_of_others(tree) == [8, 12]


@pytest.mark.parametrize("path", _listed())
def test_each_pass_imports_the_build_it_tests(path: str) -> None:
    module = importlib.import_module(_module_name(path))
    origin = str(module.__file__)
    if EXPECT_COMPILED:
        assert origin.endswith(".so"), f"{path} imported from {origin}, not its compiled extension"
    else:
        # The source tree is never compiled in place: a stale extension would shadow an edit.
        assert origin.endswith(".py"), f"{path} imported from {origin}; remove the extension"


def test_the_runner_says_which_build_it_runs() -> None:
    # Logged in runner.started.
    assert build_kind() == ("compiled" if EXPECT_COMPILED else "pure")


@pytest.mark.parametrize(
    "name",
    [
        "runner.reporting.stream.Transition",
        "runner.reporting.stream._RunHeads",
        "runner.reporting.stream._StateRead",
        "runner.engine.run.RunOutcome",
        "runner.engine.run._State",
    ],
)
def test_what_a_run_makes_on_the_hot_path_is_a_plain_class(name: str) -> None:
    # Compiled, a dataclass keeps the ``__init__`` that ``dataclasses`` generates in Python
    # (4.4k instructions a call against a few hundred); these are made per transition or run.
    module, _, attr = name.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    assert not dataclasses.is_dataclass(cls), f"{name} is a dataclass"
    assert "__init__" in vars(cls), f"{name} has no __init__ of its own"
