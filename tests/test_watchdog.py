"""The watchdog names exactly the rank that was stopped (SIGSTOP), whichever rank
it is, in prefill or in decode, at a random moment: never a peer waiting on it.

Each trial launches a short timed run (tiny-dense on CPU, 2 or 4 ranks), waits
until the rank is in the chosen phase, stops it after a random delay, and
expects the watchdog to name that rank alone. The delays come from a seed
printed with each trial (SHARDWISE_TRIAL_SEED repeats a run).
"""
import os
import random
import signal
import tempfile
import threading
import time
import uuid

import pytest

from helpers import job_heartbeats, rank_pid, wait_until
from shardwise.presets import get_preset
from shardwise.runtime.job import Case, Job
from shardwise.runtime.launcher import LaunchError, launch
from shardwise.runtime.timing import BenchSettings
from test_launcher import alive

TINY = get_preset("tiny-dense")
WATCHDOG_S = 1.0
SEED = int(os.environ.get("SHARDWISE_TRIAL_SEED", random.randrange(10**6)))

# Every rank of each plan: tp_pp:2x1 all-reduces, tp_pp:1x2 sends between
# stages, ring:2 exchanges K/V blocks, each rank of these in one phase (the
# two ranks in the two phases, the other way round from one plan to the
# next); tp_pp:2x2 does both, every rank in prefill and in decode (the case
# the watchdog once misnamed): 14 trials.
TRIALS = [(plan, rank, phase)
          for i, (plan, world) in enumerate((("tp_pp:2x1", 2), ("tp_pp:1x2", 2), ("ring:2", 2),
                                             ("tp_pp:2x2", 4)))
          for rank in range(world) for j, phase in enumerate(("prefill", "decode"))
          if world == 4 or (rank + i) % 2 == j]


@pytest.mark.parametrize("plan, rank, phase", TRIALS)
def test_watchdog_names_the_stopped_rank(plan, rank, phase, tmp_path, monkeypatch):
    rng = random.Random(f"{SEED}:{plan}:{rank}:{phase}")
    delay = rng.uniform(0.0, 0.4)
    print(f"trial seed {SEED}: stop rank {rank} of {plan} {delay:.3f} s into {phase}")
    world = 4 if plan == "tp_pp:2x2" else 2
    tag = uuid.uuid4().hex
    # Long enough that the phase outlasts the stop: the job ends at the watchdog.
    bench = BenchSettings(phase=phase, iters=2000, warmup=1)
    wl = TINY.reduced.replace(decode_steps=bench.decode_positions)
    job = Job([Case(TINY.model, wl, plan, verify=False, bench=vars(bench))], world,
              watchdog_s=WATCHDOG_S, env={"SHARDWISE_TEST_TAG": tag})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the job's heartbeats go
    outcome = {}

    def run():
        try:
            launch(job, deadline_s=120)
        except LaunchError as e:
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(lambda: all(b and b["event"] == f"bench {phase}"
                               for b in job_heartbeats(tmp_path, world)), 90,
                   f"every rank in bench {phase}")
        time.sleep(delay)
        pid = rank_pid(tag, rank)
        os.kill(pid, signal.SIGSTOP)
    finally:
        t.join(timeout=120)
    e = outcome.get("error")
    assert e is not None, "the job ended without the watchdog"
    message = str(e)
    assert e.hung == [rank] and e.rank == rank, message
    # Linux reads the stop from /proc ("is stopped"); elsewhere the pulse tells
    # ("is not responding").
    assert message.startswith(f"watchdog: no progress for {WATCHDOG_S:g} s; rank {rank} is "), \
        message
    assert f"  rank {rank}: case 0 ({plan})" in message
    assert alive(e.pids) == []


def test_summarize_keeps_the_times_in_the_order_run():
    """The percentiles say a second mode exists; ``times_ms`` says when it came."""
    from shardwise.runtime.timing import summarize

    s = summarize([0.003, 0.001, 0.002])
    assert s["times_ms"] == [3.0, 1.0, 2.0]
    assert (s["min_ms"], s["median_ms"], s["max_ms"], s["n"]) == (1.0, 2.0, 3.0, 3)


def test_settle_runs_the_same_untimed_steps_on_every_rank(monkeypatch):
    """Decode steps settle for a time on a GPU before they are timed; the
    count comes from the slowest rank's first step, so every rank runs as
    many (a step holds collectives); a CPU or 0 s runs none."""
    import types

    import torch
    from shardwise.runtime import timing

    class Comm:  # this rank's step took 2 ms; the slowest rank's took 5
        def barrier(self):
            pass

        def gather_floats(self, values, device):
            return [values, [0.005]]

    calls = []
    monkeypatch.setattr(timing, "sync_device", lambda device: None)
    gpu = types.SimpleNamespace(type="cuda")
    step = (lambda: (calls.append(1), time.sleep(0.002)))
    n = timing._settle(step, 0.05, gpu, Comm())
    assert n == len(calls) == 1 + 10  # the first step, then 0.05 s / 5 ms
    assert timing._settle(step, 0.0, gpu, Comm()) == 0
    assert timing._settle(step, 0.05, torch.device("cpu"), Comm()) == 0
    assert len(calls) == 11
