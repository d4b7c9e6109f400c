"""A rank that raises inside a collective, the watchdog that names a hung rank, and
the root cause named among several failing ranks."""
import os
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


# -- root cause among several failures (stand-in ranks: tests/fake_rank.py) -------------

def fake_job(nproc: int, **steps) -> Job:
    """A job whose ranks act out ``steps`` (``FAKE_RANK_<R>`` scripts)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    return Job([], nproc, env={"PYTHONPATH": path, **steps})


def test_a_rank_killed_by_a_signal_is_named_even_when_reaped_after_its_peer():
    """Under load a SIGKILLed rank can be reaped after a peer that lost its
    connection to it and exited: the killed rank is still the one named."""
    job = fake_job(2, FAKE_RANK_0="sleep=0.5;signal=SIGKILL",
                   FAKE_RANK_1="fail=RuntimeError: Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(LaunchError) as e:
        launch(job, deadline_s=60, module="fake_rank")
    assert e.value.rank == 0
    assert str(e.value).startswith("rank 0 failed: killed by signal SIGKILL"), str(e.value)


def test_a_stopped_rank_is_named_when_a_peer_times_out_waiting_for_it():
    job = fake_job(2, FAKE_RANK_0="signal=SIGSTOP",
                   FAKE_RANK_1="sleep=0.5;fail=RuntimeError: [gloo] Timed out waiting 1000ms "
                               "for recv operation to complete")
    with pytest.raises(LaunchError) as e:
        launch(job, deadline_s=60, module="fake_rank")
    assert e.value.rank == 0
    assert str(e.value).startswith("rank 0 is stopped (SIGSTOP or a debugger) and the others "
                                   "wait on it; rank 1 failed: RuntimeError: [gloo] Timed out")
    assert alive(e.value.pids) == []


def test_an_own_error_is_named_before_a_peers_lost_connection():
    job = fake_job(3, FAKE_RANK_2="fail=RuntimeError: Connection closed by peer",
                   FAKE_RANK_1="sleep=0.3;fail=ValueError: bad shape",
                   FAKE_RANK_0="sleep=30")
    with pytest.raises(LaunchError) as e:
        launch(job, deadline_s=60, module="fake_rank")
    assert e.value.rank == 1 and str(e.value).startswith("rank 1 failed: ValueError: bad shape")
