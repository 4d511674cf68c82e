"""Jobs completed in batches: BullMQ's own ``moveToFinished`` script, by SHA, on the runner's
raw connection, the completions of concurrent runs in one round trip.

Through bullmq's client each completion was a round trip of its own through redis-py (its
connection lock, a timeout per read, response callbacks). Here the keys and arguments are still
built by bullmq (``moveToFinishedArgs``), the script is still BullMQ's, and its reply (the next
job, when it hands one over) reaches bullmq decoded as its own client would give it. Only the
way there changes: pipelined with the other completions that are ready at the same moment.

Through a connection failure a batch is sent again for up to ``outage_s``, as bullmq's own
client retries its commands. A completion that had already run the first time then finds the
job no longer active and fails with bullmq's "Missing lock" error, which the worker logs; the
job stays completed.
"""

from __future__ import annotations

from typing import Any

import msgspec
from bullmq.scripts import raw2NextJobData

from runner.resp import Batches, Command, ReplyError, RespConnection, Script, load_missing_scripts

_encode_json = msgspec.json.Encoder().encode


class ScriptError(Exception):
    """Redis refused the script call (the reply's text)."""


class FinishBatches:
    def __init__(self, connection: RespConnection, script: str, *, outage_s: float = 30.0) -> None:
        self.connection = connection
        self.script = Script(script)
        self._batches: Batches[Command] = Batches(self._execute, name="finish", outage_s=outage_s)

    @property
    def sent(self) -> int:
        """Round trips made so far."""
        return self._batches.sent

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        """The script's reply for these keys and arguments."""
        return await self._batches.submit(self.script.call(keys, args))

    async def _execute(self, commands: list[Command]) -> list[Any]:
        replies = await self.connection.execute(commands)
        replies = await load_missing_scripts(self.connection, (self.script,), commands, replies)
        return [ScriptError(str(r)) if isinstance(r, ReplyError) else r for r in replies]


def finish_in_batches(worker: Any, batches: FinishBatches) -> None:
    """Send ``worker``'s completions (and failures) through ``batches``, with the same result
    handling as bullmq's own ``Scripts.moveToFinished``; a completion's return value is
    encoded by msgspec."""
    scripts = worker.scripts
    build_args = scripts.moveToFinishedArgs

    def returnvalue_by_msgspec(
        job: Any, val: Any, prop: str, *args: Any, **kwargs: Any
    ) -> tuple[list[Any], list[Any]]:
        """bullmq encodes a return value with ``json.dumps`` and a new encoder each call, 2%
        of the instructions of a W3 run; the same JSON from msgspec (UTF-8 where ``json.dumps``
        escapes to ASCII) costs a twentieth of that. ``args[3]`` is the encoded value, as the
        Node worker's ``moveToFinishedArgs`` has it too."""
        if prop != "returnvalue":
            return build_args(job, val, prop, *args, **kwargs)  # type: ignore[no-any-return]
        keys, argv = build_args(job, None, prop, *args, **kwargs)
        argv[3] = _encode_json(val)
        return keys, argv

    scripts.moveToFinishedArgs = returnvalue_by_msgspec

    async def move_to_finished(job_id: str, keys: list[str], args: list[Any]) -> Any:
        result = await batches.call(keys, args)
        if result is None:
            return None
        if isinstance(result, int) and result < 0:
            raise scripts.finishedErrors(
                {"code": result, "jobId": job_id, "command": "moveToFinished", "state": "active"}
            )
        return raw2NextJobData(result)

    scripts.moveToFinished = move_to_finished
