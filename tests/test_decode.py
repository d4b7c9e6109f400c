"""The split-key decode attention (model/decode.py): the kernel against
float64 attention (splits, a key count on the device or not, past the keys
held, none), how the keys are split, where shardwise takes it, and its
count along the GPU branches.

Without a GPU the kernel runs in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), on the CPU, in fp16 (the interpreter misreads bf16
operands of ``tl.dot``); the GPU benchmark (scripts/decode-attn.py) checks
bf16 on the device. The whole-model checks of every strategy's decode step
with the kernel in it are the verification runs (``shardwise run``,
tests/test_architectures*.py on CPU, the GPU sweep's ``verify``).
"""
import math

import pytest
import torch

from shardwise.model import decode
from shardwise.model.reference import causal_attention
from shardwise.parallel.lse import attend_lse_prefix

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel(monkeypatch):
    """decode's kernel (interpreted on a CPU), counting its launches and
    the splits of each in ``kernel.grids``."""
    found = decode._kernel()
    assert found, "Triton is needed (pip install -e '.[test]')"

    class Counted:
        grids = []

        def __getitem__(self, grid):
            Counted.grids.append(grid)
            return found[1][grid]

    counted = Counted()
    monkeypatch.setattr(decode, "_kernel", lambda: (found[0], counted))
    return counted


def inputs(B, H, Hkv, S, d, dtype=torch.float16, seed=0):
    """One query per head ([B, H, 1, d], the Q projection's view) and K/V as
    views of a token-major cache with spare positions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    kv = torch.randn(B, S + 3, 2, Hkv, d, generator=g).to(DEVICE, dtype)
    return q, kv[:, :S, 0].transpose(1, 2), kv[:, :S, 1].transpose(1, 2)


def reference(q, k, v, n):
    """float64 attention of q [B, H, 1, d] over the first n keys, and its lse."""
    G = q.shape[1] // k.shape[1]
    q, k, v = (t.cpu().double() for t in (q, k, v))
    k, v = k[:, :, :n].repeat_interleave(G, 1), v[:, :, :n].repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)[..., 0]


# (B, H, Hkv, S, d, n, sms): grouped heads over many splits; a ragged last
# block; one key; heads not grouped; a prefix shorter than the held keys
# (splits past it exit); a group of 8 query heads at head_dim 128.
CASES = [
    (1, 8, 2, 300, 64, 300, 8),
    (2, 4, 4, 130, 32, 77, 4),
    (1, 12, 4, 200, 128, 1, 4),
    (3, 6, 6, 97, 32, 97, 1),
    (2, 8, 2, 520, 64, 129, 16),
    (1, 16, 2, 160, 128, 160, 2),
]


@pytest.mark.parametrize("fuse", [False, True], ids=["merge", "fused"])
@pytest.mark.parametrize("on_device", [False, True], ids=["int", "device"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}S{}d{}n{}sm{}".format(*c))
def test_kernel_matches_attention(kernel, monkeypatch, case, on_device, fuse):
    # fp16 operands, float32 accumulation, P rounded to fp16 for P V: about
    # 3e-4 of the output in the interpreter; the lse is float32 throughout.
    B, H, Hkv, S, d, n, sms = case
    monkeypatch.setattr(decode, "_sms", lambda device: sms)
    q, k, v = inputs(B, H, Hkv, S, d)
    o, lse = decode.attend(q, k, v, torch.tensor(n, device=DEVICE) if on_device else n, fuse=fuse)
    want, want_lse = reference(q, k, v, n)
    splits, chunk = decode.split_keys(B * Hkv, S, sms)
    assert kernel.grids == [(B * Hkv, splits)] and (splits - 1) * chunk < S <= splits * chunk
    assert o.dtype == q.dtype and o.shape == q.shape and lse.shape == (B, H)
    assert ((o.cpu().double() - want).norm() / want.norm()).item() < 2e-3
    assert (lse.cpu().double() - want_lse).abs().max().item() < 1e-4


def assert_same_merge(got, want):
    """Two merges of the same partials, whose float32 sums add the blocks in
    other orders: the log-sum-exp to float32 rounding, the output to one
    rounding of its half-precision dtype."""
    (o, lse), (want_o, want_lse) = got, want
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    ulp = torch.finfo(o.dtype).eps * want_o.float().abs() + torch.finfo(o.dtype).tiny
    assert ((o.float() - want_o.float()).abs() <= ulp).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}S{}d{}n{}sm{}".format(*c))
def test_fused_merge_equals_the_merge_kernel(kernel, monkeypatch, case):
    # The last program of each (sequence, K/V head) merges its splits with
    # the merge kernel's expressions (the blocks one at a time, where the
    # kernel sums tiles of them): the same result to rounding as the
    # separate launch, and the arrival counts are left at zero for the next
    # launch (a CUDA graph's replay) at every step.
    from shardwise.model import merge

    B, H, Hkv, S, d, n, sms = case
    monkeypatch.setattr(decode, "_sms", lambda device: sms)
    q, k, v = inputs(B, H, Hkv, S, d, seed=1)
    at = torch.tensor(n, device=DEVICE)
    fused = [decode.attend(q, k, v, at, fuse=True) for _ in range(2)]
    # The separate launch of the merge kernel (interpreted on a CPU).
    monkeypatch.setattr(decode, "merge_stack",
                        lambda o, lse, dtype: merge._merge_launch(o, lse, o, lse, dtype=dtype))
    separate = decode.attend(q, k, v, at, fuse=False)
    assert torch.equal(fused[0][0], fused[1][0]) and torch.equal(fused[0][1], fused[1][1])
    assert_same_merge(fused[0], separate)
    assert not decode._counts(B * Hkv, q.device).any()


def test_a_count_past_the_keys_attends_them_all_and_none_attends_nothing(kernel, monkeypatch):
    monkeypatch.setattr(decode, "_sms", lambda device: 8)
    q, k, v = inputs(1, 4, 2, 90, 32)
    o, lse = decode.attend(q, k, v, torch.tensor(500, device=DEVICE))
    want, want_lse = reference(q, k, v, 90)
    assert ((o.cpu().double() - want).norm() / want.norm()).item() < 2e-3
    o, lse = decode.attend(q, k, v, torch.tensor(0, device=DEVICE))
    assert o.abs().max().item() == 0 and torch.isneginf(lse).all()


@pytest.mark.parametrize("rows,S,sms,want", [
    (8, 2062, 132, 33),  # Llama 3.1 8B at batch 1: 4 x 132 programs, 64 keys each
    (128, 4110, 132, 5),  # batch 16: 640 programs
    (8, 100, 132, 2),  # never more splits than blocks of keys
    (1024, 4096, 132, 1),  # the grid is full without splitting
])
def test_keys_are_split_to_fill_the_gpu(rows, S, sms, want):
    splits, chunk = decode.split_keys(rows, S, sms)
    assert splits == want and chunk % decode.BLOCK_N == 0
    assert (splits - 1) * chunk < S <= splits * chunk  # every key in one split, no split empty


def test_callers_take_it_for_one_query_position(kernel):
    # The reference's decode step (eager: an int position; static: a device
    # tensor over the whole cache) and a sequence-sharded decode's prefix.
    q, k, v = inputs(2, 8, 2, 40, 32)
    want, want_lse = reference(q, k, v, 31)
    eager = causal_attention(q, k[:, :, :31], v[:, :, :31], 30)
    static = causal_attention(q, k, v, torch.tensor(30, device=DEVICE))
    o, lse = attend_lse_prefix(q, k, v, torch.tensor([31], device=DEVICE))
    assert len(kernel.grids) == 3
    for got in (eager, static, o):
        assert ((got.cpu().double() - want).norm() / want.norm()).item() < 2e-3
    assert lse.shape == (2, 8, 1)
    assert (lse[..., 0].cpu().double() - want_lse).abs().max().item() < 1e-4
    # Two query positions keep SDPA; so does float32.
    causal_attention(q.float(), k.float(), v.float(), 39)
    assert len(kernel.grids) == 3


def test_cpu_tensors_keep_their_path_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = inputs(1, 4, 2, 16, 32)
    if not q.is_cuda:
        assert not decode.decode_ok(q, k, v)
    assert not decode.decode_ok(q.float(), k.float(), v.float())
    q, k, v = inputs(1, 4, 2, 16, 512)  # wider than the kernel takes
    assert not decode.decode_ok(q, k, v)


def test_counted_along_the_gpu_branches():
    # The count of a real decode step on CPU (counting.CudaPaths) runs the
    # kernel's PyTorch form: the split launch and the merge's (not fused by
    # default), and the same attention as the CPU path's.
    from shardwise.perf.counting import CallCounter, CudaPaths

    q, k, v = inputs(1, 8, 2, 300, 32, dtype=torch.bfloat16)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    want = causal_attention(q.float(), k.float(), v.float(), 299)
    with CudaPaths(), CallCounter(names=True) as counter:
        got = causal_attention(q, k, v, torch.tensor(299))
    assert counter.names[("tritons", "decode_split_kernel")] == 1
    assert counter.names[("tritons", "merge_kernel")] == 1
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2  # bf16 inputs and output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fused_merge_replays_in_a_cuda_graph(monkeypatch):
    # Captured after an eager warm-up (as bench captures a decode step), the
    # attention keeps its merge in its one launch, and every replay at
    # another key count equals the separate merge kernel's result to
    # rounding, leaving the arrival counts at zero for the next.
    monkeypatch.setattr(decode, "_sms", lambda device: 16)
    q, k, v = inputs(2, 8, 2, 520, 64)
    n = torch.tensor(129, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode.attend(q, k, v, n, fuse=True)
    torch.cuda.current_stream().wait_stream(side)
    separate = decode.merge_stack

    def no_merge(*args, **kwargs):
        raise AssertionError("the capture took the separate merge")

    monkeypatch.setattr(decode, "merge_stack", no_merge)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = decode.attend(q, k, v, n, fuse=True)
    monkeypatch.setattr(decode, "merge_stack", separate)
    for at in (129, 520, 1, 300):
        n.fill_(at)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_merge((o, lse), decode.attend(q, k, v, torch.tensor(at, device=DEVICE)))
        assert not decode._counts(2 * 2, q.device).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (a dependent launch)")
@pytest.mark.parametrize("d", [64, 128])
def test_keys_asked_of_l2_ahead_change_no_bit(monkeypatch, d):
    # kernels.PREFETCH_STEPS: the split kernel asks L2 for its first blocks
    # of K and V rows before its dependent launch's wait; the output and lse
    # are those of the launch without it, bit for bit.
    from shardwise.model import kernels

    q, k, v = inputs(4, 32, 8, 4100, d, dtype=torch.bfloat16)
    n = torch.tensor(4097, device=DEVICE)
    off = decode.attend(q, k, v, n)
    for steps in (1, 2):
        monkeypatch.setattr(kernels, "PREFETCH_STEPS", steps)
        on = decode.attend(q, k, v, n)
        assert all(torch.equal(a, b) for a, b in zip(on, off))
