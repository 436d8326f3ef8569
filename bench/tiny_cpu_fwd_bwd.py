"""Forward + backward time of the pangu-tiny preset on the CPU (fp32, batch 1 x 512 tokens).

Prints the median over several timed runs after warm-up, in milliseconds. Usage:

    python bench/tiny_cpu_fwd_bwd.py [--seq 512] [--batch 1] [--runs 7] [--warmup 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sftbench.pangu import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model("pangu-tiny", dtype=torch.float32, device="cpu").train()
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.seq))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median_ms = statistics.median(times) * 1000.0
    print(
        f"pangu-tiny fwd+bwd fp32 cpu batch={args.batch} seq={args.seq} threads={torch.get_num_threads()}: "
        f"median {median_ms:.1f} ms over {args.runs} runs (min {min(times) * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
