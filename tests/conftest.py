import os

# Worker processes inherit this: one thread each keeps many ranks on two cores fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without a GPU, Triton's kernels run in its interpreter (numpy on the CPU):
# shardwise's flash kernel for wide heads then takes fp16 CPU tensors
# (model/flash.py), in this process and in the ranks it starts. Set before
# anything imports Triton, which reads it when its own library is decorated.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
