"""The launcher under torchrun, stop signals (Ctrl-C, SIGTERM, SIGHUP, SIGKILL),
an interrupted benchmark sweep, and concurrent appends to one results file."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import job_heartbeats, tagged_pids, wait_until


def _as_a_terminal_job() -> None:
    """The stop signals at their defaults in the job, as a shell's foreground
    job has them: a test run started in the background (``&`` ignores SIGINT)
    or under ``nohup`` (SIGHUP) would hand its children those signals
    ignored, and the launcher rightly keeps a signal its caller ignores."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def start(args, tag, **env):
    env = dict(os.environ, SHARDWISE_TEST_TAG=tag, **env)
    return subprocess.Popen([sys.executable, "-m", "shardwise", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_a_terminal_job)


def test_same_entry_point_runs_under_torchrun():
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29581", "-m", "shardwise", "verify", "--preset", "tiny-dense",
         "--plan", "tp_pp:2x1", "--device", "cpu"],
        capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PASS" in p.stdout and p.stdout.count("PASS") == 1  # rank 0 alone prints


def test_ctrl_c_ends_every_rank():
    tag = uuid.uuid4().hex
    p = start(["verify", "--preset", "tiny-dense", "--plan", "tp_pp:2x2", "--device", "cpu",
               "--inject-fault", "0:hang"], tag)
    deadline = time.monotonic() + 60
    while len(tagged_pids(tag)) < 5 and time.monotonic() < deadline:  # launcher + 4 ranks
        time.sleep(0.2)
    assert len(tagged_pids(tag)) >= 5
    time.sleep(2)  # let the ranks reach the hang
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert p.returncode == 130 and "interrupted" in err
    time.sleep(0.5)
    assert tagged_pids(tag) == []


def test_interrupted_sweep_keeps_records_and_resumes(tmp_path):
    out = tmp_path / "bench.jsonl"
    common = ["bench", "--preset", "tiny-dense", "--device", "cpu", "--iters", "2",
              "--warmup", "1", "--out", str(out)]
    plans = ["--plan", "tp_pp:1x1", "--plan", "tp_pp:2x2", "--inject-fault", "3:hang"]
    tag = uuid.uuid4().hex
    p = start(common + plans, tag)
    # The 1-rank group finishes and is written; the 4-rank group then hangs (rank 3).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["plan"], r["phase"]) for r in first} == {("tp_pp:1x1", "prefill"),
                                                         ("tp_pp:1x1", "decode")}
    r = subprocess.run([sys.executable, "-m", "shardwise", *common, "--plan", "tp_pp:1x1",
                        "--plan", "tp_pp:2x2", "--resume"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping tp_pp:1x1" in r.stderr  # notes on stderr, results on stdout
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((x["plan"], x["phase"]) for x in final) == sorted(
        [("tp_pp:1x1", "prefill"), ("tp_pp:1x1", "decode"),
         ("tp_pp:2x2", "prefill"), ("tp_pp:2x2", "decode")])


def test_resume_in_another_phase_writes_each_record_once(tmp_path):
    """A plan timed with --phase prefill, resumed with --phase both: the decode
    record is added and the prefill record is not written a second time."""
    out = tmp_path / "bench.jsonl"
    common = ["bench", "--preset", "tiny-dense", "--device", "cpu", "--iters", "2",
              "--warmup", "1", "--plan", "tp_pp:1x1", "--out", str(out)]
    for extra in (["--phase", "prefill"], ["--phase", "both", "--resume"]):
        r = subprocess.run([sys.executable, "-m", "shardwise", *common, *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((x["plan"], x["phase"]) for x in final) == [("tp_pp:1x1", "decode"),
                                                              ("tp_pp:1x1", "prefill")]


def test_bench_trace_profiles_every_rank(tmp_path):
    """``bench --trace DIR``: one profiled step per phase and rank, a Chrome
    trace and a host-op table each, and every rank's summary in the record."""
    out, traces = tmp_path / "bench.jsonl", tmp_path / "traces"
    r = subprocess.run([sys.executable, "-m", "shardwise", "bench", "--preset", "tiny-dense",
                        "--device", "cpu", "--iters", "1", "--warmup", "1", "--plan", "tp_pp:2x1",
                        "--trace", str(traces), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {x["phase"] for x in records} == {"prefill", "decode"}
    for rec in records:
        t = rec["trace"]
        assert len(t["ranks"]) == 2 and all(x["wall_ms"] > 0 and x["host_ops"] > 0
                                            for x in t["ranks"])
        for rank in (0, 1):
            path = traces / t["file"].format(r=rank)
            events = json.loads(path.read_text())["traceEvents"]
            assert any(e.get("name") == "aten::mm" for e in events)
            assert "Self CPU" in path.with_suffix(".txt").read_text()


# -- signals to the launcher ---------------------------------------------------------

NPROC = 2


def started_bench(tmp_path, moment: str):
    """A CLI bench on NPROC ranks whose job's temporary directory lands in
    ``tmp_path/tmp``, brought to ``moment``: ``startup`` (every rank process
    exists, importing torch), ``prefill`` or ``decode`` (every rank's heartbeat
    is in that timed phase, which lasts seconds)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tag = uuid.uuid4().hex
    phase = "decode" if moment == "decode" else "prefill"
    p = start(["bench", "--preset", "tiny-dense", "--device", "cpu", "--plan", "tp_pp:2x1",
               "--phase", phase, "--iters", "400", "--watchdog", "120",
               "--out", str(tmp_path / "bench.jsonl")], tag, TMPDIR=str(tmp))
    wait_until(lambda: len(tagged_pids(tag)) >= 1 + NPROC, 60, "every rank started")
    if moment != "startup":
        wait_until(lambda: all(b and b["event"] == f"bench {phase}"
                               for b in job_heartbeats(tmp, NPROC)), 90, f"bench {phase}")
    return p, tag, tmp


def ranks_and_job_dir(p, tag, tmp) -> tuple[list[int], list]:
    return [q for q in tagged_pids(tag) if q != p.pid], list(tmp.glob("shardwise-*"))


# SIGTERM at each moment of a run; SIGHUP (the same handler) once.
@pytest.mark.parametrize("sig, moment", [(signal.SIGTERM, "startup"), (signal.SIGTERM, "prefill"),
                                         (signal.SIGTERM, "decode"), (signal.SIGHUP, "decode")])
def test_stop_signal_ends_every_rank_and_removes_the_job_dir(tmp_path, sig, moment):
    p, tag, tmp = started_bench(tmp_path, moment)
    assert ranks_and_job_dir(p, tag, tmp) != ([], [])
    p.send_signal(sig)
    t0 = time.monotonic()
    wait_until(lambda: ranks_and_job_dir(p, tag, tmp) == ([], []), 5,
               "every rank gone and the job's temporary directory removed")
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 30
    assert p.returncode == 128 + sig, err[-2000:]
    # Progress lines come first on stderr; the job's last words are the signal
    # and what was saved.
    said = [line for line in err.splitlines() if line.startswith("shardwise: ")]
    assert said[0].startswith(f"shardwise: interrupted by {sig.name}"), err[-2000:]
    assert said[0].endswith(": every rank was stopped")
    assert "record(s) of this run were appended to" in said[1]
    assert "Traceback" not in err


@pytest.mark.parametrize("moment", ["startup", "decode"])
def test_sigkill_of_the_launcher_leaves_no_rank(tmp_path, moment):
    p, tag, tmp = started_bench(tmp_path, moment)
    p.kill()
    p.communicate(timeout=30)
    wait_until(lambda: [q for q in tagged_pids(tag) if q != p.pid] == [], 10,
               "every rank gone after the launcher's SIGKILL")


# A first ranking records with worker processes (perf/prerecord.py): a stop
# signal ends them with the plan; SIGKILL of the plan ends each at its next plan.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_plan_leaves_no_recording_worker(tmp_path, sig):
    tag = uuid.uuid4().hex
    p = start(["plan", "--model", "llama-3.1-70b", "--cluster", "h100-sxm-16"], tag,
              SHARDWISE_CACHE=str(tmp_path), SHARDWISE_WORKERS="2")
    workers = lambda: [q for q in tagged_pids(tag) if q != p.pid]  # noqa: E731
    wait_until(workers, 90, "a recording worker started")
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    wait_until(lambda: workers() == [], 20, "every recording worker gone")
    if sig == signal.SIGTERM:
        assert p.returncode == 128 + sig, err[-2000:]
        assert "shardwise: interrupted by SIGTERM" in err and "Traceback" not in err


# -- concurrent appends ---------------------------------------------------------------

def test_concurrent_appends_keep_every_record(tmp_path):
    """Three processes append 50 records each to one file, all at once (each
    waits for the others to be ready): every record is kept."""
    out, go = tmp_path / "r.jsonl", tmp_path / "go"
    code = ("import os, sys, time; from shardwise.bench.records import append_records\n"
            "open(sys.argv[3] + sys.argv[2], 'w').close()\n"
            "while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n"
            "for n in range(50): append_records(sys.argv[1], [{'writer': sys.argv[2], 'n': n}])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(w), str(go)])
             for w in range(3)]
    wait_until(lambda: all((tmp_path / f"go{w}").exists() for w in range(3)), 120, "ready")
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = out.read_text().splitlines()
    assert sorted((r["writer"], r["n"]) for r in map(json.loads, lines)) == sorted(
        (str(w), n) for w in range(3) for n in range(50))


def test_three_concurrent_benches_into_one_file_keep_every_record(tmp_path):
    out = tmp_path / "bench.jsonl"
    procs = [start(["bench", "--preset", "tiny-dense", "--device", "cpu", "--iters", "1",
                    "--warmup", "0", "--seed", str(i), "--plan", "tp_pp:1x1", "--plan",
                    "tp_pp:2x1", "--out", str(out)], uuid.uuid4().hex) for i in range(3)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        assert "appended 4 record(s)" in stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["command"].split("--seed ")[1][0], r["plan"], r["phase"])
                  for r in records) == sorted(
        (str(i), plan, phase) for i in range(3) for plan in ("tp_pp:1x1", "tp_pp:2x1")
        for phase in ("prefill", "decode"))
