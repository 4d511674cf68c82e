"""Status writes in Redis, batched across runs, and their in-memory twin.

A run reports each transition as one ``Transition``: its status event with the checkpoint
fields that go with it, the BullMQ job progress, and ``job.log`` lines. ``RedisStatusSink``
writes the transitions of all concurrent runs that arrive while the previous batch is in
flight in one ``MULTI``/``EXEC`` pipeline:

- ``XADD`` the event to the status stream (``MAXLEN ~``);
- ``HSET`` the event's ``seq`` (and a finished step's result) on the run's checkpoint hash and
  renew its expiry, in the same transaction as the event, so a resumed run never reuses a
  ``seq`` and never misses a finished step;
- BullMQ's own ``updateProgress`` and ``addLog`` Lua scripts (by SHA) for progress and logs, so
  Node's ``QueueEvents`` and Bull Board see exactly what a Node worker would write.

Each writer awaits its batch: a transition is in Redis before the step it reports goes on.
Through a Redis outage a batch is sent again until it succeeds or the outage outlasts
``outage_s``; a repeat after an ambiguous failure carries the same ``seq``, so the consumer
(which applies only higher ``seq``) ignores it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from bullmq.redis_connection import loadScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from runner.log import log
from runner.queue.keys import Keys

_UPDATE_PROGRESS = loadScript("updateProgress-3.lua")
_ADD_LOG = loadScript("addLog-2.lua")


@dataclass(slots=True)
class Transition:
    """Everything one step or run transition writes, as one unit."""

    run_id: str
    job_id: str
    event: bytes | None = None
    seq: int | None = None
    checkpoint: dict[str, bytes] | None = None
    progress: bytes | None = None  # JSON
    log_lines: tuple[str, ...] = ()
    keep_logs: int = 0


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
        self._pending: list[tuple[Transition, asyncio.Future[None]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._progress_sha = ""
        self._log_sha = ""
        self.batches = 0

    async def write(self, transition: Transition) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((transition, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        await future

    async def _drain(self) -> None:
        # One batch in flight at a time: what arrives meanwhile rides the next one.
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._send([t for t, _ in batch])
            except BaseException as err:
                for _, future in batch:
                    if not future.done():
                        failure = err if isinstance(err, Exception) else RuntimeError("cancelled")
                        future.set_exception(failure)
                if not isinstance(err, Exception):
                    raise
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _send(self, batch: list[Transition]) -> None:
        deadline = time.monotonic() + self.outage_s
        delay_s = 0.05
        while True:
            try:
                await self._execute(batch)
                self.batches += 1
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                if time.monotonic() > deadline:
                    raise
                log.warning("status.retry", transitions=len(batch), error=type(err).__name__)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    async def _ensure_scripts(self) -> None:
        if not self._progress_sha:
            self._progress_sha = await self.client.script_load(_UPDATE_PROGRESS)
            self._log_sha = await self.client.script_load(_ADD_LOG)

    async def _execute(self, batch: list[Transition]) -> None:
        await self._ensure_scripts()
        pipe = self.client.pipeline(transaction=True)
        scripted: list[tuple[int, str, list[Any]]] = []
        index = 0
        events_key, meta_key = self.keys.events(), self.keys.meta()
        for t in batch:
            if t.event is not None:
                run_key = self.keys.run(t.run_id)
                mapping: dict[str, bytes | str] = {"seq": str(t.seq)}
                if t.checkpoint:
                    mapping.update(t.checkpoint)
                pipe.xadd(self.stream, {"event": t.event}, maxlen=self.maxlen, approximate=True)
                pipe.hset(run_key, mapping=mapping)  # type: ignore[arg-type]
                index += 2
                if t.checkpoint:
                    # Renewed with each checkpoint write (the run's start, each finished step),
                    # which is often enough for a retention counted in days.
                    pipe.expire(run_key, self.retention_s)
                    index += 1
            job_key = self.keys.job(t.job_id)
            if t.progress is not None:
                args: list[Any] = [job_key, events_key, meta_key, t.job_id, t.progress]
                pipe.evalsha(self._progress_sha, 3, *args)
                scripted.append((index, "progress", args))
                index += 1
            for line in t.log_lines:
                keep = str(t.keep_logs) if t.keep_logs else ""
                args = [job_key, self.keys.job_logs(t.job_id), t.job_id, line, keep]
                pipe.evalsha(self._log_sha, 2, *args)
                scripted.append((index, "log", args))
                index += 1
        results = await pipe.execute(raise_on_error=False)
        await self._repair(results, scripted)

    async def _repair(self, results: list[Any], scripted: list[tuple[int, str, list[Any]]]) -> None:
        """Scripts vanish when Redis restarts without persistence of its script cache: load
        them again and send only the script calls that missed (the events were written)."""
        missed = [(kind, args) for i, kind, args in scripted if _is_noscript(results[i])]
        errors = [r for r in results if isinstance(r, Exception) and not _is_noscript(r)]
        if errors:
            log.warning("status.command_error", error=str(errors[0])[:200], count=len(errors))
        if not missed:
            return
        self._progress_sha = self._log_sha = ""
        await self._ensure_scripts()
        pipe = self.client.pipeline(transaction=True)
        for kind, args in missed:
            if kind == "progress":
                pipe.evalsha(self._progress_sha, 3, *args)
            else:
                pipe.evalsha(self._log_sha, 2, *args)
        await pipe.execute(raise_on_error=False)


def _is_noscript(result: Any) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and "NOSCRIPT" in str(result)
    )


@dataclass
class MemoryStatusSink:
    """In-memory twin: ``events`` in write order, ``runs`` as the checkpoint hashes,
    ``progress`` and ``logs`` per job as BullMQ would keep them."""

    events: list[bytes] = field(default_factory=list)
    runs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    progress: dict[str, list[bytes]] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)

    async def write(self, transition: Transition) -> None:
        t = transition
        if t.event is not None:
            self.events.append(t.event)
            run = self.runs.setdefault(t.run_id, {})
            run["seq"] = str(t.seq).encode()
            if t.checkpoint:
                run.update(t.checkpoint)
        if t.progress is not None:
            self.progress.setdefault(t.job_id, []).append(t.progress)
        if t.log_lines:
            self.logs.setdefault(t.job_id, []).extend(t.log_lines)

    def job(self, job_id: str) -> JobView:
        """What BullMQ's job would hold: its progress values and ``job.log`` lines."""
        return JobView(self, job_id)


@dataclass(frozen=True)
class JobView:
    sink: MemoryStatusSink
    job_id: str

    @property
    def progress_values(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.sink.progress.get(self.job_id, [])]

    @property
    def lines(self) -> list[str]:
        return list(self.sink.logs.get(self.job_id, []))


async def load_run_state(
    client: aioredis.Redis, keys: Keys, run_id: str
) -> tuple[dict[bytes, bytes], str | None]:
    """What a run needs before it starts, in one round trip: its checkpoint hash and the reason
    of a cancel requested before it started (CONTRACT §8), if any."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.run(run_id))
    pipe.get(keys.cancel(run_id))
    checkpoint, cancel = await pipe.execute()
    reason = None
    if cancel is not None:
        reason = cancel.decode("utf-8", "replace") if isinstance(cancel, bytes) else str(cancel)
        reason = reason or "canceled"
    return dict(checkpoint), reason
