import os

import torch

# Worker processes inherit this: one thread each keeps many ranks on two cores fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton's kernels run through its interpreter on CPU tensors
# (tests/triton_cpu.py): set before anything imports Triton, so that the
# Triton library's own functions are interpreted too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
