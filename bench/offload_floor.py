#!/usr/bin/env python
"""The host's share of a ZeRO-2 + CPU optimizer offload step, each part timed alone over one model's parameter
count: what the step cannot go below on this host however the GPU part is launched.

    python bench/offload_floor.py [--model pangu-2.6b] [--repeats 3] [--out floor.json]
    python bench/offload_floor.py --numel 1000000      # any size; on CPU only the host parts run

The parts, as DeepSpeed's ZeRO-1/2 optimizer runs them at an offloaded step's boundary (one flat tensor here, one
per parameter there):
- ``d2h_grads``: the 16-bit gradients cast to fp32 on the GPU, then copied into the host's fp32 gradient buffer
  (``async_inplace_copy_grad_to_fp32_buffer_from_gpu``);
- ``cpu_adam``: ``DeepSpeedCPUAdam.step`` over the fp32 master weights (AdamW, the shipped configs' betas and decay);
- ``cast_bf16_host``: the updated fp32 weights cast to 16 bits into the host buffer;
- ``h2d_params``: that buffer copied into the GPU's 16-bit weights.
The copies run once into pinned and once into pageable host memory (``offload_optimizer.pin_memory`` true / false).
``host_copy`` (an fp32 ``copy_`` of the same size) gives the host's memory bandwidth, which bounds the Adam step.
Each part: one warm-up, then the median of ``--repeats`` wall times, the device synchronised before each clock read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sftbench.buildenv import prepare_op_builds  # noqa: E402

prepare_op_builds()  # before DeepSpeed's op builders are imported

import torch  # noqa: E402


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median wall seconds of ``fn`` after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def host_copy(master: torch.Tensor, repeats: int) -> float:
    """ms of one fp32 copy_ of the master weights on the host: the memory bandwidth the Adam step is bound by."""
    scratch = torch.empty_like(master)
    return timed(lambda: scratch.copy_(master), repeats, False) * 1e3


def copies(master: torch.Tensor, pinned: bool, cuda: bool, repeats: int, dtype: torch.dtype) -> dict:
    """ms of the cast to 16 bits on the host and, with a GPU, of both PCIe copies, into pinned or pageable memory.
    The buffers are this function's locals, so each variant's memory is freed before the next one allocates."""
    tag = "pinned" if pinned else "pageable"
    buf16 = torch.empty(master.numel(), dtype=dtype, pin_memory=pinned)
    ms = {f"cast_bf16_host.{tag}": timed(lambda: buf16.copy_(master), repeats, False) * 1e3}
    if cuda:
        grad32 = torch.empty(master.numel(), pin_memory=pinned)
        grads16 = torch.randn(master.numel(), device="cuda", dtype=dtype)
        weights16 = torch.empty(master.numel(), device="cuda", dtype=dtype)
        ms[f"d2h_grads.{tag}"] = timed(lambda: grad32.copy_(grads16.float(), non_blocking=True), repeats, True) * 1e3
        ms[f"h2d_params.{tag}"] = timed(lambda: weights16.copy_(buf16, non_blocking=True), repeats, True) * 1e3
    return ms


def measure(n: int, repeats: int, cuda: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # here: its op builds (or loads) on first use

    ms = {}
    master = torch.randn(n) * 0.02
    master.grad = torch.randn(n) * 1e-3
    before = master[:4096].clone()
    grad_head = master.grad[:4096].clone()
    opt = DeepSpeedCPUAdam([master], lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, adamw_mode=True)
    ms["cpu_adam"] = timed(opt.step, repeats, False) * 1e3
    # The measured update is a real AdamW step: its first element against torch's own over the same state.
    ref = torch.nn.Parameter(before)
    ref_opt = torch.optim.AdamW([ref], lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    for _ in range(repeats + 1):  # as many steps as timed() took: the warm-up and the repeats
        ref.grad = grad_head.clone()
        ref_opt.step()
    adam_err = (ref.detach() - master[:4096]).abs().max().item()

    ms["host_copy"] = host_copy(master, repeats)
    for pinned in (True, False) if cuda else (False,):
        ms.update(copies(master, pinned, cuda, repeats, dtype))
    res = {"numel": n, "ms": {k: round(v, 1) for k, v in ms.items()}, "adam_vs_torch_max_abs": adam_err,
           "host_copy_gbps": round(8 * n / ms["host_copy"] / 1e6, 1),
           "adam_bytes_per_param": 28, "adam_gbps": round(28 * n / ms["cpu_adam"] / 1e6, 1),
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    for tag in ("pinned", "pageable") if cuda else ("pageable",):
        parts = ["cpu_adam", f"cast_bf16_host.{tag}"] + ([f"d2h_grads.{tag}", f"h2d_params.{tag}"] if cuda else [])
        res[f"host_floor_ms.{tag}"] = round(sum(ms[p] for p in parts), 1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pangu-2.6b", help="preset whose parameter count sets the size")
    p.add_argument("--numel", type=int, default=None, help="a parameter count in place of --model's")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)
    model = None if args.numel else args.model  # the result names the model only when its size came from it
    if model:
        from sftbench.pangu import count_params, preset_config
        args.numel = count_params(preset_config(model))
    cuda = torch.cuda.is_available()
    res = {"model": model,
           "device": torch.cuda.get_device_name() if cuda else "cpu", **measure(args.numel, args.repeats, cuda)}
    for k, v in res["ms"].items():
        print(f"{k:24s} {v:10.1f} ms")
    for k in ("host_copy_gbps", "adam_gbps", "adam_vs_torch_max_abs", "torch_threads", "cpu_count",
              "omp_num_threads") + tuple(k for k in res if k.startswith("host_floor_ms")):
        print(f"{k:24s} {res[k]}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["adam_vs_torch_max_abs"] < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
