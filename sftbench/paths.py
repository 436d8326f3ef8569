"""Where the checkout's own files are: the one home of the repository root and the shipped data (torch-free)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "data" / "sample_sft.jsonl"  # shipped: the default where the benchmark set was not generated
BENCH_DATA = REPO / "data" / "bench_10k.jsonl"  # python data/make_bench.py
