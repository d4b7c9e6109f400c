"""shardwise: transformer inference partitioned across GPUs, verified and measured."""
from .spec import ModelSpec, Plan, ShardwiseError, Workload

__version__ = "0.1.0"
__all__ = ["ModelSpec", "Plan", "ShardwiseError", "Workload", "__version__"]
