"""Input fuzzing: every random case is refused before launch with a one-line
ShardwiseError, or runs and matches the reference (fp32, 1e-5)."""
import json
import subprocess
import sys

import pytest

from shardwise import fuzz
from shardwise.parallel.registry import validate_plan
from shardwise.parallel.plans import RingPlan
from shardwise.spec import ModelSpec, ShardwiseError, Workload

# A fixed subset of seed 0 (see results/fuzz-summary.json for the large run):
# 23 cases that run (every strategy, world sizes 1-4, dense and MoE, with and
# without vocabulary, rope and micro-batches; 957, 1384 and 1480 with more
# head groups or tp ranks than KV heads, q/k/v biases, tied embeddings and
# rope scaling; the last eight compositions: ring x tp, a pipeline of ring
# stages, ep with tensor- and data-parallel attention, helix, dp over a
# pipeline and over tp, a four-stage pipeline) and 11 refused for 11
# different reasons.
VALID = [32, 68, 82, 96, 85, 186, 59, 116, 79, 74, 51, 81, 957, 1384, 1480,
         61, 1051, 97, 39, 410, 729, 92, 1462]
REFUSED = [1, 16, 8, 33, 13, 25, 5, 2, 296, 31, 7]


def test_ci_subset(tmp_path):
    summary_file = tmp_path / "summary.json"
    only = ",".join(map(str, VALID + REFUSED))
    p = subprocess.run([sys.executable, "-m", "shardwise.fuzz", "--seed", "0", "--only", only,
                        "--summary", str(summary_file)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads(summary_file.read_text())
    assert s["counts"] == {"refused": 11, "verified": 23, "failed": 0}, s["failures"]
    assert len(s["refused_by_reason"]) == 11 and "other" not in s["refused_by_reason"]
    assert set(s["by_strategy"]) == {"tp_pp", "helix", "ring", "layerwise", "ep", "compose"}
    assert s["by_strategy"]["compose"] == {"verified": 8, "refused": 3}
    assert sorted(s["verified_by_world"]) == ["1", "2", "3", "4"]
    assert s["launches"] == 4  # one per world size
    assert s["command"].startswith("python -m shardwise.fuzz --seed 0 --only 32,")
    assert s["max_rel_err_verified"] <= 1e-5


def test_cases_are_deterministic_per_seed_and_index():
    assert fuzz.generate(0, 17) == fuzz.generate(0, 17)
    assert fuzz.generate(0, 17) != fuzz.generate(1, 17)
    assert fuzz.parse_indices("3,7,10-12") == [3, 7, 10, 11, 12]


@pytest.mark.parametrize("plan, world", [("tp_pp:1x1", 2), ("tp_pp:1x2", 4)])
def test_a_plan_on_the_wrong_number_of_ranks_is_a_world_size_mismatch(plan, world):
    # The message counts ranks in the singular for one ("1 rank but the job has 2").
    case = fuzz.generate(0, 32)
    spec = ModelSpec(**case.model)
    with pytest.raises(ShardwiseError) as e:
        validate_plan(spec, Workload(**case.workload), plan, world)
    assert fuzz.reason_of(str(e.value)) == "world size mismatch", str(e.value)


def test_a_crash_during_validation_is_a_failure(monkeypatch):
    case = fuzz.generate(0, 59)  # ring:2,mb=2, valid
    assert fuzz.prelaunch(case)[0] == "valid"

    def crash(*a, **k):
        raise TypeError("boom")

    monkeypatch.setattr(RingPlan, "validate", classmethod(crash))
    status, detail = fuzz.prelaunch(case)
    assert status == "failed" and detail["error"] == "TypeError: boom"

    def two_lines(*a, **k):
        raise ShardwiseError("first line\nsecond line")

    monkeypatch.setattr(RingPlan, "validate", classmethod(two_lines))
    assert fuzz.prelaunch(case)[1]["kind"].startswith("bad refusal")


def test_a_wrong_answer_is_a_failure(monkeypatch):
    monkeypatch.setattr(fuzz, "TOLERANCE", 1e-30)  # no reordered sum is that exact
    s = fuzz.fuzz(0, [51], log=lambda m: None)  # tp_pp:2x1,mb=2
    assert s["counts"]["failed"] == 1 and s["failures"][0]["kind"] == "wrong answer"


@pytest.mark.parametrize("fault, kind", [("1:collective=3", "crash after launch"),
                                         ("1:hang", "hang (watchdog)")])
def test_a_failed_launch_is_recorded_and_the_rest_still_run(fault, kind):
    # Three world-size-2 cases; the first launch fails in case 59 (the first),
    # the second launch runs the other two.
    s = fuzz.fuzz(0, [59, 17, 29], watchdog_s=3, faults={2: fault}, log=lambda m: None)
    assert s["counts"] == {"refused": 0, "verified": 2, "failed": 1}, s["failures"]
    f = s["failures"][0]
    assert (f["index"], f["kind"]) == (59, kind), f
    assert "rank 1" in f["error"]
    assert f["reproduce"] == "python -m shardwise.fuzz --seed 0 --only 59"
    assert s["launches"] == 2


# -- the command line ------------------------------------------------------------------

def test_cli_fuzz_never_a_traceback_nor_a_launch_a_check_could_stop():
    """300 random command lines (launches stubbed, two small ones run for
    real): a wrong value is always refused in one line, nothing else is."""
    from shardwise import fuzz_cli
    from shardwise.cli import build_parser

    s = fuzz_cli.fuzz_cli(0, list(range(300)), launch=2, log=lambda m: None)
    assert s["failures"] == [], s["failures"]
    c = s["counts"]
    assert c.get("failed", 0) == 0 and c["launched and ran"] == 2, c
    # Every subcommand is drawn, and each outcome is common enough to mean something.
    assert set(s["by_command"]) == set(fuzz_cli.commands(build_parser()))
    assert c["refused"] >= 100 and c["ran"] >= 50 and c["launched"] >= 15, c
    assert s["with_a_wrong_value"] >= 60 and s["refusal_kinds"] >= 50, s


def test_cli_fuzz_finds_a_missing_check(monkeypatch):
    """With the checks of counts and times taken out, the fuzzer reports the
    command lines that launched with a wrong one (``--deadline -1``...)."""
    from shardwise import argcheck, fuzz_cli

    monkeypatch.setattr(argcheck, "AT_LEAST", {})
    monkeypatch.setattr(argcheck, "SECONDS", {})
    s = fuzz_cli.fuzz_cli(0, list(range(300)), log=lambda m: None)
    assert s["failures"], "no failure found"
    for f in s["failures"]:
        assert f["kind"].endswith("with a wrong value"), f
        assert {w.split("=")[0] for w in f["error"].split(", ")} & (
            {"timeout", "deadline", "watchdog"} | set(fuzz_cli.ZERO_OK)
            | {"top", "ranks", "batch", "seq", "iters", "nproc", "max_new_tokens"}), f
