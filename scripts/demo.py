"""The runner end to end on local defaults, as ``scripts/demo`` runs it.

Starts the sample API, ``python -m runner`` and (when PostgreSQL answers) the status sink;
enqueues sample runs with the Node BullMQ producer, as a control plane would; prints each run's
and step's status from the status stream as it happens; then stops everything cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import redis.asyncio as aioredis
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sample_api import SampleApi  # noqa: E402

from runner.credentials import seal  # noqa: E402
from tests.workflows import three_step_version  # noqa: E402

REDIS_URL = os.environ.get("RUNNER_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
API_KEY = "demo-" + uuid.uuid4().hex[:8]
RUNS = int(os.environ.get("DEMO_RUNS", "3"))


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def start_api() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(SampleApi(API_KEY).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def pg_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
        return True
    except OSError:
        return False


async def main() -> int:
    queue = os.environ.get("RUNNER_QUEUE", "demo-" + uuid.uuid4().hex[:6])
    key = os.urandom(32)
    stream = f"bull:{queue}:status"
    api_runner, base = await start_api()
    banner(f"sample API on {base}; queue '{queue}'")

    env = {
        **os.environ,
        "RUNNER_REDIS_URL": REDIS_URL,
        "RUNNER_QUEUE": queue,
        "RUNNER_CREDENTIALS_KEY": base64.b64encode(key).decode(),
        "RUNNER_EGRESS_ALLOW": "127.0.0.0/8",
        "RUNNER_WORKER_NAME": "demo-runner",
        "PYTHONUNBUFFERED": "1",
    }
    log_dir = ROOT / ".run"
    log_dir.mkdir(exist_ok=True)
    runner_log = (log_dir / "demo-runner.log").open("wb")
    runner = subprocess.Popen(
        [sys.executable, "-m", "runner"],
        cwd=ROOT,
        env=env,
        stdout=runner_log,
        stderr=subprocess.STDOUT,
    )
    banner(f"runner started (pid {runner.pid}), its JSON log: .run/demo-runner.log")

    sink = None
    if pg_reachable() and (ROOT / "scripts/status-sink/node_modules").exists():
        sink_log = (log_dir / "demo-status-sink.log").open("wb")
        sink = subprocess.Popen(
            ["npm", "start", "--silent"],
            cwd=ROOT / "scripts/status-sink",
            env={
                **os.environ,
                "REDIS_URL": REDIS_URL,
                "DATABASE_URL": DATABASE_URL,
                "STATUS_STREAM": stream,
                "STATUS_GROUP": f"demo-{queue}",
            },
            stdout=sink_log,
            stderr=subprocess.STDOUT,
        )
        banner("status sink started: the stream goes into PostgreSQL (workflow_runs, step_runs)")

    version = three_step_version(base, version_id=f"wfv_demo_{queue}")
    jobs = []
    for i in range(RUNS):
        run_id = f"run_{queue}_{i + 1}"
        creds = {
            "connections": {
                "conn_api": {
                    "id": "conn_api",
                    "type": "API_KEY",
                    "config": {},
                    "secrets": {"apiKey": API_KEY},
                }
            }
        }
        data = {
            "workflowRunId": run_id,
            "workflowVersionId": version["id"],
            "tenantId": "ten_demo",
            "input": {"customerId": f"c_{40 + i}", "orderNo": 1000 + i, "priority": i},
            "workflowVersion": version,
            "sealedCredentials": seal(msgspec.json.encode(creds), key, run_id),
        }
        jobs.append(
            {"data": data, "opts": {"jobId": run_id, "attempts": 3, "removeOnComplete": False}}
        )
    # One run that fails on purpose: its customer id renders into a path that the API rejects.
    bad = json.loads(json.dumps(jobs[0]))
    bad["data"]["workflowRunId"] = bad["opts"]["jobId"] = f"run_{queue}_bad"
    bad["data"]["input"] = {"orderNo": 1}
    creds = {
        "connections": {
            "conn_api": {
                "id": "conn_api",
                "type": "API_KEY",
                "config": {},
                "secrets": {"apiKey": API_KEY},
            }
        }
    }
    bad["data"]["sealedCredentials"] = seal(
        msgspec.json.encode(creds), key, bad["data"]["workflowRunId"]
    )
    jobs.append(bad)

    client = aioredis.Redis.from_url(REDIS_URL)
    last_id = "$"
    banner(f"enqueuing {len(jobs)} runs with the Node BullMQ producer (tests/node/peer.mjs add)")
    spec = json.dumps({"redis": REDIS_URL, "queue": queue, "jobs": jobs})
    subprocess.run(
        ["node", str(ROOT / "tests/node/peer.mjs"), "add", "-"],
        input=spec.encode(),
        check=True,
        stdout=subprocess.DEVNULL,
    )

    finished: dict[str, str] = {}
    deadline = time.monotonic() + 60
    code = 0
    try:
        while len(finished) < len(jobs) and time.monotonic() < deadline:
            reply = await client.xread({stream: last_id}, block=1000, count=100)
            for _s, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    e = json.loads(fields[b"event"])
                    who = e["workflowRunId"] + (f" / {e['stepKey']}" if e["kind"] == "step" else "")
                    extra = f" attempt {e['attempt']}" if e.get("attempt") else ""
                    if e.get("errorCode"):
                        extra += f"  {e['errorCode']}: {e['errorMessage']}"
                    print(
                        f"  seq {e['seq']:>2}  {e['kind']:<4}  {who:<42} {e['status']}{extra}",
                        flush=True,
                    )
                    if e["kind"] == "run" and e["status"] in ("SUCCESS", "FAILED", "CANCELED"):
                        finished[e["workflowRunId"]] = e["status"]
        if len(finished) < len(jobs):
            print(
                "demo: not every run finished within 60 s; see .run/demo-runner.log",
                file=sys.stderr,
            )
            code = 1
        else:
            ok = sum(1 for s in finished.values() if s == "SUCCESS")
            banner(
                f"{ok} runs SUCCESS, {len(finished) - ok} FAILED (one on purpose: its input misses customerId)"
            )
        if sink is not None:
            await asyncio.sleep(1.5)
            rows = subprocess.run(
                [
                    "psql",
                    DATABASE_URL,
                    "-At",
                    "-c",
                    f"select id, status, coalesce(error_code, '') from workflow_runs where id like 'run_{queue}_%' order by id",
                ],
                capture_output=True,
                text=True,
            )
            if rows.returncode == 0:
                banner("workflow_runs in PostgreSQL, written by the status sink")
                print("\n".join("  " + r for r in rows.stdout.splitlines()), flush=True)
    finally:
        runner.send_signal(signal.SIGTERM)
        rc = runner.wait(timeout=30)
        banner(f"runner stopped on SIGTERM with exit code {rc}")
        if sink is not None:
            sink.send_signal(signal.SIGTERM)
            sink.wait(timeout=30)
        await client.aclose()
        await api_runner.cleanup()
    return code or rc


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
