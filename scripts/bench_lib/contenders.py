"""The contenders and how each one's processes start.

Each contender runs in its own processes, one contender at a time, against the same Redis and
the same HTTP server. Queue contenders consume a pre-filled BullMQ queue; the raw loop has no
queue at all (it is the HTTP ceiling of Python).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis

Kind = Literal["queue", "raw"]


@dataclass(frozen=True)
class Contender:
    name: str
    title: str
    kind: Kind
    workloads: tuple[str, ...]
    processes: int = 1
    http: bool = True  # does it call the API (so pickup latency can be measured)?


@dataclass
class Ctx:
    """What every measurement needs: tools, endpoints, auth, where logs go."""

    repo: Path
    python: str
    node: str
    redis_url: str
    client: redis.Redis
    base_url: str
    server_pid: int
    log_dir: Path
    prefix: str = "bull"
    auth: str = "none"
    api_key: str = ""
    key_b64: str = ""
    concurrency: int = 50
    extra_env: dict[str, str] = field(default_factory=dict)
    # The tree the runner contenders run from: the repository, or with --compiled the one
    # scripts/compile built.
    compiled_dir: Path | None = None
    # The checkout the runner-base contender runs from (--baseline).
    baseline_dir: Path | None = None
    baseline_python: str = ""

    @property
    def runner_dir(self) -> Path:
        return self.compiled_dir or self.repo

    @property
    def node_dir(self) -> Path:
        return self.repo / "scripts" / "bench_node"


def all_contenders(runner_processes: list[int], baseline: str | None = None) -> list[Contender]:
    out = [
        Contender(
            "runner" if n == 1 else f"runner-x{n}",
            "runner (`python -m runner`)" if n == 1 else f"runner, {n} processes",
            "queue",
            ("w3", "w1"),
            processes=n,
        )
        for n in runner_processes
    ]
    if baseline:
        out.append(Contender("runner-base", f"runner at `{baseline}`", "queue", ("w3", "w1")))
    out += [
        Contender("node-fetch", "Node BullMQ worker, `fetch`", "queue", ("w3", "w1")),
        Contender("node-http", "Node BullMQ worker, `node:http`", "queue", ("w3", "w1")),
        Contender("aiohttp-raw", "raw aiohttp loop, HTTP only (ceiling)", "raw", ("w3", "w1")),
    ]
    if importlib.util.find_spec("uvloop") is not None:
        out.append(Contender("aiohttp-uvloop", "raw aiohttp loop on uvloop", "raw", ("w3", "w1")))
    out += [
        Contender(
            "py-empty", "stock Python bullmq Worker, empty job", "queue", ("empty",), http=False
        ),
        Contender("node-empty", "Node BullMQ Worker, empty job", "queue", ("empty",), http=False),
    ]
    return out


def _base_env() -> dict[str, str]:
    # A RUNNER_* variable of the caller's shell (say RUNNER_MONGODB_URL) must not change the run.
    return {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}


def launch(
    ctx: Ctx,
    contender: Contender,
    queue: str,
    *,
    concurrency: int | None = None,
    profile: list[str] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start a queue contender's processes (stdout and stderr to the log directory)."""
    conc = str(concurrency or ctx.concurrency)
    procs = []
    for i in range(contender.processes):
        env = _base_env()
        cwd = ctx.runner_dir if contender.name.startswith("runner") else ctx.repo
        if contender.name == "runner-base":
            assert ctx.baseline_dir is not None
            cwd = ctx.baseline_dir  # python -m runner imports the package from its cwd
        if contender.name.startswith("runner"):
            env.update(
                RUNNER_REDIS_URL=ctx.redis_url,
                RUNNER_QUEUE=queue,
                RUNNER_QUEUE_PREFIX=ctx.prefix,
                RUNNER_CONCURRENCY=conc,
                RUNNER_EGRESS_ALLOW="127.0.0.0/8",
                RUNNER_LOG_LEVEL="warning",
                RUNNER_WORKER_NAME=f"bench-{contender.name}-{i}",
            )
            if ctx.key_b64:
                env["RUNNER_CREDENTIALS_KEY"] = ctx.key_b64
            python = ctx.baseline_python if contender.name == "runner-base" else ctx.python
            argv = [*(profile or [python]), "-m", "runner"]
        elif contender.name == "py-empty":
            env.update(REDIS_URL=ctx.redis_url, QUEUE=queue, PREFIX=ctx.prefix, CONCURRENCY=conc)
            env["PYTHONPATH"] = str(ctx.repo / "scripts")
            argv = [ctx.python, "-m", "bench_lib.py_empty_worker"]
        else:
            script = "worker-fetch.mjs" if contender.name == "node-fetch" else "worker-http.mjs"
            env.update(REDIS_URL=ctx.redis_url, QUEUE=queue, PREFIX=ctx.prefix, CONCURRENCY=conc)
            if ctx.key_b64:
                env["CREDENTIALS_KEY"] = ctx.key_b64
            argv = [ctx.node, script]
            cwd = ctx.node_dir
        env.update(ctx.extra_env)
        log = open(ctx.log_dir / f"{contender.name}-{i}.log", "ab")
        procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def launch_raw(ctx: Ctx, contender: Contender, workload: str, runs: int) -> subprocess.Popen[str]:
    env = _base_env()
    env["PYTHONPATH"] = str(ctx.repo / "scripts")
    argv = [
        ctx.python,
        "-m",
        "bench_lib.raw_loop",
        "--base-url",
        ctx.base_url,
        "--workload",
        workload,
        "--runs",
        str(runs),
        "--concurrency",
        str(ctx.concurrency),
    ]
    if ctx.auth == "api-key":
        argv += ["--api-key", ctx.api_key]
    if contender.name == "aiohttp-uvloop":
        argv.append("--uvloop")
    return subprocess.Popen(
        argv, cwd=ctx.repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def producer(ctx: Ctx, command: str, queue: str, workload: str, **options: str | int) -> str:
    """Run the Node producer (``scripts/bench_node/producer.mjs``); its stdout."""
    argv = [
        ctx.node,
        "producer.mjs",
        command,
        "--redis",
        ctx.redis_url,
        "--prefix",
        ctx.prefix,
        "--queue",
        queue,
        "--workload",
        workload,
        "--base-url",
        ctx.base_url,
        "--auth",
        ctx.auth,
    ]
    if ctx.auth == "api-key":
        argv += ["--api-key", ctx.api_key, "--key-b64", ctx.key_b64]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, cwd=ctx.node_dir, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"producer {command} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout
