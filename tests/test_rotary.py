"""The rotary embedding: position tables, the one-kernel rotation (Triton,
through its interpreter on CPU tensors, and on GPUs) against its plain
PyTorch form, the dispatch, and the reference attention that uses it."""
import pytest
import torch

from shardwise.model import rotary
from shardwise.model.rope import Rope, rotated
from triton_cpu import interpreted

LLAMA31 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
           ("original_max_position_embeddings", 16), ("rope_type", "llama3"))
ROPES = [Rope(16, 10000.0), Rope(12, 500000.0, LLAMA31)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernel)")


def test_tables_are_built_once_and_hold_the_angles():
    rope = ROPES[1]
    cos, sin = rope.table(100, "cpu")
    assert rope.table(4000, "cpu")[0] is cos  # one table up to TABLE_MIN rows
    assert cos.shape[0] >= 4000 and cos.dtype == torch.float32
    ang = torch.outer(torch.arange(cos.shape[0], dtype=torch.float32), rope.inv_freq())
    assert torch.equal(cos, ang.cos()) and torch.equal(sin, ang.sin())
    longer = rope.table(cos.shape[0] + 1, "cpu")[0]
    assert longer.shape[0] == 2 * cos.shape[0] and torch.equal(longer[: cos.shape[0]], cos)
    # A device-tensor position reads the same rows as the int.
    c, s = rope.cos_sin(torch.tensor(7), 3, length=10)
    assert torch.equal(c, cos[7:10]) and torch.equal(s, sin[7:10])


def test_rotated_is_rotate_half():
    # Hugging Face's form: x * cos + rotate_half(x) * sin, cos and sin repeated
    # over both halves.
    torch.manual_seed(0)
    rope = ROPES[0]
    x = torch.randn(2, 5, 3, 16)
    cos, sin = rope.cos_sin(4, 5, device="cpu")
    c, s = torch.cat([cos, cos], -1)[None, :, None], torch.cat([sin, sin], -1)[None, :, None]
    half = torch.cat([-x[..., 8:], x[..., :8]], -1)
    torch.testing.assert_close(rotated(x, cos, sin), x * c + half * s, rtol=0, atol=0)


def _case(rope, dtype, B=2, T=3, H=4, Hkv=2, S=11, strided=False):
    """q, k, v as views of one fused projection's output (or k with strided
    dims, as an all-gather over head-dim slices leaves it), and a cache."""
    d = rope.head_dim
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * d, generator=g).to(dtype)
    q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], -1)
    q, k, v = q.view(B, T, H, d), k.view(B, T, Hkv, d), v.view(B, T, Hkv, d)
    if strided:
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # a head's dims Hkv apart
    kv = torch.randn(B, S, 2, Hkv, d, generator=g).to(dtype)
    return q, k, v, kv


def _expected(rope, pos, q, k, v, kv, slot, length):
    """What rotate must leave: rotated q and k (or the cache rows) by Rope.apply."""
    T = q.shape[1]
    qr, kr = rope.apply(q, pos, length), rope.apply(k, pos, length)
    if kv is None:
        return qr, kr, None
    at = slot if slot is not None else pos
    at = int(at) if isinstance(at, torch.Tensor) else at
    kv = kv.clone()
    kv[:, at : at + T, 0], kv[:, at : at + T, 1] = kr, v
    return qr, k.clone(), kv


CASES = [  # (pos, slot, into the cache, strided k)
    (5, None, False, False), (5, None, True, False), (0, 4, True, False),
    ("t", None, True, False), ("t", "t2", True, False), (2, None, False, True),
]


@pytest.mark.parametrize("rope", ROPES, ids=["plain", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pos,slot,into,strided", CASES)
def test_triton_rotation_matches_the_pytorch_form(monkeypatch, rope, dtype, pos, slot, into,
                                                  strided):
    # fp32 and fp16: the same expressions in float32, rounded once, so bit for
    # bit (Triton's interpreter rounds bf16 by truncation, unlike GPUs).
    kernel = interpreted("shardwise.model.triton_rotary", "rotary_kernel")
    monkeypatch.setattr(rotary, "_kernel", lambda: kernel)
    pos = torch.tensor(6) if pos == "t" else pos
    slot = torch.tensor(2) if slot == "t2" else slot
    length = 16 if isinstance(pos, torch.Tensor) else None
    for launch in (rotary._launch, rotary._torch):
        q, k, v, kv = _case(rope, dtype, strided=strided)
        want = _expected(rope, pos, q, k, v, kv if into else None, slot, length)
        launch(rope, pos, q, k, v if into else None, kv if into else None, slot, length)
        got = (q, k, kv if into else None)
        for g, w in zip(got, want):
            if w is not None:
                assert torch.equal(g, w), launch.__name__


def test_rotation_of_queries_or_keys_alone(monkeypatch):
    kernel = interpreted("shardwise.model.triton_rotary", "rotary_kernel")
    monkeypatch.setattr(rotary, "_kernel", lambda: kernel)
    rope = ROPES[1]
    q, k, v, _ = _case(rope, torch.float32, H=6, Hkv=2)
    want_q, want_k = rope.apply(q, 3), rope.apply(k, 9)
    rotary._launch(rope, 3, q, None, None, None, None, None)
    rotary._launch(rope, 9, None, k, None, None, None, None)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_dispatch_runs_pytorch_off_the_gpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("the Triton launch on CPU tensors")

    monkeypatch.setattr(rotary, "_launch", refuse)
    rope = ROPES[0]
    q, k, v, kv = _case(rope, torch.float32)
    want = _expected(rope, 4, q, k, v, kv, None, None)
    rotary.rotate(rope, 4, q, k, v, kv=kv)
    assert torch.equal(q, want[0]) and torch.equal(kv, want[2])
    with pytest.raises(ValueError, match="table length"):
        rotary.rotate(rope, torch.tensor(1), q, k)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pos,slot,into,strided", CASES)
def test_triton_rotation_on_the_gpu(dtype, pos, slot, into, strided):
    # The compiled kernel may fuse a product into the sum (one float32
    # rounding fewer): at most one unit in the last place of the output dtype.
    rope = Rope(128, 500000.0, LLAMA31)
    pos = torch.tensor(6, device="cuda") if pos == "t" else pos
    slot = torch.tensor(2, device="cuda") if slot == "t2" else slot
    length = 16 if isinstance(pos, torch.Tensor) else None
    outs = []
    for launch in (rotary._launch, rotary._torch):
        q, k, v, kv = (t.cuda() for t in _case(rope, dtype, B=3, T=4, H=32, Hkv=8,
                                                strided=strided))
        launch(rope, pos, q, k, v if into else None, kv if into else None, slot, length)
        outs.append((q, k, kv))
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}[dtype]
    for got, want in zip(*outs):
        assert ((got.float() - want.float()).abs() <= ulp * want.float().abs() + 1e-6).all()


@pytest.mark.gpu
@cuda
def test_llama_decode_step_replays_in_a_cuda_graph():
    # A Llama-style stack (GQA, Llama 3.1 rotary, SwiGLU, RMSNorm) on the GPU:
    # the static decode step (device-tensor position: rotation and cache
    # store in one kernel, grouped attention over the masked cache) captured
    # once and replayed at successive positions gives the eager steps' output.
    from shardwise.model.load import build_reference
    from shardwise.model.weights import WeightSource, make_inputs
    from shardwise.spec import ModelSpec

    spec = ModelSpec(name="llama", n_layers=2, d_model=512, n_heads=8, n_kv_heads=2,
                     head_dim=64, d_ff=1024, dtype="bf16", norm="rmsnorm", activation="swiglu",
                     vocab_size=300, rope_theta=500000.0, rope_scaling=LLAMA31)
    dev = torch.device("cuda")
    with torch.inference_mode():
        ref = build_reference(WeightSource(spec, 0), torch.bfloat16, dev)
        prompt, steps = make_inputs(spec, 3, 40, 4, 0, torch.bfloat16, dev)
        eager, static = ref.allocate_caches(3, 48), ref.allocate_caches(3, 48)
        ref(prompt, eager, 0)
        ref(prompt, static, 0)
        want = [ref(x, eager, 40 + t) for t, x in enumerate(steps)]
        pos, x = torch.tensor(40, device=dev), steps[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up at 40, off the capture: the graph rewrites that slot
            ref(x, static, pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ref(x, static, pos)
        for t, step in enumerate(steps):
            pos.fill_(40 + t)
            x.copy_(step)
            graph.replay()
            err = ((out.float() - want[t].float()).norm() / want[t].float().norm()).item()
            assert err <= 2e-2, (t, err)
