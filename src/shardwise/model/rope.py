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
from .once import made_once


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

    def table(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [n, d/2]`` (float32) of positions ``0..n-1``, ``n >= length``.

        Built once per rope, device and size (``n``: a power of two, at
        least :data:`TABLE_MIN`) and indexed by position afterwards, so a step
        never recomputes the frequencies or the angles. The angles are the
        float32 products ``position * inv_freq`` (exact positions up to
        2**24), the values transformers computes for each call."""
        n = max(TABLE_MIN, 1 << max(0, int(length) - 1).bit_length())
        device = torch.device(device)
        key = (self, device, n)
        if key not in _TABLES:
            with made_once():
                ang = torch.outer(torch.arange(n, dtype=torch.float32, device=device),
                                  self.inv_freq(device))  # [n, d/2]
                _TABLES[key] = (ang.cos(), ang.sin())
        return _TABLES[key]

    def cos_sin(self, pos, T: int, length: int | None = None, device=None):
        """``cos, sin [T, d/2]`` (float32) for positions ``pos..pos+T``: ``pos``
        an int, or a 0-d device tensor with every position below ``length``."""
        if isinstance(pos, torch.Tensor):
            cos, sin = self.table(length, pos.device)
            rows = pos + torch.arange(T, device=pos.device)
            return cos.index_select(0, rows), sin.index_select(0, rows)
        cos, sin = self.table(pos + T, device)
        return cos[pos : pos + T], sin[pos : pos + T]

    def apply(self, x: torch.Tensor, pos, length: int | None = None) -> torch.Tensor:
        """``x [B, T, H, d]`` rotated for absolute positions ``pos..pos+T``
        (``pos`` an int, or a 0-d device tensor with positions below
        ``length``), computed in float32: the plain PyTorch form of
        :func:`shardwise.model.rotary.rotate`."""
        cos, sin = self.cos_sin(pos, x.shape[1], length, x.device)
        return rotated(x, cos, sin)


# Rows of the smallest table: every prompt shorter than this shares one.
TABLE_MIN = 4096
_TABLES: dict = {}  # (rope, device, rows) -> (cos, sin)


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, d]`` rotated by ``cos, sin [T, d/2]``: dims ``(i, i + d/2)``
    -> ``(x_i c - x_{i+d/2} s, x_{i+d/2} c + x_i s)`` in float32, rounded to
    ``x``'s dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
