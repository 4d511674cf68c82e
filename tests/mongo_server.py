"""A MongoDB wire-protocol server for tests: ``nx-27017`` on a free port in a temp dir.

Fixtures (register with ``pytest_plugins = ["tests.mongo_server"]``, or import them):

- ``mongo_uri``: a session-wide server (``--data-dir memory``) or, when ``MONGODB_URI`` is set,
  that server instead; tests keep apart by using their own database (``mongo_db_url``).
- ``mongo_db_url``: ``mongo_uri`` with a fresh database name in its path, one per test.
- ``restartable_mongo``: a server of the test's own, with its data in a temp dir so it survives
  ``stop()`` / ``start()`` on the same port (outage tests). Skipped under ``MONGODB_URI``, since
  a server we did not start is not ours to stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pymongo import MongoClient

START_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _executable() -> str:
    found = shutil.which("nx-27017") or str(Path(sys.executable).with_name("nx-27017"))
    if not Path(found).exists():
        pytest.skip("nx-27017 is not installed (pip install nx-27017 neosqlite)")
    return found


def with_database(uri: str, database: str) -> str:
    """``uri`` with ``database`` as its path; options and credentials kept."""
    return urlsplit(uri)._replace(path=f"/{database}").geturl()


class MongoServer:
    """One ``nx-27017`` process that can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, *, data_dir: str = "memory", port: int | None = None) -> None:
        self.workdir = workdir
        self.data_dir = data_dir
        self.port = port or _free_port()
        self.log_file = workdir / "nx-27017.log"
        self.pid_file = workdir / "nx-27017.pid"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        if self._process is not None:
            return
        self._process = subprocess.Popen(
            [
                _executable(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                self.data_dir,
                "--log-file",
                str(self.log_file),
                "--pid-file",
                str(self.pid_file),
            ],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_for_ping()

    def _wait_for_ping(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"nx-27017 exited at start:\n{self._log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                # Nothing to await but the port opening: poll it briefly.
                time.sleep(0.02)
                continue
            client: MongoClient[dict[str, object]] = MongoClient(
                self.uri, serverSelectionTimeoutMS=5000
            )
            try:
                client.admin.command("ping")
                return
            finally:
                client.close()
        self.stop()
        raise RuntimeError(f"nx-27017 did not answer ping in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("MONGODB_URI")
    if external:
        yield external
        return
    server = MongoServer(tmp_path_factory.mktemp("mongo"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def mongo_db_url(mongo_uri: str) -> Iterator[str]:
    database = f"runner_test_{uuid.uuid4().hex[:12]}"
    yield with_database(mongo_uri, database)
    client: MongoClient[dict[str, object]] = MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        client.drop_database(database)
    finally:
        client.close()


@pytest.fixture
def restartable_mongo(tmp_path: Path) -> Iterator[MongoServer]:
    if os.environ.get("MONGODB_URI"):
        pytest.skip("MONGODB_URI is set: the outage test needs a server it may stop")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = MongoServer(tmp_path, data_dir=str(data_dir))
    server.start()
    try:
        yield server
    finally:
        server.stop()
