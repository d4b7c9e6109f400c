"""Entry point of one rank: ``python -m shardwise.runtime.worker JOB.json``.

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the
environment (set by shardwise's launcher or by torchrun), runs every case of
the job, and on rank 0 writes the results atomically after every case (so a
job that fails later keeps what was done). Any exception is written, with its
traceback, to ``SHARDWISE_ERROR_DIR/rank<R>.txt`` for the launcher to show,
and the process exits non-zero at once. With a watchdog, each rank keeps its
heartbeat in ``SHARDWISE_ERROR_DIR/heartbeat<R>`` (see :class:`Heartbeat`).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from typing import NoReturn

import torch
import torch.distributed as dist

from .job import Heartbeat, Job, heartbeat_path


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def init_distributed(job: Job, monitor=None) -> tuple[int, int, torch.device]:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    timeout = datetime.timedelta(seconds=job.timeout_s)
    if monitor is not None:
        monitor.waiting("init_process_group")
    if job.device == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout,
                                device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    if monitor is not None:
        monitor.done()
    return rank, world, device


def make_monitor(job: Job):
    """This rank's RankMonitor: a heartbeat when the job has a watchdog and the
    launcher gave a directory for it; the collective fault when the job has one."""
    from .engine import RankMonitor

    rank = int(os.environ.get("RANK", 0))
    directory = os.environ.get("SHARDWISE_ERROR_DIR")
    path = heartbeat_path(directory, rank) if directory and job.watchdog_s else None
    heartbeat = Heartbeat(path) if path and os.path.exists(path) else None
    if heartbeat is not None:
        heartbeat.start_pulse()
    return RankMonitor(heartbeat, job.collective_fault(rank), rank, job.device)


def run_job(job: Job, log=None, save=None) -> list[dict]:
    """Run every case of ``job`` on this rank; rank 0 returns the results
    (and passes them to ``save`` after every case)."""
    from .engine import run_case

    from .progress import Reporter

    monitor = make_monitor(job)
    monitor.phase("start")
    rank, world, device = init_distributed(job, monitor)
    progress = monitor.progress = Reporter(rank)
    say = log or progress.log
    results = []
    for i, case in enumerate(job.cases):
        monitor.phase("case", case=i)
        progress.case(i, len(job.cases), case.plan, describe_case(case, world, device.type))
        for r in run_case(job, case, rank, world, device, log=say, monitor=monitor):
            results.append(r)
            if "ok" in r:
                flips = sum(r.get("routing_flips") or [])
                extra = (f"; {r['max_rel_err_without_flips']:.2e} without {flips} routing "
                         f"flip(s) at near-tied tokens" if flips else "")
                progress.done(f"{'ok' if r['ok'] else 'FAILED'}: max relative error "
                              f"{r['max_rel_err']:.2e}{extra} (tolerance {r['tolerance']:.0e})")
            elif "phase" in r:
                progress.done(f"{r['phase']}: median {r['median_ms']:.3f} ms "
                              f"(p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f}, n={r['n']})")
        if save is not None and rank == 0:
            save(results)
    monitor.phase("end", case=len(job.cases))
    # Only on success: after a failure the traceback is written first and the
    # process exits without a teardown that peers would mistake for the cause.
    # The barrier keeps a rank from tearing its connections down while rank 0
    # is still verifying (gloo can abort a peer that is mid-teardown).
    if world > 1:
        monitor.wait("final barrier", dist.barrier)
    dist.destroy_process_group()
    return results


def describe_case(case, world: int, device: str) -> str:
    """What a case does, for its progress line."""
    from ..output import plural

    wl = case.workload
    if case.generate is not None:
        what = "generate"
    elif case.bench is not None:
        phase = case.bench.get("phase", "both")
        what = "time " + ("prefill and decode" if phase == "both" else phase)
    else:
        what = "verify" if case.verify else "run"
    return (f"{what} ({case.model.name}, batch {wl.batch}, prompt {wl.seq_len}, "
            f"{plural(wl.decode_steps, 'decode step')}, {plural(world, 'rank')}, {device})")


def rank_main(argv: list[str], body) -> NoReturn:
    """The launcher's protocol for one rank process: read the job file
    ``argv[0]``, run ``body(job, save)``, and on rank 0 write what it returns
    (a list of records) to SHARDWISE_RESULT atomically; ``save(records)``
    writes partial results as they come. Any exception is written, with its
    traceback, to ``SHARDWISE_ERROR_DIR/rank<R>.txt`` and the process exits
    at once; so does a rank that succeeds (status 0), after flushing its
    output."""
    rank = os.environ.get("RANK", "0")
    err_dir = os.environ.get("SHARDWISE_ERROR_DIR")
    try:
        with open(argv[0]) as f:
            job = Job.loads(f.read())
        if job.device == "cpu":
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        out = os.environ.get("SHARDWISE_RESULT")
        save = (lambda results: write_atomic(out, json.dumps(results))) if out else None
        results = body(job, save)
        if rank == "0" and out and results is not None:
            write_atomic(out, json.dumps(results))
    except BaseException:
        tb = traceback.format_exc()
        if err_dir:
            write_atomic(os.path.join(err_dir, f"rank{rank}.txt"), tb)
        sys.stderr.write(f"[rank {rank}] {tb}")
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: peers may be blocked on us
    # Success skips the interpreter's teardown too: the results are written
    # and the process group destroyed, and a thread torch's C++ side leaves
    # behind can abort a process as it unwinds (std::terminate, SIGABRT),
    # which the launcher would report as this rank's failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str]) -> NoReturn:
    rank_main(argv, lambda job, save: run_job(job, save=save))


if __name__ == "__main__":
    main(sys.argv[1:])
