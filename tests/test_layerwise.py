"""layerwise against the single-device reference on CPU with gloo (fp32).

The capacity in each plan is the smallest at which the partitioner chooses the
layout under test, so every case checks both that the plan yields that
layout (from the run's report) and that the layout computes the reference.
"""
import pytest

from helpers import assert_verified, run_plans
from shardwise.perf.partition import PartitionError, layer_costs, partition
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


CASES = {
    # nproc: (model, [(groups, replicas, micro-batches), ...])
    2: (HIDDEN, [([(0, 4)], 2, 1),  # the whole model twice, two sequences each
                 ([(0, 2), (2, 4)], 1, 2)]),  # a two-stage pipeline of micro-batches
    3: (VOCAB, [([(0, 4)], 3, 1),  # batch 4 over 3 replicas: 2, 1 and 1 sequences
                ([(0, 1), (1, 3), (3, 4)], 1, 1)]),  # the embedding and LM head alone
    4: (VOCAB, [([(0, 2), (2, 4)], 2, 2),  # 2 groups x 2 replicas, micro-batched
                ([(0, 3), (3, 4)], 2, 1),  # unequal groups, replicated
                ([(0, 1), (1, 2), (2, 3), (3, 4)], 1, 1)]),  # one layer per rank
}


@pytest.mark.parametrize("nproc", sorted(CASES))
def test_layerwise_matches_reference(nproc):
    spec, layouts = CASES[nproc]
    plans = [cap_for(spec, nproc, groups, replicas, mb) for groups, replicas, mb in layouts]
    results = run_plans(spec, plans, nproc, WORKLOAD)
    assert_verified(results, plans)  # prefill and each of the 4 decode steps
    for r, (groups, replicas, _) in zip(results, layouts):
        assert r["report"]["groups"] == [list(g) for g in groups], r["plan"]
        assert r["report"]["replicas"] == replicas, r["plan"]
        # Each replica caches only its share of the batch (rank 0: the first share).
        share = -(-WORKLOAD.batch // replicas)
        per_seq_layer = 2 * spec.kv_heads * spec.head_dim * WORKLOAD.max_len * 4
        assert r["kv_bytes_per_rank"][0] == share * (groups[0][1] - groups[0][0]) * per_seq_layer
