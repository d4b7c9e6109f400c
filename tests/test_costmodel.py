"""The cost model's predictions: FLOPs, bytes and collectives from the
recorded code against hand computation, the profile's figures where they
apply, memory and fit verdicts, and fidelity's bookkeeping. (What the
recorder counts is held to real runs in test_trace.py; the schedule and the
per-event costs on hand-made events in test_schedule.py.)"""
import dataclasses

import pytest

from shardwise.perf.clusters import Cluster, load_cluster
from shardwise.perf.links import LinkCost, bus_factor
from shardwise.perf.costmodel import predict
from shardwise.perf.costs import fmt_bytes
from shardwise.perf.record import record_rank
from shardwise.perf.reproduce import (fidelity_summary, measured_balance, prompt_graphed,
                                      record_decode_steps)
from shardwise.perf.events import expand
from shardwise.presets import get_preset
from shardwise.spec import ModelSpec, Plan, ShardwiseError, Workload

H100_16 = load_cluster("h100-sxm-16")
H100_8 = load_cluster("h100-sxm-8")
COLLS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
# A one-node profile with round numbers (no size tables), so every term is hand-computable:
# 10 us an op that launches a kernel, 2 a view, 3 a module call, 20 a device-to-host read,
# 30 an eager collective call.
ROUND_HOST = {"op_us": 10, "view_us": 2, "module_us": 3, "sync_us": 20,
              "collective_us": {op: 30 for op in COLLS}}


def _round_dict(**extra):
    return {"name": "round", "gpus_per_node": 2, "nodes": 1, "matmul_tflops": {"bf16": 800},
            "attention_tflops": {"dtype": "bf16", "head_dim<=256": 600, "head_dim>256": 100},
            "hbm_gbps": 4000, "hbm_bytes": 10**11, "l2_bytes": 50 * 2**20, "launch_us": 10,
            "links": {"nvlink": {op: {"latency_us": 50, "busbw_gbps": 400} for op in COLLS}},
            **extra}


ROUND = Cluster.from_dict(_round_dict(**ROUND_HOST))
SMALL = ModelSpec(name="small", n_layers=2, d_model=256, n_heads=4, head_dim=64, d_ff=1024,
                  dtype="bf16")


def _kernels(spec, wl, plan, world, phase, cls, rank=0):
    """The recorded kernels of class ``cls`` in one step of a rank, with their counts."""
    rec = record_rank(spec, wl, Plan.parse(plan), world, rank)
    return [(k, n) for e, n in expand(rec.steps[phase].events)
            for k in getattr(e, "kernels", ()) if k.cls == cls]


def test_flop_and_byte_counts_seed_helix_4l_tp_pp():
    # seed-helix-4l: 4 layers, D 4096, 32 heads x 128, d_ff 16384, fp16; batch 128, T 10000.
    # tp_pp:8x2: a rank holds 2 layers, 32/8 = 4 heads (q, k and v), 16384/8 = 2048 of d_ff.
    p = get_preset("seed-helix-4l")
    pred = predict(p.model, p.workload, "tp_pp:8x2", H100_16)
    ops = pred.prefill.ops
    tokens = 128 * 10000
    # GEMMs, per layer: QKV 2 x tokens x D x (4 + 4 + 4) x 128, W_o 2 x tokens x 512 x D,
    # the MLP's two 2 x tokens x D x 2048; 2 layers.
    per_layer = 2 * tokens * 4096 * 1536 + 2 * tokens * 512 * 4096 + 2 * 2 * tokens * 4096 * 2048
    assert ops["gemm"].flops == pytest.approx(2 * per_layer)
    # Causal core: 4 x B x heads x d x T(T+1)/2 (= 50,005,000 pairs), 2 layers = 2.6218e13.
    assert ops["attention"].flops == pytest.approx(4 * 128 * 4 * 128 * 50_005_000 * 2)
    # Two all-reduces a layer of the [B, T, D] fp16 partial sum (10.49 GB each), each
    # in the two chunks of the overlapped prefill: 8 calls.
    ar = pred.prefill.comms["all_reduce/tp"]
    assert (ar.calls, ar.bytes) == (8, 4 * tokens * 4096 * 2)
    # An eager decode step reads the rank's whole KV cache for its 4 kv heads at
    # context 10001 (2 x 128 x 4 x 10001 x 128 x 2 B = 2.62 GB a layer) plus q,
    # and writes the split-key kernel's float32 partial o and lse (one split: 128 x 4
    # rows already give the grid its programs); their merge is the merge kernel's.
    att = predict(p.model, p.workload, "tp_pp:8x2", H100_16, graphs=False).decode.ops["attention"]
    assert att.bytes == 2 * (2 * 128 * 4 * 10001 * 128 * 2 + 128 * 4 * 128 * (2 + 4)
                             + 128 * 4 * 4)
    assert att.flops == 2 * 4 * 128 * 4 * 128 * 10001


def test_expert_work_of_seed_moe_16l_ep16():
    # seed-moe-16l: 16 experts of 2 x 4096 x 16384, top-2, bf16; ep:16: one expert a rank,
    # 8 sequences each. Every routed row is computed once: over the ranks, the experts'
    # GEMMs hold 2 x 2 x tokens x 2 x D x F FLOPs a layer; the routing the recorder
    # draws spreads them evenly, so every rank computes its share (give or take
    # the rows by which a share rounds: 0.2% here).
    p = get_preset("seed-moe-16l")
    wl = p.workload.replace(batch=32, seq_len=2048)
    spec, D, F, L = p.model, 4096, 16384, 16
    tokens = 32 * 2048
    experts = sum(k.flops * n for r in range(16)
                  for k, n in _kernels(spec, wl, "ep:16", 16, "prefill", "gemm", r)
                  if k.dims[2:] in ((D, F), (F, D)))
    assert experts == pytest.approx(L * 2 * 2 * tokens * 2 * D * F)
    pred = predict(spec, wl, "ep:16", H100_16)
    attn = L * (2 * 2048 * 2 * D * 4 * D)  # 2 sequences: QKV and W_o, 4 D^2 weights
    router = L * 2 * 2 * 2048 * D * 16
    mean = experts / 16 + attn + router
    assert pred.prefill.ops["gemm"].flops == pytest.approx(mean, rel=5e-3)


def test_head_dim_512_runs_at_the_slower_attention_rate():
    # seed-ring-4l has head_dim 512: no flash kernel, the profile's head_dim>256 rate
    # (a fifth of the head_dim<=256 one on H100). Without the profile's figure for
    # shardwise's own wide kernel (test_flash.py) and its sustained-clock derating, so
    # that the rate is the only term.
    p = get_preset("seed-ring-4l")
    cl = dataclasses.replace(H100_16, wide_attention_tflops={}, sustained_matmul_tflops=None)
    pred = predict(p.model, p.workload.replace(batch=16), "tp_pp:16x1", cl)
    att = pred.prefill.ops["attention"]
    rate = cl.attention_rate(512, p.model.dtype)
    assert rate < cl.attention_rate(128, p.model.dtype) / 2
    assert att.seconds == pytest.approx(att.flops / rate, rel=1e-3)
    assert att.seconds > att.bytes / cl.hbm_rate  # compute-bound, so the rate is what counts


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
    p = get_preset("seed-helix-4l")
    one = predict(p.model, p.workload, "tp_pp:8x2", H100_16)
    four = predict(p.model, p.workload, "tp_pp:8x2,mb=4", H100_16)
    assert four.prefill.seconds < one.prefill.seconds  # the fill hides more work
    assert one.prefill.bubble_s > four.prefill.bubble_s > 0


def test_infeasible_plans_name_the_reason():
    # seed-ring-4l at batch 2048: 2 (K, V) x 4 layers x 2048 x 10004 x 8192 x 2 B = 2.685 TB
    # of KV cache, more than 16 GPUs hold (the seed's batch of 1024, 1.343 TB, fits 16 x
    # the calibrated H100's 85.0 GB in aggregate and fails on one rank's activations).
    p = get_preset("seed-ring-4l")
    wl = p.workload.replace(batch=2048)
    hbm = fmt_bytes(H100_16.hbm_bytes)
    for plan, kv in (("tp_pp:8x2", "2.69 TB"), ("ring:16", "2.69 TB")):
        pred = predict(p.model, wl, plan, H100_16)
        assert not pred.fits
        assert sum(pred.kv_per_rank) > 16 * H100_16.hbm_bytes
        assert pred.reason == f"KV cache {kv} > 16 x {hbm}"
    # ring keeps one spare slot a rank (where a static decode step writes what it does not keep).
    assert sum(pred.kv_per_rank) == 2 * 4 * 2048 * (10004 + 16) * 8192 * 2
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


# -- grouped K/V past the KV heads ------------------------------------------------------

# 2 kv heads: four ranks hold each one twice.
GQA = ModelSpec(name="gqa", n_layers=2, d_model=48, n_heads=4, head_dim=8, d_ff=96,
                n_kv_heads=2, dtype="fp32", norm="rmsnorm", activation="swiglu", vocab_size=37)
GQA_WL = Workload(batch=3, seq_len=7, decode_steps=3)


def test_replicated_kv_heads_cost_their_memory():
    # Four ranks over GQA's 2 kv heads: each rank caches one whole kv head, half
    # the model's cache where an even split would hold a quarter. The recorded
    # ranks allocate that (test_trace.py holds it to real runs) and predict's
    # notes name the replication the strategy reports.
    whole = GQA.n_layers * 2 * GQA_WL.batch * GQA.kv_heads * GQA_WL.max_len * GQA.head_dim * 4
    for plan in ("tp_pp:4x1", "helix:4x1"):
        pred = predict(GQA, GQA_WL, plan, H100_8, 4)
        assert pred.kv_per_rank == [whole // 2] * 4
        assert any("replicated on 2" in n for n in pred.notes), pred.notes


def test_memory_is_what_the_ranks_allocate():
    p = get_preset("seed-moe-16l")
    pred = predict(p.model, p.workload, "ep:16", H100_16)
    m = pred.memory
    assert m.total == m.weights + m.kv_cache + m.activations + m.comm_buffers
    # ep:16: attention (4 x 4096^2) + one expert (2 x 4096 x 16384) + router (16 x 4096)
    # + 2 LayerNorms (4 x 4096) a layer, 16 layers, + final norm (2 x 4096); bf16.
    per_layer = 4 * 4096**2 + 2 * 4096 * 16384 + 16 * 4096 + 4 * 4096
    assert pred.weights_per_rank == [(16 * per_layer + 2 * 4096) * 2] * 16
    assert pred.kv_per_rank == [16 * 2 * 8 * 32 * 10004 * 128 * 2] * 16
    # Activations: the step's own tensors at their peak and the inputs, at
    # least the prompt rows each rank is handed (its share of the batch under
    # ep's data-parallel attention, one micro-batch: 8 x 10000 x D).
    assert m.activations >= 8 * 10000 * 4096 * 2
    # tp_pp on GPUs keeps symmetric-memory buffers for its small all-reduces.
    tp = predict(SMALL, Workload(batch=4, seq_len=64, decode_steps=2), "tp_pp:2x1", ROUND, 2)
    assert tp.memory.comm_buffers > 0


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


def test_kv_write_and_graph_vs_eager_decode():
    # tp_pp:1x1, batch 2, prompt 100, cache sized for 10 more positions (max_len 110).
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    eager = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=False).decode
    graph = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=True).decode
    e = 2
    kv = lambda S: 2 * 2 * S * 4 * 64 * e  # K and V, 2 seqs x 4 heads x 64 dims  # noqa: E731
    # q read, the split-key kernel's float32 partial o and lse written (one
    # split); the merge kernel merges them.
    rows = 2 * 4
    q_o = rows * 64 * e + rows * 64 * 4 + rows * 4
    # Eager reads the cache up to the position (101); the graph's static path all 110.
    assert eager.ops["attention"].bytes == 2 * (kv(101) + q_o)
    assert graph.ops["attention"].bytes >= 2 * (kv(110) + q_o)
    # The new token's K and V copied into the cache: read + write of 2 seqs x 2 x 4 x 64.
    assert graph.ops["index_write"].bytes == 2 * 2 * (2 * 2 * 4 * 64 * e)
    # In a graph: no host; one rank, nothing to wait for: the step is its kernels.
    assert graph.host_s == 0 and graph.seconds == pytest.approx(graph.compute_s)
    # Eager, tiny layers: host-bound, the step is its host calls and the last kernel.
    assert eager.host_s > eager.compute_s
    assert eager.host_s < eager.seconds < eager.host_s + 5e-6
    figure = {"op": 10, "view": 2, "module": 3, "gemm": 10, "attn": 10, "triton": 10}
    assert eager.host_s == pytest.approx(1e-6 * sum(figure[k] * n for k, n in eager.calls.items()))


def test_collectives_pay_the_host_call_eagerly_and_the_kernel_latency_on_the_device():
    # tp_pp:2x1 decode of batch 2 in float32 (no fused all-reduce + norm): two
    # all-reduces a layer and one more at the end (the last MLP's) of 2 x 256 x 4 B
    # = 2048 B. On the device each takes the wire time (factor 2(n-1)/n = 1 for
    # two ranks) after the collective kernel's latency (10 us by default);
    # eagerly the host also pays the call (30 us).
    spec = SMALL.replace(dtype="fp32")
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    eager = predict(spec, wl, "tp_pp:2x1", ROUND, 2, graphs=False).decode
    wire = 1.0 * 2048 / 400e9
    ar = eager.comms["all_reduce/tp"]
    assert ar.calls == 2 * spec.n_layers and ar.bytes == 2048 * ar.calls
    assert ar.seconds == pytest.approx(ar.calls * (10e-6 + wire))
    assert eager.calls["all_reduce"] == ar.calls
    # bf16 on GPUs: each all-reduce, add and norm is one kernel, costed as the collective.
    graph = predict(SMALL, wl, "tp_pp:2x1", ROUND, 2).decode
    assert graph.comms["all_reduce/tp"].seconds == pytest.approx(
        ar.calls * (10e-6 + wire / 2))


def test_moe_reference_waits_for_the_device_once_a_layer():
    # The reference MoE reads the row counts of the experts it holds to the host
    # when a call has more than 64 tokens, once a layer: the host waits.
    # tp_pp:2x1 on 4 experts: 2 a rank, 2 layers.
    spec = get_preset("tiny-moe").model.replace(dtype="bf16")
    wl = Workload(batch=4, seq_len=32, decode_steps=2)
    pred = predict(spec, wl, "tp_pp:2x1", ROUND, 2)
    assert pred.prefill.syncs == spec.n_layers
    # Decode (4 tokens): every held expert on every token, no wait.
    assert pred.decode.syncs == 0


def test_a_prompt_without_host_waits_is_priced_as_a_graph():
    # bench replays a prompt's step from a CUDA graph where no rank's step waits
    # on the device (runtime.timing.prefill_graph); the model prices it so: no
    # host time, the step its kernels. A prompt that reads its expert counts to
    # the host (tp_pp:2x1 on tiny-moe, above) runs eagerly, as does every prompt
    # with prefill_graphs=False (run, verify, and earlier bench records).
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    graph = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1).prefill
    eager = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, prefill_graphs=False).prefill
    off = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=False).prefill
    assert graph.graph and graph.host_s == 0 and graph.syncs == 0
    assert graph.seconds == pytest.approx(graph.compute_s)
    assert not eager.graph and eager.host_s > 0 and eager.seconds > graph.seconds
    assert not off.graph and off.seconds == pytest.approx(eager.seconds)
    moe = get_preset("tiny-moe").model.replace(dtype="bf16")
    waits = predict(moe, Workload(batch=4, seq_len=32, decode_steps=2), "tp_pp:2x1", ROUND,
                    2).prefill
    assert waits.syncs == moe.n_layers and not waits.graph and waits.host_s > 0


def test_a_records_prompt_is_predicted_as_it_ran():
    # Fidelity predicts a prompt as its record says it ran: from a graph only
    # where a bench prefill record says so; run's records and earlier bench
    # records (no such field) timed it eagerly.
    assert prompt_graphed({"phase": "prefill", "cuda_graphs": True})
    assert not prompt_graphed({"phase": "prefill", "cuda_graphs": False})
    assert not prompt_graphed({"phase": "prefill"})
    assert not prompt_graphed({"phase": "decode", "cuda_graphs": True})
    assert not prompt_graphed({"prefill_tokens_per_s": 1.0})


def test_measured_routing_balance_is_an_input():
    # A run's measured balance (ep's rank_load_max_over_mean) skews the routing the
    # recorder draws: the busiest rank computes that much more of the experts' rows.
    p = get_preset("seed-moe-16l")
    wl = Workload(batch=8, seq_len=2048, decode_steps=8)
    spec = p.model.replace(n_layers=2)
    base = predict(spec, wl, "ep:2", ROUND, 2, moe_balance=1.0).prefill.ops["gemm"].flops
    more = predict(spec, wl, "ep:2", ROUND, 2, moe_balance=1.25).prefill.ops["gemm"].flops
    assert 1.15 * base < more < 1.25 * base  # the experts' share of the rank's GEMMs grows
    recs = [{"command": "c", "preset": "seed-moe-16l", "n_layers": 2, "dtype": "bf16",
             "batch": 8, "seq_len": 2048, "n_devices": 2, "plan": "ep:2",
             "report": {"rank_load_max_over_mean": 1.02}},
            {"command": "c", "preset": "seed-moe-16l", "n_layers": 2, "dtype": "bf16",
             "batch": 8, "seq_len": 2048, "n_devices": 2, "plan": "tp_pp:2x1", "report": {}}]
    assert list(measured_balance(recs).values()) == [1.02]


def test_overlap_credits_what_the_profile_measured():
    # ring:2 prefill: each K/V hop runs beside the attention on the block in hand.
    wl = Workload(batch=1, seq_len=16384, decode_steps=1)
    spec = ModelSpec(name="r", n_layers=1, d_model=4096, n_heads=32, head_dim=128, d_ff=16384,
                     dtype="bf16")
    full = predict(spec, wl, "ring:2", ROUND, 2).prefill.seconds
    half = predict(spec, wl, "ring:2", Cluster.from_dict(_round_dict(
        overlap_efficiency=0.5, **ROUND_HOST)), 2).prefill.seconds
    assert half > full
    # tp_pp's chunked prefill hides its all-reduces as far as the profile says.
    spec2 = SMALL.replace(n_layers=4, d_model=2048, n_heads=16, head_dim=128, d_ff=8192)
    wl2 = Workload(batch=8, seq_len=2048, decode_steps=1)
    plain = predict(spec2, wl2, "tp_pp:2x1,overlap=1", ROUND, 2).prefill.seconds
    hidden = predict(spec2, wl2, "tp_pp:2x1", ROUND, 2).prefill.seconds
    none = predict(spec2, wl2, "tp_pp:2x1", Cluster.from_dict(_round_dict(
        overlap_efficiency=0.0, **ROUND_HOST)), 2).prefill.seconds
    assert hidden < plain < none * 1.05


def test_fidelity_verdicts_and_bench_cache_length():
    rows = fidelity_summary({("tp_pp", "decode ms"): [0.05, -0.08, 0.19],
                             ("ring", "prefill tok/s"): [0.05, 0.25],
                             ("helix", "prefill tok/s"): [0.11, 0.12, -0.02]})
    verdict = {(r["strategy"], r["metric"]): r["verdict"] for r in rows}
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
    # Eager: a GEMM's host call costs gemm_us, a Triton launch norm_us and an
    # attention its phase's attn_us instead of op_us (10 in ROUND). In a CUDA
    # graph: the GEMMs and attentions take at least the smallest such kernel's
    # GPU time instead of kernel_us (2 by default). The decode step's two rows
    # are multiplied by a Triton kernel (kernels.linear): launches, no GEMM calls.
    wl = Workload(batch=2, seq_len=100, decode_steps=10)
    kinds = Cluster.from_dict(_round_dict(**ROUND_HOST, gemm_us=40, norm_us=25,
                                          attn_us={"prefill": 100, "decode": 30},
                                          gemm_kernel_us=5, attn_kernel_us=8))
    for phase, attn_us in (("prefill", 100), ("decode", 30)):
        base = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=False).step(phase)
        more = predict(SMALL, wl, "tp_pp:1x1", kinds, 1, graphs=False).step(phase)
        calls = base.calls
        assert (calls.get("gemm", 0) > 0) == (phase == "prefill")
        assert more.host_s - base.host_s == pytest.approx(
            1e-6 * (calls.get("gemm", 0) * 30 + calls.get("attn", 0) * (attn_us - 10) + calls["triton"] * 15))
    gemms = sum(n for _, n in _kernels(SMALL, wl, "tp_pp:1x1", 1, "static", "gemm"))
    attns = sum(n for _, n in _kernels(SMALL, wl, "tp_pp:1x1", 1, "static", "attention"))
    base = predict(SMALL, wl, "tp_pp:1x1", ROUND, 1, graphs=True).decode
    more = predict(SMALL, wl, "tp_pp:1x1", kinds, 1, graphs=True).decode
    assert more.seconds - base.seconds == pytest.approx(1e-6 * (gemms * 3 + attns * 6))


def test_host_scale_fits_the_layer_probe():
    # calibrate's layer probe: one real reference layer timed back to back,
    # with its calls counted. Its time over those calls at the per-call
    # figures scales every eager step's host time (never below 1).
    calls = {"kernels": 11, "metas": 12, "modules": 7, "gemms": 4, "attns": 1}
    per_calls = (6 * 10 + 4 * 40 + 1 * 30) + 12 * 2 + 7 * 3  # 295 us
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
    spec = get_preset("tiny-moe").model.replace(dtype="bf16")
    wl = Workload(batch=8, seq_len=16, decode_steps=2)
    for graphs in (None, False):
        pred = predict(spec, wl, "ep:2", ROUND, 2, graphs=graphs)
        dec = pred.decode
        assert set(dec.comms) == {"all_gather/ep", "reduce_scatter/ep"}
        assert dec.comms["all_gather/ep"].bytes == spec.n_layers * 8 * spec.d_model * 2
        assert dec.syncs == 0
        assert (dec.host_s == 0) == (graphs is None) == dec.graph
        assert "all_to_all/ep" in pred.prefill.comms
    big = predict(spec, Workload(batch=80, seq_len=16, decode_steps=2), "ep:2", ROUND, 2)
    assert "all_to_all/ep" in big.decode.comms and big.decode.syncs > 0


def test_compute_rate_follows_the_duty_cycle():
    # Sustained 0.9 of the burst rate. The clock c that a busy share d holds
    # under a cap on average power (power ~ clock^3): d c^3 = 0.9^3, so c =
    # 0.9 / d^(1/3), at most 1. Always busy 0.9; busy 80% 0.9 / 0.928; busy
    # half the step or less, the burst rate.
    from shardwise.perf.costs import duty_derate

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
        assert ratio == pytest.approx(min(1.0, 0.9 / duty ** (1 / 3)), rel=0.05), (plan, duty,
                                                                                  ratio)
        if plan.startswith("layerwise"):
            assert duty == pytest.approx(0.5, abs=0.05)
        else:
            assert duty > 0.8  # busy but for its exposed all-reduces


def test_fidelity_refuses_a_record_of_another_layout():
    # small-l2 at 60 MiB on 2 ranks: the search now picks 2 replicas of the whole
    # model; a record that ran 2 groups x 1 replica is of a plan the code no longer
    # runs, and fidelity says so.
    from shardwise.perf.reproduce import _same_layout

    p = get_preset("small-l2")
    plan = Plan.parse("layerwise:cap=60MiB")
    wl = Workload(batch=4, seq_len=128, decode_steps=4)
    _same_layout({"report": {"groups": [[0, 8]], "replicas": 2}}, p.model, wl, plan, 2)
    with pytest.raises(ShardwiseError, match=r"ran layer groups \[\[0, 4\], \[4, 8\]\]"):
        _same_layout({"report": {"groups": [[0, 4], [4, 8]], "replicas": 1}}, p.model, wl,
                     plan, 2)


def test_peers_are_not_predicted():
    p = get_preset("seed-helix-4l")
    # Before any recording: the hf peer's model code is Hugging Face's, which
    # the recorder does not run (nor would the prediction be shardwise's).
    for peer in ("torch_eager:1", "hf:1"):
        with pytest.raises(ShardwiseError, match="is a peer"):
            predict(p.model, p.reduced, peer, H100_8, 1)


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
    # SMALL (d_model 256) decoding 4 sequences in a CUDA graph: each fused add +
    # norm takes the probe's 2 us (its launch in it), the cache write 2.5 us,
    # each GEMM at least the probes' floor of 3 us; prefill, eager steps and
    # wide batches are as without probes.
    wl = Workload(batch=4, seq_len=128, decode_steps=4)
    cl = Cluster.from_dict(_round_dict(decode_kernels_us=PROBES, **ROUND_HOST))
    base, probed = (predict(SMALL, wl, "tp_pp:1x1", c, 1) for c in (ROUND, cl))
    tritons = _kernels(SMALL, wl, "tp_pp:1x1", 1, "static", "triton")
    norms = sum(n for k, n in tritons if k.dims[0] == "add_norm_kernel")
    # The decode attention (a launch a layer) is an attention kernel; the merge
    # of its splits is one of these, not probed (its bytes and a launch).
    assert {k.dims[0] for k, _ in tritons} == {"add_norm_kernel", "merge_kernel"}
    merges = [(k, n) for k, n in tritons if k.dims[0] == "merge_kernel"]
    assert sum(n for _, n in merges) == SMALL.n_layers
    merge_s = sum(n * (k.bytes / cl.hbm_rate + cl.kernel_s) for k, n in merges)
    attention = _kernels(SMALL, wl, "tp_pp:1x1", 1, "static", "attention")
    assert {k.dims[0] for k, _ in attention} == {"split"}
    assert sum(n for _, n in attention) == SMALL.n_layers
    gemms = sum(n for _, n in _kernels(SMALL, wl, "tp_pp:1x1", 1, "static", "gemm"))
    writes = sum(n for _, n in _kernels(SMALL, wl, "tp_pp:1x1", 1, "static", "index_write"))
    assert norms == 2 * SMALL.n_layers + 1 and writes == SMALL.n_layers
    assert probed.decode.ops["triton"].seconds == pytest.approx(norms * 2e-6 + merge_s)
    assert probed.decode.ops["index_write"].seconds == pytest.approx(writes * 2.5e-6)
    assert probed.decode.ops["gemm"].seconds >= gemms * 3e-6
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


# Plans whose ranks are renamings of fewer recordings, on 16 ranks over two
# nodes: replicas, stages of tensor-parallel ranks, a tp group across both
# nodes, helix's head groups, a ring beside tp, an MoE plan.
HEADS_16 = SMALL.replace(n_heads=16, head_dim=16)
SYMMETRIC = [("dp:4/tp:4", SMALL), ("pp:2/tp:8,mb=2", HEADS_16), ("tp_pp:16x1", HEADS_16),
             ("dp:2/pp:4/helix:2x1,mb=2", SMALL.replace(n_layers=4)),
             ("dp:2/ring:4/tp:2", SMALL), ("ep:4/tp:4", SMALL.replace(n_experts=4, top_k=2))]


@pytest.mark.parametrize("plan,spec", SYMMETRIC, ids=[p for p, _ in SYMMETRIC])
def test_ranks_mapped_onto_each_other_are_played_once(plan, spec):
    # The schedule plays one rank of each orbit of the steps' symmetries
    # (twins.symmetries) and gives the others its times: the same times as
    # playing every rank, field for field; each symmetry maps every rank's
    # steps onto its image's, renamed.
    from shardwise.perf.costs import Costs
    from shardwise.perf.record import record_plan
    from shardwise.perf.recordings import checked, renamed
    from shardwise.perf.schedule import play
    from shardwise.perf.twins import symmetries

    wl, p = Workload(batch=8, seq_len=64, decode_steps=2), Plan.parse(plan)
    _, topo = checked(spec, wl, p, 16)
    traces = record_plan(spec, wl, p, 16, phases=("prefill", "static"))
    sources = [r if t.source is None else t.source for r, t in enumerate(traces)]
    images = symmetries(topo, sources, H100_16.node_of)
    assert images, plan
    for g in images:
        for r in range(16):
            moved = renamed(traces[r], topo, g[r]).steps
            assert {k: s.events for k, s in moved.items()} == {
                k: s.events for k, s in traces[g[r]].steps.items()}, (plan, r)
    for phase, graph in (("prefill", False), ("static", True)):
        steps = [t.steps[phase].events for t in traces]
        costs = Costs(H100_16, graph, phase != "prefill", 1.0)
        assert play(steps, costs, 0.5, images) == play(steps, costs, 0.5), (plan, phase)


def test_a_ring_of_alike_ranks_is_played_as_one():
    # Four ranks, each copying, then sending to the next and receiving from
    # the one before, then waiting for the transfer: under the shifts of the
    # ring, rank 0 alone is played, its transfers paired with its images'.
    from shardwise.perf.costs import Costs
    from shardwise.perf.events import Call, Coll, Kernel, Wait
    from shardwise.perf.schedule import play
    from shardwise.perf.twins import symmetries
    from shardwise.parallel.topology import Topology

    copy = Call("kernels", "copy_", (Kernel("copy", 0.0, 1e8),))
    steps = [[copy, Coll("p2p", "seq", (), 2**20, 1, (((r + 1) % 4, 2**20),),
                         (((r - 1) % 4, 2**20),)), Wait(1), copy] for r in range(4)]
    images = symmetries(Topology(("seq",), (4,)), [0, 0, 0, 0], H100_16.node_of)
    assert sorted(images) == [(1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]
    costs = Costs(H100_16, False, False, 1.0)
    assert play(steps, costs, 1.0, images) == play(steps, costs, 1.0)
