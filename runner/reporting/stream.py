"""The status stream and the run checkpoint in Redis, and their in-memory twin.

One ``MULTI``/``EXEC`` per event: ``XADD`` the event (``MAXLEN ~``), record the event's ``seq``
on the run's checkpoint hash with the finished step's result if there is one, and renew the
hash's expiry. Through a Redis outage the transaction is sent again until it succeeds or the
outage outlasts ``outage_s``; a repeat after an ambiguous failure carries the same ``seq``, so
the consumer (which applies only higher ``seq``) ignores it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runner.log import log
from runner.queue.keys import Keys


class RedisStatusSink:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream: str,
        keys: Keys,
        maxlen: int = 100_000,
        retention_s: int = 7 * 86_400,
        outage_s: float = 120.0,
    ) -> None:
        self.client = client
        self.stream = stream
        self.keys = keys
        self.maxlen = maxlen
        self.retention_s = retention_s
        self.outage_s = outage_s

    async def publish(
        self, run_id: str, event: bytes, seq: int, checkpoint: dict[str, bytes] | None
    ) -> None:
        run_key = self.keys.run(run_id)
        deadline = time.monotonic() + self.outage_s
        delay_s = 0.05
        while True:
            try:
                pipe = self.client.pipeline(transaction=True)
                pipe.xadd(self.stream, {"event": event}, maxlen=self.maxlen, approximate=True)
                mapping: dict[str, bytes | str] = {"seq": str(seq)}
                if checkpoint:
                    mapping.update(checkpoint)
                pipe.hset(run_key, mapping=mapping)  # type: ignore[arg-type]
                pipe.expire(run_key, self.retention_s)
                await pipe.execute()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                if time.monotonic() > deadline:
                    raise
                log.warning("status.retry", runId=run_id, seq=seq, error=type(err).__name__)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)


@dataclass
class MemoryStatusSink:
    """In-memory twin: ``events`` in publish order, ``runs`` as the checkpoint hashes."""

    events: list[bytes] = field(default_factory=list)
    runs: dict[str, dict[str, bytes]] = field(default_factory=dict)

    async def publish(
        self, run_id: str, event: bytes, seq: int, checkpoint: dict[str, bytes] | None
    ) -> None:
        self.events.append(event)
        run = self.runs.setdefault(run_id, {})
        run["seq"] = str(seq).encode()
        if checkpoint:
            run.update(checkpoint)


async def load_checkpoint(client: aioredis.Redis, keys: Keys, run_id: str) -> dict[bytes, bytes]:
    raw: Any = await client.hgetall(keys.run(run_id))
    return dict(raw)
