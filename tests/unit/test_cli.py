"""The CLI's help and the README stay in step with runner.settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runner.__main__ import _markdown_table, main
from runner.settings import Settings, settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = readme.index("<!-- settings-table:end -->")
    assert readme[start:end].strip() == _markdown_table(), (
        "README's settings table is stale: paste `python -m runner settings-table`"
    )


def test_help_lists_every_setting_with_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "runner", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for env, default, _doc, _secret in settings_table():
        assert env in out
        assert f"default: {default or '(unset)'}" in out


def test_bad_setting_value_names_the_variable() -> None:
    try:
        Settings.from_env({"RUNNER_CONCURRENCY": "many"})
    except SystemExit as exc:
        assert str(exc) == "RUNNER_CONCURRENCY: expected a whole number >= 0, got 'many'"
    else:
        raise AssertionError("a bad value must stop the process")


def test_unknown_argument_is_a_usage_error(capsys: object) -> None:
    assert main(["--bogus"]) == 2
