"""Start the ranks of a job on this machine and end them all on any failure.

One process per rank (``python -m shardwise.runtime.worker``, through
runtime/lifeline.py, which ties the rank's life to the launcher's even when
the launcher is SIGKILLed), each in its own session so its whole process
tree can be signalled. The launcher polls them: the first rank to exit
non-zero ends the job (SIGTERM, then SIGKILL after a grace period), and the
root cause's traceback is raised in a :class:`LaunchError`: a rank killed
by a signal or failing for its own reason, never a peer that only lost its
connection to it (the launcher gives the others SETTLE_S to exit first). A
deadline ends a job that runs past ``deadline_s`` and names the ranks still
running. With ``job.watchdog_s`` set, every rank keeps a heartbeat
(runtime/job.py) and a job in which no rank has made progress for that long
is ended, naming the rank(s) the others wait on: one whose process is
stopped or frozen (its pulse stopped), else one that runs but is not
waiting inside a collective. SIGINT, SIGTERM and SIGHUP to the launcher end
every rank, remove the job's temporary directory and raise a LaunchError
with ``signum`` set. The results of the cases done before a failure come
back in the error (``LaunchError.results``).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time

from .job import Heartbeat, Job, heartbeat_path
from .lifeline import Lifeline
from .progress import ENV as PROGRESS_ENV

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
                 case: int | None = None, results: list[dict] | None = None,
                 signum: int | None = None):
        super().__init__(message)
        self.rank, self.traceback_text, self.pids = rank, traceback_text, pids or []
        # hung: the ranks the watchdog named; case: the index in job.cases the
        # root-cause rank was running (when a heartbeat tells); results: rank
        # 0's records of the cases finished before the failure; signum: the
        # signal that stopped the launcher (SIGINT, SIGTERM, SIGHUP), if one did.
        self.hung, self.case, self.results = hung or [], case, results or []
        self.signum = signum
        self.saved = ""  # what of the run's results its caller saved (set by the CLI)


# -- the signals that stop a job ---------------------------------------------------

# Ctrl-C; what kill, timeout, Slurm's scancel and CI send; a closed terminal.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


class Interrupted(KeyboardInterrupt):
    """A stop signal received outside a launch (see :func:`raise_on_stop_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def raise_on_stop_signals() -> None:
    """Make SIGTERM and SIGHUP stop this process as Ctrl-C does: an
    :class:`Interrupted` exception (a KeyboardInterrupt), so cleanup runs and
    the caller can exit with 128 + the signal. A signal set to be ignored
    (``nohup``) stays ignored. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, _raise_interrupted)


@contextlib.contextmanager
def _stop_signals_noted():
    """Inside: a stop signal is noted (in the list yielded), not raised, so the
    launcher ends the ranks it started at a point where it knows them all (an
    exception raised inside ``Popen`` could lose a child)."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in old.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: noted.append(signum))
    try:
        yield noted
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every rank's process group (and SIGCONT, so that a stopped rank
    acts on it), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            _signal_group(p.pid, sig)
            if sig == signal.SIGTERM:
                _signal_group(p.pid, signal.SIGCONT)
        end = time.monotonic() + GRACE_S
        while any(p.poll() is None for p in alive) and time.monotonic() < end:
            time.sleep(0.05)
    for p in procs:
        _signal_group(p.pid, signal.SIGKILL)  # grandchildren left in the group
        p.wait()


# A free port is found by binding it and letting it go; another process can
# take it before rank 0's store binds it. Rank 0 then fails at once with
# EADDRINUSE, before any work: the job is started again on another port.
PORT_TRIES = 3


def launch(job: Job, deadline_s: float | None = None, poll_s: float = 0.05,
           module: str = "shardwise.runtime.worker", on_stream=None,
           on_progress=None) -> list[dict]:
    """Run ``job`` on ``job.nproc`` local ranks; return rank 0's results.
    ``module`` is the per-rank entry point (``python -m MODULE JOB.json``).
    ``on_stream(message)`` is called with each JSON line the ranks append to
    the file named in their ``SHARDWISE_STREAM`` (a generation's tokens, as
    they come), in order, as the launcher polls; ``on_progress(event)`` with
    each of rank 0's progress events (runtime/progress.py), the same way.
    A job whose rendezvous port was taken in the meantime is started again
    on a new one (:data:`PORT_TRIES` in all)."""
    for attempt in range(1, PORT_TRIES + 1):
        try:
            return _launch(job, free_port(), deadline_s, poll_s, module, on_stream, on_progress)
        except LaunchError as e:
            if attempt == PORT_TRIES or not port_taken(e):
                raise


def port_taken(e: LaunchError) -> bool:
    """Whether ``e`` is rank 0 failing to bind the rendezvous port (it was
    taken between :func:`free_port` and the bind), before any result."""
    return e.rank == 0 and not e.results and "EADDRINUSE" in e.traceback_text


def _launch(job: Job, port: int, deadline_s: float | None, poll_s: float, module: str,
            on_stream, on_progress) -> list[dict]:
    """:func:`launch`'s one attempt, on rendezvous port ``port``."""
    with _stop_signals_noted() as stop, tempfile.TemporaryDirectory(prefix="shardwise-") as tmp, \
            Lifeline() as lifeline:
        job_file = os.path.join(tmp, "job.json")
        result_file = os.path.join(tmp, "result.json")
        with open(job_file, "w") as f:
            f.write(job.dumps())
        stream = _Follow(os.path.join(tmp, "stream.jsonl"), on_stream) if on_stream else None
        progress = (_Follow(os.path.join(tmp, "progress.jsonl"), on_progress)
                    if on_progress else None)
        follow = [f for f in (stream, progress) if f is not None]
        procs: list[subprocess.Popen] = []
        base_env = dict(os.environ)
        base_env.update(job.env)
        base_env.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(job.nproc),
            SHARDWISE_ERROR_DIR=tmp, SHARDWISE_RESULT=result_file, PYTHONUNBUFFERED="1",
            **lifeline.env(),
        )
        if job.device == "cpu":
            base_env.setdefault("OMP_NUM_THREADS", "1")
        if stream is not None:
            base_env["SHARDWISE_STREAM"] = stream.path
        if progress is not None:
            base_env[PROGRESS_ENV] = progress.path
        else:
            base_env.pop(PROGRESS_ENV, None)  # not a file of an outer job
        beats = [heartbeat_path(tmp, r) for r in range(job.nproc)] if job.watchdog_s else []
        for path in beats:
            Heartbeat.create(path)
        start = time.monotonic()
        watchdog = None
        try:
            for r in range(job.nproc):
                env = dict(base_env, RANK=str(r), LOCAL_RANK=str(r))
                procs.append(subprocess.Popen(lifeline.command(module, job_file), env=env,
                                              start_new_session=True, **lifeline.popen_kwargs()))
                if stop:
                    break
            lifeline.started()
            watchdog = _Watchdog(job, beats, procs) if beats else None
            while True:
                for f in follow:
                    f.read()
                if stop:
                    _terminate(procs)
                    raise LaunchError(_interrupted(stop[0]), pids=[p.pid for p in procs],
                                      results=_results(result_file), signum=stop[0])
                codes = [p.poll() for p in procs]
                if any(c not in (None, 0) for c in codes):
                    codes = _settle(procs, tmp)
                    stopped = [r for r, c in enumerate(codes)
                               if c is None and _stopped(procs[r].pid)]
                    _terminate(procs)
                    raise _failure(job, tmp, codes, stopped, procs, watchdog, result_file)
                if all(c == 0 for c in codes):
                    for f in follow:
                        f.read()  # what the ranks wrote after the last poll
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
        finally:
            if any(p.poll() is None for p in procs):
                _terminate(procs)
        text = _read(result_file)
        return json.loads(text) if text else []


def _interrupted(signum: int) -> str:
    name = signal.Signals(signum).name
    why = {"SIGINT": " (Ctrl-C)", "SIGHUP": " (the terminal closed)"}.get(name, "")
    return f"interrupted by {name}{why}: every rank was stopped"


# After the first rank fails, how long the others get to exit on their own
# before the launcher ends them, while every failure so far only says that a
# peer went away: the rank that died first (SIGKILL, out of memory) may be
# reaped after a peer that lost its connection to it.
SETTLE_S = 2.0


def _settle(procs: list[subprocess.Popen], tmp: str) -> list[int | None]:
    """Every rank's exit status once a root cause is among the failures (or
    SETTLE_S has passed): statuses taken before the launcher signals anyone."""
    end = time.monotonic() + SETTLE_S
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if (any(codes[r] < 0 or not _secondary(tmp, r) for r in failed)
                or None not in codes or time.monotonic() > end):
            return codes
        time.sleep(0.05)


def _failure(job: Job, tmp: str, codes: list[int | None], stopped: list[int],
             procs: list[subprocess.Popen], watchdog, result_file: str) -> LaunchError:
    """The LaunchError for a job in which ranks exited non-zero (``codes``,
    taken before the launcher signalled anyone); ``stopped``: the ranks whose
    process was stopped then. A stopped rank is named before a rank whose
    error only says that it waited for a peer in vain."""
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    r = _root_cause(tmp, failed, codes)
    tb = _read(os.path.join(tmp, f"rank{r}.txt"))
    why = tb.strip().splitlines()[-1] if tb.strip() else _signal_name(codes[r])
    head = f"rank {r} failed"
    if stopped and codes[r] > 0 and _secondary(tmp, r):
        head = (f"rank {stopped[0]} is stopped (SIGSTOP or a debugger) and the others wait "
                f"on it; rank {r} failed")
        r = stopped[0]
    case = watchdog.case_of(r) if watchdog else None
    where = f" in case {case} ({job.cases[case].plan})" if case is not None else ""
    return LaunchError(f"{head}{where}: {why}\n{tb}".rstrip(), r, tb,
                       [p.pid for p in procs], case=case, results=_results(result_file))


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, SIGTSTP, a debugger), from
    Linux's /proc; False where there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] in ("T", "t")


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
    """Reads every rank's heartbeat; ``expired`` once none has made progress
    for ``job.watchdog_s`` (or STARTUP_S while some rank has yet to report)."""

    CHECK_S = 0.25  # how often the heartbeats are read
    # A rank whose pulse (Heartbeat.PULSE_S) has not changed for this long is
    # stopped or frozen; a live rank misses that many beats only on a machine
    # too loaded to run it.
    STALE_S = 1.5

    def __init__(self, job: Job, paths: list[str], procs: list[subprocess.Popen]):
        self.job, self.paths, self.procs = job, paths, procs
        self.seen = [None] * len(paths)  # last record per rank
        self.last_progress = self.last_check = time.monotonic()
        self.pulse_seen = [(None, self.last_progress)] * len(paths)  # (pulse, when it changed)

    def _read(self) -> None:
        now = time.monotonic()
        for r, path in enumerate(self.paths):
            rec = Heartbeat.read(path)
            if rec is not None and (self.seen[r] is None
                                    or rec["counter"] != self.seen[r]["counter"]):
                self.last_progress = now
            if rec is not None and rec["pulse"] != self.pulse_seen[r][0]:
                self.pulse_seen[r] = (rec["pulse"], now)
            self.seen[r] = rec or self.seen[r]

    def expired(self, codes: list[int | None]) -> bool:
        now = time.monotonic()
        if now - self.last_check < self.CHECK_S:
            return False
        self.last_check = now
        self._read()
        # At least STALE_S: a stopped rank must have missed its pulse long
        # enough to be told from the ranks that wait on it.
        limit = max(self.job.watchdog_s, self.STALE_S + self.CHECK_S)
        if any(rec is None for rec in self.seen):
            limit = max(limit, STARTUP_S)
        return now - self.last_progress > limit

    def case_of(self, rank: int) -> int | None:
        self._read()
        rec = self.seen[rank]
        if rec is None or not 0 <= rec["case"] < len(self.job.cases):
            return None
        return rec["case"]

    def unresponsive(self, r: int) -> str | None:
        """Why rank ``r``'s process is not running (stopped or frozen), or None."""
        if _stopped(self.procs[r].pid):
            return "stopped (SIGSTOP or a debugger)"
        pulse, since = self.pulse_seen[r]
        age = time.monotonic() - since
        if self.seen[r] is not None and age > self.STALE_S:
            return f"not responding (no pulse for {age:.1f} s: stopped or frozen)"
        return None

    def _state(self, r: int) -> str:
        rec = self.seen[r]
        if rec is None:
            return f"rank {r}: no heartbeat yet (still starting)"
        case = rec["case"]
        where = (f"case {case} ({self.job.cases[case].plan})"
                 if 0 <= case < len(self.job.cases) else "outside any case")
        age = time.time() - rec["time"]
        doing = (f"waiting inside {rec['collective']} (collective call {rec['calls']})"
                 if rec["inside"] else "not in a collective")
        down = self.unresponsive(r)
        return (f"rank {r}: {where}, last event {rec['event']!r} {age:.1f} s ago, {doing}"
                + (f"; {down}" if down else ""))

    def describe(self, ranks: list[int]) -> str:
        if not ranks:
            return ""
        self._read()
        return "\n" + "\n".join(f"  {self._state(r)}" for r in ranks)

    def report(self, codes: list[int | None]) -> tuple[str, list[int], int | None]:
        """(message, ranks named as hung, their case). The ranks named are
        those whose process does not run (stopped or frozen), else those that
        run but are not waiting inside a collective: either way the ones the
        others wait on. A rank waiting inside a collective is never named
        while another rank is one of these."""
        self._read()
        running = [r for r, c in enumerate(codes) if c is None]
        down = {r: why for r in running if (why := self.unresponsive(r))}
        hung = list(down) or [r for r in running
                              if self.seen[r] is None or not self.seen[r]["inside"]]
        head = f"watchdog: no progress for {self.job.watchdog_s:g} s; "
        they = "them" if len(hung) > 1 else "it"
        names = f"rank{'s' * (len(hung) > 1)} {', '.join(map(str, hung))}"
        if down:
            head += (f"{names} {'are' if len(hung) > 1 else 'is'} "
                     f"{'; '.join(dict.fromkeys(down.values()))}; the others wait on {they}")
        elif hung:
            head += (f"{names} hung (not waiting inside a collective; the others wait on "
                     f"{they})")
        else:
            head += ("every rank is waiting inside a collective (mismatched collectives, or "
                     "a peer that exited)")
        case = self.case_of(hung[0]) if hung else None
        return head + self.describe(running), hung, case


def _results(path: str) -> list[dict]:
    """Rank 0's results so far (written after every case), or []."""
    text = _read(path)
    try:
        return json.loads(text) if text else []
    except ValueError:
        return []


# Errors a rank sees because a *peer* died or stopped (gloo / NCCL wording).
_SECONDARY = ("Connection closed by peer", "remote worker", "Connection reset by peer",
              "remote process exited", "NCCL communicator was aborted", "Broken pipe",
              "Timed out", "timed out")


def _secondary(tmp: str, r: int) -> bool:
    """Whether rank ``r``'s traceback only says that a peer went away."""
    text = _read(os.path.join(tmp, f"rank{r}.txt"))
    return any(s in text for s in _SECONDARY)


def _root_cause(tmp: str, failed: list[int], codes: list[int | None]) -> int:
    """The rank that failed first for its own reason: a rank killed by a
    signal (it writes no traceback) first, then the earliest-written traceback
    of an error of the rank's own; ranks whose error only says a peer went
    away come last."""
    def key(r):
        if codes[r] is not None and codes[r] < 0:
            return (0, 0, r)
        path = os.path.join(tmp, f"rank{r}.txt")
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = 0
        return (1 + _secondary(tmp, r), mtime, r)

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
