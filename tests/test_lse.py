"""The log-sum-exp merge against whole-row softmax attention (no processes)."""
import math

import pytest
import torch

from shardwise.parallel.lse import NEG_INF, attend_lse, merge_into, merge_lse, merge_stack


def full_attention(q, k, v, mask=None):
    """Softmax attention in float64 over all keys at once: the ground truth.
    Rows that see no key are defined as 0 (what the merge promises)."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # empty rows: NaN -> 0
    return p @ v.double(), lse


def blockwise(q, k, v, mask, cuts):
    """Attend each key block separately; return the three merges' results."""
    parts = [attend_lse(q, k[:, :, a:b], v[:, :, a:b],
                        None if mask is None else mask[..., a:b])
             for a, b in zip(cuts, cuts[1:])]
    stacked = merge_stack(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]))
    pairwise = parts[0]
    acc_o = torch.zeros_like(parts[0][0], dtype=torch.float32)
    acc_l = torch.full_like(parts[0][1], float("-inf"))
    for o, lse in parts[1:]:
        pairwise = merge_lse(*pairwise, o, lse)
    for o, lse in parts:
        merge_into(acc_o, acc_l, o, lse)
    return [stacked, pairwise, (acc_o, acc_l)]


def check(results, want_o, want_lse, tol=1e-6):
    # float32 scores against a float64 truth: ~1e-7 relative per element.
    for o, lse in results:
        assert torch.isfinite(o).all(), "merge produced NaN/inf"
        torch.testing.assert_close(o.double(), want_o, rtol=tol, atol=tol)
        finite = torch.isfinite(want_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        torch.testing.assert_close(lse.double()[finite], want_lse[finite], rtol=tol, atol=tol)


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("cuts", [[0, 16], [0, 8, 16], [0, 3, 4, 11, 16], [0, 1, 2, 15, 16]])
def test_merge_equals_full_softmax(cuts):
    q, k, v = rand(2, 3, 5, 8, seed=1), rand(2, 3, 16, 8, seed=2), rand(2, 3, 16, 8, seed=3)
    check(blockwise(q, k, v, None, cuts), *full_attention(q, k, v))


def test_fully_masked_blocks_give_no_nan():
    # Queries at positions 8..12 against keys 0..19, causal: the block of keys
    # 16..19 is invisible to every query, keys 12..15 to most.
    T, S = 5, 20
    q, k, v = rand(1, 2, T, 4, seed=4), rand(1, 2, S, 4, seed=5), rand(1, 2, S, 4, seed=6)
    mask = torch.arange(S)[None, :] <= torch.arange(8, 8 + T)[:, None]  # [T, S]
    results = blockwise(q, k, v, mask, [0, 4, 12, 16, 20])
    o_last, lse_last = attend_lse(q, k[:, :, 16:], v[:, :, 16:], mask[:, 16:])
    assert torch.isneginf(lse_last).all() and (o_last == 0).all()
    check(results, *full_attention(q, k, v, mask))


def test_query_that_sees_one_block_only():
    # Query 0 sees only keys 0..2 (block one); query 1 sees only keys 9..11
    # (block three); query 2 sees nothing at all.
    q, k, v = rand(1, 1, 3, 4, seed=7), rand(1, 1, 12, 4, seed=8), rand(1, 1, 12, 4, seed=9)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, :3], mask[1, 9:] = True, True
    results = blockwise(q, k, v, mask, [0, 3, 9, 12])
    check(results, *full_attention(q, k, v, mask))
    for o, lse in results:
        assert (o[..., 2, :] == 0).all() and torch.isneginf(lse[..., 2]).all()


def test_per_head_mask_and_causal_flag():
    q, k, v = rand(2, 2, 6, 4, seed=10), rand(2, 2, 6, 4, seed=11), rand(2, 2, 6, 4, seed=12)
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    o, lse = attend_lse(q, k, v, causal=True)
    check([(o, lse)], *full_attention(q, k, v, tril))
    mask = rand(2, 2, 6, 6, seed=13) > 0  # [B, H, T, S], some rows empty
    check(blockwise(q, k, v, mask, [0, 2, 6]), *full_attention(q, k, v, mask))
    with pytest.raises(ValueError, match="causal"):
        attend_lse(q, k[:, :, :4], v[:, :, :4], causal=True)


def test_grouped_query_heads_read_their_kv_head():
    # 6 query heads over 2 key/value heads: head h reads kv head h // 3,
    # the convention of the reference (scaled_dot_product_attention, enable_gqa).
    q, k, v = rand(1, 6, 5, 8, seed=14), rand(1, 2, 9, 8, seed=15), rand(1, 2, 9, 8, seed=16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    o, _ = merge_stack(*map(torch.stack, zip(*[attend_lse(q, k[:, :, a:b], v[:, :, a:b])
                                              for a, b in [(0, 4), (4, 9)]])))
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused kernels need CUDA")
@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.bfloat16, 128),
                                            (torch.float16, 512), (torch.float32, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_cuda_path_matches_math(dtype, head_dim, causal):
    # The fused kernels (flash / memory-efficient) against the float32 math path
    # on the same half-precision inputs: the kernels accumulate in float32 but
    # round p to the input dtype before p @ v, hence 1e-2 for fp16/bf16.
    dev = torch.device("cuda")
    T, S = (70, 70) if causal else (37, 70)
    q, k, v = (rand(2, 4, n, head_dim, seed=i).to(dev, dtype) for i, n in enumerate([T, S, S]))
    o, lse = attend_lse(q, k, v, causal=causal)
    mask = torch.ones(T, S, dtype=torch.bool, device=dev).tril() if causal else None
    o_ref, lse_ref = attend_lse(q, k, v, mask=mask)  # a mask forces the math path
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 4, T)
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the fused path needs CUDA")])])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 128),
                                            (torch.float16, 512)])
def test_prefix_attention_over_a_static_cache(device, dtype, head_dim):
    # attend_lse_prefix over all S slots with the first n held equals
    # attend_lse over those n keys (a decode step over a growing shard, with
    # shapes that do not depend on n); grouped-query heads; n a device tensor.
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("CPU runs the float32 math path")
    dev = torch.device(device)
    from shardwise.parallel.lse import attend_lse_prefix
    q = rand(2, 4, 1, head_dim, seed=1).to(dev, dtype)
    k, v = (rand(2, 2, 37, head_dim, seed=s).to(dev, dtype) for s in (2, 3))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for n in (1, 20, 37):
        o, lse = attend_lse_prefix(q, k, v, torch.tensor([n], device=dev))
        o_ref, lse_ref = attend_lse(q, k[:, :, :n], v[:, :, :n])
        assert o.dtype == dtype and lse.shape == (2, 4, 1)
        torch.testing.assert_close(o.float(), o_ref.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the fused path needs CUDA")])])
def test_an_empty_prefix_is_an_empty_block(device):
    # A ring rank that holds no prompt token attends an empty shard until a
    # decoded token lands there: lse -inf, and whatever the kernel leaves in o
    # (undefined for a query that sees no key), merging it with another
    # block gives that block alone.
    from shardwise.parallel.lse import attend_lse_prefix
    dev = torch.device(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = rand(2, 8, 1, 128, seed=4).to(dev, dtype)
    k, v = (rand(2, 2, 19, 128, seed=s).to(dev, dtype) for s in (5, 6))
    o0, lse0 = attend_lse_prefix(q, k, v, torch.tensor([0], device=dev), may_be_empty=True)
    assert (lse0 == NEG_INF).all()
    o1, lse1 = attend_lse(q, k[:, :, :7], v[:, :, :7])
    o, lse = merge_stack(torch.stack([o0, o1]), torch.stack([lse0, lse1]))
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o1, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse1, rtol=0, atol=0)


def _packed_parts(n, B, H, d, dtype, device, seed=0):
    """``n`` partials gathered as ring's decode packs them: ``[n, B, H, 1, d +
    2]`` in ``dtype`` with each row's float32 lse in its last two columns; some
    rows see no key in some blocks (lse -inf, o 0), one row in none."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, B, H, 1, d, generator=g).to(dtype)
    lse = torch.randn(n, B, H, 1, generator=g) * 3
    lse[0, 0, 0] = NEG_INF
    lse[:, 1, 1] = NEG_INF  # this row: no block sees a key
    o[0, 0, 0] = 0
    o[:, 1, 1] = 0
    parts = torch.cat([o, lse[..., None].view(dtype)], dim=-1).to(device)
    return parts, parts[..., :d], parts[..., d:].view(torch.float32)[..., 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton merge needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_triton_merge_matches_the_pytorch_merge(n, dtype):
    # The kernel computes _merge_math's expressions in its order, in float32,
    # reading o and lse in place from the packed buffer: equal to rounding of
    # the exponentials (float32 ulps), so the outputs agree to one ulp of dtype.
    from shardwise.parallel import lse as lse_mod

    parts, o, lse = _packed_parts(n, 4, 8, 128, dtype, torch.device("cuda"))
    assert lse_mod._merge_rows(o, lse) is not None  # the Triton path is taken
    got, total = merge_stack(o, lse)
    want, want_total = lse_mod._merge_math(o, lse)
    assert got.dtype == dtype and got.shape == (4, 8, 1, 128) and total.shape == (4, 8, 1)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-6)
    assert torch.isneginf(total[1, 1]).all() and (got[1, 1] == 0).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    # Most elements are bit for bit the same.
    assert (got == want).float().mean() > 0.99
    # float32 partials (helix packs them so): equal to float32 rounding.
    o32, lse32 = o.float().contiguous(), lse.contiguous()
    got32, _ = merge_stack(o32, lse32)
    torch.testing.assert_close(got32, lse_mod._merge_math(o32, lse32)[0], rtol=1e-6, atol=1e-6)


def test_merge_of_packed_views_on_the_cuda_branches():
    # Along the GPU branches on CPU (counting.CudaPaths), merge_stack takes the
    # Triton path, whose stand-in is the PyTorch merge counted as one launch:
    # the same result as the merge of contiguous copies, and one kernel.
    from shardwise.perf.counting import CallCounter, CudaPaths

    parts, o, lse = _packed_parts(2, 3, 4, 16, torch.bfloat16, "cpu")
    want, want_total = merge_stack(o.contiguous(), lse.contiguous())
    with torch.inference_mode(), CudaPaths(), CallCounter(names=True) as c:
        got, total = merge_stack(o, lse)
    assert c.names.get(("tritons", "merge_kernel")) == 1 and c.counts["tritons"] == 1
    assert c.counts["kernels"] == 0
    assert torch.equal(got, want) and torch.equal(total, want_total)


@pytest.mark.parametrize("n,d", [(1, 8), (3, 128), (33, 128), (70, 48), (5, 1040)])
def test_merge_kernel_matches_the_pytorch_merge(n, d, monkeypatch):
    """The Triton merge (interpreted on CPU; the GPU test above compiles it)
    over more blocks than one tile of them (70 > 64) and wider rows than one
    tile of columns (1040), a row no block saw and a block of share 0 whose
    o is NaN: ``_merge_math``'s result to float32 rounding."""
    from shardwise.model import merge
    from triton_cpu import interpreted

    kernel = interpreted("shardwise.model.triton_merge", "merge_kernel")
    g = torch.Generator().manual_seed(n)
    o = torch.randn(n, 6, d, generator=g)
    lse = 3 * torch.randn(n, 6, generator=g)
    lse[:, 2] = NEG_INF  # a row no block saw
    lse[0, 4], o[0, 4] = NEG_INF, float("nan")  # a block that saw nothing of row 4
    if n == 1:
        lse[0, 4], o[0, 4] = 0.0, 1.0
    monkeypatch.setattr(merge, "_merge_kernel", lambda: kernel)
    got, total = merge._merge_launch(o, lse, o, lse)
    want, want_total = merge._merge_math(o, lse)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(total[2]).all() and (got[2] == 0).all()
