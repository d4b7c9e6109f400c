import os

# Worker processes inherit this: one thread each keeps many ranks on two cores fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
