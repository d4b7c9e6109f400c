"""The reference MoE (no processes): against a naive per-token loop, and the
properties of the softmax top-k router.

float64 throughout (the router's softmax alone is fp32, by design): these
compare two orderings of the same arithmetic, so anything above ~1e-12 is a
real difference, not rounding.
"""
import pytest
import torch
import torch.nn.functional as Fn

from shardwise.model.reference import MoE, expert_mlp, route
from shardwise.parallel.ep import grouped_expert_mlp

D, F, E = 16, 24, 6


def random_moe(top_k: int, activation: str, seed: int = 0, **kw) -> MoE:
    g = torch.Generator().manual_seed(seed)
    moe = MoE(D, F, E, top_k, activation, **kw).double()
    n_in = 2 if activation == "swiglu" else 1
    local = moe.w_in.shape[0]
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(E, D, generator=g, dtype=torch.float64))
        moe.w_in.copy_(torch.randn(local, n_in * F, D, generator=g, dtype=torch.float64) / D**0.5)
        moe.w_down.copy_(torch.randn(local, D, F, generator=g, dtype=torch.float64) / F**0.5)
    return moe


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, straight from the definition:
    ``y = sum_j softmax(top-k logits)_j * expert_{e_j}(x)``."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = moe.router.weight @ x[n]  # [E]
        ranked = sorted(range(E), key=lambda e: -float(logits[e]))[: moe.top_k]
        # The router's softmax runs in fp32 whatever the model's dtype (route()).
        gates = torch.softmax(logits[ranked].float(), dim=0).to(x.dtype)
        for gate, e in zip(gates, ranked):
            h = moe.w_in[e] @ x[n]
            if moe.activation == "swiglu":
                h = Fn.silu(h[:F]) * h[F:]
            else:
                h = Fn.gelu(h)
            out[n] += gate * (moe.w_down[e] @ h)
    return out


# 2 tokens: fewer routed rows than experts for top-1 and top-2 (each row
# through its own expert); 21: every held expert on every token
# (DENSE_MOE_MAX_TOKENS); 90: the loop over each expert's routed tokens.
@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (10, 9)])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("top_k", [1, 2, E])
def test_reference_moe_equals_per_token_loop(top_k, activation, shape):
    from shardwise.model.reference import DENSE_MOE_MAX_TOKENS
    assert (shape[0] * shape[1] <= DENSE_MOE_MAX_TOKENS) == (shape != (10, 9))
    moe = random_moe(top_k, activation)
    x = torch.randn(*shape, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = moe(x)
        want = naive_moe(moe, x.reshape(-1, D)).view_as(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# 1 token: the shares holding 3 experts take the per-row path, the others
# the dense one; 20 and 100: the dense path and the routed loop.
@pytest.mark.parametrize("tokens", [1, 20, 100])
def test_expert_shares_sum_to_the_full_moe(tokens):
    # What tp_pp relies on: MoEs holding disjoint expert ranges add up to the whole.
    full = random_moe(2, "gelu")
    x = torch.randn(tokens, D, dtype=torch.float64)
    total = torch.zeros_like(x)
    with torch.no_grad():
        for first, local in ((0, 2), (2, 3), (5, 1)):
            part = MoE(D, F, E, 2, "gelu", first, local).double()
            part.router.weight.copy_(full.router.weight)
            part.w_in.copy_(full.w_in[first : first + local])
            part.w_down.copy_(full.w_down[first : first + local])
            total += part(x)
        torch.testing.assert_close(total, full(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_route_is_softmax_over_the_top_k(top_k):
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    weights, experts = route(logits, top_k)
    assert weights.shape == experts.shape == (50, top_k)
    assert weights.dtype == torch.float32
    # k distinct experts per token, and they are the k largest logits.
    assert all(len(set(row)) == top_k for row in experts.tolist())
    chosen = logits.gather(1, experts)
    rest = logits.scatter(1, experts, float("-inf"))
    assert (chosen.min(1).values >= rest.max(1).values).all()
    # Weights: positive, summing to 1, in the order of the logits, and equal
    # to the full softmax restricted to the chosen experts and renormalised.
    torch.testing.assert_close(weights.sum(1), torch.ones(50))
    assert (weights > 0).all() and (weights[:, :-1] >= weights[:, 1:]).all()
    full = torch.softmax(logits, dim=1).gather(1, experts)
    torch.testing.assert_close(weights, full / full.sum(1, keepdim=True))


def test_route_computes_in_fp32_for_low_precision_logits():
    logits = torch.randn(10, 4).bfloat16()
    weights, _ = route(logits, 2)
    assert weights.dtype == torch.float32


def test_grouped_expert_mlp_equals_one_expert_at_a_time():
    # ep's grouped GEMM: rows grouped by expert (some groups empty).
    moe = random_moe(2, "swiglu")
    sizes = [3, 0, 5, 1, 0, 4]
    x = torch.randn(sum(sizes), D, dtype=torch.float64)
    got = grouped_expert_mlp(x, sizes, moe.w_in.detach(), moe.w_down.detach(), "swiglu")
    start, want = 0, []
    for e, n in enumerate(sizes):
        want.append(expert_mlp(x[start : start + n], moe.w_in[e].detach(),
                               moe.w_down[e].detach(), "swiglu"))
        start += n
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens", [2, 16])  # each row through its expert; every expert
def test_decode_paths_round_like_the_routed_loop(monkeypatch, tokens):
    # bf16: every held expert on every token, weighted (0 where unpicked), or
    # each routed row through its own expert, rounds each token's two picked
    # terms and their sum as the loop over routed tokens does; only the GEMMs'
    # shapes differ, so the two agree to a bf16 rounding at most.
    import shardwise.model.reference as ref
    moe = random_moe(2, "gelu").to(torch.bfloat16)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        dense = moe(x)
        monkeypatch.setattr(ref, "DENSE_MOE_MAX_TOKENS", 0)
        loop = moe(x)
    torch.testing.assert_close(dense.float(), loop.float(), rtol=1e-2, atol=1e-2)
    assert (dense == loop).float().mean() > 0.9



@pytest.mark.parametrize("tokens, held, path", [(1, 6, "_sparse"), (2, 6, "_sparse"),
                                                 (3, 6, "_dense"), (1, 2, "_dense"),
                                                 (100, 6, "_routed")])
def test_each_call_takes_the_path_that_reads_least(tokens, held, path, monkeypatch):
    """Fewer routed rows (tokens x top-2) than held experts: each row through its
    own expert, reading only those; otherwise every held expert (a decode step)
    or the loop over each expert's tokens (a prompt)."""
    moe = random_moe(2, "swiglu", first_expert=0, local_experts=held)
    taken = []
    for name in ("_sparse", "_dense", "_routed"):
        real = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _n=name, _f=real: taken.append(_n) or _f(*a))
    with torch.no_grad():
        moe(torch.randn(tokens, D, dtype=torch.float64))
    assert taken == [path]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_gemm_path_equals_the_loop(monkeypatch, activation):
    # bf16 on CPU: torch._grouped_mm computes each expert's slice as the loop's
    # per-expert GEMM does (the GPU's CUTLASS kernel sums in another order:
    # the GPU verification runs bound that). Some experts get no token.
    import shardwise.model.reference as ref
    moe = random_moe(2, activation).to(torch.bfloat16)
    with torch.no_grad():
        moe.router.weight[:2] -= 100.0  # experts 0 and 1: never picked
    x = torch.randn(90, D, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    taken = []
    real = moe._grouped
    monkeypatch.setattr(moe, "_grouped", lambda *a: taken.append(1) or real(*a))
    with torch.no_grad():
        loop = moe(x)
        assert not taken  # a CPU tensor: the loop
        monkeypatch.setattr(ref, "grouped_gemm_ok", lambda x, w: True)
        grouped = moe(x)
    assert taken == [1]
    torch.testing.assert_close(grouped, loop, rtol=0, atol=0)
    # A module holding some of the experts (expert parallelism) keeps the loop.
    part = random_moe(2, activation, first_expert=2, local_experts=3).to(torch.bfloat16)
    real = part._grouped
    monkeypatch.setattr(part, "_grouped", lambda *a: taken.append(2) or real(*a))
    with torch.no_grad():
        part(x)
    assert taken == [1]


def test_grouped_gemm_is_taken_on_hopper_bf16_only():
    from shardwise.model.reference import grouped_gemm_ok
    x, w = torch.zeros(4, 16, dtype=torch.bfloat16), torch.zeros(3, 32, 16, dtype=torch.bfloat16)
    assert not grouped_gemm_ok(x, w)  # a CPU tensor
    meta = dict(device="meta")
    xm, wm = x.to(**meta), w.to(**meta)
    assert not grouped_gemm_ok(xm, wm)  # meta tensors are not CUDA outside a traced step
    if torch.cuda.is_available():
        want = torch.cuda.get_device_capability() >= (9, 0)
        assert grouped_gemm_ok(x.cuda(), w.cuda()) == want
        assert not grouped_gemm_ok(x.cuda().half(), w.cuda().half())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_logits_on_gpu_are_the_fp32_sums(dtype):
    # The half-precision GEMM with an fp32 output sums the same exact products
    # as the fp32 GEMM of the upcast operands, in another order: fp32 rounding
    # of sums of 4096 terms apart, and the same top-2 picks but for near-ties.
    from shardwise.model import reference
    from shardwise.model.reference import router_logits
    assert reference._MM_OUT_DTYPE
    g = torch.Generator(device="cuda").manual_seed(0)
    router = torch.nn.Linear(4096, 8, bias=False).to("cuda", dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 4096, device="cuda", generator=g) * 0.02)
        x = torch.randn(3, 700, 4096, device="cuda", generator=g).to(dtype)
        got = router_logits(router, x)
        want = torch.nn.functional.linear(x.double(), router.weight.double())
    assert got.dtype == torch.float32 and got.shape == (3, 700, 8)
    size = torch.nn.functional.linear(x.double().abs(), router.weight.double().abs())
    assert ((got.double() - want).abs() <= 4096 * 2.0 ** -24 * size).all()
    picks, ref_picks = got.topk(2, -1).indices, want.topk(2, -1).indices
    assert (picks == ref_picks).all(-1).float().mean() > 0.99


def _router_case(N, E, D, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, D, device=device, generator=g).to(dtype)
    w = (torch.randn(E, D, device=device, generator=g) * 0.05).to(dtype)
    return x, w


def _check_route_rows(x, w, k):
    """The router's two kernels against ``route`` of the float64 logits: the
    same float32 sums in another order, so the logits agree to float32
    rounding of sums of D exact products (at most D units of 2^-24 of the
    sum of the products' sizes), and the picks, largest first, are the same
    in every row whose float64 top-(k+1) logits are further apart than twice
    that (near-ties, which either order may take, are most rows of none of
    these cases); their softmax weights to float32 rounding."""
    from shardwise.model.kernels import route_rows
    from shardwise.model.reference import route

    weights, experts = route_rows(x, w, k)
    logits = x.double() @ w.double().t()  # [N, E]
    want_w, want_e = route(logits, k)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64
    assert weights.shape == experts.shape == (x.shape[0], k)
    top = logits.topk(min(k + 1, w.shape[0]), -1).values
    size = (x.double().abs() @ w.double().abs().t()).amax(-1, keepdim=True)  # [N, 1]
    clear = ((top[:, :-1] - top[:, 1:]) > 2 * x.shape[1] * 2.0 ** -24 * size).all(-1).cpu()
    assert clear.float().mean() >= 0.5
    assert torch.equal(experts.cpu()[clear], want_e.cpu()[clear])
    assert torch.allclose(weights.cpu().double()[clear], want_w.cpu().double()[clear],
                          rtol=1e-5, atol=1e-6)


def _interpreted_router(monkeypatch):
    """route_rows' two kernels, run by Triton's interpreter."""
    from shardwise.model import kernels
    from triton_cpu import interpreted

    logits = interpreted("shardwise.model.triton_moe", "route_logits_kernel")
    route = interpreted("shardwise.model.triton_moe", "route_kernel")
    monkeypatch.setattr(kernels, "_route_logits_kernel", lambda: logits)
    monkeypatch.setattr(kernels, "_route_kernel", lambda: route)


def _splits(E, D):
    """route_rows' (BLOCK_D, splits) for ``E`` experts of width ``D``."""
    block_e = 1 << (E - 1).bit_length()
    block_d = max(16, min(256, 4096 // block_e, 1 << (D - 1).bit_length()))
    return block_d, -(-D // block_d)


# (BLOCK_D, splits) of each case: (1, 8, 4096): 256 x 16; (5, 64, 1536): 64 x 24;
# (3, 128, 96): 32 x 3; (2, 6, 100): 128 x 1, ragged; (4, 3, 40): 64 x 1, ragged;
# (3, 6, 1000): 256 x 4, the last of 232; (2, 100, 200): 32 x 7, the last of 8;
# (1, 256, 1000): 16 x 63, the last of 8, summed 16 splits at a time (4 steps).
ROUTER_CASES = [(1, 8, 4096, 2), (16, 8, 4096, 2), (5, 64, 1536, 6), (3, 128, 96, 8),
                (2, 6, 100, 2), (4, 3, 40, 1), (3, 6, 1000, 2), (2, 100, 200, 4),
                (1, 256, 1000, 8)]


def test_router_cases_split_the_width():
    # Several splits, ragged last chunks, E off the powers of two.
    shapes = {(E, D): _splits(E, D) for _, E, D, _ in ROUTER_CASES}
    assert shapes[(8, 4096)] == (256, 16) and shapes[(256, 1000)] == (16, 63)
    assert sum(s > 1 and D % b for (E, D), (b, s) in shapes.items()) >= 3
    assert sum(E & (E - 1) != 0 for E, _ in shapes) >= 4


@pytest.mark.parametrize("N,E,D,k", ROUTER_CASES)
def test_route_kernel_picks_as_route_does_on_cpu(monkeypatch, N, E, D, k):
    # Triton's interpreter: bf16 operands, as a decode step on a GPU has them;
    # E and D off the powers of two (masked lanes, ragged last chunks), k from 1 to 8.
    _interpreted_router(monkeypatch)
    x, w = _router_case(N, E, D, torch.bfloat16, seed=N * E + k)
    _check_route_rows(x, w, k)


@pytest.mark.parametrize("N,E,k", [(300, 8, 2), (70, 60, 4), (5, 128, 8), (9, 3, 1)])
def test_a_prompts_picks_are_routes_on_cpu(monkeypatch, N, E, k):
    """A prompt's picks from its float32 logits by ``route_kernel`` alone
    (interpreted): those of :func:`reference.route` (distinct random logits:
    no ties), their softmax to float32 rounding; the tokens past a decode
    step's, E off the powers of two."""
    from shardwise.model import kernels
    from shardwise.model.reference import route
    from triton_cpu import interpreted

    found = interpreted("shardwise.model.triton_moe", "route_kernel")
    monkeypatch.setattr(kernels, "_route_kernel", lambda: found)
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(N + E))
    want_w, want_e = route(logits, k)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert kernels.pickable(logits) and not kernels.pickable(logits.half())
    assert not kernels.pickable(torch.zeros(4, kernels.ROUTE_MAX_EXPERTS + 1))
    weights, experts = kernels.pick_top(logits, k)
    monkeypatch.undo()
    assert torch.equal(experts, want_e)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernel)")
@pytest.mark.parametrize("N,E,k", [(2048, 8, 2), (24000, 8, 2), (999, 60, 4), (64, 128, 8)])
def test_a_prompts_picks_are_routes_on_the_gpu(N, E, k):
    from shardwise.model import kernels
    from shardwise.model.reference import route

    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(N)).cuda()
    assert kernels.pickable(logits)
    weights, experts = kernels.pick_top(logits, k)
    want_w, want_e = route(logits.cpu(), k)
    assert torch.equal(experts.cpu(), want_e)
    torch.testing.assert_close(weights.cpu(), want_w, rtol=1e-5, atol=1e-6)


def _tied_case(N, E, D, dtype, device="cpu"):
    """Integer operands (exact in half precision, their float32 sums exact in
    any order) with rows of the router repeated: logits tied exactly, among
    them the largest; the first token all zeros (every logit 0)."""
    g = torch.Generator().manual_seed(E + D)
    w = torch.randint(-2, 3, (E, D), generator=g).float()
    w[E // 2 :] = w[: E - E // 2].flip(0)  # row e equals row E - 1 - e
    x = torch.randint(-2, 3, (N, D), generator=g).float()
    x[0] = 0
    return x.to(device, dtype), w.to(device, dtype)


def _check_ties(x, w, k):
    """Equal logits picked lowest index first: the experts ordered by
    decreasing logit, then increasing index."""
    from shardwise.model.kernels import route_rows

    weights, experts = route_rows(x, w, k)
    logits = x.double().cpu() @ w.double().cpu().t()  # exact integers
    E = w.shape[0]
    order = torch.stack([torch.tensor(sorted(range(E), key=lambda e: (-row[e].item(), e)))
                         for row in logits])[:, :k]
    assert torch.equal(experts.cpu(), order)
    top = logits.gather(1, order)
    assert (top[1:, 0] == top[1:, 1]).all()  # each logit twice: the largest tied
    torch.testing.assert_close(weights.cpu().double(), torch.softmax(top, -1),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(experts[0].cpu(), torch.arange(k))  # all tied: the first k


@pytest.mark.parametrize("N,E,D,k", [(3, 8, 4096, 2), (2, 6, 1000, 3), (2, 100, 200, 8)])
def test_route_kernel_takes_the_lowest_index_among_equals(monkeypatch, N, E, D, k):
    _interpreted_router(monkeypatch)
    _check_ties(*_tied_case(N, E, D, torch.bfloat16), k)


def test_route_rows_stand_ins_along_the_gpu_branches():
    # counting.CudaPaths runs the GPU branches on CPU: route_rows launches its
    # two kernels, whose stand-ins compute the partials and route their sum.
    from shardwise.model import reference
    from shardwise.perf.counting import CallCounter, CudaPaths

    x, w = _router_case(3, 6, 1000, torch.bfloat16, seed=4)
    router = torch.nn.Linear(1000, 6, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        router.weight.copy_(w)
    with torch.inference_mode(), CudaPaths(), CallCounter(names=True) as c:
        got_w, got_e = reference.route_tokens(router, x, 2)
    assert c.names.get(("tritons", "route_logits_kernel")) == 1
    assert c.names.get(("tritons", "route_kernel")) == 1 and c.counts["tritons"] == 2
    want_w, want_e = reference.route(x.float() @ w.float().t(), 2)
    assert torch.equal(got_e, want_e)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_route_rows_recorded_prices_what_each_kernel_moves():
    # Recorded, the partials' kernel reads x and the router and writes the
    # partials; the routing kernel reads them and writes the picks.
    from shardwise.perf.tritons import stand_in

    N, E, D, k = 2, 6, 1000, 2
    x, w = (torch.empty(N, D, dtype=torch.bfloat16, device="meta"),
            torch.empty(E, D, dtype=torch.bfloat16, device="meta"))
    block_d, S = _splits(E, D)
    P = torch.empty(N, S, E, device="meta")
    WT = torch.empty(N, k, device="meta")
    EX = torch.empty(N, k, dtype=torch.int64, device="meta")
    part = stand_in("route_logits_kernel").kernel((N, S), x, w, P, D, E, D, D, BLOCK_E=8,
                                                  BLOCK_D=block_d, num_warps=4)
    assert part.bytes == 2 * N * D + 2 * E * D + 4 * N * S * E
    route = stand_in("route_kernel").kernel((N,), P, WT, EX, S, E, K=k, BLOCK_S=2, BLOCK_E=8,
                                            BLOCK_K=2, num_warps=1)
    assert route.bytes == 4 * N * S * E + 4 * N * k + 8 * N * k


def test_route_tokens_runs_pytorch_off_the_gpu(monkeypatch):
    from shardwise.model import kernels, reference

    monkeypatch.setattr(kernels, "route_rows", lambda *a: pytest.fail("the Triton launch on CPU"))
    router = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(4, 32)
    got = reference.route_tokens(router, x, 2)
    want = reference.route(reference.router_logits(router, x), 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,E,D,k", [(1, 8, 4096, 2), (16, 8, 4096, 2), (64, 128, 2048, 8),
                                     (3, 6, 1000, 2), (2, 100, 200, 4), (8, 256, 7168, 2)])
def test_route_kernel_on_the_gpu(dtype, N, E, D, k):
    # Past ROUTE_MAX_EXPERTS (256 here) the model routes by PyTorch's kernels,
    # which are the faster there; route_rows itself still routes them right.
    from shardwise.model.kernels import ROUTE_MAX_EXPERTS, routable

    x, w = _router_case(N, E, D, dtype, "cuda")
    assert routable(x, w) == (E <= ROUTE_MAX_EXPERTS)
    _check_route_rows(x, w, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,E,D,k", [(3, 8, 4096, 2), (2, 6, 1000, 3), (2, 100, 200, 8)])
def test_route_kernel_takes_the_lowest_index_among_equals_on_the_gpu(dtype, N, E, D, k):
    _check_ties(*_tied_case(N, E, D, dtype, "cuda"), k)
