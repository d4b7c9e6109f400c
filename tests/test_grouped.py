"""A prompt's MoE expert products in one launch (``kernels.grouped_linear``,
``grouped_kernel``): the kernel against each expert's own product, on CPU
tensors through Triton's interpreter and on GPUs, and the loop over the
experts' slices that runs everywhere else."""
import pytest
import torch
import torch.nn.functional as Fn

from shardwise.model import kernels
from triton_cpu import interpreted

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernel)")


def _routed(R, E, generator, empty=()):
    """``ends [E]`` (int32) of ``R`` rows dealt to ``E`` experts, those in
    ``empty`` given none."""
    picks = torch.randint(0, E, (R,), generator=generator)
    for e in empty:
        picks[picks == e] = (e + 1) % E
    sizes = torch.bincount(picks, minlength=E)
    return sizes.cumsum(0).to(torch.int32)


def _each_expert(x, w, ends, gated):
    """Each expert's rows by its own matrix in float64, its SwiGLU on the
    rounded halves: the product ``grouped_linear`` rounds once."""
    outs, start = [], 0
    for e, end in enumerate(ends.tolist()):
        h = x[start:end].double() @ w[e].double().t()
        outs.append(kernels.swiglu(h.to(x.dtype)).double() if gated else h)
        start = end
    return torch.cat(outs)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("R,E,K,O,empty", [(37, 3, 80, 40, ()), (50, 4, 64, 24, (0, 2)),
                                           (9, 5, 100, 72, (1,))])
def test_grouped_kernel_is_each_experts_product_on_cpu(monkeypatch, gated, R, E, K, O, empty):
    """Rows sorted by expert (some experts with none, blocks straddling two
    experts, K and O off the blocks' multiples) through the interpreted
    kernel in fp16 (its ``tl.dot`` misreads bf16): each row is its own
    expert's product, within :func:`_bound` of the exact one (gated, of the
    exact SwiGLU of its halves)."""
    found = interpreted("shardwise.model.triton_grouped", "grouped_kernel")
    monkeypatch.setattr(kernels, "_grouped_kernel", lambda tma=False: not tma and found)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    g = torch.Generator().manual_seed(R + E)
    ends = _routed(R, E, g, empty)
    x = torch.randn(R, K, generator=g).half()
    w = (torch.randn(E, (1 + gated) * O, K, generator=g) / 4).half()
    launches = []
    real = kernels._grouped_torch
    monkeypatch.setattr(kernels, "_grouped_torch", lambda *a: launches.append(a) or real(*a))
    got = kernels.grouped_linear(x, w, ends, gated, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32,
                                 num_warps=4, num_stages=1)
    assert launches == []  # the kernel, not the loop
    want, bound = _bound(x, w, ends, gated, 2.0 ** -11)
    assert got.shape == (R, O) and got.dtype == x.dtype
    assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("gated,cat", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("R,E,K,O,empty", [(37, 3, 80, 40, ()), (50, 4, 64, 24, (0, 2)),
                                           (9, 5, 104, 72, (1,)), (100, 2, 48, 40, ())])
def test_grouped_tma_kernel_is_each_experts_product_on_cpu(monkeypatch, gated, cat, tail, R, E,
                                                           K, O, empty):
    """``grouped_tma_kernel`` as :func:`test_grouped_kernel_is_each_experts_product_on_cpu`
    checks ``grouped_kernel``: its descriptors' boxes past an expert's rows
    (into the next expert's, past ``R``), past ``K`` (zeros) and past ``O``
    (the next expert's weight rows, or zeros), three programs each looping
    over many tiles, an expert's short last row block at full or half
    height (``tail``), the gate's and the up's tiles by two dots or one
    (``cat``). Each row is its own expert's product within :func:`_bound`."""
    found = interpreted("shardwise.model.triton_grouped", "grouped_tma_kernel")
    monkeypatch.setattr(kernels, "_grouped_kernel", lambda tma=False: tma and found)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    g = torch.Generator().manual_seed(R + E)
    ends = _routed(R, E, g, empty)
    x = torch.randn(R, K, generator=g).half()
    w = (torch.randn(E, (1 + gated) * O, K, generator=g) / 4).half()
    got = kernels.grouped_linear(x, w, ends, gated, tma=True, BLOCK_M=16, BLOCK_N=16,
                                 BLOCK_K=32, num_warps=4, num_stages=1, TAIL=tail,
                                 GATE_CAT=cat, programs=3)
    want, bound = _bound(x, w, ends, gated, 2.0 ** -11)
    assert got.shape == (R, O) and got.dtype == x.dtype
    assert ((got.double() - want).abs() <= bound).all()


def test_tma_takes_aligned_rows_and_contiguous_weights(monkeypatch):
    """The descriptors' kernel only where a descriptor can address the
    operands (16-byte aligned rows, contiguous weights) on a GPU with TMA,
    or on meta tensors (a traced step, taken as a Hopper GPU runs it);
    never off the GPU."""
    x, w = torch.zeros(4, 64, dtype=torch.half), torch.zeros(2, 32, 64, dtype=torch.half)
    assert not kernels._tma_fits(x, w)  # a CPU tensor
    meta_x, meta_w = x.to("meta"), w.to("meta")
    assert kernels._tma_fits(meta_x, meta_w)
    assert not kernels._tma_fits(meta_x[:, :60], meta_w[:, :, :60])  # 120-byte rows
    assert not kernels._tma_fits(meta_x, meta_w.transpose(1, 2).contiguous().transpose(1, 2))


def test_grouped_linear_loops_over_the_experts_off_the_gpu():
    """On CPU tensors: each expert's slice by its own matrix (``Fn.linear``,
    then ``swiglu``), the offsets read to the host; an expert with no rows
    costs nothing."""
    g = torch.Generator().manual_seed(3)
    ends = torch.tensor([4, 4, 11], dtype=torch.int32)
    x, w = torch.randn(11, 16, generator=g), torch.randn(3, 10, 16, generator=g)
    got = kernels.grouped_linear(x, w, ends, gated=True)
    want = torch.cat([kernels.swiglu(Fn.linear(x[:4], w[0])),
                      kernels.swiglu(Fn.linear(x[4:], w[2]))])
    assert torch.equal(got, want)
    assert torch.equal(kernels.grouped_linear(x, w, ends), torch.cat(
        [Fn.linear(x[:4], w[0]), Fn.linear(x[4:], w[2])]))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("R,E,K,O", [(4096, 8, 4096, 14336), (4096, 8, 14336, 4096),
                                     (300, 6, 1000, 700)])
@pytest.mark.parametrize("tma", [None, False])  # the device's choice (TMA on Hopper), pointers
def test_grouped_kernel_on_the_gpu(dtype, gated, R, E, K, O, tma):
    g = torch.Generator().manual_seed(R + K)
    ends = _routed(R, E, g, empty=(1,)).cuda()
    x = torch.randn(R, K, generator=g).to("cuda", dtype)
    w = (torch.randn(E, (1 + gated) * O, K, generator=g) * 0.02).to("cuda", dtype)
    got = kernels.grouped_linear(x, w, ends, gated, tma=tma)
    tol = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    want, bound = _bound(x, w, ends, gated, tol)
    assert ((got.double() - want).abs() <= bound).all()


def _bound(x, w, ends, gated, tol):
    """The exact product (float64; gated, the exact SwiGLU of its halves) and
    how far a GEMM's may be: each product within the float32 sum of K
    exact products (K 2^-24 times the sum of their sizes) and one rounding
    (``tol``); gated, those errors of the gate ``g`` and the up ``u``
    carried through ``silu(g) u`` (``silu``'s slope is under 1.1), and the
    activation's and the product's roundings."""
    K = x.shape[1]
    h = _each_expert(x, w, ends, False)
    err = tol * h.abs() + K * 2.0 ** -24 * _each_expert(x.abs(), w.abs(), ends, False)
    if not gated:
        return h, err
    F = h.shape[1] // 2
    g, u, eg, eu = h[:, :F], h[:, F:], err[:, :F], err[:, F:]
    act = g * torch.sigmoid(g)
    out = act * u
    return out, (1.1 * eg * (u.abs() + eu) + (act.abs() + 1.1 * eg) * eu
                 + 2 * tol * act.abs() * u.abs() + 2.0 ** -30)


def test_the_stand_in_computes_and_prices_the_grouped_product():
    """The recorder's stand-in for ``grouped_kernel`` (a step counted or
    recorded with the kernel switched on): the loop's rows where the
    offsets are known, nothing for meta tensors, and a GEMM-class kernel of
    every row by the (gate and up) outputs."""
    from shardwise.perf.tritons import stand_in

    g = torch.Generator().manual_seed(4)
    E, R, K, F = 3, 12, 16, 8
    x, w = torch.randn(R, K, generator=g), torch.randn(E, 2 * F, K, generator=g)
    ends = torch.tensor([5, 5, 12], dtype=torch.int32)
    y = torch.zeros(R, F)
    grouped = stand_in("grouped_kernel")
    args = (x, w, y, ends, F, K, w.stride(0), K, F)
    grouped.run((1,), *args, K=K, E=E, GATED=True)
    assert torch.equal(y, kernels._grouped_torch(x, w, ends, True))
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    grouped.run((1,), *meta, K=K, E=E, GATED=True)  # shapes only: nothing to compute
    k = grouped.kernel((1,), *args, K=K, E=E, GATED=True)
    assert k.cls == "gemm" and k.flops == 2.0 * R * K * 2 * F


def test_a_traced_step_launches_the_descriptors_kernel_and_prices_it_alike(monkeypatch):
    """A step traced on meta tensors takes ``grouped_tma_kernel`` (as a
    Hopper GPU runs it), built from the recorder's stand-in descriptors; its
    stand-in computes the loop's rows on CPU tensors and is priced as
    ``grouped_kernel`` is, the same GEMM."""
    from shardwise.perf.tritons import TritonShim, stand_in

    launched = []

    class Seen:
        def __init__(self, name):
            self.inner = stand_in(name)

        def __getitem__(self, grid):
            def launch(*args, **kw):
                if self.inner.name.startswith("grouped"):  # not the loop's swiglu_kernel
                    launched.append((self.inner, grid, args, kw))
                self.inner.run(grid, *args, **kw)
            return launch

    monkeypatch.setattr(kernels, "LOAD_HOOK", lambda module, name, loaded: (TritonShim,
                                                                          Seen(name)))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    g = torch.Generator().manual_seed(5)
    E, R, K, F = 3, 12, 16, 8
    x, w = torch.randn(R, K, generator=g).half(), torch.randn(E, 2 * F, K, generator=g).half()
    ends = torch.tensor([5, 5, 12], dtype=torch.int32)
    kernels.grouped_linear(x.to("meta"), w.to("meta"), ends.to("meta"), gated=True)
    tma, grid, args, kw = launched.pop()
    assert tma.name == "grouped_tma_kernel" and grid == (min(132, (1 + E) * 1),)
    got = kernels.grouped_linear(x, w, ends, gated=True, tma=True)
    assert torch.equal(got, kernels._grouped_torch(x, w, ends, True))
    plain = kernels.grouped_linear(x, w, ends, gated=True)  # CPU tensors: no descriptors
    assert launched[-1][0].name == "grouped_kernel" and torch.equal(plain, got)
    ptr, p_grid, p_args, p_kw = launched[-1]
    _, grid, args, kw = launched[-2]
    assert tma.kernel(grid, *args, **kw) == ptr.kernel(p_grid, *p_args, **p_kw)


def _stable_sort(experts, E):
    """:func:`kernels.sort_picks`' three tensors from their definition, in
    Python: the slots listed expert by expert, each expert's in slot order."""
    N, k = experts.shape
    slots = experts.reshape(-1).tolist()
    order = [i for e in range(E) for i, s in enumerate(slots) if s == e]
    ends = [sum(s <= e for s in slots) for e in range(E)]
    pos = [0] * len(slots)
    for row, i in enumerate(order):
        pos[i] = row
    return (torch.tensor(ends, dtype=torch.int32), torch.tensor(order) // k, torch.tensor(pos))


def _picks(N, k, E, g, empty=()):
    """``[N, k]`` distinct picks of ``E`` experts a token (as top-k picks), none of ``empty``."""
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    scores = torch.rand(N, len(allowed), generator=g)
    return allowed[scores.topk(k, dim=-1).indices]


@pytest.mark.parametrize("N,k,E,empty", [
    (37, 2, 8, ()),          # one block
    (700, 2, 8, (3,)),       # two blocks of 1024 slots, an expert with none
    (300, 2, 60, (0, 59)),   # 60 experts (64 lanes): five blocks of 128
    (150, 4, 256, ()),       # 256 experts: 19 blocks of 32, the counts read in two passes
    (1, 1, 5, ()),
])
def test_sort_picks_kernels_are_a_stable_sort_by_expert_on_cpu(monkeypatch, N, k, E, empty):
    """The counting sort's two kernels (interpreted on a CPU) give what a
    stable sort of the slots by expert gives, from its definition: where
    each expert's rows end, each sorted row's token, each slot's row; and
    so does PyTorch's form that runs everywhere else."""
    found = [interpreted("shardwise.model.triton_moe", name)
             for name in ("expert_counts_kernel", "expert_sort_kernel")]
    g = torch.Generator().manual_seed(N + E)
    experts = _picks(N, k, E, g, empty)
    want = _stable_sort(experts, E)
    for name, got in (("torch", kernels._sort_torch(experts, E)),
                      ("kernels", _sorted_by_kernels(monkeypatch, found, experts, E))):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), name


def _sorted_by_kernels(monkeypatch, found, experts, E):
    monkeypatch.setattr(kernels, "_sort_kernels", lambda: found)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    launches = []
    monkeypatch.setattr(kernels, "_sort_torch", lambda *a: launches.append(a))
    got = kernels.sort_picks(experts, E)
    monkeypatch.undo()
    assert launches == []  # the kernels, not PyTorch's sort
    return got


def test_the_sort_stand_ins_compute_what_the_kernels_do():
    """The recorder's stand-ins for the counting sort's kernels (a step
    counted on CPU tensors along the GPU's branches) write the counts and
    the sorted order; on meta tensors, nothing."""
    from shardwise.perf.tritons import stand_in

    g = torch.Generator().manual_seed(5)
    N, k, E, block = 40, 2, 6, 16
    experts = _picks(N, k, E, g).reshape(-1)
    chunks = -(-N * k // block)
    counts = torch.zeros(chunks, 8, dtype=torch.int32)
    ends, src, pos = (torch.zeros(E, dtype=torch.int32), torch.zeros(N * k, dtype=torch.long),
                      torch.zeros(N * k, dtype=torch.long))
    stand_in("expert_counts_kernel").run((chunks,), experts, counts, N * k, BLOCK=block, EP=8)
    for c in range(chunks):
        want = torch.bincount(experts[c * block:(c + 1) * block], minlength=8)
        assert torch.equal(counts[c], want.int())
    stand_in("expert_sort_kernel").run((chunks,), experts, counts, pos, src, ends, N * k, E,
                                       chunks, K=k, BLOCK=block, EP=8, CB=4)
    for a, b in zip((ends, src, pos), _stable_sort(experts.view(N, k), E)):
        assert torch.equal(a, b)
    meta = [t.to("meta") for t in (experts, counts, pos, src, ends)]
    stand_in("expert_sort_kernel").run((chunks,), *meta, N * k, E, chunks, K=k)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("N,k,E", [(2048, 2, 8), (24000, 2, 8), (4096, 8, 64), (333, 6, 160)])
def test_sort_picks_kernels_on_the_gpu(N, k, E):
    """The counting sort on the GPU gives PyTorch's stable sort's three tensors."""
    assert kernels._sort_kernels()
    g = torch.Generator().manual_seed(N)
    experts = _picks(N, k, E, g).cuda()
    got = kernels.sort_picks(experts, E)
    for a, b in zip(got, kernels._sort_torch(experts, E)):
        assert a.is_cuda and a.dtype == b.dtype and torch.equal(a, b)
