"""A failing rank ends the whole job quickly, with its traceback, leaving no process."""
import os
import subprocess
import sys
import time

import pytest

from shardwise.presets import get_preset
from shardwise.runtime.job import Case, Job
from shardwise.runtime.launcher import LaunchError, launch

TINY = get_preset("tiny-dense")


def alive(pids: list[int]) -> list[int]:
    """Which of these rank processes (or their process groups) still exist."""
    out = []
    for pid in pids:
        try:
            os.killpg(pid, 0)
            out.append(pid)
        except ProcessLookupError:
            pass
    return out


def job(fault=None, nproc=4, plan="tp_pp:2x2", **kw):
    return Job([Case(TINY.model, TINY.reduced, plan)], nproc, fault=fault, **kw)


@pytest.mark.parametrize("point", ["startup", "prefill", "decode"])
def test_rank_that_raises_ends_the_job(point):
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as e:
        launch(job(f"1:{point}"), deadline_s=120)
    elapsed = time.monotonic() - t0
    assert elapsed < 30, elapsed
    assert e.value.rank == 1
    assert f"injected fault on rank 1 at {point}" in str(e.value)
    assert "Traceback" in e.value.traceback_text
    assert len(e.value.pids) == 4 and alive(e.value.pids) == []


def test_rank_killed_by_a_signal():
    with pytest.raises(LaunchError, match="rank 2 failed: killed by signal SIGKILL") as e:
        launch(job("2:kill"), deadline_s=120)
    assert alive(e.value.pids) == []


def test_hanging_rank_is_ended_by_the_deadline():
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"deadline; ranks \[0, 1\] were still running") as e:
        launch(job("0:hang", nproc=2, plan="tp_pp:2x1"), deadline_s=8)
    assert time.monotonic() - t0 < 30
    assert alive(e.value.pids) == []


def test_cli_failure_exits_nonzero_and_shows_the_traceback():
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "shardwise", "verify", "--preset", "tiny-dense", "--plan",
         "tp_pp:2x1", "--inject-fault", "1:prefill"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 1
    assert "rank 1 failed" in p.stderr and "Traceback" in p.stderr
    assert time.monotonic() - t0 < 30


def test_results_of_a_good_job_come_back():
    res = launch(job(nproc=2, plan="tp_pp:1x2"), deadline_s=120)
    assert len(res) == 1 and res[0]["ok"]


def test_a_rendezvous_port_taken_before_the_ranks_bind_it(monkeypatch):
    # free_port's port is taken by another process before rank 0 binds it:
    # rank 0 fails with EADDRINUSE, and the job starts again on another port.
    import socket

    from shardwise.runtime import launcher

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken, real, given = held.getsockname()[1], launcher.free_port, []

    def free_port():  # the taken port first, then really free ones
        given.append(real() if given else taken)
        return given[-1]

    monkeypatch.setattr(launcher, "free_port", free_port)
    try:
        res = launch(job(nproc=2, plan="tp_pp:1x2"), deadline_s=120)
    finally:
        held.close()
    assert len(res) == 1 and res[0]["ok"]
    assert given[0] == taken and len(given) == 2


def test_a_port_taken_is_told_from_other_failures():
    from shardwise.runtime.launcher import port_taken

    bind = "RuntimeError: ... port: 4242, useIPv6: 0, code: -98, name: EADDRINUSE, message: ..."
    assert port_taken(LaunchError("rank 0 failed", 0, bind))
    assert not port_taken(LaunchError("rank 1 failed", 1, bind))  # not the store's rank
    assert not port_taken(LaunchError("rank 0 failed", 0, "ValueError: injected fault"))
    assert not port_taken(LaunchError("rank 0 failed", 0, bind, results=[{"ok": True}]))
