"""Start the ranks of a job on this machine and end them all on any failure.

One process per rank (``python -m shardwise.runtime.worker``), each in its
own session so its whole process tree can be signalled. The launcher polls
them: the first rank to exit non-zero ends the job at once (SIGTERM, then
SIGKILL after a grace period), and its traceback is raised in a
:class:`LaunchError`. A deadline ends a job that runs past ``deadline_s``
and names the ranks still running. With ``job.watchdog_s`` set, every rank
keeps a heartbeat (runtime/job.py) and a job in which no rank has made
progress for that long is ended, naming the rank(s) that are not waiting
inside a collective: the ones the others wait on. SIGINT (Ctrl-C) ends every
rank too. The results of the cases done before a failure come back in the
error (``LaunchError.results``).
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

from .job import Heartbeat, Job, heartbeat_path

GRACE_S = 3.0
# Before every rank has sent its first heartbeat (importing torch, joining the
# process group) the watchdog allows at least this long: a loaded machine can
# take many seconds to start a rank, which is not a hang.
STARTUP_S = 60.0


class LaunchError(RuntimeError):
    """The job failed: ``rank`` is the root cause (None for a deadline or an
    interrupt), ``pids`` the rank processes, all ended by the time it is raised."""

    def __init__(self, message: str, rank: int | None = None, traceback_text: str = "",
                 pids: list[int] | None = None, hung: list[int] | None = None,
                 case: int | None = None, results: list[dict] | None = None):
        super().__init__(message)
        self.rank, self.traceback_text, self.pids = rank, traceback_text, pids or []
        # hung: the ranks the watchdog named; case: the index in job.cases the
        # root-cause rank was running (when a heartbeat tells); results: rank
        # 0's records of the cases finished before the failure.
        self.hung, self.case, self.results = hung or [], case, results or []


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
           module: str = "shardwise.runtime.worker", on_stream=None) -> list[dict]:
    """Run ``job`` on ``job.nproc`` local ranks; return rank 0's results.
    ``module`` is the per-rank entry point (``python -m MODULE JOB.json``).
    ``on_stream(message)`` is called with each JSON line the ranks append to
    the file named in their ``SHARDWISE_STREAM`` (a generation's tokens, as
    they come), in order, as the launcher polls."""
    with tempfile.TemporaryDirectory(prefix="shardwise-") as tmp:
        job_file = os.path.join(tmp, "job.json")
        result_file = os.path.join(tmp, "result.json")
        with open(job_file, "w") as f:
            f.write(job.dumps())
        stream = _Follow(os.path.join(tmp, "stream.jsonl"), on_stream) if on_stream else None
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
        if stream is not None:
            base_env["SHARDWISE_STREAM"] = stream.path
        beats = [heartbeat_path(tmp, r) for r in range(job.nproc)] if job.watchdog_s else []
        for path in beats:
            Heartbeat.create(path)
        watchdog = _Watchdog(job, beats) if beats else None
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
                if stream is not None:
                    stream.read()
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
                    case = watchdog.case_of(r) if watchdog else None
                    where = f" in case {case} ({job.cases[case].plan})" if case is not None else ""
                    raise LaunchError(f"rank {r} failed{where}: {why}\n{tb}".rstrip(), r, tb,
                                      [p.pid for p in procs], case=case,
                                      results=_results(result_file))
                if all(c == 0 for c in codes):
                    if stream is not None:
                        stream.read()  # what the ranks wrote after the last poll
                    break
                if deadline_s is not None and time.monotonic() - start > deadline_s:
                    running = [r for r, c in enumerate(codes) if c is None]
                    states = watchdog.describe(running) if watchdog else ""
                    _terminate(procs)
                    raise LaunchError(
                        f"job passed its {deadline_s:.0f} s deadline; ranks {running} were "
                        f"still running (a hang in a collective or a slow rank); raise "
                        f"--deadline if the work is just long{states}",
                        pids=[p.pid for p in procs], results=_results(result_file)
                    )
                if watchdog is not None and watchdog.expired(codes):
                    message, hung, case = watchdog.report(codes)
                    _terminate(procs)
                    raise LaunchError(message, hung[0] if hung else None,
                                      pids=[p.pid for p in procs], hung=hung, case=case,
                                      results=_results(result_file))
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


class _Follow:
    """Follows a file of JSON lines that ranks append to, passing each
    complete line to ``callback`` once."""

    def __init__(self, path: str, callback):
        self.path, self.callback = path, callback
        self.offset, self.partial = 0, b""
        open(path, "wb").close()

    def read(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self.callback(json.loads(line))


class _Watchdog:
    """Reads every rank's heartbeat; ``expired`` once none has changed for
    ``job.watchdog_s`` (or STARTUP_S while some rank has yet to report)."""

    CHECK_S = 0.25  # how often the heartbeats are read

    def __init__(self, job: Job, paths: list[str]):
        self.job, self.paths = job, paths
        self.seen = [None] * len(paths)  # last record per rank
        self.last_progress = self.last_check = time.monotonic()

    def _read(self) -> None:
        for r, path in enumerate(self.paths):
            rec = Heartbeat.read(path)
            if rec is not None and (self.seen[r] is None
                                    or rec["counter"] != self.seen[r]["counter"]):
                self.last_progress = time.monotonic()
            self.seen[r] = rec or self.seen[r]

    def expired(self, codes: list[int | None]) -> bool:
        now = time.monotonic()
        if now - self.last_check < self.CHECK_S:
            return False
        self.last_check = now
        self._read()
        limit = self.job.watchdog_s
        if any(rec is None for rec in self.seen):
            limit = max(limit, STARTUP_S)
        return now - self.last_progress > limit

    def case_of(self, rank: int) -> int | None:
        self._read()
        rec = self.seen[rank]
        if rec is None or not 0 <= rec["case"] < len(self.job.cases):
            return None
        return rec["case"]

    def _state(self, r: int) -> str:
        rec = self.seen[r]
        if rec is None:
            return f"rank {r}: no heartbeat yet (still starting)"
        case = rec["case"]
        where = (f"case {case} ({self.job.cases[case].plan})"
                 if 0 <= case < len(self.job.cases) else "outside any case")
        age = time.time() - rec["time"]
        doing = (f"waiting inside {rec['collective']}" if rec["inside"]
                 else "not in a collective")
        return f"rank {r}: {where}, last event {rec['event']!r} {age:.1f} s ago, {doing}"

    def describe(self, ranks: list[int]) -> str:
        if not ranks:
            return ""
        self._read()
        return "\n" + "\n".join(f"  {self._state(r)}" for r in ranks)

    def report(self, codes: list[int | None]) -> tuple[str, list[int], int | None]:
        """(message, ranks named as hung, their case)."""
        running = [r for r, c in enumerate(codes) if c is None]
        hung = [r for r in running if self.seen[r] is None or not self.seen[r]["inside"]]
        if hung:
            names = ", ".join(map(str, hung))
            head = (f"watchdog: no progress for {self.job.watchdog_s:g} s; rank{'s' * (len(hung) > 1)} "
                    f"{names} hung (not waiting inside a collective; the others wait on "
                    f"{'them' if len(hung) > 1 else 'it'})")
        else:
            head = (f"watchdog: no progress for {self.job.watchdog_s:g} s; every rank is "
                    f"waiting inside a collective (mismatched collectives, or a peer that "
                    f"exited)")
        case = self.case_of(hung[0]) if hung else None
        return head + self.describe(running), hung, case


def _results(path: str) -> list[dict]:
    """Rank 0's results so far (written after every case), or []."""
    text = _read(path)
    try:
        return json.loads(text) if text else []
    except ValueError:
        return []


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
