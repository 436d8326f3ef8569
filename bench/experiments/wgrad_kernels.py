#!/usr/bin/env python
"""The kernels `--graph-wgrad` replaces, timed alone on one GPU: a bias gradient as `sum(0)` + `add_` against one
`addmv_` with a ones vector, and a weight gradient as `mm` + `add_` against `addmm_` (beta = 1), bf16, replayed from a
CUDA graph as the captured backward runs them.

    python bench/wgrad_kernels.py [--tokens 512]

Prints microseconds per call for Pangu-2.6B's linear shapes, and the largest difference of each bias gradient from
an fp32 reference.
"""
from __future__ import annotations

import argparse

import torch


def per_call_us(fn, calls: int = 200, per_graph: int = 20) -> float:
    """Microseconds per call of ``fn``, captured ``per_graph`` times into one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream: handles and workspaces exist before capture
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(per_graph):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls // per_graph):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1000.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512, help="rows of the micro-batch (micro batch x seq_len)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    torch.manual_seed(0)
    dt, dev, n = torch.bfloat16, "cuda", a.tokens
    print(f"{torch.cuda.get_device_name()}, {n} tokens, bf16, us per call")
    for out_f, in_f in ((2560, 2560), (10240, 2560), (2560, 10240)):
        x = torch.randn(n, in_f, device=dev, dtype=dt)
        g = torch.randn(n, out_f, device=dev, dtype=dt)
        wgrad = torch.zeros(out_f, in_f, device=dev, dtype=dt)
        bgrad = torch.zeros(out_f, device=dev, dtype=dt)
        ones = torch.ones(n, device=dev, dtype=dt)
        ref = g.float().sum(0)
        err_sum = (g.sum(0).float() - ref).abs().max().item()
        err_mv = (torch.zeros_like(bgrad).addmv_(g.t(), ones).float() - ref).abs().max().item()
        print(f"[{out_f}x{in_f}] bias: sum+add {per_call_us(lambda: bgrad.add_(g.sum(0))):.1f}, "
              f"addmv {per_call_us(lambda: bgrad.addmv_(g.t(), ones)):.1f} "
              f"(max |err| vs fp32 {err_sum:.3g} / {err_mv:.3g}); "
              f"weight: mm+add {per_call_us(lambda: wgrad.add_(g.t() @ x)):.1f}, "
              f"addmm_ {per_call_us(lambda: wgrad.addmm_(g.t(), x)):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
