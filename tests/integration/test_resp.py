"""The status writer's own Redis connection, against real Redis servers: the shared one, and a
private one with a password, an ACL user and a database other than 0, which a test may stop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import redis.asyncio as aioredis

from runner.queue.keys import Keys
from runner.reporting.stream import RedisStatusSink, Transition
from runner.resp import RespConnection, Script, load_missing_scripts, pack
from tests.conftest import REDIS_URL, RedisServer


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A Redis that wants a password ("pw" for the default user, "alice"/"apw" for an ACL user)."""
    server = RedisServer(tmp_path, "--requirepass", "pw")
    server.start()
    try:
        with redis.Redis(port=server.port, password="pw") as admin:
            admin.execute_command("ACL", "SETUSER", "alice", "on", ">apw", "~*", "&*", "+@all")
        yield server.port
    finally:
        server.stop()


@pytest.fixture
async def key() -> AsyncIterator[str]:
    name = f"test:resp:{uuid.uuid4().hex}"
    yield name
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.delete(name)
    await client.aclose()


def test_pack_writes_each_command_as_an_array_of_bulk_strings() -> None:
    packed = pack([(b"SET", "k\r\n", 12), ("GET", b"")])
    assert packed == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n*2\r\n$3\r\nGET\r\n$0\r\n\r\n"
    reader = hiredis.Reader()
    reader.feed(packed)
    assert reader.gets() == [b"SET", b"k\r\n", b"12"]
    assert reader.gets() == [b"GET", b""]


async def test_replies_come_back_in_order_with_errors_in_their_place(key: str) -> None:
    conn = RespConnection(REDIS_URL, timeout_s=5)
    try:
        replies = await conn.execute(
            [("HSET", key, "a", "1", "b", b"\x00\xff"), ("HGETALL", key), ("INCR", key)]
        )
        assert replies[0] == 2
        assert replies[1] == [b"a", b"1", b"b", b"\x00\xff"]
        assert isinstance(replies[2], hiredis.ReplyError)
        assert "WRONGTYPE" in str(replies[2])
        assert conn.connected  # a command's error is not the connection's
    finally:
        conn.close()


async def test_a_transaction_returns_exec_replies_and_a_refused_command_fails_all(
    key: str,
) -> None:
    conn = RespConnection(REDIS_URL, timeout_s=5)
    try:
        replies = await conn.execute([("RPUSH", key, "x"), ("LLEN", key)], transaction=True)
        assert replies == [1, 2 - 1]
        # Wrong arity is refused while queueing: EXEC aborts, nothing runs.
        refused = await conn.execute([("RPUSH", key, "y"), ("LLEN",)], transaction=True)
        assert all(isinstance(r, hiredis.ReplyError) for r in refused), refused
        assert "wrong number of arguments" in str(refused[0])
        assert await conn.execute([("LLEN", key)]) == [1]
    finally:
        conn.close()


async def test_large_batches_span_many_reads(key: str) -> None:
    conn = RespConnection(REDIS_URL, timeout_s=10)
    try:
        value = b"v" * 10_000
        replies = await conn.execute([("RPUSH", key, value)] * 500, transaction=True)
        assert replies == list(range(1, 501))
        assert await conn.execute([("LRANGE", key, 0, -1)]) == [[value] * 500]
    finally:
        conn.close()


async def test_auth_with_a_password_an_acl_user_and_a_database(private_redis: int) -> None:
    port = private_redis
    default = RespConnection(f"redis://:pw@127.0.0.1:{port}/3", timeout_s=5)
    alice = RespConnection(f"redis://alice:apw@127.0.0.1:{port}/3", timeout_s=5)
    try:
        assert await default.execute([("SET", "k", "from-default")]) == [b"OK"]
        assert await alice.execute([("GET", "k"), ("ACL", "WHOAMI")]) == [
            b"from-default",
            b"alice",
        ]
        check = aioredis.Redis(port=port, password="pw", db=0)
        assert await check.get("k") is None  # written in database 3, not 0
        await check.aclose()
    finally:
        default.close()
        alice.close()


async def test_a_wrong_password_is_a_connection_error_that_never_shows_it(
    private_redis: int,
) -> None:
    conn = RespConnection(f"redis://:secret-guess-123@127.0.0.1:{private_redis}/0", timeout_s=5)
    with pytest.raises(ConnectionError) as caught:
        await conn.execute([("PING",)])
    assert "refused the connection setup" in str(caught.value)
    assert "secret-guess-123" not in str(caught.value)
    assert not conn.connected


async def test_after_the_server_drops_the_connection_the_next_call_reconnects(key: str) -> None:
    conn = RespConnection(REDIS_URL, timeout_s=5)
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        (client_id,) = await conn.execute([("CLIENT", "ID")])
        await admin.execute_command("CLIENT", "KILL", "ID", str(client_id))
        with pytest.raises(OSError):
            await conn.execute([("PING",)])
        assert not conn.connected
        assert await conn.execute([("PING",)]) == [b"PONG"]
        (new_id,) = await conn.execute([("CLIENT", "ID")])
        assert new_id != client_id
    finally:
        conn.close()
        await admin.aclose()


async def test_a_server_that_never_answers_times_out_and_closes(unused_tcp_port: int) -> None:
    accepted: list[Any] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # reads what it is sent and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", unused_tcp_port)
    conn = RespConnection(f"redis://127.0.0.1:{unused_tcp_port}/0", timeout_s=0.3)
    try:
        with pytest.raises(TimeoutError):
            await conn.execute([("PING",)])
        assert accepted and not conn.connected
    finally:
        conn.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_decoding_connection_replaces_invalid_utf8_instead_of_failing(key: str) -> None:
    conn = RespConnection(REDIS_URL, timeout_s=5, decode=True)
    try:
        replies = await conn.execute([("SET", key, b"ok \xff"), ("GET", key), ("PING",)])
        assert replies == ["OK", "ok \ufffd", "PONG"]
    finally:
        conn.close()


async def test_calls_that_miss_their_script_are_sent_again_once_it_is_loaded(
    private_redis: int,
) -> None:
    conn = RespConnection(f"redis://:pw@127.0.0.1:{private_redis}/0", timeout_s=5)
    echo, add = Script("return ARGV[1]"), Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    try:
        await conn.execute([(b"SCRIPT", b"FLUSH")])
        commands = [echo.call((), ("a",)), (b"SET", "plain", "1"), add.call(("n",), (5,))]
        replies = await conn.execute(commands, transaction=True)
        assert [str(r).split()[0] for r in (replies[0], replies[2])] == ["NOSCRIPT", "NOSCRIPT"]

        replies = await load_missing_scripts(conn, (echo, add), commands, replies, transaction=True)

        assert replies == [b"a", b"OK", 5]
        assert await conn.execute([(b"GET", "n"), (b"SCRIPT", b"EXISTS", echo.sha, add.sha)]) == [
            b"5",
            [1, 1],
        ]
    finally:
        conn.close()


async def test_the_status_sink_still_writes_progress_and_log_lines_after_redis_lost_its_scripts(
    private_redis: int,
) -> None:
    # Given a BullMQ job, and a Redis that has forgotten every script (as after a restart)
    conn = RespConnection(f"redis://:pw@127.0.0.1:{private_redis}/0", timeout_s=5)
    sink = RedisStatusSink(conn, stream="bull:q:status", keys=Keys("bull", "q"))
    try:
        await conn.execute([(b"HSET", "bull:q:j1", b"name", b"workflow_run")])
        await conn.execute([(b"SCRIPT", b"FLUSH")])
        # When a transition with progress and a log line is written
        await sink.write(
            Transition(
                "run_1",
                "j1",
                event=b'{"seq":1}',
                seq=1,
                progress=b'{"progress":50}',
                log_lines=("step RUNNING",),
            )
        )
        # Then BullMQ's scripts were loaded and ran: everything is there, once
        replies = await conn.execute(
            [
                (b"LRANGE", "bull:q:j1:logs", 0, -1),
                (b"HGET", "bull:q:j1", b"progress"),
                (b"XLEN", "bull:q:status"),
                (b"HGET", "bull:q:run:run_1", b"seq"),
            ]
        )
        assert replies == [[b"step RUNNING"], b'{"progress":50}', 1, b"1"]
    finally:
        conn.close()
