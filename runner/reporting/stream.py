"""Status writes in Redis, batched across runs, and their in-memory twin.

A run reports each transition as one ``Transition``: its status event with the checkpoint
fields that go with it, the BullMQ job progress, and ``job.log`` lines. ``RedisStatusSink``
writes the transitions of all concurrent runs that arrive while the previous batch is in
flight in one ``MULTI``/``EXEC`` on its own connection (``runner.resp``), together
with the reads of runs about to start (their checkpoint and cancel key):

- ``XADD`` the event to the status stream (``MAXLEN ~``);
- ``HSET`` the event's ``seq`` (and a finished step's result) on the run's checkpoint hash
  (whose expiry starts over with each delivery's first write), in the same transaction as the
  event, so a resumed run never reuses a ``seq`` and never misses a finished step;
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
from dataclasses import dataclass, field
from typing import Any

from bullmq.redis_connection import loadScript

from runner.log import log
from runner.queue.keys import Keys
from runner.resp import (
    Batches,
    Command,
    Executor,
    ReplyError,
    Script,
    bulk,
    load_missing_scripts,
    packed_head,
)

_UPDATE_PROGRESS = Script(loadScript("updateProgress-3.lua"))
_ADD_LOG = Script(loadScript("addLog-2.lua"))


class Transition:
    """Everything one step or run transition writes, as one unit."""

    __slots__ = (
        "checkpoint",
        "event",
        "forget",
        "job_id",
        "keep_logs",
        "log_lines",
        "progress",
        "renew",
        "run_id",
        "seq",
    )

    def __init__(
        self,
        run_id: str,
        job_id: str,
        event: bytes | None = None,
        seq: int | None = None,
        checkpoint: dict[str, bytes] | None = None,
        progress: bytes | None = None,  # JSON
        log_lines: tuple[str, ...] = (),
        keep_logs: int = 0,
        # Start the checkpoint's retention over (the run's first write of each delivery).
        renew: bool = False,
        # Checkpoint fields to delete, after the fields above are set (a paginated step's pages
        # once the step has finished).
        forget: tuple[str, ...] = (),
    ) -> None:
        self.run_id = run_id
        self.job_id = job_id
        self.event = event
        self.seq = seq
        self.checkpoint = checkpoint
        self.progress = progress
        self.log_lines = log_lines
        self.keep_logs = keep_logs
        self.renew = renew
        self.forget = forget

    def __repr__(self) -> str:
        return f"Transition(run_id={self.run_id!r}, job_id={self.job_id!r}, seq={self.seq!r})"


class RedisStatusSink:
    """Writes transitions, and reads the state runs start from, in batches over one
    ``RespConnection``: everything that arrives while a batch is in flight rides the next."""

    def __init__(
        self,
        connection: Executor,
        *,
        stream: str,
        keys: Keys,
        maxlen: int = 100_000,
        retention_s: int = 7 * 86_400,
        outage_s: float = 120.0,
    ) -> None:
        self.connection = connection
        self.stream = stream
        self.keys = keys
        self.maxlen = maxlen
        self.retention_s = retention_s
        self._batches: Batches[Transition | _StateRead] = Batches(
            self._execute, name="status", outage_s=outage_s
        )
        # Every command a transition writes is packed here from heads packed once: this
        # sink's XADD, and each run's HSET and script calls (``_RunHeads``).
        self._xadd = packed_head(8, b"XADD", stream, b"MAXLEN", b"~", maxlen, b"*", b"event")
        self._heads: dict[tuple[str, str, int], _RunHeads] = {}
        # What the heads of every run share, packed here once: a run's own adds its keys and
        # job id as bulk strings (a run's heads took 7.8 µs packed whole).
        self._progress_start = packed_head(8, b"EVALSHA", _UPDATE_PROGRESS.sha, 3)
        self._events_meta = bulk(keys.events().encode()) + bulk(keys.meta().encode())
        self._log_start = packed_head(8, b"EVALSHA", _ADD_LOG.sha, 2)

    def write(self, *transitions: Transition) -> asyncio.Future[None]:
        """Write the transitions, in order, in one transaction: await the returned future."""
        return self._batches.submit(*transitions)

    async def run_state(self, run_id: str) -> RunState:
        """What a run needs before it starts: its checkpoint hash and the reason of a cancel
        requested before it started (CONTRACT §8), if any; read in the next batch."""
        state: RunState = await self._batches.submit(_StateRead(run_id))
        return state

    async def _execute(self, batch: list[Transition | _StateRead]) -> list[Any]:
        commands: list[Command] = []
        reads: list[int] = []
        for t in batch:
            if isinstance(t, _StateRead):
                reads.append(len(commands))
                commands.append((b"HGETALL", self.keys.run(t.run_id)))
                commands.append((b"GET", self.keys.cancel(t.run_id)))
                continue
            heads = self._heads.get((t.run_id, t.job_id, t.keep_logs)) or self._new_heads(t)
            # Each command is its packed head and its last arguments as bulk strings
            # (``b"$<length>\r\n<bytes>\r\n"``), formatted in place: a call per argument
            # would cost what packing the whole command takes.
            if t.event is not None:
                event = t.event
                commands.append(b"%s$%d\r\n%s\r\n" % (self._xadd, len(event), event))
                commands.append(heads.hset(t.seq or 0, t.checkpoint))
                if t.renew:
                    # Once per delivery: a delivery lasts minutes, the retention days.
                    commands.append((b"EXPIRE", heads.run_key, self.retention_s))
            elif t.checkpoint:
                # Checkpoint fields without an event (where deferred steps resume, a
                # paginated step's pages).
                fields = [part for item in t.checkpoint.items() for part in item]
                commands.append((b"HSET", heads.run_key, *fields))
            if t.forget:
                commands.append((b"HDEL", heads.run_key, *t.forget))
            if t.progress is not None:
                progress = t.progress
                commands.append(b"%s$%d\r\n%s\r\n" % (heads.progress, len(progress), progress))
            for line in t.log_lines:
                # "replace": a lone surrogate (JSON allows one) must not fail the whole batch.
                text = line.encode("utf-8", "replace")
                commands.append(b"%s$%d\r\n%s\r\n%s" % (heads.log, len(text), text, heads.keep))
        replies = await self.connection.execute(commands, transaction=True)
        if any(isinstance(r, ReplyError) for r in replies):
            # The events went in with the first transaction; only script calls can miss.
            replies = await load_missing_scripts(
                self.connection, (_UPDATE_PROGRESS, _ADD_LOG), commands, replies
            )
            errors = [r for r in replies if isinstance(r, ReplyError)]
            if errors:
                log.warning("status.command_error", error=str(errors[0])[:200], count=len(errors))
        results: list[Any] = []
        read = iter(reads)
        at = next(read, -1)
        for t in batch:
            if isinstance(t, _StateRead):
                results.append(_run_state(replies[at], replies[at + 1]))
                at = next(read, -1)
            else:
                results.append(None)
        return results

    def _new_heads(self, t: Transition) -> _RunHeads:
        if len(self._heads) >= _HEADS_KEPT:
            self._heads.clear()  # a cache: the runs still going make theirs again
        keys = self.keys
        run_key = keys.run(t.run_id)
        job_key, job_id = bulk(keys.job(t.job_id).encode()), bulk(t.job_id.encode())
        heads = _RunHeads(
            run_key=run_key,
            hset_head=_HSET + bulk(run_key.encode()) + _SEQ,
            progress=self._progress_start + job_key + self._events_meta + job_id,
            log=self._log_start + job_key + bulk(keys.job_logs(t.job_id).encode()) + job_id,
            keep=bulk(b"%d" % t.keep_logs if t.keep_logs else b""),
        )
        self._heads[t.run_id, t.job_id, t.keep_logs] = heads
        return heads


# Enough for the runs of a busy process (each a few hundred bytes), few enough to stay small.
_HEADS_KEPT = 8192
_HSET, _SEQ = bulk(b"HSET"), bulk(b"seq")


class _RunHeads:
    """What every transition of one run writes the same, packed once per run (not changed
    after; a plain class for the reason ``Transition`` is one)."""

    __slots__ = ("hset_head", "keep", "log", "progress", "run_key")

    def __init__(
        self, *, run_key: str, hset_head: bytes, progress: bytes, log: bytes, keep: bytes
    ) -> None:
        self.run_key = run_key
        self.hset_head = hset_head  # HSET {run key} seq, without the array's count
        self.progress = progress  # updateProgress by SHA up to its last argument, the JSON
        self.log = log  # addLog by SHA up to the line
        self.keep = keep  # addLog's last argument: how many lines BullMQ keeps ("": all)

    def hset(self, seq: int, checkpoint: dict[str, bytes] | None) -> bytes:
        """``HSET`` of the event's ``seq`` and the checkpoint fields that go with it."""
        number = b"%d" % seq
        if not checkpoint:
            return b"*4\r\n%s$%d\r\n%s\r\n" % (self.hset_head, len(number), number)
        fields = [bulk(number)]
        for name, value in checkpoint.items():
            fields += (bulk(name.encode()), bulk(value))
        return b"*%d\r\n%s%s" % (3 + len(fields), self.hset_head, b"".join(fields))


class _StateRead:
    __slots__ = ("run_id",)

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id


RunState = tuple[dict[bytes, bytes], str | None]


def _run_state(checkpoint: Any, cancel: Any) -> RunState:
    for reply in (checkpoint, cancel):
        if isinstance(reply, ReplyError):
            raise RuntimeError(f"the run's state could not be read: {reply}")
    fields = dict(zip(checkpoint[::2], checkpoint[1::2], strict=True))
    reason = None
    if cancel is not None:
        reason = cancel.decode("utf-8", "replace") or "canceled"
    return fields, reason


@dataclass
class MemoryStatusSink:
    """In-memory twin: ``events`` in write order, ``runs`` as the checkpoint hashes,
    ``progress`` and ``logs`` per job as BullMQ would keep them."""

    events: list[bytes] = field(default_factory=list)
    runs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    progress: dict[str, list[bytes]] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    cancels: dict[str, str] = field(default_factory=dict)

    async def run_state(self, run_id: str) -> RunState:
        checkpoint = {k.encode(): v for k, v in self.runs.get(run_id, {}).items()}
        reason = self.cancels.get(run_id)
        return checkpoint, (reason or "canceled") if reason is not None else None

    def write(self, *transitions: Transition) -> asyncio.Future[None]:
        for t in transitions:
            self._write(t)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def _write(self, t: Transition) -> None:
        if t.event is not None:
            self.events.append(t.event)
            run = self.runs.setdefault(t.run_id, {})
            run["seq"] = str(t.seq).encode()
            if t.checkpoint:
                run.update(t.checkpoint)
        elif t.checkpoint:
            self.runs.setdefault(t.run_id, {}).update(t.checkpoint)
        for name in t.forget:
            self.runs.get(t.run_id, {}).pop(name, None)
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
