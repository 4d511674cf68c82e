"""The Redis the benchmark talks to, and what it counts there.

By default the bench starts its own ``redis-server`` on a spare port (no persistence) so that
``INFO`` counts only the contenders' traffic: the shared Redis at 6379 also serves other
people's tests, which would land in every per-run count. ``--redis-url`` uses another Redis;
then every key is under a queue name unique to the measurement and is deleted afterwards
(``SCAN`` + ``UNLINK``, never a flush).

Counts, as deltas over a measurement window:
- commands: ``total_commands_processed``, which includes the commands a Lua script runs inside
  (one BullMQ ``EVALSHA`` counts 1 + its inner calls), as ``INFO commandstats`` does;
- reads: ``total_reads_processed``, socket reads the server served: one per client round trip
  (a pipeline, or commands that arrive together, count once);
- CPU: ``used_cpu_user`` + ``used_cpu_sys`` of the server;
- bytes: ``total_net_input_bytes`` and ``total_net_output_bytes``, what clients sent and were
  sent (on loopback a client's write pays for the server's side of TCP too, so the bytes a
  contender writes show in its own CPU).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import redis


@dataclass
class Snapshot:
    commands: int
    reads: int
    cpu_s: float
    net_in: int = 0
    net_out: int = 0
    by_command: dict[str, int] = field(default_factory=dict)


def snapshot(client: redis.Redis) -> Snapshot:
    pipe = client.pipeline(transaction=False)
    pipe.info("stats")
    pipe.info("cpu")
    pipe.info("commandstats")
    stats, cpu, cmdstats = pipe.execute()
    return Snapshot(
        commands=int(stats["total_commands_processed"]),
        reads=int(stats["total_reads_processed"]),
        cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        net_in=int(stats["total_net_input_bytes"]),
        net_out=int(stats["total_net_output_bytes"]),
        by_command={k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmdstats.items()},
    )


# What one ``snapshot`` adds to the counts it is subtracted from: 3 INFO commands, 1 read.
SNAPSHOT_COMMANDS = 3
SNAPSHOT_READS = 1


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A throwaway ``redis-server`` for one bench run."""

    def __init__(self) -> None:
        self.port = spare_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self) -> str:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                f"{self.dir}/redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the private redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        return url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def delete_queue_keys(client: redis.Redis, prefix: str, queue: str) -> int:
    """Delete every key of one queue (BullMQ's and the runner's all live under it)."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}:{queue}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


def server_version(client: redis.Redis) -> str:
    info: dict[str, Any] = client.info("server")
    return str(info.get("redis_version", "?"))
