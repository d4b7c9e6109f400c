"""helix against the single-device reference on CPU with gloo (fp32), its
weight shards, its communication accounting and its plan errors."""
import math

import pytest
import torch

from helpers import SharedLaunch, assert_verified, with_real_features
from shardwise.model.load import ShardLoader
from shardwise.model.weights import WeightSource
from shardwise.parallel.registry import validate_plan
from shardwise.parallel.comm import Comm
from shardwise.parallel.helix import Helix
from shardwise.presets import get_preset
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, Plan, ShardwiseError, Workload

TINY = get_preset("tiny-dense")  # 4 heads x 16, d_ff 256, 4 layers
MOE = get_preset("tiny-moe")  # 4 heads x 16, 4 experts of d_ff 128
# Grouped-query attention (8 query heads over 2 kv heads), rotary, RMSNorm,
# SwiGLU, token ids in and logits out; d_model differs from heads x head_dim.
GQA = ModelSpec(name="gqa", n_layers=2, d_model=48, n_heads=8, head_dim=8, d_ff=96,
                n_kv_heads=2, dtype="fp32", norm="rmsnorm", activation="swiglu",
                vocab_size=101, rope_theta=10000.0)
GQA_WL = Workload(batch=3, seq_len=7, decode_steps=4)  # 7 positions over 2 or 4 slices
# Two heads on 8 ranks: more ranks than heads, so the sequence re-partition.
TWO_HEADS = ModelSpec(name="two-heads", n_layers=2, d_model=32, n_heads=2, head_dim=16,
                      d_ff=64, dtype="fp32", rope_theta=10000.0)
TWO_HEADS_WL = Workload(batch=2, seq_len=10, decode_steps=4)  # 10 = 3+3+2+2 over 4 slices
EIGHT_HEADS = ModelSpec(name="eight-heads", n_layers=2, d_model=64, n_heads=8, head_dim=8,
                        d_ff=128, dtype="fp32")
# q/k/v biases (sliced with their rows: head groups and dim slices), Llama
# 3.1's rope scaling (applied on full heads after the re-partition) and tied
# embeddings (the vocabulary shard of the embedding is the LM head's).
FEATURES = with_real_features(GQA)

SPECS = {s.name: s for s in (TINY.model, MOE.model, GQA, TWO_HEADS, EIGHT_HEADS, FEATURES)}


def case(spec, plan, workload=None):
    return Case(spec, workload or TINY.reduced, plan)


# Cases of one world size share one launch (the ranks start once).
LAUNCHES = {
    1: [case(TINY.model, "helix:1x1")],
    2: [case(TINY.model, "helix:2x1"), case(TINY.model, "helix:1x2"),
        case(TINY.model, "helix:1x2,reduce=flat"),
        case(GQA, "helix:1x2", GQA_WL)],  # heads path, 4 query heads per kv head
    4: [case(TINY.model, "helix:2x2"), case(TINY.model, "helix:4x1"),
        case(TINY.model, "helix:1x4"), case(TINY.model, "helix:2x2,reduce=flat"),
        case(GQA, "helix:1x4", GQA_WL),  # sequence path: 2 kv heads over 4 slices
        case(GQA, "helix:2x2,reduce=flat", GQA_WL),  # sequence path, flat sums
        case(MOE.model, "helix:2x2", MOE.reduced),  # each expert's d_ff split 4 ways
        case(GQA, "helix:4x1", GQA_WL),  # 4 groups, 2 kv heads: each on 2 groups
        case(FEATURES, "helix:2x2", GQA_WL),  # sequence path (1 kv head, 2 slices)
        case(FEATURES, "helix:1x4", GQA_WL)],  # sequence path, 2 kv heads
    8: [case(TINY.model, "helix:2x4"), case(TINY.model, "helix:2x4,reduce=flat"),
        case(TWO_HEADS, "helix:2x4", TWO_HEADS_WL),
        case(TWO_HEADS, "helix:2x4,reduce=flat", TWO_HEADS_WL),
        case(EIGHT_HEADS, "helix:2x4"),  # heads path on 8 ranks
        case(GQA, "helix:2x4", GQA_WL),
        case(FEATURES, "helix:4x2", GQA_WL)],  # replicated kv heads, sequence path
}


# Registered at import: each world size's launch is shared with other modules'
# cases of that size (helpers.SharedLaunch).
RUNS = {n: SharedLaunch(cases, n) for n, cases in LAUNCHES.items()}


@pytest.fixture(scope="module", params=sorted(LAUNCHES), ids=lambda n: f"{n}ranks")
def launched(request):
    return LAUNCHES[request.param], RUNS[request.param].results()


def test_helix_matches_reference(launched):
    cases, results = launched
    assert_verified(results, [c.plan for c in cases])


def test_helix_takes_both_repartitions(launched):
    cases, results = launched
    for c, r in zip(cases, results):
        spec, N, M = c.model, *Plan.parse(c.plan).shape
        group_kv = max(1, spec.kv_heads // N)  # one, replicated, when N > kv heads
        want = "heads" if group_kv % M == 0 else "sequence"
        assert r["report"]["repartition"] == want, (c.plan, spec.name)


def test_helix_kv_cache_is_replicated_only_past_the_kv_heads(launched):
    # Over all ranks the caches add up to exactly one copy of the reference's,
    # or N / n_kv_heads copies when there are more head groups than kv heads.
    cases, results = launched
    for c, r in zip(cases, results):
        spec, wl, N = c.model, c.workload, Plan.parse(c.plan).shape[0]
        full = 2 * spec.n_layers * wl.batch * spec.kv_heads * wl.max_len * spec.head_dim * 4
        copies = max(1, N // spec.kv_heads)
        assert sum(r["kv_bytes_per_rank"]) == copies * full, (c.plan, spec.name)


def test_helix_report_predicts_the_bytes_counted(launched):
    # The per-layer formulas in report() must equal what Comm counted on rank 0
    # (models with a vocabulary add an embedding sum, so they are left out).
    cases, results = launched
    for c, r in zip(cases, results):
        if c.model.vocab_size is not None:
            continue
        layers = c.model.n_layers
        per_layer = r["report"]["comm_bytes_per_layer"]
        counted = {k: v["bytes"] for k, v in r["comm_prefill_rank0"].items()}
        assert counted == {k: layers * b for k, b in per_layer["prefill"].items()}, c.plan
        step = r["comm_bytes_decode_step_per_rank"][0]
        assert step == layers * sum(per_layer["decode"].values()), c.plan


def test_hierarchical_reduction_moves_a_quarter_across_groups():
    # Pure arithmetic on the report (no processes): across groups the
    # hierarchy all-reduces 1/M of what the flat all-reduce does.
    wl = TINY.reduced
    reports = {}
    for how in ("hier", "flat"):
        plan = Plan.parse(f"helix:2x4,reduce={how}")
        topo = Helix.validate(TINY.model, wl, plan, 8)
        reports[how] = _shard(TINY.model, wl, plan, topo, 0).layer_bytes(wl.seq_len, False)
    y = wl.batch * wl.seq_len * TINY.model.d_model * 4
    assert reports["flat"]["all_reduce/world"] == 2 * y
    assert reports["hier"]["all_reduce/group"] == 2 * y // 4
    assert "all_reduce/world" not in reports["hier"]


def _shard(spec, wl, plan, topo, rank):
    topo.rank = rank
    loader = ShardLoader(WeightSource(spec, 0), torch.float32, "cpu")
    return Helix(spec, wl, plan, topo, Comm(topo), loader)


@pytest.mark.parametrize("spec,plan,wl", [
    (TINY.model, "helix:2x2", TINY.reduced),  # heads path
    (GQA, "helix:2x4", GQA_WL),  # sequence path, GQA, vocabulary
    (MOE.model, "helix:2x2", MOE.reduced),
    (FEATURES, "helix:2x2", GQA_WL),  # q/k/v biases, one tensor for embedding and LM head
])
def test_each_rank_holds_one_pth_of_the_weights(spec, plan, wl):
    plan = Plan.parse(plan)
    P = math.prod(plan.shape)
    for rank in range(P):
        shard = _shard(spec, wl, plan, Helix.validate(spec, wl, plan, P), rank)
        attn = mlp = norms = router = ends = 0
        for name, p in shard.named_parameters():
            if ".attn.local." in name:
                attn += p.numel()
            elif "router" in name:
                router += p.numel()
            elif ".mlp.inner." in name:
                mlp += p.numel()
            elif "norm" in name:
                norms += p.numel()
            else:
                ends += p.numel()
        assert attn * P == spec.n_layers * spec.attn_params(), rank
        experts = spec.n_experts * spec.expert_params() if spec.is_moe else spec.mlp_params()
        assert mlp * P == spec.n_layers * experts, rank
        # Replicated, and small: the norms (2 per layer + final) and the router.
        assert norms == spec.n_layers * spec.norm_params() + spec.norm_params() // 2
        assert router == (spec.n_layers * spec.n_experts * spec.d_model if spec.is_moe else 0)
        vocab_rows = 0 if spec.vocab_size is None else -(-spec.vocab_size // P)
        tables = 1 if spec.tie_embeddings else 2  # embedding (+ LM head) shards
        assert ends == tables * vocab_rows * spec.d_model


@pytest.mark.parametrize("spec,plan,world,wl,message", [
    (TINY.model, "helix:4", 4, None, "NxM"),
    (TINY.model, "helix:2x2x2", 8, None, "NxM"),
    (TINY.model, "helix:3x1", 3, None, "n_heads (4) is not divisible by head groups N"),
    (GQA.replace(n_heads=12, n_kv_heads=4), "helix:6x1", 6, GQA_WL,
     "n_kv_heads (4) and head groups N of plan helix:6x1 (6): neither divides"),
    (TINY.model, "helix:1x3", 3, None, "head_dim (16) is not divisible by head-dim slices M"),
    (TINY.model.replace(d_ff=100), "helix:2x4", 8, None, "d_ff (100) is not divisible by N*M"),
    (TINY.model, "helix:2x2,reduce=tree", 4, None, "reduce=hier or reduce=flat"),
    (TINY.model, "helix:2x2,overlap=1", 4, None, "no option 'overlap'"),
    (TINY.model, "helix:2x2,mb=2", 4, None, "remove mb=2"),
    (TWO_HEADS, "helix:2x4", 8, Workload(batch=2, seq_len=3), "use seq_len >= 4"),
    (TINY.model, "helix:2x2", 8, None, "needs group=2 x slice=2 = 4 ranks"),
])
def test_helix_plan_errors(spec, plan, world, wl, message):
    with pytest.raises(ShardwiseError) as err:
        validate_plan(spec, wl or TINY.reduced, plan, world)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert any(w in text for w in ("choose", "write", "remove", "use", "start")), text


def test_helix_candidates():
    # The planner filters candidates through validate; on 8 ranks tiny-dense
    # (4 heads) admits every shape but 8x1, flat reduction where it differs.
    valid = []
    for plan in Helix.candidates(TINY.model, TINY.reduced, 8):
        try:
            validate_plan(TINY.model, TINY.reduced, plan, 8)
            valid.append(plan)
        except ShardwiseError:
            pass
    assert valid == ["helix:1x8", "helix:2x4", "helix:2x4,reduce=flat", "helix:4x2",
                     "helix:4x2,reduce=flat"]


def test_heads_path_decodes_at_a_device_tensor_position():
    # What a CUDA-graph decode does: the position is a 0-d tensor and the
    # whole static cache is attended with a mask. One rank needs no processes
    # (every collective is on an axis of size 1).
    spec, wl = GQA.replace(vocab_size=None), GQA_WL
    plan = Plan.parse("helix:1x1")
    shards = [_shard(spec, wl, plan, Helix.validate(spec, wl, plan, 1), 0) for _ in range(2)]
    assert all(s.supports_graphs for s in shards)
    torch.manual_seed(0)
    prompt = torch.randn(wl.batch, wl.seq_len, spec.d_model)
    with torch.inference_mode():
        for s in shards:
            s.step(prompt, 0)
        for t in range(wl.decode_steps):
            x = torch.randn(wl.batch, 1, spec.d_model)
            eager = shards[0].step(x, wl.seq_len + t)
            graphable = shards[1].step(x, torch.tensor(wl.seq_len + t))
            torch.testing.assert_close(graphable, eager, rtol=1e-5, atol=1e-5)


def test_moe_decode_graph_capture_needs_the_dense_path():
    # The MoE loop asks torch.nonzero for each expert's tokens, a host wait no
    # CUDA graph can hold; up to DENSE_MOE_MAX_TOKENS a call it runs densely.
    from shardwise.model.reference import DENSE_MOE_MAX_TOKENS
    spec, plan = MOE.model, Plan.parse("helix:1x1")
    for batch, ok in ((MOE.reduced.batch, True), (DENSE_MOE_MAX_TOKENS + 1, False)):
        wl = MOE.reduced.replace(batch=batch)
        shard = _shard(spec, wl, plan, Helix.validate(spec, wl, plan, 1), 0)
        assert shard.mode == "heads" and shard.supports_graphs == ok
