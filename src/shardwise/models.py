"""One way to name a model: ``--model X`` (or ``--preset X``).

``X`` is, in the order tried:

* a preset (``presets.py``): the seed experiments' shapes and the tiny CPU models;
* a zoo name (``zoo/*.json``): a published architecture's ``config.json``, shipped
  with shardwise, its source cited in the file's ``_source`` field;
* a Hugging Face checkpoint directory (``config.json`` + safetensors): its weights;
* a ``config.json`` alone, or a directory holding one and no weights: the model's
  exact shape with synthetic weights, so bench, predict and plan need no download.

Zoo and config models run on synthetic weights (model/weights.py), drawn
exactly as for presets; only a checkpoint brings its own. Everything is
checked here, before any process starts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

from .presets import PRESETS, Preset
from .spec import ModelSpec, ShardwiseError, Workload

# What a model named by zoo, config or checkpoint runs when the command gives
# no --batch/--seq: small enough to verify on CPU in seconds.
CHECK_WORKLOAD = Workload(batch=2, seq_len=16, decode_steps=4)
# What predict and plan assume for such a model when no --batch/--seq is given.
SERVE_WORKLOAD = Workload(batch=8, seq_len=4096)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: its spec and where its weights come from."""

    spec: ModelSpec
    kind: str  # "preset" | "zoo" | "config" | "checkpoint"
    name: str  # what the user wrote
    checkpoint: str | None = None  # directory of real weights; None: synthetic
    preset: Preset | None = None

    @property
    def source(self) -> str:
        """``kind:name``, as result records name the model's origin."""
        return f"{self.kind}:{self.name}"

    @property
    def check_workload(self) -> Workload:
        return self.preset.reduced if self.preset else CHECK_WORKLOAD

    @property
    def serve_workload(self) -> Workload:
        return self.preset.workload if self.preset else SERVE_WORKLOAD


def zoo_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("shardwise.zoo").iterdir()
                  if p.name.endswith(".json"))


def zoo_config(name: str) -> dict:
    return json.loads(resources.files("shardwise.zoo").joinpath(f"{name}.json").read_text())


def _known() -> str:
    return (f"presets: {', '.join(PRESETS)}; zoo: {', '.join(zoo_names())}; or a checkpoint "
            f"directory or config.json path (see `shardwise models`)")


def resolve(text: str, *, layers: int | None = None, dtype: str | None = None) -> ModelRef:
    """The model ``text`` names, with its first ``layers`` layers (None: all)
    and computed in ``dtype`` (None: the model's own)."""
    from .model.checkpoint import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, read_config,
                                   read_config_file, spec_from_config)

    if not text:
        raise ShardwiseError(f"empty model name; give one of the {_known()}")
    preset = None
    checkpoint = None
    if text in PRESETS:
        kind, preset = "preset", PRESETS[text]
        spec = preset.model
    elif text in zoo_names():
        kind = "zoo"
        spec, _ = spec_from_config(zoo_config(text), f"zoo model {text}", text)
    elif os.path.isdir(text):
        has_weights = any(os.path.exists(os.path.join(text, f)) for f in (SINGLE_FILE, INDEX_FILE))
        kind = "checkpoint" if has_weights else "config"
        name = os.path.basename(os.path.abspath(text).rstrip(os.sep)) or "model"
        where = os.path.join(text, CONFIG_FILE)
        spec, _ = spec_from_config(read_config(text), where, name)
        if has_weights:
            checkpoint = os.path.abspath(text)
    elif os.path.isfile(text):
        kind = "config"
        name = os.path.splitext(os.path.basename(text))[0]
        if name == "config":
            name = os.path.basename(os.path.dirname(os.path.abspath(text))) or name
        spec, _ = spec_from_config(read_config_file(text), text, name)
    else:
        raise ShardwiseError(f"unknown model {text!r}: not a preset, a zoo name or an existing "
                             f"path; give one of the {_known()}")
    changes: dict = {}
    if layers is not None:
        if layers < 1:
            raise ShardwiseError(f"--layers must be >= 1 (got {layers}); leave it out to use "
                                 f"every layer")
        if layers > spec.n_layers:
            raise ShardwiseError(f"--layers {layers} exceeds the {spec.n_layers} layers of "
                                 f"{spec.name}; use --layers {spec.n_layers} or fewer")
        changes["n_layers"] = layers
    if dtype is not None and dtype != spec.dtype:
        changes["dtype"] = dtype
    if changes:
        spec = spec.replace(**changes)
    return ModelRef(spec, kind, text, checkpoint, preset)


def as_ref(model: "ModelRef | str") -> ModelRef:
    """A :class:`ModelRef` as given, or the one a name resolves to."""
    return model if isinstance(model, ModelRef) else resolve(model)


def resolve_args(preset: str | None, model: str | None, **kw) -> ModelRef:
    """``--preset`` and ``--model`` name a model the same way; give one."""
    if preset and model:
        raise ShardwiseError("give --model or --preset, not both (--model takes preset names too)")
    if not (preset or model):
        raise ShardwiseError(f"give --model NAME ({_known()})")
    return resolve(preset or model, **kw)
