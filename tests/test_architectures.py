"""The reference model computes what transformers computes, for each supported
architecture read from its own checkpoint: Llama (and Llama 3.1's rope
scaling), Mistral, Mixtral and Qwen2 (q/k/v biases, tied embeddings).

fp32 on CPU, prefill of 40 tokens then one decode step from the KV cache: the
two implementations order their additions differently (fused QKV, the
rotation's float32 arithmetic), ~1e-7 relative; 1e-5 leaves room for nothing else.
"""
from __future__ import annotations

import pytest
import torch

from hf_models import ARCHITECTURES, write_checkpoint
from shardwise.model.checkpoint import CheckpointSource
from shardwise.model.load import build_reference

FEATURES = {  # what each checkpoint must turn on in the spec, so the test covers it
    "llama": {}, "mistral": {}, "mixtral": {"n_experts": 4},
    "llama31": {"rope_scaling": True}, "qwen2": {"qkv_bias": True, "tie_embeddings": True},
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_reference_matches_transformers(name, tmp_path):
    hf = write_checkpoint(name, tmp_path, with_tokenizer=False)
    source = CheckpointSource(str(tmp_path))
    for field, want in FEATURES[name].items():
        value = getattr(source.spec, field)
        assert (value is not None and value is not False) if want is True else value == want, field
    ref = build_reference(source, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    prompt, new = torch.randint(0, 128, (2, 40), generator=g), torch.randint(0, 128, (2, 1), generator=g)
    with torch.inference_mode():
        caches = ref.allocate_caches(2, 41)
        got = [ref(prompt, caches, 0), ref(new, caches, 40)]
        full = hf(torch.cat([prompt, new], 1)).logits
        want = [full[:, :40], full[:, 40:]]
    for g_, w in zip(got, want):
        assert ((g_ - w).norm() / w.norm()).item() <= 1e-5
