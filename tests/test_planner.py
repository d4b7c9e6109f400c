"""The planner enumerates exactly the valid plans, ranks them and flags the
ones that do not fit; reproduce and fidelity compute what they print."""
import json

import re

import pytest

from shardwise.perf.clusters import load_cluster
from shardwise.perf.costmodel import predict
from shardwise.perf.planner import enumerate_plans, plan_command, rank_plans, ranking, score
from shardwise.perf.reproduce import consistency, fidelity_command, find_seed, reproduce_command
from shardwise.presets import get_preset
from shardwise.spec import ModelSpec, Workload

H100_8, H100_16 = load_cluster("h100-sxm-8"), load_cluster("h100-sxm-16")

# 6 heads x 8, d_ff 96, 2 layers, on 4 ranks, one micro-batch. By hand:
#   tp_pp:TPxPP with TP*PP = 4: 4x1 no (6 % 4), 2x2 yes, 1x4 no (4 stages > 2 layers);
#   helix:NxM: 1x4 yes (8 % 4, 96 % 4; 6 kv heads % 4 -> sequence split, seq 16 >= 4),
#   2x2 and 2x2,reduce=flat yes (6 % 2, 8 % 2, 96 % 4), 4x1 no (6 % 4);
#   ring:4 yes; ep: a dense model has no candidates;
#   layerwise: batch 4 on 4 ranks with 1 group x 4 replicas or 2 groups x 2 replicas,
#   both use every rank, for both capacities (80 GB HBM and 50 MiB L2: a layer is ~100 KB).
SIX = ModelSpec(name="six-heads", n_layers=2, d_model=48, n_heads=6, head_dim=8, d_ff=96,
                dtype="fp32")
SIX_WL = Workload(batch=4, seq_len=16, decode_steps=2)
VALID = {"tp_pp:2x2", "helix:1x4", "helix:2x2", "helix:2x2,reduce=flat", "ring:4",
         "layerwise:cap=80GB", "layerwise:cap=50MiB"}
INVALID = {"tp_pp:4x1": "n_heads (6) is not divisible by tp", "tp_pp:1x4": "4 pipeline stages",
           "helix:4x1": "n_heads (6) is not divisible by head groups"}


def test_planner_lists_exactly_the_valid_plans():
    rows = enumerate_plans(SIX, SIX_WL, H100_8, ranks=4, micro_batches=(1,))
    valid = {r.plan for r in rows if r.valid}
    # layerwise also proposes the tightest capacity that fits 4 ranks, rounded up
    # to a size of 3 significant digits (a plan name a person reads).
    tight = [p for p in valid if p.startswith("layerwise:cap=") and p not in VALID]
    assert len(tight) == 1 and re.fullmatch(r"layerwise:cap=\d+(\.\d+)?[KMG]?B", tight[0])
    assert valid - set(tight) == VALID
    invalid = {r.plan: r.error for r in rows if not r.valid}
    assert set(invalid) == set(INVALID)
    for plan, why in INVALID.items():
        assert why in invalid[plan]


def test_micro_batch_variants_only_where_the_strategy_micro_batches():
    rows = enumerate_plans(SIX, SIX_WL, H100_8, ranks=4, micro_batches=(1, 2))
    plans = {r.plan for r in rows if r.valid}
    assert {"tp_pp:2x2,mb=2", "ring:4,mb=2", "layerwise:cap=80GB,mb=2"} <= plans
    assert not any(p.startswith("helix") and "mb=" in p for p in plans)


@pytest.mark.parametrize("phase", ["prefill", "decode", "both"])
def test_ranking_is_by_predicted_time(phase):
    rows = rank_plans(enumerate_plans(SIX, SIX_WL, H100_8, ranks=4), phase)
    fitting = [r for r in rows if r.fits]
    times = [score(r.prediction, phase) for r in fitting]
    assert fitting and times == sorted(times)
    assert rows[-1].valid is False  # invalid plans come last


def test_infeasible_plans_are_flagged_with_the_kv_cache():
    p = get_preset("seed-ring-4l")
    rows = enumerate_plans(p.model, p.workload, H100_16, micro_batches=(1,))
    valid = [r for r in rows if r.valid]
    assert valid and not any(r.fits for r in valid)
    assert all(r.prediction.reason == "KV cache 1.34 TB > 16 x 80 GB" for r in valid)
    text = plan_command("seed-ring-4l", "h100-sxm-16", phase="decode", top=3)
    assert "KV cache 1.34 TB > 16 x 80 GB" in text and "0 fit in memory" in text


def test_plan_validate_runs_the_best_fitting_plans_and_compares(tmp_path):
    # End to end on CPU: the two best fitting 2-rank plans are benchmarked
    # here and each record is printed beside its prediction on the profile.
    import subprocess
    import sys

    from shardwise.bench.records import read_records
    from shardwise.perf.planner import best_fitting

    # bench sizes the KV cache for warm-up (3) + timed (2) + 1 decode positions;
    # the plans validated are the first rows of the table plan prints for it.
    best, _, _ = best_fitting("tiny-dense", "h100-sxm-8", 4, 32, "prefill", 2, ranks=2, steps=6)
    rk = ranking("tiny-dense", "h100-sxm-8", 4, 32, "prefill", 2, steps=6)
    assert best == [r.plan for r in rk.shown if r.fits][:2] and len(best) == 2
    out = tmp_path / "v.jsonl"
    p = subprocess.run([sys.executable, "-m", "shardwise", "plan", "--preset", "tiny-dense",
                        "--cluster", "h100-sxm-8", "--ranks", "2", "--batch", "4", "--seq", "32",
                        "--top", "2", "--validate", "--device", "cpu", "--iters", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "measured vs predicted" in p.stdout
    assert sorted(r["plan"] for r in read_records(str(out))) == sorted(best)
    for plan in best:
        assert any(line.startswith("│ " + plan) for line in p.stdout.splitlines())


def test_reproduce_checks_the_seeds_own_figures():
    seed, presets = find_seed("001")
    assert presets == ["seed-ring-4l"] and find_seed("seed-ring-4l")[0] is seed
    p = get_preset("seed-ring-4l")
    lines = consistency(seed, p.model, p.workload)
    # 1.2M tokens/s x 0.85 ms = 1020 tokens in flight ~ batch 1024: TPOT is a step.
    assert any("1,020.0 tokens in flight = batch 1024" in x for x in lines)
    assert any(x.startswith("the KV cache at batch 1024") for x in lines)
    # 002: 12,800 x 0.078 ms = 0.998: TPOT is 1 / TPS.
    seed2, _ = find_seed("002")
    lw = get_preset("seed-layerwise-3b")
    assert any("TPOT is just 1 / TPS" in x for x in consistency(seed2, lw.model, lw.workload))
    text = reproduce_command("seed-helix-2l")
    assert "1,580,000" in text and "helix:4x4" in text


def test_fidelity_reports_the_relative_error(tmp_path):
    p = get_preset("tiny-dense")
    wl = p.reduced
    pred = predict(p.model, wl, "tp_pp:2x2", H100_8, 4)
    # A run 25% faster than predicted in prefill (error -20%) and 2x slower in decode (-50%).
    rec = {"preset": "tiny-dense", "plan": "tp_pp:2x2", "world_size": 4, "batch": wl.batch,
           "seq_len": wl.seq_len, "decode_steps": wl.decode_steps, "dtype": "fp32",
           "prefill_tokens_per_s": pred.prefill_tps * 1.25, "tpot_ms": pred.decode_step_ms * 2}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "preset": "nope"}) + "\n")
    text = fidelity_command([str(path)], "h100-sxm-8")
    assert "-20%" in text and "-50%" in text
    assert "skipped" in text and "no known preset" in text
    # The spread of a record's timed steps beside its error, marked past 1.5x.
    path.write_text(json.dumps({**rec, "p10_ms": 2.0, "p90_ms": 4.0}) + "\n"
                    + json.dumps({**rec, "p10_ms": 2.0, "p90_ms": 2.2}) + "\n")
    text = fidelity_command([str(path)], "h100-sxm-8")
    assert "2.00 !" in text and "1.10" in text and "1.10 !" not in text
