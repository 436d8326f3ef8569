"""Write the synthetic 10,000-sample SFT benchmark file (reference JSONL format; same bytes for the same --n/--seed).

    python data/make_bench.py --out data/bench_10k.jsonl --n 10000 --seed 0

The generator itself is ``sftbench.benchset.write_bench_file``.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftbench.benchset import write_bench_file  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/bench_10k.jsonl", help="output JSONL path")
    ap.add_argument("--n", type=int, default=10000, help="number of samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    out = write_bench_file(args.out, args.n, args.seed)
    print(f"wrote {args.n} samples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
