"""Rotary position embedding (Su et al. 2021, "RoFormer"), with the frequency
scalings of the published models that use it.

A head's dims are rotated in pairs ``(i, i + d/2)`` (Hugging Face's "rotate
half" layout) by the angle ``position * inv_freq[i]``. ``inv_freq[i] =
theta^(-2i/d)``, rescaled where the model says so:

* ``linear`` (position interpolation, Chen et al. 2023): every frequency / factor;
* ``llama3`` (Llama 3.1): wavelengths longer than ``original / low_freq_factor``
  are stretched by ``factor``, those shorter than ``original /
  high_freq_factor`` are kept, and those between are interpolated smoothly.

The frequencies are computed in float32 exactly as transformers computes them,
so a checkpoint's rotary embedding matches its own model's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..spec import ModelSpec

# rope_type -> the scaling keys it needs (besides rope_type).
SCALINGS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def scaling_problem(scaling: dict) -> str | None:
    """Why ``scaling`` (a spec's ``rope_scaling`` as a dict) cannot be computed, or None."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SCALINGS:
        return (f"rope_scaling type {kind!r} is not supported (shardwise computes "
                f"{', '.join(SCALINGS)}); use a model without it")
    missing = [k for k in SCALINGS[kind] if k not in scaling]
    if missing:
        return f"rope_scaling of type {kind!r} needs {', '.join(missing)}"
    for k in SCALINGS[kind]:
        v = scaling[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            return f"rope_scaling {k} = {v!r} must be a positive number"
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return "rope_scaling high_freq_factor must exceed low_freq_factor"
    return None


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of a model: ``head_dim``, base ``theta`` and its scaling."""

    head_dim: int
    theta: float
    scaling: tuple = ()  # ModelSpec.rope_scaling pairs; () for plain frequencies

    @classmethod
    def of(cls, spec: ModelSpec) -> "Rope | None":
        if spec.rope_theta is None:
            return None
        return cls(spec.head_dim, spec.rope_theta, spec.rope_scaling or ())

    @property
    def kind(self) -> str:
        s = dict(self.scaling)
        return s.get("rope_type", s.get("type", "default"))

    def inv_freq(self, device=None) -> torch.Tensor:
        """``[d/2]`` float32 frequencies, scaled as the model says."""
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64)
                                    .to(device=device, dtype=torch.float32) / d))
        s = dict(self.scaling)
        if self.kind == "linear":
            return inv / s["factor"]
        if self.kind == "llama3":
            factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            original = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            stretched = torch.where(wavelen > original / lo, inv / factor, inv)
            smooth = (original / wavelen - lo) / (hi - lo)
            between = (1 - smooth) * stretched / factor + smooth * stretched
            medium = ~(wavelen < original / hi) & ~(wavelen > original / lo)
            return torch.where(medium, between, stretched)
        return inv

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [T, d]`` (float32) for absolute ``positions [T]``."""
        ang = torch.outer(positions.to(torch.float32), self.inv_freq(positions.device))  # [T, d/2]
        ang = torch.cat([ang, ang], -1)
        return ang.cos(), ang.sin()

    def apply(self, x: torch.Tensor, pos) -> torch.Tensor:
        """``x [B, T, H, d]`` rotated for absolute positions ``pos..pos+T``
        (``pos`` an int or a 0-d device tensor); computed in float32."""
        B, T, H, d = x.shape
        cos, sin = self.cos_sin(pos + torch.arange(T, device=x.device))
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        xf = x.float()
        x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
