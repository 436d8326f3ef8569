#!/usr/bin/env python
"""Peer benchmark: the plain PyTorch SFT loop a typical user writes, on sftbench's Pangu-α model and batches.

    python bench/peer_torch.py --model pangu-350m --steps 20 --warmup-steps 3 --out peer_torch.json
    DS_ACCELERATOR=cpu python bench/peer_torch.py --model pangu-tiny --seq-len 64 --steps 3 --warmup-steps 1

What it does, as a user would: fp32 model on the GPU, ``torch.optim.AdamW(fused=True)`` (betas 0.9/0.95, weight
decay 0.01, lr 1e-5, linear LR warm-up), ``torch.autocast(bfloat16)``, a ``DataLoader`` over the encoded samples
(batches moved to the GPU per micro-batch, ``attention_mask`` passed to the model), loss / grad-accum and
``backward()`` per micro-batch, clipping at 1.0 and an optimizer step every ``--grad-accum`` micro-batches.

What it shares with train.py, so the comparison is like for like: the model class and its initialisation
(``sftbench.pangu.build_model`` after ``torch.manual_seed(seed)``), the tokenizer, the data file and its cache
(``sftbench.data.load_or_build_cache``), and the sample order (``sftbench.data.ShardedOrder(n, 0, 1, seed)``,
epochs back to back), micro batch 1, sequence length and accumulation.

``--compile reduce-overhead --no-attention-mask --batches-on-device`` is the loop a performance engineer writes
(``bench/compare.py`` runs it as ``peer_compiled``): the model under ``torch.compile`` (inductor, its CUDA graphs),
causal attention with no mask (flash attention; every sample is right-padded, so the causal mask alone gives the
real tokens the same result), every micro-batch of the run moved to the GPU before the clock starts, and the
gradients allocated once so that accumulation adds into them in place (``zero_grad(set_to_none=False)``): with
``set_to_none`` autograd would adopt the backward graph's own output as ``.grad``, which the next replay of the CUDA
graph overwrites ("accessing tensor output of CUDAGraphs that has been overwritten"). The compile happens inside the
warm-up steps; ``compile_s`` reports what the warm-up steps took beyond as many measured (median) steps.

Timing: each optimizer step (all its micro-batches, data loading included) between two ``torch.cuda.synchronize()``;
the loss is read after the clock stopped. ``--steps`` counts every step, the first ``--warmup-steps`` are left out
of the statistics. Prints one line per step and a summary; ``--out FILE.json`` writes the summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for sftbench

import torch  # noqa: E402

from sftbench.paths import BENCH_DATA, REPO, SAMPLE_DATA  # noqa: E402
from sftbench import data as sftdata  # noqa: E402
from sftbench import metrics  # noqa: E402
from sftbench.args import repo_relative  # noqa: E402
from sftbench.fmt import MIB  # noqa: E402
from sftbench.buildenv import rank_device  # noqa: E402
from sftbench.models.resolve import resolve as resolve_model  # noqa: E402


def run_parser(description: str, steps_help: str) -> argparse.ArgumentParser:
    """The flags every bench script shares, with train.py's names and defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="model preset, folder or Hub name "
                                                 "(default: pangu-350m on GPU, pangu-tiny on CPU)")
    p.add_argument("--steps", "--max-steps", dest="steps", type=int, default=20, help=steps_help)
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the statistics")
    p.add_argument("--data", default=None, help="SFT JSONL (default: data/bench_10k.jsonl if generated, "
                                                "else data/sample_sft.jsonl)")
    p.add_argument("--tokenizer", default=None, help="vocab.model or a folder holding it (default: the checkpoint "
                                                     "folder's, else the shipped small tokenizer)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "data"))
    return p


def parse_checked(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, and refuse step counts that would leave nothing to measure."""
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup_steps < 0 or getattr(a, "grad_accum", 1) < 1:
        p.error("need --steps >= 1, --warmup-steps >= 0, --grad-accum >= 1")
    if a.warmup_steps >= a.steps:
        p.error(f"--warmup-steps ({a.warmup_steps}) must be < --steps ({a.steps}): no step would be measured")
    return a


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__.splitlines()[0], "optimizer steps to run, warm-up included")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lr-warmup-steps", type=int, default=100)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="autocast dtype (fp32: no autocast); fp16 uses a GradScaler")
    p.add_argument("--attention-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="pass attention_mask to the model, as users do (--no-attention-mask: what train.py does "
                        "for right-padded samples, to tell that lever's share of a speed difference)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="torch.compile the model in this mode (reduce-overhead: inductor with its CUDA graphs); the "
                        "result is then named peer_compiled")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend (aot_eager: the same graphs without code generation, for a check "
                        "of the loop on CPU)")
    p.add_argument("--batches-on-device", action=argparse.BooleanOptionalAction, default=False,
                   help="move every micro-batch of the run to the device before the clock starts (no DataLoader)")
    p.add_argument("--grads-preallocated", action=argparse.BooleanOptionalAction, default=None,
                   help="allocate the gradients once and accumulate into them in place (default: on with --compile)")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    a = parse_checked(p, argv)
    if a.grads_preallocated is None:
        a.grads_preallocated = a.compile != "off"
    return a


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


def sample_order(n: int, need: int, seed: int) -> list[int]:
    """train.py's order on one rank: ShardedOrder epochs back to back, cut at `need` samples."""
    return sftdata.ShardedOrder(n, 0, 1, seed).take(need)


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, enc):
        self.input_ids, self.attention_mask, self.labels = enc.input_ids, enc.attention_mask, enc.labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def micro_batches(enc, order: list[int], keys: tuple[str, ...], mb: int, device, on_device: bool):
    """The run's micro-batches in ``order``: a DataLoader (each batch moved to the device in the loop, as users
    write it), or with ``on_device`` every one of them on the device up front (the loop then moves nothing)."""
    if not on_device:
        return torch.utils.data.DataLoader(SFTDataset(enc), batch_size=mb, sampler=order, num_workers=0,
                                           pin_memory=device.type == "cuda", drop_last=False)
    rows = torch.tensor(order)
    held = {k: getattr(enc, k)[rows].to(device) for k in keys}
    return [{k: v[i:i + mb] for k, v in held.items()} for i in range(0, len(order), mb)]


def compiled_forward(model, args, device):
    """(the module to call, whether it runs as inductor's CUDA graphs): the model itself without --compile; a
    backend other than inductor takes no mode."""
    if args.compile == "off":
        return model, False
    mode = {"mode": args.compile} if args.compile_backend == "inductor" else {}
    graphs = args.compile == "reduce-overhead" and args.compile_backend == "inductor" and device.type == "cuda"
    return torch.compile(model, backend=args.compile_backend, **mode), graphs


def adamw(model, lr: float):
    """(torch's AdamW as a typical user sets it, whether it is the fused kernel)."""
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw), True
    except (RuntimeError, ValueError):  # a torch build without the fused kernel for this device
        return torch.optim.AdamW(model.parameters(), **kw), False


def how_it_runs(args) -> str:
    """The start line's account of the performance flags that are on."""
    return (f"torch.compile {args.compile} ({args.compile_backend}), " if args.compile != "off" else "") + (
        "batches on the device, " if args.batches_on_device else "") + (
        "no attention mask, " if not args.attention_mask else "") + (
        "gradients pre-allocated, " if args.grads_preallocated else "")


def loop_settings(args, step_times: list[float]) -> dict:
    """The loop's performance flags for the result record, and ``compile_s``: what the warm-up steps (where the
    compile happens) took beyond as many median measured steps."""
    compiled, meas = args.compile != "off", step_times[args.warmup_steps:]
    compile_s = (sum(step_times[:args.warmup_steps]) - args.warmup_steps * statistics.median(meas)
                 if compiled and meas else None)
    return {"attention_mask": args.attention_mask, "compile": args.compile,
            "compile_backend": args.compile_backend if compiled else None, "compile_s": compile_s,
            "batches_on_device": args.batches_on_device, "grads_preallocated": args.grads_preallocated}


def main(argv=None) -> int:
    args = parse_args(argv)
    on_cpu, _, device = rank_device()
    if args.precision == "fp16" and on_cpu:
        sys.exit("error: fp16 autocast is not supported on CPU here; use --precision bf16 or fp32")
    model_name = args.model or ("pangu-tiny" if on_cpu else "pangu-350m")
    spec = resolve_model(model_name, args.tokenizer)  # as train.py: the model seam
    data_path = args.data or str(BENCH_DATA if BENCH_DATA.is_file() else SAMPLE_DATA)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # ---- data: the same tokenizer, file, cache and order as train.py
    tok = spec.tokenizer()
    enc = sftdata.load_or_build_cache(data_path, tok, args.seq_len, args.cache_dir)
    ga, mb = args.grad_accum, 1
    order = sample_order(enc.n, args.steps * ga * mb, args.seed)
    keys = ("input_ids", "labels") + (("attention_mask",) if args.attention_mask else ())
    loader = micro_batches(enc, order, keys, mb, device, args.batches_on_device)

    # ---- model and optimizer, fp32 weights on the device
    torch.manual_seed(args.seed)
    t0 = time.time()
    with torch.device(device):
        model = spec.build().float()  # fp32 weights, autocast below: the loop a typical user writes
    model.train()
    if args.grads_preallocated:  # accumulation adds into these; zero_grad keeps them (set_to_none=False)
        for prm in model.parameters():
            prm.grad = torch.zeros_like(prm)
    forward, graphs = compiled_forward(model, args, device)
    opt, fused = adamw(model, args.lr)
    warm = max(1, args.lr_warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    flops_tok = spec.flops_per_token(model.config, args.seq_len)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tool = "peer_torch" if args.compile == "off" else "peer_compiled"
    print(f"{tool}: {model_name} on {device_name} ({how_it_runs(args)}{args.precision} autocast, fused AdamW={fused}), "
          f"{enc.n} samples, seq {args.seq_len}, micro batch {mb}, grad accum {ga}; built in {time.time() - t0:.1f}s",
          flush=True)

    # ---- the loop
    host = metrics.HostProbe()
    step_times, periods, losses, rss = [], [], [], []
    tokens_per_step = mb * ga * args.seq_len
    it = iter(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t_prev = time.perf_counter()
    for step in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(ga):
            batch = next(it)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in keys}
            if graphs:  # a new micro-batch: the graphs' previous outputs may be overwritten (read before this)
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = forward(**batch)
            loss = out.loss / ga
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += out.loss.detach().float()
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=not args.grads_preallocated)
        sync()
        t1 = time.perf_counter()
        step_s = t1 - t0
        loss_v = (loss_sum / ga).item()
        step_times.append(step_s)
        losses.append(loss_v)
        rss.append(host.rss_mib())
        print(f"step {step + 1}/{args.steps}{' (warm-up)' if step < args.warmup_steps else ''} | loss {loss_v:.4f} "
              f"| {step_s:.3f} s/it | {tokens_per_step / step_s:.0f} tok/s", flush=True)
        periods.append(time.perf_counter() - t_prev)  # end to end, printing included
        t_prev = time.perf_counter()

    res = summarize(tool, model_name, None, args, device, device_name, flops_tok, step_times, periods,
                    losses, rss, mb, ga, 1, extra={"fused_adamw": fused, **loop_settings(args, step_times),
                                                    "dataset_path": data_path, "dataset_samples": enc.n})
    report(res, args.out)
    return 0


def summarize(tool, model_name, ds_config, args, device, device_name, flops_tok, step_times, periods, losses, rss,
              mb, ga, world, extra=None) -> dict:
    """The result record every bench script writes (same keys in peer_torch, peer_trainer and bare_engine)."""
    extra = dict(extra or {})
    if extra.get("dataset_path"):  # committed as results: no machine's folders in it
        extra["dataset_path"] = repo_relative(extra["dataset_path"])
    w = args.warmup_steps
    meas = step_times[w:]
    med = statistics.median(meas) if meas else None
    tokens_per_step = mb * ga * args.seq_len * world
    peak = metrics.peak_tflops(device_name, args.precision) if device.type == "cuda" else None
    tflops = statistics.median(flops_tok * tokens_per_step / world / s / 1e12 for s in meas) if meas else None
    return {
        "tool": tool, "status": "ok", "model": model_name, "ds_config": ds_config, "precision": args.precision,
        "device": str(device), "device_name": device_name if device.type == "cuda" else None, "world_size": world,
        "micro_batch": mb, "grad_accum": ga, "seq_len": args.seq_len, "steps": len(step_times),
        "warmup_steps": w, "measured_steps": len(meas),
        "step_s_median": med, "step_s_mean": statistics.fmean(meas) if meas else None,
        "step_s_min": min(meas) if meas else None,
        "period_s_median": statistics.median(periods[w:]) if periods[w:] else None,
        # as train.py's summary: the median of the per-step rates
        "tokens_per_s": statistics.median(tokens_per_step / s for s in meas) if meas else None,
        "tokens_per_s_per_gpu": statistics.median(tokens_per_step / world / s for s in meas) if meas else None,
        "flops_per_token": flops_tok, "tflops": tflops, "peak_tflops": peak,
        "mfu_pct": 100.0 * tflops / peak if tflops and peak else None,
        "torch_peak_alloc_mib": torch.cuda.max_memory_allocated(device) / MIB
        if device.type == "cuda" else None,
        "torch_peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB
        if device.type == "cuda" else None,
        "host_rss_mib_peak": max(rss) if rss else None,
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "step_times_s": step_times,
        **extra,
    }


def report(res: dict, out: str | None) -> None:
    med = res["step_s_median"]
    mem = (f", peak alloc {res['torch_peak_alloc_mib']:.0f} MiB / reserved {res['torch_peak_reserved_mib']:.0f} MiB"
           if res.get("torch_peak_alloc_mib") is not None else f", peak RSS {res['host_rss_mib_peak']:.0f} MiB")
    mfu = f", MFU {res['mfu_pct']:.1f}%" if res.get("mfu_pct") is not None else ""
    print(f"{res['tool']} done: {res['measured_steps']} measured steps, median {med:.4f} s/it, "
          f"{res['tokens_per_s']:.0f} tok/s{mfu}{mem}", flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
