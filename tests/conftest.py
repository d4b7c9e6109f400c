import atexit
import os
import shutil
import tempfile

import torch

# Worker processes inherit this: one thread each keeps many ranks on two cores fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)  # and this process (torch read the variable on import)
# Without a GPU, Triton's kernels run through its interpreter on CPU tensors
# (tests/triton_cpu.py; the flash kernel for wide heads takes fp16 CPU tensors
# there, model/flash.py), in this process and in the ranks it starts: set
# before anything imports Triton, so that Triton's own functions are interpreted too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The recordings the cost model keeps (perf/tracecache.py) go to a folder of
# this run's own, never the user's cache (nor one left by an older run), and
# the commands the tests start inherit it; removed at the end.
_CACHE = tempfile.mkdtemp(prefix="shardwise-test-cache-")
os.environ["SHARDWISE_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
