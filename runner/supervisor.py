"""One command per host that uses every core: ``RUNNER_PROCESSES`` worker processes, supervised.

One Python worker keeps at most one core busy (one event loop, one thread), so a host with N cores runs N of
them. With ``RUNNER_PROCESSES`` above 1 (or 0 for one per core), ``python -m runner`` becomes a
small supervisor: it starts that many ordinary runner processes, restarts one that dies (with a
backoff if it keeps dying), and on SIGTERM or SIGINT passes the signal on and waits for all of
them to finish their grace period, then exits 0. Children share stdout and stderr, and each has
its own worker name (``{name}-{i}``), so Bull Board lists them apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

from runner.log import log
from runner.settings import Settings

_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def process_count(settings: Settings) -> int:
    return settings.processes if settings.processes > 0 else (os.cpu_count() or 1)


class Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.crashes: dict[int, list[float]] = {}
        self.stopping = False

    def _spawn(self, index: int) -> None:
        env = {
            **os.environ,
            "RUNNER_PROCESSES": "1",
            "RUNNER_WORKER_NAME": f"{self.settings.name}-{index}",
        }
        self.children[index] = subprocess.Popen([sys.executable, "-m", "runner"], env=env)
        log.info("supervisor.started_child", index=index, pid=self.children[index].pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("supervisor.stopping", signal=signal.Signals(signum).name)
        self.stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(self.count):
            self._spawn(index)
        restart_at: dict[int, float] = {}
        while True:
            alive = 0
            for index, child in list(self.children.items()):
                code = child.poll()
                if code is None:
                    alive += 1
                    continue
                if self.stopping or index in restart_at:
                    continue
                recent = [t for t in self.crashes.get(index, []) if time.monotonic() - t < 60]
                recent.append(time.monotonic())
                self.crashes[index] = recent
                delay_s = _RESTART_BACKOFF_S[min(len(recent) - 1, len(_RESTART_BACKOFF_S) - 1)]
                log.warning("supervisor.child_died", index=index, exitCode=code, restartInS=delay_s)
                restart_at[index] = time.monotonic() + delay_s
            for index, when in list(restart_at.items()):
                if self.stopping:
                    restart_at.clear()
                elif time.monotonic() >= when:
                    del restart_at[index]
                    self._spawn(index)
            if self.stopping and alive == 0:
                codes = [c.returncode for c in self.children.values()]
                log.info("supervisor.stopped", exitCodes=codes)
                return 0 if all(code == 0 for code in codes) else 1
            time.sleep(0.1)


def supervise(settings: Settings) -> int:
    return Supervisor(settings, process_count(settings)).run()
