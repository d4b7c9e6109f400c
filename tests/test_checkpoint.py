"""Hugging Face checkpoints: the config maps to a ModelSpec, tensors map to
shardwise names slice by slice, the reference reproduces transformers' logits,
and malformed checkpoints fail before launch with the tensor or field named.

The checkpoints are tiny random Llama (grouped-query attention) and Mixtral
models that transformers itself writes with ``save_pretrained``.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers  # the 'test' extra: these checkpoints are written by transformers itself
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shardwise.model.checkpoint import CheckpointSource, checkpoint_spec
from shardwise.model.load import build_reference
from shardwise.model.weights import lm_head_name
from shardwise.spec import ShardwiseError

from hf_models import DIMS, tiny_llama, tiny_mixtral


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, transformers model) for every layout under test."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    out["llama"] = (str(root / "llama"), tiny_llama(root / "llama"))
    out["llama-tied-sharded"] = (str(root / "lts"),
                                 tiny_llama(root / "lts", tie=True, shard="40KB", seed=2))
    mixtral = tiny_mixtral(root / "mixtral")
    out["mixtral"] = (str(root / "mixtral"), mixtral)
    mixtral.save_pretrained(root / "mixtral-fused", save_original_format=False)
    out["mixtral-fused"] = (str(root / "mixtral-fused"), mixtral)
    return out


def _tensor_names(path: str) -> set[str]:
    names = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                names |= set(h.keys())
    return names


def test_layouts_are_what_they_claim(saved):
    # Guards the tests below: each layout really is on disk as named.
    per_expert = _tensor_names(saved["mixtral"][0])
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in per_expert
    assert "model.layers.1.mlp.experts.gate_up_proj" in _tensor_names(saved["mixtral-fused"][0])
    lts = saved["llama-tied-sharded"][0]
    assert os.path.exists(os.path.join(lts, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(lts) if f.endswith(".safetensors")]) > 1
    assert "lm_head.weight" not in _tensor_names(lts)


def test_config_maps_to_spec(saved):
    llama = CheckpointSource(saved["llama"][0]).spec
    assert (llama.n_layers, llama.d_model, llama.n_heads, llama.n_kv_heads, llama.head_dim,
            llama.d_ff, llama.vocab_size) == (2, 64, 4, 2, 16, 96, 128)
    assert (llama.norm, llama.activation, llama.dtype) == ("rmsnorm", "swiglu", "fp32")
    assert (llama.rope_theta, llama.norm_eps, llama.n_experts) == (500000.0, 1e-5, 0)
    mixtral = CheckpointSource(saved["mixtral"][0]).spec
    assert (mixtral.n_experts, mixtral.top_k, mixtral.rope_theta) == (4, 2, 1e6)
    assert checkpoint_spec(saved["mixtral-fused"][0], dtype="bf16").dtype == "bf16"


@pytest.mark.parametrize("name", ["llama", "llama-tied-sharded", "mixtral", "mixtral-fused"])
def test_reference_matches_transformers(saved, name):
    """Prefill and three cached decode steps against transformers' forward on the
    whole sequence. fp32, same arithmetic in a different order (fused QKV, SDPA
    vs eager attention, expert order): differences are ~1e-7; 1e-4 is the bar."""
    path, hf = saved[name]
    ref = build_reference(CheckpointSource(path), torch.float32, "cpu")
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = hf(ids).logits
        caches = ref.allocate_caches(3, 12)
        got = [ref(ids[:, :9], caches, 0)]
        got += [ref(ids[:, t : t + 1], caches, t) for t in (9, 10, 11)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=0)
    assert want.std() > 0.1  # logits that are not all ~0 (a vacuous comparison)


def test_expert_layouts_read_identically(saved):
    """The per-expert and fused files of one model give every parameter, and
    arbitrary slices of it, bit for bit the same."""
    per, fused = CheckpointSource(saved["mixtral"][0]), CheckpointSource(saved["mixtral-fused"][0])
    kw = dict(dtype=torch.float32, device="cpu")
    for name in per.table:
        assert torch.equal(per.get(name, **kw), fused.get(name, **kw)), name
    index = [torch.tensor([3, 1]), torch.tensor([5, 6, 7, 40]), slice(2, 9)]
    for name in ("layers.1.moe.w_gate", "layers.1.moe.w_up"):
        assert torch.equal(per.get(name, index, **kw), fused.get(name, index, **kw))
        whole = per.get(name, **kw)
        assert torch.equal(per.get(name, index, **kw), whole[[3, 1]][:, [5, 6, 7, 40], 2:9])


def test_reads_only_the_requested_slice(saved):
    path = saved["llama"][0]
    full = load_file(os.path.join(path, "model.safetensors"))
    src = CheckpointSource(path)
    kw = dict(dtype=torch.float32, device="cpu")
    # The rows of query head 1 (a tensor-parallel rank's share): one 16 x 64 box.
    rows = torch.arange(16, 32)
    got = src.get("layers.0.attn.wq", [rows], **kw)
    assert torch.equal(got, full["model.layers.0.self_attn.q_proj.weight"][16:32])
    assert src.bytes_read == 16 * 64 * 4
    # Unordered, non-contiguous rows and columns: read run by run, nothing more.
    src.bytes_read = 0
    r, c = torch.tensor([40, 41, 3, 7, 8]), torch.tensor([9, 10, 11, 60])
    got = src.get("layers.1.attn.wo", [r, c], **kw)
    assert torch.equal(got, full["model.layers.1.self_attn.o_proj.weight"][r][:, c])
    assert src.bytes_read == 5 * 4 * 4
    # Very fragmented (every other row and column): bounded by the covering range.
    src.bytes_read = 0
    r, c = torch.arange(0, 128, 2), torch.arange(1, 64, 2)
    got = src.get("embed.weight", [r, c], **kw)
    assert torch.equal(got, full["model.embed_tokens.weight"][r][:, c])
    assert src.bytes_read <= 127 * 64 * 4
    # Tied head: the model has no LM head of its own; loaders read the embedding.
    tied = CheckpointSource(saved["llama-tied-sharded"][0])
    assert tied.spec.tie_embeddings and "lm_head.weight" not in tied.table
    assert lm_head_name(tied.spec) == "embed.weight"


# -- malformed checkpoints -------------------------------------------------------

@pytest.fixture
def copy(saved, tmp_path):
    def make(name: str):
        dst = str(tmp_path / name)
        shutil.copytree(saved[name][0], dst)
        return dst
    return make


def _edit_config(path: str, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is _DROP:
            del config[key]
        else:
            config[key] = value
    with open(file, "w") as f:
        json.dump(config, f)


_DROP = object()


def _rewrite(path: str, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _fails(path: str, *needles: str):
    with pytest.raises(ShardwiseError) as e:
        checkpoint_spec(path)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_tensor(copy):
    path = copy("llama")
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    _fails(path, "'model.layers.1.self_attn.k_proj.weight'", "missing", path)


def test_missing_expert(copy):
    path = copy("mixtral")
    _rewrite(path, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    _fails(path, "'model.layers.0.block_sparse_moe.experts.2.w3.weight'", "missing")


def test_wrong_shape(copy):
    path = copy("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    file = _rewrite(path, lambda t: t.__setitem__(name, t[name][:90].contiguous()))
    _fails(path, repr(name), "[90, 64]", "[96, 64]", "intermediate_size", file)


def test_truncated_file(copy):
    path = copy("llama")
    file = os.path.join(path, "model.safetensors")
    os.truncate(file, os.path.getsize(file) - 100)
    # The last tensor in the data section is the one cut short.
    _fails(path, "truncated", "tensor '", file)


@pytest.mark.parametrize("content", [b"garbage" * 100, b"\x80\x04pickle" + bytes(200),
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"])
def test_a_file_that_is_not_safetensors_says_so(copy, content):
    """Random bytes read as a header length once claimed an 18-exabyte truncation."""
    path = copy("llama")
    file = os.path.join(path, "model.safetensors")
    with open(file, "wb") as f:
        f.write(content)
    _fails(path, "is not a safetensors file", file)


def test_truncated_shard(copy):
    path = copy("llama-tied-sharded")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[-1]
    os.truncate(os.path.join(path, shard), 20)
    _fails(path, "truncated", shard)


def test_missing_shard(copy):
    path = copy("llama-tied-sharded")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(path, shard))
    _fails(path, shard, "does not exist", "model.safetensors.index.json")


def test_config_disagrees_with_tensor_shapes(copy):
    path = copy("llama")
    _edit_config(path, hidden_size=48, head_dim=12)
    _fails(path, "model.", "hidden_size", "config does not match the weights")


@pytest.mark.parametrize("layers,needle", [(3, "'model.layers.2."), (1, "'model.layers.1.")])
def test_config_disagrees_with_layer_count(copy, layers, needle):
    path = copy("llama")
    _edit_config(path, num_hidden_layers=layers)
    _fails(path, needle, "num_hidden_layers=")


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "intermediate_size",
                                   "vocab_size", "rms_norm_eps"])
def test_missing_config_field(copy, field):
    path = copy("llama")
    _edit_config(path, **{field: _DROP})
    _fails(path, f"'{field}'", "missing", "config.json")


def test_missing_expert_count(copy):
    path = copy("mixtral")
    _edit_config(path, num_local_experts=_DROP)
    _fails(path, "'num_local_experts'", "missing")


@pytest.mark.parametrize("changes,needles", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     ("rope_parameters", "'llama3'", "low_freq_factor")),
    (dict(rope_parameters=_DROP, rope_theta=1e4, rope_scaling={"type": "yarn", "factor": 2.0}),
     ("rope_scaling", "'yarn'")),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     ("rope_parameters ('default')", "rope_scaling ('llama3')", "disagree")),
    (dict(attention_bias=True), ("'attention_bias'", "no bias")),
    (dict(mlp_bias=True), ("'mlp_bias'",)),
    (dict(hidden_act="gelu"), ("hidden_act 'gelu'",)),
    (dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]),
     ("'qwen2_moe'", "shared experts")),
    (dict(architectures=["LlamaForSequenceClassification"]), ("LlamaForSequenceClassification",)),
    (dict(quantization_config={"quant_method": "gptq"}), ("quantization_config",)),
])
def test_unsupported_features_are_refused(copy, changes, needles):
    path = copy("llama")
    _edit_config(path, **changes)
    _fails(path, *needles)


def test_bias_tensor_is_refused(copy):
    path = copy("llama")
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    _fails(path, "'model.layers.0.self_attn.q_proj.bias'", "no bias")


def test_sliding_window_only_matters_past_its_length(copy):
    # A Mistral-style window of 16 tokens: shorter runs compute exactly the
    # full causal attention, longer ones would not.
    from shardwise.spec import Workload

    path = copy("mixtral")
    _edit_config(path, sliding_window=16)
    assert checkpoint_spec(path, Workload(batch=1, seq_len=8, decode_steps=8)).n_experts == 4
    with pytest.raises(ShardwiseError, match="sliding window of 16 tokens.*asked 17"):
        checkpoint_spec(path, Workload(batch=1, seq_len=8, decode_steps=9))


def test_given_spec_must_match(saved):
    src = CheckpointSource(saved["llama"][0])
    CheckpointSource(saved["llama"][0], src.spec.replace(name="x", dtype="bf16"))  # allowed
    with pytest.raises(ShardwiseError, match="n_kv_heads=4 vs 2"):
        CheckpointSource(saved["llama"][0], src.spec.replace(n_kv_heads=4))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ShardwiseError, match="config.json"):
        checkpoint_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **DIMS,
                                                      "rms_norm_eps": 1e-5}))
    with pytest.raises(ShardwiseError, match="neither model.safetensors nor"):
        checkpoint_spec(str(tmp_path))
