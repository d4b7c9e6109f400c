"""Which tokens' expert choice a rounding of the router's input can change.

A top-k router is discontinuous: when the k-th and (k+1)-th expert scores of
a token are nearly tied, a difference of one low-precision rounding in the
token's hidden state (which any partitioning makes: partial sums are added in
another order) picks another expert, and that token's MLP output changes by
O(1). Such a token is not a wrong answer, but one flip among a few thousand
tokens moves the relative error of the whole output by ~1e-2 in bf16.

So verification of MoE models also reports, for each step, the tokens whose
routing is *undetermined at the model's precision* in the reference, and the
error over the other tokens. A token is flagged in a layer when its top-k
margin is below twice the typical move of its scores when every input element
carries an independent relative error of ``eps`` (2^-8 bf16, 2^-11 fp16,
2^-24 fp32), ``slack`` standard deviations wide: ``slack * eps *
sqrt(sum_i (W_ei x_i)^2)``, largest over experts.

A *routing flip* is a near-tied token whose output row departs from the
reference's by more than ``FLIP_ROW_ERR`` (relative): rounding alone moves a
row by ~1e-2 in bf16, a different expert by O(1). Verification of MoE models
judges the error over every token except the flips (a token that departs
without being near-tied still counts), and reports the flips and the
all-token error beside it, with the reference's own departure from itself
when it runs the batch as two halves: other GEMM shapes, hence other
roundings, flip near-ties in the single-device model too.
"""
from __future__ import annotations

import torch

from ..model.reference import MoE, router_logits

FLIP_ROW_ERR = 0.1

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


class NearTies:
    """Forward hooks on a model's MoE layers that flag near-tied tokens."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, slack: float = 4.0):
        self.scale = EPS.get(dtype, 2.0**-8) * slack
        self.flags: torch.Tensor | None = None  # [B, T] for the current forward
        self.handles = [m.register_forward_pre_hook(self._hook)
                        for m in model.modules() if isinstance(m, MoE)
                        and m.top_k < m.router.weight.shape[0]]

    def _hook(self, module: MoE, args) -> None:
        x = args[0]  # [B, T, D]
        flat = x.reshape(-1, x.shape[-1])
        k = module.top_k
        top = router_logits(module.router, flat).topk(k + 1, dim=-1).values  # [N, k+1]
        margin = top[:, k - 1] - top[:, k]
        # Independent relative roundings of the x_i move score e by about
        # eps * sqrt(sum_i (W_ei x_i)^2): the root-sum-square, not the worst case.
        w2, x2 = module.router.weight.float() ** 2, flat.float() ** 2
        bound = (x2 @ w2.t()).sqrt().amax(-1)  # [N]
        near = (margin < 2 * self.scale * bound).view(x.shape[:2])
        self.flags = near if self.flags is None else self.flags | near

    def take(self) -> torch.Tensor | None:
        """The flags of the forward just run (None: no routed layer), then reset."""
        flags, self.flags = self.flags, None
        return flags

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def flips(out: torch.Tensor, ref: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` booleans: near-tied tokens (``near``) whose output row
    departs from the reference's by more than ``FLIP_ROW_ERR`` (relative)."""
    diff = (out.double() - ref.double()).norm(dim=-1)
    row = diff / ref.double().norm(dim=-1).clamp_min(1e-300)
    return near & (row > FLIP_ROW_ERR)
