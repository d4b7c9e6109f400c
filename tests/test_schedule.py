"""The cost model's two strategy-free parts on events made by hand: what one
event costs on a profile (perf/costs.py), and the one schedule that plays
every rank's events (perf/schedule.py). Every figure is computable by hand."""
import pytest

from shardwise.perf.clusters import Cluster
from shardwise.perf.costs import Costs, device_time
from shardwise.perf.schedule import play
from shardwise.perf.events import Call, Coll, Kernel, Repeat, Wait

COLLS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
ROUND = Cluster.from_dict({
    "name": "round", "gpus_per_node": 2, "nodes": 1, "matmul_tflops": {"bf16": 800},
    "attention_tflops": {"dtype": "bf16", "head_dim<=256": 600, "head_dim>256": 100},
    "hbm_gbps": 4000, "hbm_bytes": 10**11, "l2_bytes": 50 * 2**20, "launch_us": 10,
    "op_us": 10, "view_us": 2, "module_us": 3, "sync_us": 20, "gemm_us": 40,
    "attn_us": {"prefill": 100, "decode": 30}, "norm_us": 25,
    "collective_us": {op: 30 for op in COLLS},
    "links": {"nvlink": {op: {"latency_us": 50, "busbw_gbps": 400} for op in COLLS}}})


class Fixed:
    """Costs of hand-made events: a call's host and device seconds by its name
    (``"h/g"``), a collective's device seconds by its axis."""

    host = {"sync": 0.5}

    def __init__(self):
        self.segments = {}  # the schedule's, as Costs holds them

    def call(self, c):
        h, g = (float(x) for x in c.name.split("/"))
        return h, ((g,) if g else ()), "op"  # every call one host kind, "op"

    def coll(self, c, rank):
        return 0.0, [float(c.axis)] * max(1, len(c.sends)), "nvlink"


def op(h, g, kind="kernels"):
    return Call(kind, f"{h}/{g}", (Kernel("copy", 0.0, 0.0),) if g else ())


def test_the_host_issues_and_the_device_runs_behind_it():
    # Three calls of 1 s host, 2 s device: the device starts each when issued
    # and free: 3, 5, 7. A read then stops the host until the device is done
    # (7) and costs 0.5; the next kernel is issued at 8.5, ends at 9.5.
    (t,) = play([[op(1, 2), op(1, 2), op(1, 2), op(0, 0, "syncs"), op(1, 1)]], Fixed(), 1.0)
    assert t.compute == pytest.approx(9.5) and t.host == pytest.approx(8.5)
    assert t.syncs == 1 and t.compute_s == pytest.approx(7) and t.host_s == pytest.approx(4)
    # Host-bound: 2 s of host per 1 s kernel, the device waits for each.
    (t,) = play([[op(2, 1)] * 3], Fixed(), 1.0)
    assert t.end == pytest.approx(7)


def test_a_collective_waits_for_its_slowest_rank():
    # Rank 0 computes 1 s, rank 1 3 s, then a blocking 2 s all-reduce: both
    # end at 5.
    ar = Coll("all_reduce", "2", (0, 1), 64)
    t0, t1 = play([[op(0, 1), ar], [op(0, 3), ar]], Fixed(), 1.0)
    assert t0.compute == t1.compute == pytest.approx(5)


def test_an_asynchronous_collective_hides_behind_compute_as_the_profile_says():
    # A 2 s all-reduce issued asynchronously beside 3 s of kernels, then
    # waited: hidden (3 s) when the overlap is complete; with efficiency 0.6
    # the kernels lose 0.4 of the 2 s they share with it (3.8 s).
    ar, wait = Coll("all_reduce", "2", (0, 1), 64, handle=1), Wait(1)
    steps = [[ar, op(0, 3), wait]] * 2
    assert play(steps, Fixed(), 1.0)[0].end == pytest.approx(3)
    assert play(steps, Fixed(), 0.6)[0].end == pytest.approx(3.8)


def test_a_pipeline_fills_and_drains():
    # 2 stages, 4 micro-batches of 1 s each, 0.5 s on the wire. Stage 0 sends
    # micro-batch i at i + 1. Stage 1 posts each receive after the kernels
    # already issued (NCCL orders its stream after the current one), so its
    # transfer starts when stage 1 is free: arrivals 1.5, 3, 4.5, 6, each
    # computed 1 s: the last ends at 7, having waited 1.5 s for the first and
    # 0.5 s for each of the others.
    def stage0(mb):
        return [op(0, 1), Coll("p2p", "0.5", (), 8, handle=mb, sends=((1, 8),))]

    def stage1(mb):
        return [Coll("p2p", "0.5", (), 0, handle=mb, recvs=((0, 8),)), Wait(mb), op(0, 1)]

    flat = play([[e for i in range(4) for e in stage0(i)], [e for i in range(4) for e in stage1(i)]],
                Fixed(), 1.0)
    assert flat[1].end == pytest.approx(7.0)
    assert flat[1].bubble_s == pytest.approx(1.5 + 3 * 0.5)
    # Played as a repeat (a micro-batch loop recorded once), it ends the same.
    loop = play([stage0(0) + [Repeat(stage0(1), 3)], stage1(0) + [Repeat(stage1(1), 3)]],
                Fixed(), 1.0)
    assert loop[1].end == pytest.approx(7.0) and loop[0].end == pytest.approx(flat[0].end)


def test_a_layer_loop_is_played_as_its_steady_state():
    # A body of 1 s host, 2 s device, taken 10 times: the device's 20 s after
    # the first issue; two iterations played, eight extrapolated.
    (t,) = play([[Repeat([op(1, 2)], 10)]], Fixed(), 1.0)
    assert t.compute == pytest.approx(21) and t.compute_s == pytest.approx(20)
    assert t.calls["op"] == 10


def test_host_calls_cost_their_kinds_figures():
    c = Costs(ROUND, graph=False, decoding=True, derate=1.0)
    assert c.call(Call("kernels", "linear"))[0] == pytest.approx(40e-6)
    assert c.call(Call("kernels", "scaled_dot_product_attention"))[0] == pytest.approx(30e-6)
    assert c.call(Call("kernels", "add"))[0] == pytest.approx(10e-6)
    assert c.call(Call("metas", "view"))[0] == pytest.approx(2e-6)
    assert c.call(Call("modules", "Linear"))[0] == pytest.approx(3e-6)
    assert c.call(Call("tritons", "add_norm_kernel"))[0] == pytest.approx(25e-6)
    prefill = Costs(ROUND, graph=False, decoding=False, derate=1.0)
    assert prefill.call(Call("kernels", "scaled_dot_product_attention"))[0] == pytest.approx(100e-6)
    graph = Costs(ROUND, graph=True, decoding=True, derate=1.0)
    assert graph.call(Call("kernels", "linear"))[0] == 0.0  # a CUDA graph has no host
    # A step started from a wait takes step_host_ratio x the back-to-back figures.
    slow = _with(step_host_ratio=1.5)
    assert Costs(slow, False, True, 1.0).call(Call("kernels", "add"))[0] == pytest.approx(15e-6)


def _with(**extra) -> Cluster:
    d = {"name": "round", "gpus_per_node": 2, "nodes": 1, "matmul_tflops": {"bf16": 800},
         "attention_tflops": {"dtype": "bf16", "head_dim<=256": 600, "head_dim>256": 100},
         "hbm_gbps": 4000, "hbm_bytes": 10**11, "l2_bytes": 50 * 2**20, "launch_us": 10,
         "op_us": 10, "links": {"nvlink": {op: {"latency_us": 50, "busbw_gbps": 400}
                                           for op in COLLS}}}
    d.update(extra)
    return Cluster.from_dict(d)


def test_kernels_take_their_rooflines_and_a_launch():
    c = Costs(ROUND, graph=False, decoding=False, derate=1.0)
    # A compute-bound GEMM at the profile's rate, plus the smallest GEMM's time.
    flops = 2 * 8192 * 4096 * 4096
    g = Kernel("gemm", flops, 1e6, (1, 8192, 4096, 4096), "bfloat16")
    assert c.kernel(g) == pytest.approx(flops / 800e12 + ROUND.gemm_kernel_s)
    # An elementwise pass at the copy rate, plus a kernel's launch.
    assert c.kernel(Kernel("copy", 0, 4e9, ())) == pytest.approx(1e-3 + ROUND.kernel_s)
    # Compute rates follow the duty derate; bandwidths do not.
    half = Costs(ROUND, False, False, 0.5)
    assert half.kernel(g) == pytest.approx(2 * flops / 800e12 + ROUND.gemm_kernel_s)


def test_decode_attention_computes_a_whole_query_tile():
    # FA2 computes 128 query rows for the one real one: 4 x 16 seqs x 32 heads x
    # 128 dims x 128 rows x 4096 keys = 137 GFLOP at 330 TFLOP/s = 416 us, more
    # than reading the 1.07 GB of K and V at the 4 TB/s copy rate (268 us).
    c = Costs(ROUND, graph=False, decoding=True, derate=1.0)
    flops = 4 * 16 * 32 * 128 * 4096
    kv = 2 * 16 * 32 * 4096 * 128 * 2
    flash = Kernel("attention", flops, kv, ("flash", 16, 32, 1, 4096, 128, False, False),
                   "bfloat16")
    assert c.attention(flash) == pytest.approx(flops * 128 / 330e12)
    # The memory-efficient kernel computes 64 rows at the SDPA rate: bound by the read.
    eff = Kernel("attention", flops, kv, ("efficient", 16, 32, 1, 4096, 128, False, True),
                 "bfloat16")
    assert c.attention(eff) == pytest.approx(kv / 4000e9)
    # Prefill (many queries): the FLOPs at the kernel's rate.
    pre = Kernel("attention", 1e15, 1e9, ("cudnn", 8, 32, 8192, 8192, 128, True, False),
                 "bfloat16")
    assert c.attention(pre) == pytest.approx(1e15 / 600e12)


def test_collectives_cost_alpha_beta_on_their_link():
    c = Costs(ROUND, graph=False, decoding=False, derate=1.0)
    ar = Coll("all_reduce", "tp", (0, 1), 64 * 10**6)
    host, (dev,), link = c.coll(ar, 0)
    t = 50e-6 + 1.0 * 64e6 / 400e9  # factor 2(n-1)/n = 1 for two ranks
    assert link == "nvlink" and host == pytest.approx(30e-6)
    assert dev == pytest.approx(device_time(ROUND, t, "all_reduce", "nvlink"))
    # On the device: the kernel's latency in a graph (10 us by default) and the wire.
    assert dev == pytest.approx(10e-6 + 64e6 / 400e9)
    graph = Costs(ROUND, graph=True, decoding=True, derate=1.0)
    assert graph.coll(ar, 0)[0] == 0.0 and graph.coll(ar, 0)[1] == [dev]
    # The one-kernel all-reduce + add + norm: a Triton launch on the host.
    fused = Coll("all_reduce", "tp", (0, 1), 1024, fused=True)
    assert c.coll(fused, 0)[0] == pytest.approx(ROUND.norm_s)


def test_runs_of_hops_of_other_lengths_pair_like_the_loop_they_stand_for():
    # A two-rank ring of six exchanges: rank 0 records them as a run of one
    # hop and a run of five, rank 1 as five and one (a ring's hops of one
    # block shape, of lengths that differ by rank). Played (``every``), each
    # exchange pairs with the peer's and the step ends as the flat loop does;
    # extrapolated like a layer loop, the ranks would wait for transfers the
    # skipped iterations stand for.
    def hop(rank, i, work):
        peer = 1 - rank
        return [Coll("p2p", "0.5", (), 8, handle=i, sends=((peer, 8),), recvs=((peer, 8),)),
                op(0, work), Wait(i)]

    def ranks(group):
        out = []
        for rank, runs in enumerate(group):
            events, i = [], 0
            for n, work in runs:
                events += hop(rank, i, work)
                if n > 1:
                    events.append(Repeat(hop(rank, i + 1, work), n - 1, every=True))
                i += 2
            out.append(events)
        return out

    flat = play([[e for i, w in enumerate(ws) for e in hop(r, i, w)]
                 for r, ws in enumerate([[1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 2]])], Fixed(), 1.0)
    runs = play(ranks([[(1, 1), (5, 2)], [(5, 1), (1, 2)]]), Fixed(), 1.0)
    assert [t.end for t in runs] == pytest.approx([t.end for t in flat])
    # Rank 0's kernels, 1 + 5 x 2 s, each hop's 0.5 s transfer under them.
    assert runs[0].end == pytest.approx(11.0)
    assert runs[0].calls["p2p"] == runs[1].calls["p2p"] == 6
