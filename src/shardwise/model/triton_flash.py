"""The Triton side of :mod:`shardwise.model.flash`: a flash-attention forward
kernel that returns the log-sum-exp with the output. Imported only where
Triton is installed (``flash._kernel``).

FlashAttention-2's forward (Dao 2023, "FlashAttention-2: Faster Attention
with Better Parallelism and Work Partitioning"): a program owns ``BLOCK_M``
query rows, keeps their output in float32 registers and walks the key
blocks once, rescaling by the running row maximum (online softmax,
Milakov & Gimelshein 2018). Scores are scaled by ``scale * log2(e)`` so the
exponentials are ``exp2``; the lse is converted back to the natural log.

Two choices are for wide heads on Hopper:

* ``P V`` runs one key block late (block n's scores, then block n-1's
  ``P V``): the two matrix products are independent and may be in flight
  together (FlashAttention-3's intra-warpgroup pipelining, Shah et al.
  2024), and Triton lays out the score tile without its "chained dot" rule,
  which gives every warp whole rows: at ``BLOCK_M`` 64 and 8 warps the two
  warpgroups split the key columns of the scores and the output's columns,
  where with the rule both would compute the same scores.
* ``DV`` < ``HEAD_DIM`` splits the output's columns over programs (the
  scores are computed by each), for tiles whose float32 output would not
  fit the registers: a 128-row output at head_dim 512 (256 KB), the
  fastest tiles measured there (``flash.CONFIGS``, results/flash).

Grouped-query attention: the ``G`` query heads that share a key/value head
are the rows of one problem (row ``r`` is head ``r // T`` of the group,
query ``r % T``), so every K/V tile a program loads serves all of them and
K/V are never expanded per query head. K and V are read through tensor
descriptors (the copy engine on Hopper; rows past ``S`` read as zeros).
"""
import triton
import triton.language as tl
import triton.tools.tensor_descriptor  # noqa: F401 (the launcher's, flash.launch)


@triton.jit
def _scores(q, desc_k, b, j, start_n, t_pos, offs_n, S, qk_scale, m_i, l_i,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
            CAUSAL: tl.constexpr):
    """Block ``start_n``'s scores and the online-softmax update: returns its
    probabilities (relative to the new row maximum), the factor ``alpha``
    that takes the output so far to that maximum, the new maximum and sum.
    ``MASK``: keys past ``S`` (and, ``CAUSAL``, past each row's position
    ``t_pos``) are excluded."""
    k = desc_k.load([b, j, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] float32
    if MASK:
        keys = start_n + offs_n
        seen = keys[None, :] < S
        if CAUSAL:
            seen = seen & (keys[None, :] <= t_pos[:, None])
        s = tl.where(seen, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _values(acc, alpha, p, desc_v, b, j, start_n, dv0, BLOCK_N: tl.constexpr, DV: tl.constexpr):
    """``acc * alpha + p V[start_n : start_n + BLOCK_N, dv0 : dv0 + DV]``: the
    output so far rescaled to block ``start_n``'s maximum, plus that block.
    (Rescaled here, in the output's layout: only the row vector ``alpha``
    changes layout, not the output tile.)"""
    v = desc_v.load([b, j, start_n, dv0]).reshape(BLOCK_N, DV)
    return tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


# The sizes are not specialised on (Triton would compile again for a length of
# 1 or a multiple of 16): one compilation per dtype, width, tiles and mask.
@triton.jit(do_not_specialize=["T", "S", "G", "Hkv", "q_start"])
def flash_fwd_kernel(Q, desc_k, desc_v, desc_o, LSE, sq_b, sq_h, sq_t,
                     T, S, G, Hkv, q_start, qk_scale,
                     HEAD_DIM: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Program (m, b * Hkv + j, c): rows ``m * BLOCK_M ..`` of the ``G * T``
    query rows of key/value head j of sequence b, over keys ``0 .. S``
    (``CAUSAL``: row t sees keys ``<= q_start + t``), output columns
    ``c * DV ..``. Q is read by its strides (a block may straddle two heads
    of the group). Writes ``O [B * Hkv, G * T, HEAD_DIM]`` (``[B, H, T, d]``
    contiguous) and ``LSE [B, H, T]`` (natural log, float32). The heaviest
    causal blocks run first."""
    n_m = tl.cdiv(G * T, BLOCK_M)
    start_m = tl.program_id(0)
    if CAUSAL:
        start_m = n_m - 1 - start_m
    bh = tl.program_id(1)
    dv0 = tl.program_id(2) * DV
    b = bh // Hkv
    j = bh % Hkv
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    real = rows < G * T
    g = rows // T  # head within the group
    t = rows - g * T  # query index
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = b.to(tl.int64) * sq_b + (j * G + g).to(tl.int64) * sq_h + t.to(tl.int64) * sq_t
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=real[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # the previous block's (none yet)
    alpha = tl.full([BLOCK_M], 1.0, tl.float32)

    # The rows' query indices span [t_lo, t_hi] (all of 0..T-1 when the
    # block straddles two heads of the group).
    r0 = start_m * BLOCK_M
    r1 = tl.minimum(r0 + BLOCK_M, G * T) - 1
    one_head = ((r0 // T) == (r1 // T)).to(tl.int32)
    t_lo = one_head * (r0 % T)
    t_hi = one_head * (r1 % T) + (1 - one_head) * (T - 1)
    t_pos = q_start + t
    if CAUSAL:
        hi = tl.minimum(S, q_start + t_hi + 1)  # keys past every row's position are skipped
        full = tl.minimum(hi, q_start + t_lo + 1)  # keys every row sees
    else:
        hi = S
        full = S
    full = (full // BLOCK_N) * BLOCK_N
    # Iteration n: P V of block n-1 (a zero P before the first), then block n's scores.
    for start_n in range(0, full, BLOCK_N):
        acc = _values(acc, alpha, p, desc_v, b, j, tl.maximum(start_n - BLOCK_N, 0), dv0,
                      BLOCK_N, DV)
        p, alpha, m_i, l_i = _scores(q, desc_k, b, j, start_n, t_pos, offs_n, S, qk_scale,
                                     m_i, l_i, BLOCK_N, HEAD_DIM, False, CAUSAL)
    for start_n in range(full, hi, BLOCK_N):
        acc = _values(acc, alpha, p, desc_v, b, j, tl.maximum(start_n - BLOCK_N, 0), dv0,
                      BLOCK_N, DV)
        p, alpha, m_i, l_i = _scores(q, desc_k, b, j, start_n, t_pos, offs_n, S, qk_scale,
                                     m_i, l_i, BLOCK_N, HEAD_DIM, True, CAUSAL)
    acc = _values(acc, alpha, p, desc_v, b, j, ((hi - 1) // BLOCK_N) * BLOCK_N, dv0, BLOCK_N, DV)

    # A row that saw no key (l = 0) gets o = 0 and lse = -inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    # Rows past G * T fall outside the descriptor's box and are not written.
    desc_o.store([bh, start_m * BLOCK_M, dv0],
                 acc.to(desc_o.dtype).reshape(1, BLOCK_M, DV))
    if dv0 == 0:
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * G * T + rows, lse, mask=real)
