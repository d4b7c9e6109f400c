"""Result records: one JSON object per line, written atomically.

Each record names what produced it (command, git revision, date, device,
torch version) so a results file can be traced back to its run.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys

import torch


def git_rev() -> str:
    """The checkout's revision; SHARDWISE_GIT_REV overrides it for copies of a
    tree made without its .git folder."""
    if os.environ.get("SHARDWISE_GIT_REV"):
        return os.environ["SHARDWISE_GIT_REV"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def provenance(device: str, n_devices: int) -> dict:
    return {
        "git_rev": git_rev(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "shardwise " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "device": device_name(device),
        "n_devices": n_devices,
        "torch": torch.__version__,
    }


def append_records(path: str, records: list[dict]) -> None:
    """Append JSON lines to ``path`` atomically: readers see the old file or
    the old file plus every new record, never a partial line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old and not old.endswith("\n"):
            old += "\n"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(old + "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_spec(r: dict):
    """The complete model a record describes: its ``model_spec`` (every record
    since the model description was added), else its preset with the record's
    layer count and dtype. None when neither is there."""
    from ..presets import PRESETS
    from ..spec import ModelSpec

    if r.get("model_spec"):
        return ModelSpec.from_dict(r["model_spec"])
    if r.get("preset") in PRESETS:
        spec = PRESETS[r["preset"]].model
        changes = {k: r[k] for k in ("dtype", "n_layers") if r.get(k) is not None}
        return spec.replace(**changes) if changes else spec
    return None


def command_option(command: str, flag: str, default: int) -> int:
    """The integer a recorded command line gave ``flag``, else ``default``."""
    words = command.split()
    try:
        return int(words[words.index(flag) + 1])
    except (ValueError, IndexError):
        return default


def floor_ratio(r: dict) -> float | None:
    """A decode record's step time over its HBM floor, with the floor as
    bench/metrics.py defines it now (records written before a change of that
    definition keep the ratio they stored; this one is recomputed from the
    model they carry, the positions the steps read and the copy rate they measured)."""
    spec = record_spec(r) if r.get("model_spec") else None
    if r.get("phase") != "decode" or spec is None or not r.get("hbm_peak_gbps"):
        return r.get("floor_ratio")
    from .metrics import decode_bytes

    ctx = r.get("floor_ctx")
    if ctx is None:  # bench's steps read at seq_len + warmup + iters // 2 (defaults 3, 10)
        cmd = r.get("command") or ""
        ctx = (r["seq_len"] + command_option(cmd, "--warmup", 3)
               + command_option(cmd, "--iters", 10) // 2)
    world = r.get("n_devices") or 1
    floor_s = decode_bytes(spec, r["batch"], ctx) / world / (r["hbm_peak_gbps"] * 1e9)
    return r["median_ms"] / 1e3 / floor_s


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
