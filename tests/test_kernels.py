"""Fused residual-add + norm: the GPU kernel against PyTorch's modules, and
the fallback everywhere else."""
import pytest
import torch
from torch import nn

from shardwise.model.kernels import add_norm, norm

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
