"""Reference model, synthetic weights and weight loading (no distribution here).

The names below load on first use: reading a model's config
(``model/checkpoint.py``) must not import torch's model code.
"""
import importlib

_HOME = {"KVCache": "reference", "Transformer": "reference", "causal_attention": "reference",
         "make_block": "reference", "WeightSource": "weights", "make_inputs": "weights",
         "param_table": "weights", "ShardLoader": "load", "build_reference": "load",
         "head_rows": "load"}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
