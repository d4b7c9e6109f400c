"""Peers: what a user gets from plain PyTorch (and Hugging Face), timed in the same harness.

* ``torch_eager:1``: a plainly written single-device model of any ModelSpec:
  separate Q/K/V projections (with their biases where the model has them),
  rotary embeddings from a precomputed cos/sin table (model/rope.py's
  frequencies, scaled as the model says), grouped-query attention through
  fused SDPA with ``enable_gqa`` (no repeat of the K/V heads), ``F.gelu`` or
  SwiGLU, ``nn.LayerNorm`` or ``nn.RMSNorm``, the embedding and LM head (tied
  or not), a static KV cache; MoE as a plain loop over the experts, each on
  the tokens routed to it. Its dense decode step is captured in a CUDA graph
  like shardwise's (the MoE loop asks the device which tokens each expert
  got, a host synchronisation that a graph cannot hold).
* ``torch_tp:T``: the same model under PyTorch's own DTensor tensor parallel
  (``parallelize_module``: ``ColwiseParallel`` for Q/K/V and the MLP inputs
  of every expert, ``RowwiseParallel`` for the output projections, the
  embedding split by vocabulary rows and the LM head by vocabulary columns),
  as in torchtitan.
* ``torch_cp:P``: the same model's prefill under PyTorch's ``context_parallel``
  (``torch.distributed.tensor.experimental``): the prompt is sharded along
  the sequence with its head-tail load balancer and every causal SDPA call
  becomes ring attention over the P ranks; the output is gathered back with
  ``context_parallel_unshard``. It has no decode (PyTorch offers none), and
  needs CUDA (its ring attention dispatches the GPU SDPA kernels).
* ``hf:1`` (or ``hf``): Hugging Face's own model class (``bench/hf_peer.py``).

They implement the Strategy interface so the engine runs, verifies and times
them exactly like shardwise's strategies. Their collectives run inside DTensor,
so their bytes are not counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from ..model.load import set_param
from ..model.reference import KVCache, causal_attention, make_norm, route, router_logits
from ..model.rope import Rope
from ..parallel.base import Strategy
from ..parallel.checks import divides
from ..parallel.topology import Topology
from ..spec import ShardwiseError
from .hf_peer import HFModel


class RotaryTable(nn.Module):
    """cos/sin of every position up to ``max_len`` (float32 ``[max_len, d]``),
    computed once and indexed by position, as gpt-fast's ``freqs_cis``."""

    def __init__(self, rope: Rope, max_len: int, device):
        super().__init__()
        ang = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32),
                          rope.inv_freq(device))  # [max_len, d/2]
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos(), ang.sin()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, pos) -> torch.Tensor:
        """``x [B, T, H, d]`` rotated for positions ``pos..pos+T`` (``pos``
        an int or a 0-d device tensor), in float32 like transformers."""
        at = pos + torch.arange(x.shape[1], device=x.device)
        cos, sin = self.cos[at][None, :, None], self.sin[at][None, :, None]  # [1, T, 1, d]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


class PlainAttention(nn.Module):
    def __init__(self, spec, rotary: RotaryTable | None):
        super().__init__()
        D, d = spec.d_model, spec.head_dim
        self.head_dim = d
        self.rotary = rotary  # one table, shared by every layer
        self.wq = nn.Linear(D, spec.n_heads * d, bias=spec.qkv_bias)
        self.wk = nn.Linear(D, spec.kv_heads * d, bias=spec.qkv_bias)
        self.wv = nn.Linear(D, spec.kv_heads * d, bias=spec.qkv_bias)
        self.wo = nn.Linear(spec.n_heads * d, D, bias=False)

    def forward(self, x, cache, pos):
        B, T, _ = x.shape
        d = self.head_dim
        # -1: after tensor parallelism each rank holds only its heads.
        q = self.wq(x).view(B, T, -1, d)
        k = self.wk(x).view(B, T, -1, d)
        v = self.wv(x).view(B, T, -1, d)
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H*, T, d]
        if cache is not None:
            k, v = cache.write(pos, k, v)
        o = causal_attention(q, k, v, pos)  # SDPA; grouped-query through enable_gqa
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


class PlainMLP(nn.Module):
    def __init__(self, d_model, d_ff, activation="gelu"):
        super().__init__()
        self.activation = activation
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_gate = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        if self.w_gate is not None:
            return self.w_down(Fn.silu(self.w_gate(x)) * self.w_up(x))
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.w_down(Fn.gelu(self.w_up(x), approximate=approximate))


class PlainMoE(nn.Module):
    """Top-k routed experts, each run on the tokens that chose it."""

    def __init__(self, spec):
        super().__init__()
        self.top_k = spec.top_k
        self.router = nn.Linear(spec.d_model, spec.n_experts, bias=False)
        self.experts = nn.ModuleList(PlainMLP(spec.d_model, spec.d_ff, spec.activation)
                                     for _ in range(spec.n_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        # The reference's router (fp32 scores, softmax over the top k), so a
        # near-tie is broken the same way.
        weights, chosen = route(router_logits(self.router, x), self.top_k)  # [N, k]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y = expert(x[token]) * weights[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y)
        return out.view(shape)


class PlainBlock(nn.Module):
    def __init__(self, spec, rotary):
        super().__init__()
        self.attn_norm, self.mlp_norm = make_norm(spec), make_norm(spec)
        self.attn = PlainAttention(spec, rotary)
        self.mlp = PlainMoE(spec) if spec.is_moe else PlainMLP(spec.d_model, spec.d_ff,
                                                               spec.activation)

    def forward(self, x, cache, pos):
        h = x + self.attn(self.attn_norm(x), cache, pos)
        return h + self.mlp(self.mlp_norm(h))


def _load_mlp(mlp: PlainMLP, loader, prefix: str, expert: int | None = None) -> None:
    """Fill ``mlp`` from ``prefix.w_up`` etc. (row ``expert`` of an MoE's stacked weights)."""
    index = None if expert is None else [torch.tensor([expert])]
    for name in ("w_up", "w_gate", "w_down"):
        if getattr(mlp, name) is not None:
            w = loader.get(f"{prefix}.{name}", index)
            set_param(getattr(mlp, name), "weight", w if expert is None else w[0])


class TorchEager(Strategy):
    name = "torch_eager"

    @classmethod
    def ranks_needed(cls, plan):
        if plan.shape not in ((), (1,)):
            raise ShardwiseError(f"plan {plan}: {cls.name} runs on one device; write {cls.name}:1")
        return 1

    @classmethod
    def validate(cls, spec, workload, plan, world_size):
        cls.ranks_needed(plan)
        return Topology(("tp",), (1,))

    @property
    def supports_graphs(self) -> bool:
        return not self.spec.is_moe  # the expert loop reads routing on the host

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        rope = Rope.of(spec)
        self.rotary = RotaryTable(rope, workload.max_len, self.device) if rope else None
        has_vocab = spec.vocab_size is not None
        with torch.device("meta"):
            self.embed = nn.Embedding(spec.vocab_size, spec.d_model) if has_vocab else None
            self.layers = nn.ModuleList(PlainBlock(spec, self.rotary)
                                        for _ in range(spec.n_layers))
            self.norm = make_norm(spec)
            self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False) if has_vocab else None
        for i, blk in enumerate(self.layers):
            p = f"layers.{i}"
            for name in ("wq", "wk", "wv", "wo"):
                set_param(getattr(blk.attn, name), "weight", loader.get(f"{p}.attn.{name}"))
            if spec.qkv_bias:
                for name in ("q", "k", "v"):
                    set_param(getattr(blk.attn, f"w{name}"), "bias", loader.get(f"{p}.attn.b{name}"))
            if spec.is_moe:
                set_param(blk.mlp.router, "weight", loader.get(f"{p}.moe.router"))
                for e, expert in enumerate(blk.mlp.experts):
                    _load_mlp(expert, loader, f"{p}.moe", e)
            else:
                _load_mlp(blk.mlp, loader, f"{p}.mlp")
            loader.norm(blk.attn_norm, f"{p}.attn_norm")
            loader.norm(blk.mlp_norm, f"{p}.mlp_norm")
        loader.norm(self.norm, "norm")
        if has_vocab:
            set_param(self.embed, "weight", loader.get("embed.weight"))
            if spec.tie_embeddings:
                self.lm_head.weight = self.embed.weight  # one matrix, as the model ties them
            else:
                set_param(self.lm_head, "weight", loader.lm_head())
        self.parallelize()
        kv_local = spec.kv_heads // (topo.size("tp") if "tp" in topo.axes else 1)
        self.caches = [KVCache.allocate(workload.batch, kv_local, workload.max_len,
                                        spec.head_dim, self.dtype, self.device)
                       for _ in self.layers]

    def parallelize(self):
        pass

    def forward(self, inputs, pos):
        x = self.embed(inputs) if self.embed is not None else inputs
        for blk, cache in zip(self.layers, self.caches):
            x = blk(x, cache, pos)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else x

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
        tp = cls.ranks_needed(plan)
        divides(f"{spec.name}: n_kv_heads", spec.kv_heads, tp, f"tp of {plan}", "use a divisor")
        divides(f"{spec.name}: d_ff", spec.d_ff, tp, f"tp of {plan}", "use a divisor")
        if spec.vocab_size is not None:
            divides(f"{spec.name}: vocab_size", spec.vocab_size, tp, f"tp of {plan}",
                    "use a divisor")
        return Topology(("tp",), (tp,))

    def parallelize(self):
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (
            ColwiseParallel, RowwiseParallel, parallelize_module)

        mesh = self.topo.mesh["tp"]
        mlp = {"w_up": ColwiseParallel(), "w_down": RowwiseParallel()}
        if self.spec.activation == "swiglu":
            mlp["w_gate"] = ColwiseParallel()
        for blk in self.layers:
            parallelize_module(blk.attn, mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(),
                                                "wv": ColwiseParallel(),
                                                "wo": RowwiseParallel()})
            for m in (blk.mlp.experts if self.spec.is_moe else [blk.mlp]):
                parallelize_module(m, mesh, mlp)
        if self.embed is not None:
            # torchtitan's vocabulary split; a tied head gets its own shard of
            # the matrix (DTensor distributes each module's parameter).
            parallelize_module(self, mesh, {
                "embed": RowwiseParallel(input_layouts=Replicate()),
                "lm_head": ColwiseParallel(output_layouts=Replicate())})


class TorchCP(_OneAxisPeer):
    name = "torch_cp"
    degree = "P"
    prefill_only = True
    needs_cuda = True

    @classmethod
    def validate(cls, spec, workload, plan, world_size):
        cp = cls.ranks_needed(plan)
        if spec.rope_theta is not None:
            raise ShardwiseError(
                f"peer torch_cp covers models without rotary embeddings (context_parallel "
                f"shards the sequence and gives the rotation no positions); {spec.name} has "
                f"them: compare with torch_tp or torch_eager:1")
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
        x = self.embed(inputs) if self.embed is not None else inputs.clone()
        with context_parallel(mesh, buffers=[x], buffer_seq_dims=[1], no_restore_buffers={x}):
            for blk in self.layers:
                x = blk(x, None, 0)
            x = self.norm(x)
        x = context_parallel_unshard(mesh, [x], [1])[0]
        return self.lm_head(x) if self.lm_head is not None else x


PEERS = {"torch_eager": TorchEager, "torch_tp": TorchTP, "torch_cp": TorchCP, "hf": HFModel}
