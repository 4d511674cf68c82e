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
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.queue.keys import Keys
from runner.reporting.stream import RedisStatusSink, Transition
from runner.resp import (
    Command,
    RespConnection,
    Script,
    bulk,
    load_missing_scripts,
    pack,
    packed_head,
)
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


def test_a_packed_head_and_bulk_strings_make_the_command_hiredis_packs() -> None:
    head = packed_head(4, b"HSET", "k é")
    assert head + bulk(b"f") + bulk(b"v\r\n") == pack([(b"HSET", "k é", b"f", "v\r\n")])
    # A packed command goes out as it is, beside commands given as arguments.
    assert pack([head + bulk(b"f") + bulk(b"v"), (b"GET", b"k")]) == pack(
        [(b"HSET", "k é", b"f", b"v"), (b"GET", b"k")]
    )
    with pytest.raises(ValueError, match="2 arguments cannot start with 3"):
        packed_head(2, b"A", b"B", b"C")


class _Recorder:
    """A connection that keeps what it is asked to send and answers every command."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def execute(self, commands: list[Any], *, transaction: bool = False) -> list[Any]:
        self.sent.append(pack(commands))
        return [1] * len(commands)


_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_transitions = st.builds(
    Transition,
    run_id=_texts.filter(bool),
    job_id=_texts.filter(bool),
    event=st.one_of(st.none(), st.binary(max_size=60)),
    seq=st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
    checkpoint=st.one_of(st.none(), st.dictionaries(_texts, st.binary(max_size=30), max_size=3)),
    progress=st.one_of(st.none(), st.binary(max_size=30)),
    log_lines=st.lists(_texts, max_size=3).map(tuple),
    keep_logs=st.integers(min_value=0, max_value=1000),
    renew=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_transitions, min_size=1, max_size=4))
def test_the_status_sink_sends_the_commands_hiredis_would_pack(batch: list[Transition]) -> None:
    # The sink packs each command from heads packed once per run; the bytes must be those of
    # the commands written out argument by argument, as CONTRACT §6 lists them.
    keys = Keys("bull", "q")
    recorder = _Recorder()
    sink = RedisStatusSink(recorder, stream="bull:q:status", keys=keys)
    sha_progress, sha_log = stream_scripts()
    expected: list[Command] = []
    for t in batch:
        if t.event is not None:
            expected.append(
                (b"XADD", "bull:q:status", b"MAXLEN", b"~", 100_000, b"*", b"event", t.event)
            )
            fields: list[Any] = [b"seq", t.seq or 0]
            for name, value in (t.checkpoint or {}).items():
                fields += (name, value)
            expected.append((b"HSET", keys.run(t.run_id), *fields))
            if t.renew:
                expected.append((b"EXPIRE", keys.run(t.run_id), sink.retention_s))
        elif t.checkpoint:
            fields = [part for item in t.checkpoint.items() for part in item]
            expected.append((b"HSET", keys.run(t.run_id), *fields))
        job_key = keys.job(t.job_id)
        if t.progress is not None:
            expected.append(
                (
                    b"EVALSHA",
                    sha_progress,
                    3,
                    job_key,
                    keys.events(),
                    keys.meta(),
                    t.job_id,
                    t.progress,
                )
            )
        for line in t.log_lines:
            keep = str(t.keep_logs) if t.keep_logs else ""
            expected.append(
                (b"EVALSHA", sha_log, 2, job_key, keys.job_logs(t.job_id), t.job_id, line, keep)
            )
    # Twice: the second time from the heads the first made.
    for _ in range(2):
        asyncio.run(sink._execute(list(batch)))
        assert recorder.sent.pop() == pack(expected)


def stream_scripts() -> tuple[str, str]:
    from runner.reporting import stream

    return stream._UPDATE_PROGRESS.sha, stream._ADD_LOG.sha


async def test_a_transition_lands_whole_with_multibyte_ids_and_a_lone_surrogate(key: str) -> None:
    # Given a BullMQ job whose id and run id are not ASCII
    conn = RespConnection(REDIS_URL, timeout_s=5)
    keys = Keys(key, "q ü")
    sink = RedisStatusSink(conn, stream=f"{key}:status", keys=keys)
    job_id, run_id = "j-ü-1", "run-日本"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.hset(keys.job(job_id), "name", "workflow_run")
        # When a transition with a checkpoint, progress and log lines is written, one line
        # holding a lone surrogate (JSON's "\udc80" decodes to one)
        await sink.write(
            Transition(
                run_id,
                job_id,
                event='{"seq":7,"note":"é"}'.encode(),
                seq=7,
                checkpoint={"step:ß": b'{"status":"SUCCESS"}'},
                progress=b'{"progress":50}',
                log_lines=("ß SUCCESS", "bad \udc80 line"),
                keep_logs=10,
                renew=True,
            )
        )
        # Then every part is where BullMQ and the contract put it, the surrogate replaced
        events = await client.xrange(f"{key}:status")
        assert [fields[b"event"] for _, fields in events] == ['{"seq":7,"note":"é"}'.encode()]
        assert await client.hgetall(keys.run(run_id)) == {
            b"seq": b"7",
            "step:ß".encode(): b'{"status":"SUCCESS"}',
        }
        assert 0 < await client.ttl(keys.run(run_id)) <= sink.retention_s
        assert await client.hget(keys.job(job_id), "progress") == b'{"progress":50}'
        assert await client.lrange(keys.job_logs(job_id), 0, -1) == [
            "ß SUCCESS".encode(),
            b"bad ? line",
        ]
    finally:
        await client.delete(
            f"{key}:status", keys.run(run_id), keys.job(job_id), keys.job_logs(job_id)
        )
        await client.aclose()
        conn.close()


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

        sent: list[tuple[list[Command], bool]] = []

        class Recording:
            async def execute(self, cmds: list[Command], *, transaction: bool = False) -> list[Any]:
                sent.append((cmds, transaction))
                return await conn.execute(cmds, transaction=transaction)

        replies = await load_missing_scripts(Recording(), (echo, add), commands, replies)

        assert replies == [b"a", b"OK", 5]
        # The loads and the calls went in one transaction: no flush could come between them.
        assert sent == [
            (
                [
                    (b"SCRIPT", b"LOAD", echo.text),
                    (b"SCRIPT", b"LOAD", add.text),
                    commands[0],
                    commands[2],
                ],
                True,
            )
        ]
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
