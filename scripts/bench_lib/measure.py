"""One measurement each: a throughput window, pickup latency at idle, many runs in flight.

Throughput (queue contenders): the queue is filled with N jobs before the contender starts; the
window runs from the first job leaving ``wait`` to the last one completed or failed, found by
polling Redis (every ``POLL_S``; the polls' own commands are taken out of the counts). At both
ends: CPU time of the contender's process tree and of the HTTP server, and a Redis ``INFO``
snapshot. Peak RSS is the tree's VmHWM when the window ends.

Pickup latency: with the contender idle (blocked in its wait for a job), the producer adds one
job, waits until it finished, pauses 30-80 ms and repeats; the latency is from just before the
``add`` to the first request arriving at the HTTP server (both stamped with CLOCK_MONOTONIC).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from bench_lib import procstat, redisctl
from bench_lib.contenders import Contender, Ctx, launch, launch_raw, producer

POLL_S = 0.005
START_POLL_S = 0.002
START_TIMEOUT_S = 60.0


class MeasurementError(RuntimeError):
    pass


def _get_json(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def stop(procs: list[subprocess.Popen[Any]], timeout_s: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _alive(procs: list[subprocess.Popen[Any]], ctx: Ctx, name: str) -> None:
    for p in procs:
        if p.poll() is not None:
            raise MeasurementError(
                f"{name} exited with {p.returncode} (see {ctx.log_dir}/{name}-*.log)"
            )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def queue_name(contender: Contender, workload: str, tag: str) -> str:
    return f"bench-{os.getpid()}-{contender.name}-{workload}-{tag}"


def throughput(
    ctx: Ctx,
    contender: Contender,
    workload: str,
    runs: int,
    tag: str,
    *,
    pickup_samples: int = 0,
    profile: list[str] | None = None,
    on_window: Callable[[list[int]], Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """One throughput window. ``on_window(pids)`` is called when it opens (after the first
    pick) and returns what to call when it closes (profilers attach this way)."""
    if contender.kind == "raw":
        return _raw(ctx, contender, workload, runs)
    queue = queue_name(contender, workload, tag)
    client = ctx.client
    base = f"{ctx.prefix}:{queue}"
    wait_key, done_key, failed_key = f"{base}:wait", f"{base}:completed", f"{base}:failed"
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] | None = None
    try:
        producer(ctx, "fill", queue, workload, count=runs, id_prefix=f"run_{tag}_")
        procs = launch(ctx, contender, queue, profile=profile)
        deadline = time.monotonic() + START_TIMEOUT_S
        while int(client.llen(wait_key)) >= runs:
            if time.monotonic() > deadline:
                raise MeasurementError(f"{contender.name} took no job in {START_TIMEOUT_S} s")
            _alive(procs, ctx, contender.name)
            time.sleep(START_POLL_S)
        t0 = time.monotonic()
        pids = procstat.tree(p.pid for p in procs)
        closing = on_window(pids) if on_window is not None else None
        cpu0, srv0 = procstat.cpu_s(pids), procstat.cpu_s([ctx.server_pid])
        io0 = procstat.io_syscalls(pids)
        snap0 = redisctl.snapshot(client)
        polls = 0
        window_deadline = t0 + max(120.0, runs / 20)
        while True:
            time.sleep(POLL_S)
            pipe = client.pipeline(transaction=False)
            pipe.zcard(done_key)
            pipe.zcard(failed_key)
            done, failed = (int(v) for v in pipe.execute())
            polls += 1
            if done + failed >= runs:
                break
            if time.monotonic() > window_deadline:
                raise MeasurementError(
                    f"{contender.name}: {done + failed}/{runs} after the deadline"
                )
            if polls % 200 == 0:
                _alive(procs, ctx, contender.name)
        t1 = time.monotonic()
        pids = procstat.tree(p.pid for p in procs)
        if closing is not None:
            closing()
        cpu1, srv1 = procstat.cpu_s(pids), procstat.cpu_s([ctx.server_pid])
        io1 = procstat.io_syscalls(pids)
        snap1 = redisctl.snapshot(client)
        hwm_kb = [procstat.status_kb(pid, "VmHWM") for pid in pids]
        elapsed_s = t1 - t0
        commands = snap1.commands - snap0.commands - redisctl.SNAPSHOT_COMMANDS - 2 * polls
        reads = snap1.reads - snap0.reads - redisctl.SNAPSHOT_READS - polls
        by_command = {
            k: v - snap0.by_command.get(k, 0)
            for k, v in snap1.by_command.items()
            if v - snap0.by_command.get(k, 0) > 0
        }
        by_command["info"] = by_command.get("info", 0) - redisctl.SNAPSHOT_COMMANDS
        by_command["zcard"] = by_command.get("zcard", 0) - 2 * polls
        result = {
            "contender": contender.name,
            "workload": workload,
            "runs": runs,
            "failed": failed,
            "elapsed_s": elapsed_s,
            "runs_per_s": runs / elapsed_s,
            "cpu_ms_per_run": 1000 * (cpu1 - cpu0) / runs,
            "server_cpu_ms_per_run": 1000 * (srv1 - srv0) / runs,
            "redis_cpu_ms_per_run": 1000 * (snap1.cpu_s - snap0.cpu_s) / runs,
            "redis_commands_per_run": commands / runs,
            "redis_reads_per_run": reads / runs,
            # The bench's own polls are in these (two ZCARDs each, about 80 bytes in and 10 out).
            "read_syscalls_per_run": (io1[0] - io0[0]) / runs,
            "write_syscalls_per_run": (io1[1] - io0[1]) / runs,
            "redis_bytes_in_per_run": (snap1.net_in - snap0.net_in) / runs,
            "redis_bytes_out_per_run": (snap1.net_out - snap0.net_out) / runs,
            "redis_commands_by_name_per_run": {
                k: round(v / runs, 3) for k, v in sorted(by_command.items()) if v > 0
            },
            "rss_peak_mb": max(hwm_kb, default=0) / 1024,
            "rss_peak_sum_mb": sum(hwm_kb) / 1024,
            "processes": contender.processes,
        }
        if pickup_samples and contender.http:
            result.update(pickup(ctx, queue, workload, pickup_samples, tag))
        return result
    finally:
        stop(procs)
        if result is not None:
            result["max_loop_lag_ms"] = max_loop_lag_ms(ctx, contender)
        redisctl.delete_queue_keys(ctx.client, ctx.prefix, queue)


def max_loop_lag_ms(ctx: Ctx, contender: Contender) -> float | None:
    """The worst event-loop lag the contender's processes logged when they stopped (the
    runner's ``runner.stopped`` line, ``maxLoopLagMs``); None for contenders that do not."""
    worst: float | None = None
    for log_path in ctx.log_dir.glob(f"{contender.name}-*.log"):
        last: float | None = None
        for line in log_path.read_text(errors="replace").splitlines():
            if '"runner.stopped"' in line and "maxLoopLagMs" in line:
                try:
                    last = float(json.loads(line)["maxLoopLagMs"])
                except (ValueError, KeyError, TypeError):
                    continue
        if last is not None:
            worst = last if worst is None else max(worst, last)
    return worst


def pickup(ctx: Ctx, queue: str, workload: str, samples: int, tag: str) -> dict[str, Any]:
    _get_json(f"{ctx.base_url}/__arrivals")  # forget earlier arrivals
    out = json.loads(producer(ctx, "pickup", queue, workload, samples=samples, tag=tag))
    arrivals = _get_json(f"{ctx.base_url}/__arrivals")
    latencies_ms = [
        (int(arrivals[k]) - int(t0)) / 1e6 for k, t0 in out["t0"].items() if k in arrivals
    ]
    if not latencies_ms:
        return {"pickup_samples": 0, "pickup_failed": out["failed"]}
    return {
        "pickup_samples": len(latencies_ms),
        "pickup_failed": out["failed"],
        "pickup_p50_ms": percentile(latencies_ms, 50),
        "pickup_p99_ms": percentile(latencies_ms, 99),
        "pickup_max_ms": max(latencies_ms),
    }


def _raw(ctx: Ctx, contender: Contender, workload: str, runs: int) -> dict[str, Any]:
    proc = launch_raw(ctx, contender, workload, runs)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise MeasurementError(f"{contender.name} did not start")
        pids = procstat.tree([proc.pid])
        cpu0, srv0 = procstat.cpu_s(pids), procstat.cpu_s([ctx.server_pid])
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        cpu1, srv1 = procstat.cpu_s(pids), procstat.cpu_s([ctx.server_pid])
        hwm_kb = [procstat.status_kb(pid, "VmHWM") for pid in pids]
        out = json.loads(line)
        return {
            "contender": contender.name,
            "workload": workload,
            "runs": runs,
            "failed": out["failed"],
            "elapsed_s": out["elapsed_s"],
            "runs_per_s": runs / out["elapsed_s"],
            "cpu_ms_per_run": 1000 * (cpu1 - cpu0) / runs,
            "server_cpu_ms_per_run": 1000 * (srv1 - srv0) / runs,
            "redis_commands_per_run": 0.0,
            "redis_reads_per_run": 0.0,
            "rss_peak_mb": max(hwm_kb, default=0) / 1024,
            "processes": 1,
        }
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def in_flight(
    ctx: Ctx,
    contender: Contender,
    runs: int,
    tag: str,
    *,
    slow_ms: int,
    ramp_limit_s: float = 90.0,
    sample_s: float = 0.25,
) -> dict[str, Any]:
    """``runs`` slow runs at once (concurrency = runs): RSS while they are all in flight.

    The server holds every slow request until all ``runs`` are in flight, then answers them
    ``slow_ms`` later, so the contender's pickup rate decides how long the ramp takes, not
    whether the peak is reached. A ramp that has not got there within ``ramp_limit_s`` is
    released where it stands, and the peak it reached is what is reported."""
    queue = queue_name(contender, "slow", tag)
    base = f"{ctx.prefix}:{queue}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        producer(ctx, "fill", queue, "slow", count=runs, id_prefix=f"slow_{tag}_")
        _get_json(f"{ctx.base_url}/__stats", method="POST")
        _get_json(f"{ctx.base_url}/__slow?barrier={runs}&ms={slow_ms}", method="POST")
        started = time.monotonic()
        procs = launch(ctx, contender, queue, concurrency=runs)
        all_in_flight_s: float | None = None
        released_s: float | None = None
        peak_in_flight = 0
        rss_at_peak_kb = 0
        ramp: list[tuple[float, int]] = []
        deadline = started + START_TIMEOUT_S + ramp_limit_s + slow_ms / 1000 + 120
        while True:
            time.sleep(sample_s)
            now = time.monotonic() - started
            stats = _get_json(f"{ctx.base_url}/__stats")
            in_flight_now = int(stats["inFlight"])
            pids = procstat.tree(p.pid for p in procs)
            rss_kb = sum(procstat.status_kb(pid, "VmRSS") for pid in pids)
            if in_flight_now >= peak_in_flight:
                peak_in_flight = in_flight_now
                rss_at_peak_kb = max(rss_at_peak_kb, rss_kb)
            if not ramp or now - ramp[-1][0] >= 5:
                ramp.append((round(now, 1), in_flight_now))
            if in_flight_now >= runs and all_in_flight_s is None:
                all_in_flight_s = now
            if all_in_flight_s is None and released_s is None and now > ramp_limit_s:
                _get_json(f"{ctx.base_url}/__slow?release=1", method="POST")
                released_s = now
            pipe = ctx.client.pipeline(transaction=False)
            pipe.zcard(f"{base}:completed")
            pipe.zcard(f"{base}:failed")
            done, failed = (int(v) for v in pipe.execute())
            if done + failed >= runs:
                break
            if time.monotonic() > deadline:
                break
            _alive(procs, ctx, contender.name)
        pids = procstat.tree(p.pid for p in procs)
        hwm_kb = sum(procstat.status_kb(pid, "VmHWM") for pid in pids)
        return {
            "contender": contender.name,
            "runs": runs,
            "done": done,
            "failed": failed,
            "peak_in_flight": peak_in_flight,
            "all_in_flight_after_s": all_in_flight_s,
            "released_after_s": released_s,
            "ramp": ramp,
            "rss_peak_mb": hwm_kb / 1024,
            "rss_all_in_flight_mb": rss_at_peak_kb / 1024,
            "total_s": time.monotonic() - started,
        }
    finally:
        stop(procs)
        _get_json(f"{ctx.base_url}/__slow?barrier=0", method="POST")
        redisctl.delete_queue_keys(ctx.client, ctx.prefix, queue)
