"""hiredis packs redis-py's commands into the same bytes redis-py would. No sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from runner.queue import packing

_args = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.floats(allow_nan=False),
)


def _original(*args: Any) -> bytes:
    return b"".join(packing._original(Connection(), *args))


def _ours(*args: Any) -> bytes:
    return b"".join(packing._pack_command(Connection(), *args))


@given(st.sampled_from(["SET", "EVALSHA", "SCRIPT LOAD", b"CLIENT SETNAME"]), st.lists(_args))
def test_any_command_packs_to_the_same_bytes_as_redis_py(name: Any, args: list[Any]) -> None:
    assert _ours(name, *args) == _original(name, *args)


@pytest.mark.parametrize("bad", [None, True, [1], {"a": 1}])
def test_what_redis_py_refuses_is_refused_the_same_way(bad: Any) -> None:
    with pytest.raises(DataError):
        _ours("SET", "k", bad)


def test_another_encoding_is_left_to_redis_py() -> None:
    connection = Connection(encoding="latin-1")
    packed = b"".join(packing._pack_command(connection, "SET", "k", "é"))
    assert packed == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"


def test_install_replaces_the_method_for_every_connection() -> None:
    packing.install()
    assert packing.installed()
    assert b"".join(Connection().pack_command("PING")) == b"*1\r\n$4\r\nPING\r\n"
