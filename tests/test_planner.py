"""The planner enumerates exactly the valid plans, ranks them and flags the
ones that do not fit; reproduce and fidelity compute what they print."""
import json
import os

import re

import pytest

from shardwise.perf.clusters import load_cluster
from shardwise.perf.costmodel import predict, size_text
from shardwise.perf.costs import fmt_bytes
from shardwise.perf.planner import (base_plans, best_micro_batching, enumerate_plans, evaluate,
                                    family, micro_batch_family, plan_command, plan_parts,
                                    rank_plans, rank_rows, ranking, score)
from shardwise.perf.reproduce import consistency, fidelity_command, find_seed, reproduce_command
from shardwise.presets import get_preset
from shardwise.spec import ModelSpec, Plan, Workload

H100_8, H100_16 = load_cluster("h100-sxm-8"), load_cluster("h100-sxm-16")

# 6 heads x 8, d_ff 96, 2 layers, on 4 ranks, one micro-batch. By hand:
#   tp_pp:TPxPP with TP*PP = 4: 4x1 no (6 % 4), 2x2 yes, 1x4 no (4 stages > 2 layers);
#   helix:NxM: 1x4 yes (8 % 4, 96 % 4; 6 kv heads % 4 -> sequence split, seq 16 >= 4),
#   2x2 and 2x2,reduce=flat yes (6 % 2, 8 % 2, 96 % 4), 4x1 no (6 % 4);
#   ring:4 yes; ep: a dense model has no candidates;
#   layerwise: batch 4 on 4 ranks with 1 group x 4 replicas or 2 groups x 2 replicas,
#   both use every rank, for both capacities (the profile's HBM and 50 MiB L2: a layer is ~100 KB).
SIX = ModelSpec(name="six-heads", n_layers=2, d_model=48, n_heads=6, head_dim=8, d_ff=96,
                dtype="fp32")
SIX_WL = Workload(batch=4, seq_len=16, decode_steps=2)
HBM = size_text(H100_8.hbm_bytes)  # layerwise:cap=HBM, named by the profile's memory
VALID = {"tp_pp:2x2", "helix:1x4", "helix:2x2", "helix:2x2,reduce=flat", "ring:4",
         f"layerwise:cap={HBM}", "layerwise:cap=50MiB"}
INVALID = {"tp_pp:4x1": "n_heads (6) is not divisible by tp", "tp_pp:1x4": "4 pipeline stages",
           "helix:4x1": "n_heads (6) is not divisible by head groups"}


def test_planner_lists_exactly_the_valid_plans():
    rows = [r for r in enumerate_plans(SIX, SIX_WL, H100_8, ranks=4, micro_batches=(1,))
            if not Plan.parse(r.plan).is_composed]  # compositions: test_compositions_are_...
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
    assert {"tp_pp:2x2,mb=2", "ring:4,mb=2", f"layerwise:cap={HBM},mb=2"} <= plans
    assert not any(p.startswith("helix") and "mb=" in p for p in plans)


@pytest.mark.parametrize("phase", ["prefill", "decode", "both"])
def test_ranking_is_by_predicted_time(phase):
    rows = rank_plans(enumerate_plans(SIX, SIX_WL, H100_8, ranks=4), phase)
    fitting = [r for r in rows if r.fits]
    times = [score(r.prediction, phase) for r in fitting]
    assert fitting and times == sorted(times)
    assert rows[-1].valid is False  # invalid plans come last


def test_infeasible_plans_are_flagged_with_the_kv_cache():
    # seed-ring-4l at twice its batch: 2.69 TB of KV cache, more than the 16 GPUs hold.
    # One ranking (every candidate and its micro-batch counts) serves each check.
    from shardwise.output import render

    batch = 2 * get_preset("seed-ring-4l").workload.batch
    rk = ranking("seed-ring-4l", "h100-sxm-16", batch, None, "decode")
    valid = [r for r in rk.rows if r.priced]
    assert any(Plan.parse(r.plan).micro_batches == 1 for r in valid)
    assert not any(r.fits for r in valid)
    # Compositions too: the recorded ranks' KV caches do not fit the cluster.
    hbm = fmt_bytes(H100_16.hbm_bytes)
    assert all(r.prediction.reason.startswith(f"KV cache 2.69 TB > 16 x {hbm}")
               for r in valid)
    assert any(Plan.parse(r.plan).is_composed for r in valid)
    text = render(plan_parts(rk, 3))  # what plan_command prints
    assert "KV cache" in text and "0 fit in memory" in text
    # Micro-batches shrink no KV cache: the table says none fits, and shows one count.
    tp = [r for r in rk.shown if family(r.plan) == "tp_pp:8x2"]
    assert len(tp) == 1 and tp[0].note == f"no micro-batch count fits (up to mb={batch} tried)"


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


def test_reproduce_checks_the_seeds_own_figures(first_candidates):
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


def test_a_plan_without_micro_batches_that_does_not_fit_is_tried_as_one_stage():
    # Seed 000's helix:4x4 runs its 128 x 10000 prefill in one piece: one rank
    # holds more activations than an H100 (the row says so). As the one stage
    # of a pipeline, the same layout holds one micro-batch's activations at a
    # time, and fits; the planner shows that form and not the plan that fails.
    p = get_preset("seed-helix-2l")
    rows = micro_batch_family(p.model, p.workload, Plan.parse("helix:4x4"), H100_16, 16)
    assert rows[0].plan == "helix:4x4" and rows[0].priced and not rows[0].fits
    staged = [r for r in rows[1:] if r.fits]
    assert staged and all(re.fullmatch(r"pp:1/helix:4x4,mb=\d+", r.plan) for r in rows[1:])
    assert {family(r.plan) for r in rows} == {"helix:4x4"}
    best = best_micro_batching(rows, "both")
    assert best in staged
    assert best.prediction.memory.total < rows[0].prediction.memory.total
    shown = {r.plan for r in rank_rows(p.model, p.workload, H100_16, rows, "both", 16).shown}
    assert shown and shown <= {r.plan for r in staged}  # helix:4x4 is not shown as no fit


def test_fidelity_reports_the_relative_error(tmp_path):
    p = get_preset("tiny-dense")
    wl = p.reduced
    # A run's record (phase both) timed its prompt eagerly, so fidelity predicts it so.
    pred = predict(p.model, wl, "tp_pp:2x2", H100_8, 4, prefill_graphs=False)
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


# -- compositions and micro-batch counts -------------------------------------------

def test_compositions_are_candidates_priced_as_replicas_or_listed_with_the_reason():
    from shardwise.parallel.registry import validate_plan
    from shardwise.parallel.plans import composition_candidates
    from shardwise.spec import Plan, ShardwiseError

    rows = enumerate_plans(SIX, SIX_WL, H100_8, ranks=4, micro_batches=(1,))
    composed = {r.plan: r for r in rows if Plan.parse(r.plan).is_composed}
    # Every composition of 4 ranks is a candidate, valid exactly where validate says so.
    assert set(composed) == set(composition_candidates(4, SIX.is_moe))
    for plan, r in composed.items():
        try:
            validate_plan(SIX, SIX_WL, plan, 4)
            assert r.valid
        except ShardwiseError as e:
            assert r.error == str(e)
    # Every valid composition is priced: the recorder runs its code. dp:2/tp:2
    # is two tp_pp:2x1 on half the batch each (and a slice of each replica's rows).
    assert all(r.priced for r in composed.values() if r.valid)
    dp = composed["dp:2/tp:2"]
    one = predict(SIX, SIX_WL.replace(batch=2), "tp_pp:2x1", H100_8, 2)
    assert dp.fits and dp.prediction.world_size == 4
    assert dp.prediction.prefill.seconds == pytest.approx(one.prefill.seconds, rel=0.02)
    assert dp.prediction.prefill_tps == pytest.approx(2 * one.prefill_tps, rel=0.02)
    assert dp.prediction.kv_per_rank == one.kv_per_rank * 2
    assert composed["ring:2/tp:2"].priced
    # The table lists them with the others.
    rk = rank_rows(SIX, SIX_WL, H100_8, rows, "both", 4)
    assert "dp:2/tp:2" in {r.plan for r in rk.shown} and not rk.unpriced


def test_one_stage_of_tp_micro_batches_and_fits_seed_layerwise_3b():
    # tp_pp:16x1 holds the whole batch's activations at one micro-batch and
    # does not fit; with two micro-batches it does.
    p = get_preset("seed-layerwise-3b")
    rows = micro_batch_family(p.model, p.workload, Plan.parse("tp_pp:16x1"), H100_16, 16)
    by_mb = {Plan.parse(r.plan).micro_batches: r for r in rows}
    assert not by_mb[1].fits and by_mb[2].fits
    # Ranked with the other single-strategy plans (compositions join them in
    # the same table: test_compositions_are_candidates_priced_as_replicas...).
    rows = [r for base in base_plans(p.model, p.workload, 16, H100_16) if not base.is_composed
            for r in micro_batch_family(p.model, p.workload, base, H100_16, 16)]
    rk = rank_rows(p.model, p.workload, H100_16, rows, "both", 16)
    shown = {r.plan: r for r in rk.shown}
    assert "tp_pp:16x1,mb=2" in shown and "tp_pp:16x1" not in shown
    # No plan is shown as not fitting at a count when another count fits.
    assert all(r.fits or family(r.plan) not in rk.fitting_families for r in rk.shown)


def test_memory_driven_micro_batches_find_the_fewest_that_fit():
    # seed-layerwise-30b on tp_pp:1x16: a stage's working set is one micro-batch's,
    # so more micro-batches need less memory (up to what every rank holds
    # whatever the count: the first stage the prompt, the last the step's
    # output). On GPUs sized between what 4 and 8 micro-batches need, the
    # family finds the fewest count that fits by bisection: one fewer does not.
    import dataclasses

    p = get_preset("seed-layerwise-30b")
    spec, wl = p.model, p.workload
    need = {mb: predict(spec, wl, f"tp_pp:1x16,mb={mb}", H100_16).memory.total for mb in (4, 8)}
    assert need[8] < need[4]
    cl = dataclasses.replace(H100_16, hbm_bytes=(need[4] + need[8]) // 2)
    rows = micro_batch_family(spec, wl, Plan.parse("tp_pp:1x16"), cl, 16)
    fitting = [Plan.parse(r.plan).micro_batches for r in rows if r.fits]
    fewest = min(fitting)
    assert 4 < fewest <= 8 and not any(r.fits for r in rows
                                       if Plan.parse(r.plan).micro_batches < fewest)
    below = evaluate(spec, wl, f"tp_pp:1x16,mb={fewest - 1}", cl, 16)
    assert below.priced and not below.fits
    best = best_micro_batching(rows, "both")
    assert best is not None and best.prediction.fits


@pytest.fixture
def first_candidates(monkeypatch):
    """The planner's candidates cut to the first of each strategy and of the
    compositions, for the reproduce tests (the whole ranking is the plan
    tests' and docs/reproduce.md's); a seed's own plans are searched over
    micro-batch counts as ever."""
    from shardwise.perf import planner

    real = planner.base_plans

    def firsts(*args, **kwargs):
        out: dict = {}
        for plan in real(*args, **kwargs):
            out.setdefault(plan.strategy, plan)
        return list(out.values())

    monkeypatch.setattr(planner, "base_plans", firsts)


def test_reproduce_compares_each_plan_at_its_best_micro_batching(first_candidates):
    text = reproduce_command("seed-layerwise-3b")
    assert "planner's best" in text
    # The baseline tp_pp:8x2 does not fit at one micro-batch; it is shown at a count that fits.
    assert re.search(r"tp_pp:8x2,mb=\d+", text)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_micro_batch_counts_stop_at_the_first_slower_one(phase):
    # A pipeline at 1, 2, 4, ... micro-batches, in order, until one is slower
    # in the ranked phase than the fastest before it: every count tried but
    # the last is faster than the ones before it; the last is slower, or the
    # largest count the batch allows.
    # Four stages of a mid-sized model, 32 sequences of 4096 positions: a decode
    # step is fastest at 4 micro-batches on the H100 profile (one token's
    # micro-batches cost their fixed part), prefill at more.
    spec = ModelSpec(name="mid", n_layers=4, d_model=1024, n_heads=8, head_dim=128, d_ff=4096,
                     dtype="bf16")
    wl = Workload(batch=32, seq_len=4096, decode_steps=2)
    rows = micro_batch_family(spec, wl, Plan.parse("tp_pp:1x4"), H100_8, 4, phase=phase)
    counts = [Plan.parse(r.plan).micro_batches for r in rows]
    assert counts == sorted(counts) and counts[0] == 1 and all(r.fits for r in rows)
    times = [score(r.prediction, phase) for r in rows]
    assert all(a > b for a, b in zip(times[:-2], times[1:-1]))  # faster at each count
    assert len(counts) >= 3 and (times[-1] >= min(times[:-1]) or counts[-1] == 32)
    # What it skipped is slower than the fastest it found (the curve rises).
    skipped = [mb for mb in (2, 4, 8, 16, 32) if mb not in counts]
    for mb in skipped:
        r = evaluate(spec, wl, f"tp_pp:1x4,mb={mb}", H100_8, 4)
        assert score(r.prediction, phase) >= min(times)


def test_predict_takes_the_ranks_plan_ranked_for():
    # plan --ranks 4 lists layerwise at four ranks; predict --ranks 4 prices
    # the same plan; a count past the cluster's GPUs, or one the plan does not
    # use, is refused naming --ranks (predict takes no --nproc).
    from shardwise.perf.planner import predict_parts
    from shardwise.spec import ShardwiseError

    ranked = {r.plan: r for r in enumerate_plans(SIX, SIX_WL, H100_8, ranks=4)}
    got = predict(SIX, SIX_WL, f"layerwise:cap={HBM}", H100_8, 4)
    assert got.prefill.seconds == ranked[f"layerwise:cap={HBM}"].prediction.prefill.seconds
    assert predict_parts("tiny-dense", f"layerwise:cap={HBM}", "h100-sxm-8", ranks=4)
    with pytest.raises(ShardwiseError, match=r"has 8 GPUs; give --ranks 8 or fewer"):
        predict_parts("tiny-dense", "tp_pp:2x1", "h100-sxm-8", ranks=16)
    with pytest.raises(ShardwiseError, match=r"\(--ranks 2\)") as e:
        predict_parts("tiny-dense", "tp_pp:2x1", "h100-sxm-8", ranks=4)
    assert "--nproc" not in str(e.value)


def _needing(weights, kv, activations, plan, batch):
    from types import SimpleNamespace

    from shardwise.perf.costmodel import _memory_fix
    memory = SimpleNamespace(weights=weights, kv_cache=kv, activations=activations, comm_buffers=0)
    p = SimpleNamespace(memory=memory, plan=Plan.parse(plan), workload=SimpleNamespace(batch=batch))
    return _memory_fix(p, 100)


def test_a_memory_fix_names_only_what_shrinks_the_excess():
    # Activations over the capacity: more micro-batches (a stage holds one).
    assert "more micro-batches (mb=)" in _needing(60, 30, 20, "tp_pp:2x2,mb=2", batch=8)
    # helix and ep alone take none; as one pipeline stage they do.
    assert "(pp:1/helix:4x4,mb=N" in _needing(60, 30, 20, "helix:4x4", batch=8)
    # Already one sequence a micro-batch, or the KV cache and weights alone
    # over the capacity: micro-batches shrink neither.
    for fix in (_needing(60, 30, 20, "tp_pp:2x2,mb=8", batch=8),
                _needing(60, 50, 5, "tp_pp:2x2", batch=8)):
        assert "micro-batches" not in fix and "smaller batch" in fix


def test_a_refused_micro_batch_count_is_listed_by_its_own_name():
    # llama-3.1-70b on 16 H100s: layerwise at its tightest capacity fits at
    # mb=1 and mb=2 (shown), but at mb=4 its groups fill 14 of the 16 ranks:
    # the invalid line names mb=4, not the plan shown as fitting.
    from shardwise.perf.planner import Row, _summary
    rows = [Row("layerwise:cap=23.8GB,mb=4",
                error="plan layerwise:cap=23.8GB,mb=4 on 16 ranks uses 7 groups x 2 replicas")]
    [line] = _summary(rows)
    assert line.startswith("- layerwise:cap=23.8GB,mb=4: plan layerwise:cap=23.8GB,mb=4 on 16")
    both = rows + [Row("layerwise:cap=23.8GB,mb=8", error="plan layerwise:cap=23.8GB,mb=8 on 16 "
                                                          "ranks uses 7 groups x 2 replicas")]
    [line] = _summary(both)
    assert line.startswith("- layerwise:cap=23.8GB,mb=4 (and 1 mb= variant): plan "
                           "layerwise:cap=23.8GB,mb=4 on")


def test_progress_is_reported_once_per_plan_family():
    # plan's progress bar: each base plan announced before its family is
    # priced, counted against the number of base plans.
    seen = []
    rows = enumerate_plans(SIX, SIX_WL, H100_8, ranks=4,
                           on_plan=lambda done, total, plan: seen.append((done, total, plan)))
    bases = base_plans(SIX, SIX_WL, 4, H100_8)
    assert [d for d, _, _ in seen] == list(range(len(bases)))
    assert {t for _, t, _ in seen} == {len(bases)}
    assert [p for _, _, p in seen] == [str(b) for b in bases]
    assert {family(r.plan) for r in rows} >= {family(str(b)) for b in bases if "mb=" not in str(b)}


def fresh_recordings(tmp_path, monkeypatch, workers: int, eager: bool = True):
    """An empty cache of recordings at ``tmp_path``, this process's own
    recordings of earlier tests set aside, ``workers`` processes allowed and
    (``eager``) worker processes started however little the plans take.
    Returns perf.prerecord."""
    from shardwise.perf import prerecord as pre
    from shardwise.perf.record import _alone, record_rank

    _alone.cache_clear()
    record_rank.cache_clear()
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    monkeypatch.setenv("SHARDWISE_WORKERS", str(workers))
    if eager:
        monkeypatch.setattr(pre, "WORTH_S", 0.0)
    return pre


def _shared_ranking(monkeypatch):
    """A ranking of SIX on 4 ranks, with the Sharing its families went through
    and the ranks this process recorded (workers record in theirs)."""
    from contextlib import contextmanager

    from shardwise.perf import planner, record

    shares, recorded = [], []
    real_sharing, real_alone = planner.sharing, record.record_alone

    @contextmanager
    def sharing(*args):
        with real_sharing(*args) as share:
            shares.append(share)
            yield share

    def record_alone(*args, **kwargs):
        recorded.append(args[:5])
        return real_alone(*args, **kwargs)

    monkeypatch.setattr(planner, "sharing", sharing)
    monkeypatch.setattr(record, "record_alone", record_alone)
    rows = enumerate_plans(SIX, SIX_WL, H100_8, ranks=4)
    return rows, shares[0], recorded


def _figures(rows):
    return [(r.plan, r.error, r.unpriced, r.priced and (
        r.prediction.prefill_tps, r.prediction.decode_step_ms, r.prediction.memory.total))
        for r in rows]


def test_a_first_ranking_records_in_worker_processes(tmp_path, monkeypatch):
    # Workers forced on (a small model would not pay for them): forked, they
    # take the plan families from the last back, each priced as the planner
    # prices it, and keep exactly the recordings a ranking in one process
    # keeps; the planner reads back theirs, and its ranking is the one a
    # single process makes.
    one = tmp_path / "one"
    fresh_recordings(one, monkeypatch, 1)
    alone, share, everything = _shared_ranking(monkeypatch)
    assert share.workers == []
    monkeypatch.undo()
    fresh_recordings(tmp_path / "two", monkeypatch, 2)
    rows, share, recorded = _shared_ranking(monkeypatch)
    assert len(share.workers) == 1
    assert 0 < len(recorded) < len(everything)  # a worker recorded the others
    assert _figures(rows) == _figures(alone)
    # every figure of every prediction, those the worker priced included
    assert [r.prediction for r in rows] == [r.prediction for r in alone]
    assert sorted(os.listdir(tmp_path / "two" / "recordings")) == sorted(
        os.listdir(one / "recordings"))  # not a plan more (no .tmp- file left either)


def test_the_planner_prices_the_families_of_a_worker_that_recorded_none(tmp_path, monkeypatch):
    # A worker that records nothing (here: one that exits at once): the
    # planner records every family itself, and ranks as ever.
    pre = fresh_recordings(tmp_path / "one", monkeypatch, 1)
    alone, _, everything = _shared_ranking(monkeypatch)
    monkeypatch.undo()
    pre = fresh_recordings(tmp_path / "two", monkeypatch, 2)
    monkeypatch.setattr(pre, "_worker", lambda share, parent: os._exit(0))
    rows, share, recorded = _shared_ranking(monkeypatch)
    assert len(share.workers) == 1 and len(recorded) == len(everything)
    assert _figures(rows) == _figures(alone)


def test_workers_end_with_the_ranking_leaving_no_file_half_written(tmp_path, monkeypatch):
    # However the ranking ends, its workers end with it: one keeping entries
    # as fast as it can (each written to a temporary file, then renamed) is
    # stopped mid-way, and leaves none half written.
    import time

    import importlib

    from shardwise.perf import tracecache

    importlib.import_module("shardwise.perf.record")  # the recorder loaded: workers may start

    pre = fresh_recordings(tmp_path, monkeypatch, 2)
    keys = [f"family {i}" for i in range(4)]

    def family(j):
        while True:
            tracecache.store(keys[j], {})

    with pre.sharing(keys, family) as share:
        share.start(0)
        share.start(1)
        assert len(share.workers) == 1
        deadline = time.monotonic() + 60
        while not tracecache.kept(keys[3]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tracecache.kept(keys[3])
    pid = share.workers[0]
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # ended and reaped
    assert not [f for f in os.listdir(tmp_path / "recordings") if f.startswith(".tmp-")]


def test_a_ranking_the_cache_holds_is_priced_without_torch(tmp_path, monkeypatch):
    # A ranking whose plans the cache of recordings holds reads them back
    # (perf/recordings.py) and prices them without loading PyTorch: a fresh
    # process's `plan`, after this one ranked the same plans, imports no torch
    # and prints this ranking's table.
    import subprocess
    import sys

    from shardwise.output import render

    fresh_recordings(tmp_path, monkeypatch, 1, eager=False)
    want = json.loads(render(plan_parts(ranking("tiny-dense", "h100-sxm-8", 2, 16, "prefill",
                                                2)), "json"))
    code = ("import sys\nfrom shardwise import cli\nrc = cli.main(sys.argv[1:])\n"
            "print('torch' in sys.modules, rc, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code, "plan", "--model", "tiny-dense",
                        "--cluster", "h100-sxm-8", "--ranks", "2", "--batch", "2", "--seq", "16",
                        "--phase", "prefill", "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    assert p.stderr.split()[-2:] == ["False", "0"], p.stderr
    assert json.loads(p.stdout)["plans"] == want["plans"]
