"""The Triton kernel of :func:`shardwise.model.rotary.rotate` (imported only
where Triton is installed): a step's rotary embedding of q and k, and in
the same pass the store of the rotated keys and the values in the KV cache."""
import triton
import triton.language as tl

from .triton_pdl import await_inputs


@triton.jit(do_not_specialize=["T", "pos0", "slot0"])
def rotary_kernel(Q, K, V, KO, VO, COS, SIN, POS, SLOT, T, pos0, slot0,
                  sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
                  sob, sot, soh, sod,
                  HALF: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr,
                  GB: tl.constexpr, HAS_Q: tl.constexpr, HAS_K: tl.constexpr,
                  HAS_V: tl.constexpr, POS_PTR: tl.constexpr, SLOT_PTR: tl.constexpr,
                  PDL: tl.constexpr = False):
    """Program (row, group): token ``row = b*T + t`` at position ``p = pos + t``
    (``pos`` read from ``POS`` when ``POS_PTR``, else ``pos0``), key/value
    head ``group``. Rotates the ``G`` query heads of the group in place,
    rotates key head ``group`` into ``KO`` at row ``s = slot + t`` (``KO``
    may be ``K`` itself, with ``slot`` 0) and copies value head ``group`` to
    ``VO`` at the same row. Dims ``(i, i + HALF)`` rotate by ``COS, SIN [n,
    HALF]`` row ``p`` in float32, as :func:`shardwise.model.rope.rotated`."""
    await_inputs(PDL)
    row = tl.program_id(0)
    grp = tl.program_id(1).to(tl.int64)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    if POS_PTR:
        p = tl.load(POS).to(tl.int64) + t
    else:
        p = pos0 + t
    i = tl.arange(0, BLOCK)
    keep = i < HALF
    c = tl.load(COS + p * HALF + i, mask=keep, other=0.0)
    s = tl.load(SIN + p * HALF + i, mask=keep, other=0.0)
    if HAS_Q:
        g = tl.arange(0, GB)
        m = (g < G)[:, None] & keep[None, :]
        at = Q + b * sqb + t * sqt + (grp * G + g)[:, None] * sqh + i[None, :] * sqd
        x1 = tl.load(at, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF * sqd, mask=m, other=0.0).to(tl.float32)
        tl.store(at, (x1 * c[None, :] - x2 * s[None, :]).to(Q.dtype.element_ty), mask=m)
        tl.store(at + HALF * sqd, (x2 * c[None, :] + x1 * s[None, :]).to(Q.dtype.element_ty),
                 mask=m)
    if SLOT_PTR:
        r = tl.load(SLOT).to(tl.int64) + t
    else:
        r = slot0 + t
    out = b * sob + r * sot + grp * soh + i * sod
    if HAS_K:
        at = K + b * skb + t * skt + grp * skh + i * skd
        k1 = tl.load(at, mask=keep, other=0.0).to(tl.float32)
        k2 = tl.load(at + HALF * skd, mask=keep, other=0.0).to(tl.float32)
        tl.store(KO + out, (k1 * c - k2 * s).to(KO.dtype.element_ty), mask=keep)
        tl.store(KO + out + HALF * sod, (k2 * c + k1 * s).to(KO.dtype.element_ty), mask=keep)
    if HAS_V:
        at = V + b * svb + t * svt + grp * svh + i * svd
        tl.store(VO + out, tl.load(at, mask=keep, other=0.0), mask=keep)
        tl.store(VO + out + HALF * sod, tl.load(at + HALF * svd, mask=keep, other=0.0),
                 mask=keep)
