"""A first ranking's recordings, made by several processes at once.

Pricing a plan the first time records its ranks on meta tensors
(:mod:`.record`): a few hundredths of a second a rank, most of a first
``shardwise plan`` over a hundred or more candidates (what is recorded once
is read back from the cache of recordings, :mod:`.tracecache`). The planner
prices its plans in families (a base plan and its micro-batch counts,
``planner.micro_batch_family``), in order; :func:`sharing` has worker
processes take the families from the last one back, each pricing its family
as the planner would (so it records exactly the plans the planner will
price, no count more), keeping the recordings in the cache and the steps'
costs it priced in a folder of the ranking's (``costmodel._priced``). The
planner reads back both for every family a worker did, waits for the worker
on a family it reaches (at most :data:`WAIT_S` seconds, then prices it
itself), and the processes meet wherever their speeds put them.

A worker is this process forked (``os.fork``, where there is one): it
starts at once, with PyTorch loaded and the recorder's tables as this
process has them, one of the CPUs this process may run on each (or
``$SHARDWISE_WORKERS`` processes in all; 1 turns them off). It shares
nothing with this process but the families' order (in shared memory: the
family the planner is on, the last one a worker took, the worker on each)
and files written atomically; it writes nothing else (its standard streams
go to the null device) and a family it fails on is priced again, with its
error, by the planner. Workers end with the ranking, at once however it
ends (an interruption, a stop signal: the cache keeps no file half
written), and at their next family where this process was killed.

Workers start only where they pay: once this process has recorded, when
the families left would take it more than :data:`WORTH_S` seconds at the
pace of those before, and at least two of them are not kept.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Callable

from . import tracecache

WORTH_S = 3.0  # the families left, at this process's pace, above which workers start
STOP_S = 10.0  # a stopped worker's time to end before it is killed
WAIT_S = 60.0  # the planner's wait for a worker on the family it reaches; then it prices it
# PyTorch's threads in a process that records, set as it loads the recorder
# (None: PyTorch's default). The pricing commands take one (cli), as the
# workers do: a recording is thousands of small ops on CPU tensors, which a
# second thread only slows (a router's sort of 32,768 picks: 170 ms on two
# busy cores, 1 ms on one).
RECORD_THREADS: int | None = None
# While a ranking shares its families with workers: (the folder where a
# worker leaves the step costs it priced, whether this process is a worker),
# read by costmodel.predict; None otherwise.
PRICED: tuple[str, bool] | None = None


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
    family the planner is on; ``back``, the last one a worker took; and of
    each family, the worker on it (its pid; 0: none)."""

    def __init__(self, front: int, n: int):
        ctx = multiprocessing.get_context("fork")
        self._at, self._lock = ctx.RawArray("q", [front, n]), ctx.Lock()
        self.on = ctx.RawArray("q", n)

    def front(self, i: int) -> None:
        self._at[0] = i

    def take(self) -> int | None:
        """The family before the last one a worker took, or None where the
        planner is on it or past it; this process is then on it."""
        with self._lock:
            j = self._at[1] - 1
            if j <= self._at[0]:
                return None
            self._at[1], self.on[j] = j, os.getpid()
            return j

    def wait(self, i: int, workers: list[int]) -> None:
        """Until no worker of ``workers`` alive is on family ``i`` (one that
        ended is reaped and taken off ``workers``), or :data:`WAIT_S` seconds."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            pid = self.on[i]
            if pid not in workers:
                return
            try:
                ended = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                ended = True
            if ended:
                workers.remove(pid)
            else:
                time.sleep(0.005)


class Sharing:
    """The families shared with workers while a ranking prices them:
    :meth:`start` before each, in order; ``workers``: the processes started."""

    def __init__(self, keys: list[str], family: Callable[[int], object]):
        self.keys, self.family, self.workers, self._alive = keys, family, [], []
        self._order, self._began = None, time.monotonic()
        self._decided = (tracecache.directory() is None or workers_allowed() < 2
                         or not hasattr(os, "fork"))

    def kept(self, j: int) -> bool:
        return tracecache.kept(self.keys[j])

    def start(self, i: int) -> None:
        """The planner is on family ``i``: workers start here where they pay."""
        if self._order is not None:
            self._order.front(i)
            self._order.wait(i, self._alive)  # its recordings kept, or its worker gone
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
        global PRICED
        try:
            self._order = _Order(i, n)
            PRICED = (tempfile.mkdtemp(prefix="shardwise-priced-"), False)
        except OSError:  # no shared memory or semaphores here: no workers
            return
        with warnings.catch_warnings():  # Python's warning of a fork beside threads (a
            warnings.simplefilter("ignore", DeprecationWarning)  # progress bar's): see _worker
            for _ in range(count):
                pid = os.fork()
                if pid == 0:
                    _worker(self, os.getppid())  # never returns
                self.workers.append(pid)
                self._alive.append(pid)

    def stop(self) -> None:
        """Every worker ended, whatever it was doing: asked to (SIGTERM, on
        which it cleans up), and killed where it has not within
        :data:`STOP_S` seconds."""
        alive = self._alive
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
        global PRICED
        if PRICED is not None:
            shutil.rmtree(PRICED[0], ignore_errors=True)
            PRICED = None


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
    global PRICED
    code = 0
    try:
        PRICED = (PRICED[0], True)
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
            share._order.on[j] = 0
            gc.collect()
            gc.freeze()  # what survives a family is never walked again (perf/heap.py)
        if os.getppid() != parent:  # the planner killed: its folder is left to no one
            shutil.rmtree(PRICED[0], ignore_errors=True)
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # at once: the cache's files are closed; nothing of the planner runs here
