"""Every ``RUNNER_*`` setting, its default and its meaning, in one place.

``python -m runner --help`` prints this table; the README's table is generated from it
(``python -m runner settings-table``). A bad value stops the process at start with a message
naming the variable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

_SECRET = "secret"


def _setting(env: str, default: Any, doc: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc, _SECRET: secret})


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = _setting(
        "RUNNER_REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Redis of the queue: redis://, rediss:// (TLS), unix://, redis+sentinel://h:p,.../<master>[/<db>] or redis+cluster://h:p,... (rediss+ for TLS)",
    )
    queue_prefix: str = _setting("RUNNER_QUEUE_PREFIX", "bull", "BullMQ key prefix")
    queue: str = _setting("RUNNER_QUEUE", "workflow-runs", "BullMQ queue name")
    concurrency: int = _setting("RUNNER_CONCURRENCY", 50, "runs in flight per process")
    processes: int = _setting(
        "RUNNER_PROCESSES", 1, "worker processes on this host, supervised; 0 means one per core"
    )
    status_stream: str = _setting(
        "RUNNER_STATUS_STREAM", "", "status stream; empty means {prefix}:{queue}:status"
    )
    status_stream_maxlen: int = _setting(
        "RUNNER_STATUS_STREAM_MAXLEN", 100_000, "approximate MAXLEN of the status stream"
    )
    control_plane_url: str = _setting(
        "RUNNER_CONTROL_PLANE_URL", "", "control plane base URL (definitions, credentials)"
    )
    control_plane_token: str = _setting(
        "RUNNER_CONTROL_PLANE_TOKEN", "", "bearer token for the control plane", secret=True
    )
    credentials_key: str = _setting(
        "RUNNER_CREDENTIALS_KEY",
        "",
        "base64 32-byte AES-256-GCM key of sealedCredentials",
        secret=True,
    )
    mongodb_url: str = _setting(
        "RUNNER_MONGODB_URL", "", "execution logs in MongoDB; empty means stdout only"
    )
    egress_allow: str = _setting(
        "RUNNER_EGRESS_ALLOW", "", "hosts and CIDRs steps may call although internal"
    )
    max_response_bytes: int = _setting(
        "RUNNER_MAX_RESPONSE_BYTES", 10 * 1024 * 1024, "larger bodies fail RESPONSE_TOO_LARGE"
    )
    max_job_bytes: int = _setting(
        "RUNNER_MAX_JOB_BYTES", 1024 * 1024, "job data larger than this is INVALID_PAYLOAD"
    )
    max_json_depth: int = _setting(
        "RUNNER_MAX_JSON_DEPTH",
        128,
        "JSON nested deeper (job data, definitions, responses) is refused; at most 256",
    )
    expression_budget: int = _setting(
        "RUNNER_EXPRESSION_BUDGET",
        100_000,
        "work one template expression may do (nodes visited, elements and characters built)",
    )
    expression_max_result_bytes: int = _setting(
        "RUNNER_EXPRESSION_MAX_RESULT_BYTES",
        1024 * 1024,
        "largest value (as JSON) one template expression may produce",
    )
    max_foreach_items: int = _setting(
        "RUNNER_MAX_FOREACH_ITEMS",
        10_000,
        "a forEach step over more items fails with TEMPLATE_ERROR",
    )
    worker_name: str = _setting(
        "RUNNER_WORKER_NAME", "", "worker name in Bull Board; empty means host-pid"
    )
    shutdown_grace_s: float = _setting(
        "RUNNER_SHUTDOWN_GRACE_S", 30.0, "on SIGTERM, how long in-flight runs may finish"
    )
    long_wait_s: float = _setting(
        "RUNNER_LONG_WAIT_S", 30.0, "a retry wait longer than this hands the job back as delayed"
    )
    lock_duration_ms: int = _setting(
        "RUNNER_LOCK_DURATION_MS", 30_000, "BullMQ job lock; renewed at half of it"
    )
    stalled_interval_ms: int = _setting(
        "RUNNER_STALLED_INTERVAL_MS", 30_000, "how often stalled jobs are moved back"
    )
    max_stalled_count: int = _setting(
        "RUNNER_MAX_STALLED_COUNT", 2, "stalls before BullMQ fails a job"
    )
    redis_socket_timeout_s: float = _setting(
        "RUNNER_REDIS_SOCKET_TIMEOUT_S", 30.0, "must exceed the longest blocking read (10 s)"
    )
    step_parallelism: int = _setting(
        "RUNNER_STEP_PARALLELISM", 8, "steps of one run in flight at once (DAG branches)"
    )
    checkpoint_retention_s: int = _setting(
        "RUNNER_CHECKPOINT_RETENTION_S", 7 * 86_400, "how long a run's checkpoint is kept"
    )
    execution_log_retention_s: int = _setting(
        "RUNNER_EXECUTION_LOG_RETENTION_S",
        30 * 86_400,
        "MongoDB execution logs expire after this (a TTL index); 0 keeps them",
    )
    definition_cache_size: int = _setting(
        "RUNNER_DEFINITION_CACHE_SIZE", 1000, "WorkflowVersions kept compiled in memory"
    )
    oauth2_skew_s: float = _setting(
        "RUNNER_OAUTH2_SKEW_S", 60.0, "refresh an OAuth2 token this long before it expires"
    )
    follow_redirects: bool = _setting(
        "RUNNER_FOLLOW_REDIRECTS", False, "follow HTTP redirects (each hop checked for egress)"
    )
    max_redirects: int = _setting("RUNNER_MAX_REDIRECTS", 5, "redirect hops when following")
    paginate_max_pages: int = _setting(
        "RUNNER_PAGINATE_MAX_PAGES", 1000, "pages a paginated step fetches at most (maxPages)"
    )
    paginate_max_items: int = _setting(
        "RUNNER_PAGINATE_MAX_ITEMS", 100_000, "items a paginated step gathers at most (maxItems)"
    )
    paginate_max_bytes: int = _setting(
        "RUNNER_PAGINATE_MAX_BYTES",
        16 * 1024 * 1024,
        "body bytes a paginated step reads at most over its pages (maxBytes)",
    )
    paginate_checkpoint_bytes: int = _setting(
        "RUNNER_PAGINATE_CHECKPOINT_BYTES",
        1024 * 1024,
        "items of a paginated step kept in the checkpoint for a resume; past it, a resume refetches",
    )
    rate_limit: str = _setting(
        "RUNNER_RATE_LIMIT",
        "",
        "shared rate limit of every connection without config.rateLimit: requests/perMs[/burst]; empty means none",
    )
    max_concurrency_per_connection: int = _setting(
        "RUNNER_MAX_CONCURRENCY_PER_CONNECTION",
        0,
        "requests in flight across all runners per connection without config.maxConcurrency; 0 means no cap",
    )
    circuit_breaker: str = _setting(
        "RUNNER_CIRCUIT_BREAKER",
        "",
        "breaker of every base URL without config.circuitBreaker: failures/windowMs/coolDownMs[/WAIT or /FAIL]; empty means off",
    )
    health_port: int = _setting(
        "RUNNER_HEALTH_PORT", 0, "serve /healthz, /readyz and /metrics on this port; 0 means off"
    )
    log_level: str = _setting("RUNNER_LOG_LEVEL", "info", "debug, info, warning or error")
    burst: bool = _setting(
        "RUNNER_BURST",
        False,
        "process the jobs queued (waiting, delayed, active), then exit 0: tests, one-off drains",
    )

    @property
    def stream_key(self) -> str:
        return self.status_stream or f"{self.queue_prefix}:{self.queue}:status"

    @property
    def name(self) -> str:
        return self.worker_name or _default_worker_name()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.metadata["env"], raw, f.default)
        return cls(**values)


def _parse(name: str, raw: str, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            value = int(raw)
            if value < 0:
                raise ValueError
            return value
        if kind is float:
            number = float(raw)
            if number < 0:
                raise ValueError
            return number
    except ValueError:
        expected = {bool: "true or false", int: "a whole number >= 0", float: "a number >= 0"}
        raise SystemExit(f"{name}: expected {expected[kind]}, got {raw!r}") from None
    return raw


def settings_table() -> list[tuple[str, str, str, bool]]:
    """(env, default, doc, secret) for every setting."""
    rows = []
    for f in fields(Settings):
        default = "" if f.default is MISSING else f.default
        rows.append((f.metadata["env"], str(default), f.metadata["doc"], f.metadata[_SECRET]))
    return rows
