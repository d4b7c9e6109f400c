"""A first ranking's recordings, made by several processes at once.

Pricing a plan the first time records its ranks on meta tensors
(:mod:`.record`): a few tenths of a second a plan of a zoo model on 16
ranks, most of a first ``shardwise plan`` over a hundred or more candidates
(what is recorded once is read back from the cache of recordings,
:mod:`.tracecache`). :func:`prerecord` records the plans the cache does
not hold yet before the planner prices them one by one: this process
records a share of them, and worker processes (``python -m
shardwise.perf.prerecord PID``, one per further CPU, up to
``$SHARDWISE_WORKERS``) the others, each keeping what it records in the
cache. The planner then reads every recording back. A worker shares nothing
with this process but its job (JSON on its standard input: no file) and the
cache's files, which are written atomically; a plan a worker fails on is
recorded again, and its error reported, by the planner itself. This process,
its share done, takes the workers' shares from their ends while they work
from their starts: every process reads back what another has kept, so the
shares meet wherever the processes' speeds put them. Workers end with this
call, or with :func:`recording_ahead`'s context, however it ends (an
interruption kills them; SIGKILL of this process ends each at its next plan).

Workers start only where they pay: the first plans are recorded here and
timed, and workers start when the rest would take this process more than
:data:`WORTH_S` seconds (a worker takes about two seconds to import PyTorch).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from . import tracecache
from .recordings import checked, recording_key

WORTH_S = 8.0  # the rest's estimated time in this process above which workers start
TIMED = 3  # plans recorded here first, to estimate the rest
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


def _record(spec: ModelSpec, wl: Workload, plan: Plan, world: int, balance, phases) -> None:
    try:
        recorder().record_plan(spec, wl, plan, world, balance=balance, phases=phases)
    except ShardwiseError:
        pass  # invalid here: the planner says why when it prices the plan


def family_plans(bases: list[Plan], micro_batches, batch: int) -> tuple[list, list]:
    """The plans the planner's families (``planner.micro_batch_family``) price
    first: each base plan, and its form at two micro-batches where it takes
    them; and those they may price later: its forms at the counts above two,
    the last bases' first (workers record them while the planner prices the
    families in order)."""
    def at(b: Plan, counts) -> list[Plan]:
        return [dataclasses.replace(b, micro_batches=mb) for mb in sorted(set(micro_batches))
                if mb in counts and mb <= batch and b.takes_micro_batches]

    above = range(3, batch + 1)
    return (list(bases) + [p for b in bases for p in at(b, (2,))],
            [p for b in reversed(bases) for p in at(b, above)])


def _valid(spec: ModelSpec, wl: Workload, plan: Plan, world: int) -> bool:
    try:
        checked(spec, wl, plan, world)
    except ShardwiseError:
        return False
    return True


def prerecord(spec: ModelSpec, wl: Workload, plans: list[Plan], world: int,
              phases: tuple, balance: float | None = None) -> int:
    """Record ``plans`` on ``world`` ranks (as ``record_plan`` with
    ``balance`` and ``phases`` keys them) into the cache of recordings,
    with worker processes where they pay (module docstring). Returns the
    number of worker processes started."""
    with recording_ahead(spec, wl, plans, world, phases, balance) as n:
        return n


@contextmanager
def recording_ahead(spec: ModelSpec, wl: Workload, plans: list[Plan], world: int,
                    phases: tuple, balance: float | None = None, ahead: list[Plan] = ()):
    """:func:`prerecord` on entering; then, until the context ends, the
    workers go on to record ``ahead``: plans the planner may price later,
    those it will reach last first (it reads back any a worker has kept by
    then, and records the others itself). Yields the number of workers. At
    its end the workers stop."""
    if tracecache.directory() is None:
        yield 0
        return
    missing = [p for p in plans if _valid(spec, wl, p, world) and not tracecache.kept(
        recording_key(spec, wl, p, world, balance=balance, phases=phases))]
    # A plan at more micro-batches only beside its one-micro-batch form: where
    # that is kept, the plan was ranked before, and its other counts that are
    # not kept are ones the planner does not price (none fits, or a count
    # below was faster), which every later ranking would record again here.
    ones = {str(dataclasses.replace(p, micro_batches=1)) for p in missing
            if p.micro_batches == 1}
    todo = [p for p in missing
            if p.micro_batches == 1 or str(dataclasses.replace(p, micro_batches=1)) in ones]
    start = time.monotonic()
    for p in todo[:TIMED]:
        _record(spec, wl, p, world, balance, phases)
    rest = todo[TIMED:]
    each = (time.monotonic() - start) / max(1, min(TIMED, len(todo)))
    n = min(workers_allowed(), len(rest))
    if n < 2 or each * len(rest) < WORTH_S:
        yield 0
        return
    shares = [rest[i::n] for i in range(n)]
    procs = []
    try:
        for i, share in enumerate(shares[1:]):
            proc = subprocess.Popen(
                [sys.executable, "-m", "shardwise.perf.prerecord", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "SHARDWISE_WORKERS": "1"})
            procs.append(proc)
            try:
                proc.stdin.write(json.dumps({
                    "spec": spec.to_dict(), "workload": dataclasses.asdict(wl),
                    "plans": [str(p) for p in share] + [str(p) for p in ahead[i::n - 1]],
                    "world": world, "balance": balance, "phases": list(phases)}).encode())
                proc.stdin.close()
            except OSError:
                pass  # the worker ended already: the planner records its share
        for p in shares[0]:
            _record(spec, wl, p, world, balance, phases)
        # Then the workers' shares from their ends (a worker starts seconds
        # later): a plan another process has kept is read back, not recorded.
        for p in reversed(rest):
            if p not in shares[0]:
                _record(spec, wl, p, world, balance, phases)
        yield len(procs)
        for proc in procs:
            proc.terminate()  # what it is recording is left (_stop)
        for proc in procs:
            proc.wait()
    finally:  # interrupted (Ctrl-C, a stop signal, an error here): no worker outlives this
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _stop(signum, frame):
    """A worker's end on SIGTERM: an exception, which a cache entry being
    written cleans up after (``tracecache.store``: no file left half written)."""
    raise SystemExit(1)


def main(argv: list[str]) -> int:
    """A worker: record the plans of the job on standard input into the cache,
    skipping those kept; ``argv[0]``: the process that started it, whose
    end (even by SIGKILL) ends the worker at its next plan. SIGTERM ends
    it at once, leaving in the cache what it had kept (:func:`_stop`)."""
    signal.signal(signal.SIGTERM, _stop)
    import torch

    torch.set_num_threads(1)
    parent = int(argv[0])
    job = json.loads(sys.stdin.read())
    spec, wl = ModelSpec.from_dict(job["spec"]), Workload(**job["workload"])
    world, balance, phases = job["world"], job["balance"], tuple(job["phases"])
    for text in job["plans"]:
        if os.getppid() != parent:
            return 1
        plan = Plan.parse(text)
        if not tracecache.kept(recording_key(spec, wl, plan, world, balance=balance,
                                             phases=phases)):  # else taken by the planner
            _record(spec, wl, plan, world, balance, phases)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except SystemExit:  # SIGTERM (_stop)
        code = 1
    os._exit(code)  # at once: the cache files are closed; a teardown of PyTorch takes 1 s
