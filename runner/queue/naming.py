"""The worker named as Node's BullMQ names it, so Bull Board shows the Python workers too.

- Bull Board lists workers by client name ``{prefix}:{base64(queue)}:w:{name}`` (the Python
  client uses the plain queue name): the blocking connection gets Node's name, the command
  connection the queue's base name, so each process is one entry, as with Node.
- ``processedBy`` on a job comes from the worker name in the options of ``moveToActive`` and
  ``moveToFinished``, which BullMQ's Lua scripts already read; the Python caller leaves it out.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgpack  # type: ignore[import-untyped]
from bullmq import Worker


def queue_client_name(prefix: str, queue: str) -> str:
    """The client name Node BullMQ gives a queue's connections: the queue name in base64."""
    return f"{prefix}:{base64.b64encode(queue.encode()).decode()}"


def node_client_name(prefix: str, queue: str, worker_name: str) -> str:
    """The client name Node BullMQ gives a worker, which Bull Board's Workers tab looks for."""
    return f"{queue_client_name(prefix, queue)}:w:{worker_name}"


def with_processed_by(worker: Worker, name: str) -> None:
    """Make ``moveToActive`` pass the worker's name, so the job hash gets ``processedBy``.

    The Lua script is BullMQ's own and already sets the field when ``opts.name`` is given;
    only the Python caller leaves it out.
    """
    scripts = worker.scripts

    async def move_to_active(token: str, opts: dict[str, Any]) -> list[Any]:
        keys = scripts.getKeys(
            [
                "wait",
                "active",
                "prioritized",
                "events",
                "stalled",
                "limiter",
                "delayed",
                "paused",
                "meta",
                "pc",
                "marker",
            ]
        )
        packed = msgpack.packb(
            {
                "token": token,
                "lockDuration": opts.get("lockDuration", 0),
                "limiter": opts.get("limiter"),
                "name": name,
            },
            use_bin_type=True,
        )
        args = [scripts.keys[""], round(time.time() * 1000), packed]
        result = await scripts.commands["moveToActive"](keys=keys, args=args)
        from bullmq.scripts import raw2NextJobData

        return raw2NextJobData(result)  # type: ignore[no-any-return]

    scripts.moveToActive = move_to_active


def name_in_finished_opts(worker: Worker, name: str) -> None:
    """``moveToFinished`` sets ``processedBy`` on the job it hands over when ``opts.name`` is
    given; the Python caller leaves it out, so add it to the packed options."""
    scripts = worker.scripts
    build_args = scripts.moveToFinishedArgs
    entry = msgpack.packb("name") + msgpack.packb(name, use_bin_type=True)

    def with_name(*args: Any, **kwargs: Any) -> Any:
        keys, argv = build_args(*args, **kwargs)
        argv[7] = _with_map_entry(argv[7], entry)
        return keys, argv

    scripts.moveToFinishedArgs = with_name


def _with_map_entry(packed: bytes, entry: bytes) -> bytes:
    """A msgpack map with one more key-value pair (``entry``, packed) appended: its header's
    count goes up by one. Once per job, so done on the bytes rather than by unpacking."""
    head = packed[0]
    if 0x80 <= head < 0x8F:  # fixmap of up to 14 entries
        return bytes((head + 1,)) + packed[1:] + entry
    if head == 0xDE and packed[1:3] != b"\xff\xff":  # map16
        count = int.from_bytes(packed[1:3], "big") + 1
        return b"\xde" + count.to_bytes(2, "big") + packed[3:] + entry
    unpacked = msgpack.unpackb(packed, raw=False)
    unpacked.update(msgpack.unpackb(b"\x81" + entry, raw=False))
    return msgpack.packb(unpacked, use_bin_type=True)  # type: ignore[no-any-return]


def name_only_the_blocking_connection(worker: Worker, base_name: str) -> None:
    """One entry per process in Bull Board's worker list, as with Node: the worker's name goes
    on its blocking connection; the command connection gets the queue's base name."""
    backend = worker.backend

    async def set_name(name: str) -> None:
        await backend.connection.set_client_name(base_name)
        if backend.blocking_connection is not None:
            await backend.blocking_connection.set_client_name(name)

    backend.setName = set_name
