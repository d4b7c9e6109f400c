"""The arithmetic a plan must satisfy to split a model: heads, KV heads,
head dims, d_ff, experts and layers divided by the plan's degrees, and each
strategy's options.

Pure Python on a :class:`~shardwise.spec.ModelSpec` (no torch): a plan is
refused before any process starts, and a refusal does not wait for torch to
import. The strategies' own files build their shards with the same
functions (:func:`held_kv_heads`, :func:`balanced_ranges`,
:func:`repartition`), so a check and the code it guards cannot drift apart.
"""
from __future__ import annotations

import re

from ..spec import ModelSpec, ShardwiseError, Workload


class Unsplittable(ShardwiseError):
    """A degree of a plan that the model cannot be split by. ``name`` is the
    degree as the fix names it (``tp``), None when the fix names none;
    :func:`~shardwise.parallel.registry.check_plan` replaces ``fix`` with the
    values of that degree that pass every check of the plan, so that
    following it works."""

    def __init__(self, problem: str, fix: str, name: str | None = None):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix, self.name = problem, fix, name


def divides(what: str, n: int, by: int, by_what: str, fix: str) -> None:
    """Raise a one-line error when ``by`` does not divide ``n`` (``fix``:
    ``choose NAME among [...]`` names the degree, see :class:`Unsplittable`)."""
    if n % by:
        name = re.match(r"choose (\w+) among", fix)
        raise Unsplittable(f"{what} ({n}) is not divisible by {by_what} ({by})", fix,
                           name.group(1) if name else None)


def divisors(n: int, most: int | None = None) -> list[int]:
    """The divisors of ``n`` (up to ``most``)."""
    return [d for d in range(1, min(n, most or n) + 1) if n % d == 0]


def balanced_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous ranges, sizes differing by <= 1
    (the first ranges get the extra items)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append((start, start + size))
        start += size
    return out


# -- heads ---------------------------------------------------------------------------

def held_kv_heads(part: int, parts: int, kv_heads: int) -> range:
    """The key/value heads that part ``part`` of a ``parts``-way split of the
    query heads holds (consecutive query heads per part, as tp_pp and helix
    split them).

    ``parts`` <= ``kv_heads``: an equal share, nothing replicated. More parts
    than KV heads (``parts % kv_heads == 0``): the one KV head that the part's
    query heads all use, ``part * kv_heads // parts``, so each KV head (its
    K/V projection rows and its cache) is replicated over the
    ``parts // kv_heads`` parts that share it, as vLLM does. Either way a
    part's query heads see exactly the keys they see on one device."""
    if parts <= kv_heads:
        return range(part * kv_heads // parts, (part + 1) * kv_heads // parts)
    first = part * kv_heads // parts
    return range(first, first + 1)


def kv_replicas(parts: int, kv_heads: int) -> int:
    """How many parts hold each KV head under :func:`held_kv_heads`."""
    return max(1, parts // kv_heads)


def head_splits(spec: ModelSpec) -> list[int]:
    """Ways the heads of ``spec`` split (:func:`held_kv_heads`): divisors of
    n_heads that divide n_kv_heads or that n_kv_heads divides."""
    return [p for p in range(1, spec.n_heads + 1)
            if spec.n_heads % p == 0 and (spec.kv_heads % p == 0 or p % spec.kv_heads == 0)]


def check_head_split(spec: ModelSpec, parts: int, what: str, name: str) -> None:
    """Raise a one-line error unless the heads of ``spec`` split ``parts`` ways
    (``what``: the degree as the plan names it, ``name``: its letter in the fix)."""
    fix = f"choose {name} among {head_splits(spec)}"
    divides(f"{spec.name}: n_heads", spec.n_heads, parts, what, fix)
    Hkv = spec.kv_heads
    if Hkv % parts and parts % Hkv:
        raise Unsplittable(
            f"{spec.name}: n_kv_heads ({Hkv}) and {what} ({parts}): neither divides the "
            f"other (up to {Hkv} parts split the kv heads; more parts replicate each kv head "
            f"over the parts whose query heads use it)", fix, name)


# -- tp_pp: tensor and pipeline parallelism ------------------------------------------

# Chunks ``overlap=auto`` splits a prefill into, the most that leave every
# chunk's all-reduce at least tp_pp.OVERLAP_MIN_BYTES (and a sequence per
# chunk). Two: on 2x H200 (seed-helix-4l, 8 x 8192) 4 and 8 chunks measured
# no faster (results/README.md).
OVERLAP_AUTO_CHUNKS = (2,)


def check_tp(spec: ModelSpec, tp: int, plan, experts_over_tp: bool = True) -> None:
    """Heads, and d_ff or experts, split ``tp`` ways (``experts_over_tp``
    False: an MoE model's experts live elsewhere, ep, and tp splits their d_ff)."""
    check_head_split(spec, tp, f"tp of plan {plan}", "tp")
    if spec.is_moe and experts_over_tp:
        divides(f"{spec.name}: n_experts", spec.n_experts, tp, f"tp of plan {plan}",
                f"choose tp among {divisors(spec.n_experts)}")
    else:
        divides(f"{spec.name}: d_ff", spec.d_ff, tp, f"tp of plan {plan}",
                f"choose tp among {divisors(spec.d_ff, 64)}")


def check_tp_options(options, plan, name: str = "tp_pp") -> None:
    allowed = {"overlap": ("auto", *map(str, range(1, 65))), "reduce": ("fp32", "model")}
    for key, value in options:
        if value not in allowed.get(key, ()):
            raise ShardwiseError(
                f"plan {plan}: {name} takes the options overlap=K|auto (prefill in K chunks "
                f"whose all-reduces overlap the next chunk's compute, K from 1 (off) to "
                f"64; auto, the default: {OVERLAP_AUTO_CHUNKS[0]} chunks where each one's "
                f"reduction is >= 1 MiB) and reduce=fp32|model (dtype "
                f"of the attention's partial sums; default fp32 for MoE models, model "
                f"otherwise), not {key}={value}"
            )


def check_stages(spec: ModelSpec, pp: int, plan) -> None:
    if pp > spec.n_layers:
        raise ShardwiseError(
            f"plan {plan} has {pp} pipeline stages but {spec.name} has {spec.n_layers} "
            f"layers; use pp <= {spec.n_layers}"
        )


# -- helix: head groups x head-dim slices ---------------------------------------------

REDUCTIONS = ("hier", "flat")


def check_reduce(options, plan) -> None:
    for key, value in options:
        if key != "reduce":
            raise ShardwiseError(f"plan {plan}: helix has no option {key!r}; "
                                 f"remove it (its only option is reduce=hier|flat)")
        if value not in REDUCTIONS:
            raise ShardwiseError(f"plan {plan}: reduce={value} is not known; "
                                 f"write reduce=hier or reduce=flat")


def group_kv_heads(spec: ModelSpec, groups: int) -> int:
    """KV heads a head group holds (one, replicated, when groups > n_kv_heads)."""
    return len(held_kv_heads(0, groups, spec.kv_heads))


def repartition(spec: ModelSpec, groups: int, slices: int) -> str:
    """``heads`` when each rank can take whole kv heads (and their query
    heads) of its group, else ``sequence``."""
    return "heads" if group_kv_heads(spec, groups) % slices == 0 else "sequence"


def check_helix(spec: ModelSpec, workload: Workload, N: int, M: int, plan) -> None:
    check_head_split(spec, N, f"head groups N of plan {plan}", "N")
    divides(f"{spec.name}: head_dim", spec.head_dim, M, f"head-dim slices M of plan {plan}",
            f"choose M among {divisors(spec.head_dim)}")
    divides(f"{spec.name}: d_ff", spec.d_ff, N * M, f"N*M of plan {plan}",
            "choose N and M whose product divides d_ff")
    if repartition(spec, N, M) == "sequence" and workload.seq_len < M:
        raise ShardwiseError(
            f"plan {plan}: {group_kv_heads(spec, N)} kv heads per group cannot be split "
            f"{M} ways, so helix splits the prompt into {M} position chunks, but "
            f"seq_len is {workload.seq_len}; use seq_len >= {M} or a smaller M")


# -- ep: expert parallelism ------------------------------------------------------------

def chunks_option(options, plan) -> int | None:
    unknown = sorted({key for key, _ in options} - {"chunks"})
    if unknown:
        raise ShardwiseError(
            f"plan {plan}: ep has no option {', '.join(unknown)}; its only option is "
            f"chunks=K (token chunks whose exchange overlaps the experts)"
        )
    text = dict(options).get("chunks")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ShardwiseError(f"plan {plan}: chunks must be a positive integer, e.g. chunks=2")
    return int(text)


def check_ep(spec: ModelSpec, P: int, plan) -> None:
    if not spec.is_moe:
        raise ShardwiseError(
            f"plan {plan}: {spec.name} is a dense model (n_experts = 0) and ep "
            f"partitions experts; use tp_pp, helix or ring for it"
        )
    divides(f"{spec.name}: n_experts", spec.n_experts, P, f"the ep degree of plan {plan}",
            f"choose ep among {divisors(spec.n_experts)}")
