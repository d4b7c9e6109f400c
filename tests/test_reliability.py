"""The launcher under torchrun, Ctrl-C, and an interrupted benchmark sweep."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid



def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (the launcher and its ranks)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def start(args, tag):
    env = dict(os.environ, SHARDWISE_TEST_TAG=tag)
    return subprocess.Popen([sys.executable, "-m", "shardwise", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
    assert "skipping tp_pp:1x1" in r.stdout
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((x["plan"], x["phase"]) for x in final) == sorted(
        [("tp_pp:1x1", "prefill"), ("tp_pp:1x1", "decode"),
         ("tp_pp:2x2", "prefill"), ("tp_pp:2x2", "decode")])


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
