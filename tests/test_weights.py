"""Synthetic weights: deterministic, sliceable, and the reference is self-consistent."""
import pytest
import torch

from shardwise.model import WeightSource, build_reference, make_inputs
from shardwise.model.weights import generate
from shardwise.presets import get_preset


def test_slices_equal_the_slice_of_the_whole():
    full = generate(7, "w", (13, 11, 5))
    rows, cols = torch.tensor([0, 4, 12]), torch.tensor([10, 3])
    part = generate(7, "w", (13, 11, 5), [rows, cols, slice(1, 4)])
    assert torch.equal(part, full[rows][:, cols][:, :, 1:4])


def test_values_depend_on_seed_and_name_only():
    a = generate(1, "layers.0.attn.wq", (64, 64))
    assert torch.equal(a, generate(1, "layers.0.attn.wq", (64, 64)))
    assert not torch.equal(a, generate(2, "layers.0.attn.wq", (64, 64)))
    assert not torch.equal(a, generate(1, "layers.1.attn.wq", (64, 64)))
    # U(-1, 1): mean 0, std 1/sqrt(3)
    big = generate(0, "x", (512, 512))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 3**-0.5) < 0.01


def test_no_overflow_past_2_pow_32_elements():
    # Flat indices above 2**32 (a 60 GB model has them) still hash without overflow.
    idx = torch.tensor([0, 2**32 - 1, 2**32, 2**40 + 5])
    from shardwise.model.weights import uniform_at

    u = uniform_at(0, "w", idx)
    assert torch.all(u.abs() < 1) and len(set(u.tolist())) == 4


def test_decode_with_cache_equals_full_forward():
    spec = get_preset("tiny-dense").model
    model = build_reference(WeightSource(spec, 0), torch.float32, "cpu")
    prompt, steps = make_inputs(spec, 2, 9, 3, 0, torch.float32, "cpu")
    with torch.inference_mode():
        caches = model.allocate_caches(2, 12)
        outs = [model(prompt, caches, 0)] + [model(x, caches, 9 + t) for t, x in enumerate(steps)]
        full = model(torch.cat([prompt, *steps], dim=1))
    got = torch.cat(outs, dim=1)
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-5)


def test_reference_for_a_30b_preset_slices_without_materialising():
    # One rank's 1/8 of one 30B layer projection, computed alone: shape only what it holds.
    spec = get_preset("seed-layerwise-30b").model
    src = WeightSource(spec, 0)
    rows = torch.arange(0, spec.d_ff // 64)
    part = src.get("layers.3.mlp.w_up", [rows], dtype=torch.bfloat16, device="cpu")
    assert part.shape == (spec.d_ff // 64, spec.d_model)



def test_a_30b_rank_is_built_from_its_own_shard_only():
    """A rank of tp_pp:8x2 on the 30B preset builds exactly its 1/16 of the
    layer weights (on the meta device: shapes without memory), so starting the
    preset never materialises the whole model anywhere."""
    from shardwise.model.load import ShardLoader
    from shardwise.parallel.registry import validate_plan
    from shardwise.parallel.comm import Comm
    from shardwise.spec import Plan

    preset = get_preset("seed-layerwise-30b")
    spec, wl, plan = preset.model, preset.reduced, Plan.parse("tp_pp:8x2")
    cls, topo = validate_plan(spec, wl, plan, 16)
    topo.rank = 9  # pipeline stage 1, tensor-parallel rank 1
    loader = ShardLoader(WeightSource(spec, 0), torch.bfloat16, "meta")
    rank = cls(spec, wl, plan, topo, Comm(topo), loader)
    assert all(p.is_meta for p in rank.parameters())
    params = sum(p.numel() for p in rank.parameters())
    layers, norms = spec.n_layers // 2, spec.norm_params()  # 8 layers; norms replicated
    assert params == layers * ((spec.layer_params() - norms) // 8 + norms) + spec.norm_params() // 2


def test_up_projection_forms():
    import torch
    import torch.nn.functional as F

    from shardwise.model.reference import up_projection

    x, w = torch.randn(3, 5, 8), torch.randn(12, 8)
    h = x @ w.t()
    torch.testing.assert_close(up_projection(x, w, "gelu"), F.gelu(h))
    torch.testing.assert_close(up_projection(x, w, "gelu_tanh"), F.gelu(h, approximate="tanh"))
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(up_projection(x, w, "swiglu"), F.silu(gate) * up)
    assert not torch.allclose(F.gelu(h), F.gelu(h, approximate="tanh"), atol=1e-6, rtol=0)


def test_static_shape_step_builds_position_tensors_once():
    # A decode step at a device-tensor position (the CUDA-graph path) builds
    # its mask and cache slots in the first layer only, and matches the
    # integer-position step.
    import torch

    from shardwise.model import WeightSource, build_reference
    from shardwise.model import reference as ref_mod
    from shardwise.presets import get_preset

    spec = get_preset("tiny-dense").model
    model = build_reference(WeightSource(spec, 0), torch.float32, torch.device("cpu"))
    x = torch.randn(2, 6, spec.d_model)
    step = torch.randn(2, 1, spec.d_model)
    caches = model.allocate_caches(2, 8)
    model(x, caches, 0)
    want = model(step, caches, 6)
    built = []
    real = torch.arange

    def counting(*a, **k):
        built.append(a)
        return real(*a, **k)

    caches = model.allocate_caches(2, 8)
    model(x, caches, 0)
    torch.arange = counting
    try:
        got = model(step, caches, torch.tensor(6))
    finally:
        torch.arange = real
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(built) == 3, built  # slots (1) and mask (2), not per layer
    # The step's memo went with the step: the next step at the same (reused,
    # then moved) position tensor builds its slots again.
    pos = torch.tensor(6)
    with ref_mod.one_step(pos):
        first = ref_mod.per_step(pos, ("x",), lambda: pos + 1)
        assert ref_mod.per_step(pos, ("x",), lambda: pos + 2) is first
    assert pos.__dict__ == {}
    assert ref_mod.per_step(pos, ("x",), lambda: pos + 2).item() == 8


def test_cache_write_moves_rows_as_words():
    # The prefill cache write copies token-major rows as 8-byte words where
    # the row allows it, and falls back to an element copy where it does not.
    import torch

    from shardwise.model.reference import KVCache

    for d, heads in [(8, 3), (3, 2)]:  # 16-byte rows; 6-byte rows (fallback)
        c = KVCache.allocate(2, heads, 10, d, torch.bfloat16, "cpu")
        assert c.k.shape == (2, heads, 10, d) and c.kv.is_contiguous()
        qkv = torch.randn(2, 5, 3 * heads * d).bfloat16()  # k sliced from a fused QKV output
        k = qkv[..., heads * d: 2 * heads * d].view(2, 5, heads, d).transpose(1, 2)
        keys, _ = c.write(2, k, k)
        assert torch.equal(keys[:, :, 2:7], k) and not keys[:, :, :2].any()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_prompt_projection_written_into_the_cache(monkeypatch, qkv_bias):
    # Long prompts run the K/V projection per sequence with the cache as the
    # GEMM's output (plus the K/V biases, where the model has them). Same
    # logits as without a cache, and the decode step that reads that cache
    # matches one whose cache was filled by the copy path.
    import torch

    from shardwise.model import WeightSource, build_reference
    from shardwise.model import reference as ref_mod
    from shardwise.presets import get_preset

    spec = get_preset("tiny-dense").model.replace(qkv_bias=qkv_bias)
    model = build_reference(WeightSource(spec, 0), torch.float32, torch.device("cpu"))
    x, step = torch.randn(3, 9, spec.d_model), torch.randn(3, 1, spec.d_model)
    outs = []
    for threshold in (1, 10**9):  # direct GEMMs into the cache; fused QKV and a copy
        monkeypatch.setattr(ref_mod, "DIRECT_CACHE_MIN_TOKENS", threshold)
        caches = model.allocate_caches(3, 12)
        outs.append((model(x, caches, 0), model(step, caches, 9), caches[0].kv.clone()))
    torch.testing.assert_close(outs[0][0], model(x), rtol=1e-5, atol=1e-6)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert outs[0][2][:, :10].abs().sum() > 0 and not outs[0][2][:, 10:].any()
