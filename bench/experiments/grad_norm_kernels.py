#!/usr/bin/env python
"""The gradient norm `--grad-norm` replaces, timed alone on one GPU over a model's gradient shapes: DeepSpeed's
ZeRO-1/2 code (each gradient cast to fp64 and reduced alone, then stacked) against one `torch._foreach_norm` with fp32
and with fp64 sums per tensor, eager and launched from Python, as the optimizer step runs them.

    python bench/grad_norm_kernels.py [--model pangu-2.6b] [--calls 20]

Prints milliseconds per call (wall, with a device sync after each call) and each result's relative difference from
an fp64 reference over the same bf16 gradients.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for sftbench
from sftbench.pangu import build_model  # noqa: E402


def deepspeeds(grads):
    """As DeepSpeed's get_grad_norm_direct: fp64 copy and norm per tensor, stacked, squared, summed."""
    norms = [torch.linalg.vector_norm(g.to(torch.double), ord=2) for g in grads]
    return torch.stack(norms).pow(2).sum().float().sqrt()


def foreach(dtype):
    def norm(grads):
        return torch.stack(torch._foreach_norm(grads, 2, dtype=dtype)).double().square().sum().float().sqrt()
    return norm


def ms_per_call(fn, grads, calls: int) -> float:
    for _ in range(3):
        fn(grads)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn(grads)
        torch.cuda.synchronize()  # the optimizer step reads the norm before it clips
    return (time.perf_counter() - t) / calls * 1000.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pangu-2.6b", help="preset whose parameter shapes the gradients take")
    p.add_argument("--calls", type=int, default=20)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    with torch.device("meta"):
        shapes = [q.shape for q in build_model(a.model).parameters()]
    torch.manual_seed(0)
    grads = [(torch.randn(s, device="cuda") * 1e-3).to(torch.bfloat16) for s in shapes]
    ref = torch.stack([g.double().norm() for g in grads]).square().sum().sqrt().item()
    n = sum(g.numel() for g in grads)
    print(f"{torch.cuda.get_device_name()}, {a.model}: {len(grads)} bf16 gradients, {n / 1e6:.0f}M elements; "
          f"ms per call (wall, synced); relative difference from an fp64 reference")
    for name, fn in (("deepspeed (fp64 copy per tensor)", deepspeeds), ("foreach, fp32 sums", foreach(torch.float32)),
                     ("foreach, fp64 sums", foreach(torch.float64))):
        got = fn(grads).item()
        print(f"{name:34s} {ms_per_call(fn, grads, a.calls):8.2f} ms   {abs(got / ref - 1):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
