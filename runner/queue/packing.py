"""redis-py's asyncio connections pack each command in Python; hiredis packs it in C.

BullMQ's clients (``moveToActive``/``moveToFinished`` with their dozen keys, lock renewals) and
the runner's own redis-py client go through ``AbstractConnection.pack_command``. ``install``
replaces it, process-wide, with one that asks hiredis for the same bytes and falls back to
redis-py's own for anything hiredis does not take (``None``, a ``bool``, a ``memoryview``, a
connection with another encoding), so errors stay redis-py's (``DataError``).
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection

_original = AbstractConnection.pack_command


def _pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
    encoder = self.encoder
    if encoder.encoding == "utf-8" and encoder.encoding_errors == "strict":
        command = args[0]
        # As redis-py: a command name may hold literal arguments ("SCRIPT LOAD").
        if isinstance(command, str):
            args = (*command.encode().split(), *args[1:])
        elif isinstance(command, bytes) and b" " in command:
            args = (*command.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except (TypeError, UnicodeEncodeError):
            pass
    return _original(self, *args)


def install() -> None:
    AbstractConnection.pack_command = _pack_command  # type: ignore[method-assign]


def installed() -> bool:
    return AbstractConnection.pack_command is _pack_command
