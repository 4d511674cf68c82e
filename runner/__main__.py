"""``python -m runner``: run the worker. ``--help`` lists every setting with its default.

Subcommands: ``validate FILE`` (check a WorkflowVersion without running it, ``-`` for stdin),
``settings-table`` (the README's settings table in Markdown).
"""

from __future__ import annotations

import sys

from runner.log import log
from runner.settings import Settings, settings_table

USAGE = """usage: python -m runner [--help] [validate FILE | settings-table]

Runs a BullMQ worker for workflow_run jobs. Settings come from the environment:
"""


def _help() -> str:
    rows = settings_table()
    width = max(len(env) for env, *_ in rows)
    lines = [USAGE]
    for env, default, doc, secret in rows:
        shown = "(unset)" if default == "" else default
        note = " [secret]" if secret else ""
        lines.append(f"  {env.ljust(width)}  {doc}{note}\n  {''.ljust(width)}  default: {shown}")
    lines.append("\nOpenTelemetry is configured with the standard OTEL_* variables.")
    return "\n".join(lines)


def _markdown_table() -> str:
    out = ["| setting | default | meaning |", "|---|---|---|"]
    for env, default, doc, secret in settings_table():
        shown = "—" if default == "" else f"`{default}`"
        out.append(f"| `{env}` | {shown} | {doc}{' (secret)' if secret else ''} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if argv and argv[0] == "settings-table":
        print(_markdown_table())
        return 0
    if argv and argv[0] == "validate":
        from runner.validate import main as validate_main

        return validate_main(argv[1:])
    if argv:
        print(f"unknown argument {argv[0]!r}\n\n{_help()}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    from runner.supervisor import process_count, supervise

    if process_count(settings) > 1:
        log.configure(level=settings.log_level, worker=settings.name)
        return supervise(settings)
    from runner.app import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
