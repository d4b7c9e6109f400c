"""The flash kernel for wide heads (model/flash.py): the kernel against
float64 attention, where shardwise takes it and where it keeps PyTorch's
kernels, its count along the GPU branches, its rate in the cost model, and
ring and helix at head_dim 512 with the kernel in every attention it takes.

Without a GPU the kernel runs in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), on the CPU, in fp16: the interpreter's ``tl.dot``
misreads bf16 operands (Triton 3.6 to 3.9). The GPU benchmark
(scripts/attn-wide.py) checks bf16 and fp16 on the device.
"""
import math
import os

import pytest
import torch
import triton  # the test extra installs it

from helpers import SharedLaunch, assert_verified
from shardwise.model import flash
from shardwise.model.reference import causal_attention
from shardwise.parallel.lse import _attend_math, attend_lse
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, Workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel(monkeypatch):
    """flash's kernel (interpreted on a CPU), counting its launches in ``kernel.launches``."""
    found = flash._kernel()
    assert found, "Triton is needed (pip install -e '.[test]')"

    class Counted:
        launches = 0

        def __getitem__(self, grid):
            Counted.launches += 1
            return found[1][grid]

    counted = Counted()
    monkeypatch.setattr(flash, "_kernel", lambda: (found[0], counted))
    return counted


def reference(q, k, v, q_start, causal):
    """float64 attention of q [B, H, T, d] over k, v [B, Hkv, S, d] and its lse."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    q, k, v = (t.cpu().double() for t in (q, k, v))
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        pos = q_start + torch.arange(T)[:, None]
        s = s.masked_fill(torch.arange(k.shape[2])[None, :] > pos, -math.inf)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def inputs(B, H, Hkv, T, S, d, dtype=torch.float16, seed=0):
    """q as the reference attends it (the Q projection's [B, T, H, d]
    transposed) and K/V as views of a packed cache with spare positions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    kv = torch.randn(B, S + 3, 2, Hkv, d, generator=g).to(DEVICE, dtype)
    return q, kv[:, :S, 0].transpose(1, 2), kv[:, :S, 1].transpose(1, 2)


SMALL = flash.Config(block_m=16, block_n=16, dv=32, warps=4, stages=2)
SPLIT = flash.Config(block_m=16, block_n=16, dv=16, warps=4, stages=2)  # output columns split


# (B, H, Hkv, T, S, d, q_start, causal, config): a causal prefill whose row
# blocks straddle two heads of a group; a chunk at a query offset; keys past
# a ragged last block; one query per head of a group (decode rows); the
# output's columns over two programs; the shipped tiles at both widths.
CASES = [
    (2, 4, 2, 37, 37, 32, 0, True, SMALL),
    (1, 6, 2, 5, 50, 32, 45, True, SMALL),
    (2, 2, 2, 9, 23, 32, 0, False, SMALL),
    (1, 8, 2, 1, 29, 32, 28, True, SMALL),
    (1, 4, 2, 21, 40, 32, 19, True, SPLIT),
    (1, 2, 1, 20, 20, 512, 0, True, None),
    (1, 2, 2, 12, 30, 256, 18, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}T{}S{}d{}q{}{}".format(
    *c[:7], "causal" if c[7] else ""))
def test_kernel_matches_attention(kernel, case):
    # fp16 operands, float32 accumulation, P rounded to fp16 for P V: about
    # 3e-4 of the output in the interpreter; the lse is float32 throughout.
    B, H, Hkv, T, S, d, q_start, causal, config = case
    q, k, v = inputs(B, H, Hkv, T, S, d)
    o, lse = flash.launch((triton, kernel), q, k, v, q_start, causal, None, config)
    want, want_lse = reference(q, k, v, q_start, causal)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.shape == (B, H, T)
    assert lse.dtype == torch.float32 and kernel.launches == 1
    assert ((o.cpu().double() - want).norm() / want.norm()).item() < 2e-3
    assert (lse.cpu().double() - want_lse).abs().max().item() < 1e-4


def test_only_wide_heads_on_gpus_take_it(kernel, monkeypatch):
    q, k, v = inputs(1, 2, 1, 8, 8, 512)
    assert flash.wide_ok(q, k, v)
    assert not flash.wide_ok(q, k, v.float()) and not flash.wide_ok(q.float(), k.float(), v.float())
    assert not flash.wide_ok(q[:, :, :1], k, v)  # one query: PyTorch's decode kernels
    q128, k128, v128 = inputs(1, 2, 1, 8, 8, 128)
    assert not flash.wide_ok(q128, k128, v128)
    q256, k256, v256 = inputs(1, 2, 1, 8, 8, 256)
    assert flash.wide_ok(q256, k256, v256)
    assert not flash.wide_ok(q256, k256, v256, plain_causal=True)  # SDPA's cuDNN is faster
    assert flash.wide_ok(q, k, v, plain_causal=True)
    many = [t.expand(65536, *t.shape[1:]) for t in (q, k, v)]  # more sequences x K/V heads
    assert not flash.wide_ok(*many)  # than a grid's second dimension holds
    monkeypatch.setattr(flash, "_kernel", lambda: False)  # Triton not installed
    assert not flash.wide_ok(q, k, v)


def test_rows_the_copy_engine_cannot_read_are_copied_first(kernel):
    # K off 16-byte alignment, V strided in the head dim (helix gathers K/V
    # over head-dim slices so), Q likewise: the same result as contiguous copies.
    q, k, v = inputs(1, 4, 2, 10, 12, 512)
    odd = torch.empty(k.numel() + 1, device=DEVICE, dtype=k.dtype)[1:].view(k.shape).copy_(k)
    strided = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    q_strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert odd.data_ptr() % 16 and strided.stride(-1) != 1 and q_strided.stride(-1) != 1
    assert flash.wide_ok(q_strided, odd, strided)
    o, lse = flash.attend(q_strided, odd, strided, 2, True)
    want, want_lse = flash.attend(q.contiguous(), k.contiguous(), v.contiguous(), 2, True)
    assert torch.equal(o, want) and torch.equal(lse, want_lse)


def test_cpu_tensors_keep_their_path_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 512, generator=g).half() for _ in range(3))
    assert not flash.wide_ok(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert flash.wide_ok(q, k, v) or not flash._kernel()
    assert not flash.wide_ok(q.bfloat16(), k.bfloat16(), v.bfloat16())  # interpreted: fp16 only


def test_callers_take_it_where_it_is_faster(kernel):
    def sdpa_path(fn):  # the same call with the kernel unavailable: PyTorch's path
        saved = flash._kernel
        flash._kernel = lambda: False
        try:
            return fn()
        finally:
            flash._kernel = saved

    for d, T, S, q_start, taken in [(512, 16, 16, 0, True), (512, 6, 20, 14, True),
                                    (512, 1, 20, 19, False), (256, 16, 16, 0, False),
                                    (256, 6, 20, 14, True), (256, 1, 20, 19, False)]:
        q, k, v = inputs(1, 4, 2, T, S, d, seed=d + T)
        before = kernel.launches
        got = causal_attention(q, k, v, q_start)
        assert kernel.launches - before == taken, (d, T, S, q_start)
        want = sdpa_path(lambda: causal_attention(q, k, v, q_start))
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 2e-3
    # attend_lse: ring's blocks (causal, and a whole earlier block) at both widths.
    for d in (256, 512):
        q, k, v = inputs(1, 4, 2, 12, 12, d, seed=d)
        for causal in (True, False):
            before = kernel.launches
            o, lse = attend_lse(q, k, v, causal=causal)
            assert kernel.launches == before + 1
            want, want_lse = sdpa_path(lambda: attend_lse(q, k, v, causal=causal))
            assert ((o.float() - want.float()).norm() / want.float().norm()) < 2e-3
            assert (lse - want_lse).abs().max() < 1e-4


def test_counted_as_one_kernel_along_the_gpu_branches():
    # counting.CudaPaths runs the GPU branches on CPU: the kernel's stand-in is
    # float32 attention, counted as one Triton launch (what the cost model's
    # host calls count); CallCounter counts a real launch the same way.
    from shardwise.perf.counting import CallCounter, CudaPaths

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 512, generator=g).half()
    k, v = (torch.randn(1, 2, 20, 512, generator=g).half() for _ in range(2))
    want = _attend_math(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                        torch.arange(20)[None, :] <= 8 + torch.arange(12)[:, None],
                        1 / math.sqrt(512), False)
    with torch.inference_mode(), CudaPaths(), CallCounter(names=True) as c:
        o = causal_attention(q, k, v, 8)
    assert c.names.get(("tritons", "flash_fwd_kernel")) == 1 and c.counts["tritons"] == 1
    assert c.counts["attns"] == 0  # no SDPA call
    assert torch.equal(o, want[0])


def test_calibrate_measures_it_where_the_code_takes_it(kernel):
    from shardwise.perf.calibrate import wide_attention_rate

    dev = torch.device(DEVICE)
    assert wide_attention_rate(dev, torch.float16, 512, quick=True) > 0  # interpreted on a CPU
    assert kernel.launches >= 1
    assert wide_attention_rate(dev, torch.float32, 512, quick=True) is None


def test_cost_model_charges_the_measured_rate():
    # The recorder finds the kernel where the code takes it (an attention of
    # backend "wide", with 4 d FLOPs a scored pair and head); the cost model
    # charges calibrate's rate for it, and PyTorch's rates where the profile
    # has none.
    import json
    from importlib import resources

    from shardwise.perf.clusters import Cluster
    from shardwise.perf.costs import Costs
    from shardwise.perf.events import expand
    from shardwise.perf.record import record_rank
    from shardwise.spec import Plan

    profile = json.loads((resources.files("shardwise.perf") / "profiles" / "h100-sxm-8.json")
                         .read_text())
    # Without the profile's figure for the kernel: PyTorch's rates.
    base = Cluster.from_dict({k: v for k, v in profile.items() if k != "wide_attention_tflops"})
    wide = Cluster.from_dict({**profile, "wide_attention_tflops":
                              {"dtype": "bf16", "256": 500.0, "512": 300.0}})
    wl = Workload(batch=2, seq_len=64, decode_steps=2)

    def attentions(spec, plan, world, phase):
        rec = record_rank(spec, wl, Plan.parse(plan), world, 0)
        return [k for e, _ in expand(rec.steps[phase].events)
                for k in getattr(e, "kernels", ()) if k.cls == "attention"]

    for d in (512, 256):
        spec = ModelSpec(name="w", n_layers=2, d_model=1024, n_heads=4, head_dim=d,
                         d_ff=1024, dtype="bf16")
        rate = 1e12 * (300.0 if d == 512 else 500.0)
        # The plain causal prefill: the kernel at 512, SDPA (cuDNN) at 256;
        # ring's blocks at a query offset take it at both widths.
        plain = attentions(spec, "tp_pp:1x1", 1, "prefill")
        assert {k.dims[0] for k in plain} == {"wide" if d == 512 else "cudnn"}
        blocks = attentions(spec, "ring:2", 2, "prefill")
        assert {k.dims[0] for k in blocks} == {"wide"}
        k = blocks[0]
        B, H, T, S, hd, causal = k.dims[1:7]
        pairs = T * (T + 1) / 2 + T * (S - T) if causal else T * S
        assert k.flops == 4 * B * H * hd * pairs
        assert Costs(wide, False, False, 1.0).attention(k) == pytest.approx(
            max(k.flops / rate, k.bytes / wide.stream_rate))
        assert Costs(base, False, False, 1.0).attention(k) == pytest.approx(
            max(k.flops / base.attention_rate(d, "bf16"), k.bytes / base.stream_rate))
        # One query: PyTorch's decode kernels.
        assert "wide" not in {k.dims[0] for k in attentions(spec, "tp_pp:1x1", 1, "decode")}


# Two heads of 512 (seed-ring-4l's width, fp16 as that preset); with one K/V
# head, helix re-partitions by sequence (a chunk at a query offset in prefill,
# the group's two query heads as rows of one decode block).
WIDE = ModelSpec(name="wide", n_layers=2, d_model=1024, n_heads=2, head_dim=512, d_ff=256,
                 dtype="fp16", activation="gelu_tanh")
WIDE_GQA = WIDE.replace(name="wide-gqa", n_kv_heads=1)
WIDE_WL = Workload(batch=2, seq_len=13, decode_steps=2)


WIDE_CASES = [
    (2, [(WIDE, "ring:2"), (WIDE, "helix:1x2"), (WIDE_GQA, "helix:1x2"), (WIDE, "tp_pp:2x1")]),
    (4, [(WIDE, "ring:4"), (WIDE_GQA, "helix:1x4"), (WIDE, "helix:2x2")]),
]
# Every rank runs the kernel in Triton's interpreter. Where the ranks inherit
# that setting already (tests/conftest.py sets it without a GPU), the job's
# environment is every other job's: the cases join the launch of their world
# size shared with other modules' cases (helpers.SharedLaunch).
_INTERPRET = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"TRITON_INTERPRET": "1"}
WIDE_RUNS = {nproc: SharedLaunch([Case(m, WIDE_WL, plan) for m, plan in cases], nproc,
                                 **({"env": _INTERPRET} if _INTERPRET else {}))
             for nproc, cases in WIDE_CASES}


@pytest.mark.parametrize("nproc,cases", WIDE_CASES)
def test_ring_and_helix_at_head_dim_512(nproc, cases):
    # Every rank runs the kernel in Triton's interpreter wherever the GPU would
    # (ring's prefill blocks, helix's head and sequence re-partitions, the
    # reference); fp16 against the reference: the engine's 2e-2.
    results = WIDE_RUNS[nproc].results()
    for r, (_, plan) in zip(results, cases):
        assert_verified([r], [plan], tol=r["tolerance"])
