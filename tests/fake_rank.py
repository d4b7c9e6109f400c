"""A stand-in rank for launcher tests (no torch, starts in milliseconds): it
acts out ``FAKE_RANK_<RANK>``, steps separated by ``;``: ``sleep=S``,
``signal=NAME`` (sent to itself), ``fail=TEXT`` (writes TEXT as its traceback
where the launcher reads it, exits 1)."""
import os
import signal
import time

rank = os.environ["RANK"]
for step in filter(None, os.environ.get(f"FAKE_RANK_{rank}", "").split(";")):
    verb, _, arg = step.partition("=")
    if verb == "sleep":
        time.sleep(float(arg))
    elif verb == "signal":
        os.kill(os.getpid(), getattr(signal, arg))
    elif verb == "fail":
        with open(os.path.join(os.environ["SHARDWISE_ERROR_DIR"], f"rank{rank}.txt"), "w") as f:
            f.write(f"Traceback (most recent call last):\n{arg}\n")
        os._exit(1)
