"""``scripts/bench``: arguments, interleaved rounds, output.

    scripts/bench                 everything, a few minutes (3 rounds)
    scripts/bench --quick         a short version, under a minute
    scripts/bench --only runner,node-fetch --workloads w3
    scripts/bench --profile py-spy   where the runner spends CPU on W3 (no table)
    scripts/bench --profile callgrind --runs-w3 500   instructions per W3 run (a count, not a time)
    scripts/bench --map-items 1000   a forEach of N items against N one-step runs (issue 24)

Results go to stdout as Markdown, and as JSON to ``.run/bench/latest.json``; each contender's
output is in ``.run/bench/logs/``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import secrets
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import redis

from bench_lib import measure, profiling, redisctl, report
from bench_lib.contenders import Contender, Ctx, all_contenders

REPO = Path(__file__).resolve().parents[2]
# The smallest measurement the speed targets are judged on: 2 rounds of 2,000 W3 runs (the
# "short run"; --long-w3 adds the long one). Fewer runs flatter the runner, since the Node
# workers spend their first few hundred runs still warming up their JIT.
TARGET_ROUNDS = 2
TARGET_RUNS_W3 = 2000


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one short round (< 60 s)")
    p.add_argument("--only", type=_csv, help="contenders, e.g. runner,node-fetch,node-http")
    p.add_argument("--workloads", type=_csv, help="w3,w1,empty (default: all)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--runs-w3", type=int, help="jobs per W3 measurement (default 3000)")
    p.add_argument(
        "--long-w3",
        type=int,
        default=0,
        metavar="N",
        help="also measure W3 at N jobs per measurement each round (workload w3-long): the "
        "short and the long run side by side, e.g. --runs-w3 2000 --long-w3 10000",
    )
    p.add_argument("--runs-w1", type=int, help="jobs per W1 measurement (default 2000)")
    p.add_argument("--runs-empty", type=int, help="jobs per empty-job measurement (10000)")
    p.add_argument("--pickup-samples", type=int, help="idle pickup samples per round (50)")
    p.add_argument("--concurrency", type=int, default=50, help="in flight per process (50)")
    p.add_argument("--processes", type=_csv, help="runner process counts (default 1,2)")
    p.add_argument("--in-flight", type=int, help="slow runs in flight at once (5000; 0: skip)")
    p.add_argument("--slow-ms", type=int, help="how long the slow endpoint waits (5000)")
    p.add_argument(
        "--in-flight-contenders",
        type=_csv,
        default=["runner"],
        help="contenders of the in-flight test (runner)",
    )
    p.add_argument(
        "--auth",
        choices=("none", "api-key"),
        default="none",
        help="connection type: NONE, or API_KEY with sealedCredentials",
    )
    p.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the runner as of git revision REV (contender runner-base, in a worktree "
        "under .run/bench/), paired round by round with the current one: measures a change",
    )
    p.add_argument(
        "--python",
        metavar="PATH",
        help="the interpreter the Python contenders run on (runner, aiohttp loops, py-empty; "
        "default: the venv's); one without the runner's packages gets a venv of its own under "
        ".run/bench/venvs/, made once",
    )
    p.add_argument(
        "--base-python",
        metavar="PATH",
        help="the interpreter runner-base runs on (default: that of --python); with --baseline "
        "HEAD it compares interpreters",
    )
    p.add_argument(
        "--profile",
        choices=("py-spy", "cprofile", "callgrind"),
        help="profile the runner on W3 instead of measuring (callgrind: instructions per run, "
        "about 50 times slower, so use --runs-w3 500)",
    )
    p.add_argument(
        "--map-items",
        type=int,
        metavar="N",
        help="only the forEach scenario: one map of N items (maxParallel 50) against N "
        "one-step runs, in process (bench_lib.map_loop); target >= 0.7x",
    )
    p.add_argument(
        "--flow",
        action="store_true",
        help="flow control against a rate-limited API instead (issue 23; bench_lib/flow.py)",
    )
    p.add_argument("--flow-runs", type=int, default=300, help="runs per flow mode (300)")
    p.add_argument("--flow-rate", type=int, default=20, help="requests/s the API allows (20)")
    p.add_argument("--flow-down-s", type=float, default=10.0, help="API down for (10 s)")
    p.add_argument("--json", type=Path, default=REPO / ".run" / "bench" / "latest.json")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds if a.rounds is not None else (1 if q else 3)
    a.runs_w3 = a.runs_w3 or (600 if q else 3000)
    a.runs_w1 = a.runs_w1 or (600 if q else 2000)
    a.runs_empty = a.runs_empty or (3000 if q else 10000)
    a.pickup_samples = a.pickup_samples if a.pickup_samples is not None else (10 if q else 50)
    a.processes = [int(n) for n in (a.processes or (["1"] if q else ["1", "2"]))]
    a.in_flight = a.in_flight if a.in_flight is not None else (500 if q else 5000)
    a.slow_ms = a.slow_ms or (1000 if q else 5000)
    a.workloads = a.workloads or (["w3", "empty"] if q else ["w3", "w1", "empty"])
    if a.long_w3 and "w3-long" not in a.workloads:
        a.workloads.append("w3-long")
    return a


def _cmd(argv: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, cwd=cwd, timeout=30
        ).stdout.strip()
    except OSError:
        return "?"


_VERSIONS = """
import importlib.metadata as m, json, os, sys
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "not installed"
names = ("bullmq", "redis", "hiredis", "aiohttp", "uvloop", "msgspec")
print(json.dumps({"python": sys.version.split()[0], "executable": os.path.realpath(sys.executable),
                  **{n: v(n) for n in names}}))
"""


def bench_python(interpreter: str) -> str:
    """``interpreter`` if the runner's packages import under it, else the python of a venv made
    from it once (``.run/bench/venvs/``), with the project installed there as editable."""
    probe = [interpreter, "-c", "import aiohttp, bullmq, hiredis, msgspec, uvloop"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return interpreter
    real = os.path.realpath(interpreter)
    venv = REPO / ".run" / "bench" / "venvs" / real.strip("/").replace("/", "_")
    python = venv / "bin" / "python"
    if not python.exists():
        say(f"bench: making a venv for {real} in {venv} (once; it installs the project)")
        subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO)], check=True)
    return str(python)


def build_of(tree: Path) -> str:
    stale = sorted(tree.glob("runner/**/*.so"))
    if not stale:
        return "pure Python"
    # The mypyc build is gone; a tree that still holds its modules does not measure the code.
    return f"pure Python, but {len(stale)} stale compiled modules under runner/ (delete them)"


def machine(client: redis.Redis, python: str) -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    node_bullmq = json.loads(
        (REPO / "scripts/bench_node/node_modules/bullmq/package.json").read_text()
    )["version"]
    ioredis = json.loads(
        (REPO / "scripts/bench_node/node_modules/ioredis/package.json").read_text()
    )["version"]

    # The versions the Python contenders run with: those of their interpreter, not the bench's.
    try:
        versions = json.loads(_cmd([python, "-c", _VERSIONS]))
    except ValueError:
        versions = {}

    def dist(name: str) -> str:
        return str(versions.get(name, "?"))

    commit = _cmd(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no", "runner"], cwd=REPO)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runner commit": commit + (" + uncommitted changes in runner/" if dirty else ""),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": f"{dist('python')} ({dist('executable')})",
        "node": _cmd(["node", "--version"]),
        "redis": redisctl.server_version(client),
        "python bullmq": dist("bullmq"),
        "redis-py": dist("redis"),
        "hiredis": dist("hiredis"),
        "aiohttp": dist("aiohttp"),
        "uvloop": dist("uvloop"),
        "msgspec": dist("msgspec"),
        "node bullmq": node_bullmq,
        "ioredis": ioredis,
        "load average at start": " ".join(open("/proc/loadavg").read().split()[:3]),
    }


def start_server(node: str, slow_ms: int, api_key: str) -> tuple[subprocess.Popen[str], int]:
    argv = [node, "server.mjs", "--port", "0", "--slow-ms", str(slow_ms)]
    if api_key:
        argv += ["--key", api_key]
    proc = subprocess.Popen(
        argv, cwd=REPO / "scripts/bench_node", stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "listening":
        proc.kill()
        raise SystemExit("bench: the API server did not start")
    return proc, int(line[1])


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.map_items:
        from bench_lib import map_loop

        return map_loop.report(args.map_items)
    python = (
        str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
    )
    if args.python:
        python = bench_python(args.python)
    log_dir = args.json.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    private = None
    if args.redis_url:
        redis_url = args.redis_url
    elif redisctl.PrivateRedis.available():
        private = redisctl.PrivateRedis()
        redis_url = private.start()
    else:
        say(
            "bench: no redis-server binary; using the shared Redis (counts include its other clients)"
        )
        redis_url = "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(redis_url)
    if args.flow:
        from bench_lib import flow

        try:
            return flow.run(REPO, python, redis_url, client, log_dir, args)
        finally:
            client.close()
            if private is not None:
                private.stop()
    api_key = secrets.token_hex(16) if args.auth == "api-key" else ""
    key_b64 = base64.b64encode(os.urandom(32)).decode() if args.auth == "api-key" else ""
    server, port = start_server("node", args.slow_ms, api_key)
    ctx = Ctx(
        repo=REPO,
        python=python,
        node="node",
        redis_url=redis_url,
        client=client,
        base_url=f"http://127.0.0.1:{port}",
        server_pid=server.pid,
        log_dir=log_dir,
        auth=args.auth,
        api_key=api_key,
        key_b64=key_b64,
        concurrency=args.concurrency,
    )
    try:
        if args.baseline:
            ctx.baseline_dir = baseline_worktree(args.baseline, args.json.parent / "baseline")
            ctx.baseline_python = bench_python(args.base_python) if args.base_python else python
        if args.profile:
            return run_profile(ctx, args)
        return run_bench(ctx, args, redis_url, private is not None)
    finally:
        if ctx.baseline_dir is not None:
            _git("worktree", "remove", "--force", str(ctx.baseline_dir))
        server.terminate()
        server.wait(10)
        client.close()
        if private is not None:
            private.stop()


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def baseline_worktree(rev: str, path: Path) -> Path:
    """A checkout of ``rev`` beside the repository (detached, removed after the bench)."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if path.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO)
    _git("worktree", "add", "--detach", "--force", str(path), commit)
    say(f"bench: runner-base is {rev} ({commit[:10]}) in {path}")
    return path


def _selected(args: argparse.Namespace) -> list[Contender]:
    contenders = all_contenders(args.processes, baseline=args.baseline)
    if args.only:
        unknown = set(args.only) - {c.name for c in contenders}
        if unknown:
            raise SystemExit(
                f"bench: unknown contenders {sorted(unknown)}; "
                f"known: {[c.name for c in contenders]}"
            )
        wanted = {*args.only, "runner-base"} if args.baseline else set(args.only)
        contenders = [c for c in contenders if c.name in wanted]
    return contenders


def run_bench(ctx: Ctx, args: argparse.Namespace, redis_url: str, private: bool) -> int:
    contenders = _selected(args)
    info = machine(ctx.client, ctx.python)
    info["runner build"] = build_of(ctx.runner_dir)
    info["redis used"] = "private redis-server started by the bench" if private else redis_url
    info["auth"] = "API_KEY (sealedCredentials)" if args.auth == "api-key" else "NONE"
    runs_of = {
        "w3": args.runs_w3,
        "w3-long": args.long_w3 or args.runs_w3,
        "w1": args.runs_w1,
        "empty": args.runs_empty,
    }
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    for rnd in range(args.rounds):
        # Rotate the order each round so that no contender always goes first (or last).
        shift = rnd % max(1, len(contenders))
        order = contenders[shift:] + contenders[:shift]
        for workload in args.workloads:
            # w3-long is W3 again, over more jobs: the same producer workload.
            kind = "w3" if workload == "w3-long" else workload
            for c in order:
                if kind not in c.workloads:
                    continue
                tag = f"r{rnd}" + ("-long" if workload == "w3-long" else "")
                try:
                    r = measure.throughput(
                        ctx,
                        c,
                        kind,
                        runs_of[workload],
                        tag,
                        pickup_samples=args.pickup_samples if workload == "w3" else 0,
                    )
                    r["workload"] = workload
                except Exception as err:
                    traceback.print_exc()
                    r = {"contender": c.name, "workload": workload, "error": str(err)}
                r["round"] = f"r{rnd}"
                results.append(r)
                if "error" in r:
                    say(f"[round {rnd + 1}] {workload} {c.name}: ERROR {r['error']}")
                else:
                    pick = (
                        f", pickup p50 {r['pickup_p50_ms']:.1f} ms" if "pickup_p50_ms" in r else ""
                    )
                    say(
                        f"[round {rnd + 1}/{args.rounds}] {workload} {c.name}: "
                        f"{r['runs_per_s']:,.0f}/s, {r['cpu_ms_per_run']:.2f} CPU ms, "
                        f"{r['redis_commands_per_run']:.1f} cmds, "
                        f"{r['redis_reads_per_run']:.1f} round trips, "
                        f"{r['rss_peak_mb']:.0f} MB{pick}"
                        + (f", {r['failed']} FAILED" if r["failed"] else "")
                    )
    in_flight_rows: list[dict[str, Any]] = []
    if args.in_flight:
        by_name = {c.name: c for c in all_contenders([1])}
        for name in args.in_flight_contenders:
            c = by_name[name]
            try:
                row = measure.in_flight(ctx, c, args.in_flight, "slow", slow_ms=args.slow_ms)
            except Exception as err:
                traceback.print_exc()
                row = {"contender": name, "error": str(err)}
            in_flight_rows.append(row)
            say(f"[in flight] {name}: {row}")
    info["load average at end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    info["bench wall time"] = f"{time.monotonic() - started:.0f} s"
    text = render(info, args, contenders, results, in_flight_rows)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": info,
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": results,
                "in_flight": in_flight_rows,
            },
            indent=2,
        )
    )
    args.json.with_suffix(".md").write_text(text + "\n")
    say(f"bench: results in {args.json} and {args.json.with_suffix('.md')}")
    return 1 if any("error" in r for r in results + in_flight_rows) else 0


def render(
    info: dict[str, str],
    args: argparse.Namespace,
    contenders: list[Contender],
    results: list[dict[str, Any]],
    in_flight_rows: list[dict[str, Any]],
) -> str:
    out = [f"## Benchmark, {info['date']}", ""]
    out.append(" · ".join(f"{k}: {v}" for k, v in info.items() if k != "date"))
    out += [
        "",
        f"Concurrency {args.concurrency} per process; {args.rounds} interleaved round(s); "
        f"W3 {args.runs_w3} runs, W1 {args.runs_w1} runs, empty {args.runs_empty} jobs per "
        f"measurement; pickup: {args.pickup_samples} samples per round at idle. "
        "Cells: median (min–max) over rounds.",
    ]
    titles = {
        "w3": "W3 (GET customer, POST ticket, GET ticket)",
        "w3-long": f"W3, the long run ({args.long_w3} runs per measurement)",
        "w1": "W1 (one GET)",
        "empty": "Empty job (queue overhead only)",
    }
    for workload in args.workloads:
        if any(r.get("workload") == workload for r in results):
            out += [
                "",
                f"### {titles[workload]}",
                "",
                report.throughput_table(results, contenders, workload),
            ]
    judged = args.rounds >= TARGET_ROUNDS and args.runs_w3 >= TARGET_RUNS_W3
    ratios = report.ratios_table(results, contenders, judged=judged)
    if ratios.count("\n") > 1:
        out += ["", "### The runner against each baseline (paired within a round)", "", ratios]
    notes = [n for n in (report.pickup_target(results),) if n]
    for c in ("runner", "node-fetch", "node-http"):
        line = report.command_breakdown(results, c, "w3")
        if line:
            notes.append("Redis commands per run, " + line)
    line = report.cores_busy(results, [c.name for c in contenders], "w3")
    if line:
        notes.append("Cores kept busy (runs/s × CPU per run), " + line)
    for c in ("runner", "node-fetch", "node-http"):
        line = report.redis_bytes(results, c, "w3")
        if line:
            notes.append("Redis bytes per run, " + line)
        line = report.syscalls(results, c, "w3")
        if line:
            notes.append("I/O system calls per run, " + line)
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    if in_flight_rows:
        out += [
            "",
            f"### {args.in_flight} runs in flight on an endpoint that answers after "
            f"{args.slow_ms} ms (concurrency {args.in_flight})",
            "",
            report.in_flight_table(in_flight_rows),
        ]
    errors = [r for r in results + in_flight_rows if "error" in r]
    if errors:
        out += ["", "Errors:"] + [
            f"- {r['contender']} {r.get('workload', '')}: {r['error']}" for r in errors
        ]
    return "\n".join(out)


def run_profile(ctx: Ctx, args: argparse.Namespace) -> int:
    runner = next(c for c in all_contenders([1]) if c.name == "runner")
    out_dir = args.json.parent
    workload = (args.workloads or ["w3"])[0] if args.workloads != ["w3", "w1", "empty"] else "w3"
    runs = args.runs_w3 if workload == "w3" else args.runs_w1

    def measured(**how: Any) -> dict[str, Any]:
        return measure.throughput(ctx, runner, workload, runs, "prof", **how)

    if args.profile == "py-spy":
        binary = profiling.py_spy_binary(ctx.python)
        if binary is None:
            raise SystemExit("bench: py-spy is not installed (pip install py-spy)")
        path = out_dir / f"profile-{workload}.collapsed"
        path.unlink(missing_ok=True)
        r = measured(on_window=profiling.py_spy_hook(binary, path))
        table = profiling.collapsed_top(path)
    elif args.profile == "callgrind":
        out = out_dir / f"profile-{workload}.callgrind"
        for old in out_dir.glob(out.name + "*"):
            old.unlink()
        r = measured(
            profile=[*profiling.callgrind_prefix(out), ctx.python],
            on_window=profiling.callgrind_hook(out),
        )
        path = profiling.callgrind_window(out)
        table = profiling.callgrind_top(path, runs)
    else:
        path = out_dir / f"profile-{workload}.pstats"
        path.unlink(missing_ok=True)
        r = measured(profile=[ctx.python, "-m", "cProfile", "-o", str(path)])
        table = profiling.cprofile_top(path)
    print(
        f"## Profile of the runner on {workload.upper()} ({args.profile}), {runs} runs: "
        f"{r['runs_per_s']:,.0f} runs/s under the profiler, {r['failed']} failed, "
        f"{r['cpu_ms_per_run']:.2f} CPU ms per run\n"
    )
    print(table)
    say(f"bench: raw profile in {path}")
    return 0
