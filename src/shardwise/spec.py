"""Typed descriptions of what runs: the model, the workload and the plan.

Everything here is plain data. A :class:`Plan` is parsed from a short string
(``tp_pp:2x2,mb=2``) and validated by its strategy against the model and the
world size *before* any process starts (see :mod:`shardwise.parallel`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field


class ShardwiseError(ValueError):
    """A problem with the user's input, raised before any process starts.

    The message names the problem and, where one exists, the fix.
    """


# Names of torch's dtypes: torch is imported only when a dtype object is asked
# for, so describing models and plans (the CLI's listings, pre-launch checks)
# does not pay for importing it.
DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _dtype_name(name: str) -> str:
    try:
        return DTYPES[name]
    except KeyError:
        raise ShardwiseError(
            f"unknown dtype {name!r}; use one of fp32, fp16, bf16"
        ) from None


def torch_dtype(name: str) -> "torch.dtype":  # noqa: F821
    import torch

    return getattr(torch, _dtype_name(name))


def dtype_bytes(name: str) -> int:
    return ITEMSIZE[_dtype_name(name)]


# rope_type -> the scaling keys it needs (besides rope_type): the scalings
# model/rope.py computes. A spec and a checkpoint's config are checked against
# them before any tensor exists.
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def rope_scaling_problem(scaling: dict) -> str | None:
    """Why ``scaling`` (a spec's ``rope_scaling`` as a dict) cannot be computed, or None."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALING_KEYS:
        return (f"rope_scaling type {kind!r} is not supported (shardwise computes "
                f"{', '.join(ROPE_SCALING_KEYS)}); use a model without it")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        return f"rope_scaling of type {kind!r} needs {', '.join(missing)}"
    for k in ROPE_SCALING_KEYS[kind]:
        v = scaling[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            return f"rope_scaling {k} = {v!r} must be a positive number"
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return "rope_scaling high_freq_factor must exceed low_freq_factor"
    return None


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (dense, or Mixture-of-Experts when n_experts > 0).

    Layers are pre-norm: ``h = x + attn(norm(x)); y = h + mlp(norm(h))``.
    ``d_model`` need not equal ``n_heads * head_dim``.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    d_ff: int
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
    dtype: str = "bf16"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    # "gelu" (exact, erf) or "gelu_tanh" (tanh form, GPT-2/3): two-matrix MLP;
    # "swiglu": three-matrix (gate and up fused)
    activation: str = "gelu"
    n_experts: int = 0  # 0: dense MLP
    top_k: int = 2
    vocab_size: int | None = None  # None: inputs and outputs are hidden states
    norm_eps: float = 1e-5
    rope_theta: float | None = None  # None: no rotary embedding
    # Rotary frequency scaling as (key, value) pairs in Hugging Face's terms,
    # e.g. Llama 3.1's (("factor", 8.0), ("high_freq_factor", 4.0),
    # ("low_freq_factor", 1.0), ("original_max_position_embeddings", 8192),
    # ("rope_type", "llama3")); None: plain frequencies (model/rope.py).
    rope_scaling: tuple[tuple[str, float | int | str], ...] | None = None
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    tie_embeddings: bool = False  # the LM head is the embedding matrix

    def __post_init__(self):
        if self.rope_scaling is not None:
            # JSON gives lists or a dict; keep a hashable, ordered tuple of pairs.
            items = (self.rope_scaling.items() if isinstance(self.rope_scaling, dict)
                     else self.rope_scaling)
            object.__setattr__(self, "rope_scaling",
                               tuple(sorted((str(k), v) for k, v in items)) or None)
        problems = []
        for f in ("n_layers", "d_model", "n_heads", "head_dim", "d_ff"):
            if getattr(self, f) < 1:
                problems.append(f"{f} must be >= 1 (got {getattr(self, f)})")
        if self.n_kv_heads is not None and (
            self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads
        ):
            problems.append(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm must be 'layernorm' or 'rmsnorm' (got {self.norm!r})")
        if self.activation not in ("gelu", "gelu_tanh", "swiglu"):
            problems.append(f"activation must be 'gelu', 'gelu_tanh' or 'swiglu' "
                            f"(got {self.activation!r})")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.top_k <= self.n_experts):
            problems.append(
                f"top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})"
            )
        if self.rope_theta is not None and self.head_dim % 2:
            problems.append(f"rotary embedding needs an even head_dim (got {self.head_dim})")
        if self.rope_scaling is not None:
            if self.rope_theta is None:
                problems.append("rope_scaling needs rope_theta (a rotary embedding to scale)")
            else:
                problem = rope_scaling_problem(dict(self.rope_scaling))
                if problem:
                    problems.append(problem)
        if self.tie_embeddings and self.vocab_size is None:
            problems.append("tie_embeddings needs a vocab_size (an embedding to tie)")
        _dtype_name(self.dtype)
        if problems:
            raise ShardwiseError(f"model {self.name!r}: " + "; ".join(problems))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field, JSON-ready (``from_dict`` rebuilds the same spec): the
        complete description a result record carries."""
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShardwiseError(f"model description has unknown field(s) {', '.join(unknown)}; "
                                 f"it was written by another version of shardwise")
        return cls(**d)

    # Parameter counts (used by the planner, the cost model and the docs).
    def attn_params(self) -> int:
        qo = 2 * self.d_model * self.n_heads * self.head_dim
        kv = 2 * self.d_model * self.kv_heads * self.head_dim
        bias = (self.n_heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return qo + kv + bias

    def expert_params(self) -> int:
        return self.mlp_matrices * self.d_model * self.d_ff

    def mlp_params(self) -> int:
        if self.is_moe:
            return self.n_experts * self.expert_params() + self.n_experts * self.d_model
        return self.expert_params()

    def norm_params(self) -> int:
        per = self.d_model if self.norm == "rmsnorm" else 2 * self.d_model
        return 2 * per

    def layer_params(self) -> int:
        return self.attn_params() + self.mlp_params() + self.norm_params()

    def embed_params(self) -> int:
        return 0 if self.vocab_size is None else self.vocab_size * self.d_model

    def total_params(self) -> int:
        final_norm = self.norm_params() // 2
        embeds = 1 if self.tie_embeddings else 2  # input embedding and LM head
        return (
            self.n_layers * self.layer_params() + embeds * self.embed_params() + final_norm
        )

    def active_params(self) -> int:
        """Parameters a token's forward pass multiplies (top-k of the experts)."""
        if not self.is_moe:
            return self.total_params()
        idle = (self.n_experts - self.top_k) * self.expert_params()
        return self.total_params() - self.n_layers * idle

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cache one token adds over every layer, in the model's dtype."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * dtype_bytes(self.dtype)


PHASES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class Workload:
    """What one run does: ``batch`` sequences of ``seq_len`` prompt tokens
    (prefill), then ``decode_steps`` new tokens each, one per step (decode),
    attending to the KV cache of the prompt."""

    batch: int
    seq_len: int
    phase: str = "both"
    decode_steps: int = 4

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 1 or self.decode_steps < 0:
            raise ShardwiseError(
                f"workload needs batch >= 1, seq_len >= 1, decode_steps >= 0 "
                f"(got batch={self.batch}, seq_len={self.seq_len}, decode_steps={self.decode_steps})"
            )
        if self.phase not in PHASES:
            raise ShardwiseError(f"phase must be one of {', '.join(PHASES)} (got {self.phase!r})")
        if self.phase in ("decode", "both") and self.decode_steps < 1:
            raise ShardwiseError("a decode run needs decode_steps >= 1")

    @property
    def max_len(self) -> int:
        """Length of the static KV cache: prompt plus every decoded token."""
        return self.seq_len + self.decode_steps

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)


_PLAN_RE = re.compile(r"^([a-z_]+)(?::(.*))?$")

# Mesh dimensions that exist only inside a composition (parallel/compose.py);
# a plan of one of them alone is a composition of one dimension.
COMPOSE_ONLY = ("dp", "pp", "tp")
# Strategies that run the batch as micro-batches alone; helix and ep alone run
# it in one piece (as a pipeline's stage, ``pp:1/helix:4x4``, they take them).
MICRO_BATCHED = ("tp_pp", "layerwise", "ring")


@dataclass(frozen=True)
class Plan:
    """A strategy and its degrees, e.g. ``tp_pp:8x2``, ``helix:4x4``,
    ``ring:16``, ``layerwise:cap=L2``, ``ep:16``; ``,mb=N`` sets micro-batches.

    ``shape`` holds the ``AxB`` degrees; other ``key=value`` items go to
    ``options``. The strategy gives them meaning and checks them.

    A composition (:mod:`shardwise.parallel.compose`) is written as its mesh
    dimensions from outermost to innermost, separated by ``/``, each with its
    degrees and options, and ``mb=N`` once for the whole plan:
    ``dp:2/pp:2/ring:2/tp:2,mb=4``. Its ``strategy`` is ``compose`` and
    ``parts`` holds one plan per dimension (with ``micro_batches`` 1).
    """

    strategy: str
    shape: tuple[int, ...] = ()
    micro_batches: int = 1
    options: tuple[tuple[str, str], ...] = field(default=())
    parts: tuple["Plan", ...] = field(default=())

    @classmethod
    def parse(cls, text: str) -> "Plan":
        text = text.strip()
        pieces = [cls._parse_one(piece.strip(), text) for piece in text.split("/")]
        if len(pieces) == 1 and pieces[0].strategy not in COMPOSE_ONLY:
            return pieces[0]
        set_mb = [p.micro_batches for p in pieces if p.micro_batches != 1]
        if len(set_mb) > 1:
            raise ShardwiseError(f"malformed plan {text!r}: mb= appears {len(set_mb)} times; "
                                 f"write it once, at the end (e.g. pp:2/tp:2,mb=4)")
        parts = tuple(dataclasses.replace(p, micro_batches=1) for p in pieces)
        return cls("compose", micro_batches=set_mb[0] if set_mb else 1, parts=parts)

    @classmethod
    def _parse_one(cls, text: str, whole: str) -> "Plan":
        m = _PLAN_RE.match(text)
        if not m:
            raise ShardwiseError(
                f"malformed plan {whole!r}: write STRATEGY:DEGREES[,key=value], e.g. tp_pp:2x2 "
                f"or helix:4x4,mb=2, or mesh dimensions outermost first, e.g. pp:2/tp:2"
            )
        name, rest = m.group(1), m.group(2) or ""
        shape: tuple[int, ...] = ()
        micro_batches = 1
        options = []
        for item in filter(None, (p.strip() for p in rest.split(","))):
            if "=" in item:
                key, _, value = item.partition("=")
                key, value = key.strip(), value.strip()
                if not key or not value:
                    raise ShardwiseError(f"malformed plan {whole!r}: empty key or value in {item!r}")
                if key == "mb":
                    micro_batches = _positive_int(value, f"micro-batches in plan {whole!r}")
                else:
                    options.append((key, value))
            else:
                if shape:
                    raise ShardwiseError(
                        f"malformed plan {whole!r}: two degree groups ({item!r}); write them once as AxB"
                    )
                shape = tuple(
                    _positive_int(p, f"degree {p!r} in plan {whole!r}") for p in item.split("x")
                )
        return cls(name, shape, micro_batches, tuple(options))

    @property
    def is_composed(self) -> bool:
        return bool(self.parts)

    @property
    def takes_micro_batches(self) -> bool:
        """Whether the plan runs its batch as micro-batches (``mb=``): a
        pipeline (of one stage or more) or a loop over them."""
        return self.is_composed or self.strategy in MICRO_BATCHED

    def one_stage(self) -> "Plan":
        """The plan as the one stage of a pipeline, ``pp:1/helix:4x4``: the
        same layout, but a composition, which takes micro-batches (a stage
        holds one micro-batch's activations)."""
        return Plan("compose", parts=(Plan("pp", (1,)), self))

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        if self.parts:
            text = "/".join(map(str, self.parts))
            return text + (f",mb={self.micro_batches}" if self.micro_batches != 1 else "")
        parts = []
        if self.shape:
            parts.append("x".join(map(str, self.shape)))
        parts += [f"{k}={v}" for k, v in self.options]
        if self.micro_batches != 1:
            parts.append(f"mb={self.micro_batches}")
        return self.strategy + (":" + ",".join(parts) if parts else "")


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ShardwiseError(f"{what} must be a positive integer (got {text!r})") from None
    if value < 1:
        raise ShardwiseError(f"{what} must be a positive integer (got {value})")
    return value


def parse_bytes(text: str) -> int:
    """``80GB``, ``40GiB``, ``512MB``, ``1e9`` -> bytes (GB = 1e9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B)?\s*", text)
    if not m:
        raise ShardwiseError(f"cannot read {text!r} as a size; write e.g. 80GB, 40GiB or 50MB")
    value = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
        "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    }[unit]
    return int(value * scale)
