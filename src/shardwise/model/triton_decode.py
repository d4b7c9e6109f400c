"""The Triton kernel of :mod:`shardwise.model.decode` (imported only where
Triton is installed): split-key attention of one query position, its splits
merged by the last program of each (sequence, K/V head) to finish (``FUSE``)
or by :mod:`.merge`'s kernel."""
import triton
import triton.language as tl

from .triton_merge import merge_rows
from .triton_pdl import await_inputs, prefetch_l2


@triton.jit
def decode_split_kernel(Q, K, V, O, L, N, n0, S, sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                        Hkv, rows_all, chunk, qk_scale, OUT, LOUT, CNT, splits,
                        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, N_PTR: tl.constexpr, FUSE: tl.constexpr,
                        PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    """Program (sequence b x K/V head, split s): the ``G`` query heads of K/V
    head ``hk`` (rows of one ``[G_PAD, D]`` tile, each K/V row read once for
    all of them) over keys ``s*chunk .. min((s+1)*chunk, n, S)``, with the online
    softmax in float32 (base 2: ``qk_scale`` carries log2 e). Writes the
    split's normalised output ``O[s, b, h]`` (float32) and its log-sum-exp
    ``L[s, b, h]`` (natural log), the stacked partials :mod:`.merge` takes;
    an empty split writes ``o = 0, lse = -inf``.
    ``n`` (keys seen) is read from ``N`` on the device (``N_PTR``: a CUDA
    graph replays the step at every position) or is ``n0``.

    ``FUSE``: each program then counts itself done in ``CNT[b * Hkv + hk]``
    (int32, zero before the launch); the last of the ``splits`` to arrive
    merges them (:func:`.triton_merge.merge_rows`) into ``OUT [B*H, D]`` (q's dtype)
    and ``LOUT [B*H]``, and sets the count back to zero, so a CUDA graph
    replays the launch with no reset of its own: one launch a layer, not two.

    ``PREFETCH`` (with ``PDL``): before the wait for the kernel before it, the
    program asks L2 for the K and V rows of its split's first ``PREFETCH``
    blocks of keys (:func:`.triton_pdl.prefetch_l2`), bounded by the split
    and the cache, not by ``n``, which it reads after the wait. Earlier
    steps wrote those rows; the row this step's rotary kernel writes may be
    among them, and L2, where the GPU's writes land, then holds the write."""
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    if PDL and PREFETCH > 0:  # one address per 128-byte line of a key's row
        LINE: tl.constexpr = 1024 // K.dtype.element_ty.primitive_bitwidth
        ahead = s * chunk + tl.arange(0, PREFETCH * BLOCK_N)
        held = (ahead < s * chunk + chunk) & (ahead < S)
        parts = tl.arange(0, D // LINE) * LINE
        prefetch_l2(K + b * sk_b + hk * sk_h + ahead[:, None].to(tl.int64) * sk_s
                    + parts[None, :], held[:, None], K)
        prefetch_l2(V + b * sv_b + hk * sv_h + ahead[:, None].to(tl.int64) * sv_s
                    + parts[None, :], held[:, None], V)
    await_inputs(PDL)
    if N_PTR:
        n = tl.load(N).to(tl.int32)
    else:
        n = n0
    start = s * chunk
    end = tl.minimum(tl.minimum(start + chunk, n), S)
    rows = tl.arange(0, G_PAD)
    cols = tl.arange(0, D)
    heads = hk * G + rows  # [G_PAD] query heads
    keep_r = rows < G
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + cols[None, :], mask=keep_r[:, None],
                other=0.0)  # [G_PAD, D]
    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    for off in range(start, end, BLOCK_N):
        keys = off + tl.arange(0, BLOCK_N)
        keep_k = keys < end
        k = tl.load(k_base + keys[:, None].to(tl.int64) * sk_s + cols[None, :],
                    mask=keep_k[:, None], other=0.0)  # [BLOCK_N, D]
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, BLOCK_N]
        scores = tl.where(keep_k[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * sv_s + cols[None, :],
                    mask=keep_k[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    seen = l > 0.0
    acc = acc / tl.where(seen, l, 1.0)[:, None]
    ln2 = 0.6931471805599453
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) * ln2, float("-inf"))
    out = s * rows_all + b * Hkv * G + heads  # [G_PAD] rows of O [splits, B*H, D]
    tl.store(O + out[:, None] * D + cols[None, :], acc, mask=keep_r[:, None])
    tl.store(L + out, lse, mask=keep_r)
    if FUSE:
        # Every thread's stores before the count (the atomic releases them at
        # GPU scope; the last program's acquires the others').
        tl.debug_barrier()
        if tl.atomic_add(CNT + bh, 1, sem="acq_rel") == splits - 1:
            merge_rows(O, L, OUT, LOUT, b * Hkv * G + heads, keep_r, cols, rows_all, splits, D)
            tl.atomic_xchg(CNT + bh, 0)
