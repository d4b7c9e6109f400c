"""Start the ranks of a job on this machine and end them all on any failure.

One process per rank (``python -m shardwise.runtime.worker``), each in its
own session so its whole process tree can be signalled. The launcher polls
them: the first rank to exit non-zero ends the job at once (SIGTERM, then
SIGKILL after a grace period), and its traceback is raised in a
:class:`LaunchError`. A watchdog ends a job that runs past ``deadline_s``
and names the ranks still running. SIGINT (Ctrl-C) ends every rank too.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .job import Job

GRACE_S = 3.0


class LaunchError(RuntimeError):
    """The job failed: ``rank`` is the root cause (None for a deadline or an
    interrupt), ``pids`` the rank processes, all ended by the time it is raised."""

    def __init__(self, message: str, rank: int | None = None, traceback_text: str = "",
                 pids: list[int] | None = None):
        super().__init__(message)
        self.rank, self.traceback_text, self.pids = rank, traceback_text, pids or []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every rank's process group, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + GRACE_S
        while any(p.poll() is None for p in alive) and time.monotonic() < end:
            time.sleep(0.05)
    for p in procs:
        try:  # also reap grandchildren left in the group after the leader died
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()


def launch(job: Job, deadline_s: float | None = None, poll_s: float = 0.05,
           module: str = "shardwise.runtime.worker") -> list[dict]:
    """Run ``job`` on ``job.nproc`` local ranks; return rank 0's results.
    ``module`` is the per-rank entry point (``python -m MODULE JOB.json``)."""
    with tempfile.TemporaryDirectory(prefix="shardwise-") as tmp:
        job_file = os.path.join(tmp, "job.json")
        result_file = os.path.join(tmp, "result.json")
        with open(job_file, "w") as f:
            f.write(job.dumps())
        port = free_port()
        procs = []
        base_env = dict(os.environ)
        base_env.update(job.env)
        base_env.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(job.nproc),
            SHARDWISE_ERROR_DIR=tmp, SHARDWISE_RESULT=result_file, PYTHONUNBUFFERED="1",
        )
        if job.device == "cpu":
            base_env.setdefault("OMP_NUM_THREADS", "1")
        start = time.monotonic()
        try:
            for r in range(job.nproc):
                env = dict(base_env, RANK=str(r), LOCAL_RANK=str(r))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", module, job_file],
                    env=env, start_new_session=True,
                ))
            while True:
                codes = [p.poll() for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    _terminate(procs)
                    # A peer may have failed first but not yet been reaped: count
                    # every rank that exited non-zero on its own (not by our signal).
                    failed += [r for r, p in enumerate(procs)
                               if r not in failed and p.returncode > 0]
                    r = _root_cause(tmp, failed)
                    tb = _read(os.path.join(tmp, f"rank{r}.txt"))
                    why = tb.strip().splitlines()[-1] if tb.strip() else _signal_name(codes[r])
                    raise LaunchError(f"rank {r} failed: {why}\n{tb}".rstrip(), r, tb,
                                      [p.pid for p in procs])
                if all(c == 0 for c in codes):
                    break
                if deadline_s is not None and time.monotonic() - start > deadline_s:
                    running = [r for r, c in enumerate(codes) if c is None]
                    _terminate(procs)
                    raise LaunchError(
                        f"job passed its {deadline_s:.0f} s deadline; ranks {running} were "
                        f"still running (a hang in a collective or a slow rank); raise "
                        f"--deadline if the work is just long", pids=[p.pid for p in procs]
                    )
                time.sleep(poll_s)
        except KeyboardInterrupt:
            _terminate(procs)
            raise LaunchError("interrupted: every rank was stopped",
                              pids=[p.pid for p in procs]) from None
        finally:
            if any(p.poll() is None for p in procs):
                _terminate(procs)
        text = _read(result_file)
        return json.loads(text) if text else []


# Errors a rank sees because a *peer* died (gloo / NCCL wording).
_SECONDARY = ("Connection closed by peer", "remote worker", "Connection reset by peer",
              "remote process exited", "NCCL communicator was aborted", "Broken pipe")


def _root_cause(tmp: str, failed: list[int]) -> int:
    """The rank that failed first for its own reason: ranks whose error only
    says a peer went away come last, then the earliest-written traceback (a
    rank killed by a signal writes none and counts as a root cause)."""
    def key(r):
        path = os.path.join(tmp, f"rank{r}.txt")
        text = _read(path)
        secondary = any(s in text for s in _SECONDARY)
        mtime = os.stat(path).st_mtime_ns if text else -1
        return (secondary, mtime, r)

    return min(failed, key=key)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code} and left no traceback"
