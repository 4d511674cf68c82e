"""The status sink (scripts/status-sink, CONTRACT.md section 6) against real Redis and PostgreSQL.

Given contract-shaped events XADDed to a stream of its own (built from runner.contract Structs,
as the runner emits them), when the Node sink runs, then workflow_runs and step_runs hold what
the stream says, whatever the order, the replays, the crashes and the database outages.

Each test has its own stream and its own database on the shared server; the outage test breaks a
throwaway PostgreSQL of its own (pg_instance.py). Waits poll a condition until a deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.rows import dict_row

from runner.contract import RunEvent, StepEvent
from tests.integration.pg_instance import PgInstance, spare_port

pytestmark = pytest.mark.integration

SINK_DIR = Path(__file__).resolve().parents[2] / "scripts" / "status-sink"
REDIS_URL = "redis://127.0.0.1:6379/0"
PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
GROUP = "status-sink"
T0_MS = 1_795_639_000_000

T = TypeVar("T")


# --- building runs as the runner reports them ----------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    key: str
    outcome: Literal["SUCCESS", "FAILED", "SKIPPED"] = "SUCCESS"
    attempts: int = 1


@dataclass
class Scenario:
    """One run's events in emission order, and the rows they must leave behind."""

    run_id: str
    events: list[bytes] = field(default_factory=list)
    run_row: dict[str, Any] = field(default_factory=dict)
    step_rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def build_run(run_id: str, steps: Sequence[StepPlan], t0_ms: int) -> Scenario:
    """run RUNNING, each step RUNNING (per attempt) then its end, run end; one seq counter."""
    seq = itertools.count(1)
    clock = itertools.count(t0_ms, 7)
    ids: dict[str, Any] = {
        "workflow_run_id": run_id,
        "tenant_id": "ten_acme",
        "workflow_version_id": "wfv_12",
        "job_id": run_id,
    }
    scenario = Scenario(run_id)
    emit = scenario.events.append
    run_start = next(clock)
    emit(
        _encode(
            RunEvent(seq=next(seq), status="RUNNING", at=run_start, started_at=run_start, **ids)
        )
    )

    failed: str | None = None
    for plan in steps:
        step_run_id = f"{run_id}:{plan.key}"
        step_ids: dict[str, Any] = {**ids, "step_key": plan.key, "step_run_id": step_run_id}
        row = {"id": step_run_id, "workflow_run_id": run_id, "step_key": plan.key}
        if plan.outcome == "SKIPPED":
            at, n = next(clock), next(seq)
            emit(_encode(StepEvent(seq=n, status="SKIPPED", attempt=0, at=at, **step_ids)))
            # A step that never started: the sink takes `at` as its finish.
            scenario.step_rows[step_run_id] = row | _outcome("SKIPPED", 0, None, at, None, None, n)
            continue
        first_start = attempt_start = 0
        for attempt in range(1, plan.attempts + 1):
            attempt_start = next(clock)
            first_start = first_start or attempt_start
            # A retry says why: the sink must not keep that error once the step succeeds.
            retried = ("HTTP_ERROR", f"attempt {attempt - 1}: HTTP 503") if attempt > 1 else None
            emit(
                _encode(
                    StepEvent(
                        seq=next(seq),
                        status="RUNNING",
                        attempt=attempt,
                        at=attempt_start,
                        started_at=attempt_start,
                        error_code=retried and retried[0],
                        error_message=retried and retried[1],
                        **step_ids,
                    )
                )
            )
        end, n = next(clock), next(seq)
        if plan.outcome == "SUCCESS":
            output: Any = {"status": 200, "headers": {}, "body": {"key": plan.key, "n": n}}
            error: tuple[str | None, str | None] = (None, None)
        else:
            output, error = None, ("HTTP_ERROR", f"HTTP 500 from {plan.key}")
            failed = failed or plan.key
        emit(
            _encode(
                StepEvent(
                    seq=n,
                    status=plan.outcome,
                    attempt=plan.attempts,
                    at=end,
                    started_at=attempt_start,
                    finished_at=end,
                    output=output,
                    error_code=error[0],
                    error_message=error[1],
                    **step_ids,
                )
            )
        )
        # started_at is the first attempt's start, whatever the later events carry.
        scenario.step_rows[step_run_id] = row | _outcome(
            plan.outcome, plan.attempts, first_start, end, output, error, n
        )

    end, n = next(clock), next(seq)
    status: Literal["SUCCESS", "FAILED"] = "FAILED" if failed else "SUCCESS"
    run_output = None if failed else {"completedSteps": len(steps)}
    run_error = ("HTTP_ERROR", f"step {failed} failed") if failed else (None, None)
    # The terminal run event leaves startedAt out: the sink must keep the one RUNNING gave.
    emit(
        _encode(
            RunEvent(
                seq=n,
                status=status,
                at=end,
                finished_at=end,
                output=run_output,
                error_code=run_error[0],
                error_message=run_error[1],
                **ids,
            )
        )
    )
    scenario.run_row = {
        "id": run_id,
        "tenant_id": "ten_acme",
        "workflow_version_id": "wfv_12",
        "job_id": run_id,
        "status": status,
        "started_at": run_start,
        "finished_at": end,
        "error_code": run_error[0],
        "error_message": run_error[1],
        "output": run_output,
        "last_seq": n,
    }
    return scenario


def _outcome(
    status: str,
    attempt: int,
    started_at: int | None,
    finished_at: int,
    output: Any,
    error: tuple[str | None, str | None] | None,
    last_seq: int,
) -> dict[str, Any]:
    error_code, error_message = error or (None, None)
    return {
        "status": status,
        "attempt": attempt,
        "started_at": started_at,
        "finished_at": finished_at,
        "output": output,
        "error_code": error_code,
        "error_message": error_message,
        "last_seq": last_seq,
    }


def _encode(event: RunEvent | StepEvent) -> bytes:
    return msgspec.json.encode(event)


def plans_for(i: int) -> list[StepPlan]:
    """A mix: plain success, a retried step, a skipped step, and every fifth run failing."""
    plans = [StepPlan("fetch_customer"), StepPlan("enrich", attempts=1 + i % 3)]
    if i % 4 == 0:
        plans.append(StepPlan("notify", outcome="SKIPPED"))
    plans.append(StepPlan("create_ticket", outcome="FAILED" if i % 5 == 0 else "SUCCESS"))
    return plans


def build_runs(count: int, prefix: str = "run") -> list[Scenario]:
    return [build_run(f"{prefix}_{i:04d}", plans_for(i), T0_MS + i * 1000) for i in range(count)]


def interleaved(scenarios: Sequence[Scenario]) -> list[bytes]:
    """Runs in flight together: their events mixed, each run's in its own order."""
    out: list[bytes] = []
    for layer in itertools.zip_longest(*(s.events for s in scenarios)):
        out.extend(e for e in layer if e is not None)
    return out


# --- Redis and PostgreSQL ------------------------------------------------------------------


def xadd_all(r: redis.Redis, stream: str, payloads: Sequence[bytes]) -> None:
    pipe = r.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(stream, {"event": payload})
    pipe.execute()


def drained(r: redis.Redis, stream: str) -> bool:
    """Every entry delivered to the group and acked (acked means committed)."""
    groups = {g["name"]: g for g in r.xinfo_groups(stream)}
    group = groups.get(GROUP)
    if group is None:
        return False
    last_id = r.xinfo_stream(stream)["last-generated-id"]
    return bool(group["pending"] == 0 and group["last-delivered-id"] == last_id)


def pending_of(r: redis.Redis, stream: str, consumer: str) -> int:
    for c in r.xinfo_consumers(stream, GROUP):
        if c["name"] == consumer:
            return int(c["pending"])
    return 0


def _ms(value: datetime | None) -> int | None:
    return None if value is None else round(value.timestamp() * 1000)


def fetch_rows(
    database_url: str, *, raw: bool = False
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Both tables by id; timestamps as epoch ms and no updated_at, unless raw."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        runs = list(conn.execute("SELECT * FROM workflow_runs"))
        steps = list(conn.execute("SELECT * FROM step_runs"))
    if not raw:
        for row in (*runs, *steps):
            del row["updated_at"]
            row["started_at"] = _ms(row["started_at"])
            row["finished_at"] = _ms(row["finished_at"])
    return {r["id"]: r for r in runs}, {s["id"]: s for s in steps}


def expected_rows(
    scenarios: Sequence[Scenario],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    runs = {s.run_id: s.run_row for s in scenarios}
    steps = {k: v for s in scenarios for k, v in s.step_rows.items()}
    return runs, steps


def assert_rows_match(database_url: str, scenarios: Sequence[Scenario]) -> None:
    runs, steps = fetch_rows(database_url)
    want_runs, want_steps = expected_rows(scenarios)
    assert sorted(runs) == sorted(want_runs)
    assert sorted(steps) == sorted(want_steps)
    for run_id, want in want_runs.items():
        assert runs[run_id] == want, run_id
    for step_id, want in want_steps.items():
        assert steps[step_id] == want, step_id


def count_rows(database_url: str, table: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        result = row.fetchone()
    return int(result[0]) if result else 0


def sink_blocked_on_lock(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'status-sink' AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0] > 0)


def hold_run_row(database_url: str, run_id: str) -> psycopg.Connection[Any]:
    """Open a transaction that inserts run_id uncommitted: a sink writing that row must wait."""
    conn = psycopg.connect(database_url)
    conn.execute(
        "INSERT INTO workflow_runs (id, status, last_seq) VALUES (%s, 'QUEUED', 0)", (run_id,)
    )
    return conn


# --- the sink process ----------------------------------------------------------------------


def wait_until(cond: Callable[[], T], what: str, timeout_s: float = 15.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


class Sink:
    """The sink as a child process with its own process group, logging to a file."""

    def __init__(self, log_path: Path, env: dict[str, str], *, via_npm: bool = False) -> None:
        self.log_path = log_path
        cmd = ["npm", "start", "--silent"] if via_npm else ["node", "src/index.js"]
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                cmd,
                cwd=SINK_DIR,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"msg": "<not json>", "line": line})
        return lines

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("msg") == msg]

    def wait(self, cond: Callable[[], T], what: str, timeout_s: float = 15.0) -> T:
        """Like wait_until, but fail at once (with the log) if the sink died."""

        def alive_and(cond: Callable[[], T] = cond) -> T:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"sink exited {self.proc.returncode} while waiting for {what}:\n"
                    + self.log_path.read_text()[-4000:]
                )
            return cond()

        return wait_until(alive_and, what, timeout_s)

    def wait_started(self) -> None:
        self.wait(lambda: self.logged("started"), "the sink to start")

    def signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        if self.proc.poll() is None or self.group_alive():
            self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _sink_installed() -> None:
    if not (SINK_DIR / "node_modules").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=SINK_DIR, check=True, timeout=300
        )


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=30)
    yield client
    client.close()


@pytest.fixture
def stream(r: redis.Redis) -> Iterator[str]:
    name = f"test:status-sink:{uuid.uuid4().hex}"
    yield name
    r.delete(name)


@pytest.fixture
def database_url() -> Iterator[str]:
    name = f"status_sink_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"postgres://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def start_sink(tmp_path: Path, stream: str) -> Iterator[Callable[..., Sink]]:
    sinks: list[Sink] = []

    def start(
        database_url: str, *, via_npm: bool = False, redis_url: str = REDIS_URL, **settings: str
    ) -> Sink:
        env = dict(os.environ)
        env.update(
            REDIS_URL=redis_url,
            DATABASE_URL=database_url,
            STATUS_STREAM=stream,
            STATUS_GROUP=GROUP,
            BATCH_SIZE="50",
            BLOCK_MS="100",
            CLAIM_IDLE_MS="30000",
            SHUTDOWN_GRACE_MS="5000",
        )
        env.update(settings)
        sink = Sink(tmp_path / f"sink-{len(sinks)}.log", env, via_npm=via_npm)
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.close()


@pytest.fixture
def own_pg() -> Iterator[PgInstance]:
    instance = PgInstance()
    try:
        instance.start()
        yield instance
    finally:
        instance.destroy()


class RedisInstance:
    """A Redis of our own on a spare port, with an fsync-always AOF so a restart keeps the data."""

    def __init__(self, workdir: Path) -> None:
        self.port = spare_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            wait_until(lambda: _pings(client), "redis-server to answer")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisInstance]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    instance = RedisInstance(workdir)
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()


# --- tests ---------------------------------------------------------------------------------


def test_rows_match_the_stream_and_a_replay_changes_nothing(
    r: redis.Redis, stream: str, database_url: str, start_sink: Callable[..., Sink]
) -> None:
    # Given twenty runs in flight together, and three entries that are not events
    scenarios = build_runs(20)
    payloads = interleaved(scenarios)
    xadd_all(r, stream, payloads[:40])
    r.xadd(stream, {"event": "not json"})
    r.xadd(stream, {"event": json.dumps({"kind": "run", "seq": 1, "status": "RUNNING"})})
    r.xadd(stream, {"other": "field"})
    xadd_all(r, stream, payloads[40:])

    # When the sink drains the stream
    sink = start_sink(database_url, BATCH_SIZE="7")
    sink.wait(lambda: drained(r, stream), "the stream to drain")

    # Then the rows are what the events say, and the bad entries were acked and counted
    assert_rows_match(database_url, scenarios)
    batches = sink.logged("batch_committed")
    assert sum(b["malformed"] for b in batches) == 3
    assert len(sink.logged("malformed_entry")) == 3

    # When every event is delivered again
    before = fetch_rows(database_url, raw=True)
    replay_from = len(batches)
    xadd_all(r, stream, payloads)
    sink.wait(lambda: drained(r, stream), "the replay to drain")

    # Then no row changed, not even updated_at, and no event won the seq guard
    assert fetch_rows(database_url, raw=True) == before
    replay = sink.logged("batch_committed")[replay_from:]
    assert sum(b["entries"] for b in replay) == len(payloads)
    assert sum(b["rowsWritten"] for b in replay) == 0


@pytest.mark.parametrize("batch_size", ["1", "7"])
def test_out_of_order_delivery_ends_in_the_same_rows(
    r: redis.Redis,
    stream: str,
    database_url: str,
    start_sink: Callable[..., Sink],
    batch_size: str,
) -> None:
    # Given runs whose events arrive shuffled, and one run whose events arrive in reverse
    scenarios = build_runs(12)
    shuffled = [e for s in scenarios[1:] for e in s.events]
    random.Random(20261126).shuffle(shuffled)
    payloads = list(reversed(scenarios[0].events)) + shuffled

    # When the sink writes them one per transaction (the shuffle reaches PostgreSQL as is), or
    # a few per transaction (each batch folded to one change per row first)
    sink = start_sink(database_url, BATCH_SIZE=batch_size)
    xadd_all(r, stream, payloads)
    sink.wait(lambda: drained(r, stream), "the stream to drain")

    # Then the rows are those of in-order delivery
    assert_rows_match(database_url, scenarios)

    # When late events with lower seqs and different content arrive
    before = fetch_rows(database_url, raw=True)
    run = scenarios[0]
    first_step_id = next(iter(run.step_rows))
    late: dict[str, Any] = {
        "workflow_run_id": run.run_id,
        "tenant_id": "ten_other",
        "workflow_version_id": "wfv_12",
        "job_id": run.run_id,
    }
    xadd_all(
        r,
        stream,
        [
            _encode(
                RunEvent(seq=1, status="RUNNING", at=T0_MS + 99, started_at=T0_MS + 99, **late)
            ),
            _encode(
                StepEvent(
                    seq=2,
                    status="RUNNING",
                    attempt=7,
                    at=T0_MS + 99,
                    started_at=T0_MS + 99,
                    step_key=first_step_id.split(":")[1],
                    step_run_id=first_step_id,
                    **late,
                )
            ),
        ],
    )
    sink.wait(lambda: drained(r, stream), "the late events to drain")

    # Then they changed nothing
    assert fetch_rows(database_url, raw=True) == before


def test_an_event_postgres_refuses_is_set_aside_and_the_rest_of_its_batch_written(
    r: redis.Redis, stream: str, database_url: str, start_sink: Callable[..., Sink]
) -> None:
    # Given a database that refuses one step key (a constraint the sink cannot foresee)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute((SINK_DIR / "schema.sql").read_text())
        conn.execute("ALTER TABLE step_runs ADD CONSTRAINT no_poison CHECK (step_key <> 'poison')")
    good = build_runs(4)
    poisoned = build_run("run_poisoned", [StepPlan("poison")], T0_MS)

    # When both arrive in one batch
    xadd_all(r, stream, interleaved([*good, poisoned]))
    sink = start_sink(database_url, BATCH_SIZE="500")
    sink.wait(lambda: drained(r, stream), "the stream to drain")

    # Then the refused events are acked and counted, and every other event is written
    assert_rows_match(database_url, [*good, _without_steps(poisoned)])
    rejected = [
        m for m in sink.logged("malformed_entry") if m["reason"] == "rejected by PostgreSQL"
    ]
    assert [m["errorCode"] for m in rejected] == ["23514", "23514"]
    assert sum(b["malformed"] for b in sink.logged("batch_committed")) == 2


def _without_steps(scenario: Scenario) -> Scenario:
    return Scenario(scenario.run_id, scenario.events, scenario.run_row, {})


@pytest.mark.parametrize("restart_as", ["same-consumer", "another-consumer"])
def test_sink_killed_mid_batch_loses_and_duplicates_nothing(
    r: redis.Redis,
    stream: str,
    database_url: str,
    start_sink: Callable[..., Sink],
    restart_as: str,
) -> None:
    # Given a sink that has committed some batches and is in the middle of the next one
    scenarios = build_runs(60)
    first = start_sink(database_url, CONSUMER_NAME="sink-a", BATCH_SIZE="20")
    first.wait_started()
    blocker = hold_run_row(database_url, scenarios[30].run_id)
    try:
        xadd_all(r, stream, [e for s in scenarios for e in s.events])
        first.wait(lambda: sink_blocked_on_lock(database_url), "the sink to block mid-batch")
        assert count_rows(database_url, "step_runs") > 0
        held = pending_of(r, stream, "sink-a")
        assert held > 0

        # When it is killed there
        first.signal_group(signal.SIGKILL)
        first.proc.wait(timeout=10)
    finally:
        blocker.rollback()
        blocker.close()
    assert pending_of(r, stream, "sink-a") == held

    # And a sink starts again, under the same name or as another consumer claiming idle entries
    name = "sink-a" if restart_as == "same-consumer" else "sink-b"
    second = start_sink(database_url, CONSUMER_NAME=name, BATCH_SIZE="20", CLAIM_IDLE_MS="300")
    second.wait(lambda: drained(r, stream), "the stream to drain after the restart")

    # Then every run's rows are right, each once, and nothing is left pending
    assert_rows_match(database_url, scenarios)
    assert count_rows(database_url, "workflow_runs") == len(scenarios)
    assert pending_of(r, stream, "sink-a") == 0
    sources = {b["source"] for b in second.logged("batch_committed")}
    assert ("pending" if restart_as == "same-consumer" else "claimed") in sources


def test_postgres_outage_holds_the_batch_until_the_database_returns(
    r: redis.Redis, stream: str, own_pg: PgInstance, start_sink: Callable[..., Sink]
) -> None:
    # Given a sink writing to a PostgreSQL of our own, with runs under way
    scenarios = build_runs(40)
    payloads = interleaved(scenarios)
    half = len(payloads) // 2
    sink = start_sink(own_pg.url, BATCH_SIZE="10", CONSUMER_NAME="sink-pg")
    sink.wait_started()
    xadd_all(r, stream, payloads[:half])
    sink.wait(lambda: count_rows(own_pg.url, "step_runs") > 0, "the first rows")

    # When PostgreSQL stops while events keep coming
    own_pg.stop("fast")
    xadd_all(r, stream, payloads[half:])
    sink.wait(lambda: sink.logged("db_write_retry"), "the sink to retry the batch")

    # Then the batch in hand is held, not acked
    assert pending_of(r, stream, "sink-pg") > 0
    assert not drained(r, stream)

    # When PostgreSQL comes back
    own_pg.start()
    sink.wait(lambda: drained(r, stream), "the stream to drain after the outage")

    # Then every run's final row is right
    assert_rows_match(own_pg.url, scenarios)


def test_sigterm_finishes_the_batch_in_hand_then_exits_0(
    r: redis.Redis, stream: str, database_url: str, start_sink: Callable[..., Sink]
) -> None:
    # Given the sink started with `npm start`, blocked in the middle of a batch
    scenarios = build_runs(3)
    sink = start_sink(database_url, via_npm=True, BATCH_SIZE="500", CONSUMER_NAME="sink-t")
    sink.wait_started()
    blocker = hold_run_row(database_url, scenarios[1].run_id)
    try:
        xadd_all(r, stream, [e for s in scenarios for e in s.events])
        sink.wait(lambda: sink_blocked_on_lock(database_url), "the sink to block mid-batch")
        assert pending_of(r, stream, "sink-t") > 0

        # When SIGTERM reaches npm, and the batch can go on
        sink.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: sink.logged("stopping"), "the sink to see SIGTERM")
    finally:
        blocker.rollback()
        blocker.close()

    # Then the sink writes and acks that batch, and exits 0 with its process group
    assert sink.proc.wait(timeout=15) == 0
    wait_until(lambda: not sink.group_alive(), "node to exit")
    assert pending_of(r, stream, "sink-t") == 0
    assert drained(r, stream)
    assert_rows_match(database_url, scenarios)


def test_redis_outage_pauses_the_sink_and_it_carries_on(
    own_redis: RedisInstance, database_url: str, start_sink: Callable[..., Sink]
) -> None:
    # Given a sink reading a Redis of our own, with runs under way
    own = redis.Redis.from_url(own_redis.url, decode_responses=True, socket_timeout=30)
    stream = "bull:workflow-runs:status"
    scenarios = build_runs(20)
    payloads = interleaved(scenarios)
    half = len(payloads) // 2
    sink = start_sink(database_url, redis_url=own_redis.url, STATUS_STREAM=stream)
    sink.wait_started()
    xadd_all(own, stream, payloads[:half])
    sink.wait(lambda: drained(own, stream), "the first half to drain")

    # When Redis dies and comes back with its data
    own_redis.kill()
    sink.wait(lambda: sink.logged("redis_error"), "the sink to see Redis gone")
    own_redis.start()
    xadd_all(own, stream, payloads[half:])

    # Then the sink reconnects and writes the rest
    sink.wait(lambda: drained(own, stream), "the second half to drain")
    assert sink.logged("redis_reconnected")
    assert_rows_match(database_url, scenarios)
    own.close()
