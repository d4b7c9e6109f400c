"""Result records: one JSON object per line, written atomically.

Each record names what produced it (command, git revision, date, device,
torch version) so a results file can be traced back to its run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys

import torch

from ..spec import ShardwiseError


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


def provenance(device: str, n_devices: int, program: str = "shardwise") -> dict:
    """Where a record comes from; ``program``: what ran with this process's
    arguments (a script's ``python scripts/NAME.py``)."""
    return {
        "git_rev": git_rev(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])]),
        "device": device_name(device),
        "n_devices": n_devices,
        "torch": torch.__version__,
    }


def append_records(path: str, records: list[dict]) -> None:
    """Append JSON lines to ``path``, atomically and safely across processes:
    readers see the old file or the old file plus every new record, never a
    partial line (a new file renamed over the old one), and concurrent
    appends keep every record (an advisory lock, ``.NAME.lock`` beside the
    file, held from the read of the old lines to the rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _locked(path):
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


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive ``flock`` on a lock file beside ``path`` (not on ``path``
    itself: the rename gives it a new inode, which a waiting process would
    not have locked). The lock file stays: removing it would let two
    processes lock two different files. Where there is no ``fcntl``
    (Windows), appends are not locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    head, name = os.path.split(os.path.abspath(path))
    with open(os.path.join(head, f".{name}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_records(path: str, check=None) -> list[dict]:
    """Every record of a JSON lines file. A file that cannot be read, or a
    line that is not a JSON object (a last line cut short included), is
    refused with one line naming the file, the line and the problem; so is a
    record for which ``check(record)`` returns a problem (a string)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ShardwiseError(f"{path}: no such file; give a results file written by "
                             f"shardwise bench, run --json or verify --json") from None
    except IsADirectoryError:
        raise ShardwiseError(f"{path} is a directory; give a JSON lines results file "
                             f"(e.g. {os.path.join(path, 'bench.jsonl')})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardwiseError(f"{path}: cannot be read as text ({e})") from None
    lines = text.splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            cut = (" (the last line, cut short: delete it)"
                   if n == len(lines) and not text.endswith("\n") else "")
            raise ShardwiseError(f"{path}:{n}: not a JSON record ({e}){cut}; each line must "
                                 f"be one JSON object") from None
        problem = (f"a JSON {type(rec).__name__}, not a record (one JSON object per line)"
                   if not isinstance(rec, dict) else check(rec) if check else None)
        if problem:
            raise ShardwiseError(f"{path}:{n}: {problem}")
        records.append(rec)
    return records


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


def missing_keys(record: dict, keys: tuple[str, ...], what: str) -> str | None:
    """For ``read_records(check=...)``: the keys of ``keys`` that ``record``
    lacks, as a problem, or None."""
    missing = [k for k in keys if k not in record]
    if not missing:
        return None
    return (f"{what} lacks {', '.join(missing)} (written by another version of shardwise, "
            f"or by hand?)")
