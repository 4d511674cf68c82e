"""Where a run's definition comes from, compiled once per WorkflowVersion and cached.

In order (CONTRACT §3): ``workflowVersion`` inline in the job data, else the control plane's
``GET /runner/v1/workflow-versions/{id}``. Versions are immutable, so compiled plans are kept
by ``workflowVersionId`` in a bounded LRU, and concurrent first runs of a version share one
fetch: a thousand runs of a version fetch it once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from runner.contract import JobData, decode_workflow_version
from runner.controlplane import ControlPlane
from runner.engine.plan import Plan, compile_plan
from runner.errors import DefinitionError


class DefinitionStore:
    def __init__(self, control_plane: ControlPlane | None, *, cache_size: int = 1000) -> None:
        self.control_plane = control_plane
        self.cache_size = max(1, cache_size)
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Plan]] = {}
        self.fetches = 0

    async def plan_for(self, job: JobData) -> Plan:
        version_id = job.workflow_version_id
        plan = self._plans.get(version_id)
        if plan is not None:
            self._plans.move_to_end(version_id)
            return plan
        if job.workflow_version is not None:
            return self._remember(
                version_id, _compile(job.workflow_version, version_id, "$.workflowVersion")
            )
        inflight = self._inflight.get(version_id)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[Plan] = asyncio.get_running_loop().create_future()
        self._inflight[version_id] = future
        try:
            plan = self._remember(version_id, await self._fetch(version_id, job.tenant_id))
            future.set_result(plan)
            return plan
        except BaseException as err:
            # Waiters see the same error; the next run tries again (errors are not cached).
            future.set_exception(err)
            future.exception()  # mark retrieved so an unawaited future does not warn
            raise
        finally:
            del self._inflight[version_id]
            # A raised error's traceback holds this frame: without this, frame -> future ->
            # error -> traceback -> frame would be a cycle that outlives the run.
            del future

    async def _fetch(self, version_id: str, tenant_id: str) -> Plan:
        if self.control_plane is None:
            raise DefinitionError(
                f"workflow version '{version_id}' is not inline and RUNNER_CONTROL_PLANE_URL "
                "is not set"
            )
        self.fetches += 1
        raw = await self.control_plane.workflow_version(version_id, tenant_id)
        return _compile(raw, version_id, "$")

    def _remember(self, version_id: str, plan: Plan) -> Plan:
        self._plans[version_id] = plan
        while len(self._plans) > self.cache_size:
            self._plans.popitem(last=False)
        return plan


def _compile(raw: Any, version_id: str, where: str) -> Plan:
    version = decode_workflow_version(raw, where)
    if version.id != version_id:
        raise DefinitionError(
            f"{where}.id: '{version.id}' does not match the job's workflowVersionId '{version_id}'"
        )
    return compile_plan(version)
