import os

import torch

# Worker processes inherit this: one thread each keeps many ranks on two cores fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton's kernels run through its interpreter on CPU tensors
# (tests/triton_cpu.py; the flash kernel for wide heads takes fp16 CPU tensors
# there, model/flash.py), in this process and in the ranks it starts: set
# before anything imports Triton, so that Triton's own functions are interpreted too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
