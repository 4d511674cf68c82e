"""The error tree drawn in ``runner.errors`` is the tree there is: every exception class the
package defines, and every error code, appears in the drawing."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import runner
from runner import errors


def _runner_modules() -> list[object]:
    modules = []
    for info in pkgutil.walk_packages(runner.__path__, prefix="runner."):
        if info.name in ("runner.__main__",):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def test_every_exception_class_of_the_package_is_drawn() -> None:
    drawing = errors.__doc__ or ""
    missing = []
    for module in _runner_modules():
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__  # type: ignore[attr-defined]
                and name not in drawing
            ):
                missing.append(f"{obj.__module__}.{name}")
    assert not missing, f"exceptions not drawn in runner/errors.py's docstring: {missing}"


def test_every_error_code_is_drawn() -> None:
    drawing = errors.__doc__ or ""
    assert [c.value for c in errors.ErrorCode if c.value not in drawing] == []
