"""The BullMQ boundary: a Python ``bullmq`` Worker configured so its known traps cannot bite.

FIELD-NOTES lists them; each has its answer here:
- redis-py's default 5 s socket timeout is below BullMQ's 10 s blocking read: idle workers
  picked jobs up late. The connection gets ``socket_timeout`` above the longest block.
- A ``CancelledError`` (or anything else) escaping the processor ends the worker's loop
  silently. The processor is wrapped: nothing but ``UnrecoverableError`` (a run that failed by
  its own logic) or a plain ``Exception`` (an infrastructure failure, which BullMQ may retry
  under the job's ``attempts``) leaves it.
- If the loop dies anyway, a watchdog notices ``worker.running`` went false while we were not
  closing, and the process exits non-zero so that its supervisor restarts it.
- Bull Board lists workers by client name ``{prefix}:{base64(queue)}:w:{name}`` and shows
  ``processedBy``, which the stock Python worker does not send: both are set as Node does.
- The stock worker completes a job and then asks for the next in a second round trip; Node's
  asks BullMQ's ``moveToFinished`` to hand over the next job in the same call. So does this one
  (``FetchNextWorker``), on the same Lua script.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
from bullmq import Worker
from bullmq.custom_errors import DelayedError, UnrecoverableError, WaitingChildrenError
from bullmq.timer import Timer
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from runner.log import log
from runner.queue.finish import FinishBatches, finish_in_batches
from runner.resp import RespConnection
from runner.settings import Settings

Handler = Callable[[Any, str], Awaitable[Any]]


def redis_options(url: str, socket_timeout_s: float) -> dict[str, Any]:
    """Connection options for BullMQ's clients (``redis.asyncio.Redis`` keywords) from a
    ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL. Query parameters pass through:
    ``rediss://host:6380/0?ssl_ca_certs=/etc/redis/ca.pem``."""
    opts: dict[str, Any] = dict(parse_url(url))
    # parse_url names a connection class, which Redis() does not take: say it its own way.
    kind = opts.pop("connection_class", None)
    if kind is not None and issubclass(kind, UnixDomainSocketConnection):
        opts["unix_socket_path"] = opts.pop("path")
    elif kind is not None and issubclass(kind, SSLConnection):
        opts["ssl"] = True
    opts["socket_timeout"] = socket_timeout_s
    opts["socket_connect_timeout"] = min(socket_timeout_s, 10.0)
    opts["socket_keepalive"] = True
    opts["health_check_interval"] = 15
    return opts


def queue_client_name(prefix: str, queue: str) -> str:
    """The client name Node BullMQ gives a queue's connections: the queue name in base64."""
    return f"{prefix}:{base64.b64encode(queue.encode()).decode()}"


def node_client_name(prefix: str, queue: str, worker_name: str) -> str:
    """The client name Node BullMQ gives a worker, which Bull Board's Workers tab looks for."""
    return f"{queue_client_name(prefix, queue)}:w:{worker_name}"


def _with_processed_by(worker: Worker, name: str) -> None:
    """Make ``moveToActive`` pass the worker's name, so the job hash gets ``processedBy``.

    The Lua script is BullMQ's own and already sets the field when ``opts.name`` is given;
    only the Python caller leaves it out.
    """
    scripts = worker.scripts

    async def move_to_active(token: str, opts: dict[str, Any]) -> list[Any]:
        keys = scripts.getKeys(
            [
                "wait",
                "active",
                "prioritized",
                "events",
                "stalled",
                "limiter",
                "delayed",
                "paused",
                "meta",
                "pc",
                "marker",
            ]
        )
        packed = msgpack.packb(
            {
                "token": token,
                "lockDuration": opts.get("lockDuration", 0),
                "limiter": opts.get("limiter"),
                "name": name,
            },
            use_bin_type=True,
        )
        args = [scripts.keys[""], round(time.time() * 1000), packed]
        result = await scripts.commands["moveToActive"](keys=keys, args=args)
        from bullmq.scripts import raw2NextJobData

        return raw2NextJobData(result)  # type: ignore[no-any-return]

    scripts.moveToActive = move_to_active


class FetchNextWorker(Worker):  # type: ignore[misc]
    """``Worker`` whose completion fetches the next job in the same ``moveToFinished`` call.

    The slot (a job's task) goes straight on with the job it received, with the same lock
    token, as Node's worker does; when the queue is empty, closing or paused, the slot ends and
    the loop's ordinary fetch takes over.
    """

    running: bool

    async def run(self) -> None:
        """The stock loop, rewritten for many slots. The stock one starts a fetch for every free
        slot at once and then waits on all slots with ``asyncio.wait``, which re-registers a
        callback on every one of them each time any finishes: with 5,000 slots a ramp-up did
        some 12 million registrations, and an idle worker with 50 slots answered each new job
        with some 49 empty ``moveToActive`` calls. Here one fetch runs at a time (it waits on
        the queue's marker when the queue is empty), each job gets a task, and a finished task
        frees its slot through its done-callback."""
        if self.running:
            raise RuntimeError("Worker is already running")
        await self._ensure_client_names()
        self.lockManager.start()
        self.stalledCheckTimer = Timer(
            self.opts.get("stalledInterval") / 1000, self.runStalledJobsCheck, self.emit
        )
        self.running = True
        concurrency = int(self.opts.get("concurrency") or 1)
        slot_freed = asyncio.Event()

        def free_slot(task: asyncio.Task[None]) -> None:
            self.processing.discard(task)
            slot_freed.set()

        fetch_options = {"delay_in_ms": self.opts.get("runRetryDelay"), "only_emit_error": True}
        serial = 0
        try:
            while not self.closing:
                if self.paused:
                    await self.resume_event.wait()
                    continue
                if len(self.processing) >= concurrency:
                    slot_freed.clear()
                    await slot_freed.wait()
                    continue
                serial += 1
                token = f"{self.id}:{serial}"
                job = await self.retryIfFailed(
                    functools.partial(self.getNextJob, token), fetch_options
                )
                if job is not None:
                    task = asyncio.ensure_future(self.processJob(job, job.token))
                    self.processing.add(task)
                    task.add_done_callback(free_slot)
        finally:
            # As the stock loop: release the lock renewal and the stalled check however the
            # loop ends; on close, ``close()`` itself waits for the jobs in ``processing``.
            self.running = False
            if not self.closing:
                for task in self.processing:
                    task.cancel()
                if self.waiting and not self.waiting.done():
                    self.waiting.cancel()
                if self.processing:
                    await asyncio.gather(*self.processing, return_exceptions=True)
                self.processing.clear()
            if self.stalledCheckTimer is not None:
                with contextlib.suppress(Exception):
                    self.stalledCheckTimer.stop()
            await self.lockManager.close()

    async def getNextJob(self, token: str) -> Any:
        if self.closing or self.paused:
            return None
        return await super().getNextJob(token)

    async def processJob(self, job: Any, token: str) -> None:
        while job is not None:
            job = await self._process_one(job, token)

    async def _process_one(self, job: Any, token: str) -> Any:
        """The stock ``processJob`` with ``fetch_next`` on success; returns the next job."""
        next_job = None
        try:
            if "removeOnComplete" not in job.opts and "removeOnComplete" in self.opts:
                job.opts["removeOnComplete"] = self.opts["removeOnComplete"]
            if "removeOnFail" not in job.opts and "removeOnFail" in self.opts:
                job.opts["removeOnFail"] = self.opts["removeOnFail"]
            self.jobs.add((job, token))
            self.lockManager.track_job(
                job.id, token, int(time.time() * 1000), should_create_controller=False
            )
            if job.deferredFailure:
                await job.moveToFailed(UnrecoverableError(job.deferredFailure), token)
                self.emit("failed", job, UnrecoverableError(job.deferredFailure))
                return None
            result = await self.processor(job, token)
            if not self.forceClosing:
                fetch = not (self.closing or self.paused)
                moved = await self.backend.moveToCompleted(
                    job, result, job.opts.get("removeOnComplete", False), token, fetch_next=fetch
                )
                job.returnvalue = result
                job.attemptsMade = job.attemptsMade + 1
                raw = moved.get("result") if isinstance(moved, dict) else None
                if fetch and raw and raw[0]:
                    # [job data, id, limit until, delay until]; the last two may be absent
                    # (None) when the script hands a job over.
                    data, job_id, limit_until, delay_until = raw
                    next_job = await self.nextJobFromJobData(
                        data, job_id, limit_until or 0, delay_until or 0, token
                    )
            self.emit("completed", job, result)
        except (DelayedError, WaitingChildrenError):
            return None
        except Exception as err:
            try:
                if not self.forceClosing:
                    await job.moveToFailed(err, token)
                self.emit("failed", job, err)
            except Exception as inner:
                self.emit("error", inner, job)
        finally:
            self.jobs.discard((job, token))
            self.lockManager.untrack_job(job.id)
        if next_job is not None:
            self.emit("active", next_job, "waiting")
        return next_job


def _name_in_finished_opts(worker: Worker, name: str) -> None:
    """``moveToFinished`` sets ``processedBy`` on the job it hands over when ``opts.name`` is
    given; the Python caller leaves it out, so add it to the packed options."""
    scripts = worker.scripts
    build_args = scripts.moveToFinishedArgs
    entry = msgpack.packb("name") + msgpack.packb(name, use_bin_type=True)

    def with_name(*args: Any, **kwargs: Any) -> Any:
        keys, argv = build_args(*args, **kwargs)
        argv[7] = _with_map_entry(argv[7], entry)
        return keys, argv

    scripts.moveToFinishedArgs = with_name


def _with_map_entry(packed: bytes, entry: bytes) -> bytes:
    """A msgpack map with one more key-value pair (``entry``, packed) appended: its header's
    count goes up by one. Once per job, so done on the bytes rather than by unpacking."""
    head = packed[0]
    if 0x80 <= head < 0x8F:  # fixmap of up to 14 entries
        return bytes((head + 1,)) + packed[1:] + entry
    if head == 0xDE and packed[1:3] != b"\xff\xff":  # map16
        count = int.from_bytes(packed[1:3], "big") + 1
        return b"\xde" + count.to_bytes(2, "big") + packed[3:] + entry
    unpacked = msgpack.unpackb(packed, raw=False)
    unpacked.update(msgpack.unpackb(b"\x81" + entry, raw=False))
    return msgpack.packb(unpacked, use_bin_type=True)  # type: ignore[no-any-return]


def _name_only_the_blocking_connection(worker: Worker, base_name: str) -> None:
    """One entry per process in Bull Board's worker list, as with Node: the worker's name goes
    on its blocking connection; the command connection gets the queue's base name."""
    backend = worker.backend

    async def set_name(name: str) -> None:
        await backend.connection.set_client_name(base_name)
        if backend.blocking_connection is not None:
            await backend.blocking_connection.set_client_name(name)

    backend.setName = set_name


class QueueWorker:
    """Owns the bullmq Worker: start, the wrapped processor, the watchdog, a clean stop."""

    def __init__(self, settings: Settings, handler: Handler) -> None:
        self.settings = settings
        self.handler = handler
        self.name = settings.name
        self.worker: Worker | None = None
        self.closing = False
        self.loop_died = asyncio.Event()
        self._run_task: asyncio.Task[Any] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # Completions go out in batches on a connection of their own (runner.queue.finish),
        # decoded as bullmq's client decodes.
        self._finish_connection = RespConnection(
            settings.redis_url, timeout_s=settings.redis_socket_timeout_s, decode=True
        )

    def build(self) -> Worker:
        s = self.settings
        worker = FetchNextWorker(
            s.queue,
            self._process,
            {
                "connection": redis_options(s.redis_url, s.redis_socket_timeout_s),
                "prefix": s.queue_prefix,
                "concurrency": s.concurrency,
                "autorun": False,
                "name": self.name,
                "lockDuration": s.lock_duration_ms,
                "stalledInterval": s.stalled_interval_ms,
                "maxStalledCount": s.max_stalled_count,
                "runRetryDelay": 1000,
            },
        )
        worker.clientName = node_client_name(s.queue_prefix, s.queue, self.name)
        _with_processed_by(worker, self.name)
        _name_in_finished_opts(worker, self.name)
        self.finishes = FinishBatches(
            self._finish_connection, worker.scripts.commands["moveToFinished"].script
        )
        finish_in_batches(worker, self.finishes)
        _name_only_the_blocking_connection(worker, queue_client_name(s.queue_prefix, s.queue))
        worker.on("error", self._on_error)
        self.worker = worker
        return worker

    async def start(self) -> None:
        worker = self.worker or self.build()
        self._run_task = asyncio.ensure_future(worker.run())
        self._watchdog = asyncio.ensure_future(self._watch())

    @property
    def alive(self) -> bool:
        return self.worker is not None and bool(self.worker.running) and not self.loop_died.is_set()

    async def _watch(self) -> None:
        assert self.worker is not None
        while not self.closing:
            await asyncio.sleep(0.5)
            task = self._run_task
            died = task is not None and task.done()
            if (died or not self.worker.running) and not self.closing:
                # One grace tick: run() sets running=True only after its first await.
                await asyncio.sleep(0.5)
                if self.closing or (self.worker.running and not (task and task.done())):
                    continue
                log.error("worker.loop_died", detail="the BullMQ worker loop stopped")
                self.loop_died.set()
                return

    async def _process(self, job: Any, token: str) -> Any:
        try:
            return await self.handler(job, token)
        except UnrecoverableError:
            # A run that failed by its own logic: the reason says it all, and a Python
            # traceback of the runner's internals would only bury it in Bull Board.
            job.updateStacktrace = lambda: None
            raise
        except DelayedError:
            raise
        except asyncio.CancelledError:
            # Never let a cancellation reach the worker loop: it would end it silently.
            raise RuntimeError("INTERNAL: the run was interrupted") from None
        except Exception as err:
            log.error("job.internal_error", jobId=job.id, error=type(err).__name__)
            raise RuntimeError(f"INTERNAL: {type(err).__name__}") from None

    def _on_error(self, err: Any, *args: Any) -> None:
        log.warning("worker.error", error=type(err).__name__, detail=str(err)[:300])

    async def close(
        self, grace_s: float, on_grace_expired: Callable[[], int] | None = None
    ) -> None:
        """Take no new jobs; let runs in flight finish within ``grace_s``. Past it, ask the
        runs to hand themselves back to the queue (``on_grace_expired``) so they continue on
        another worker at once instead of waiting for the stalled check; force only what
        still does not stop."""
        self.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        worker = self.worker
        if worker is None:
            return
        closing = asyncio.ensure_future(worker.close())
        done, _ = await asyncio.wait({closing}, timeout=grace_s)
        if not done and on_grace_expired is not None:
            count = on_grace_expired()
            log.warning("worker.grace_expired", graceS=grace_s, handedBack=count)
            done, _ = await asyncio.wait({closing}, timeout=10)
        if not done:
            log.warning("worker.force_close", inFlight=len(worker.jobs))
            await worker.close(force=True)
            closing.cancel()
        if self._run_task is not None:
            await asyncio.wait({self._run_task}, timeout=5)
        self._finish_connection.close()
