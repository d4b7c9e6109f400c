"""How long shardwise takes to answer when it starts no process: --help, a
listing, and refusals before launch (wall time of the whole command, from
the shell's point of view).

    python scripts/startup.py --repeat 10 --out results/startup.json

Each command runs ``--repeat`` times in a fresh interpreter (the first run
also warms the file cache and is left out); the record holds the median,
min and max seconds, the exit code, whether the command imported torch
(one more run, with ``-X importtime``), and the machine: CPU count, load
average before and after (the figures grow with the load of a shared
machine), Python and torch versions, git revision.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

# (name, arguments of shardwise, or a whole Python command line; what it shows)
COMMANDS = [
    ("help", ["--help"], "the parser and its help text"),
    ("presets", ["presets"], "a listing (presets, sizes, plans)"),
    ("error: a flag", ["run", "--nproc", "0"], "a refused number (argcheck)"),
    ("error: a model", ["verify", "--model", "nope", "--plan", "tp_pp:2x1"],
     "an unknown model name (models.resolve)"),
    ("error: a plan", ["verify", "--model", "tiny-dense", "--plan", "tp_pp:3x1"],
     "a plan the model cannot be split by (the strategies' checks, which import no torch)"),
    ("reference: import torch", ["-c", "import torch"], "what importing torch alone takes here"),
]


def argv(args: list[str]) -> list[str]:
    return [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "shardwise",
                                                            *args]


def run_once(args: list[str], env: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = subprocess.run(argv(args), env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, p.returncode


def imports_torch(args: list[str], env: dict) -> bool:
    full = argv(args)
    p = subprocess.run([full[0], "-X", "importtime", *full[1:]], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return any(re.search(r"\|\s+torch$", line.rstrip()) for line in p.stderr.splitlines())


def machine() -> dict:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or None
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch_version, "git_rev": rev}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=10, help="timed runs per command")
    ap.add_argument("--out", help="write the figures to this JSON file")
    a = ap.parse_args()
    env = dict(os.environ, COLUMNS="120")
    load_before = os.getloadavg()
    rows = []
    for name, args, what in COMMANDS:
        run_once(args, env)  # warm the file cache
        times, codes = [], set()
        for _ in range(a.repeat):
            t, rc = run_once(args, env)
            times.append(t)
            codes.add(rc)
        command = ("python " if args[0] == "-c" else "shardwise ") + " ".join(args)
        rows.append({"name": name, "command": command, "what": what,
                     "exit_codes": sorted(codes), "imports_torch": imports_torch(args, env),
                     "median_s": round(statistics.median(times), 3),
                     "min_s": round(min(times), 3), "max_s": round(max(times), 3),
                     "runs": a.repeat})
        print(f"{name:15} median {rows[-1]['median_s']:.3f} s (min {rows[-1]['min_s']:.3f}, "
              f"max {rows[-1]['max_s']:.3f}), exit {sorted(codes)}, torch imported: "
              f"{rows[-1]['imports_torch']}")
    record = {"command": "python scripts/startup.py " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **machine(), "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "commands": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
