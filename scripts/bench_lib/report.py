"""Medians, ranges and ratios of the measurements, as Markdown."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench_lib.contenders import Contender

TARGETS_RUNS_PER_S = {"node-fetch": 1.5, "node-http": 1.0}
TARGET_PICKUP_P50_MS = 5.0
TARGET_IN_FLIGHT_RSS_MB = 300.0


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def spread(values: list[float]) -> str:
    """``median (min-max)``, or the one value."""
    if not values:
        return "—"
    mid = statistics.median(values)
    if len(values) == 1:
        return _fmt(mid)
    return f"{_fmt(mid)} ({_fmt(min(values))}–{_fmt(max(values))})"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _group(results: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if "error" not in r:
            groups[(r["workload"], r["contender"])].append(r)
    return groups


def throughput_table(
    results: list[dict[str, Any]], contenders: list[Contender], workload: str
) -> str:
    groups = _group(results)
    unit = "jobs" if workload == "empty" else "runs"
    lines = [
        f"| contender | {unit}/s | CPU ms per {unit[:-1]} | Redis commands per {unit[:-1]} "
        f"| Redis round trips per {unit[:-1]} | pickup p50 / p99 ms | peak RSS MB "
        f"| API server CPU ms per {unit[:-1]} | max loop lag ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        rows = groups.get((workload, c.name))
        if not rows:
            continue
        redis = c.kind == "queue"
        p50, p99 = median(_values(rows, "pickup_p50_ms")), median(_values(rows, "pickup_p99_ms"))
        pickup = f"{p50:.1f} / {p99:.1f}" if p50 is not None and p99 is not None else "—"
        failed = sum(int(r.get("failed", 0)) for r in rows)
        title = c.title + (f" ⚠ {failed} failed" if failed else "")
        rss_key = "rss_peak_sum_mb" if c.processes > 1 else "rss_peak_mb"
        lines.append(
            f"| {title} | {spread(_values(rows, 'runs_per_s'))} "
            f"| {spread(_values(rows, 'cpu_ms_per_run'))} "
            f"| {spread(_values(rows, 'redis_commands_per_run')) if redis else '—'} "
            f"| {spread(_values(rows, 'redis_reads_per_run')) if redis else '—'} "
            f"| {pickup} | {spread(_values(rows, rss_key))} "
            f"| {spread(_values(rows, 'server_cpu_ms_per_run')) if c.http else '—'} "
            f"| {spread(_values(rows, 'max_loop_lag_ms'))} |"
        )
    return "\n".join(lines)


def _paired(results: list[dict[str, Any]], workload: str, a: str, b: str, key: str) -> list[float]:
    """a/b of ``key`` within each round (the rounds interleave the contenders)."""
    by_round: dict[str, dict[str, float]] = defaultdict(dict)
    for r in results:
        if "error" not in r and r["workload"] == workload and r["contender"] in (a, b):
            by_round[r["round"]][r["contender"]] = float(r[key])
    return [v[a] / v[b] for v in by_round.values() if a in v and b in v and v[b] > 0]


def ratios_table(
    results: list[dict[str, Any]], contenders: list[Contender], *, judged: bool = True
) -> str:
    """``judged``: whether the measurement is the size the targets are set at (2 rounds or more
    of 2,000 W3 runs); a shorter one flatters the runner, the Node workers' JIT still warming."""
    names = {c.name for c in contenders}
    runners = [c.name for c in contenders if c.name.startswith("runner")]
    baselines = [
        n for n in ("node-fetch", "node-http", "aiohttp-raw", "aiohttp-uvloop") if n in names
    ]
    lines = [
        "| workload | runner | against | runs/s ratio | CPU-per-run ratio | target (runs/s) |",
        "|---|---|---|---|---|---|",
    ]
    for workload in ("w3", "w3-long", "w1"):
        for runner in runners:
            others = baselines + [r for r in runners if r != runner and runner != "runner"]
            if runner == "runner" and "runner-base" in names:
                others.append("runner-base")
            for base in others:
                rps = _paired(results, workload, runner, base, "runs_per_s")
                cpu = _paired(results, workload, runner, base, "cpu_ms_per_run")
                if not rps:
                    continue
                target = ""
                if workload.startswith("w3") and runner == "runner" and base in TARGETS_RUNS_PER_S:
                    goal = TARGETS_RUNS_PER_S[base]
                    ok = statistics.median(rps) >= goal
                    target = f"≥ {goal}x: {'met' if ok else 'not met'}"
                    if not judged:
                        target = f"≥ {goal}x: not judged (a short run)"
                lines.append(
                    f"| {workload.upper()} | {runner} | {base} | {spread(rps)}x "
                    f"| {spread(cpu)}x | {target} |"
                )
    return "\n".join(lines)


def in_flight_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| contender | runs in flight (peak seen by the API) | all in flight after s "
        "| RSS at the peak in flight, MB | peak RSS MB | finished / failed | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} | error: {r['error']} | | | | | |")
            continue
        after = r["all_in_flight_after_s"]
        target = ""
        if r["contender"] == "runner" and r["runs"] < 5000:
            target = "(the target is set at 5,000)"
        elif r["contender"] == "runner":
            ok = r["rss_peak_mb"] <= TARGET_IN_FLIGHT_RSS_MB and r["peak_in_flight"] >= r["runs"]
            if r["peak_in_flight"] < r["runs"]:
                target = "not reached: the ramp stalled"
            if not target:
                target = f"≤ {TARGET_IN_FLIGHT_RSS_MB:.0f} MB: {'met' if ok else 'not met'}"
        never = "not within the ramp limit" if after is None else f"{after:.1f}"
        lines.append(
            f"| {r['contender']} | {r['peak_in_flight']} of {r['runs']} | {never} "
            f"| {r['rss_all_in_flight_mb']:.0f} | {r['rss_peak_mb']:.0f} "
            f"| {r['done']} / {r['failed']} | {target} |"
        )
    return "\n".join(lines)


def pickup_target(results: list[dict[str, Any]]) -> str | None:
    p50 = median(_values([r for r in results if r.get("contender") == "runner"], "pickup_p50_ms"))
    if p50 is None:
        return None
    ok = p50 <= TARGET_PICKUP_P50_MS
    return (
        f"runner pickup p50 at idle {p50:.1f} ms: target ≤ {TARGET_PICKUP_P50_MS:.0f} ms "
        f"{'met' if ok else 'not met'}"
    )


def command_breakdown(results: list[dict[str, Any]], contender: str, workload: str) -> str:
    rows = [
        r
        for r in results
        if r.get("contender") == contender
        and r.get("workload") == workload
        and "redis_commands_by_name_per_run" in r
    ]
    if not rows:
        return ""
    last = rows[-1]["redis_commands_by_name_per_run"]
    parts = [f"{k} {v:g}" for k, v in sorted(last.items(), key=lambda kv: -kv[1])]
    return f"{contender} {workload.upper()}: " + ", ".join(parts)


def _median_pair(
    results: list[dict[str, Any]], contender: str, workload: str, keys: tuple[str, str]
) -> tuple[float, float] | None:
    """The medians over rounds of two per-run fields of a contender on a workload."""
    rows = [
        r
        for r in results
        if r.get("contender") == contender and r.get("workload") == workload and keys[0] in r
    ]
    first, second = (median(_values(rows, key)) for key in keys)
    return None if first is None or second is None else (first, second)


def redis_bytes(results: list[dict[str, Any]], contender: str, workload: str) -> str:
    """Bytes to and from Redis per run, median over rounds."""
    pair = _median_pair(
        results, contender, workload, ("redis_bytes_in_per_run", "redis_bytes_out_per_run")
    )
    if pair is None:
        return ""
    return f"{contender} {workload.upper()}: {pair[0]:,.0f} sent, {pair[1]:,.0f} received"


def syscalls(results: list[dict[str, Any]], contender: str, workload: str) -> str:
    """Read and write system calls of the contender's processes per run, median over rounds."""
    pair = _median_pair(
        results, contender, workload, ("read_syscalls_per_run", "write_syscalls_per_run")
    )
    if pair is None:
        return ""
    return f"{contender} {workload.upper()}: {pair[0]:.1f} reads, {pair[1]:.1f} writes"


def cores_busy(results: list[dict[str, Any]], contenders: list[str], workload: str) -> str:
    """How much of the machine each contender kept busy (runs/s times CPU per run), median over
    rounds: a one-thread Python process tops out at 1.0, a Node worker's helper threads (its
    garbage collector, its compiler) take it past that. With the CPU per run, this is what a
    runs/s ratio is made of."""
    parts = []
    for contender in contenders:
        busy = [
            float(r["runs_per_s"]) * float(r["cpu_ms_per_run"]) / 1000
            for r in results
            if r.get("contender") == contender
            and r.get("workload") == workload
            and r.get("runs_per_s") is not None
            and r.get("cpu_ms_per_run") is not None
        ]
        if busy:
            parts.append(f"{contender} {statistics.median(busy):.2f}")
    return f"{workload.upper()}: " + ", ".join(parts) if parts else ""
