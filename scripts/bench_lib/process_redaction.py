"""The process-wide redaction under runs that come and go: what the process registry's ``redactor()`` costs
when every run registers its credentials at its start and drops them at its end. It scrubs the
process's own log lines, every event of an OAuth2 run (a refreshed token joins it) and, until
2026-11-26, every execution-log document (now scrubbed by the run's own redactor). Measured on
a W3 run's eight execution-log documents.

    PYTHONPATH=scripts .venv/bin/python -m bench_lib.process_redaction [runs]

50 runs stay in flight: each simulated run unregisters the oldest, registers its own secrets
(an API key of its own, or one key that every run shares) and scrubs its documents through the
real ``build_document``. The baseline, measured in the same run, scrubs the same documents with
the run's own redactor (what the runner does now for a run's documents); both include building
the run's redactor when its key is new.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from runner.redact import SecretRegistry
from runner.reporting.execlog.documents import LogLine, build_document

IN_FLIGHT = 50
OUTPUT = {
    "status": 200,
    "headers": {"content-type": "application/json", "content-length": "60"},
    "body": {"id": "c_0", "email": "c0@example.com", "name": "Customer 0"},
}


def _lines(run: int) -> list[LogLine]:
    """A W3 run's execution-log lines: run start and end, each step's start and end."""
    lines = []
    for i, (message, context) in enumerate(
        [("run started", {"input": {"customerId": "c_0"}})]
        + [(m, c) for k in ("a", "b", "c") for m, c in _step_lines(k)]
        + [("run succeeded", {"durationMs": 12})]
    ):
        lines.append(
            LogLine(
                tenant_id="ten_1",
                workflow_run_id=f"run_{run}",
                job_id=str(run),
                worker_id="w",
                level="info",
                message=message,
                context=context,
                timestamp_ms=1_764_000_000_000 + i,
                step_key=None,
                step_run_id=None,
                attempt=None,
            )
        )
    return lines


def _step_lines(key: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"step {key} started", {"attempt": 1, "method": "GET", "url": "http://api/c/c_0"}),
        (f"step {key} succeeded", {"attempt": 1, "output": OUTPUT}),
    ]


def _loop(runs: int, shared_key: bool, via_process: bool) -> float:
    """µs of CPU per run."""
    registry = SecretRegistry()
    registry.register(["process-token-" + secrets.token_hex(8)])
    held: deque[int] = deque()
    key = secrets.token_urlsafe(24)
    redact: Callable[[Any], Any]
    started = time.process_time()
    for run in range(runs):
        if len(held) >= IN_FLIGHT:
            registry.unregister(held.popleft())
        handle = registry.register(
            [key if shared_key else secrets.token_urlsafe(24)], ["X-API-Key"]
        )
        held.append(handle)
        if via_process:
            redact = lambda value: registry.redactor().scrubbed(value)  # noqa: E731
        else:
            redact = registry.run_redactor(handle).scrubbed
        for line in _lines(run):
            build_document(line, context_limit_bytes=16_384, redact=redact)
    return (time.process_time() - started) / runs * 1e6


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"{IN_FLIGHT} runs in flight, {runs} runs, 8 execution-log documents each")
    print("| secrets | the run's own redactor, µs/run | registry.redactor(), µs/run | ratio |")
    print("|---|---|---|---|")
    for shared_key, label in ((False, "a key per run"), (True, "one key for all runs")):
        own = min(_loop(runs, shared_key, via_process=False) for _ in range(3))
        process = min(_loop(runs, shared_key, via_process=True) for _ in range(3))
        print(f"| {label} | {own:,.0f} | {process:,.0f} | {process / own:.2f}x |")


if __name__ == "__main__":
    main()
