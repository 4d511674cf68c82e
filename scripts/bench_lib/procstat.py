"""CPU time and memory of a process and its descendants, read from /proc (Linux only).

CPU is utime+stime of every live process in the tree plus cutime+cstime (children already
reaped), so a supervisor's workers count whether they are alive or gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def tree(roots: Iterable[int]) -> list[int]:
    """The roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_s(pids: Iterable[int]) -> float:
    """user+system CPU seconds of the processes, their reaped children included."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # utime, stime, cutime, cstime are fields 14-17 (1-based) of /proc/pid/stat.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/pid/status (VmHWM: peak RSS, VmRSS: current RSS); 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def io_syscalls(pids: Iterable[int]) -> tuple[int, int]:
    """Read-like and write-like system calls (``syscr``, ``syscw`` of /proc/pid/io: read, recv,
    write, writev...) of the live processes, counted where the kernel counts them for
    /proc/pid/io: libuv's ``read`` and ``write`` on sockets are in, ``recvfrom``/``sendto`` are
    not. The runner and the Node workers both go through libuv, so their counts compare."""
    reads = writes = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                for line in f:
                    name, _, value = line.partition(":")
                    if name == "syscr":
                        reads += int(value)
                    elif name == "syscw":
                        writes += int(value)
        except OSError:
            pass
    return reads, writes
