"""Where the runner spends CPU on a workload: py-spy (sampling, attached to the running
process for the throughput window only), cProfile (deterministic, whole process life), or
callgrind (instructions executed in the throughput window: a count that does not move with the
machine's speed, so two builds or commits compare to the percent).

py-spy and cProfile print the top functions by own time and by cumulative time; callgrind the
instructions per run and the C functions (the interpreter's, the extensions') they went to.
"""

from __future__ import annotations

import pstats
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path


def py_spy_binary(python: str) -> str | None:
    """py-spy beside the profiled interpreter, else beside the bench's own (a ``--python``
    venv is made without it), else on PATH. It attaches by pid, so any build will do."""
    for bin_dir in (Path(python).parent, Path(sys.executable).parent):
        if (bin_dir / "py-spy").exists():
            return str(bin_dir / "py-spy")
    return shutil.which("py-spy")


def py_spy_hook(
    binary: str, out: Path, rate_hz: int = 250
) -> Callable[[list[int]], Callable[[], None]]:
    def start(pids: list[int]) -> Callable[[], None]:
        proc = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(pids[0]),
                "--rate",
                str(rate_hz),
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def stop() -> None:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            if not out.exists():
                print(
                    f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}", file=sys.stderr
                )

        return stop

    return start


def callgrind_prefix(out: Path) -> list[str]:
    """What the runner's command is run under: callgrind, counting nothing until the window."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("bench: valgrind is not installed (Debian: apt-get install valgrind)")
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def callgrind_hook(out: Path) -> Callable[[list[int]], Callable[[], None]]:
    """Counts from the window's opening to its close, then dumps the counts to ``out``."""

    def control(pid: int, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)

    def start(pids: list[int]) -> Callable[[], None]:
        pid = pids[0]  # valgrind runs the interpreter in its own process: one pid
        control(pid, "--instr=on")

        def stop() -> None:
            control(pid, "--dump=window")
            control(pid, "--instr=off")

        return stop

    return start


def callgrind_window(out: Path) -> Path:
    """The dump the window's close wrote (callgrind numbers its dumps: ``out.1``)."""
    dumps = sorted(out.parent.glob(out.name + ".*"))
    if not dumps:
        raise SystemExit(f"bench: callgrind wrote no dump beside {out}")
    return dumps[0]


def annotate(dump: Path) -> tuple[int, Counter[str]]:
    """callgrind_annotate's reading of a dump: the instructions in all, and per C function."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return parse_annotate(text)


def parse_annotate(text: str) -> tuple[int, Counter[str]]:
    total = 0
    functions: Counter[str] = Counter()
    for line in text.splitlines():
        row = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(\S.*)", line)
        if row is None:
            continue
        n = int(row.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in row.group(2):
            total = n
        else:
            # "/path/to/file.c:function [/path/to/object.so]" -> "file.c:function [object.so]"
            name = re.sub(r"\[\S*/", "[", re.sub(r"^\S*/", "", row.group(2)))
            functions[name] += n
    return total, functions


def callgrind_top(dump: Path, runs: int, top: int = 25) -> str:
    total, functions = annotate(dump)
    rows = [
        f"{total / runs:,.0f} instructions per run in the window ({total:,} for {runs:,} runs)",
        "",
        "| C function | instructions per run | share |",
        "|---|---|---|",
    ]
    rows += [
        f"| `{name[:100]}` | {n / runs:,.0f} | {100 * n / max(total, 1):.1f}% |"
        for name, n in functions.most_common(top)
    ]
    return "\n".join(rows)


# Frames every sample under the main loop shares: they say nothing about where CPU goes.
_ROOTS = (
    "<frozen runpy>",
    "runner/__main__.py",
    "runner/app.py",
    "uvloop/__init__.py",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
)


def _short(frame: str) -> str:
    # "name (pkg/module.py:123)" -> "name (pkg/module.py)": one row per function, not per line.
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})"


def _package(frame: str) -> str:
    where = frame.partition(" (")[2].rstrip(")")
    parts = where.split("/")
    if parts[0] == "runner" and len(parts) > 1:
        return "runner/" + parts[1]  # a subpackage, or a top-level module such as runs.py
    return parts[0] if len(parts) > 1 else where.removesuffix(".py")


def collapsed_top(path: Path, top: int = 15) -> str:
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        # Thread/process header frames that py-spy prepends carry no " (": skip them.
        frames = [f for f in frames if " (" in f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for f in set(frames):
            if not f[:-1].endswith(_ROOTS):
                cumulative[f] += count
    text = _tables(own, cumulative, total, top, "samples")
    rows = [
        "",
        "Own time by package (the module the sampled line was in):",
        "",
        "| package | share |",
        "|---|---|",
    ]
    rows += [f"| {name} | {100 * v / total:.1f}% |" for name, v in packages.most_common(12)]
    return text + "\n" + "\n".join(rows)


def cprofile_top(path: Path, top: int = 15) -> str:
    stats = pstats.Stats(str(path))
    raw = stats.stats  # type: ignore[attr-defined]
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0.0
    for (file, line, name), (_cc, _nc, tt, ct, _callers) in raw.items():
        key = f"{name} ({'/'.join(file.split('/')[-2:])}:{line})"
        own[key] += tt  # type: ignore[assignment]
        cumulative[key] = max(cumulative[key], ct)  # type: ignore[assignment]
        total += tt
    return _tables(own, cumulative, total, top, "s")


def _tables(own: Counter[str], cumulative: Counter[str], total: float, top: int, unit: str) -> str:
    lines = [
        f"Top {top} by own time ({total:,.0f} {unit} in all):",
        "",
        "| function | own | share |",
        "|---|---|---|",
    ]
    for name, v in own.most_common(top):
        lines.append(f"| `{name}` | {v:,.2f} | {100 * v / total:.1f}% |")
    lines += [
        "",
        f"Top {top} by cumulative time:",
        "",
        "| function | cumulative | share |",
        "|---|---|---|",
    ]
    for name, v in cumulative.most_common(top):
        lines.append(f"| `{name}` | {v:,.2f} | {100 * v / total:.1f}% |")
    return "\n".join(lines)
