"""The layerwise partitioner: pure Python, no processes."""
import itertools
import math
import random

import pytest
import torch

from shardwise.parallel.registry import validate_plan
from shardwise.parallel.checks import balanced_ranges
from shardwise.parallel.partition import (
    DEVICE_CAPACITY, TIE, capacity_text, LayerCosts, PartitionError, best_split, layer_costs,
    layer_weight_bytes, min_capacity, parse_capacity, partition, ranks_needed, split,
)
from shardwise.perf.planner import format_partition, partition_command
from shardwise.presets import get_preset
from shardwise.spec import ModelSpec, ShardwiseError, Workload


# -- the search against brute force ---------------------------------------------

def random_costs(rng: random.Random, L: int):
    """Per-layer costs of the shape the partitioner sees: bytes and time that
    grow with the replica's batch b, drawn independently for every layer."""
    w = [rng.randint(1, 50) for _ in range(L)]
    kv = [rng.randint(0, 20) for _ in range(L)]
    act = [rng.randint(0, 30) for _ in range(L)]
    out = [rng.randint(0, 5) for _ in range(L)]
    t0 = [rng.uniform(0.1, 2.0) for _ in range(L)]
    t1 = [rng.uniform(0.0, 1.0) for _ in range(L)]

    def costs_for(b: int) -> LayerCosts:
        return LayerCosts(tuple(w[i] + kv[i] * b for i in range(L)),
                          tuple(act[i] * b for i in range(L)),
                          tuple(out[i] * b for i in range(L)),
                          tuple(t0[i] + t1[i] * b for i in range(L)))
    return costs_for


def all_partitions(L: int):
    """Every way to cut L layers into contiguous non-empty groups."""
    for k in range(L):
        for inner in itertools.combinations(range(1, L), k):
            yield (0, *inner, L)


def brute_force(costs_for, L: int, R: int, B: int, C: float):
    """Enumerate every partition: (groups, replicas, step seconds) of the fastest
    that fits, fewer groups on ties; None if none fits. One micro-batch: the
    step is the slowest group's time x the number of groups (they run in turn)."""
    best = None
    for cuts in sorted(all_partitions(L), key=len):
        G = len(cuts) - 1
        if G > R:
            continue
        replicas = min(R // G, B)  # the pipeline copies, at most one per sequence
        costs = costs_for(-(-B // replicas))
        spans = list(zip(cuts, cuts[1:]))
        if any(costs.group_bytes(i, j) > C for i, j in spans):
            continue
        t = max(costs.group_time(i, j) for i, j in spans) * G
        if best is None or t < best[2] * (1 - TIE):
            best = (G, replicas, t)
    return best


def brute_min_capacity(costs_for, L, R, B):
    return min(max(costs_for(-(-B // min(R // (len(c) - 1), B))).group_bytes(i, j)
                   for i, j in zip(c, c[1:]))
               for c in all_partitions(L) if len(c) - 1 <= R)


def plain_split(costs, groups, capacity=math.inf, key="time"):
    """The DP of ``split`` one (g, j, i) at a time, sums and maxima as written."""
    L = len(costs.time)
    if not 1 <= groups <= L:
        return None
    cost = costs.group_time if key == "time" else costs.group_bytes
    best = [[math.inf] * (L + 1) for _ in range(groups + 1)]
    cut = [[0] * (L + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, L - (groups - g) + 1):
            for i in range(j - 1, g - 2, -1):
                if costs.group_bytes(i, j) > capacity:
                    break
                v = max(best[g - 1][i], cost(i, j))
                if v < best[g][j]:
                    best[g][j], cut[g][j] = v, i
    if best[groups][L] == math.inf:
        return None
    cuts, j = [L], L
    for g in range(groups, 0, -1):
        j = cut[g][j]
        cuts.append(j)
    return best[groups][L], tuple(reversed(cuts))


def test_split_equals_the_plain_dp_bit_for_bit():
    # Many layers (beyond brute force), ties (repeated layers: equal
    # bottlenecks, the latest cut wins) and capacities from tight to none.
    rng = random.Random(7)
    for trial in range(60):
        L = rng.randint(1, 40)
        costs = random_costs(rng, L)(rng.randint(1, 4))
        if trial % 3 == 0:  # every layer alike, as a real model's are
            costs = LayerCosts(*(tuple(c[:1]) * L for c in
                                 (costs.resident, costs.work, costs.held, costs.time)))
        total = costs.group_bytes(0, L)
        for capacity in (math.inf, total, total // 3, total // max(L, 1)):
            for key in ("time", "bytes"):
                for groups in sorted({1, 2, L // 2, L, L + 1} - {0}):
                    got = split(costs, groups, capacity, key)
                    want = plain_split(costs, groups, capacity, key)
                    assert got == want, (L, groups, capacity, key)
                    assert got is None or type(got[0]) is type(want[0])


def test_dp_matches_brute_force_on_random_costs():
    rng = random.Random(1234)
    for _ in range(200):
        L, R, B = rng.randint(1, 7), rng.randint(1, 9), rng.randint(1, 5)
        costs_for = random_costs(rng, L)
        # Capacities from hopeless to roomy: the interesting cases are in between.
        lo = min(costs_for(1).group_bytes(i, i + 1) for i in range(L))
        C = rng.randint(lo // 2, 3 * costs_for(B).group_bytes(0, L))
        expect = brute_force(costs_for, L, R, B, C)
        got = best_split(costs_for, L, R, B, C)
        if expect is None:
            assert got is None
            assert min_capacity(costs_for, L, R, B) > C
        else:
            G, replicas, cuts, step = got
            assert (G, replicas, step) == expect
            costs = costs_for(-(-B // replicas))
            spans = list(zip(cuts, cuts[1:]))
            assert cuts[0] == 0 and cuts[-1] == L and len(spans) == G
            assert all(i < j and costs.group_bytes(i, j) <= C for i, j in spans)
            assert max(costs.group_time(i, j) for i, j in spans) * G == step
        need_c = min_capacity(costs_for, L, R, B)
        assert need_c == brute_min_capacity(costs_for, L, R, B)
        assert best_split(costs_for, L, R, B, need_c) is not None
        # The fewest ranks that fit C, by trying every world size up to L * B.
        fitting = [r for r in range(1, L * B + 1)
                   if brute_force(costs_for, L, r, B, C) is not None]
        assert ranks_needed(costs_for, L, B, C) == (fitting[0] if fitting else None)


# -- errors name the capacity and ranks that work ----------------------------------

# 4 layers of 49,408 fp32 parameters: 16,384 attention, 32,768 MLP, 256 norm.
SMALL = ModelSpec(name="small", n_layers=4, d_model=64, n_heads=4, head_dim=16, d_ff=256,
                  dtype="fp32")
ONE_SEQ = Workload(batch=1, seq_len=8, decode_steps=4)  # KV cache of 12 positions


def test_smallest_capacity_is_named_and_exact():
    # Last layer alone, by hand: weights (49,408 + 128 final norm) * 4 B = 198,144;
    # KV 2 * 4 heads * 16 * 12 positions * 4 B = 6,144; working set of 8 tokens
    # x (2*64 + 16*16 + 2*256) x 4 B = 28,672; its output 8 x 64 x 4 B = 2,048.
    last_layer = 198_144 + 6_144 + 28_672 + 2_048
    with pytest.raises(PartitionError) as e:
        partition(SMALL, ONE_SEQ, 200_000, ranks=4)
    assert e.value.min_capacity == last_layer and e.value.ranks_needed is None
    # The fix names it rounded up to a size a person reads (and a plan can name).
    assert f"cap={capacity_text(last_layer)}" in str(e.value) and "layer 3 alone" in str(e.value)
    assert capacity_text(last_layer) == "236KB" and parse_capacity("236KB") >= last_layer
    assert len(partition(SMALL, ONE_SEQ, last_layer, ranks=4).groups) == 4
    with pytest.raises(PartitionError):
        partition(SMALL, ONE_SEQ, last_layer - 1, ranks=4)


def test_too_few_ranks_names_nproc_and_capacity():
    # Two layers per group on 2 ranks: layers 2-3 hold 2 x 197,632 + 512 B of weights,
    # 2 x 6,144 B of KV, the same working set and output as above.
    two_layers = 2 * 197_632 + 512 + 2 * 6_144 + 28_672 + 2_048
    with pytest.raises(PartitionError) as e:
        partition(SMALL, ONE_SEQ, 235_008, ranks=2)
    assert e.value.ranks_needed == 4 and e.value.min_capacity == two_layers
    assert "--nproc 4" in str(e.value) and f"cap={capacity_text(two_layers)}" in str(e.value)


# -- the seed's 30B model ---------------------------------------------------------

def test_seed_30b_at_80gb_40gb_and_l2():
    p = get_preset("seed-layerwise-30b")
    spec = p.model
    assert 28.9e9 < spec.total_params() < 29.0e9  # the seed's "30B"
    layer = layer_weight_bytes(spec, 1)
    assert 3.6e9 < layer < 3.7e9
    # The seed's rule, floor(C / layer bytes), gives no layer at all for an L2.
    assert parse_capacity("L2@h100") // layer == 0

    # Weights (58 GB) fit one 80 GB device when the cache is small (the reduced workload).
    one = partition(spec, p.reduced, parse_capacity("80GB"), ranks=1)
    assert [g.layers for g in one.groups] == [range(0, 16)]
    # On 16 ranks, two replicas of the whole model: a 16-stage pipeline of the
    # reduced batch (2 sequences, so at most 2 micro-batches) runs its stages
    # nearly in turn, (m + 15) / m times its slowest group; one replica per
    # sequence has no fill to pay. The other 14 ranks idle.
    for mb in (1, 2):
        part = partition(spec, p.reduced, parse_capacity("80GB"), ranks=16, micro_batches=mb)
        assert [g.layers for g in part.groups] == [range(0, 16)] and part.replicas == 2
    # 40 GB holds only part of the weights: the error names 2 ranks, or the capacity for 1.
    with pytest.raises(PartitionError) as e:
        partition(spec, p.reduced, parse_capacity("40GB"), ranks=1)
    assert e.value.ranks_needed == 2 and 58e9 < e.value.min_capacity < 60e9
    assert "--nproc 2" in str(e.value)

    # The seed's own workload: batch 128 x context 10,004 is 63 GB of KV per layer
    # (1 TB in all), so 16 x 80 GB cannot hold it; both named fixes do work.
    with pytest.raises(PartitionError) as e:
        partition(spec, p.workload, parse_capacity("80GB"), ranks=16)
    err = e.value
    assert err.ranks_needed > 16 and err.min_capacity > 80e9
    assert partition(spec, p.workload, err.min_capacity, ranks=16).ranks_used <= 16
    assert partition(spec, p.workload, parse_capacity("80GB"), ranks=err.ranks_needed)

    # L2: no number of ranks helps, since one layer's weights alone exceed it.
    with pytest.raises(PartitionError, match="alone needs") as e:
        partition(spec, p.reduced, parse_capacity("L2@h100"), ranks=16)
    assert e.value.ranks_needed is None and e.value.min_capacity > layer


# -- unequal first and last layers ------------------------------------------------

def test_embedding_and_lm_head_are_balanced():
    # A 3072-word vocabulary: the embedding and the LM head each weigh as much as
    # ~4 layers. The embedding is a lookup (cheap to run, costly to hold); the LM
    # head is a matmul, as slow as all the other layers together.
    spec = ModelSpec(name="vocab", n_layers=6, d_model=64, n_heads=4, head_dim=16, d_ff=256,
                     dtype="bf16", vocab_size=3072)
    wl = Workload(batch=1, seq_len=16, decode_steps=4)
    costs = layer_costs(spec, wl, 1)
    assert costs.resident[0] > 4 * costs.resident[1] and costs.time[5] > 4 * costs.time[1]
    # Two groups: the cut balances the LM head against the other five layers.
    slowest, cuts = split(costs, 2)
    assert cuts == (0, 5, 6)
    naive = max(costs.group_time(i, j) for i, j in balanced_ranges(6, 2))
    assert slowest < 0.75 * naive
    # One sequence is one micro-batch: two groups would run in turn, so with
    # room for the whole model one group is the faster step (a rank idles).
    part = partition(spec, wl, 10**9, ranks=2)
    assert [g.layers for g in part.groups] == [range(0, 6)] and part.idle_ranks == 1
    # Capacity-bound: at the LM head's own size, the heavy first layer leaves room
    # for one more layer in its group and the LM head for none.
    cap = costs.group_bytes(5, 6)
    assert costs.group_bytes(0, 2) <= cap < costs.group_bytes(0, 3)
    tight = partition(spec, wl, cap, ranks=4)
    assert len(tight.groups[0].layers) <= 2 and tight.groups[-1].layers == range(5, 6)
    assert all(g.total_bytes <= cap for g in tight.groups)


# -- capacity parsing and the command ---------------------------------------------

def test_parse_capacity():
    assert parse_capacity("80GB") == 80 * 10**9
    assert parse_capacity("40GiB") == 40 * 2**30
    assert parse_capacity("L2@h100") == DEVICE_CAPACITY["h100"]["L2"] == 50 * 2**20
    assert parse_capacity("hbm@H200*0.5") == 70_500_000_000
    for bad, words in [("L2@tpu", "unknown device"), ("HBM@h100*1.5", "fraction"),
                       ("lots", "cannot read capacity")]:
        with pytest.raises(ShardwiseError, match=words):
            parse_capacity(bad)
    if torch.cuda.is_available():
        assert parse_capacity("L2") > 0 and parse_capacity("HBM*0.9") > 0
    else:
        with pytest.raises(ShardwiseError, match="L2@h100"):
            parse_capacity("L2")


def test_partition_command_and_table():
    text = partition_command("small-l2", "L2@h100", 2)
    assert "2 groups x 1 replica = 2 ranks" in text
    assert "0-3" in text and "4-7" in text
    # Four ranks: two replicas of the two groups the L2 forces. Four groups of
    # two layers would stream fewer weights a rank, but with one micro-batch
    # their stages run in turn: a step takes 4 slowest groups, against 2.
    p = get_preset("small-l2")
    part = partition(p.model, p.workload, parse_capacity("L2@h100"), ranks=4)
    assert [g.layers for g in part.groups] == [range(0, 4), range(4, 8)]
    assert part.replicas == 2
    # One sequence cannot be split between replicas, and a capacity of one
    # layer forces four groups: the fifth rank idles.
    text = format_partition(partition(SMALL, ONE_SEQ, 300_000, ranks=5), SMALL, ONE_SEQ)
    assert "4 groups x 1 replica = 4 ranks (1 idle)" in text
    # The partition command sets the ranks with --ranks, and names that flag.
    with pytest.raises(ShardwiseError, match="--ranks 2"):
        partition_command("small-l2", "L2@h100", 1)


# -- the strategy's checks before launch ------------------------------------------

def test_layerwise_plan_validation():
    wl = ONE_SEQ.replace(batch=4)
    _, topo = validate_plan(SMALL, wl, "layerwise:cap=10MB", 2)
    assert topo.axes == ("dp", "pp") and topo.world_size == 2  # dp:R/pp:G
    for plan, words in [("layerwise", "needs a capacity"), ("layerwise:2x2,cap=1GB", "no degrees"),
                        ("layerwise:cap=1GB,tp=2", "unknown option")]:
        with pytest.raises(ShardwiseError, match=words):
            validate_plan(SMALL, wl, plan, 2)
    # Without a world size, the fewest ranks whose groups fit the capacity.
    assert validate_plan(SMALL, wl, "layerwise:cap=1GB")[1].world_size == 1
    # 300 KB holds one layer and the KV cache of two sequences: 4 groups x 2 replicas.
    assert validate_plan(SMALL, wl, "layerwise:cap=300KB")[1].world_size == 8
    # An idle rank would still have to join the job: name the ranks that are used.
    with pytest.raises(ShardwiseError, match="leave 1 idle; start 4 ranks"):
        validate_plan(SMALL, ONE_SEQ, "layerwise:cap=300KB", 5)
