"""layerwise against the single-device reference on CPU with gloo (fp32).

The capacity in each plan is the smallest at which the partitioner chooses the
layout under test, so every case checks both that the plan yields that
layout (from the run's report) and that the layout computes the reference.
"""
import pytest

from helpers import SharedLaunch, assert_verified, with_real_features
from shardwise.parallel.partition import PartitionError, layer_costs, partition
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, Workload

# Activations outweigh these small layers, so replicas (which split the batch)
# pay off at tight capacities and single-layer groups at roomy ones.
HIDDEN = ModelSpec(name="hidden", n_layers=4, d_model=16, n_heads=2, head_dim=8, d_ff=32,
                   dtype="fp32")
# Token ids in, logits out: the embedding makes layer 0 heavier and the LM head
# layer 3; grouped-query attention, rotary embedding, RMSNorm, SwiGLU.
VOCAB = ModelSpec(name="vocab", n_layers=4, d_model=16, n_heads=2, head_dim=8, d_ff=32,
                  n_kv_heads=1, dtype="fp32", vocab_size=37, norm="rmsnorm",
                  activation="swiglu", rope_theta=10000.0)
WORKLOAD = Workload(batch=4, seq_len=32, decode_steps=4)
# What published models add: q/k/v biases, Llama 3.1's rope scaling and tied
# embeddings (in a pipeline, the last stage's LM head reads the embedding's rows).
REAL = with_real_features(VOCAB)


def cap_for(spec, ranks, groups, replicas, mb=1):
    """The smallest capacity at which the partitioner picks ``groups`` (layer
    ranges) x ``replicas`` on ``ranks`` ranks. The choice only changes where a
    group's bytes cross the capacity, so those are the capacities to try."""
    L, B = spec.n_layers, WORKLOAD.batch
    caps = sorted({layer_costs(spec, WORKLOAD, -(-B // r), mb).group_bytes(i, j)
                   for r in range(1, B + 1) for i in range(L) for j in range(i + 1, L + 1)})
    for cap in caps:
        try:
            part = partition(spec, WORKLOAD, cap, ranks, mb)
        except PartitionError:
            continue
        if [(g.layers.start, g.layers.stop) for g in part.groups] == groups and \
                part.replicas == replicas and part.idle_ranks == 0:
            return f"layerwise:cap={cap}" + (f",mb={mb}" if mb > 1 else "")
    raise AssertionError(f"no capacity gives {groups} x {replicas} replicas on {ranks} ranks")


# A bigger vocabulary and MLP: the embedding and LM head weigh as much as a
# layer, so capacities exist where a pipeline of unequal groups is forced.
HEAVY_ENDS = ModelSpec(name="heavy-ends", n_layers=4, d_model=32, n_heads=2, head_dim=16,
                       d_ff=256, n_kv_heads=1, dtype="fp32", vocab_size=512, norm="rmsnorm",
                       activation="swiglu", rope_theta=10000.0)

# A step of m micro-batches through G groups takes (m + G - 1) / m of the
# slowest group (partition.best_split): with one micro-batch, replicas of one
# group are faster than a pipeline, so pipelines here are forced by the
# capacity or run several micro-batches.
CASES = {
    # nproc: [(model, groups, replicas, micro-batches), ...]
    2: [(HIDDEN, [(0, 4)], 2, 1),  # the whole model twice, two sequences each
        (VOCAB, [(0, 2), (2, 4)], 1, 2),  # a two-stage pipeline of micro-batches
        (REAL, [(0, 2), (2, 4)], 1, 2)],  # tied embedding and LM head on two ranks
    3: [(VOCAB, [(0, 4)], 3, 1),  # batch 4 over 3 replicas: 2, 1 and 1 sequences
        (REAL, [(0, 4)], 3, 1),  # tied: one tensor for both ends on each replica
        (VOCAB, [(0, 1), (1, 3), (3, 4)], 1, 3)],  # the embedding and LM head alone
    4: [(VOCAB, [(0, 2), (2, 4)], 2, 2),  # 2 groups x 2 replicas, micro-batched
        (HEAVY_ENDS, [(0, 3), (3, 4)], 2, 1),  # unequal groups, replicated
        (HIDDEN, [(0, 1), (1, 2), (2, 3), (3, 4)], 1, 4)],  # one layer per rank
}


# Registered at import: each world size's launch is shared with other modules'
# cases of that size (helpers.SharedLaunch).
RUNS = {nproc: SharedLaunch([Case(spec, WORKLOAD, cap_for(spec, nproc, groups, replicas, mb))
                             for spec, groups, replicas, mb in layouts], nproc)
        for nproc, layouts in CASES.items()}


@pytest.mark.parametrize("nproc", sorted(CASES))
def test_layerwise_matches_reference(nproc):
    layouts = CASES[nproc]
    cases, results = RUNS[nproc].cases, RUNS[nproc].results()
    assert_verified(results, [c.plan for c in cases])  # prefill and each of the 4 decode steps
    for r, (spec, groups, replicas, _) in zip(results, layouts):
        assert r["report"]["groups"] == [list(g) for g in groups], r["plan"]
        assert r["report"]["replicas"] == replicas, r["plan"]
        # Each replica caches only its share of the batch (rank 0: the first share).
        share = -(-WORKLOAD.batch // replicas)
        per_seq_layer = 2 * spec.kv_heads * spec.head_dim * WORKLOAD.max_len * 4
        assert r["kv_bytes_per_rank"][0] == share * (groups[0][1] - groups[0][0]) * per_seq_layer


def static_cases(nproc):
    """One group (the model fits a rank): data parallel, no hop inside a step;
    a pipeline of groups passes activations point to point. Either way a
    decode step runs at a device-tensor position (what bench replays in a
    CUDA graph)."""
    spec = VOCAB if nproc == 3 else HIDDEN
    one = cap_for(spec, nproc, [(0, 4)], nproc)
    cases = [Case(spec, WORKLOAD, one)]
    if nproc == 2:
        cases.append(Case(VOCAB, WORKLOAD, cap_for(VOCAB, 2, [(0, 2), (2, 4)], 1, 2)))
    return cases


STATIC_RUNS = {nproc: SharedLaunch(static_cases(nproc), nproc, static_decode=True)
               for nproc in (2, 3)}


@pytest.mark.parametrize("nproc", [2, 3])
def test_layerwise_replicas_decode_at_a_device_position(nproc):
    cases, out = STATIC_RUNS[nproc].cases, STATIC_RUNS[nproc].results()
    assert_verified(out, [c.plan for c in cases])
    assert out[0]["static_decode"] and out[0]["report"]["replicas"] == nproc
    assert all(r["static_decode"] for r in out[1:])


def test_bench_gives_layerwise_the_ranks_of_the_other_plans(tmp_path):
    """``bench --plan tp_pp:1x1 --plan tp_pp:2x1 --plan layerwise:cap=HBM``
    with no --nproc: layerwise takes 2 ranks, the most a fixed plan of the
    command takes, and the 1-rank plan is not forced onto 2."""
    import json
    import subprocess
    import sys

    from shardwise.cli import _adaptive_world
    from shardwise.spec import Plan

    plans = [Plan.parse(p) for p in ("tp_pp:1x1", "tp_pp:2x1", "layerwise:cap=HBM")]
    assert _adaptive_world(plans, None) == 2
    assert _adaptive_world(plans, 3) == 3
    assert _adaptive_world(plans[:2], None) is None  # nothing adapts
    assert _adaptive_world(plans[2:], None) is None  # nothing to take it from: --nproc asked for

    out = tmp_path / "bench.jsonl"
    r = subprocess.run([sys.executable, "-m", "shardwise", "bench", "--preset", "tiny-dense",
                        "--device", "cpu", "--phase", "prefill", "--iters", "1", "--warmup", "0",
                        "--out", str(out), "--plan", "tp_pp:1x1", "--plan", "tp_pp:2x1",
                        "--plan", "layerwise:cap=1GB"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    worlds = {json.loads(line)["plan"]: json.loads(line)["n_devices"]
              for line in out.read_text().splitlines()}
    assert worlds == {"tp_pp:1x1": 1, "tp_pp:2x1": 2, "layerwise:cap=1GB": 2}
