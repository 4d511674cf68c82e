"""The package is described in pyproject.toml; this file only adds the compiled build.

With ``RUNNER_COMPILE=1`` the modules listed under ``[tool.runner.compiled]`` in pyproject.toml
are compiled to C extensions by mypyc, beside their sources (an extension is imported before a
``.py`` of the same name). That is the runner's image build (``docker/Dockerfile``) and what
``scripts/compile`` builds for the tests and the bench. It needs a C compiler, and the
runtime dependencies installed for the interpreter that builds, because mypyc type-checks the
modules against them; mypy itself is a pinned build requirement (pyproject.toml). Without
``RUNNER_COMPILE=1``, as in the editable dev install, nothing is compiled. Why and what for: docs/performance.md, "The compiled build".
"""

import os
import tomllib

from setuptools import setup

ext_modules = []
if os.environ.get("RUNNER_COMPILE") == "1":
    from mypyc.build import mypycify

    with open("pyproject.toml", "rb") as f:
        modules = tomllib.load(f)["tool"]["runner"]["compiled"]["modules"]
    ext_modules = mypycify(modules, opt_level="3", group_name="runner")

setup(ext_modules=ext_modules)
