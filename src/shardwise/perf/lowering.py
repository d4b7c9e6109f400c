"""How an op a step calls runs on a GPU: the kernels it launches.

An op the code calls is lowered as the GPU lowers it: a composite op
(``linear``, ``layer_norm`` ...) is decomposed on ``meta`` tensors down to
the ops that run, and ``scaled_dot_product_attention`` takes the backend an
sm90 GPU picks (:func:`sdp_backend`). Each op that runs is a
:class:`~.events.Kernel` of its shape class, with the FLOPs it does and the
bytes it reads and writes (:func:`leaf_kernel`): GEMMs, attention (by
backend), writes and reads at indices (the rows they move, not the whole
tensor), everything else (its inputs read and outputs written).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .events import ALLOC_OPS, SYNC_OPS, Call, Kernel

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


# -- the GPU's choices --------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


def named_args(func, args, kwargs) -> dict:
    """An op's arguments by their schema names."""
    out = {a.name: v for a, v in zip(func._schema.arguments, args)}
    out.update(kwargs)
    return out


def sdp_backend(q, k, attn_mask, is_causal: bool, enable_gqa: bool) -> str:
    """The kernel ``scaled_dot_product_attention`` runs on an sm90 GPU under
    torch 2.11, within what ``sdpa_kernel`` leaves on: cuDNN for half
    precision, head_dim <= 256, with or without a mask, grouped heads as they
    are (traced there: the static decode step's masked attention;
    SDPA's default choice in results/llama/probe.jsonl for grouped heads,
    masked or not, and in results/flash at head_dim 256); else
    FlashAttention-2 (half precision, head_dim <= 256, no mask, a causal
    mask only when square); else the memory-efficient kernel (head_dim a
    multiple of 8, 4 in float32; no grouped heads); else the math path."""
    half, d, T, S = q.dtype in _HALF, q.shape[-1], q.shape[-2], k.shape[-2]
    b = torch.backends.cuda
    if b.cudnn_sdp_enabled() and half and d <= 256 and d % 8 == 0 and S > 1:
        return "cudnn"
    if (b.flash_sdp_enabled() and half and d <= 256 and d % 8 == 0 and attn_mask is None
            and (not is_causal or T == S)):
        return "flash"
    if b.mem_efficient_sdp_enabled() and d % (8 if half else 4) == 0 and not enable_gqa:
        return "efficient"
    return "math"


def sdp_flags() -> tuple:
    b = torch.backends.cuda
    return (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled())


def gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
    """``scaled_dot_product_attention`` lowered as a GPU lowers it (on meta,
    under a mode that collects the kernels): the backend :func:`sdp_backend`
    picks; for the kernels that take an additive bias, a boolean mask turned
    into one and a bias whose rows are not 16-element aligned padded."""
    backend = sdp_backend(query, key, attn_mask, is_causal, enable_gqa)
    if backend == "math":
        return aten.scaled_dot_product_attention.default.decompose(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if backend == "flash":
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                        False, scale=scale)[0]
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.where(bias.logical_not(), float("-inf"), 0.0).to(query.dtype)
        S = key.shape[-2]
        if S % 16:
            bias = aten.constant_pad_nd(bias, [0, 16 - S % 16])[..., :S]
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], S)
    if backend == "efficient":
        return aten._scaled_dot_product_efficient_attention(query, key, value, bias, False,
                                                            dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_cudnn_attention(query, key, value, bias, False, dropout_p,
                                                    is_causal, False, scale=scale)[0]


# -- what a kernel moves ------------------------------------------------------------

_ATTENTION = {"_scaled_dot_product_flash_attention": "flash",
              "_scaled_dot_product_efficient_attention": "efficient",
              "_scaled_dot_product_cudnn_attention": "cudnn"}
_GEMMS = {"mm": ("self", "mat2"), "addmm": ("mat1", "mat2"), "_addmm_activation": ("mat1", "mat2"),
          "bmm": ("self", "mat2"), "baddbmm": ("batch1", "batch2"), "mv": ("self", "vec"),
          "addmv": ("mat", "vec")}
# Writes at indices: the source rows, read and written (not the whole destination).
_INDEX_WRITES = {"index_copy_", "index_copy", "index_put_", "index_put", "_index_put_impl_",
                 "scatter_", "scatter", "scatter_add_", "scatter_add", "index_add_",
                 "index_add"}
# Reads at indices: the rows gathered, read and written (not the whole source).
_GATHERS = {"index_select", "index", "gather", "embedding", "take"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(x) -> list:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def leaf_kernel(func, args, kwargs, out) -> Kernel | None:
    """The kernel a non-composite op on meta tensors launches, or None (a view,
    an allocation, nothing on the device)."""
    name = func.overloadpacket.__name__
    schema = func._schema
    outs = _tensors(out)
    if name in ALLOC_OPS or name == "detach_" or (not schema.is_mutable and (
            not outs or any(r.alias_info is not None for r in schema.returns)
            or {_storage(t) for t in outs} <= {_storage(t) for t in _tensors((args, kwargs))})):
        return None  # an allocation, or a view (by its schema or by its storage)
    a = named_args(func, args, kwargs)
    if name in _GEMMS:
        x, w = (a[n] for n in _GEMMS[name])
        batch = x.shape[0] if x.dim() == 3 else 1
        m, k = x.shape[-2], x.shape[-1]
        n = w.shape[-1] if w.dim() > 1 else 1
        moved = _nbytes(x) + _nbytes(w) + _nbytes(a.get("self") if "mat1" in a or "batch1" in a
                                                   else None) + _nbytes(outs[0])
        return Kernel("gemm", 2.0 * batch * m * k * n, float(moved), (batch, m, k, n), _dt(x))
    if name == "_grouped_mm":  # rows [R, K] by group through each group's [K, N]
        x, w = a["self"], a["mat2"]
        groups, (rows, k), n = w.shape[0], x.shape, w.shape[-1]
        moved = _nbytes(x) + _nbytes(w) + _nbytes(outs[0])
        return Kernel("gemm", 2.0 * rows * k * n, float(moved),
                      (groups, max(1, rows // groups), k, n), _dt(x))
    if name in _ATTENTION:
        q, k, bias = a["query"], a["key"], a.get("attn_bias")
        B, H, T, d = q.shape
        S = k.shape[2]
        causal = bool(a.get("is_causal", False))
        pairs = T * (T + 1) / 2 + T * (S - T) if causal else T * S
        moved = sum(_nbytes(a[n]) for n in ("query", "key", "value")) + _nbytes(bias)
        return Kernel("attention", 4.0 * B * H * d * pairs, float(moved + _nbytes(outs[0])),
                      (_ATTENTION[name], B, H, T, S, d, causal, bias is not None), _dt(q))
    if name in _INDEX_WRITES:
        src = a.get("source", a.get("src", a.get("values")))
        moved = 2 * _nbytes(src) if isinstance(src, torch.Tensor) else 2 * _nbytes(a.get("index"))
        return Kernel("index_write", 0.0, float(moved), (), _dt(a["self"]))
    if name in _GATHERS:
        return Kernel("copy", 0.0, 2.0 * _nbytes(outs[0]), (), _dt(outs[0]))
    writes = {id(t) for t in outs}
    reads = [t for t in _tensors((args, kwargs)) if id(t) not in writes]
    moved = sum(map(_nbytes, reads)) + sum(map(_nbytes, outs))
    return Kernel("copy", float(max(t.numel() for t in outs)), float(moved), (),
                  _dt(outs[0]))


def classify_op(func, args, kwargs, out) -> str:
    """A call on real tensors by what it did: ``kernels`` (it wrote an input or
    made a tensor sharing no input's storage), ``metas`` (views, reshapes
    without a copy, allocations, no tensor made), ``syncs`` (a read the host
    waits for: nonzero, item, a copy to the CPU) or ``skip`` (c10d's own ops,
    counted as collectives)."""
    if func.namespace in ("c10d", "_c10d_functional", "symm_mem"):
        return "skip"
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return "syncs"
    if name in ("to", "_to_copy") and str(kwargs.get("device", "")).startswith("cpu"):
        return "syncs"  # .cpu(): a device-to-host copy the host waits for
    if func._schema.is_mutable:
        return "kernels"
    if name in ALLOC_OPS:
        return "metas"
    outs = _tensors(out)
    if not outs:
        return "metas"  # e.g. promote_types: host work only
    ins = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))
           if t.device.type != "meta"}
    if all(t.untyped_storage().data_ptr() in ins for t in outs):
        return "metas"
    return "kernels"


class _Leaves(TorchDispatchMode):
    """Collects the kernels an op launches: its decomposition down to ops with
    kernels of their own (attention lowered as the GPU lowers it)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing here is compiled: no per-op wrapper to disable it

    def __init__(self):
        super().__init__()
        self.kernels: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            with self:
                return gpu_sdpa(*args, **kwargs)
        if _composite(func):
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        k = leaf_kernel(func, args, kwargs, out)
        if k is not None:
            self.kernels.append(k)
        return out


def _composite(func) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def lower(func, args, kwargs):
    """(output, Call, whether an output aliases an input) of ``func`` run on meta."""
    name = func.overloadpacket.__name__
    with _Leaves() as leaves:
        out = func(*args, **kwargs)
    kernels = tuple(leaves.kernels)
    ins = {_storage(t) for t in _tensors((args, kwargs))}
    aliases = any(_storage(t) in ins for t in _tensors(out))
    mutable = func._schema.is_mutable
    kind = "kernels" if kernels or (mutable and _tensors(out)) else "metas"
    shapes = tuple(tuple(t.shape) for t in _tensors((args, kwargs)))
    return out, Call(kind, name, kernels, shapes), aliases and not mutable



