"""The compiled build: which modules it compiles, that those avoid what mypyc does differently,
and that each pass of the suite tests the build it says it does.

``scripts/test`` runs the suite twice: in the source tree (pure Python) and in the tree
``scripts/compile`` lays out (the image's build), with ``RUNNER_EXPECT_COMPILED=1``.
"""

from __future__ import annotations

import ast
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
