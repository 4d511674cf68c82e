"""The stock Python ``bullmq`` Worker with an empty processor: the queue's own cost per job.

Env: REDIS_URL, QUEUE, PREFIX (bull), CONCURRENCY (50). Runs until SIGTERM. The connection
gets ``socket_timeout`` 30 s: redis-py's 5 s default is below BullMQ's 10 s blocking read,
which makes idle pickup late.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any
from urllib.parse import urlparse

from bullmq import Worker


async def process(job: Any, token: str) -> None:
    return None


async def main() -> None:
    url = urlparse(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    connection = {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 6379,
        "db": int((url.path or "/0").lstrip("/") or 0),
        "socket_timeout": 30,
    }
    worker = Worker(
        os.environ.get("QUEUE", "bench"),
        process,
        {
            "connection": connection,
            "prefix": os.environ.get("PREFIX", "bull"),
            "concurrency": int(os.environ.get("CONCURRENCY", "50")),
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await worker.close()


if __name__ == "__main__":
    asyncio.run(main())
