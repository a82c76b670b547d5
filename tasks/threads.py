"""Torch's CPU threads on a shared machine: as many as the cores other processes leave free.

Kept free of torch at import (the pipeline's first stages and the kinds import it before any
training library loads); torch is imported when a count is set.
"""

from __future__ import annotations

import logging
import os
import time

import psutil

from tasks.environment import world_size

THREADS_ENV = "OMP_NUM_THREADS"


class CoreWatch:
    """How many of this process's cores other processes leave free, from the CPU time the cores
    spent busy less this process's own, since the previous reading.

    Torch's threads meet at every parallel region, so one thread on a core another job holds
    makes the others wait: with one of two cores busy, a step took 5x as long on two threads
    (docs/benchmarks.md, "Time budget"), against the 2x that one thread costs.
    """

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0))
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        per_cpu = psutil.cpu_times(percpu=True)
        busy = sum(
            t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
            for i, t in enumerate(per_cpu)
            if i in self.cpus
        )
        own = psutil.Process().cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def free_cores(self, wait_s: float = 0.0) -> int:
        """Cores free of other work since the last call (after ``wait_s`` when given), at least
        one."""
        if wait_s:
            self._last = self._sample()
            time.sleep(wait_s)
        now = self._sample()
        seconds = max(now[0] - self._last[0], 1e-3)
        others = max((now[1] - self._last[1]) - (now[2] - self._last[2]), 0.0) / seconds
        self._last = now
        return max(1, min(len(self.cpus), round(len(self.cpus) - others)))


class ThreadFitter:
    """Torch's thread count, matched to the cores other processes leave free (a
    :class:`CoreWatch`) or set by ``train.threads``; ``OMP_NUM_THREADS`` and torchrun's ranks are
    left alone. A stage calls :meth:`start`; its long loops call :meth:`refit`, which reads the
    cores again at most every ``every_s``. The count applies to the calling thread (OpenMP's),
    the one that runs the stage's torch work."""

    def __init__(self, every_s: float = 15.0) -> None:
        self.every_s = every_s
        self.watch: CoreWatch | None = None
        self.setting: int | None = None
        self._next = 0.0

    def start(self, setting: int | None, wait_s: float = 0.5) -> int | None:
        """Fit now (from ``wait_s`` of reading); returns the new count when it changed."""
        self.watch, self.setting = CoreWatch(), setting
        return self._fit(wait_s)

    def refit(self) -> int | None:
        """Fit again when ``every_s`` has passed since the last time."""
        if self.watch is None or time.monotonic() < self._next:
            return None
        return self._fit(0.0)

    def _fit(self, wait_s: float) -> int | None:
        assert self.watch is not None
        if self.setting is None and (os.environ.get(THREADS_ENV) or world_size() > 1):
            return None
        import torch

        threads = self.setting or self.watch.free_cores(wait_s)
        self._next = time.monotonic() + self.every_s  # a reading spans every_s at least
        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        why = "train.threads" if self.setting else "the cores other processes leave free"
        logging.getLogger("tasks.train").info("torch threads -> %d (%s)", threads, why)
        return threads


THREADS = ThreadFitter()  # the process's: stages start it, loops refit it
