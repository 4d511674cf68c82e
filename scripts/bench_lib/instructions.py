"""Instructions executed per W3 run by one of the in-process loops, counted by valgrind's
callgrind: a count, not a time, so it does not move with this machine's speed. A change of a
few percent, which timing cannot resolve here, shows in it.

    PYTHONPATH=scripts .venv/bin/python -m bench_lib.instructions [engine_loop|reporting_loop]
        [--runs 100,300] [--top 25] [--python PATH]

It runs the loop (``bench_lib.engine_loop`` or ``bench_lib.reporting_loop``, from the current
directory's ``runner``, so a worktree of another revision measures that one) under callgrind
twice, at two sizes, and divides the difference by the runs between them, so start-up (imports,
the definition's compilation) drops out. ``--top`` lists the C functions (the interpreter's,
the extensions') that the extra runs spent their instructions in. Needs valgrind (Debian:
``apt-get install valgrind``); each measurement takes a minute or two, as callgrind runs the
interpreter some 50 times slower.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_lib.profiling import annotate

LOOPS_PER_PROCESS = 3  # each loop module runs its loop three times


def count(python: str, module: str, runs: int, out: Path) -> int:
    """Instructions the whole process executed; callgrind's profile goes to ``out``."""
    env = dict(os.environ)
    scripts = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [scripts, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            python,
            "-m",
            f"bench_lib.{module}",
            str(runs),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        sys.exit(f"instructions: {module} under callgrind failed:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loop", nargs="?", default="engine_loop")
    parser.add_argument("--runs", default="100,300", help="the two sizes, runs per loop")
    parser.add_argument("--top", type=int, default=0, help="list the top C functions")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    if args.loop not in ("engine_loop", "reporting_loop"):
        parser.error("the loop is engine_loop or reporting_loop")
    if shutil.which("valgrind") is None:
        sys.exit("instructions: valgrind is not installed (Debian: apt-get install valgrind)")
    small, large = (int(n) for n in args.runs.split(","))
    if not 0 < small < large:
        parser.error("--runs: two sizes, the first smaller")
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp, "small.out"), Path(tmp, "large.out")
        at_small = count(args.python, args.loop, small, first)
        at_large = count(args.python, args.loop, large, second)
        runs = LOOPS_PER_PROCESS * (large - small)
        per_run = (at_large - at_small) / runs
        print(
            f"{args.loop}: {per_run:,.0f} instructions per W3 run "
            f"({runs:,} runs between {at_small:,} and {at_large:,}; runner from {Path.cwd()})"
        )
        if args.top:
            extra = annotate(second)[1]
            extra.subtract(annotate(first)[1])
            print(f"\nTop {args.top} C functions, instructions per run:\n")
            for name, n in extra.most_common(args.top):
                print(f"{n / runs:10,.0f} {100 * n / runs / per_run:5.1f}%  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
