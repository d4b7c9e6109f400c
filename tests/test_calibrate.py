"""calibrate end to end on CPU (gloo, 2 ranks, quick sizes), and its fit of
latency and bus bandwidth from timings."""
import json

import pytest

from shardwise.perf.calibrate import calibrate, link_profile
from shardwise.perf.clusters import load_cluster
from shardwise.perf.links import COLLECTIVES
from shardwise.perf.costmodel import predict
from shardwise.presets import get_preset
from shardwise.spec import ShardwiseError


def test_link_profile_recovers_alpha_and_beta():
    # Synthetic alpha-beta timings: 20 us + 2(n-1)/n x S / 100 GB/s on 4 ranks.
    alpha, bw, f = 20e-6, 100e9, 2 * 3 / 4
    sizes = [2**13 * 4**k for k in range(8)]
    c = link_profile("all_reduce", [[s, alpha + f * s / bw] for s in sizes], 4)
    # The latency is the smallest message's time (8 KB adds 0.12 us to alpha).
    assert c["latency_us"] == pytest.approx(20.0, rel=0.01)
    big = [b for s, b in c["table"] if s >= 2**20]
    assert big and all(b == pytest.approx(100.0, rel=0.01) for b in big)


def test_calibrate_on_cpu_writes_a_profile_the_cost_model_loads(tmp_path):
    out = tmp_path / "cpu.json"
    profile = calibrate(str(out), nproc=2, device="cpu", quick=True, deadline_s=240)
    on_disk = json.loads(out.read_text())
    assert on_disk == profile
    assert profile["source"]["summary"].startswith("calibrated on cpu")
    assert profile["gpus_per_node"] == 2 and profile["nodes"] == 1
    cl = load_cluster(str(out))
    assert cl.matmul_rate("fp32") > 0 and cl.hbm_rate > 0 and cl.launch_us > 0
    # The GEMM grid (quick: 2 x 2 x 2 shapes), which the cost model reads.
    from shardwise.perf.calibrate import QUICK_GRID

    grid = profile["gemm_grid"]["fp32"]
    assert {a: tuple(grid[a]) for a in "mkn"} == QUICK_GRID
    assert all(v > 0 for plane in grid["tflops"] for row in plane for v in row)
    assert cl.gemm_rate("float32", 64, 64, 16) == pytest.approx(grid["tflops"][0][0][0] * 1e12)
    # The host side of eager work, measured on every rank, the slowest kept.
    host = profile["measurements"]["host_per_rank"]
    for key in ("op_us", "view_us", "module_us", "sync_us", "launch_us", "step_host_ratio"):
        assert len(host[key]) == 2 and profile[key] == pytest.approx(max(host[key]), abs=1e-3)
    assert cl.op_s > 0 and cl.view_s > 0 and cl.sync_s > 0 and cl.step_host >= 1
    # GEMM and attention calls (per phase), each timed on its own.
    for key, value in (("gemm_us", profile["gemm_us"]),
                       ("attn_prefill_us", profile["attn_us"]["prefill"]),
                       ("attn_decode_us", profile["attn_us"]["decode"]),
                       ("norm_us", profile["norm_us"])):
        assert len(host[key]) == 2 and value == pytest.approx(max(host[key]), abs=1e-3)
    assert cl.gemm_s > 0 and cl.attn_s(False) > 0 and cl.attn_s(True) > 0 and cl.norm_s > 0
    assert set(profile["collective_us"]) == set(COLLECTIVES)
    assert all(v > 0 for v in profile["collective_us"].values())
    # The eager layer probe's calls, counted as the cost model counts them.
    calls = profile["measurements"]["layer_probe"]["calls"]
    assert calls["kernels"] > 0 and calls["modules"] > 0
    assert set(cl.links["nvlink"]) == set(COLLECTIVES)
    for op, link in cl.links["nvlink"].items():
        assert link.latency_us > 0 and link.busbw(1e6) > 0, op
    # Measured timings back every figure.
    assert len(profile["measurements"]["collectives_seconds"]["all_reduce"]) == 3
    tiny = get_preset("tiny-dense")
    pred = predict(tiny.model, tiny.reduced, "tp_pp:2x1", cl)
    assert pred.prefill.seconds > 0 and pred.prefill.comms["all_reduce/tp"].link == "nvlink"


def test_the_call_counter_sorts_calls_by_kind():
    import torch

    from shardwise.perf.counting import CallCounter, CudaPaths

    x = torch.ones(4, 8)
    lin = torch.nn.Linear(8, 8)
    with torch.inference_mode(), CallCounter(names=True) as c:
        y = lin(x)  # a module call and a kernel
        y.view(-1)  # a view: no kernel
        y.transpose(0, 1).reshape(-1)  # a view, then a copy (a kernel)
        torch.empty_like(y)  # an allocation: no kernel
        torch.nonzero(y > 0)  # a compare (kernel), then a read the host waits for
        y.cpu()  # a no-op on CPU, but a device-to-host copy in a GPU run
    assert c.counts["modules"] == 1
    assert c.counts["kernels"] == 3 and c.counts["metas"] == 3 and c.counts["syncs"] == 2
    # Along the GPU branches, the code's `is_cuda` tests pass and CUDA-only kernels
    # run on CPU: attention with its log-sum-exp is one fused kernel call.
    from shardwise.parallel.lse import attend_lse

    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    with torch.inference_mode(), CudaPaths():
        assert x.is_cuda
        with CallCounter(names=True) as c:
            o, lse = attend_lse(q, q, q)
    assert not x.is_cuda
    fused = [n for kind, n in c.names if kind == "kernels"]
    assert len(fused) == 1 and fused[0].startswith("_scaled_dot_product_")
    assert o.shape == q.shape and lse.shape == (1, 2, 3)


def test_call_counter_counts_a_real_triton_launch(monkeypatch):
    # On GPUs Triton kernels launch past the dispatcher; the counter wraps every
    # kernel loaded while it counts, so each launch is one Triton call, as
    # CudaPaths' CPU stand-ins count on CPU. Here a fake kernel stands for one.
    from shardwise.model import kernels
    from shardwise.perf.counting import CallCounter

    launched = []

    class Fake:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append(grid)

    monkeypatch.setitem(kernels._LOADED, ("m", "k"), ("triton", Fake()))
    with CallCounter() as c:
        kernels.triton_kernel("m", "k")[1][(4,)](1, 2)
        kernels.triton_kernel("m", "k")[1][(4,)](1, 2)
    assert launched == [(4,), (4,)]
    assert c.counts["tritons"] == 2 and c.counts["kernels"] == 0
    assert isinstance(kernels.triton_kernel("m", "k")[1], Fake)  # restored
    assert kernels.LOAD_HOOK is None


def test_the_layer_probe_steps_at_an_int_and_at_a_device_tensor_position():
    # calibrate times the probe stack eagerly (host cost) and, on GPUs, its
    # static-shape step replayed in a CUDA graph (graph_layer_us): the step
    # takes its position as a device tensor there, and runs on CPU too.
    import torch

    from shardwise.runtime.hostprobe import probe_stack, probe_spec

    cpu = torch.device("cpu")
    (eager, n), (static, m) = probe_stack(cpu, 2), probe_stack(cpu, 2, static=True)
    assert n == m == 2 and probe_spec(2, "fp32").n_layers == 2
    with torch.inference_mode():
        eager()
        static()


def test_decode_kernel_probes_run_each_kind_at_each_width(monkeypatch):
    # calibrate's per-kind decode kernel probes (GPU only there), driven here on
    # CPU with a replay that runs each body once: every kind at every width,
    # the four GEMM shapes of a layer, a whole layer, and each body really calls
    # its kernel.
    import torch

    from shardwise.perf import graphcost

    monkeypatch.setattr(graphcost, "DECODE_PROBE_WIDTHS", (64, 128))
    calls = []

    def replay_once(body, n):
        body()
        calls.append(n)
        return float(len(calls))

    out = graphcost.decode_kernel_costs(torch.device("cpu"), replay_once)
    assert set(out) == {"norm", "cache_write", "gemm", "layer"}
    assert set(out["norm"]) == set(out["cache_write"]) == set(out["layer"]) == {64, 128}
    assert set(out["gemm"]) == {"64x192", "64x64", "64x256", "256x64",
                                "128x384", "128x128", "128x512", "512x128"}
    # Per width: the norm, the cache write, four GEMMs (20 kernels each), then
    # one step of the 4-layer and the 2-layer stack.
    assert calls == ([20] * 6 + [1, 1]) * 2


def test_gemm_rates_interpolate_the_calibrated_grid():
    # A grid of 2 x 2 x 2 shapes: between its points the rate is linear in the
    # logarithms of m, k and n; past its edges it holds; a shape left out of the
    # grid (null) leaves the others to speak.
    from shardwise.perf.clusters import Cluster

    grid = {"m": [16, 1024], "k": [512, 2048], "n": [512, 2048],
            "tflops": [[[100, 200], [300, 400]], [[500, 600], [700, None]]]}
    base = {"name": "g", "gpus_per_node": 1, "nodes": 1, "matmul_tflops": {"bf16": 800},
            "hbm_gbps": 4000, "hbm_bytes": 10**11, "links": {}}
    cl = Cluster.from_dict({**base, "gemm_grid": {"bf16": grid}})
    assert cl.gemm_rate("bfloat16", 512, 512, 16) == pytest.approx(100e12)
    assert cl.gemm_rate("bfloat16", 512, 2048, 16) == pytest.approx(200e12)
    assert cl.gemm_rate("bfloat16", 512, 1024, 16) == pytest.approx(150e12)  # halfway in log n
    assert cl.gemm_rate("bfloat16", 512, 512, 128) == pytest.approx(300e12)  # halfway in log m
    assert cl.gemm_rate("bfloat16", 512, 512, 1) == pytest.approx(100e12)  # held below
    # The untimed shape: the mean of its three timed neighbours, also past the edges.
    assert cl.gemm_rate("bfloat16", 2048, 2048, 1024) == pytest.approx((400 + 600 + 700) / 3 * 1e12)
    assert cl.gemm_rate("bfloat16", 8192, 8192, 4096) == pytest.approx((400 + 600 + 700) / 3 * 1e12)
    # Near it, the timed corners weighted: halfway in log m at (k, n) = (2048, 2048)
    # the m = 16 corner (400) is all there is.
    assert cl.gemm_rate("bfloat16", 2048, 2048, 128) == pytest.approx(400e12)
    # A profile without the grid takes its nearest measured shape, or its one figure.
    assert Cluster.from_dict(base).gemm_rate("bfloat16", 512, 512, 16) == pytest.approx(800e12)
    with pytest.raises(ShardwiseError, match="gemm_grid"):
        Cluster.from_dict({**base, "gemm_grid": {"bf16": {**grid, "m": [16]}}})


def test_small_rates_keep_their_digits():
    # A loaded CPU's 16 x 64 x 64 GEMM runs at about 1e-4 TFLOP/s: kept (to
    # four significant digits), never rounded to 0, which no rate may be.
    from shardwise.perf.calibrate import _tflops

    assert _tflops(0.000131072) == 0.0001311 and _tflops(789.7554) == 789.8
