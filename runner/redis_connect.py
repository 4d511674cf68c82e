"""Every Redis connection of the runner is built here, from ``RUNNER_REDIS_URL``, in one of three
topologies:

- a single node: ``redis://``, ``rediss://`` (TLS), ``unix://``;
- Sentinel: ``redis+sentinel://[user:pass@]host:port[,host:port...]/<master>[/<db>]`` (and
  ``rediss+sentinel://``); the credentials are the master's, the sentinels' go in the query as
  ``sentinel_username`` / ``sentinel_password`` when they differ;
- Cluster: ``redis+cluster://[user:pass@]host:port[,host:port...]`` (and ``rediss+cluster://``)
  naming seed nodes; the queue prefix must carry a ``{hash-tag}``.

redis-py does the work (``redis.asyncio.sentinel`` finds the master and follows a failover;
``RedisCluster`` follows MOVED/ASK and refreshes its slots): well kept, and already the
client under BullMQ. The raw RESP connections (``runner.resp``) ask ``locate`` where to go
on each connect and treat a redirection as a lost connection.

``preflight`` runs once at start and turns a wrong endpoint into one line naming the problem
and the setting to change; ``describe`` does the same for connection errors.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.crc import key_slot

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# Query parameters that are the sentinels' own, not the master's.
_SENTINEL_ONLY = ("sentinel_username", "sentinel_password")
# Query parameters passed to every connection (TLS files and checks).
_TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


class RedisSetupError(Exception):
    """A wrong ``RUNNER_REDIS_URL`` or endpoint: the message is one line, safe to log (no
    password), naming the problem and the setting to change."""


@dataclass(frozen=True)
class RedisTarget:
    kind: str  # "single", "sentinel" or "cluster"
    url: str  # the single node's URL (kind "single")
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels or cluster seeds
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def tls_options(self) -> dict[str, Any]:
        """redis-py's ``ssl_*`` keywords from the URL's query."""
        if not self.tls:
            return {}
        opts: dict[str, Any] = {"ssl_cert_reqs": "required"}
        for name in _TLS_PARAMS:
            if name in self.params:
                value: Any = self.params[name]
                if name == "ssl_check_hostname":
                    value = value.lower() not in ("false", "0", "no")
                opts[name] = value
        return opts


def parse(url: str) -> RedisTarget:
    """The topology a URL names; ``RedisSetupError`` (one line) when it names none."""
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in (*SINGLE_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        shown = scheme if sep else "(none)"
        raise RedisSetupError(
            f"RUNNER_REDIS_URL: unknown scheme {shown!r}; use redis://, rediss://, unix://, "
            "redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"
        )
    if scheme in SINGLE_SCHEMES:
        try:
            parse_url(url)
        except ValueError as err:
            raise RedisSetupError(f"RUNNER_REDIS_URL: {err}") from None
        return RedisTarget(kind="single", url=url, tls=scheme == "rediss")
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes: list[tuple[str, int]] = []
    default_port = 26379 if scheme in SENTINEL_SCHEMES else 6379
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        host = host.strip("[]")
        if not host:
            raise RedisSetupError(f"RUNNER_REDIS_URL: an empty host in {scheme}://")
        try:
            nodes.append((host, int(port) if port else default_port))
        except ValueError:
            raise RedisSetupError(f"RUNNER_REDIS_URL: port {port!r} is not a number") from None
    params = dict(parse_qsl(parts.query))
    tls = scheme.startswith("rediss")
    common: dict[str, Any] = {
        "url": url,
        "tls": tls,
        "nodes": tuple(nodes),
        "username": unquote(username) or None,
        "password": unquote(password) or None,
        "params": params,
    }
    if scheme in CLUSTER_SCHEMES:
        if parts.path.strip("/"):
            raise RedisSetupError(
                "RUNNER_REDIS_URL: a Redis Cluster has only database 0; drop the path after "
                "the seed nodes"
            )
        return RedisTarget(kind="cluster", **common)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise RedisSetupError(
            "RUNNER_REDIS_URL: redis+sentinel:// needs the master's name: "
            "redis+sentinel://host:26379[,host:port...]/<master-name>[/<db>]"
        )
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise RedisSetupError(f"RUNNER_REDIS_URL: database {path[1]!r} is not a number") from None
    return RedisTarget(
        kind="sentinel",
        master=unquote(path[0]),
        db=db,
        sentinel_username=params.get("sentinel_username"),
        sentinel_password=params.get("sentinel_password"),
        **common,
    )


def _single_options(url: str) -> dict[str, Any]:
    opts: dict[str, Any] = dict(parse_url(url))
    # parse_url names a connection class, which Redis() does not take: say it its own way.
    kind = opts.pop("connection_class", None)
    if kind is not None and issubclass(kind, UnixDomainSocketConnection):
        opts["unix_socket_path"] = opts.pop("path")
    elif kind is not None and issubclass(kind, SSLConnection):
        opts["ssl"] = True
    return opts


def _timeouts(socket_timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": min(socket_timeout_s, 10.0),
        "socket_keepalive": True,
    }


def _sentinel(target: RedisTarget, socket_timeout_s: float) -> Sentinel:
    sentinel_kwargs: dict[str, Any] = {
        **_timeouts(min(socket_timeout_s, 5.0)),
        "username": target.sentinel_username,
        "password": target.sentinel_password,
    }
    if target.tls:
        sentinel_kwargs.update({"ssl": True, **target.tls_options()})
    return Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)


def _sentinel_pool(
    target: RedisTarget, socket_timeout_s: float, *, decode: bool, health: bool
) -> SentinelConnectionPool:
    kwargs: dict[str, Any] = {
        **_timeouts(socket_timeout_s),
        "db": target.db,
        "username": target.username,
        "password": target.password,
        "decode_responses": decode,
    }
    if health:
        kwargs["health_check_interval"] = 15
    if target.tls:
        kwargs.update({"ssl": True, **target.tls_options()})
    return SentinelConnectionPool(target.master, _sentinel(target, socket_timeout_s), **kwargs)  # type: ignore[no-untyped-call]


def _cluster(target: RedisTarget, socket_timeout_s: float, *, decode: bool) -> RedisCluster:
    kwargs: dict[str, Any] = {
        **_timeouts(socket_timeout_s),
        "username": target.username,
        "password": target.password,
        "decode_responses": decode,
    }
    if target.tls:
        kwargs.update({"ssl": True, **target.tls_options()})
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        require_full_coverage=False,
        **kwargs,
    )


def bullmq_connection(url: str, socket_timeout_s: float) -> Any:
    """What a bullmq ``Worker``/``Queue`` takes as ``connection``: the keywords of a
    ``redis.asyncio.Redis`` (a Sentinel pool among them), or a ``RedisCluster``."""
    target = parse(url)
    if target.kind == "cluster":
        return _cluster(target, socket_timeout_s, decode=True)
    if target.kind == "sentinel":
        # The worker's two clients each take one connection from the one pool.
        return {
            "connection_pool": _sentinel_pool(target, socket_timeout_s, decode=True, health=True),
        }
    return {**_single_options(url), **_timeouts(socket_timeout_s), "health_check_interval": 15}


def client(url: str, socket_timeout_s: float, *, retry: bool = True) -> Any:
    """A redis-py client of the runner's own (run checkpoints, OAuth2 coordination, health):
    ``redis.asyncio.Redis`` or ``RedisCluster``, bytes in and out."""
    target = parse(url)
    if target.kind == "cluster":
        return _cluster(target, socket_timeout_s, decode=False)
    extra: dict[str, Any] = {} if retry else {"retry": None}
    if target.kind == "sentinel":
        pool = _sentinel_pool(target, socket_timeout_s, decode=False, health=retry)
        return aioredis.Redis(connection_pool=pool, **extra)
    opts = {**_single_options(url), **_timeouts(socket_timeout_s), **extra}
    if retry:
        opts["health_check_interval"] = 15
    return aioredis.Redis(**opts)


async def locate(target: RedisTarget, timeout_s: float) -> tuple[str, int]:
    """Where a raw connection goes now: the master the sentinels name (asked each time, so a
    failover is followed on the next connect), or a cluster's first reachable seed (its
    MOVED replies then name the slot's owner)."""
    if target.kind == "sentinel":
        sentinel = _sentinel(target, timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                host, port = await sentinel.discover_master(target.master)
        except Exception as err:
            raise ConnectionError(
                f"no sentinel named a master for {target.master!r}: {describe(err)}"
            ) from None
        finally:
            for s in sentinel.sentinels:
                await s.aclose()
        return str(host), int(port)
    return target.nodes[0]


def hash_tag(prefix: str) -> str | None:
    """The ``{tag}`` of a key prefix as Redis Cluster reads it (the first ``{...}`` with
    something inside), or ``None``."""
    start = prefix.find("{")
    if start < 0:
        return None
    end = prefix.find("}", start + 1)
    if end <= start + 1:
        return None
    return prefix[start + 1 : end]


async def preflight(url: str, prefix: str, timeout_s: float = 5.0) -> None:
    """Check the endpoint before the first job: ``RedisSetupError`` with one line naming what
    is wrong (a sentinel or a cluster node given as a server, a replica, an eviction policy,
    a prefix without a hash tag on a cluster) and what to change."""
    target = parse(url)
    if target.kind == "cluster" and hash_tag(prefix) is None:
        raise RedisSetupError(
            f"RUNNER_QUEUE_PREFIX {prefix!r} has no {{hash-tag}}: on Redis Cluster every key of "
            "a queue must be in one slot; set RUNNER_QUEUE_PREFIX={bull} (and the same prefix "
            "in the producers, the status sink and Bull Board)"
        )
    probe = client(url, timeout_s, retry=False)
    try:
        async with asyncio.timeout(timeout_s * 2):
            await check(probe, target, prefix)
    except RedisSetupError:
        raise
    except Exception as err:
        raise RedisSetupError(f"Redis at {where(target)}: {describe(err)}") from None
    finally:
        await probe.aclose()


async def check(probe: Any, target: RedisTarget, prefix: str) -> None:
    """``INFO`` of the node that holds the queue (on a cluster, its slot's owner) through
    ``probe`` (a ``client``), checked by ``check_info``; the client's errors propagate."""
    if target.kind == "cluster":
        if not probe.get_nodes():
            await probe.initialize()  # connects and loads the slots
        owner = probe.get_node_from_key(hash_tag(prefix) or "")
        info = await probe.execute_command("INFO", target_nodes=owner)
    else:
        info = await probe.info()
    check_info(target, info)


def check_info(target: RedisTarget, info: dict[str, Any]) -> None:
    """The start-up checks on a node's ``INFO``; see ``preflight``."""
    at = where(target)

    def text(name: str) -> str:
        value = info.get(name, "")
        return value.decode() if isinstance(value, bytes) else str(value)

    mode = text("redis_mode")
    if mode == "sentinel":
        raise RedisSetupError(
            f"Redis at {at} is a Sentinel, not a server: set RUNNER_REDIS_URL="
            "redis+sentinel://host:port/<master-name> to reach the master it watches"
        )
    if target.kind != "cluster" and (mode == "cluster" or text("cluster_enabled") == "1"):
        raise RedisSetupError(
            f"Redis at {at} is a Redis Cluster node (it answers MOVED for slots it does not "
            "own): set RUNNER_REDIS_URL=redis+cluster://host:port[,host:port...] and a "
            "hash-tagged RUNNER_QUEUE_PREFIX such as {bull}"
        )
    if text("role") == "slave":
        raise RedisSetupError(
            f"Redis at {at} is a read-only replica: point RUNNER_REDIS_URL at the master (or "
            "use redis+sentinel:// so that the runner finds it)"
        )
    policy = text("maxmemory_policy")
    if policy and policy != "noeviction":
        raise RedisSetupError(
            f"Redis at {at} has maxmemory-policy {policy}: it may evict queue keys and lose "
            "jobs; set maxmemory-policy noeviction on the server"
        )


def where(target: RedisTarget) -> str:
    """The endpoint, without credentials."""
    if target.kind == "single":
        from runner.redact import Redactor

        return Redactor().url(target.url)
    nodes = ",".join(f"{h}:{p}" for h, p in target.nodes)
    return f"{nodes}/{target.master}" if target.kind == "sentinel" else nodes


def describe(err: BaseException) -> str:
    """A connection error in one line that says what went wrong (refused, a certificate
    problem, a timeout, the server's own words), never a password."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return f"TLS failed: {current.reason or current}"
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        current = current.__cause__ or current.__context__
    text = str(err)
    lowered = text.lower()
    if "certificate verify failed" in lowered:
        detail = text.split("certificate verify failed:", 1)[-1].strip(" )")
        return f"TLS certificate verification failed: {detail or text}"
    if "connection refused" in lowered or "errno 111" in lowered:
        return "connection refused"
    if isinstance(err, TimeoutError | asyncio.TimeoutError) or "timeout" in lowered:
        return "timed out"
    if "unknown command" in lowered and ("evalsha" in lowered or "info" in lowered):
        return f"{text} (is this a Sentinel port?)"
    return f"{type(err).__name__}: {text}"[:300]


__all__ = [
    "RedisSetupError",
    "RedisTarget",
    "bullmq_connection",
    "check",
    "check_info",
    "client",
    "describe",
    "hash_tag",
    "key_slot",
    "locate",
    "parse",
    "preflight",
    "where",
]
