"""Redis over raw RESP, for the runner's own hot paths: a connection whose commands are packed
and replies parsed by hiredis with one deadline per round trip, and ``Batches``, which sends
what many runs ask for meanwhile in one round trip.

The status writer sends one ``MULTI``/``EXEC`` of some hundred commands per round trip, and
completions of many jobs go out together. Through redis-py's pipeline each command went through
its encoder and packer, and each reply was read under its own timeout: a quarter of the
runner's CPU on a three-step workflow (``docs/dev/performance-notebook.md``). ``RespConnection`` does only
what batches need: write one buffer, read as many replies, all within one timeout. After any
failure it closes; the next call connects again.

Connection options come from the same ``RUNNER_REDIS_URL`` as the rest of the runner
(``runner.redis_connect``): host, port, database, username, password, TLS (``ssl_*``
parameters). Behind Sentinel each connect asks the sentinels for the master; on a Cluster a
``MOVED`` reply names the slot's owner, and the commands go there at once (every key the
runner writes is in the queue's slot). A reply that says the node cannot take writes now
(``READONLY`` after a failover, ``TRYAGAIN``, ``CLUSTERDOWN``, ``ASK`` during a slot move,
``LOADING``, ``MASTERDOWN``) closes the connection and raises ``ConnectionError``, so callers
retry as after any lost connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import hiredis
from redis.asyncio.connection import parse_url

from runner import redis_connect
from runner.deadline import deadline
from runner.log import log

Arg = bytes | str | int
# A command's arguments, or the command already packed (``packed_head`` and ``bulk``).
Command = tuple[Arg, ...] | bytes

ReplyError = hiredis.ReplyError

# Replies that mean "not here, not now": the batch did not run; connect again and resend.
_UNAVAILABLE = (b"READONLY", b"TRYAGAIN", b"CLUSTERDOWN", b"ASK ", b"LOADING", b"MASTERDOWN")
_UNAVAILABLE_TEXT = tuple(p.decode() for p in _UNAVAILABLE)


class Redirected(ConnectionError):
    """A ``MOVED`` reply: the slot lives on another node, which the connection now knows."""


def pack(commands: list[Command]) -> bytes:
    """RESP arrays of bulk strings, the form Redis reads every command in (hiredis packs them
    in C, three times as fast as the same loop in Python); a packed command goes as it is."""
    pack_command = hiredis.pack_command
    return b"".join(
        # hiredis's stub types the argument as a one-element tuple; it takes any length.
        [c if c.__class__ is bytes else pack_command(c) for c in commands]  # type: ignore[arg-type]
    )


def packed_head(total: int, *head: Arg) -> bytes:
    """The packed start of a command of ``total`` arguments, of which ``head`` are the first:
    append the rest with ``bulk`` to make the command. For a command sent many times with the
    same first arguments (the status stream's ``XADD``, a run's script calls): packing those
    once halved what the status sink spends on a transition (4.2 to 1.9 µs, commands and
    packing; ``docs/dev/performance-notebook.md``)."""
    if total < len(head):
        raise ValueError(f"a command of {total} arguments cannot start with {len(head)}")
    # hiredis's stub types the argument as a one-element tuple; it takes any length.
    packed = hiredis.pack_command(head)  # type: ignore[arg-type]
    return b"*%d\r\n%s" % (total, packed[packed.index(b"\r\n") + 2 :])


def bulk(value: bytes) -> bytes:
    """One argument, packed: a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class Script:
    """A Lua script called by SHA: the SHA is the script's SHA-1, as Redis computes it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def call(self, keys: Sequence[Arg], args: Sequence[Arg]) -> Command:
        return (*self.head(*keys), *args)

    def head(self, *keys: Arg) -> tuple[Arg, ...]:
        """A call's arguments up to the script's own."""
        return (b"EVALSHA", self.sha, len(keys), *keys)


class Executor(Protocol):
    """What a batch needs of a connection: ``RespConnection``, or a stand-in (the bench's
    in-process loops, tests)."""

    async def execute(self, commands: list[Command], *, transaction: bool = False) -> list[Any]:
        """As ``RespConnection.execute``."""
        ...


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


async def load_missing_scripts(
    connection: Executor,
    scripts: Sequence[Script],
    commands: list[Command],
    replies: list[Any],
) -> list[Any]:
    """Where a call's reply is NOSCRIPT (Redis lost its script cache, after a restart: nothing
    of that call ran), load the scripts and send those calls again; the replies with the
    second answers in their places. The loads and the calls go in one ``MULTI``/``EXEC``, so
    no flush of the cache can come between them (the calls of a batch that was not a
    transaction still succeed or fail one by one: Redis does not roll a transaction back)."""
    missed = [i for i, reply in enumerate(replies) if is_noscript(reply)]
    if not missed:
        return replies
    loads: list[Command] = [(b"SCRIPT", b"LOAD", s.text) for s in scripts]
    again = await connection.execute([*loads, *(commands[i] for i in missed)], transaction=True)
    for reply in again[: len(loads)]:
        if isinstance(reply, ReplyError):
            raise ConnectionError(f"Redis refused a script: {reply}")
    replies = list(replies)
    for i, reply in zip(missed, again[len(loads) :], strict=True):
        replies[i] = reply
    return replies


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """As redis-py builds it from the URL's ``ssl_*`` parameters: verified against the system
    store or ``ssl_ca_certs``, host name checked, unless ``ssl_cert_reqs=none``."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "0"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif options.get("ssl_check_hostname") is False:
        context.check_hostname = False
    return context


class RespConnection:
    """One Redis connection for one caller at a time (``Batches`` keeps one batch in flight; the
    cancel reader is alone on its own): calls that overlapped would interleave replies."""

    def __init__(self, url: str, *, timeout_s: float, decode: bool = False) -> None:
        """``decode``: bulk strings come back as ``str`` (UTF-8, invalid bytes replaced), as
        from a redis-py client with ``decode_responses``; else as ``bytes``."""
        self.target = redis_connect.parse(url)
        if self.target.kind == "single":
            self.options: dict[str, Any] = dict(parse_url(url))
            self.tls = url.startswith("rediss://")
        else:
            t = self.target
            self.options = {"username": t.username, "password": t.password, "db": t.db}
            self.options.update(t.tls_options())
            self.tls = t.tls
        # Cluster: the node a MOVED named; the seed to try next when it is unknown or gone.
        self._address: tuple[str, int] | None = None
        self._seed = 0
        self.timeout_s = timeout_s
        self.decode = decode
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = self._new_parser()

    def _new_parser(self) -> hiredis.Reader:
        # Invalid UTF-8 (a job written by something other than BullMQ) is replaced rather than
        # raised: raising would fail every reply of the batch and leave the connection unread.
        if self.decode:
            return hiredis.Reader(encoding="utf-8", errors="replace")
        return hiredis.Reader()

    async def execute(self, commands: list[Command], *, transaction: bool = False) -> list[Any]:
        """Send the commands in one write and return their replies, in order. A command's
        error is returned as a ``ReplyError`` in its place, not raised. With ``transaction``
        they run inside ``MULTI``/``EXEC``. Raises ``OSError`` (``ConnectionError``,
        ``TimeoutError``) when the connection fails; the connection is then closed."""
        for _ in range(3):
            try:
                return await self._execute(commands, transaction)
            except Redirected:
                continue  # straight to the node the MOVED named
        raise ConnectionError("Redis Cluster kept redirecting the commands")

    async def _execute(self, commands: list[Command], transaction: bool) -> list[Any]:
        try:
            async with deadline(self.timeout_s):
                if self._writer is None:
                    await self._connect()
                if not transaction:
                    replies = await self._round_trip(commands)
                    self._check_available(replies)
                    return replies
                replies = await self._round_trip([(b"MULTI",), *commands, (b"EXEC",)])
                self._check_available(replies[1:-1])
                result = replies[-1]
                if isinstance(result, ReplyError):
                    # EXECABORT: a command was refused while queueing; name the first refusal.
                    refused = next((r for r in replies[1:-1] if isinstance(r, ReplyError)), result)
                    return [refused] * len(commands)
                if result is None:
                    raise ConnectionError("Redis discarded the transaction")
                return list(result)
        except BaseException:
            self.close()
            raise

    def _check_available(self, replies: list[Any]) -> None:
        for reply in replies:
            if reply.__class__ is not ReplyError:
                continue
            text = str(reply)
            if text.startswith("MOVED ") and self.target.kind == "cluster":
                host, _, port = text.split(" ")[-1].rpartition(":")
                current = self._address or self.target.nodes[0]
                self._address = (host or current[0], int(port))
                raise Redirected(text)
            if text.startswith(_UNAVAILABLE_TEXT) or text.startswith("MOVED "):
                raise ConnectionError(f"Redis cannot take the commands now: {text[:120]}")

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        assert self._writer is not None and self._reader is not None
        self._writer.write(pack(commands))
        replies: list[Any] = []
        parser, reader = self._parser, self._reader
        while len(replies) < len(commands):
            reply = parser.gets()
            if reply is False:
                data = await reader.read(262_144)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                parser.feed(data)
                continue
            replies.append(reply)
        return replies

    async def _connect(self) -> None:
        o = self.options
        if "path" in o:
            self._reader, self._writer = await asyncio.open_unix_connection(o["path"])
        else:
            context = _tls_context(o) if self.tls else None
            host, port = await self._where()
            try:
                self._reader, self._writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if context else None
                )
            except OSError:
                if self.target.kind == "cluster":
                    # The node is gone (a failover): start again from the next seed.
                    self._address = None
                    self._seed += 1
                raise
        self._parser = self._new_parser()
        setup: list[Command] = []
        if o.get("password") is not None:
            user = o.get("username")
            setup.append(("AUTH", user, o["password"]) if user else ("AUTH", o["password"]))
        if int(o.get("db", 0) or 0):
            setup.append(("SELECT", int(o["db"])))
        if setup:
            for reply in await self._round_trip(setup):
                if isinstance(reply, ReplyError):
                    # The server's words (wrong password, no such user): never the password.
                    raise ConnectionError(f"Redis refused the connection setup: {reply}")

    async def _where(self) -> tuple[str, int]:
        t = self.target
        if t.kind == "single":
            return self.options.get("host", "127.0.0.1"), int(self.options.get("port", 6379))
        if t.kind == "sentinel":
            return await redis_connect.locate(t, min(self.timeout_s, 5.0))
        return self._address or t.nodes[self._seed % len(t.nodes)]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    @property
    def connected(self) -> bool:
        return self._writer is not None


Item = TypeVar("Item")


class Batches(Generic[Item]):
    """Items submitted while a batch is in flight go out together in the next one, one batch in
    flight at a time, so the order of submission is the order of execution.

    ``execute`` turns a batch into one result per item (an ``Exception`` result fails only its
    item). Through a connection failure the batch is sent again until it succeeds or the outage
    outlasts ``outage_s``: callers must make a repeat harmless.
    """

    def __init__(
        self,
        execute: Callable[[list[Item]], Awaitable[list[Any]]],
        *,
        name: str,
        outage_s: float = 120.0,
    ) -> None:
        self.execute = execute
        self.name = name
        self.outage_s = outage_s
        self.sent = 0
        self._pending: list[tuple[Item, asyncio.Future[Any] | None]] = []
        self._drainer: asyncio.Task[None] | None = None

    def submit(self, *items: Item) -> asyncio.Future[Any]:
        """Queue the items for the next batch (all of them in the same one); the future
        resolves with the last item's result when that batch is done."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending = self._pending
        for item in items[:-1]:
            pending.append((item, None))
        pending.append((items[-1], future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return future

    async def _drain(self) -> None:
        while self._pending:
            # One turn of the event loop first: callbacks already due (responses that came in,
            # runs that just finished a step) add their items to this batch rather than to the
            # next round trip.
            await asyncio.sleep(0)
            batch, self._pending = self._pending, []
            try:
                results = await self._send([item for item, _ in batch])
            except BaseException as err:
                for _, future in batch:
                    if future is not None and not future.done():
                        failure = err if isinstance(err, Exception) else RuntimeError("cancelled")
                        future.set_exception(failure)
                if not isinstance(err, Exception):
                    raise
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if future is None or future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def _send(self, batch: list[Item]) -> list[Any]:
        deadline = time.monotonic() + self.outage_s
        delay_s = 0.05
        while True:
            try:
                results = await self.execute(batch)
            except OSError as err:
                if time.monotonic() > deadline:
                    raise
                log.warning(f"{self.name}.retry", items=len(batch), error=type(err).__name__)
            else:
                self.sent += 1
                return results
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)
