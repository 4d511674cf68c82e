"""Every Redis key the runner itself names, in one place (BullMQ's own keys are BullMQ's).

All of them hang under the queue's prefix, ``{prefix}:{queue}``, so that a hash-tagged prefix
(``{bull}``) keeps them in one Redis Cluster slot with the queue. Documented in
``docs/contract.md`` ("Keys the runner owns").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str
    queue: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{self.queue}"

    def run(self, run_id: str) -> str:
        """Hash: the run's checkpoint (last seq, first start, finished steps)."""
        return f"{self.base}:run:{run_id}"

    def cancel(self, run_id: str) -> str:
        """String: a cancel request's reason (CONTRACT §8), set by the control plane."""
        return f"{self.base}:cancel:{run_id}"

    def events(self) -> str:
        """BullMQ's event stream of the queue (cancel-job events arrive here)."""
        return f"{self.base}:events"

    def flow(self, connection_id: str) -> str:
        """Hash: a connection's shared budget (GCRA's TAT, a pause, the adaptive factor);
        ``:leases`` a zset of requests in flight (``maxConcurrency``); ``:tenants`` a zset of
        tenants seen lately (fair share)."""
        return f"{self.base}:flow:{connection_id}"

    def flow_tenant(self, connection_id: str, tenant_id: str) -> str:
        """Hash: one tenant's budget on a connection; ``:leases`` as for the connection."""
        return f"{self.base}:flow:{connection_id}:tenant:{tenant_id}"

    def breaker(self, base_url: str) -> str:
        """Hash: the circuit breaker of one base URL (its origin), shared by every runner."""
        return f"{self.base}:breaker:{base_url}"

    # BullMQ's own keys, named here only to hand them to BullMQ's Lua scripts.

    def job(self, job_id: str) -> str:
        return f"{self.base}:{job_id}"

    def job_logs(self, job_id: str) -> str:
        return f"{self.base}:{job_id}:logs"

    def meta(self) -> str:
        return f"{self.base}:meta"

    def oauth2(self) -> str:
        """Prefix of the OAuth2 lease and sealed shared token keys."""
        return f"{self.base}"
