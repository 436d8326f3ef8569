"""Check the logged GPU memory against nvidia-smi sampled beside the runs.

    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 2000 > smi.csv &
    ./run_all.sh ...
    python scripts/smi_check.py runs/<sweep> smi.csv [more.csv ...]

Each sample taken while a run was stepping (from step 2 on: step 1's record is read at its end while the memory
still grows) is matched by time to the step record in flight and compared with its ``gpu_mem_used_mib``. Prints one line
per run with the samples matched, how many equal nvidia-smi to the MiB, and the largest difference; exits 1 where
any differs by more than 1 MiB. One GPU per sample line (the sweep's one-GPU machines); the clock is the host's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path


def read_smi(path: Path) -> list[tuple[float, float]]:
    """(unix time, MiB) per sample line of ``--format=csv`` output, header or not (timestamps in the host's zone)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("timestamp,"):  # plain --format=csv writes this header once
            continue
        try:
            stamp, mem = (p.strip() for p in line.split(",")[:2])
            t = dt.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").astimezone().timestamp()
            out.append((t, float(mem.split()[0])))
        except ValueError as e:
            raise SystemExit(f"{path}:{n}: not a nvidia-smi timestamp,memory.used line ({e}): {line!r}")
    return out


def step_windows(rank0: Path, first_step: int = 2) -> list[tuple[float, float, float]]:
    """(start, end, gpu_mem_used_mib) of every step from ``first_step`` on, from a run's rank-0 log."""
    wins = []
    for line in rank0.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run: the steps before it still count
        if r.get("type") == "step" and r.get("step", 0) >= first_step and r.get("gpu_mem_used_mib") is not None:
            wins.append((r["time"] - r["step_s"], r["time"], r["gpu_mem_used_mib"]))
    return wins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, help="a sweep's runs folder (one sub-folder per run)")
    ap.add_argument("smi", type=Path, nargs="+", help="nvidia-smi CSV files sampled during the sweep")
    ap.add_argument("--first-step", type=int, default=2,
                    help="the first step compared (default 2: step 1 reads memory that is still growing)")
    args = ap.parse_args(argv)
    samples = sorted(s for p in args.smi for s in read_smi(p))
    total = equal = 0
    worst = 0.0
    for run in sorted(p for p in args.runs.iterdir() if (p / "rank0.jsonl").is_file()):
        wins = step_windows(run / "rank0.jsonl", args.first_step)
        diffs = [smi - logged for t, smi in samples for a, b, logged in wins if a <= t <= b]
        if not diffs:
            continue
        ok = sum(abs(d) <= 1 for d in diffs)
        big = max(diffs, key=abs)
        total, equal, worst = total + len(diffs), equal + ok, max(worst, abs(big))
        print(f"{run.name}: {len(diffs)} samples, {ok} equal to the MiB, largest difference {big:+.0f} MiB")
    print(f"{equal} of {total} samples equal to the MiB; largest difference {worst:.0f} MiB")
    return 0 if equal == total else 1


if __name__ == "__main__":
    sys.exit(main())
