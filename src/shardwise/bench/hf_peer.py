"""The ``hf:1`` peer (also ``hf``): Hugging Face's own model class, the baseline most users know.

``AutoModelForCausalLM.from_config`` builds the transformers class that
computes what the ModelSpec describes (:func:`hf_config`: ``LlamaForCausalLM``
for a dense model, ``Qwen2ForCausalLM`` when it has q/k/v biases,
``MixtralForCausalLM`` for MoE) with ``attn_implementation="sdpa"``. Its
weights come from the same WeightSource as shardwise's (a checkpoint or the
synthetic weights), placed by the inverse of ``model/checkpoint.py``'s name
map, so its outputs are verified against the reference like any plan's.

Decode runs from a ``StaticCache`` (preallocated ``[B, Hkv, max_len, d]``):
the step's shapes do not depend on the position, so the bench harness
captures a dense model's step in a CUDA graph like the others, with the
position in a 0-d device tensor. An MoE model's step stays eager: its routing
may read the device on the host (transformers 4.x loops over the experts
hit; 5.x falls back to such a loop where its grouped GEMM is missing).
``hf:1,cache=dynamic`` decodes from a ``DynamicCache`` (grown by each step),
what ``generate`` uses by default; so does a class that takes no static cache.

transformers is optional: it is imported when the peer is validated, and its
absence is a one-line error before any process starts.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect

import torch

from ..model.checkpoint import hf_name_map
from ..parallel.base import Strategy
from ..parallel.topology import Topology
from ..spec import ModelSpec, ShardwiseError


def _no_equivalent(spec: ModelSpec) -> list[str]:
    """What keeps ``spec`` from being a Llama / Qwen2 / Mixtral model."""
    why = []
    if spec.vocab_size is None:
        why.append("no vocabulary")
    if spec.norm != "rmsnorm":
        why.append("LayerNorm")
    if spec.activation != "swiglu":
        why.append(f"a {spec.activation} MLP")
    if spec.rope_theta is None:
        why.append("no rotary embedding")
    if spec.is_moe and spec.qkv_bias:
        why.append("q/k/v biases in an MoE model")
    return why


def hf_config(spec: ModelSpec):
    """The transformers config of the architecture that computes ``spec``
    (the inverse of ``model/checkpoint.py``'s ``spec_from_config``)."""
    import transformers

    why = _no_equivalent(spec)
    if why:
        raise ShardwiseError(
            f"peer hf: {spec.name} has no Hugging Face equivalent ({', '.join(why)}; the "
            f"GPT-style presets are not a transformers architecture); compare it with "
            f"torch_eager:1")
    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, hidden_act="silu",
        rms_norm_eps=spec.norm_eps, rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_embeddings,
    )
    if spec.rope_scaling:
        common["rope_scaling"] = dict(spec.rope_scaling)
    if spec.is_moe:
        return transformers.MixtralConfig(**common, num_local_experts=spec.n_experts,
                                          num_experts_per_tok=spec.top_k, sliding_window=None)
    if spec.qkv_bias:
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    return transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)


@contextlib.contextmanager
def _built_in(dtype: torch.dtype, device: torch.device):
    """Modules made inside get empty ``dtype`` parameters on ``device``: no
    random initialisation (the weights are loaded next), no float32 copy."""
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(default)


def build_hf_model(spec: ModelSpec, loader) -> torch.nn.Module:
    """transformers' model of ``spec`` on ``loader``'s device and dtype,
    every parameter read from ``loader`` (each tensor whole: one device)."""
    from transformers import AutoModelForCausalLM

    with _built_in(loader.dtype, loader.device):
        model = AutoModelForCausalLM.from_config(hf_config(spec), attn_implementation="sdpa")
    # No ``.to(dtype)``: the rotary frequencies stay float32, as from_pretrained leaves them.
    model.eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    filled = set()
    with torch.no_grad():
        for name, ref in hf_name_map(spec, model.state_dict().keys()).items():
            value = loader.get(name)
            if len(ref.tensors) > 1:  # one tensor per expert
                for e, hf in enumerate(ref.tensors):
                    params[hf].copy_(value[e])
            else:
                dst = params[ref.tensors[0]]
                if ref.offset:  # the gate or up half of a fused gate_up_proj
                    dst = dst[tuple(slice(o, o + n) for o, n in zip(ref.offset, value.shape))]
                dst.copy_(value)
            filled.update(ref.tensors)
    if spec.tie_embeddings:
        model.tie_weights()
        filled.add("lm_head.weight")
    missed = sorted(set(params) - filled)
    if missed:
        raise RuntimeError(f"{type(model).__name__} has parameters shardwise does not map: "
                           f"{missed[:4]}")
    return model


def _static_cache(config, batch: int, max_len: int, dtype, device):
    """A StaticCache of ``batch`` x ``max_len`` positions, through whichever
    constructor this transformers release has (4.x sizes it up front, 5.x on
    its first write)."""
    from transformers import StaticCache

    accepted = inspect.signature(StaticCache.__init__).parameters
    offered = {"config": config, "max_cache_len": max_len, "max_batch_size": batch,
               "batch_size": batch, "device": device, "dtype": dtype}
    return StaticCache(**{k: v for k, v in offered.items() if k in accepted})


def _seek(cache, pos: int) -> None:
    """Make a static cache write its next keys at ``pos``. transformers >= 5
    writes where a per-layer device counter says and advances it (so a
    captured step replays at the next position, as the bench harness moves
    its position tensor); earlier releases write at ``cache_position``.
    Positions past ``pos`` keep stale values, which the causal mask hides."""
    for layer in getattr(cache, "layers", []):
        written = getattr(layer, "cumulative_length", None)
        if isinstance(written, torch.Tensor):
            written.fill_(pos)


class _CacheBytes:
    """``nbytes()`` of a transformers cache, for the run's record."""

    def __init__(self, peer: "HFModel"):
        self.peer = peer

    def nbytes(self) -> int:
        cache = self.peer.cache
        if cache is None:
            return 0
        if hasattr(cache, "layers"):  # transformers >= 4.56
            tensors = [t for layer in cache.layers
                       for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
        else:
            tensors = [*cache.key_cache, *cache.value_cache]
        return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


CACHE_OPTIONS = {("cache", "static"), ("cache", "dynamic")}


class HFModel(Strategy):
    name = "hf"

    @classmethod
    def ranks_needed(cls, plan):
        if plan.shape not in ((), (1,)):
            raise ShardwiseError(f"plan {plan}: Hugging Face's model runs on one device; "
                                 f"write hf:1 (or hf)")
        return 1

    @classmethod
    def validate(cls, spec, workload, plan, world_size):
        cls.ranks_needed(plan)
        unknown = [(k, v) for k, v in plan.options if (k, v) not in CACHE_OPTIONS]
        if unknown:
            raise ShardwiseError(f"plan {plan}: hf takes the option cache=static|dynamic "
                                 f"(default static), not {unknown[0][0]}={unknown[0][1]}")
        if importlib.util.find_spec("transformers") is None:
            raise ShardwiseError("peer hf needs transformers (pip install transformers); "
                                 "or compare with torch_eager:1")
        hf_config(spec)  # refuses a model transformers has no class for
        return Topology(("tp",), (1,))

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        self.hf = build_hf_model(spec, loader)
        # transformers < 5 marks the classes that take a static cache.
        self.static = (plan.option("cache", "static") == "static"
                       and getattr(self.hf, "_supports_static_cache", None) is not False)
        self.cache = (_static_cache(self.hf.config, workload.batch, workload.max_len,
                                    self.dtype, self.device) if self.static else None)
        self.caches = [_CacheBytes(self)]
        # transformers 5.x names the cache argument ``cache`` and finds positions
        # from ``position_ids``; 4.x takes ``past_key_values`` and writes a
        # static cache at ``cache_position``.
        accepted = inspect.signature(type(self.hf).forward).parameters
        self.cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self.takes_cache_position = "cache_position" in accepted
        self.next_pos = 0  # where the static cache writes next, when the host knows

    @property
    def supports_graphs(self) -> bool:
        # MoE routing may read the device on the host (transformers 4.x loops
        # over the experts hit; 5.x falls back to a loop where its grouped
        # GEMM kernel is missing), which a graph cannot hold.
        return self.static and not self.spec.is_moe

    def seek(self, pos: int) -> None:
        if self.static:  # transformers >= 5: each replay moved the cache's counter on
            _seek(self.cache, pos)

    def forward(self, inputs, pos):
        T = inputs.shape[1]
        at = pos + torch.arange(T, device=inputs.device)  # cache_position [T]
        if self.static:
            if not isinstance(pos, int):
                self.next_pos = None  # the cache's own counter moved on the device
            else:
                if pos != self.next_pos:  # a new prompt, or a step repeated
                    _seek(self.cache, pos)
                self.next_pos = pos + T
        else:
            from transformers import DynamicCache

            if isinstance(pos, torch.Tensor):
                raise ShardwiseError(f"{self.plan}: {self.spec.name} decodes from a dynamic "
                                     f"cache; it has no static-shape step")
            if pos == 0:
                self.cache = DynamicCache()
            elif self.cache.get_seq_length() > pos:  # a step repeated: it appends where it ends
                self.cache.crop(pos - self.cache.get_seq_length())  # < 0: drop the tail
            elif self.cache.get_seq_length() < pos:
                raise RuntimeError(f"hf decode at position {pos} but the dynamic cache holds "
                                   f"{self.cache.get_seq_length()} positions")
        out = self.hf(input_ids=inputs, position_ids=at[None].expand(inputs.shape[0], T),
                      use_cache=True, **{self.cache_arg: self.cache},
                      **({"cache_position": at} if self.takes_cache_position else {}))
        return out.logits.to(self.dtype)

    def collect(self, local):
        return self.send_to_root(local, 0)

    def report(self) -> dict:
        import transformers

        return {"hf_class": type(self.hf).__name__, "transformers": transformers.__version__,
                "cache": "static" if self.static else "dynamic"}
