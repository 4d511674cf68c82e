"""``Store`` over Redis: each gate's calls go through ``Batches`` on one ``RespConnection`` of
their own, so the calls of every run in flight share round trips (``runner.resp``)."""

from __future__ import annotations

from typing import Any

from runner.engine.ports import Grant
from runner.flow.limits import Acquire, GateKeys, Settle, acquire_args, grant_of, settle_args
from runner.flow.scripts import ACQUIRE, PAUSED, SCRIPTS, SETTLE
from runner.resp import Batches, Command, Executor, ReplyError, load_missing_scripts


class RedisStore:
    def __init__(self, connection: Executor, *, outage_s: float = 10.0) -> None:
        self.connection = connection
        self.batches: Batches[Command] = Batches(self._execute, name="flow", outage_s=outage_s)

    async def _execute(self, commands: list[Command]) -> list[Any]:
        replies = await self.connection.execute(commands)
        replies = await load_missing_scripts(self.connection, SCRIPTS, commands, replies)
        return [
            RuntimeError(f"flow script: {r}") if isinstance(r, ReplyError) else r for r in replies
        ]

    async def acquire(self, ask: Acquire) -> Grant:
        reply = await self.batches.submit(ACQUIRE.call(ask.keys.all(), acquire_args(ask)))
        return grant_of(reply, ask.lease_id)

    async def settle(self, outcome: Settle) -> None:
        await self.batches.submit(SETTLE.call(outcome.keys.all(), settle_args(outcome)))

    async def paused_ms(self, keys: GateKeys, tenant_scoped: bool) -> int:
        call = PAUSED.call(keys.all(), [0, 1 if tenant_scoped else 0])
        return int(await self.batches.submit(call))
