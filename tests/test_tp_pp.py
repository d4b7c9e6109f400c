"""tp_pp against the single-device reference on CPU with gloo (fp32).

The cases are registered when this module is imported and run in the
launches they share with other modules' cases of the same world size
(helpers.SharedLaunch): the ranks start once per world size."""
import pytest

from helpers import assert_verified, shared_plans, with_real_features, SharedLaunch
from shardwise.presets import get_preset
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, Workload

MATCHES = {
    1: ["tp_pp:1x1"],
    # overlap=2 forces the prefill as two overlapped halves (auto, the default,
    # keeps these small batches on the plain schedule, as does overlap=1).
    2: ["tp_pp:2x1", "tp_pp:2x1,overlap=2", "tp_pp:2x1,overlap=1", "tp_pp:1x2",
        "tp_pp:1x2,mb=2"],
    4: ["tp_pp:2x2", "tp_pp:4x1", "tp_pp:1x4,mb=4", "tp_pp:2x2,mb=3"],
}
MATCHES_RUN = {n: shared_plans("tiny-dense", plans, n) for n, plans in MATCHES.items()}


@pytest.mark.parametrize("nproc,plans", sorted(MATCHES.items()))
def test_tp_pp_matches_reference(nproc, plans):
    assert_verified(MATCHES_RUN[nproc].results(), plans)


# K overlapped chunks of a batch of 5: uneven chunks (2+2+1), one sequence a
# chunk, K above the batch (capped at 5), and chunks inside pipeline micro-batches.
CHUNKS = {
    2: ["tp_pp:2x1,overlap=3", "tp_pp:2x1,overlap=4", "tp_pp:2x1,overlap=8"],
    4: ["tp_pp:2x2,overlap=3,mb=2", "tp_pp:4x1,overlap=5"],
}
CHUNKS_RUN = {n: shared_plans("tiny-dense", plans, n, Workload(batch=5, seq_len=9, decode_steps=2))
              for n, plans in CHUNKS.items()}


@pytest.mark.parametrize("nproc,plans", sorted(CHUNKS.items()))
def test_tp_pp_prefill_in_chunks(nproc, plans):
    assert_verified(CHUNKS_RUN[nproc].results(), plans)


def test_overlap_chunks_auto():
    from shardwise.parallel.tp_pp import OVERLAP_MIN_BYTES, overlap_chunks

    row = 4096 * 2  # one bf16 token of seed-helix-4l
    assert overlap_chunks("auto", 8, 8192, row) == 2  # 4 sequences a chunk, 256 MiB each
    assert overlap_chunks("auto", 2, 8192, row) == 2
    assert overlap_chunks("auto", 8, 1, row) == 1  # decode
    assert overlap_chunks("auto", 4, 128, 1024) == 1  # a chunk's reduction under 1 MiB
    tokens = OVERLAP_MIN_BYTES // row
    assert overlap_chunks("auto", 2, tokens, row) == 2
    assert overlap_chunks("auto", 2, tokens - 1, row) == 1  # a chunk's reduction under 1 MiB
    assert overlap_chunks("3", 2, 16, row) == 2 and overlap_chunks("1", 8, 16, row) == 1


# 5 layers over 2 stages (3 + 2), grouped-query attention, token ids in and
# logits out (embedding on the first stage, LM head on the last).
GQA_UNEVEN = ModelSpec(name="t", n_layers=5, d_model=48, n_heads=4, head_dim=12, d_ff=96,
                       n_kv_heads=2, dtype="fp32", vocab_size=101, norm="rmsnorm",
                       activation="swiglu", rope_theta=10000.0)
GQA_UNEVEN_RUN = shared_plans(GQA_UNEVEN, ["tp_pp:2x2", "tp_pp:1x4"], 4,
                              Workload(batch=3, seq_len=7, decode_steps=4))


def test_tp_pp_gqa_uneven_layers_and_vocab():
    assert_verified(GQA_UNEVEN_RUN.results(), ["tp_pp:2x2", "tp_pp:1x4"])


# q/k/v biases sliced with their heads' rows, Llama 3.1's rope scaling, tied
# embeddings with the LM head on another stage than the embedding (1x4, 2x2)
# and on the same rank (4x1: one tensor), and tp beyond the KV heads: at tp 4
# each of the 2 KV heads is held by the 2 ranks whose query heads use it; with
# one KV head (multi-query), by all 4.
REAL_GQA = with_real_features(ModelSpec(
    name="t", n_layers=4, d_model=48, n_heads=4, head_dim=12, d_ff=96, n_kv_heads=2,
    dtype="fp32", vocab_size=101, norm="rmsnorm", activation="swiglu", rope_theta=1e4))
REAL_WL = Workload(batch=3, seq_len=7, decode_steps=3)
REAL_RUN = SharedLaunch(
    [Case(REAL_GQA, REAL_WL, p) for p in ("tp_pp:4x1", "tp_pp:2x2", "tp_pp:1x4,mb=2")]
    + [Case(REAL_GQA.replace(name="mqa", n_kv_heads=1), REAL_WL, "tp_pp:4x1")], 4)


def test_tp_pp_real_model_features_and_kv_heads_beyond_tp():
    cases, results, wl = REAL_RUN.cases, REAL_RUN.results(), REAL_WL
    assert_verified(results, [c.plan for c in cases])
    one_head = 4 * 2 * wl.batch * wl.max_len * 12 * 4  # 4 layers of K and V, fp32
    for r, replicas in zip(results, (2, 1, 1, 4)):
        assert r["report"]["kv_head_replicas"] == replicas, r["plan"]
    assert results[0]["kv_bytes_per_rank"] == [one_head] * 4  # 2x an even quarter
    assert results[3]["kv_bytes_per_rank"] == [one_head] * 4  # the whole cache on each


MOE_RUN = shared_plans("tiny-moe", ["tp_pp:2x1", "tp_pp:1x2"], 2)


def test_tp_pp_moe_spreads_experts():
    assert_verified(MOE_RUN.results(), ["tp_pp:2x1", "tp_pp:1x2"])


def test_wide_partial_sums_round_once_like_one_device():
    # The invariant behind reduce=fp32: float32 partials of a row-parallel
    # layer, added and rounded once, give the single device's bf16 output
    # (up to float32 reassociation landing on a rounding boundary), while
    # rounding each partial first does not.
    import torch
    from torch import nn

    from shardwise.parallel.tp_pp import WideOutputLinear

    torch.manual_seed(0)
    x = torch.randn(64, 256).bfloat16()
    full = nn.Linear(256, 128, bias=False).bfloat16()
    one_device = full(x)
    halves = [nn.Linear(128, 128, bias=False).bfloat16() for _ in range(2)]
    for i, h in enumerate(halves):
        h.weight.data.copy_(full.weight.data[:, i * 128:(i + 1) * 128])
    parts = [x[:, i * 128:(i + 1) * 128] for i in range(2)]
    wide = sum(WideOutputLinear(h)(p) for h, p in zip(halves, parts))
    assert wide.dtype == torch.float32
    narrow = sum(h(p) for h, p in zip(halves, parts))  # bf16 + bf16
    same_wide = (wide.bfloat16() == one_device).float().mean().item()
    same_narrow = (narrow == one_device).float().mean().item()
    assert same_wide > 0.99, same_wide
    assert same_narrow < 0.9, same_narrow


# bf16 on CPU (gloo): the wide reduction path, the two-half prefill casting
# the float32 sum back, and MoE (where it is the default).
FP32_PLANS = ["tp_pp:2x1,reduce=fp32,overlap=2", "tp_pp:2x1,reduce=fp32,overlap=1"]
FP32_DENSE_RUN = shared_plans(get_preset("tiny-dense").model.replace(dtype="bf16"), FP32_PLANS,
                              2, Workload(batch=4, seq_len=16, decode_steps=2))
FP32_MOE_RUN = shared_plans(get_preset("tiny-moe").model.replace(dtype="bf16"),
                            ["tp_pp:2x1", "tp_pp:2x1,reduce=model"], 2,
                            Workload(batch=4, seq_len=64, decode_steps=2))


def test_tp_pp_reduce_fp32_in_bf16():
    assert_verified(FP32_DENSE_RUN.results(), FP32_PLANS, tol=2e-2)
    # MoE: the float32 sum rounds once, as one device does, so no near-tied
    # token changes expert and the bf16 result matches to float32
    # reassociation (bit for bit on CPU). Rounding the partials first
    # (reduce=model) flips routing on this seed: one decode step is off by ~0.2.
    wide, narrow = FP32_MOE_RUN.results()
    assert_verified([wide], ["tp_pp:2x1"], tol=1e-3)
    assert narrow["max_rel_err"] > 1e-2, narrow


def test_tp_pp_rejects_unknown_reduce():
    import pytest as _pytest

    from shardwise.parallel.tp_pp import TpPp
    from shardwise.spec import Plan, ShardwiseError

    spec = get_preset("tiny-dense").model
    with _pytest.raises(ShardwiseError, match="reduce=fp32|model"):
        TpPp.validate(spec, Workload(batch=2, seq_len=8), Plan.parse("tp_pp:2x1,reduce=fp16"), 2)


# The seed presets' activation (tanh GELU, fused into the GEMM on GPUs), dense
# and MoE, through tensor parallelism and experts over ranks.
GELU_WL = Workload(batch=4, seq_len=16, decode_steps=2)
GELU_DENSE_RUN = shared_plans(get_preset("tiny-dense").model.replace(activation="gelu_tanh"),
                              ["tp_pp:2x1"], 2, GELU_WL)
GELU_MOE_RUN = shared_plans(get_preset("tiny-moe").model.replace(activation="gelu_tanh"),
                            ["tp_pp:2x1", "ep:2"], 2, GELU_WL)


def test_gelu_tanh_models_match_reference():
    assert_verified(GELU_DENSE_RUN.results(), ["tp_pp:2x1"])
    assert_verified(GELU_MOE_RUN.results(), ["tp_pp:2x1", "ep:2"])
