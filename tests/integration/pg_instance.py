"""A throwaway PostgreSQL server on a spare port, for tests that stop or break the database.

The shared server on 127.0.0.1:5432 must never be stopped; a test that needs an outage starts one
of these, breaks it, and removes it. PostgreSQL refuses to run as root, so as root its binaries run
as the `postgres` user (runuser) in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path:
    """Where initdb and pg_ctl live: Debian keeps them off the PATH."""
    candidates: list[Path] = []
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        )
        candidates.append(Path(out.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += [
        Path(p)
        for p in sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(p.split("/")[-2]),
            reverse=True,
        )
    ]
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")


def spare_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgInstance:
    """initdb once, then start/stop as often as a test likes, on the same port and data."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or spare_port()
        self._bindir = _bindir()
        self._root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self._data = self._root / "data"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self._root, user="postgres", group="postgres")
        self._run(
            "initdb", "-D", str(self._data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self._data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self._data), "-o", options, "-l", str(self._root / "server.log"),
            "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` cuts every connection, as a crash or restart would."""
        self._run("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        if (self._data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self._root, ignore_errors=True)

    def _run(self, binary: str, *args: str) -> None:
        cmd = [str(self._bindir / binary), *args]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
