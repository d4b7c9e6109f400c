"""Tiny random Hugging Face checkpoints of each supported architecture, written
by transformers itself (safetensors), with a tokenizer trained here: the tests'
stand-ins for downloaded models (no model hub is reached).

Every model is tiny and uses grouped-query attention (4 query heads share 2
KV heads). initializer_range 0.1 (not transformers' 0.02) gives peaked
logits, so greedy tokens are far from ties.
"""
from __future__ import annotations

import torch
import transformers

from helpers import LLAMA3_ROPE  # Llama 3.1's scaling, its bands shrunk to tiny heads

DIMS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model is cut over many devices and each one computes a part",
    "tensor parallel splits heads while a pipeline splits layers",
    "ring attention passes keys and values around the ring",
    "experts are spread over the ranks and tokens travel to them",
] * 4


def tiny_tokenizer(path, vocab_size: int = DIMS["vocab_size"]):
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens on a small
    corpus and save it to ``path`` as a transformers fast tokenizer, with
    ``<s>`` (bos, id 1) and ``</s>`` (eos, id 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:64])
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def _save(model, path, shard: str | None = None, **kw):
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}), **kw)
    return model


def tiny_llama(path, *, tie: bool = False, shard: str | None = None, seed: int = 0,
               rope_scaling: dict | None = None):
    """Write a random LlamaForCausalLM to ``path`` (sharded when ``shard`` is a size)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**DIMS, rope_theta=500000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=tie, rope_scaling=rope_scaling)
    return _save(transformers.LlamaForCausalLM(config).eval(), path, shard)


def tiny_llama31(path, *, seed: int = 4):
    """A Llama 3.1-style model: llama3 rope scaling."""
    return tiny_llama(path, seed=seed, rope_scaling=dict(LLAMA3_ROPE))


def tiny_mistral(path, *, seed: int = 5):
    """Write a random MistralForCausalLM (no sliding window, as Mistral 7B v0.2)."""
    torch.manual_seed(seed)
    config = transformers.MistralConfig(**DIMS, rope_theta=1e6, sliding_window=None)
    return _save(transformers.MistralForCausalLM(config).eval(), path)


def tiny_mixtral(path, *, fused: bool = False, seed: int = 1):
    """Write a random MixtralForCausalLM; ``fused`` stores the experts as
    transformers >= 5 holds them (``mlp.experts.gate_up_proj``) instead of the
    default per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3``."""
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(**DIMS, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config).eval()
    return _save(model, path, **({"save_original_format": False} if fused else {}))


def tiny_qwen2(path, *, tie: bool = True, seed: int = 6):
    """Write a random Qwen2ForCausalLM: q/k/v biases, tied embeddings (as the
    small Qwen2.5 models). The biases are drawn like the weights: transformers
    initialises them to zero, which would leave them untested."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**DIMS, rope_theta=1e6, rms_norm_eps=1e-6,
                                      tie_word_embeddings=tie, use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    return _save(model, path)


# name -> writer, one per architecture (and Llama 3.1's rope scaling).
ARCHITECTURES = {"llama": tiny_llama, "llama31": tiny_llama31, "mistral": tiny_mistral,
                 "mixtral": tiny_mixtral, "qwen2": tiny_qwen2}


def write_checkpoint(name: str, path, with_tokenizer: bool = True):
    """``ARCHITECTURES[name]`` written to ``path``, with a tokenizer beside it."""
    model = ARCHITECTURES[name](path)
    if with_tokenizer:
        tiny_tokenizer(path)
    return model
