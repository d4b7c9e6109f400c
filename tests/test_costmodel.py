"""The cost model: its counts against hand computation, its memory and
communication against real CPU runs (byte for byte), its fit verdicts."""
import math

import pytest

from shardwise.perf.clusters import LinkCost, bus_factor, load_cluster
from shardwise.perf.costmodel import _pipeline, predict
from shardwise.presets import get_preset
from shardwise.runtime.job import Case, Job
from shardwise.runtime.launcher import launch
from shardwise.spec import ModelSpec, ShardwiseError, Workload

H100_16 = load_cluster("h100-sxm-16")
H100_8 = load_cluster("h100-sxm-8")


def test_flop_and_byte_counts_seed_helix_4l_tp_pp():
    # seed-helix-4l: 4 layers, D 4096, 32 heads x 128, d_ff 16384, fp16; batch 128, T 10000.
    # tp_pp:8x2: a rank holds 2 layers, 32/8 = 4 heads (q, k and v), 16384/8 = 2048 of d_ff.
    p = get_preset("seed-helix-4l")
    pred = predict(p.model, p.workload, "tp_pp:8x2", H100_16)
    ops = pred.prefill.ops
    tokens = 128 * 10000
    # QKV: 2 x tokens x D x (4 + 4 + 4) x 128, times 2 layers = 3.2212e13.
    assert ops["qkv"].flops == 2 * tokens * 4096 * 1536 * 2 == pytest.approx(3.2212e13, rel=1e-4)
    # Causal core: 4 x B x heads x d x T(T+1)/2 (= 50,005,000 pairs), 2 layers = 2.6218e13.
    assert ops["attention"].flops == pytest.approx(4 * 128 * 4 * 128 * 50_005_000 * 2)
    # MLP: two matmuls of 2 x tokens x 4096 x 2048, 2 layers = 8.5899e13, plus the
    # activation (8 flops per hidden unit, 2 layers: 4.19e10).
    assert ops["mlp"].flops == pytest.approx(2 * 2 * tokens * 4096 * 2048 * 2 + 8 * tokens * 2048 * 2)
    # Two all-reduces a layer of the [B, T, D] fp16 partial sum: 10.49 GB each, 4 calls.
    ar = pred.prefill.comms["all_reduce/tp"]
    assert (ar.calls, ar.bytes) == (4, 4 * tokens * 4096 * 2)
    # Decode reads the rank's whole KV cache for its 4 kv heads at context 10001
    # (2 x 128 x 4 x 10001 x 128 x 2 B = 2.62 GB a layer) plus q and o (262 KB).
    att = pred.decode.ops["attention"]
    assert att.bytes == 2 * (2 * 128 * 4 * 10001 * 128 * 2 + 2 * 128 * 4 * 128 * 2)
    assert att.flops == 2 * 4 * 128 * 4 * 128 * 10001


def test_moe_counts_seed_moe_16l_ep16():
    # seed-moe-16l: 16 experts of 2 x 4096 x 16384, top-2, bf16; ep:16 -> one expert a rank.
    p = get_preset("seed-moe-16l")
    pred = predict(p.model, p.workload, "ep:16", H100_16)
    # Prefill: 128 x 10000 tokens x 2 slots / 16 ranks = 160,000 rows a rank (balanced
    # routing), 2 matmuls of 2 x rows x 4096 x 16384, 16 layers = 6.872e14 FLOPs.
    assert pred.prefill.ops["experts"].flops == pytest.approx(16 * 2 * 2 * 160_000 * 4096 * 16384)
    # Decode: 128 tokens route 256 slots over 16 experts; a given expert is missed with
    # probability (1 - 2/16)^128 = 3.9e-8, so each rank reads its expert's 268 MB a layer.
    w = pred.decode.ops["experts"].bytes
    rows = 128 * 2 / 16
    acts = rows * (2 * 4096 + 3 * 16384) * 2
    assert w == pytest.approx(16 * (2 * 4096 * 16384 * 2 + acts), rel=1e-6)
    # Attention is data-parallel: 128 / 16 = 8 sequences a rank, all 32 heads.
    assert pred.prefill.ops["attention"].flops == pytest.approx(16 * 4 * 8 * 32 * 128 * 50_005_000)


def test_head_dim_512_runs_at_the_slower_attention_rate():
    # seed-ring-4l has head_dim 512: no flash kernel, 130 TFLOP/s instead of 600.
    p = get_preset("seed-ring-4l")
    pred = predict(p.model, p.workload.replace(batch=16), "tp_pp:16x1", H100_16)
    att = pred.prefill.ops["attention"]
    assert att.seconds == pytest.approx(att.flops / 130e12)
    assert att.seconds > att.bytes / 3000e9  # compute-bound, so the rate is what counts


def test_collective_costs_follow_alpha_beta_with_bus_factors():
    assert bus_factor("all_reduce", 8) == 2 * 7 / 8
    assert bus_factor("all_gather", 4) == bus_factor("all_to_all", 4) == 3 / 4
    assert bus_factor("p2p", 2) == 1
    # 64 MB all-reduce on one node of 8: 30 us + 1.75 x 64e6 / 370e9 = 332.7 us.
    t, link = H100_16.collective_time("all_reduce", 64e6, list(range(8)))
    assert link == "nvlink" and t == pytest.approx(30e-6 + 1.75 * 64e6 / 370e9)
    # Across the two nodes, 8 GPUs each: NICs in parallel (8 x 45 GB/s) vs NVLink 370: NVLink.
    t16, link16 = H100_16.collective_time("all_reduce", 64e6, list(range(16)))
    assert link16 == "ib" and t16 == pytest.approx(40e-6 + 2 * 15 / 16 * 64e6 / 360e9)
    # One GPU per node: the single NIC (45 GB/s) limits.
    t2, _ = H100_16.collective_time("all_reduce", 64e6, [0, 8])
    assert t2 == pytest.approx(40e-6 + 1.0 * 64e6 / 45e9)
    # A size table is interpolated in log(size) and held flat past its ends.
    c = LinkCost(10.0, table=((1e6, 100.0), (1e8, 300.0)))
    assert c.busbw(1e7) == pytest.approx(200e9) and c.busbw(1e3) == 100e9 and c.busbw(1e9) == 300e9


def test_pipeline_pays_fill_and_drain():
    # 4 micro-batches through 2 stages of 1 s with 0.5 s hops: (4 + 2 - 1) x 1.5 s.
    total, bubble = _pipeline([1.0, 1.0], 0.5, 4)
    assert total == 7.5 and bubble == 3.5
    p = get_preset("seed-helix-4l")
    one = predict(p.model, p.workload, "tp_pp:8x2", H100_16)
    four = predict(p.model, p.workload, "tp_pp:8x2,mb=4", H100_16)
    assert four.prefill.seconds < one.prefill.seconds  # the fill hides more work
    assert four.prefill.bubble_s > 0


def test_infeasible_plans_name_the_reason():
    # seed-ring-4l: 2 (K, V) x 4 layers x 1024 x 10004 x 8192 x 2 B = 1.343 TB of KV cache.
    p = get_preset("seed-ring-4l")
    for plan in ("tp_pp:8x2", "ring:16"):
        pred = predict(p.model, p.workload, plan, H100_16)
        assert not pred.fits
        assert pred.reason == "KV cache 1.34 TB > 16 x 80 GB"
    assert sum(pred.kv_per_rank) == 2 * 4 * 1024 * 10004 * 8192 * 2
    # A plan that fits says so with no reason.
    ok = predict(p.model, p.workload.replace(batch=8), "ring:16", H100_16)
    assert ok.fits and ok.reason == ""


def test_invalid_plans_raise_before_predicting():
    p = get_preset("seed-helix-4l")
    with pytest.raises(ShardwiseError, match="n_heads"):
        predict(p.model, p.workload, "tp_pp:6x1", H100_8)
    with pytest.raises(ShardwiseError, match="needs 16 GPUs"):
        predict(p.model, p.workload, "helix:4x4", H100_8)
    with pytest.raises(ShardwiseError, match="capacity 52.43 MB"):  # 400 MB layers, 50 MiB L2
        predict(get_preset("seed-layerwise-3b").model, p.workload, "layerwise:cap=L2", H100_16)


def test_decode_reports_step_and_per_token():
    p = get_preset("seed-helix-2l")
    pred = predict(p.model, p.workload, "helix:4x4", H100_16)
    assert pred.ms_per_token == pytest.approx(pred.decode_step_ms / 128)
    assert pred.decode_tps == pytest.approx(128 / pred.decode.seconds)


# -- against real runs (CPU, gloo, 4 ranks, one launch) ---------------------------------

TINY, MOE = get_preset("tiny-dense"), get_preset("tiny-moe")
# 2 kv heads on 4 slices: helix falls back to splitting the sequence (its KV cache too).
GQA = ModelSpec(name="gqa", n_layers=2, d_model=48, n_heads=4, head_dim=8, d_ff=96,
                n_kv_heads=2, dtype="fp32", norm="rmsnorm", activation="swiglu", vocab_size=37)
GQA_WL = Workload(batch=3, seq_len=7, decode_steps=3)
CASES = [
    (TINY.model, TINY.reduced, "tp_pp:2x2"),
    (TINY.model, TINY.reduced, "tp_pp:4x1"),
    (TINY.model, TINY.reduced, "helix:2x2"),
    (TINY.model, TINY.reduced, "helix:2x2,reduce=flat"),
    (GQA, GQA_WL, "helix:1x4"),
    (TINY.model, TINY.reduced, "ring:4"),
    (MOE.model, MOE.reduced, "ep:4"),
    (GQA, GQA_WL, "tp_pp:2x2,mb=2"),
    (TINY.model, TINY.reduced, "layerwise:cap=100MB,mb=2"),
]


@pytest.fixture(scope="module")
def runs():
    cases = [Case(m, w, plan, verify=False) for m, w, plan in CASES]
    return launch(Job(cases, 4), deadline_s=300)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[2] for c in CASES])
def test_memory_matches_real_runs_exactly(runs, i):
    model, wl, plan = CASES[i]
    r = runs[i]
    assert r["plan"] == plan
    pred = predict(model, wl, plan, H100_8, 4)
    assert pred.weights_per_rank == r["param_bytes_per_rank"]
    assert pred.kv_per_rank == r["kv_bytes_per_rank"]


# ep's all-to-all bytes follow the router's choices (data), so only its routing
# table is exact; every other strategy's traffic is fixed by the shapes.
EXACT_COMM = [c for c in CASES if not c[2].startswith("ep")]


@pytest.mark.parametrize("case", EXACT_COMM, ids=[c[2] for c in EXACT_COMM])
def test_prefill_comm_bytes_match_real_runs(runs, case):
    model, wl, plan = case
    r = next(x for x in runs if x["plan"] == plan)
    pred = predict(model, wl, plan, H100_8, 4)
    measured = {k: v["bytes"] for k, v in r["comm_prefill_rank0"].items()}
    predicted = {k: c.bytes for k, c in pred.prefill.comms.items()}
    if plan.startswith("tp_pp") and "x2" in plan:
        assert measured["send/pp"] == predicted["send/pp"]  # rank 0 is a first stage: it sends
        measured.pop("send/pp"), predicted.pop("send/pp")
    if plan.startswith("layerwise"):
        # Rank 0 sends its group's output only when the partition has two groups or more.
        assert set(measured) == set(predicted)
    assert measured == pytest.approx(predicted)


def test_decode_comm_bytes_match_real_runs(runs):
    for model, wl, plan in CASES:
        if plan.startswith(("ep", "layerwise", "tp_pp:2x2")):
            continue  # data-dependent (ep); a pipeline's rank 0 is not its busiest sender
        r = next(x for x in runs if x["plan"] == plan)
        pred = predict(model, wl, plan, H100_8, 4)
        assert r["comm_bytes_decode_step_per_rank"][0] == pytest.approx(pred.decode.comm_bytes), plan


def test_memory_totals_are_sums_of_parts():
    p = get_preset("seed-moe-16l")
    m = predict(p.model, p.workload, "ep:16", H100_16).memory
    assert m.total == m.weights + m.kv_cache + m.activations + m.comm_buffers
    # ep:16: attention (4 x 4096^2) + one expert (2 x 4096 x 16384) + router (16 x 4096)
    # + 2 LayerNorms (4 x 4096) a layer, 16 layers, + final norm (2 x 4096); bf16.
    per_layer = 4 * 4096**2 + 2 * 4096 * 16384 + 16 * 4096 + 4 * 4096
    assert m.weights == (16 * per_layer + 2 * 4096) * 2
    assert math.isclose(m.kv_cache, 16 * 2 * 8 * 32 * 10004 * 128 * 2)


# -- the execution terms: copies, CUDA graphs, host issue, MoE syncs --------------------

from shardwise.perf.clusters import Cluster  # noqa: E402
from shardwise.perf.costmodel import (BLOCK_HOST_OPS, BLOCK_KERNELS, STATIC_DECODE_KERNELS,  # noqa: E402
                                      Core, LayerWork, Roofline, layer_times)
from shardwise.perf.reproduce import fidelity_summary, record_decode_steps  # noqa: E402

# A one-node profile with round numbers (no size tables), so every term is hand-computable.
ROUND = Cluster.from_dict({
    "name": "round", "gpus_per_node": 2, "nodes": 1,
    "matmul_tflops": {"bf16": 800}, "attention_tflops": {"dtype": "bf16", "head_dim<=256": 600,
                                                         "head_dim>256": 100},
    "hbm_gbps": 4000, "hbm_bytes": 10**11, "l2_bytes": 50 * 2**20, "launch_us": 10,
    "links": {"nvlink": {op: {"latency_us": 50, "busbw_gbps": 400}
                         for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")}},
})
SMALL = ModelSpec(name="small", n_layers=2, d_model=256, n_heads=4, head_dim=64, d_ff=1024,
                  dtype="bf16")


def test_profile_defaults_for_the_new_figures():
    # Streaming = copy x 3.9/4.2 (H200: GEMV 3.9 TB/s, copy 4.2); FA2 330 TFLOP/s;
    # 2 us a kernel; 10 us a collective in a graph; no derating without a measurement.
    assert ROUND.stream_rate == pytest.approx(4000e9 * 3.9 / 4.2)
    assert ROUND.flash_rate("bf16") == pytest.approx(330e12)
    assert ROUND.kernel_s == pytest.approx(2e-6) and ROUND.graph_latency_s == pytest.approx(10e-6)
    assert ROUND.sustained_ratio == 1.0
    measured = Cluster.from_dict({**_round_dict(), "sustained_matmul_tflops": 700,
                                  "stream_gbps": 3500, "kernel_us": 1.5})
    assert measured.sustained_ratio == pytest.approx(700 / 800)
    assert measured.stream_rate == 3500e9 and measured.kernel_s == pytest.approx(1.5e-6)


def _round_dict():
    return {"name": "round", "gpus_per_node": 2, "nodes": 1, "matmul_tflops": {"bf16": 800},
            "hbm_gbps": 4000, "hbm_bytes": 10**11, "launch_us": 10,
            "links": {"nvlink": {"all_reduce": {"latency_us": 50, "busbw_gbps": 400}}}}


def test_kv_write_and_graph_vs_eager_decode():
    # tp_pp:1x1, batch 2, prompt 100, cache sized for 10 more positions (max_len 110).
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    eager = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=False).decode
    graph = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=True).decode
    e = 2
    # The new token's K and V copied into the cache: 2 x (read + write) x 2 seqs x 4 heads
    # x 64 dims x 2 B = 4096 B a layer, 2 layers.
    assert eager.ops["kv write"].bytes == 2 * 4 * 2 * 4 * 64 * e
    # Eager reads the cache up to the position (101); the graph's static path all 110.
    kv = lambda S: 2 * (2 * 2 * S * 4 * 64 * e + 2 * 2 * 4 * 64 * e)
    assert eager.ops["attention"].bytes == kv(101)
    assert graph.ops["attention"].bytes == kv(110)
    # Tiny layer: eager it is host-bound (35 calls + 4 ReduceAfter calls + sdpa_kernel
    # = 40 x 10 us = 400 us); in a graph it is 19 kernels x 2 us + its (tiny) rooflines.
    assert eager.seconds == pytest.approx(2 * 40 * 10e-6)
    graph_ops = sum(o.seconds for o in graph.ops.values()) / 2
    assert graph.seconds == pytest.approx(2 * (STATIC_DECODE_KERNELS * 2e-6 + graph_ops))


def test_collectives_in_a_graph_pay_the_graph_latency():
    # tp_pp:2x1 decode of batch 2: two all-reduces a layer of 2 x 256 x 2 B = 1024 B.
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    eager = predict(SMALL, wl, "tp_pp:2x1", ROUND, 2, graphs=False).decode
    graph = predict(SMALL, wl, "tp_pp:2x1", ROUND, 2, graphs=True).decode
    wire = 1.0 * 1024 / 400e9  # factor 2(n-1)/n = 1 for two ranks
    assert eager.comms["all_reduce/tp"].seconds == pytest.approx(4 * (50e-6 + wire))
    assert graph.comms["all_reduce/tp"].seconds == pytest.approx(4 * (10e-6 + wire))


def test_eager_layer_is_the_longer_of_host_and_gpu():
    roof = Roofline(SMALL, ROUND)
    core = Core(1, 4, 4, 1, 10, 10, True, "flash")
    w = LayerWork(1, 3 * 256, 256, core, ff=1024)
    t_eager, ops = layer_times(roof, w)
    t_graph, _ = layer_times(roof, w, graph=True)
    gpu = sum(o.seconds for o in ops) + BLOCK_KERNELS * 2e-6
    assert t_graph == pytest.approx(gpu)
    assert t_eager == pytest.approx(max(gpu, BLOCK_HOST_OPS * 10e-6)) == BLOCK_HOST_OPS * 10e-6


def test_decode_attention_computes_a_whole_query_tile():
    # FA2 computes 128 query rows for the one real one: 4 x 16 seqs x 32 heads x 128 dims
    # x 128 rows x 4096 keys = 137 GFLOP at 330 TFLOP/s = 416 us, more than reading
    # the 1.07 GB of K and V at 3.71 TB/s (289 us).
    spec = ModelSpec(name="m", n_layers=1, d_model=4096, n_heads=32, head_dim=128, d_ff=16384,
                     dtype="bf16")
    roof = Roofline(spec, ROUND)
    op = roof.core(Core(16, 32, 32, 1, 4096, 4096, True, "flash"))
    assert op.flops == 4 * 16 * 32 * 128 * 4096  # the model FLOPs stay the real ones
    assert op.seconds == pytest.approx(4 * 16 * 32 * 128 * 128 * 4096 / 330e12)
    masked = roof.core(Core(16, 32, 32, 1, 4096, 4096, True, "masked"))  # 64-row tile at 600
    assert masked.seconds == pytest.approx(masked.bytes / ROUND.stream_rate)


def test_moe_reference_loop_waits_for_the_device_per_expert():
    # The reference MoE asks torch.nonzero for every local expert: the host waits each
    # time, so the loop is experts' GPU time + per expert (4 calls + a kernel) + per hit
    # expert 9 calls, after the rest of the layer.
    spec = get_preset("tiny-moe").model.replace(dtype="bf16")
    roof = Roofline(spec, ROUND)
    core = Core(1, spec.n_heads, spec.kv_heads, 1, 8, 8, True, "flash")
    w = LayerWork(1, 3 * spec.d_model, spec.d_model, core, expert_rows=2, experts_hit=2,
                  experts_held=spec.n_experts, expert_ff=spec.d_ff, router_tokens=1)
    t, ops = layer_times(roof, w)
    t_exp = next(o.seconds for o in ops if o.name == "experts")
    loop = t_exp + spec.n_experts * (4 * 10e-6 + 2e-6) + 2 * 9 * 10e-6
    rest_host = BLOCK_HOST_OPS * 10e-6  # host-bound rest of a tiny layer
    assert t == pytest.approx(rest_host + loop)


def test_ring_prefill_counts_its_copies():
    # ring:2, one sequence of 8 tokens: each rank 4 rows (chunks of 2), the travelling
    # block 4 rows; 4 heads x 64, bf16. Per layer: concatenated q, k, v (2 x 4 x 768 x 2),
    # k, v into the block (2 x 2 x 4 x 256 x 2), fp32 accumulator (4 x 256 x 4), merges
    # over the busiest rank's computed rows (18 B each), o.to(bf16) (6 B), transpose (4 B).
    pred = predict(SMALL, Workload(batch=1, seq_len=8, decode_steps=1), "ring:2", ROUND, 2)
    from shardwise.parallel.ring import ZigZag
    zz = ZigZag(2, 8, 1)
    busiest = max(range(2), key=zz.pairs)
    merged = sum(q1 - q0 for _, q0, q1, *_ in zz.blocks(busiest))
    per_layer = (2 * 4 * 768 * 2 + 4 * 4 * 256 * 2 + 4 * 256 * 4 + merged * 256 * 18
                 + 4 * 256 * 6 + 4 * 256 * 4)
    pick = 2 * 1 * 4 * 256 * 2  # the rank's zig-zag rows picked from the prompt, once
    assert pred.prefill.ops["copies"].bytes == 2 * per_layer + pick


def test_fidelity_verdicts_and_bench_cache_length():
    rows = fidelity_summary({("tp_pp", "decode ms"): [0.05, -0.08, 0.19],
                             ("ring", "prefill tok/s"): [0.05, 0.25],
                             ("helix", "prefill tok/s"): [0.11, 0.12, -0.02]})
    verdict = {(r[0], r[1]): r[-1] for r in rows}
    assert verdict == {("tp_pp", "decode ms"): "PASS", ("ring", "prefill tok/s"): "FAIL",
                       ("helix", "prefill tok/s"): "FAIL"}
    # bench sizes the cache for warm-up + timed steps + 1 (BenchSettings.decode_positions).
    assert record_decode_steps({"command": "shardwise bench --iters 30 --warmup 5"}) == 36
    assert record_decode_steps({"command": "shardwise bench --preset x"}) == 14
    assert record_decode_steps({"decode_steps": 4}) == 4


def test_fidelity_takes_the_devices_sustained_rate_when_the_profile_lacks_it(tmp_path):
    import json

    from shardwise.perf.reproduce import with_sustained_rate
    path = tmp_path / "r.jsonl"
    recs = [{"device": "NVIDIA H200", "matmul_peak_tflops": 800, "matmul_sustained_tflops": s}
            for s in (680, 700, 690)] + [{"device": "other", "matmul_peak_tflops": 800,
                                          "matmul_sustained_tflops": 400}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cl = Cluster.from_dict({**_round_dict(), "device": "NVIDIA H200"})
    out, note = with_sustained_rate(cl, [str(path)])
    assert out.sustained_ratio == pytest.approx(690 / 800) and "0.863" in note
    # A profile that measured it keeps its own.
    own = Cluster.from_dict({**_round_dict(), "device": "NVIDIA H200",
                             "sustained_matmul_tflops": 720})
    assert with_sustained_rate(own, [str(path)]) == (own, "")
