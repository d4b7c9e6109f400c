"""The cost model: its counts against hand computation, its memory and
communication against real CPU runs (byte for byte), its fit verdicts."""
import dataclasses
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
    # Prefill: 128 x 10000 tokens x 2 slots / 16 ranks = 160,000 rows a rank on
    # average; a rank's rows are a sum over tokens of c ~ hypergeometric(16, 1, 2)
    # (mean 1/8, variance 2 x 1/16 x 15/16 x 14/15 = 0.109375), so sigma = 374.2
    # and the busiest of 16 ranks (E[max of 16 normals] = 1.766) has 1.00413 x the
    # mean. 2 matmuls of 2 x rows x 4096 x 16384, 16 layers: 6.90e14 FLOPs.
    rows = 160_000 * (1 + math.sqrt(1.28e6 * 0.109375) * 1.766 / 160_000)
    assert pred.prefill.ops["experts"].flops == pytest.approx(16 * 2 * 2 * rows * 4096 * 16384,
                                                             rel=2e-4)
    # Decode: 128 tokens route 256 slots over 16 experts; a given expert is missed with
    # probability (1 - 2/16)^128 = 3.9e-8, so each rank reads its expert's 268 MB a layer.
    w = pred.decode.ops["experts"].bytes
    rows = 128 * 2 / 16 * (1 + math.sqrt(128 * 0.109375) * 1.766 / 16)  # busiest of 16
    acts = rows * (2 * 4096 + 3 * 16384) * 2
    passes = 3 * 2 * rows * 4096 * 2  # gather, weighting, scatter back (read + write)
    assert w == pytest.approx(16 * (2 * 4096 * 16384 * 2 + acts + passes), rel=2e-3)
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
    # Device-bound: 4 micro-batches through 2 stages of 1 s of device work (host
    # 0.1 s), 0.5 s on the wire: stage 0 finishes micro-batch i at i + 1; stage 1
    # starts it at max(its previous finish, arrival i + 1.5): 1.5, 2.5, 3.5, 4.5,
    # finishing at 5.5 = (4 + 2 - 1) x 1 s + the one hop. Busy 4 s: bubble 1.5 s.
    total, bubble = _pipeline([(0.1, 1.0, False), (0.1, 1.0, False)], 4, 0.0, 0.5)
    assert total == pytest.approx(5.5) and bubble == pytest.approx(1.5)
    # Host-bound (1 s of host, 0.1 s of device per micro-batch): a receive does not
    # hold the host, so both hosts issue at once; stage 1's device finishes
    # micro-batch i when its host has issued it (i + 1) or the data has come
    # (stage 0 done at i + 1, + 0.5 s) and it ran 0.1 s: 1.6, 2.6, 3.6, 4.6.
    # Each send and receive costs 0.05 s of host: stage 0 has issued micro-batch i
    # at 1.05 i + 1, its data lands at 1.05 i + 1.5; stage 1 (receive, then issue)
    # has issued it at 1.05 (i + 1): the last finishes at 3 x 1.05 + 1.5 + 0.1.
    total, _ = _pipeline([(1.0, 0.1, False), (1.0, 0.1, False)], 4, 0.05, 0.5)
    assert total == pytest.approx(3 * 1.05 + 1.5 + 0.1)
    # A stage that waits for its device inside (serial) issues the next
    # micro-batch only when it has finished this one.
    total, _ = _pipeline([(1.0, 1.0, True)], 3, 0.0, 0.0)
    assert total == pytest.approx(3.0)
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
    # ring keeps one spare slot a rank (where a static decode step writes what it does not keep).
    assert sum(pred.kv_per_rank) == 2 * 4 * 1024 * (10004 + 16) * 8192 * 2
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


# -- the execution terms: host calls, CUDA graphs, device-to-host waits, overlap -------

from shardwise.perf.clusters import Cluster  # noqa: E402
from shardwise.perf.costmodel import (STATIC_DECODE_KERNELS, Calls, Core, Flavour,  # noqa: E402
                                      LayerWork, Roofline, Work, _moe_layer, _overlap,
                                      busiest_hits, expected_max_normal, hit_distribution,
                                      rank_rows_imbalance)
from shardwise.perf.reproduce import (fidelity_summary, measured_balance,  # noqa: E402
                                      record_decode_steps)

# A one-node profile with round numbers (no size tables), so every term is hand-computable:
# 10 us an op that launches a kernel, 2 a view, 3 a module call, 20 a device-to-host read,
# 30 an eager collective call.
ROUND_HOST = {"op_us": 10, "view_us": 2, "module_us": 3, "sync_us": 20,
              "collective_us": {op: 30 for op in ("all_reduce", "all_gather", "reduce_scatter",
                                                  "all_to_all", "p2p")}}


def _round_dict(**extra):
    return {"name": "round", "gpus_per_node": 2, "nodes": 1, "matmul_tflops": {"bf16": 800},
            "attention_tflops": {"dtype": "bf16", "head_dim<=256": 600, "head_dim>256": 100},
            "hbm_gbps": 4000, "hbm_bytes": 10**11, "l2_bytes": 50 * 2**20, "launch_us": 10,
            "links": {"nvlink": {op: {"latency_us": 50, "busbw_gbps": 400}
                                 for op in ("all_reduce", "all_gather", "reduce_scatter",
                                            "all_to_all", "p2p")}}, **extra}


ROUND = Cluster.from_dict(_round_dict(**ROUND_HOST))
SMALL = ModelSpec(name="small", n_layers=2, d_model=256, n_heads=4, head_dim=64, d_ff=1024,
                  dtype="bf16")


def test_profile_defaults_for_the_new_figures():
    # Streaming = copy x 3.9/4.2 (H200: GEMV 3.9 TB/s, copy 4.2); FA2 330 TFLOP/s;
    # 2 us a kernel; 10 us a collective in a graph; no derating without a measurement.
    old = Cluster.from_dict(_round_dict())
    assert old.stream_rate == pytest.approx(4000e9 * 3.9 / 4.2)
    assert old.flash_rate("bf16") == pytest.approx(330e12)
    assert old.kernel_s == pytest.approx(2e-6) and old.graph_latency_s == pytest.approx(10e-6)
    assert old.sustained_ratio == 1.0
    # Host figures of a profile without them: every call costs launch_us (10 us), a
    # device-to-host read two calls, a collective call its link's latency (50 us);
    # overlap fully credited; a step's host time as measured back to back.
    assert old.op_s == old.view_s == old.module_s == pytest.approx(10e-6)
    assert old.sync_s == pytest.approx(20e-6)
    assert old.collective_host_s("all_reduce") == pytest.approx(50e-6)
    assert old.overlap == 1.0 and old.step_host == 1.0
    measured = Cluster.from_dict(_round_dict(sustained_matmul_tflops=700, stream_gbps=3500,
                                             kernel_us=1.5, overlap_efficiency=0.6,
                                             step_host_ratio=1.5, **ROUND_HOST))
    assert measured.sustained_ratio == pytest.approx(700 / 800)
    assert measured.stream_rate == 3500e9 and measured.kernel_s == pytest.approx(1.5e-6)
    assert (measured.op_s, measured.view_s, measured.module_s, measured.sync_s) == pytest.approx(
        (10e-6, 2e-6, 3e-6, 20e-6))
    assert measured.collective_host_s("p2p") == pytest.approx(30e-6)
    assert measured.overlap == 0.6 and measured.step_host == 1.5
    with pytest.raises(ShardwiseError, match="unknown collective"):
        Cluster.from_dict(_round_dict(collective_us={"gossip": 1}))
    with pytest.raises(ShardwiseError, match="graph_collective_us: unknown collective"):
        Cluster.from_dict(_round_dict(graph_collective_us={"gossip": 1}))
    with pytest.raises(ShardwiseError, match=r"'512by1536' is not K x N"):
        Cluster.from_dict(_round_dict(decode_kernels_us={"gemm": {"512by1536": 3.0}}))
    with pytest.raises(ShardwiseError, match="is malformed"):
        Cluster.from_dict(_round_dict(decode_kernels_us={"norm": 3.0}))


def test_host_time_is_calls_times_their_cost():
    # 11 kernel ops, 30 views, 7 modules, 2 all-reduces: 110 + 60 + 21 + 60 us; a
    # step that starts from a wait (step_host_ratio 1.5) takes 1.5 x that.
    calls = Calls(kernels=11, metas=30, modules=7, all_reduce=2)
    assert calls.host_s(ROUND) == pytest.approx(251e-6)
    slow = Cluster.from_dict(_round_dict(step_host_ratio=1.5, **ROUND_HOST))
    assert calls.host_s(slow) == pytest.approx(1.5 * 251e-6)


def test_work_overlaps_host_and_device_between_reads():
    # Two stretches separated by a device-to-host read: max(5, 2) + max(1, 4) + the read.
    w = Work().add(5, 2).sync().add(1, 4)
    assert w.seconds(0.5) == pytest.approx(5 + 4 + 0.5) and w.syncs == 1
    # Concatenated work joins the last stretch of one with the first of the next.
    two = Work().extend(w, 2)
    assert two.segs == [[5, 2], [6, 6], [1, 4]] and two.seconds(0.5) == pytest.approx(16)


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
    # Tiny layer: eager it is host-bound. A layer of the reference block in a stack
    # (bf16, exact GELU): two fused add + norms, W_qkv, the one K/V copy (as 8-byte
    # words: two views), SDPA, W_o, the MLP's linear and GELU, W_down = 9 kernel ops;
    # q's slice and view, the K/V slice, its view and the cache slice, the cache
    # read back (2), q's transpose, o's transpose and reshape, the norms' outputs
    # (4), the pipeline's cache view (5) = 21 views; Attention, W_qkv, W_o, MLP,
    # W_down and the two ReduceAfter = 7 modules: 90 + 42 + 21 = 153 us. The step
    # adds its ends: the Transformer and OverlappedStage calls, the input slice,
    # the first layer's plain norm (a view fewer than an add_norm), the final
    # add_norm: 1 kernel, 2 views, 2 modules = 20 us.
    f = Flavour(SMALL)
    layer = f.block(f.attention(), f.mlp()) + Calls(modules=2) + f.batch_view()
    assert (layer.kernels, layer.metas, layer.modules) == (9, 21, 7)
    assert eager.layer_calls == layer
    assert (eager.step_calls.kernels, eager.step_calls.metas, eager.step_calls.modules) == (1, 2, 2)
    assert eager.seconds == pytest.approx(2 * 153e-6 + 20e-6)
    # In a graph: no host work; a layer's 9 kernels (the static layer's 8 and the
    # exact GELU's own) x 2 us + the (tiny) rooflines, and once a step the final
    # norm's kernel and the cache slots' and position mask's 9 (STATIC_STEP).
    graph_ops = sum(o.seconds for o in graph.ops.values()) / 2
    assert f.static_decode().kernels == STATIC_DECODE_KERNELS + 1 == 9
    assert graph.seconds == pytest.approx(2 * (9 * 2e-6 + graph_ops) + (1 + 9) * 2e-6,
                                          rel=1e-3)


def test_collectives_pay_the_host_call_eagerly_and_the_kernel_latency_on_the_device():
    # tp_pp:2x1 decode of batch 2: two all-reduces a layer of 2 x 256 x 2 B = 1024 B.
    # On the device each takes the wire time (factor 2(n-1)/n = 1 for two ranks) after
    # the collective kernel's latency (graph_latency_us, 10 us by default); eagerly the
    # host also pays the call (30 us), counted with the layer's host calls.
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    eager = predict(SMALL, wl, "tp_pp:2x1", ROUND, 2, graphs=False).decode
    graph = predict(SMALL, wl, "tp_pp:2x1", ROUND, 2, graphs=True).decode
    wire = 1.0 * 1024 / 400e9
    assert eager.comms["all_reduce/tp"].seconds == pytest.approx(4 * (10e-6 + wire))
    assert graph.comms["all_reduce/tp"].seconds == pytest.approx(4 * (10e-6 + wire))
    assert eager.layer_calls.all_reduce == 2
    assert eager.host_s == pytest.approx(2 * eager.layer_calls.host_s(ROUND)
                                         + eager.step_calls.host_s(ROUND))


def test_decode_attention_computes_a_whole_query_tile():
    # FA2 computes 128 query rows for the one real one: 4 x 16 seqs x 32 heads x 128 dims
    # x 128 rows x 4096 keys = 137 GFLOP at 330 TFLOP/s = 416 us, more than reading
    # the 1.07 GB of K and V at the 4 TB/s copy rate (268 us).
    spec = ModelSpec(name="m", n_layers=1, d_model=4096, n_heads=32, head_dim=128, d_ff=16384,
                     dtype="bf16")
    roof = Roofline(spec, Cluster.from_dict(_round_dict()))
    op = roof.core(Core(16, 32, 32, 1, 4096, 4096, True, "flash"))
    assert op.flops == 4 * 16 * 32 * 128 * 4096  # the model FLOPs stay the real ones
    assert op.seconds == pytest.approx(4 * 16 * 32 * 128 * 128 * 4096 / 330e12)
    masked = roof.core(Core(16, 32, 32, 1, 4096, 4096, True, "masked"))  # 64-row tile at 600
    assert masked.seconds == pytest.approx(masked.bytes / roof.cluster.hbm_rate)


def test_moe_reference_loop_waits_for_the_device_per_expert():
    # The reference MoE asks torch.nonzero for every local expert: the host waits each
    # time. The layer: the rest (its host calls and device time overlap), then a
    # segment per expert after a read (20 us): a hit expert's calls and GPU time, a
    # missed one's compare. 4 experts, 2 hit, 100 tokens (past the dense path's 64).
    spec = get_preset("tiny-moe").model.replace(dtype="bf16")
    f = Flavour(spec)
    roof = Roofline(spec, ROUND)
    core = Core(1, spec.n_heads, spec.kv_heads, 1, 8, 8, True, "flash")
    w = LayerWork(100, 3 * spec.d_model, spec.d_model, core, expert_rows=200, experts_hit=2,
                  experts_held=4, expert_ff=spec.d_ff, router_tokens=100)
    ops = roof.layer(w)

    from types import SimpleNamespace  # what _moe_layer needs of a strategy's context
    ctx = SimpleNamespace(flav=f, cluster=ROUND, roof=roof, graph=False,
                          host=lambda calls: calls.host_s(ROUND))
    pre = f.block(f.attention(), f.moe_router())
    work = _moe_layer(ctx, w, ops, pre, Calls())
    hit, miss = f.moe_expert(True), f.moe_expert(False)
    # A hit: compare + nonzero, the up-projection (linear and exact GELU: 2 kernels),
    # 6 kernels and 4 views more (gather, the experts' slices and W_down's transpose,
    # matmul, router weights indexed and cast, product, index_add_).
    assert (hit.kernels, hit.metas, hit.syncs) == (9, 4, 1) and (miss.kernels, miss.syncs) == (1, 1)
    t_exp = next(o.seconds for o in ops if o.name == "experts")
    rest = [o for o in ops if o.name != "experts"]
    seg_hit = max(hit.host_s(ROUND), t_exp / 2 + hit.kernels * 2e-6)
    seg_miss = max(miss.host_s(ROUND), miss.kernels * 2e-6)
    first = max(pre.host_s(ROUND), sum(o.seconds for o in rest) + pre.kernels * 2e-6)
    assert work.syncs == 4
    assert work.seconds(20e-6) == pytest.approx(first + 2 * seg_hit + 2 * seg_miss + 4 * 20e-6)
    # Up to 64 tokens (a decode step) every held expert runs on every token with
    # no wait: one stretch of host calls beside the device's work.
    dense_w = dataclasses.replace(w, tokens=1, router_tokens=1, expert_rows=4, experts_hit=4)
    dense_ops = roof.layer(dense_w)
    dense = _moe_layer(ctx, dense_w, dense_ops, pre, Calls())
    calls = pre + f.moe_dense(4)
    assert dense.syncs == 0 and calls.syncs == 0
    assert dense.seconds(20e-6) == pytest.approx(max(
        calls.host_s(ROUND), sum(o.seconds for o in dense_ops) + calls.kernels * 2e-6))


def test_expected_experts_hit_and_rows_of_the_busiest_rank():
    # One token choosing 2 of 4 experts, a rank holding 2: it hits 0 of them with
    # probability 1/6 (both picks elsewhere), 2 with 1/6, 1 with 4/6.
    assert hit_distribution(2, 4, 2, 1) == pytest.approx([1 / 6, 4 / 6, 1 / 6])
    # Brute force over 2 tokens: E[max over 2 ranks of distinct experts hit].
    import itertools
    pairs = list(itertools.combinations(range(4), 2))
    want = sum(max(len({e for e in a + b if e < 2}), len({e for e in a + b if e >= 2}))
               for a in pairs for b in pairs) / len(pairs) ** 2
    assert busiest_hits(2, 4, 2, 2, 2) == pytest.approx(want)
    # Many tokens: every expert is hit.
    assert busiest_hits(8, 16, 2, 5000, 2) == pytest.approx(8)
    # Gaussian order statistics: E[max of 2 normals] = 1/sqrt(pi); of 16, 1.766.
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi))
    assert expected_max_normal(16) == pytest.approx(1.766, abs=2e-3)
    # Rows: 1000 tokens, 16 experts top-2, 8 a rank: c ~ hypergeometric(16, 8, 2) has
    # mean 1 and variance 2 x 1/2 x 1/2 x 14/15 = 7/15; the busiest of 2 ranks has
    # 1 + sqrt(1000 x 7/15) / sqrt(pi) / 1000 of the mean.
    assert rank_rows_imbalance(16, 8, 2, 1000, 2) == pytest.approx(
        1 + math.sqrt(1000 * 7 / 15) / math.sqrt(math.pi) / 1000)


def test_measured_routing_balance_is_an_input():
    # A run's measured balance (ep's rank_load_max_over_mean) sets the busiest rank's
    # rows of every MoE plan of that run.
    p = get_preset("seed-moe-16l")
    wl = Workload(batch=8, seq_len=2048, decode_steps=8)
    spec = p.model.replace(n_layers=2)
    base = predict(spec, wl, "ep:2", ROUND, 2, moe_balance=1.0).prefill.ops["experts"].flops
    more = predict(spec, wl, "ep:2", ROUND, 2, moe_balance=1.25).prefill.ops["experts"].flops
    assert more == pytest.approx(1.25 * base)
    recs = [{"command": "c", "preset": "seed-moe-16l", "n_layers": 2, "dtype": "bf16",
             "batch": 8, "seq_len": 2048, "n_devices": 2, "plan": "ep:2",
             "report": {"rank_load_max_over_mean": 1.02}},
            {"command": "c", "preset": "seed-moe-16l", "n_layers": 2, "dtype": "bf16",
             "batch": 8, "seq_len": 2048, "n_devices": 2, "plan": "tp_pp:2x1", "report": {}}]
    assert list(measured_balance(recs).values()) == [1.02]


def test_overlap_credits_what_the_profile_measured():
    # Two streams: a 3 s compute beside a 2 s collective share 2 s; with efficiency 0.6
    # the compute is slowed by 0.4 x 2 s.
    assert _overlap([(0, 3)], [(1, 3)]) == pytest.approx(2)
    assert _overlap([(0, 1), (2, 3)], [(0.5, 2.5)]) == pytest.approx(1.0)
    # ring:2 prefill: each ring step takes max(hop, block) + (1 - eff) x min(hop, block).
    wl = Workload(batch=1, seq_len=16384, decode_steps=1)
    spec = ModelSpec(name="r", n_layers=1, d_model=4096, n_heads=32, head_dim=128, d_ff=16384,
                     dtype="bf16")
    full = predict(spec, wl, "ring:2", ROUND, 2).prefill.seconds
    half = predict(spec, wl, "ring:2", Cluster.from_dict(_round_dict(
        overlap_efficiency=0.5, **ROUND_HOST)), 2).prefill.seconds
    assert half > full
    # tp_pp's two-half prefill hides its all-reduces as far as the profile says.
    spec2 = SMALL.replace(n_layers=4, d_model=2048, n_heads=16, head_dim=128, d_ff=8192)
    wl2 = Workload(batch=8, seq_len=2048, decode_steps=1)
    plain = predict(spec2, wl2, "tp_pp:2x1,overlap=1", ROUND, 2).prefill.seconds
    hidden = predict(spec2, wl2, "tp_pp:2x1", ROUND, 2).prefill.seconds
    none = predict(spec2, wl2, "tp_pp:2x1", Cluster.from_dict(_round_dict(
        overlap_efficiency=0.0, **ROUND_HOST)), 2).prefill.seconds
    assert hidden < plain < none * 1.05


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


def test_gemm_and_attention_calls_cost_their_own_figures():
    # Eager: a GEMM's host call costs gemm_us, a fused add + norm norm_us and an
    # attention its phase's attn_us instead of op_us (10 in ROUND). In a CUDA graph: the static
    # decode layer's 4 GEMMs and 1 attention take at least the smallest such
    # kernel's GPU time instead of kernel_us (2 by default).
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    kinds = Cluster.from_dict(_round_dict(**ROUND_HOST, gemm_us=40, norm_us=25,
                                          attn_us={"prefill": 100, "decode": 30},
                                          gemm_kernel_us=5, attn_kernel_us=8))
    assert kinds.attn_s(False) == pytest.approx(100e-6) and kinds.attn_s(True) == pytest.approx(30e-6)
    assert ROUND.gemm_s == ROUND.attn_s(True) == ROUND.op_s
    for phase, attn_us in (("prefill", 100), ("decode", 30)):
        base = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=False).step(phase)
        more = predict(SMALL, wl, "tp_pp:1x1", kinds, 1, graphs=False).step(phase)
        calls = base.layer_calls * SMALL.n_layers + base.step_calls
        # bf16, d_model 256: both norms of a layer and the final one are the
        # fused kernel.
        assert (calls.gemms, calls.attns, calls.norms) == (4 * SMALL.n_layers, SMALL.n_layers,
                                                           2 * SMALL.n_layers + 1)
        assert more.host_s - base.host_s == pytest.approx(
            1e-6 * (calls.gemms * 30 + calls.attns * (attn_us - 10) + calls.norms * 15),
            rel=1e-6)
    base = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=True).decode
    more = predict(SMALL, wl, "tp_pp:1x1", kinds, 1, graphs=True).decode
    assert more.seconds - base.seconds == pytest.approx(
        SMALL.n_layers * 1e-6 * (4 * (5 - 2) + (8 - 2)), rel=1e-6)


def test_host_scale_fits_the_layer_probe():
    # calibrate's layer probe: one real reference layer timed back to back,
    # with its calls counted. Its time over those calls at the per-call
    # figures scales every eager step's host time (never below 1).
    calls = {"kernels": 11, "metas": 12, "modules": 7, "gemms": 4, "attns": 1}
    per_calls = (6 * 10 + 4 * 40 + 1 * 30) + 12 * 2 + 7 * 3  # ROUND_HOST + gemm/attn figures: 295 us
    kinds = dict(**ROUND_HOST, gemm_us=40, attn_us={"decode": 30})
    probe = Cluster.from_dict(_round_dict(**kinds, measurements={
        "layer_probe": {"us": 1.5 * per_calls, "calls": calls}}))
    flat = Cluster.from_dict(_round_dict(**kinds))
    assert flat.host_scale == 1.0 and probe.host_scale == pytest.approx(1.5)
    fast = Cluster.from_dict(_round_dict(**kinds, measurements={
        "layer_probe": {"us": 0.5 * per_calls, "calls": calls}}))
    assert fast.host_scale == 1.0
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    for phase in ("prefill", "decode"):
        a = predict(SMALL, wl, "tp_pp:1x1", flat, 1, graphs=False).step(phase).host_s
        b = predict(SMALL, wl, "tp_pp:1x1", probe, 1, graphs=False).step(phase).host_s
        assert b == pytest.approx(1.5 * a)


def test_ep_small_decode_is_static():
    # ep decode with every rank's tokens within DENSE_MOE_MAX_TOKENS: one
    # all-gather of the (largest) share and one reduce-scatter a layer, no
    # all-to-all, no host wait; in a CUDA graph unless graphs are off.
    spec = MOE.model.replace(dtype="bf16")
    wl = Workload(batch=8, seq_len=16, decode_steps=2)
    for graphs in (None, False):
        pred = predict(spec, wl, "ep:2", ROUND, 2, graphs=graphs)
        dec = pred.decode
        assert set(dec.comms) == {"all_gather/ep", "reduce_scatter/ep"}
        assert dec.comms["all_gather/ep"].bytes == spec.n_layers * 8 * spec.d_model * 2
        assert dec.syncs == 0
        assert (dec.host_s == 0) == (graphs is None)
        assert "all_to_all/ep" in pred.prefill.comms
    big = predict(spec, Workload(batch=80, seq_len=16, decode_steps=2), "ep:2", ROUND, 2)
    assert "all_to_all/ep" in big.decode.comms and big.decode.syncs > 0


def test_compute_rate_follows_the_duty_cycle():
    # Sustained 0.9 of the burst rate. The clock c that a busy share d holds
    # under a cap on average power (power ~ clock^3): d c^3 = 0.9^3, so c =
    # 0.9 / d^(1/3), at most 1. Always busy 0.9; busy 80% 0.9 / 0.928; busy
    # half the step or less, the burst rate.
    from shardwise.perf.costmodel import duty_derate

    assert duty_derate(0.9, 1.0) == pytest.approx(0.9)
    assert duty_derate(0.9, 0.8) == pytest.approx(0.9 / 0.8 ** (1 / 3))
    assert duty_derate(0.9, 0.8) ** 3 * 0.8 == pytest.approx(0.9 ** 3)
    assert duty_derate(0.9, 0.5) == 1.0
    assert duty_derate(0.9, 0.0) == 1.0 and duty_derate(1.0, 0.3) == 1.0
    # layerwise in 2 stages of one micro-batch (the capacity holds half the
    # layers): each GPU busy half the prefill, so its compute runs at the
    # burst rate, where tp_pp:2x1 (busy throughout) runs at about the
    # sustained rate.
    spec = SMALL.replace(n_layers=4, d_model=2048, n_heads=16, head_dim=128, d_ff=8192)
    wl = Workload(batch=2, seq_len=2048, decode_steps=1)
    derated = Cluster.from_dict(_round_dict(sustained_matmul_tflops=720, **ROUND_HOST))
    for plan in ("layerwise:cap=530MB", "tp_pp:2x1"):
        burst = predict(spec, wl, plan, ROUND, 2).prefill
        held = predict(spec, wl, plan, derated, 2).prefill
        duty = held.compute_s / held.seconds
        ratio = burst.compute_s / held.compute_s
        assert ratio == pytest.approx(min(1.0, 0.9 / duty ** (1 / 3)), rel=0.02), (plan, duty,
                                                                                  ratio)
        if plan.startswith("layerwise"):
            assert duty == pytest.approx(0.5, abs=0.05)
        else:
            assert duty > 0.8  # busy but for its exposed all-reduces


def test_fidelity_predicts_the_layout_a_record_ran():
    # small-l2 at 60 MiB on 2 ranks: the search now picks 2 replicas of the
    # whole model; a record that ran 2 groups x 1 replica is predicted as such.
    from shardwise.parallel.layerwise import plan_partition
    from shardwise.perf.reproduce import record_layout
    from shardwise.spec import Plan

    p = get_preset("small-l2")
    plan = Plan.parse("layerwise:cap=60MiB")
    wl = Workload(batch=4, seq_len=128, decode_steps=4)
    assert len(plan_partition(p.model, wl, plan, 2).groups) == 1
    rec = {"report": {"groups": [[0, 4], [4, 8]], "replicas": 1}}
    layout = record_layout(rec, p.model, wl, plan, 2)
    assert [g.layers for g in layout.groups] == [range(0, 4), range(4, 8)] and layout.replicas == 1
    ran = predict(p.model, wl, plan, H100_8, 2, layout=layout)
    assert ran.notes[0].startswith("layerwise: 2 group(s) x 1 replica(s)")
    assert record_layout({"report": {}}, p.model, wl, plan, 2) is None


PROBES = {"gemm": {"512x512": 3.0, "512x2048": 4.0, "2048x512": 6.0},
          "norm": {"512": 2.0, "2048": 4.0}, "cache_write": {"512": 2.5}}


def test_decode_kernel_probes_interpolate():
    cl = Cluster.from_dict(_round_dict(decode_kernels_us=PROBES, **ROUND_HOST))
    mb = 2**20
    assert ROUND.decode_gemm_s(512, 512, 0.5 * mb) is None  # no probes: the old charges
    # A probed shape: its time. Same k: linear in the weight's bytes between
    # probes (1 MiB is a third of the way from 0.5 to 2 MiB), past the largest the
    # extra bytes at the streaming rate, below the smallest down to the fastest.
    assert cl.decode_gemm_s(512, 512, 0.5 * mb) == pytest.approx(3e-6)
    assert cl.decode_gemm_s(512, 1024, 1 * mb) == pytest.approx(3e-6 + 1e-6 / 3)
    assert cl.decode_gemm_s(512, 4096, 4 * mb) == pytest.approx(4e-6 + 2 * mb / cl.stream_rate)
    assert cl.decode_gemm_s(512, 256, 0.25 * mb) == pytest.approx(3e-6)
    # Between probed k, linear in log k: k 1024 is halfway from 512 (2 MiB: 4 us)
    # to 2048 (6 us).
    assert cl.decode_gemm_s(1024, 1024, 2 * mb) == pytest.approx(5e-6)
    # Norms by width (log), the cache write by bytes (64 per unit of width), ends clamped.
    assert cl.decode_norm_s(1024) == pytest.approx(3e-6)
    assert cl.decode_norm_s(8192) == pytest.approx(4e-6)
    assert cl.decode_cache_write_s(64 * 4096) == pytest.approx(2.5e-6)


def test_graph_decode_charges_the_probed_kernels():
    # SMALL (d_model 256, exact GELU) decoding 4 sequences in a CUDA graph: each
    # norm takes the probe's 2 us (its launch in it), each GEMM at least the
    # probes' floor of 3 us; nothing else changes, and eager steps, prefill and
    # wide batches are as without probes.
    wl = Workload(batch=4, seq_len=128, decode_steps=4)
    cl = Cluster.from_dict(_round_dict(decode_kernels_us=PROBES, **ROUND_HOST))
    base, probed = (predict(SMALL, wl, "tp_pp:1x1", c, 1) for c in (ROUND, cl))
    L = SMALL.n_layers
    assert probed.decode.ops["norms+residual"].seconds == pytest.approx(L * 2 * 2e-6)
    assert probed.decode.ops["qkv"].seconds == pytest.approx(L * 3e-6)
    assert probed.decode.ops["kv write"].seconds == pytest.approx(L * 2.5e-6)
    gemm_s = sum(base.decode.ops[n].seconds for n in ("qkv", "w_o")) / L
    norm_s = base.decode.ops["norms+residual"].seconds / L
    kv_s = base.decode.ops["kv write"].seconds / L
    mlp_gemms = (probed.decode.ops["mlp"].seconds - base.decode.ops["mlp"].seconds) / L
    # Per layer: 2 norms, 2 attention GEMMs and the cache write at their probes
    # instead of roofline + launch (ROUND: 2 us a kernel), the MLP's GEMMs likewise.
    k = ROUND.kernel_s
    per_layer = (2 * 2e-6 - norm_s - 2 * k) + (2 * 3e-6 - gemm_s - 2 * k) \
        + (2.5e-6 - kv_s - k) + (mlp_gemms - 2 * k)
    assert probed.decode.seconds - base.decode.seconds == pytest.approx(L * per_layer, rel=1e-6)
    assert probed.prefill.seconds == base.prefill.seconds
    eager = [predict(SMALL, wl, "tp_pp:1x1", c, 1, graphs=False).decode.seconds for c in (ROUND, cl)]
    assert eager[0] == eager[1]
    wide = Workload(batch=128, seq_len=128, decode_steps=4)
    assert (predict(SMALL, wide, "tp_pp:1x1", cl, 1).decode.seconds
            == predict(SMALL, wide, "tp_pp:1x1", ROUND, 1).decode.seconds)


def test_collectives_on_the_device_take_their_kinds_kernel_latency():
    # A reduce-scatter on the device: its kind's latency in a graph where the
    # profile measured it (graph_collective_us), else the all-reduce's.
    wl = Workload(batch=16, seq_len=256, decode_steps=4)
    spec = SMALL.replace(d_model=512, n_heads=8, head_dim=64, d_ff=2048)
    by_kind = Cluster.from_dict(_round_dict(graph_latency_us=10,
                                            graph_collective_us={"reduce_scatter": 25},
                                            **ROUND_HOST))
    plain = Cluster.from_dict(_round_dict(graph_latency_us=10, **ROUND_HOST))
    assert by_kind.collective_kernel_s("reduce_scatter") == pytest.approx(25e-6)
    assert by_kind.collective_kernel_s("all_gather") == pytest.approx(10e-6)
    assert by_kind.collective_kernel_s("all_gather") == plain.collective_kernel_s("all_gather")
    a, b = (predict(spec, wl, "helix:1x2", c, 2).decode.comms for c in (by_kind, plain))
    rs = a["reduce_scatter/slice"]
    assert rs.seconds - b["reduce_scatter/slice"].seconds == pytest.approx(rs.calls * 15e-6)
    assert a["all_gather/slice"].seconds == b["all_gather/slice"].seconds
