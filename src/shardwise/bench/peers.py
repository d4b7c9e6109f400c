"""Peers: what a user gets from plain PyTorch, timed in the same harness.

* ``torch_eager:1``: a plainly written single-device model (separate Q/K/V
  projections, ``F.gelu``, ``nn.LayerNorm``, fused SDPA, a static KV cache; its
  decode step is captured in a CUDA graph like shardwise's).
* ``torch_tp:T``: the same model under PyTorch's own DTensor tensor parallel
  (``parallelize_module`` with ``ColwiseParallel`` for Q/K/V and the MLP input,
  ``RowwiseParallel`` for the output projections), as in torchtitan.
* ``torch_cp:P``: the same model's prefill under PyTorch's ``context_parallel``
  (``torch.distributed.tensor.experimental``): the prompt is sharded along
  the sequence with its head-tail load balancer and every causal SDPA call
  becomes ring attention over the P ranks; the output is gathered back with
  ``context_parallel_unshard``. It has no decode (PyTorch offers none), and
  needs CUDA (its ring attention dispatches the GPU SDPA kernels).

They implement the Strategy interface so the engine runs, verifies and times
them exactly like shardwise's strategies. Their collectives run inside DTensor,
so their bytes are not counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from ..model.load import set_param
from ..model.reference import KVCache, causal_attention, make_norm
from ..parallel.base import Strategy, divides
from ..parallel.topology import Topology
from ..spec import ShardwiseError


class PlainAttention(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x, cache, pos):
        B, T, _ = x.shape
        d = self.head_dim
        # -1: after tensor parallelism each rank holds only its heads.
        q = self.wq(x).view(B, T, -1, d).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, d).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(pos, k, v)
        o = causal_attention(q, k, v, pos)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


class PlainMLP(nn.Module):
    def __init__(self, d_model, d_ff, approximate="none"):
        super().__init__()
        self.approximate = approximate
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.w_down(Fn.gelu(self.w_up(x), approximate=self.approximate))


class PlainBlock(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.attn_norm, self.mlp_norm = make_norm(spec), make_norm(spec)
        self.attn = PlainAttention(spec.d_model, spec.n_heads, spec.kv_heads, spec.head_dim)
        self.mlp = PlainMLP(spec.d_model, spec.d_ff,
                            "tanh" if spec.activation == "gelu_tanh" else "none")

    def forward(self, x, cache, pos):
        h = x + self.attn(self.attn_norm(x), cache, pos)
        return h + self.mlp(self.mlp_norm(h))


def _check(spec, plan):
    if spec.is_moe or spec.activation not in ("gelu", "gelu_tanh") or spec.vocab_size or spec.rope_theta:
        raise ShardwiseError(
            f"peer {plan.strategy} covers dense GELU models without vocab or rotary; "
            f"{spec.name} is not one"
        )


class TorchEager(Strategy):
    name = "torch_eager"
    supports_graphs = True

    @classmethod
    def ranks_needed(cls, plan):
        return 1

    @classmethod
    def validate(cls, spec, workload, plan, world_size):
        _check(spec, plan)
        return Topology(("tp",), (1,))

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        with torch.device("meta"):
            self.layers = nn.ModuleList(PlainBlock(spec) for _ in range(spec.n_layers))
            self.norm = make_norm(spec)
        for i, blk in enumerate(self.layers):
            p = f"layers.{i}"
            for name in ("wq", "wk", "wv", "wo"):
                set_param(getattr(blk.attn, name), "weight", loader.get(f"{p}.attn.{name}"))
            set_param(blk.mlp.w_up, "weight", loader.get(f"{p}.mlp.w_up"))
            set_param(blk.mlp.w_down, "weight", loader.get(f"{p}.mlp.w_down"))
            loader.norm(blk.attn_norm, f"{p}.attn_norm")
            loader.norm(blk.mlp_norm, f"{p}.mlp_norm")
        loader.norm(self.norm, "norm")
        self.parallelize()
        kv_local = spec.kv_heads // (topo.size("tp") if "tp" in topo.axes else 1)
        self.caches = [KVCache.allocate(workload.batch, kv_local, workload.max_len,
                                        spec.head_dim, self.dtype, self.device)
                       for _ in self.layers]

    def parallelize(self):
        pass

    def forward(self, inputs, pos):
        x = inputs
        for blk, cache in zip(self.layers, self.caches):
            x = blk(x, cache, pos)
        return self.norm(x)

    def collect(self, local):
        return self.send_to_root(local, 0)


class _OneAxisPeer(TorchEager):
    """A peer over one mesh axis of ``plan.shape[0]`` ranks."""

    supports_graphs = False
    degree = "N"  # how the usage message names the degree

    @classmethod
    def ranks_needed(cls, plan):
        if len(plan.shape) != 1:
            raise ShardwiseError(f"plan {plan}: write {cls.name}:{cls.degree}")
        return plan.shape[0]


class TorchTP(_OneAxisPeer):
    name = "torch_tp"
    degree = "T"

    @classmethod
    def validate(cls, spec, workload, plan, world_size):
        _check(spec, plan)
        tp = cls.ranks_needed(plan)
        divides(f"{spec.name}: n_kv_heads", spec.kv_heads, tp, f"tp of {plan}", "use a divisor")
        divides(f"{spec.name}: d_ff", spec.d_ff, tp, f"tp of {plan}", "use a divisor")
        return Topology(("tp",), (tp,))

    def parallelize(self):
        from torch.distributed.tensor.parallel import (
            ColwiseParallel, RowwiseParallel, parallelize_module)

        mesh = self.topo.mesh["tp"]
        plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
                "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel(),
                "mlp.w_up": ColwiseParallel(), "mlp.w_down": RowwiseParallel()}
        for blk in self.layers:
            parallelize_module(blk, mesh, plan)


class TorchCP(_OneAxisPeer):
    name = "torch_cp"
    degree = "P"
    prefill_only = True
    needs_cuda = True

    @classmethod
    def validate(cls, spec, workload, plan, world_size):
        _check(spec, plan)
        cp = cls.ranks_needed(plan)
        # The head-tail balancer cuts the sequence into 2P equal chunks.
        divides("sequence length", workload.seq_len, 2 * cp, f"2 x the ranks of {plan}",
                f"use a sequence length that is a multiple of {2 * cp}")
        return Topology(("cp",), (cp,))

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        self.caches = []  # prefill only: no cache

    def forward(self, inputs, pos):
        # Public in newer releases; in torch 2.11 the unshard lives beside it, privately.
        from torch.distributed.tensor.experimental._attention import (
            context_parallel, context_parallel_unshard)

        if not isinstance(pos, int) or pos != 0 or inputs.shape[1] == 1:
            raise ShardwiseError(
                f"{self.plan} is a prefill-only peer (PyTorch's context_parallel has no "
                f"decode); time it with --phase prefill"
            )
        mesh = self.topo.mesh["cp"]
        x = inputs.clone()
        with context_parallel(mesh, buffers=[x], buffer_seq_dims=[1], no_restore_buffers={x}):
            for blk in self.layers:
                x = blk(x, None, 0)
            x = self.norm(x)
        return context_parallel_unshard(mesh, [x], [1])[0]


PEERS = {"torch_eager": TorchEager, "torch_tp": TorchTP, "torch_cp": TorchCP}
