"""``FetchNextWorker``: bullmq's Python Worker with Node's fetch-next and a loop for many slots.

- The stock worker completes a job and then asks for the next in a second round trip; Node's
  asks BullMQ's ``moveToFinished`` to hand over the next job in the same call. So does this one,
  on the same Lua script.
- The stock loop waits on every slot with ``asyncio.wait`` (quadratic in the slots) and starts a
  fetch for every free slot at once; this loop fetches one job at a time and frees a slot when
  its task ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

from bullmq import Worker
from bullmq.custom_errors import DelayedError, UnrecoverableError, WaitingChildrenError
from bullmq.timer import Timer


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
            if not self.closing:
                await self.lockManager.close()
            # On close the locks of the jobs still running stay renewed until they end:
            # ``close()`` closes the lock manager once ``processing`` is empty (or at once when
            # forced). The stock loop closed it here, as soon as the loop stopped taking jobs,
            # so a run past the lock's duration in the shutdown grace lost its lock: another
            # worker's stalled check could run it a second time, and the hand-back's
            # ``moveToDelayed`` (then ``retryJob``) failed with "Missing lock" (issue 21).

    async def nextJobFromJobData(
        self,
        job_data: dict[str, Any] | None = None,
        job_id: str | None = None,
        limit_until: int = 0,
        delay_until: int = 0,
        token: str | None = None,
    ) -> Any:
        """The stock job, with its data left the JSON text Redis holds: the runner decodes it
        straight into its own types (``RunService.decode``), where bullmq's ``json.loads``, the
        size check's encoding and a conversion took three times as long (22 against 8 µs for
        a W3 job); and data that is not JSON fails its job as ``INVALID_PAYLOAD`` instead of
        failing the fetch. A job scheduler's iteration keeps bullmq's parsed data, which it
        sends back to its scheduler."""
        text = None
        if job_data and not job_data.get("rjk") and isinstance(job_data.get("data"), str):
            text, job_data["data"] = job_data["data"], "{}"
        job = await super().nextJobFromJobData(job_data, job_id, limit_until, delay_until, token)
        if job is not None and text is not None:
            job.data = text
        return job

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
