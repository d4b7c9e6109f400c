"""Reference model, synthetic weights and weight loading (no distribution here)."""
from .reference import KVCache, Transformer, causal_attention, make_block
from .weights import WeightSource, make_inputs, param_table
from .load import ShardLoader, build_reference, head_rows

__all__ = ["KVCache", "Transformer", "causal_attention", "make_block", "WeightSource",
           "make_inputs", "param_table", "ShardLoader", "build_reference", "head_rows"]
