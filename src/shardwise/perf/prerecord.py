"""A first ranking's recordings, made by several processes at once.

Pricing a plan the first time records its ranks on meta tensors
(:mod:`.record`): a few hundredths of a second a rank, most of a first
``shardwise plan`` over a hundred or more candidates (what is recorded once
is read back from the cache of recordings, :mod:`.tracecache`). The planner
prices its plans in families (a base plan and its micro-batch counts,
``planner.micro_batch_family``), in order; :func:`sharing` has worker
processes take the families from the last one back, each pricing its family
as the planner would (so it records exactly the plans the planner will
price, no count more) and keeping the recordings in the cache. The planner
reads back every plan a worker has kept; where it reaches a family a worker
is still on, it records what is not kept yet itself. The processes meet
wherever their speeds put them.

A worker is this process forked (``os.fork``, where there is one): it
starts at once, with PyTorch loaded and the recorder's tables as this
process has them, one of the CPUs this process may run on each (or
``$SHARDWISE_WORKERS`` processes in all; 1 turns them off). It shares
nothing with this process but the families' order (two numbers in shared
memory: the family the planner is on, the last one a worker took) and the
cache's files, which are written atomically; it writes nothing else (its
standard streams go to the null device) and a family it fails on is priced
again, with its error, by the planner. Workers end with the ranking, at
once however it ends (an interruption, a stop signal: the cache keeps no
file half written), and at their next family where this process was
killed.

Workers start only where they pay: once this process has recorded, when
the families left would take it more than :data:`WORTH_S` seconds at the
pace of those before, and at least two of them are not kept.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Callable

from . import tracecache

WORTH_S = 3.0  # the families left, at this process's pace, above which workers start
STOP_S = 10.0  # a stopped worker's time to end before it is killed
# PyTorch's threads in a process that records, set as it loads the recorder
# (None: PyTorch's default). The pricing commands take one (cli), as the
# workers do: a recording is thousands of small ops on CPU tensors, which a
# second thread only slows (a router's sort of 32,768 picks: 170 ms on two
# busy cores, 1 ms on one).
RECORD_THREADS: int | None = None


def recorder():
    """The recorder (:mod:`.record`, which imports torch), loaded where this
    process records a plan: a ranking read from the cache of recordings
    never loads it. As it is first loaded, PyTorch takes
    :data:`RECORD_THREADS` threads."""
    first = f"{__package__}.record" not in sys.modules
    from . import record

    if first and RECORD_THREADS is not None:
        import torch

        torch.set_num_threads(RECORD_THREADS)
    return record


def workers_allowed() -> int:
    """Processes that may record at once, this one included:
    ``$SHARDWISE_WORKERS``, else the CPUs this process may run on."""
    env = os.environ.get("SHARDWISE_WORKERS", "").strip()
    if env:
        return max(1, int(env)) if env.isdigit() else 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Order:
    """The families' order, in memory the workers share: ``front``, the
    family the planner is on; ``back``, the last one a worker took."""

    def __init__(self, front: int, n: int):
        ctx = multiprocessing.get_context("fork")
        self._at, self._lock = ctx.RawArray("q", [front, n]), ctx.Lock()

    def front(self, i: int) -> None:
        self._at[0] = i

    def take(self) -> int | None:
        """The family before the last one a worker took, or None where the
        planner is on it or past it."""
        with self._lock:
            j = self._at[1] - 1
            if j <= self._at[0]:
                return None
            self._at[1] = j
            return j


class Sharing:
    """The families shared with workers while a ranking prices them:
    :meth:`start` before each, in order; ``workers``: the processes started."""

    def __init__(self, keys: list[str], family: Callable[[int], object]):
        self.keys, self.family, self.workers = keys, family, []
        self._order, self._began = None, time.monotonic()
        self._decided = (tracecache.directory() is None or workers_allowed() < 2
                         or not hasattr(os, "fork"))

    def kept(self, j: int) -> bool:
        return tracecache.kept(self.keys[j])

    def start(self, i: int) -> None:
        """The planner is on family ``i``: workers start here where they pay."""
        if self._order is not None:
            self._order.front(i)
        n = len(self.keys)
        if self._decided or i == 0 or f"{__package__}.record" not in sys.modules:
            return  # nothing recorded here yet: the plans may all be kept
        if (time.monotonic() - self._began) / i * (n - i) < WORTH_S:
            return
        self._decided = True
        left = sum(not self.kept(j) for j in range(i + 1, n))
        count = min(workers_allowed() - 1, left - 1)
        if count < 1:
            return
        try:
            self._order = _Order(i, n)
        except OSError:  # no shared memory or semaphores here: no workers
            return
        with warnings.catch_warnings():  # Python's warning of a fork beside threads (a
            warnings.simplefilter("ignore", DeprecationWarning)  # progress bar's): see _worker
            for _ in range(count):
                pid = os.fork()
                if pid == 0:
                    _worker(self, os.getppid())  # never returns
                self.workers.append(pid)

    def stop(self) -> None:
        """Every worker ended, whatever it was doing: asked to (SIGTERM, on
        which it cleans up), and killed where it has not within
        :data:`STOP_S` seconds."""
        alive = list(self.workers)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + STOP_S
            while alive and time.monotonic() < deadline:
                for pid in list(alive):
                    try:
                        if os.waitpid(pid, os.WNOHANG)[0] == pid:
                            alive.remove(pid)
                    except ChildProcessError:
                        alive.remove(pid)
                if alive:
                    time.sleep(0.01)


@contextmanager
def sharing(keys: list[str], family: Callable[[int], object]):
    """A :class:`Sharing` of the families ``keys`` names (each its first
    plan's recording key; ``len(keys)`` families, priced in order): workers
    take them from the last back, where they pay (module docstring),
    ``family(j)`` pricing family ``j`` (its recordings kept in the cache)
    unless ``keys[j]`` is kept. At the context's end, however it ends, the
    workers stop."""
    share = Sharing(keys, family)
    try:
        yield share
    finally:
        share.stop()


def _stop(signum, frame):
    """A worker's end on SIGTERM or SIGINT: an exception, which a cache entry
    being written cleans up after (``tracecache.store``: no file left half
    written)."""
    raise SystemExit(1)


def _worker(share: Sharing, parent: int) -> None:
    """A forked worker: the families from the last back until the planner's
    (module docstring); ends the process, never returns."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        # Never the planner's streams, whose locks a thread of the planner (a
        # progress bar's) may have held as it forked.
        sys.stdout = sys.stderr = open(os.devnull, "w")
        import torch

        torch.set_num_threads(1)
        while os.getppid() == parent:
            j = share._order.take()
            if j is None:
                break
            if not share.kept(j):
                try:
                    share.family(j)
                except Exception:
                    pass  # the planner prices it again, and says why it fails
            gc.collect()
            gc.freeze()  # what survives a family is never walked again (perf/heap.py)
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # at once: the cache's files are closed; nothing of the planner runs here
