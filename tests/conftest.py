"""Shared fixtures: real Redis, a runner process, the Node peer, local HTTP servers.

Every test gets its own queue name, so tests never see each other's jobs on the shared Redis
and nothing is flushed. Integration tests skip nothing: if Redis or Node is missing they fail,
because the README's test command starts and installs them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
NODE_PEER = ROOT / "tests" / "node" / "peer.mjs"
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
sys.path.insert(0, str(ROOT / "scripts"))

pytest_plugins = ["tests.mongo_server"]


@pytest.fixture(autouse=True)
def _process_log_restored() -> Iterator[None]:
    """The process log is one object: a test that configures it (building the runtime in
    process does) must not leave its level, scrubber or fields to the tests after it."""
    from runner.log import log

    saved = (log.threshold, log.scrub, log.stream, dict(log.static))
    yield
    log.threshold, log.scrub, log.stream, log.static = saved


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def clean_queue(redis: aioredis.Redis, queue_name: str) -> AsyncIterator[str]:
    yield queue_name
    keys = [k async for k in redis.scan_iter(match=f"bull:{queue_name}:*", count=1000)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
def credentials_key() -> bytes:
    return os.urandom(32)


async def start_server(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """``url = await serve(app)``: a real HTTP server on a free loopback port."""
    runners: list[web.AppRunner] = []

    async def _serve(app: web.Application) -> str:
        runner, url = await start_server(app)
        runners.append(runner)
        return url

    yield _serve
    for runner in runners:
        await runner.cleanup()


@dataclass
class RunnerProcess:
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "<not json>", "line": line})
        return out

    async def wait_for_event(self, event: str, timeout_s: float = 15) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            for record in self.log_events():
                if record.get("event") == event:
                    return record
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"runner never logged {event!r}:\n{self.stdout()}\n{self.stderr()}")

    def terminate(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)


@pytest.fixture
def runner_process(tmp_path: Path, queue_name: str) -> Iterator[Any]:
    """``proc = await runner_process(**env)``: ``python -m runner`` on this test's queue."""
    procs: list[RunnerProcess] = []

    async def _start(wait_ready: bool = True, **env: str) -> RunnerProcess:
        n = len(procs)
        full_env = {
            **os.environ,
            "RUNNER_REDIS_URL": REDIS_URL,
            "RUNNER_QUEUE": queue_name,
            "RUNNER_EGRESS_ALLOW": "127.0.0.0/8,::1,localhost",
            "RUNNER_WORKER_NAME": f"test-runner-{n}",
            "RUNNER_SHUTDOWN_GRACE_S": "10",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        out, err = tmp_path / f"runner{n}.out", tmp_path / f"runner{n}.err"
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner"],
            cwd=ROOT,
            env=full_env,
            stdout=out.open("wb"),
            stderr=err.open("wb"),
        )
        rp = RunnerProcess(proc, out, err, full_env)
        procs.append(rp)
        if wait_ready:
            await rp.wait_for_event("runner.started")
        return rp

    yield _start
    for rp in procs:
        if rp.proc.poll() is None:
            rp.proc.kill()
            rp.proc.wait()


async def node_peer(command: str, spec: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    """Run the Node peer (BullMQ producer + QueueEvents) and return its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_PEER),
        command,
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), timeout_s)
    assert proc.returncode == 0, f"node peer failed: {err.decode()}"
    text = out.decode().strip()
    return json.loads(text.splitlines()[-1]) if text else {}


async def read_stream(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(stream)
    return [json.loads(fields[b"event"]) for _id, fields in entries]


def b64key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of a test's own, never the shared one: the test may stop, restart or
    break it. ``args`` are extra server options; ``unixsocket`` serves a socket path instead of
    TCP; ``tls`` (certificate, key, CA files) serves TLS only, and the URL names the CA."""

    def __init__(
        self,
        directory: Path,
        *args: str,
        unixsocket: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.unixsocket = unixsocket
        self.tls = tls
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.unixsocket is not None:
            return f"unix://{self.unixsocket}?db=0"
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.unixsocket is not None:
            listen = ["--port", "0", "--unixsocket", str(self.unixsocket)]
        elif self.tls is not None:
            cert, key, ca = (str(path) for path in self.tls)
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert]
            listen += ["--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        else:
            listen = ["--port", str(self.port)]
        log_path = self.directory / f"redis-{self.port}.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    *("--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)),
                    *listen,
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"redis-server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.025)

    def _ready(self) -> bool:
        """Accepting connections and, where a PING can be sent, done loading its data."""
        try:
            if self.unixsocket is not None:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(0.2)
                sock.connect(str(self.unixsocket))
            else:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            with sock:
                if self.tls is not None:
                    return True
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
                return bool(reply) and not reply.startswith(b"-LOADING")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
