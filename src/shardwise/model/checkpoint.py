"""Hugging Face checkpoints (Llama, Mistral, Mixtral, Qwen2) as a weight source.

A checkpoint directory holds ``config.json`` and either ``model.safetensors``
or ``model.safetensors.index.json`` plus the shards it names. The config maps
onto a :class:`ModelSpec` (RMSNorm, SwiGLU, rotary embedding); the tensors map
onto shardwise's parameter names (see ``docs/checkpoints.md``), so every
strategy and the reference read a checkpoint exactly as they read synthetic
weights: :meth:`CheckpointSource.get` returns any slice, and reads only that
slice from disk (``safe_open(...).get_slice``), so no rank ever loads the whole
model.

Everything is checked when the source is opened, before any process needs a
weight: the config's fields, every tensor's presence, shape and dtype, and
that each file holds all the bytes its header promises. A problem raises a
:class:`ShardwiseError` naming the field or tensor, the file, and the fix.
Only JSON and safetensors are read; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Collection, Sequence

from ..spec import (ROPE_SCALING_KEYS, ModelSpec, ShardwiseError, Workload,
                    rope_scaling_problem)

if TYPE_CHECKING:
    import torch

# torch, safetensors and the parameter table are imported where weights are
# read: naming a model by its config (models.py) needs none of them.

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# model_type -> the one architecture whose weights and head this module maps.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Families that look like Llama but compute something else: say why, not just "unknown".
_NOT_LLAMA = {
    "qwen2_moe": "Qwen2-MoE has shared experts and q/k/v biases",
    "gemma": "Gemma scales the embedding and uses (1 + weight) RMSNorm and GeGLU",
    "phi3": "Phi-3 stores fused qkv and gate_up projections with its own rope scaling",
}

_SAFETENSORS_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
_CONFIG_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# Tensors some exporters write that carry no weights (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# Reading a selection as the product of its contiguous runs costs one small
# read per box; past this many boxes, read the bounding range of the most
# fragmented dim and select from it in memory instead.
_MAX_BOXES = 256


def _fail(where: str, message: str) -> ShardwiseError:
    return ShardwiseError(f"{where}: {message}")


# -- config.json ---------------------------------------------------------------

def read_config(path: str) -> dict:
    """The parsed ``config.json`` of checkpoint directory ``path``."""
    if not os.path.isdir(path):
        raise ShardwiseError(f"checkpoint {path!r} is not a directory; give the directory that "
                             f"holds config.json and the safetensors files")
    where = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(where):
        raise ShardwiseError(f"{where} does not exist; a Hugging Face checkpoint directory needs "
                             f"its config.json (save_pretrained writes it)")
    return read_config_file(where)


def read_config_file(where: str) -> dict:
    """A ``config.json`` file, parsed and checked to be a JSON object."""
    try:
        with open(where) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ShardwiseError(f"{where} does not exist; give a config.json file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(where, f"is not valid JSON ({e}); restore the file") from None
    except OSError as e:
        raise _fail(where, f"cannot be read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise _fail(where, "must hold a JSON object")
    return config


@dataclass(frozen=True)
class CheckpointConfig:
    """What shardwise takes from ``config.json``, besides the :class:`ModelSpec`."""

    model_type: str
    tie_word_embeddings: bool
    sliding_window: int | None  # attention window; None: full causal attention


def _field(config: dict, key: str, where: str, kind=int, default=...):
    """``config[key]`` checked for type; a missing key is an error unless ``default``."""
    if key not in config or config[key] is None:
        if default is ...:
            raise _fail(where, f"config field {key!r} is missing; shardwise does not guess "
                               f"the fields that define the model (save_pretrained writes it)")
        return default
    value = config[key]
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and (kind is float or float(value).is_integer()))
    if not ok or (kind is int and value < 1) or (kind is float and value <= 0):
        raise _fail(where, f"config field {key!r} = {value!r} must be a positive {kind.__name__}")
    return kind(value)


def _rope(config: dict, where: str) -> tuple[float, tuple | None]:
    """The rotary base and scaling, from ``rope_parameters`` (transformers >= 5)
    or ``rope_theta`` / ``rope_scaling`` (earlier). Scalings that
    model/rope.py computes (linear, llama3) are kept; others are refused."""
    params = config.get("rope_parameters")
    key = "rope_parameters"
    legacy = config.get("rope_scaling")
    if isinstance(params, dict) and isinstance(legacy, dict) and legacy:
        # transformers versions differ on which wins; guessing would run another model.
        kind = lambda d: d.get("rope_type", d.get("type", "default"))  # noqa: E731
        if kind(params) != kind(legacy) or any(
                params.get(k) != v for k, v in legacy.items() if k not in ("type", "rope_type")):
            raise _fail(where, f"config has both rope_parameters ({kind(params)!r}) and "
                               f"rope_scaling ({kind(legacy)!r}) and they disagree; keep the "
                               f"one the model was trained with and delete the other")
    if params is None:
        params, key = dict(config.get("rope_scaling") or {}), "rope_scaling"
        if "rope_theta" in config:
            params.setdefault("rope_theta", config["rope_theta"])
    if not isinstance(params, dict):
        raise _fail(where, f"config field {key!r} must be a JSON object (got {params!r})")
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise _fail(where, f"partial_rotary_factor = {factor} is not supported (shardwise "
                           f"rotates every head dim)")
    # transformers' default base for the Llama family when a config predates the field.
    theta = params.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise _fail(where, f"rope_theta = {theta!r} must be a positive number")
    scaling = {k: v for k, v in params.items()
               if k not in ("rope_theta", "partial_rotary_factor")}
    if "type" in scaling:  # the field's name before transformers 4.45
        scaling.setdefault("rope_type", scaling.pop("type"))
    kind = scaling.get("rope_type", "default")
    problem = rope_scaling_problem(scaling)
    if problem:
        raise _fail(where, f"config field {key!r}: {problem}")
    if kind == "default":
        return float(theta), None
    kept = {k: scaling[k] for k in ROPE_SCALING_KEYS[kind]}
    return float(theta), tuple(sorted({**kept, "rope_type": kind}.items()))


def _check_supported(config: dict, where: str) -> str:
    model_type = config.get("model_type")
    if model_type is None:
        raise _fail(where, "config field 'model_type' is missing; shardwise reads "
                           f"{', '.join(ARCHITECTURES)} checkpoints")
    if model_type not in ARCHITECTURES:
        why = _NOT_LLAMA.get(model_type)
        raise _fail(where, f"model_type {model_type!r} is not supported"
                           + (f" ({why})" if why else "")
                           + f"; shardwise reads {', '.join(ARCHITECTURES)} checkpoints")
    archs = config.get("architectures") or [ARCHITECTURES[model_type]]
    if archs != [ARCHITECTURES[model_type]]:
        raise _fail(where, f"architectures {archs} is not supported: shardwise runs "
                           f"{ARCHITECTURES[model_type]} (a causal LM with its LM head)")
    if "quantization_config" in config:
        raise _fail(where, "quantized checkpoints (config field 'quantization_config') are not "
                           "supported; use the unquantized fp32/fp16/bf16 weights")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise _fail(where, f"config field {key!r} is true: shardwise's projections have no "
                               f"bias there (only Qwen2's q/k/v biases); use a checkpoint "
                               f"without them")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(where, f"hidden_act {act!r} is not supported: the Llama family's MLP is "
                           f"SwiGLU (hidden_act 'silu')")
    return model_type


def spec_from_config(config: dict, where: str, name: str,
                     dtype: str | None = None) -> tuple[ModelSpec, CheckpointConfig]:
    """Map a Llama / Mistral / Mixtral ``config.json`` onto a :class:`ModelSpec`.

    ``dtype`` overrides the checkpoint's own (``torch_dtype`` or ``dtype``):
    the weights are converted slice by slice as they are read.
    """
    model_type = _check_supported(config, where)
    D = _field(config, "hidden_size", where)
    H = _field(config, "num_attention_heads", where)
    # transformers' defaults for configs that predate the fields.
    Hkv = _field(config, "num_key_value_heads", where, default=H)
    if D % H and "head_dim" not in config:
        raise _fail(where, f"hidden_size ({D}) is not a multiple of num_attention_heads ({H}) "
                           f"and config field 'head_dim' is missing")
    head_dim = _field(config, "head_dim", where, default=D // H)
    if H % Hkv:
        raise _fail(where, f"num_attention_heads ({H}) must be a multiple of "
                           f"num_key_value_heads ({Hkv})")
    if dtype is None:
        stored = config.get("torch_dtype", config.get("dtype", "float32"))
        if stored not in _CONFIG_DTYPES:
            raise _fail(where, f"dtype {stored!r} is not supported; shardwise computes in "
                               f"{', '.join(_CONFIG_DTYPES)}")
        dtype = _CONFIG_DTYPES[stored]
    moe = {}
    if model_type == "mixtral":
        moe = dict(n_experts=_field(config, "num_local_experts", where),
                   top_k=_field(config, "num_experts_per_tok", where))
        if moe["top_k"] > moe["n_experts"]:
            raise _fail(where, f"num_experts_per_tok ({moe['top_k']}) exceeds "
                               f"num_local_experts ({moe['n_experts']})")
    window = config.get("sliding_window")
    if model_type == "llama" or config.get("use_sliding_window") is False:
        window = None  # Llama has no window; a disabled window is none either
    if window is not None and (not isinstance(window, int) or window < 1):
        raise _fail(where, f"config field 'sliding_window' = {window!r} must be a positive int "
                           f"or null")
    tied = _field(config, "tie_word_embeddings", where, kind=bool, default=False)
    theta, scaling = _rope(config, where)
    spec = ModelSpec(
        name=name, n_layers=_field(config, "num_hidden_layers", where), d_model=D,
        n_heads=H, head_dim=head_dim, d_ff=_field(config, "intermediate_size", where),
        n_kv_heads=Hkv, dtype=dtype, norm="rmsnorm", activation="swiglu",
        vocab_size=_field(config, "vocab_size", where),
        norm_eps=_field(config, "rms_norm_eps", where, kind=float),
        rope_theta=theta, rope_scaling=scaling, qkv_bias=model_type == "qwen2",
        tie_embeddings=tied, **moe,
    )
    return spec, CheckpointConfig(model_type, tied, window)


# -- safetensors headers -------------------------------------------------------

@dataclass(frozen=True)
class _Stored:
    """One tensor as a safetensors header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]


_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too


def _read_header(file: str) -> dict[str, _Stored]:
    """Parse a safetensors header (an 8-byte length and JSON) and check that
    the file holds every byte it promises, so a truncated download fails here
    with the tensor's name rather than deep inside a rank."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(file, f"is truncated ({size} bytes, no safetensors header); "
                              f"download or save it again")
        (n,) = struct.unpack("<Q", head)
        # A safetensors header is a JSON object of modest size: any other first
        # bytes (a text file, a pickle, random data) are not one, not a truncation.
        if n > _MAX_HEADER or f.read(1) != b"{":
            raise _fail(file, "is not a safetensors file (no header where one starts); give the "
                              "checkpoint's *.safetensors files, saved with safetensors")
        if 8 + n > size:
            raise _fail(file, f"is truncated: its header needs {8 + n} bytes but the file has "
                              f"{size}; download or save it again")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _fail(file, "is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise _fail(file, "is not a safetensors file (header is not a JSON object)")
    data_bytes = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            _, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _fail(file, f"tensor {name!r} has a malformed header entry") from None
        if end > data_bytes:
            raise _fail(file, f"is truncated: tensor {name!r} needs bytes up to {end} of the "
                              f"data section but the file holds {data_bytes}; download or save "
                              f"it again")
        out[name] = _Stored(file, dtype, shape)
    return out


def _read_tensor_index(path: str) -> tuple[dict[str, _Stored], str]:
    """Every tensor of the checkpoint, and a short description of its files."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise _fail(index, "is not a valid index (needs a JSON object with a 'weight_map' "
                               "object); restore the file") from None
        headers: dict[str, dict[str, _Stored]] = {}
        tensors = {}
        for name, shard in sorted(weight_map.items()):
            file = os.path.join(path, shard)
            if file not in headers:
                if not os.path.exists(file):
                    raise _fail(index, f"names shard {shard!r} (for tensor {name!r}), which does "
                                       f"not exist in {path}; copy every shard")
                headers[file] = _read_header(file)
            if name not in headers[file]:
                raise _fail(file, f"does not hold tensor {name!r}, which {INDEX_FILE} places "
                                  f"there; the shard and the index disagree")
            tensors[name] = headers[file][name]
        return tensors, f"{INDEX_FILE} and {len(headers)} shard(s)"
    if os.path.exists(single):
        return _read_header(single), SINGLE_FILE
    raise ShardwiseError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}; shardwise reads "
                         f"safetensors checkpoints only (save_pretrained writes them)")


# -- the name map --------------------------------------------------------------

@dataclass(frozen=True)
class _Ref:
    """Where a shardwise parameter lives in the checkpoint.

    ``tensors`` is one Hugging Face tensor, or one per expert (the parameter's
    dim 0 picks the tensor). ``offset`` is added to the index of each dim of
    the Hugging Face tensor (gate and up halves of a fused ``gate_up_proj``).
    ``dims`` names the config fields behind each dim, for error messages.
    """

    tensors: tuple[str, ...]
    shape: tuple[int, ...]  # the shape each Hugging Face tensor must have
    dims: tuple[str, ...]
    offset: tuple[int, ...] = ()


def hf_name_map(spec: ModelSpec, stored: Collection[str]) -> dict[str, _Ref]:
    """Where each shardwise parameter of ``spec`` lives among the Hugging Face
    tensor names ``stored`` (a checkpoint's, or a transformers model's
    ``state_dict`` keys: the name decides between the two Mixtral expert
    layouts)."""
    D, F, V, E = spec.d_model, spec.d_ff, spec.vocab_size, spec.n_experts
    q, kv = spec.n_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    Dn, Fn, Vn, En = "hidden_size", "intermediate_size", "vocab_size", "num_local_experts"
    qn, kvn = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    m: dict[str, _Ref] = {}

    def one(name, hf, shape, dims, offset=()):
        m[name] = _Ref((hf,), tuple(shape), tuple(dims), tuple(offset))

    one("embed.weight", "model.embed_tokens.weight", (V, D), (Vn, Dn))
    if not spec.tie_embeddings:  # a tied head reads embed.weight (weights.lm_head_name)
        one("lm_head.weight", "lm_head.weight", (V, D), (Vn, Dn))
    one("norm.weight", "model.norm.weight", (D,), (Dn,))
    # transformers >= 5 can save Mixtral experts fused (save_original_format=False);
    # by default it writes the original per-expert layout, as older releases did.
    fused = "model.layers.0.mlp.experts.gate_up_proj" in stored
    for i in range(spec.n_layers):
        p, hp = f"layers.{i}", f"model.layers.{i}"
        one(f"{p}.attn_norm.weight", f"{hp}.input_layernorm.weight", (D,), (Dn,))
        one(f"{p}.mlp_norm.weight", f"{hp}.post_attention_layernorm.weight", (D,), (Dn,))
        one(f"{p}.attn.wq", f"{hp}.self_attn.q_proj.weight", (q, D), (qn, Dn))
        one(f"{p}.attn.wk", f"{hp}.self_attn.k_proj.weight", (kv, D), (kvn, Dn))
        one(f"{p}.attn.wv", f"{hp}.self_attn.v_proj.weight", (kv, D), (kvn, Dn))
        one(f"{p}.attn.wo", f"{hp}.self_attn.o_proj.weight", (D, q), (Dn, qn))
        if spec.qkv_bias:
            one(f"{p}.attn.bq", f"{hp}.self_attn.q_proj.bias", (q,), (qn,))
            one(f"{p}.attn.bk", f"{hp}.self_attn.k_proj.bias", (kv,), (kvn,))
            one(f"{p}.attn.bv", f"{hp}.self_attn.v_proj.bias", (kv,), (kvn,))
        if not spec.is_moe:
            one(f"{p}.mlp.w_gate", f"{hp}.mlp.gate_proj.weight", (F, D), (Fn, Dn))
            one(f"{p}.mlp.w_up", f"{hp}.mlp.up_proj.weight", (F, D), (Fn, Dn))
            one(f"{p}.mlp.w_down", f"{hp}.mlp.down_proj.weight", (D, F), (Dn, Fn))
        elif fused:
            gate_up = f"{hp}.mlp.experts.gate_up_proj"  # [E, 2F, D]: gate rows, then up rows
            one(f"{p}.moe.router", f"{hp}.mlp.gate.weight", (E, D), (En, Dn))
            one(f"{p}.moe.w_gate", gate_up, (E, 2 * F, D), (En, "2*" + Fn, Dn), (0, 0, 0))
            one(f"{p}.moe.w_up", gate_up, (E, 2 * F, D), (En, "2*" + Fn, Dn), (0, F, 0))
            one(f"{p}.moe.w_down", f"{hp}.mlp.experts.down_proj", (E, D, F), (En, Dn, Fn))
        else:
            ex = f"{hp}.block_sparse_moe.experts"
            one(f"{p}.moe.router", f"{hp}.block_sparse_moe.gate.weight", (E, D), (En, Dn))
            for ours, theirs, shape, dims in (("w_gate", "w1", (F, D), (Fn, Dn)),
                                              ("w_up", "w3", (F, D), (Fn, Dn)),
                                              ("w_down", "w2", (D, F), (Dn, Fn))):
                m[f"{p}.moe.{ours}"] = _Ref(
                    tuple(f"{ex}.{e}.{theirs}.weight" for e in range(E)), shape, dims)
    return m


# -- reading slices ------------------------------------------------------------

def _positions(sel, size: int, what: str) -> list[int]:
    """A per-dim index (None, slice or LongTensor) as a list of positions."""
    if sel is None:
        return list(range(size))
    if isinstance(sel, slice):
        return list(range(size))[sel]
    import torch

    pos = torch.as_tensor(sel, dtype=torch.long).reshape(-1).tolist()
    if pos and (min(pos) < 0 or max(pos) >= size):
        raise IndexError(f"{what}: index out of range for a dim of size {size}")
    return pos


def _runs(pos: list[int]) -> list[tuple[int, int, int]]:
    """Split positions into maximal ascending runs ``(start, stop, out_start)``."""
    runs = []
    for i, p in enumerate(pos):
        if runs and p == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([p, p + 1, i])
    return [tuple(r) for r in runs]


class CheckpointSource:
    """A Hugging Face checkpoint behind the :class:`WeightSource` interface.

    ``spec`` defaults to the one ``config.json`` describes; a given spec must
    describe the same model (its name and dtype may differ: the dtype is what
    the caller computes in). ``max_len``, when given, is checked against the
    model's attention window. ``bytes_read`` counts what came from disk.
    """

    def __init__(self, path: str, spec: ModelSpec | None = None, *,
                 dtype: str | None = None, max_len: int | None = None):
        self.path = os.path.abspath(path)
        config = read_config(self.path)
        where = os.path.join(self.path, CONFIG_FILE)
        name = os.path.basename(self.path.rstrip(os.sep)) or "checkpoint"
        derived, self.info = spec_from_config(config, where, name, dtype)
        self.config_layers = derived.n_layers
        if spec is not None:
            _check_same_model(spec, derived, where)
            derived = spec
        self.spec = derived
        from .weights import param_table

        self.table = param_table(self.spec)
        self.stored, self.files = _read_tensor_index(self.path)
        self.refs = hf_name_map(self.spec, self.stored)
        self._check_tensors(config)
        if max_len is not None:
            self.check_length(max_len)
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    # -- validation -----------------------------------------------------
    def _check_tensors(self, config: dict) -> None:
        where = f"{self.path} ({self.files})"
        layers = f"num_hidden_layers={self.spec.n_layers}"
        used = set()
        for name, ref in self.refs.items():
            for hf in ref.tensors:
                used.add(hf)
                st = self.stored.get(hf)
                if st is None:
                    raise _fail(where, f"tensor {hf!r} (shardwise {name}) is missing; the "
                                       f"checkpoint is incomplete or config.json ({layers}) "
                                       f"does not describe it")
                if st.shape != ref.shape:
                    dims = " x ".join(ref.dims)
                    raise _fail(st.file, f"tensor {hf!r} has shape {list(st.shape)} but "
                                         f"config.json ({dims}) implies {list(ref.shape)}; the "
                                         f"config does not match the weights")
                if st.dtype not in _SAFETENSORS_DTYPES:
                    raise _fail(st.file, f"tensor {hf!r} is stored as {st.dtype}; shardwise reads "
                                         f"{', '.join(_SAFETENSORS_DTYPES)} weights")
        for hf, st in sorted(self.stored.items()):
            if hf in used or hf.endswith(_IGNORED_SUFFIXES) or self._later_layer(hf):
                continue
            if hf == "lm_head.weight" and self.info.tie_word_embeddings:
                continue  # transformers ignores it too: a tied head is the embedding
            if hf.endswith(".bias"):
                raise _fail(st.file, f"holds bias {hf!r}; shardwise's projections have no bias, "
                                     f"so this checkpoint would compute something else")
            raise _fail(st.file, f"holds tensor {hf!r}, which a {self.info.model_type} model "
                                 f"with this config.json ({layers}) does not have; the config "
                                 f"does not match the weights")

    def _later_layer(self, hf: str) -> bool:
        """Whether ``hf`` belongs to a layer the config has but this run leaves
        out (``--layers N``)."""
        parts = hf.split(".")
        return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and self.spec.n_layers <= int(parts[2]) < self.config_layers)

    def check_length(self, max_len: int) -> None:
        """Refuse lengths at which the model's sliding window would matter."""
        window = self.info.sliding_window
        if window is not None and max_len > window:
            raise ShardwiseError(
                f"{self.path}: the model attends within a sliding window of {window} tokens "
                f"(config field 'sliding_window') and shardwise attends to the whole context; "
                f"keep prompt plus new tokens <= {window} (asked {max_len})")

    # -- the WeightSource interface -----------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self.table[name].shape

    def get(self, name: str, index: Sequence[torch.Tensor | slice | None] | None = None, *,
            dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Slice ``[index]`` of parameter ``name`` (per dim: LongTensor, slice or
        None), read from disk alone and converted to ``dtype`` on ``device``."""
        ref, shape = self.refs[name], self.table[name].shape
        index = list(index or []) + [None] * (len(shape) - len(index or []))
        pos = [_positions(sel, size, name) for size, sel in zip(shape, index)]
        import torch

        out = torch.empty([len(p) for p in pos], dtype=dtype, device=device)
        if out.numel() == 0:
            return out
        if len(ref.tensors) == 1:
            self._read_into(out, ref.tensors[0], pos, ref.offset)
        else:  # one tensor per expert: dim 0 chooses the tensor
            for i, e in enumerate(pos[0]):
                self._read_into(out[i], ref.tensors[e], pos[1:], ref.offset)
        return out

    def _read_into(self, out: torch.Tensor, hf: str, pos: list[list[int]],
                   offset: tuple[int, ...]) -> None:
        """Fill ``out`` with ``hf[pos]``, reading each contiguous box once."""
        if offset:
            pos = [[p + o for p in ps] for ps, o in zip(pos, offset)]
        runs = [_runs(p) for p in pos]
        gather = [None] * len(pos)
        # Too many boxes: read the most fragmented dim's bounding range and pick from it.
        while _product(len(r) for r in runs) > _MAX_BOXES:
            d = max(range(len(runs)), key=lambda k: len(runs[k]))
            lo, hi = min(pos[d]), max(pos[d]) + 1
            runs[d] = [(lo, hi, 0)]
            import torch

            gather[d] = torch.tensor([p - lo for p in pos[d]], dtype=torch.long)
        handle = self._slice(hf)
        for box in _boxes(runs):
            part = handle[tuple(slice(a, b) for a, b, _ in box)]
            self.bytes_read += part.nbytes
            for d, g in enumerate(gather):
                if g is not None:
                    part = part.index_select(d, g)
            dst = out[tuple(slice(o, o + part.shape[d]) for d, (_, _, o) in enumerate(box))]
            dst.copy_(part)

    def _slice(self, hf: str):
        file = self.stored[hf].file
        if file not in self._handles:
            try:
                from safetensors import safe_open

                self._handles[file] = safe_open(file, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type
                raise _fail(file, f"cannot be opened as safetensors ({e})") from None
        return self._handles[file].get_slice(hf)


def _product(values) -> int:
    n = 1
    for v in values:
        n *= v
    return n


def _boxes(runs: list[list[tuple[int, int, int]]]):
    """Every combination of one run per dim (the cartesian product)."""
    if not runs:
        yield ()
        return
    for r in runs[0]:
        for rest in _boxes(runs[1:]):
            yield (r, *rest)


def _check_same_model(given: ModelSpec, derived: ModelSpec, where: str) -> None:
    """``given`` may differ in name and dtype, and use only the first layers."""
    differ = [f.name for f in fields(ModelSpec) if f.name not in ("name", "dtype", "n_layers")
              and getattr(given, f.name) != getattr(derived, f.name)]
    if given.n_layers > derived.n_layers:
        differ.append("n_layers")
    if differ:
        pairs = ", ".join(f"{k}={getattr(given, k)!r} vs {getattr(derived, k)!r}" for k in differ)
        raise _fail(where, f"the model spec given does not match the checkpoint ({pairs}); "
                           f"build it with checkpoint_spec()")


def checkpoint_spec(path: str, workload: Workload | None = None,
                    dtype: str | None = None, spec: ModelSpec | None = None) -> ModelSpec:
    """Validate checkpoint ``path`` (config, every tensor's header, and the
    workload's length against the attention window) and return its spec
    (``spec``, when given, must describe it: e.g. its first layers).
    Call it before launching ranks so a bad checkpoint fails at once."""
    source = CheckpointSource(path, spec, dtype=dtype,
                              max_len=workload.max_len if workload is not None else None)
    return source.spec
