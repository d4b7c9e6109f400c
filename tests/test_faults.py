"""A rank that raises inside a collective, and the watchdog that names a hung rank."""
import subprocess
import sys
import time

import pytest

from shardwise.parallel.comm import Comm
from shardwise.parallel.topology import Topology
from shardwise.presets import get_preset
from shardwise.runtime.job import Case, Heartbeat, Job
from shardwise.runtime.launcher import LaunchError, launch
from shardwise.spec import ShardwiseError
from test_launcher import alive

TINY = get_preset("tiny-dense")


def job(fault=None, nproc=4, plan="tp_pp:2x2", cases=None, **kw):
    return Job(cases or [Case(TINY.model, TINY.reduced, plan)], nproc, fault=fault, **kw)


def test_rank_that_raises_inside_a_collective_ends_the_job():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as e:
        launch(job("2:collective=3", plan="tp_pp:4x1"), deadline_s=120)
    assert time.monotonic() - t0 < 30
    assert e.value.rank == 2
    # The third all-reduce of rank 2 (tp_pp:4x1 only all-reduces over tp).
    assert "rank 2 failed: RuntimeError: injected fault on rank 2 at collective " \
           "(call 3: all_reduce/tp)" in str(e.value)
    tb = e.value.traceback_text
    assert "Traceback" in tb and "in all_reduce" in tb and "comm.py" in tb
    assert len(e.value.pids) == 4 and alive(e.value.pids) == []


def test_watchdog_names_the_hung_rank():
    watchdog = 3.0
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as e:
        launch(job("2:hang", watchdog_s=watchdog), deadline_s=120)
    elapsed = time.monotonic() - t0
    message = str(e.value)
    assert message.startswith("watchdog: no progress for 3 s; rank 2 hung"), message
    assert e.value.hung == [2] and e.value.rank == 2 and e.value.case == 0
    # Every rank's state is shown: the hung one at its phase, the others inside a collective.
    assert "rank 2: case 0 (tp_pp:2x2), last event 'prefill'" in message
    assert "not in a collective" in message.split("rank 2:")[1].splitlines()[0]
    for r in (0, 1, 3):
        assert "waiting inside" in message.split(f"rank {r}:")[1].splitlines()[0]
    # Start-up (4 ranks importing torch on 2 cores) + warm-up + the watchdog + stop.
    assert elapsed < watchdog + 30, elapsed
    assert alive(e.value.pids) == []


def test_watchdog_flag_on_the_cli():
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "shardwise", "verify", "--preset", "tiny-dense", "--plan",
         "tp_pp:2x1", "--device", "cpu", "--inject-fault", "1:hang", "--watchdog", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 1
    assert "watchdog: no progress for 3 s; rank 1 hung" in p.stderr, p.stderr[-2000:]
    assert time.monotonic() - t0 < 40


def test_watchdog_leaves_a_good_job_alone_and_keeps_finished_cases():
    # Case 0 only prefills (no decode fault point); case 1 fails at its first decode step.
    prefill_only = TINY.reduced.replace(phase="prefill", decode_steps=0)
    cases = [Case(TINY.model, prefill_only, "tp_pp:2x1"), Case(TINY.model, TINY.reduced,
                                                              "tp_pp:2x1")]
    with pytest.raises(LaunchError) as e:
        launch(job("1:decode", nproc=2, cases=cases, watchdog_s=30), deadline_s=120)
    assert e.value.case == 1 and "rank 1 failed in case 1 (tp_pp:2x1)" in str(e.value)
    assert [r["plan"] for r in e.value.results] == ["tp_pp:2x1"] and e.value.results[0]["ok"]
    res = launch(job(nproc=2, plan="tp_pp:1x2", watchdog_s=30), deadline_s=120)
    assert len(res) == 1 and res[0]["ok"]


@pytest.mark.parametrize("kw", [{"fault": "1:collective=0"}, {"fault": "1:prefill=2"},
                                {"fault": "1:collective=x"}, {"watchdog_s": 0}])
def test_bad_fault_or_watchdog_is_refused(kw):
    with pytest.raises(ShardwiseError):
        job(**kw)


def test_heartbeat_record_round_trip_and_cost(tmp_path):
    path = str(tmp_path / "heartbeat0")
    Heartbeat.create(path)
    assert Heartbeat.read(path) is None  # nothing written yet
    hb = Heartbeat(path)
    hb.phase("prefill", case=3)
    hb.waiting("all_reduce/tp")
    rec = Heartbeat.read(path)
    assert (rec["case"], rec["event"], rec["inside"], rec["collective"]) == (
        3, "prefill", True, "all_reduce/tp")
    hb.done()
    assert not Heartbeat.read(path)["inside"]
    # The cost per collective while the watchdog is on: two mmap writes.
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        hb.waiting("all_reduce/tp")
        hb.done()
    per_collective = (time.perf_counter() - t0) / n
    hb.close()
    assert per_collective < 50e-6, per_collective  # ~2-4 us measured; a gloo all-reduce is ~50+


def test_comm_has_no_hook_unless_asked():
    assert Comm(Topology(("tp",), (1,))).hook is None
