"""Named models, each with the workload and plans of the experiment it comes from.

The ``seed-*`` presets carry the exact dimensions of the five seed experiments
(GPT-style: LayerNorm, two-matrix MLP with GELU in its tanh form, as in GPT-2/3,
which the GPU path fuses into the up-projection's GEMM). Where a seed's own arithmetic is
off, the preset follows the stated dimensions and ``notes`` says what is off;
``docs/presets.md`` explains each case. ``tiny-*`` presets run on CPU in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .spec import ModelSpec, ShardwiseError, Workload


@dataclass(frozen=True)
class Preset:
    model: ModelSpec
    workload: Workload  # the seed's own workload (may not fit anywhere: see notes)
    reduced: Workload  # small enough to verify numerics on one device
    baseline: str  # the seed's baseline plan
    proposed: str  # the seed's proposed plan
    seed_doc: str | None = None
    notes: tuple[str, ...] = field(default=())


def _seed_dense(name, layers, heads, head_dim, d_ff, dtype="fp16"):
    return ModelSpec(
        name=name, n_layers=layers, d_model=heads * head_dim, n_heads=heads,
        head_dim=head_dim, d_ff=d_ff, dtype=dtype, activation="gelu_tanh",
    )


PRESETS: dict[str, Preset] = {
    "seed-helix-2l": Preset(
        model=_seed_dense("seed-helix-2l", 2, 32, 128, 16384),
        workload=Workload(batch=128, seq_len=10000),
        reduced=Workload(batch=2, seq_len=512),
        baseline="tp_pp:8x2", proposed="helix:4x4",
        seed_doc="000_cf9853f796bd8a98.txt",
        notes=(
            "Seeds 000 (2 layers) and 004 (4 layers) report identical TPS and TPOT for "
            "models of different depth; at most one of them can be right.",
            "The seed's 'TPOT 0.22 ms' cannot be the latency of a decode step for batch 128 "
            "at context 10000 (that step reads ~21 GB of KV cache per layer); it matches step "
            "time divided by batch. shardwise reports both, as tpot_ms and ms_per_token.",
        ),
    ),
    "seed-helix-4l": Preset(
        model=_seed_dense("seed-helix-4l", 4, 32, 128, 16384),
        workload=Workload(batch=128, seq_len=10000),
        reduced=Workload(batch=2, seq_len=512),
        baseline="tp_pp:8x2", proposed="helix:4x4",
        seed_doc="004_440e515445fd6fd9.txt",
        notes=(
            "Same figures as seed 000 for a model twice as deep.",
            "The seed's '50% reduction in parameter storage' compares 1/16 of the attention "
            "weights with 1/8 of a TP=8 shard; PP=2 already halves the baseline's layers per "
            "device, so per-device parameters are equal (1/16 of the model) in both plans.",
        ),
    ),
    "seed-ring-4l": Preset(
        model=_seed_dense("seed-ring-4l", 4, 16, 512, 32768),
        workload=Workload(batch=1024, seq_len=10000),
        reduced=Workload(batch=2, seq_len=512),
        baseline="tp_pp:8x2", proposed="ring:16",
        seed_doc="001_540de35c73915cd1.txt",
        notes=(
            "At batch 1024 and context 10000 the fp16 KV cache of the 4 layers is "
            "2*4*1024*10000*8192*2 B = 1.34 TB, more than 16 x 80 GB: decode at that size "
            "cannot run on the seed's cluster, and prefill must be micro-batched.",
        ),
    ),
    "seed-layerwise-3b": Preset(
        model=_seed_dense("seed-layerwise-3b", 16, 32, 128, 16384, dtype="bf16"),
        workload=Workload(batch=128, seq_len=10000),
        reduced=Workload(batch=2, seq_len=512),
        baseline="tp_pp:8x2", proposed="layerwise:cap=L2",
        seed_doc="002_c95086c2ea772412.txt",
        notes=(
            "The stated dims (32 heads x 128, d_ff 16384, 16 layers) give ~201M parameters "
            "per layer, 3.2B in all, not the stated 30B; seed-layerwise-30b has the stated size.",
            "No layer of this model (~403 MB in bf16) fits an L2 cache (50-60 MB): capacity "
            "L2 is refused with the smallest capacity that would work.",
        ),
    ),
    "seed-layerwise-30b": Preset(
        model=_seed_dense("seed-layerwise-30b", 16, 96, 128, 49152, dtype="bf16"),
        workload=Workload(batch=128, seq_len=10000),
        reduced=Workload(batch=2, seq_len=256),
        baseline="tp_pp:8x2", proposed="layerwise:cap=L2",
        seed_doc="002_c95086c2ea772412.txt",
        notes=(
            "d_model 12288 (96 heads x 128) and d_ff 49152 give ~1.81B parameters per layer, "
            "~29B for 16 layers: the seed's stated 30B and ~3.75 GB per layer.",
            "A 3.6 GB layer fits no L2 cache; the seed's floor(C / layer bytes) gives 0 layers "
            "per partition. Capacity L2 is refused with the smallest capacity that would work.",
        ),
    ),
    "seed-moe-16l": Preset(
        model=ModelSpec(
            name="seed-moe-16l", n_layers=16, d_model=4096, n_heads=32, head_dim=128,
            d_ff=16384, dtype="bf16", n_experts=16, top_k=2, activation="gelu_tanh",
        ),
        workload=Workload(batch=128, seq_len=10000),
        reduced=Workload(batch=2, seq_len=256),
        baseline="tp_pp:8x2", proposed="ep:16",
        seed_doc="003_20484a92daf2c30a.txt",
        notes=(
            "The seed counts an expert as one 4096x16384 matrix (128 MB); a two-matrix MLP "
            "expert is 256 MB in bf16, so its per-GPU expert memory is half the real figure.",
            "Its per-GPU totals leave out the attention weights (~4 x 4096^2 x 2 B = 134 MB a layer).",
            "The seed does not give top-k; shardwise uses top-2.",
        ),
    ),
    "tiny-dense": Preset(
        model=ModelSpec(
            name="tiny-dense", n_layers=4, d_model=64, n_heads=4, head_dim=16, d_ff=256,
            dtype="fp32",
        ),
        workload=Workload(batch=4, seq_len=32, decode_steps=4),
        reduced=Workload(batch=4, seq_len=32, decode_steps=4),
        baseline="tp_pp:2x2", proposed="helix:2x2",
    ),
    "tiny-moe": Preset(
        model=ModelSpec(
            name="tiny-moe", n_layers=2, d_model=64, n_heads=4, head_dim=16, d_ff=128,
            dtype="fp32", n_experts=4, top_k=2,
        ),
        workload=Workload(batch=4, seq_len=32, decode_steps=4),
        reduced=Workload(batch=4, seq_len=32, decode_steps=4),
        baseline="tp_pp:2x2", proposed="ep:4",
    ),
    "small-l2": Preset(
        model=ModelSpec(
            name="small-l2", n_layers=8, d_model=512, n_heads=8, head_dim=64, d_ff=2048,
            dtype="bf16",
        ),
        workload=Workload(batch=4, seq_len=128, decode_steps=4),
        reduced=Workload(batch=4, seq_len=128, decode_steps=4),
        baseline="tp_pp:1x2", proposed="layerwise:cap=L2",
        notes=(
            "Where capacity L2 is real: 6.3 MB of bf16 weights per layer, so four layers with "
            "their KV cache and working set (~37 MB) fit the 50 MB L2 of an H100 or H200; "
            "the 8 layers need 2 groups (layerwise:cap=L2 on --nproc 2).",
        ),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ShardwiseError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}"
        ) from None
