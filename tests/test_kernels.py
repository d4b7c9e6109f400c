"""Fused residual-add + norm and SwiGLU: the kernels against PyTorch's forms
(on CPU tensors through Triton's interpreter, and on GPUs), the fallback
everywhere else, and grouped-query attention without repeated K/V."""
import os

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from shardwise.model import kernels
from shardwise.model.kernels import add_norm, norm, swiglu
from triton_cpu import interpreted

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernel)")


def _modules(d, dtype, device):
    ln = nn.LayerNorm(d, eps=1e-5).to(device, dtype)
    rms = nn.RMSNorm(d, eps=1e-6).to(device, dtype)
    with torch.no_grad():
        for p in (ln.weight, ln.bias, rms.weight):
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return ln, rms


def test_fallback_is_the_module():
    torch.manual_seed(0)
    x, a = torch.randn(3, 7, 48), torch.randn(3, 7, 48)
    for m in _modules(48, torch.float32, "cpu"):
        h, y = add_norm(m, x, a)
        assert torch.equal(h, x + a) and torch.equal(y, m(x + a))
        assert torch.equal(norm(m, x), m(x))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows,d", [(16, 4096), (4096, 4096), (5, 1000), (64, 12288)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_modules(rows, d, dtype):
    # h is the same rounding of x + a as the separate add (bit for bit); the
    # normalised output differs from PyTorch's kernel only in the order of the
    # float32 sums, i.e. by at most one rounding of the output dtype.
    torch.manual_seed(0)
    x = torch.randn(rows, d, device="cuda", dtype=dtype)
    a = torch.randn(rows, d, device="cuda", dtype=dtype)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for m in _modules(d, dtype, "cuda"):
        h, y = add_norm(m, x, a)
        assert torch.equal(h, x + a)
        want = m(x + a).float()
        assert ((y.float() - want).abs() <= ulp * want.abs().clamp_min(1e-3) + 1e-3).all()
        y1 = norm(m, x).float()
        want1 = m(x).float()
        assert ((y1 - want1).abs() <= ulp * want1.abs().clamp_min(1e-3) + 1e-3).all()


@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_add_norm_kernel_matches_the_modules_on_cpu(monkeypatch, rms):
    # The Triton kernel through its interpreter, fp32 rows: h bit for bit, the
    # norm to float32 rounding (the statistics' summation order differs).
    triton, kernel = interpreted("shardwise.model.triton_norm", "add_norm_kernel")
    monkeypatch.setattr(kernels, "_kernel", lambda: (triton, kernel))
    torch.manual_seed(0)
    x, a = torch.randn(5, 100), torch.randn(5, 100)
    m = _modules(100, torch.float32, "cpu")[1 if rms else 0]
    h, y = kernels._launch(m, x, a)
    assert torch.equal(h, x + a)
    torch.testing.assert_close(y, m(x + a), rtol=1e-5, atol=1e-5)


def _gate_up(rows, F, dtype, device="cpu"):
    g = torch.Generator().manual_seed(2)
    return (3 * torch.randn(rows, 2 * F, generator=g)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("F", [96, 1500])
def test_swiglu_kernel_matches_silu_times_up_on_cpu(monkeypatch, dtype, F):
    # The interpreter's exp is not PyTorch's: the SiLU equal to a float32
    # rounding, so to one unit in the last place of the dtype once rounded,
    # which the product (rounded again) carries: two units at most.
    kernel = interpreted("shardwise.model.triton_swiglu", "swiglu_kernel")
    monkeypatch.setattr(kernels, "_swiglu_kernel", lambda: kernel)
    h = _gate_up(7, F, dtype)
    gate, up = h.chunk(2, dim=-1)
    want = (Fn.silu(gate) * up).float()
    got = kernels._swiglu_launch(h.view(7, 1, 2 * F))
    assert got.shape == (7, 1, F)
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -22
    assert ((got.view(7, F).float() - want).abs() <= 2 * ulp * want.abs() + 1e-6).all()


def test_swiglu_runs_pytorch_off_the_gpu(monkeypatch):
    def refuse(h):
        raise AssertionError("the Triton launch on CPU tensors")

    monkeypatch.setattr(kernels, "_swiglu_launch", refuse)
    h = _gate_up(4, 8, torch.float32)
    assert torch.equal(swiglu(h), Fn.silu(h[:, :8]) * h[:, 8:])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,F", [(16, 14336), (4096, 1792), (3, 100)])
def test_swiglu_kernel_on_the_gpu(dtype, rows, F):
    # SiLU rounded to the dtype, then the product rounded, as PyTorch's two
    # kernels do; Triton's exp differs from CUDA's expf in the last float32
    # bits, which a rounding of the SiLU can carry into the product: at most
    # two units in the last place of the output dtype.
    h = _gate_up(rows, F, dtype, "cuda")
    gate, up = h.chunk(2, dim=-1)
    want = (Fn.silu(gate) * up).float()
    got = swiglu(h).float()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((got - want).abs() <= 2 * ulp * want.abs() + 1e-6).all()


def _repeated_kv_attention(q, k, v, pos):
    """The grouped-query decode step with K/V repeated per query head (the
    plain form the reference's grouped path must equal)."""
    from shardwise.model.reference import causal_attention

    G = q.shape[1] // k.shape[1]
    return causal_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), pos)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_grouped_decode_attention_reads_each_kv_head_once(device):
    # One decode token: the G query heads of a kv head are its rows (no
    # repeat), at an int position and at a device-tensor position (the
    # static step's mask over the whole cache), against repeated K/V.
    from shardwise.model.reference import causal_attention, one_step

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, S, d = 3, 8, 2, 37, 64
    q = torch.randn(B, 1, H, d, generator=g).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, S, d, generator=g).to(device, dtype) for _ in range(2))
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for pos in (S - 1, torch.tensor(20, device=device)):
        with one_step(pos):
            kk, vv = (k, v) if isinstance(pos, int) else (k, v)
            got = causal_attention(q, kk, vv, pos)
            want = _repeated_kv_attention(q, kk, vv, pos)
            assert got.shape == (B, H, 1, d)
            assert ((got - want).float().norm() / want.float().norm()).item() <= tol


def _expert_case(dtype, device="cpu", R=5, held=3, O=70, I=300, per=2):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(held, O, I, generator=g).to(dtype).to(device)
    x = torch.randn(R // per if per > 1 else R, I, generator=g).to(dtype).to(device)
    # Global expert ids around the held range 2..4: rows 0 and 4 are not held here.
    experts = torch.tensor([1, 2, 4, 3, 5, 2][:R], device=device)
    return x, w, experts


@pytest.mark.parametrize("step_sum", [False, True], ids=["thread-sums", "step-sums"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per", [1, 2])
def test_expert_rows_kernel_matches_the_gathered_product_on_cpu(monkeypatch, dtype, per, step_sum):
    # The kernel sums each row's I products in float32 and rounds once: against
    # the exact (float64) product, the float32 sum's error is at most I units of
    # float32 times the sum of the products' magnitudes, plus the final
    # rounding (one unit of the output dtype).
    kernel = interpreted("shardwise.model.triton_moe", "expert_rows_kernel")
    monkeypatch.setattr(kernels, "_experts_kernel", lambda: kernel)
    R = 6 if per == 2 else 5
    x, w, experts = _expert_case(dtype, R=R, per=per)
    got = kernels._expert_rows_launch(x, w, experts, 2, per, STEP_SUM=step_sum)
    want = kernels._expert_rows_torch(x.double(), w.double(), experts, 2, per)
    assert got.shape == (R, w.shape[1])
    held = (experts >= 2) & (experts < 5)
    assert torch.equal(got[~held], torch.zeros_like(got[~held]))  # not held: zero, nothing read
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -23
    size = kernels._expert_rows_torch(x.double().abs(), w.double().abs(), experts, 2, per)
    assert ((got.double() - want).abs() <= ulp * want.abs() + 300 * 2.0 ** -24 * size).all()


def test_expert_rows_block_is_any_width_with_the_same_sums(monkeypatch):
    # The block of outputs a program computes only spreads the work: each
    # output's inputs are summed in the same order (the same block of inputs
    # a step), so every block gives the same bits.
    kernel = interpreted("shardwise.model.triton_moe", "expert_rows_kernel")
    monkeypatch.setattr(kernels, "_experts_kernel", lambda: kernel)
    x, w, experts = _expert_case(torch.float16, R=6, per=2, O=80, I=300)
    got = {b: kernels._expert_rows_launch(x, w, experts, 2, 2, block_o=b, block_i=128)
           for b in (8, 16, 32, 64)}
    assert all(torch.equal(got[b], got[64]) for b in (8, 16, 32))
    # 16 outputs a program of 256 inputs a step while the grid has 4 programs an
    # SM, else 8 of 1024 (the sweep's fastest at Mixtral's widths, one token).
    wide, long = ({"block_o": 16, "block_i": 256, "num_warps": 8},
                  {"block_o": 8, "block_i": 1024, "num_warps": 4})
    assert kernels.expert_rows_launch(2, 28672, 132) == wide  # the up-projection: 3584 programs
    assert kernels.expert_rows_launch(2, 4096, 132) == long  # the down-projection: 512 at 16
    assert kernels.expert_rows_launch(4, 4096, 132) == wide  # 1024 programs
    assert kernels.expert_rows_launch(1, 64, 132) == long
    # Another block of inputs a step sums in another order: the same to rounding.
    other = kernels._expert_rows_launch(x, w, experts, 2, 2, block_o=16, block_i=64)
    torch.testing.assert_close(other, got[16], rtol=2e-3, atol=2e-3)


def test_expert_rows_runs_pytorch_off_the_gpu(monkeypatch):
    def refuse(*a):
        raise AssertionError("the Triton launch on CPU tensors")

    monkeypatch.setattr(kernels, "_expert_rows_launch", refuse)
    x, w, experts = _expert_case(torch.float64, R=6, per=2)
    got = kernels.expert_rows(x, w, experts, 2, 2)
    for r, e in enumerate(experts.tolist()):  # one row at a time, from the definition
        want = w[e - 2] @ x[r // 2] if 2 <= e < 5 else torch.zeros(w.shape[1], dtype=x.dtype)
        torch.testing.assert_close(got[r], want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per,O,I", [(2, 2 * 1792, 4096), (1, 4096, 1792), (2, 100, 70)])
def test_expert_rows_kernel_on_the_gpu(dtype, per, O, I):
    # float32 accumulation rounded once: against a float32 product of the same
    # inputs, both sums' float32 errors (I units of float32 of the products'
    # magnitudes each) and the final rounding (one unit of the output dtype).
    x, w, experts = _expert_case(dtype, "cuda", R=6 if per == 2 else 5, held=3, O=O, I=I,
                                 per=per)
    got = kernels.expert_rows(x, w, experts, 2, per).float()
    want = kernels._expert_rows_torch(x.float(), w.float(), experts, 2, per)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    size = kernels._expert_rows_torch(x.float().abs(), w.float().abs(), experts, 2, per)
    assert ((got - want).abs() <= ulp * want.abs() + 2 * I * 2.0 ** -24 * size).all()


def _check_linear(x, w, ulp):
    """``kernels.linear`` against the float64 product: the kernel's float32
    sum of I exact products (at most I units of float32 of their magnitudes)
    and the final rounding (one unit of the output dtype)."""
    got = kernels.linear(x, w)
    assert got.shape == (*x.shape[:-1], w.shape[0]) and got.dtype == x.dtype
    want = x.double() @ w.double().t()
    size = x.double().abs() @ w.double().abs().t()
    I = w.shape[1]
    assert ((got.double() - want).abs() <= ulp * want.abs() + I * 2.0 ** -24 * size).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("O,I", [(96, 640), (40, 1100), (1, 8)])
def test_linear_gemv_kernel_matches_the_product_on_cpu(monkeypatch, dtype, O, I):
    # One row (a decode step of one sequence): the expert GEMV's kernel over
    # one matrix (DENSE), O and I off the blocks' multiples, through the
    # interpreter; two rows are rows_kernel's (the tests below). The interpreter
    # rounds float32 to bf16 toward zero (NumPy has no bf16): a whole unit of
    # bf16 there, half a unit on GPUs.
    kernel = interpreted("shardwise.model.triton_moe", "expert_rows_kernel")
    monkeypatch.setattr(kernels, "_experts_kernel", lambda: kernel)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    launches = []
    real = kernels._expert_rows_launch
    monkeypatch.setattr(kernels, "_expert_rows_launch",
                        lambda *a, **k: launches.append(k) or real(*a, **k))
    g = torch.Generator().manual_seed(O + I)
    w = torch.randn(O, I, generator=g).to(dtype)
    x = torch.randn(1, 1, I, generator=g).to(dtype)
    _check_linear(x, w, 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -11)
    assert launches == [{"DENSE": True}]
    kernels.linear(torch.randn(2, I).to(dtype), w)
    assert len(launches) == 1


def _interpreted_rows(monkeypatch, split=None):
    """``kernels`` with ``rows_kernel`` and its finish interpreted (and, given
    ``split``, every launch split that many ways), the tensors taken for
    CUDA ones; returns the list each launch's ``(rows, gated, split)`` joins."""
    main = interpreted("shardwise.model.triton_rows", "rows_kernel")
    finish = interpreted("shardwise.model.triton_rows", "rows_finish_kernel")
    monkeypatch.setattr(kernels, "_rows_kernels", lambda: (main[0], (main[1], finish[1])))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    chosen = kernels.rows_launch
    if split is not None:
        monkeypatch.setattr(kernels, "rows_launch", lambda gated: {**chosen(gated), "split": split})
    launches = []
    real = kernels._rows_launch
    monkeypatch.setattr(kernels, "_rows_launch", lambda x, w, gated, **k: launches.append(
        (x.numel() // x.shape[-1], gated, kernels.rows_launch(gated)["split"]))
        or real(x, w, gated, **k))
    return launches


@pytest.mark.parametrize("rows", [2, 5, 16])
@pytest.mark.parametrize("O,I,split", [(40, 300, 1), (70, 1100, 3), (16, 64, 2)])
def test_rows_kernel_matches_the_product_on_cpu(monkeypatch, rows, O, I, split):
    """2 to 16 rows (a decode step of a few sequences) by ``rows_kernel``
    through the interpreter, in fp16 (its ``tl.dot`` misreads bf16), O and I
    off the blocks' multiples, the sum over I in one program or split
    (partial sums, then the finish kernel adds them): within the float32 sum
    of I exact products and one rounding of the float64 product; 1 and 17
    rows are not its."""
    launches = _interpreted_rows(monkeypatch, split)
    g = torch.Generator().manual_seed(rows + O + I)
    w = torch.randn(O, I, generator=g).half()
    x = torch.randn(rows, 1, I, generator=g).half()[:, :, :]
    _check_linear(x, w, 2.0 ** -11)
    assert launches == [(rows, False, split)]
    monkeypatch.setattr(kernels, "_experts_kernel", lambda: False)  # no GEMV: Fn.linear
    kernels.linear(x[:1], w)
    kernels.linear(torch.randn(17, I).half(), w)
    assert len(launches) == 1


def test_batched_linear_is_the_batched_product(monkeypatch):
    """A MoE decode step's down-projections, one per expert on every token's
    activations (``[N, E, F]`` seen as ``[E, N, F]``, a strided view), in
    one launch of ``rows_kernel`` over the batch (interpreted, fp16): within
    the float32 sum of F exact products and one rounding of each expert's
    float64 product; 1 or 17 rows a batch are ``torch.bmm``'s."""
    launches = _interpreted_rows(monkeypatch)
    g = torch.Generator().manual_seed(5)
    N, E, F, D = 5, 3, 100, 72
    h = torch.randn(N, E, F, generator=g).half()
    w = (torch.randn(E, D, F, generator=g) / 4).half()
    got = kernels.batched_linear(h.transpose(0, 1), w)
    want = torch.bmm(h.transpose(0, 1).double(), w.double().transpose(1, 2))
    size = torch.bmm(h.transpose(0, 1).double().abs(), w.double().abs().transpose(1, 2))
    assert got.shape == (E, N, D) and got.dtype == h.dtype
    assert ((got.double() - want).abs() <= 2.0 ** -11 * want.abs() + F * 2.0 ** -24 * size).all()
    assert launches == [(E * N, False, 1)]  # one launch over the batch
    for rows in (1, 17):
        x = torch.randn(E, rows, F, generator=g).half()
        assert torch.equal(kernels.batched_linear(x, w), torch.bmm(x, w.transpose(1, 2)))


@pytest.mark.parametrize("split", [1, 2])
def test_linear_swiglu_activates_in_the_epilogue_with_the_same_values(monkeypatch, split):
    """``linear_swiglu`` of 2 to 16 rows is one ``rows_kernel`` launch whose
    epilogue applies SwiGLU to the gate's and the up's accumulators, each
    rounded: the bits of its ungated product followed by ``swiglu``'s kernel
    (both interpreted). ``swiglu_mlp`` puts the activation in that epilogue
    for a few rows, in the down-projection's GEMV for one, and between two
    GEMMs for a prompt."""
    launches = _interpreted_rows(monkeypatch, split)
    act = interpreted("shardwise.model.triton_swiglu", "swiglu_kernel")
    monkeypatch.setattr(kernels, "_swiglu_kernel", lambda: act)
    g = torch.Generator().manual_seed(split)
    F, D = 80, 96  # F off the 64-output block
    x = torch.randn(5, D, generator=g).half()
    w_in = (torch.randn(2 * F, D, generator=g) / 4).half()
    w_down = (torch.randn(D, F, generator=g) / 4).half()
    fused = kernels.linear_swiglu(x, w_in)
    assert launches == [(5, True, split)]
    assert torch.equal(fused, kernels.swiglu(kernels.linear(x, w_in)))
    assert torch.equal(kernels.swiglu_mlp(x, w_in, w_down), kernels.linear(fused, w_down))
    assert launches[-3:] == [(5, True, split), (5, False, split), (5, False, split)]
    # Three stacked [gate; up] matrices (a MoE layer's experts), each activated
    # on its own halves, in the one launch.
    w3 = (torch.randn(3 * 2 * F, D, generator=g) / 4).half()
    stacked = kernels.linear_swiglu(x, w3, groups=3)
    assert launches[-1] == (5, True, split)
    assert torch.equal(stacked, torch.cat([kernels.linear_swiglu(x, w3[2 * F * e:2 * F * (e + 1)])
                                           for e in range(3)], -1))
    prompt3 = torch.randn(17, D, generator=g).half()  # the GEMM, then each expert's halves
    assert torch.equal(kernels.linear_swiglu(prompt3, w3, groups=3), kernels.swiglu(
        Fn.linear(prompt3, w3).view(17, 3, 2 * F)).view(17, 3 * F))
    gemv = interpreted("shardwise.model.triton_moe", "expert_rows_kernel")
    monkeypatch.setattr(kernels, "_experts_kernel", lambda: gemv)
    one = []
    real = kernels._expert_rows_launch
    monkeypatch.setattr(kernels, "_expert_rows_launch",
                        lambda *a, **k: one.append(k) or real(*a, **k))
    kernels.swiglu_mlp(x[:1], w_in, w_down)
    assert one == [{"DENSE": True}, {"DENSE": True, "SWIGLU": True}]
    n = len(launches)
    prompt = torch.randn(17, D, generator=g).half()
    got = kernels.swiglu_mlp(prompt, w_in, w_down)
    assert len(launches) == n and len(one) == 2  # neither kernel: GEMMs and swiglu's kernel
    assert torch.equal(got, Fn.linear(kernels.swiglu(Fn.linear(prompt, w_in)), w_down))


def test_linear_runs_pytorch_off_the_gpu_and_with_a_bias(monkeypatch):
    monkeypatch.setattr(kernels, "_expert_rows_launch", lambda *a, **k: pytest.fail("launched"))
    x, w, b = torch.randn(1, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.equal(kernels.linear(x, w), Fn.linear(x, w))
    assert torch.equal(kernels.linear(x, w, b), Fn.linear(x, w, b))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("O,I", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                 (128256, 4096), (100, 70)])
def test_linear_gemv_on_the_gpu(dtype, O, I):
    w = (torch.randn(O, I, device="cuda") * 0.02).to(dtype)
    x = torch.randn(1, 1, I, device="cuda").to(dtype)
    _check_linear(x, w, 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("O,I", [(6144, 4096), (4096, 14336), (128256, 4096), (100, 70)])
def test_rows_kernel_on_the_gpu(dtype, rows, O, I):
    w = (torch.randn(O, I, device="cuda") * 0.02).to(dtype)
    x = torch.randn(rows, 1, I, device="cuda").to(dtype)
    _check_linear(x, w, 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11)
    for split in (1, 2, 4):  # each launch within the bound, whatever rows_launch picks
        got = kernels._rows_launch(x, w, False, split=split)
        want = x.double() @ w.double().t()
        size = x.double().abs() @ w.double().abs().t()
        assert ((got.double() - want).abs() <= 2.0 ** -8 * want.abs() + I * 2.0 ** -24 * size).all()


_PTX = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from shardwise.model.triton_decode import decode_split_kernel
from shardwise.model.triton_moe import expert_rows_kernel
from shardwise.model.triton_rows import rows_kernel

@triton.jit
def nothing(X):
    pass


target = GPUTarget("cuda", 90, 32)
try:  # whether this Triton compiles for the target at all
    triton.compile(ASTSource(fn=nothing, signature={"X": "*fp32"}), target=target)
except Exception as e:
    sys.exit(f"SKIP {type(e).__name__}: {e}")
name, const = json.loads(sys.argv[1])
# each argument's type where it is not i32 (bf16 data, fp32 sums, int indices)
fn, args = {"rows_kernel": (rows_kernel, "X:*bf16 W:*bf16 Y:*bf16 P:*fp32 M O F sx sw sy "
                                         "sxb swb syb"),
            "expert_rows_kernel": (expert_rows_kernel, "X:*bf16 W:*bf16 E:*i64 Y:*bf16 O held "
                                                       "first sx swe swo sy"),
            "decode_split_kernel": (decode_split_kernel,
                                    "Q:*bf16 K:*bf16 V:*bf16 O:*fp32 L:*fp32 N:*i64 n0 S sq_b "
                                    "sq_h sk_b sk_h sk_s sv_b sv_h sv_s Hkv rows_all chunk "
                                    "qk_scale:fp32 OUT:*bf16 LOUT:*fp32 CNT:*i32 splits")}[name]
sig = dict((a + ":i32").split(":")[:2] for a in args.split())
src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const)
print(triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3}).asm["ptx"])
"""


def _ptx(kernel: str, **const) -> str:
    """``kernel``'s PTX for a Hopper GPU, a programmatic dependent launch of
    bf16 weights: compiled by Triton in a process of its own (this one may
    run Triton's interpreter), no GPU needed."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:  # Triton compiles functions of a file
        script = os.path.join(tmp, "ptx.py")
        with open(script, "w") as f:
            f.write(_PTX)
        run = subprocess.run([sys.executable, script, json.dumps([kernel, const])], env=env,
                             capture_output=True, text=True, timeout=300)
    if run.returncode and "SKIP" in run.stderr:
        pytest.skip(f"Triton cannot compile for sm_90 here: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _ahead_of_the_wait(ptx: str, lines: int) -> None:
    """``lines`` 128-byte lines asked of L2 over the 128 threads, every one
    before the dependent launch's wait."""
    assert ptx.count("prefetch.global.L2") == lines // 128
    assert ptx.rindex("prefetch.global.L2") < ptx.index("griddepcontrol.wait")


@pytest.mark.parametrize("gated,block_o,block_i", [(False, 64, 256), (True, 128, 128)])
def test_rows_kernel_asks_l2_for_its_weights_before_it_waits(gated, block_o, block_i):
    """``PREFETCH`` steps: each program of ``rows_kernel`` asks L2 for every
    128-byte line of its rows' first steps (and, gated, of the up rows')
    before the dependent launch's wait, and for none without it."""
    def ptx(prefetch):
        return _ptx("rows_kernel", I=4096, BLOCK_M=16, BLOCK_O=block_o, BLOCK_I=block_i,
                    SPLIT=1, GATED=gated, W_LEFT=not gated, PDL=True, PREFETCH=prefetch)

    _ahead_of_the_wait(ptx(2), block_o * (2 * block_i // 64) * (1 + gated))
    assert "prefetch.global.L2" not in ptx(0)


def test_the_gemv_asks_l2_for_its_weights_before_it_waits():
    """The one-row GEMV (``expert_rows_kernel``, ``DENSE``) likewise; a routed
    product (not ``DENSE``: the experts are read after the wait) asks none."""
    def ptx(dense):
        return _ptx("expert_rows_kernel", I=4096, PER=1, BLOCK_O=16, BLOCK_I=256, DOT=False,
                    STEP_SUM=False, DENSE=dense, SWIGLU=False, PDL=True, PREFETCH=2)

    _ahead_of_the_wait(ptx(True), 16 * 2 * 256 // 64)
    assert "prefetch.global.L2" not in ptx(False)


def test_the_decode_attention_asks_l2_for_its_keys_before_it_waits():
    """The split-key decode attention: the K and V rows of its split's first
    ``PREFETCH`` blocks of keys (128 dims of bf16: two lines a row)."""
    def ptx(prefetch):
        return _ptx("decode_split_kernel", G=4, G_PAD=16, D=128, BLOCK_N=64, N_PTR=True,
                    FUSE=False, PDL=True, PREFETCH=prefetch)

    _ahead_of_the_wait(ptx(1), 64 * 2 * 2)
    assert "prefetch.global.L2" not in ptx(0)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("prefetch", [1, 2, 4])
def test_rows_kernel_prefetch_on_the_gpu(monkeypatch, gated, prefetch):
    """The weights asked of L2 ahead change no output bit."""
    x = torch.randn(16, 4096, device="cuda").bfloat16()
    w = (torch.randn((1 + gated) * 6144, 4096, device="cuda") * 0.02).bfloat16()
    off = kernels._rows_launch(x, w, gated)
    monkeypatch.setattr(kernels, "PREFETCH_STEPS", prefetch)
    assert torch.equal(kernels._rows_launch(x, w, gated), off)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_linear_on_the_gpu(dtype):
    h = torch.randn(16, 8, 14336, device="cuda").to(dtype)
    w = (torch.randn(8, 4096, 14336, device="cuda") * 0.02).to(dtype)
    got = kernels.batched_linear(h.transpose(0, 1), w)
    want = torch.bmm(h.transpose(0, 1).double(), w.double().transpose(1, 2))
    size = torch.bmm(h.transpose(0, 1).double().abs(), w.double().abs().transpose(1, 2))
    assert ((got.double() - want).abs() <= 2.0 ** -8 * want.abs() + 14336 * 2.0 ** -24 * size).all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("F,D", [(14336, 4096), (100, 70)])
def test_linear_swiglu_on_the_gpu(dtype, split, F, D):
    x = torch.randn(16, D, device="cuda").to(dtype)
    w = (torch.randn(2 * F, D, device="cuda") * 0.02).to(dtype)
    fused = kernels._rows_launch(x, w, True, split=split)
    assert torch.equal(fused, kernels.swiglu(kernels._rows_launch(x, w, False, split=split)))
    # Four stacked [gate; up] matrices (experts), each on its own halves.
    w4 = (torch.randn(4 * 2 * F, D, device="cuda") * 0.02).to(dtype)
    stacked = kernels._rows_launch(x, w4, True, groups=4, split=split)
    assert torch.equal(stacked, torch.cat([kernels._rows_launch(
        x, w4[2 * F * e:2 * F * (e + 1)], True, split=split) for e in range(4)], -1))


def _combine_case(dtype, N, k, D, held_rows, seed=0):
    """Expert outputs ``y`` for ``held_rows`` of the N*k (token, pick) pairs,
    in a shuffled order (as a prompt's rows sorted by expert are), and where
    each pair's row is (``pos``: -1 for pairs not computed here)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(held_rows, D, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(N, k, generator=g), -1)  # fp32, as route() gives
    pos = torch.full((N * k,), -1, dtype=torch.int64)
    pairs = torch.randperm(N * k, generator=g)[:held_rows]
    pos[pairs] = torch.randperm(held_rows, generator=g)
    return y, weights, pos


def _check_combine(dtype, k, held, D, device="cpu"):
    # Each weighted term rounded to the dtype, the terms summed in float32 and
    # rounded once: PyTorch's product and sum over the picks. For one or two
    # picks the float32 sum has one order, so the two agree bit for bit; with
    # three, to float32's rounding of the sum (then the dtype's).
    N = 7
    y, weights, pos = (t.to(device) for t in _combine_case(dtype, N, k, D, held))
    for p, rows in ((pos, y), (None, torch.randn(N * k, D).to(device, dtype))):
        got = kernels._combine_launch(rows, weights, p)
        want = kernels._combine_torch(rows, weights, p)
        assert got.shape == (N, D) and got.dtype == dtype
        if k <= 2:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2e-3 if dtype != torch.float32 else 1e-6,
                                       atol=1e-6)
    # A token none of whose picks is computed here contributes zeros.
    none = torch.full_like(pos, -1)
    assert torch.equal(kernels._combine_launch(y, weights, none), torch.zeros_like(y[:N]))
    # No token (an empty chunk of expert parallelism's prompt): nothing launched.
    assert kernels._combine_launch(y[:0], weights[:0], pos[:0]).shape == (0, D)
    # Into a slice of a larger output, as expert parallelism's chunks write theirs.
    whole = torch.zeros(N + 3, D, dtype=dtype, device=device)
    kernels.combine_picks(y, weights, pos, out=whole[2:2 + N])
    assert torch.equal(whole[2:2 + N], kernels.combine_picks(y, weights, pos))
    assert not whole[:2].any() and not whole[2 + N:].any()


# bf16 runs on GPUs only: Triton's interpreter truncates float32 to bf16 where
# the GPU (and PyTorch) round to nearest even.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k, held", [(1, 7), (2, 14), (2, 9), (3, 13)])
@pytest.mark.parametrize("D", [200, 1536])  # a masked block; two blocks of 1024
def test_combine_kernel_rounds_like_pytorch(monkeypatch, dtype, k, held, D):
    kernel = interpreted("shardwise.model.triton_moe", "combine_kernel")
    monkeypatch.setattr(kernels, "_combine_kernel", lambda: kernel)
    _check_combine(dtype, k, held, D)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, held", [(2, 14), (2, 9), (3, 13)])
def test_combine_kernel_rounds_like_pytorch_on_gpu(dtype, k, held):
    assert kernels._combine_kernel()
    _check_combine(dtype, k, held, 4096, device="cuda")


def test_combine_torch_is_the_weighted_sum_of_the_picks():
    # float64: the gathered, weighted, summed rows straight from the definition.
    y, weights, pos = _combine_case(torch.float64, 5, 2, 33, 8, seed=2)
    want = torch.zeros(5, 33, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            if pos[t * 2 + j] >= 0:
                want[t] += weights[t, j].double() * y[pos[t * 2 + j]]
    torch.testing.assert_close(kernels.combine_picks(y, weights, pos), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens,kernel", [(1, "embedding"), (2, "index"), (16, "index"),
                                           (64, "index"), (65, "embedding")])
def test_embedding_indexes_a_few_tokens_on_the_gpu(tokens, kernel):
    """The reference's lookup of 2 to 64 tokens on a GPU indexes the table
    (along the GPU branches here: ``counting.CudaPaths``), one call of either
    kernel, the same rows as ``Fn.embedding``; off the GPU it is embedding."""
    from shardwise.model.reference import Embedding
    from shardwise.perf.counting import CallCounter, CudaPaths

    table = Embedding(100, 8)
    ids = torch.randint(0, 100, (2, tokens))[:1]
    with CudaPaths(), CallCounter(names=True) as counter:
        rows = table(ids)
    assert counter.names[("kernels", kernel)] == 1
    assert counter.names.get(("kernels", {"index": "embedding"}.get(kernel, "index")), 0) == 0
    assert torch.equal(rows, Fn.embedding(ids, table.weight))
    with CallCounter(names=True) as counter:
        assert torch.equal(table(ids), rows)
    assert counter.names[("kernels", "embedding")] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_gemv_activates_swiglu_as_it_loads_with_the_same_values(monkeypatch, dtype):
    """The down-projection's GEMV computing ``silu(gate) * up`` as it loads its
    input (``SWIGLU``) gives the bits of the swiglu kernel's launch followed by
    the GEMV's (both interpreted): for one row by one matrix
    (``linear(..., gated=True)``), and for routed expert rows (``expert_rows(...,
    gated=True)``); two rows are the GEMM's, untouched, and off the GPU it is
    the PyTorch forms."""
    gemv = interpreted("shardwise.model.triton_moe", "expert_rows_kernel")
    act = interpreted("shardwise.model.triton_swiglu", "swiglu_kernel")
    monkeypatch.setattr(kernels, "_experts_kernel", lambda: gemv)
    monkeypatch.setattr(kernels, "_swiglu_kernel", lambda: act)
    g = torch.Generator().manual_seed(3)
    F, O = 300, 40  # F off the blocks' multiples
    h = (2 * torch.randn(1, 1, 2 * F, generator=g)).to(dtype)
    w = torch.randn(O, F, generator=g).to(dtype)
    off_gpu = kernels.linear(h, w, gated=True)
    assert torch.equal(off_gpu, Fn.linear(Fn.silu(h[..., :F]) * h[..., F:], w))
    launches = []
    real = kernels._expert_rows_launch
    monkeypatch.setattr(kernels, "_expert_rows_launch",
                        lambda *a, **k: launches.append(k) or real(*a, **k))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    fused = kernels.linear(h, w, gated=True)
    assert launches == [{"DENSE": True, "SWIGLU": True}]
    assert torch.equal(fused, kernels.linear(kernels.swiglu(h), w))
    kernels.linear(h.expand(1, 2, 2 * F), w, gated=True)  # two rows: swiglu's launch, then a GEMM
    assert len(launches) == 2
    # Routed rows: 4 rows of experts 1-4, of which this rank holds 2-4.
    x, wd, experts = _expert_case(dtype, R=4, per=1, O=O, I=F)
    rows = (2 * torch.randn(4, 2 * F, generator=g)).to(dtype)
    got = kernels.expert_rows(rows, wd, experts, 2, 1, gated=True)
    assert torch.equal(got, kernels.expert_rows(kernels.swiglu(rows), wd, experts, 2, 1))
    with pytest.raises(ValueError, match="not DOT's"):
        real(rows, wd, experts, 2, 1, DOT=True, SWIGLU=True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("O,F", [(4096, 14336), (5120, 13824), (100, 70)])
def test_swiglu_gemv_on_the_gpu(dtype, O, F):
    h = torch.randn(1, 1, 2 * F, device="cuda").to(dtype)
    w = (torch.randn(O, F, device="cuda") * 0.02).to(dtype)
    assert torch.equal(kernels.linear(h, w, gated=True), kernels.linear(kernels.swiglu(h), w))


def test_dependent_launches_only_on_the_gpu(monkeypatch):
    """Kernels launch as programmatic dependents only on a CUDA device, never
    under Triton's interpreter or while a step is counted or recorded (the
    stand-ins take the kernels' own arguments), and not with the switch off."""
    assert kernels.pdl(torch.device("cpu")) == {}
    monkeypatch.setattr(kernels, "_cuda_pdl", lambda index: {"PDL": True, "launch_pdl": True})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.pdl(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(kernels, "LOAD_HOOK", lambda *a: None)
    assert kernels.pdl(torch.device("cuda", 0)) == {}
    monkeypatch.setattr(kernels, "LOAD_HOOK", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.pdl(torch.device("cuda", 0)) == {}
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(kernels, "PDL", False)
    assert kernels.pdl(torch.device("cuda", 0)) == {}


@pytest.mark.gpu
@cuda
def test_dependent_launches_compute_what_ordered_launches_do(monkeypatch):
    """A chain of kernels each reading what the one before wrote (add + norm,
    then a 16-row product, eight times over), launched as programmatic
    dependents, eagerly and replayed in a CUDA graph: the bits of the same
    chain launched in plain stream order. A kernel that read its input
    before its wait would race the one before it."""
    g = torch.Generator(device="cuda").manual_seed(0)
    D = 4096
    norm = nn.RMSNorm(D, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(D, D, device="cuda", generator=g).bfloat16() * 0.02 for _ in range(4)]
    x0 = torch.randn(16, D, device="cuda", generator=g).bfloat16()

    def chain(x):
        a = None
        for i in range(8):
            x, n = kernels.add_norm(norm, x, a)
            a = kernels.linear(n, ws[i % 4])
        return x + a

    if torch.cuda.get_device_capability()[0] >= 9:
        assert kernels.pdl(x0.device)  # the launches below are dependent ones
    dependent = chain(x0)
    graph = torch.cuda.CUDAGraph()
    chain(x0)
    with torch.cuda.graph(graph):
        replayed = chain(x0)
    graph.replay()
    monkeypatch.setattr(kernels, "PDL", False)
    ordered = chain(x0)
    assert torch.equal(dependent, ordered) and torch.equal(replayed, ordered)
