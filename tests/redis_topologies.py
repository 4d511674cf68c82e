"""Redis Sentinel and Redis Cluster of a test's (or the bench's) own, on free ports, with Debian's
``redis-server``, ``redis-sentinel`` and ``redis-cli``: never the shared Redis.

- ``SentinelSet``: one master, one replica, three sentinels (quorum 2, down after 1 s).
- ``ClusterSet``: three masters, each with a replica (``redis-cli --cluster create``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import RedisServer, free_port


def _command(port: int, *args: str, timeout_s: float = 5.0) -> str:
    """One command through ``redis-cli``; its reply as text (errors included)."""
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    return (out.stdout + out.stderr).decode(errors="replace").strip()


def wait_until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Sentinel:
    def __init__(self, directory: Path, master_port: int, name: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.conf = directory / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {name} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 5000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-sentinel")
        # redis-sentinel is redis-server under another name; --sentinel makes it one too.
        argv = (
            [binary, str(self.conf)] if binary else ["redis-server", str(self.conf), "--sentinel"]
        )
        log = (self.directory / f"sentinel-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: _command(self.port, "PING") == "PONG", 10, "a sentinel to start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class SentinelSet:
    def __init__(self, directory: Path, name: str = "mymaster") -> None:
        self.name = name
        (directory / "master").mkdir()
        (directory / "replica").mkdir()
        self.master = RedisServer(directory / "master")
        self.replica = RedisServer(
            directory / "replica", "--replicaof", "127.0.0.1", str(self.master.port)
        )
        self.sentinels = [Sentinel(directory, self.master.port, name) for _ in range(3)]

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.name}/0"

    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_until(
            lambda: "master_link_status:up" in _command(self.replica.port, "INFO", "replication"),
            15,
            "the replica to sync",
        )
        for s in self.sentinels:
            s.start()
        for s in self.sentinels:
            wait_until(
                lambda s=s: (
                    _command(s.port, "SENTINEL", "replicas", self.name).count("ip") >= 1
                    and _command(s.port, "SENTINEL", "sentinels", self.name).count("ip") >= 2
                ),
                20,
                "the sentinels to see the replica and each other",
            )

    def master_port(self) -> int:
        reply = _command(self.sentinels[0].port, "SENTINEL", "get-master-addr-by-name", self.name)
        return int(reply.split()[-1])

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: the replica becomes the master."""
        before = self.master_port()
        reply = _command(self.sentinels[0].port, "SENTINEL", "failover", self.name)
        assert reply == "OK", reply
        wait_until(lambda: self.master_port() != before, 20, "the sentinels to promote")

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master; the sentinels promote the other after 1 s."""
        port = self.master_port()
        server = next(s for s in self.servers() if s.port == port)
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        wait_until(lambda: self.master_port() != port, 30, "the sentinels to promote")
        return server

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for server in self.servers():
            server.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too: at most 55535."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55000)
        if not port_open(port) and not port_open(port + 10000):
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise AssertionError("no free port pair for a cluster node")


class ClusterSet:
    def __init__(self, directory: Path) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(6):
            d = directory / f"node{i}"
            d.mkdir()
            node = RedisServer(
                d,
                *("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
                *("--cluster-config-file", "nodes.conf", "--appendonly", "no"),
            )
            node.port = cluster_port()
            self.nodes.append(node)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        out = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
        for node in self.nodes:
            wait_until(
                lambda node=node: "cluster_state:ok" in _command(node.port, "CLUSTER", "INFO"),
                30,
                "the cluster to settle",
            )
        # Every replica linked to its master, so that a CLUSTER FAILOVER can go ahead.
        for node in self.nodes:
            wait_until(
                lambda node=node: (
                    "role:master" in _command(node.port, "INFO", "replication")
                    or "master_link_status:up" in _command(node.port, "INFO", "replication")
                ),
                30,
                "the replicas to sync",
            )

    def owner_port(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot now."""
        slot = int(_command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key))
        for line in _command(self.nodes[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise AssertionError(f"no master owns slot {slot}")

    def failover(self, key: str) -> None:
        """``CLUSTER FAILOVER`` on the replica of the master of ``key``'s slot."""
        owner = self.owner_port(key)
        owner_id = _command(owner, "CLUSTER", "MYID")
        replica = next(n for n in self.nodes if self._master_of(n.port) == owner_id)
        reply = _command(replica.port, "CLUSTER", "FAILOVER")
        assert reply == "OK", reply
        wait_until(lambda: self.owner_port(key) == replica.port, 30, "the replica to take over")

    @staticmethod
    def _master_of(port: int) -> str | None:
        for line in _command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "myself" in fields[2]:
                return fields[3] if "slave" in fields[2] else None
        return None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
