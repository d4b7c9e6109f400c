"""Pure-Python performance models: no processes, no ``torch.distributed``."""
