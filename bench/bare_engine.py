#!/usr/bin/env python
"""The bare loop: train.py's DeepSpeed engine, model and batches with none of its harness, to measure the harness's
own cost (logging, probes, per-step synchronisation).

    deepspeed --num_gpus 1 bench/bare_engine.py --ds ds_configs/z1.json --model pangu-350m --steps 20 \\
        --warmup-steps 3 --out bare.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 bench/bare_engine.py --ds ds_configs/z1.json --model pangu-tiny \\
        --seq-len 64 --steps 3 --warmup-steps 1

Prepared exactly as train.py prepares a DeepSpeed run: the config through ``load_ds_config`` / ``apply_precision``,
``torch.manual_seed(seed)`` then the model built on the device (ZeRO-3: partitioned, through transformers'
``HfDeepSpeedConfig`` hook), ``deepspeed.initialize(model, model_parameters=sftbench.plain.param_groups(model),
config)``, the same samples in the same order (``ShardedOrder`` epochs back to back) preloaded on the device as
[steps, grad_accum, micro_batch, seq], and ``attention_mask=None`` when every sample is right-padded
(``--pad-mask auto``, train.py's default).

The loop is only ``engine(**batch)``, ``engine.backward(loss)``, ``engine.step()``: no loss read, no log, no probe
and no per-step host synchronisation. Per-step times come from CUDA events recorded at every optimizer-step boundary
(wall clock on CPU); ``step_s_wall`` is the wall time of all measured steps (synchronised at both ends) divided by
their number. Same result fields as bench/peer_torch.py; ``--out FILE.json`` writes them (rank 0).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for sftbench
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftbench.paths import BENCH_DATA, REPO, SAMPLE_DATA  # noqa: E402
from sftbench.buildenv import prepare_op_builds, rank_device, single_process_env  # noqa: E402
from sftbench import fused, graphs, levers, speed  # noqa: E402  (torch-free at import)

prepare_op_builds()  # as train.py: before anything imports DeepSpeed's op builders

import torch  # noqa: E402

from peer_torch import parse_checked, report, run_parser, summarize  # noqa: E402
from sftbench.dsconfig import DSConfigError, apply_precision, config_precision, load_ds_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__.splitlines()[0], "optimizer steps, warm-up included")
    p.add_argument("--ds", default=str(REPO / "ds_configs" / "z1.json"), help="DeepSpeed JSON (as for train.py)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="override the JSON's fp16/bf16 blocks, as train.py --precision")
    p.add_argument("--pad-mask", choices=("auto", "always"), default="auto", help="as train.py --pad-mask")
    p.add_argument("--compile", nargs="?", const="model", default="auto", choices=levers.COMPILE_TARGETS,
                   help="as train.py --compile")
    p.add_argument("--compile-mode", default="default", help="as train.py --compile-mode")
    p.add_argument("--fused-kernels", default="auto", choices=levers.FUSED_MODES, help="as train.py --fused-kernels")
    p.add_argument("--cuda-graphs", default="auto", choices=levers.GRAPH_MODES, help="as train.py --cuda-graphs")
    p.add_argument("--graph-accum", default="auto", choices=levers.ACCUM_MODES, help="as train.py --graph-accum")
    p.add_argument("--graph-wgrad", default="auto", choices=levers.WGRAD_MODES, help="as train.py --graph-wgrad")
    p.add_argument("--graph-qkv", default="auto", choices=levers.QKV_MODES, help="as train.py --graph-qkv")
    p.add_argument("--graph-fuse", default="auto", choices=levers.FUSE_MODES, help="as train.py --graph-fuse")
    p.add_argument("--grad-norm", default="auto", choices=levers.ONE_PASS_MODES, help="as train.py --grad-norm")
    p.add_argument("--overflow-check", default="auto", choices=levers.ONE_PASS_MODES,
                   help="as train.py --overflow-check")
    p.add_argument("--coalesce-reduction", default="auto", choices=levers.COALESCE_MODES,
                   help="as train.py --coalesce-reduction")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="profile the first measured step (torch.profiler, CPU + CUDA) and write its tables here "
                        "(rank 0); the step's time then includes the profiler's own cost")
    p.add_argument("--out", default=None, help="write the summary JSON here (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    return parse_checked(p, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        levers.check_compile(args.compile, args.compile_mode)
        cfg = apply_precision(load_ds_config(args.ds), args.precision)
    except (DSConfigError, levers.LeverError) as e:
        sys.exit(f"error: {e}")
    precision = config_precision(cfg)

    import deepspeed

    from sftbench import data as sftdata
    from sftbench import ds_patches, metrics
    from sftbench.models.resolve import resolve as resolve_model
    from sftbench.plain import param_groups
    from sftbench.shm import release_own_buffer

    single_process_env()  # as train.py: without a launcher, one rank
    on_cpu, local_rank, device = rank_device(args.local_rank)
    if precision == "fp16" and on_cpu:
        sys.exit("error: fp16 is not supported on CPU (DeepSpeed refuses it); use --precision bf16 or fp32")
    deepspeed.init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if on_cpu:
        release_own_buffer(rank, world)  # as train.py: DeepSpeed leaves its shm file behind on CPU
    model_name = args.model or ("pangu-tiny" if on_cpu else "pangu-350m")
    try:
        spec = resolve_model(model_name, args.tokenizer)  # as train.py: the model seam
        spec.check_seq_len(args.seq_len)
    except ValueError as e:
        sys.exit(f"error: {e}")
    asked = levers.Asked.of(args)
    micro = cfg.get("train_micro_batch_size_per_gpu") or 1

    def plan_for(engine_facts=None, right_padded=True, patches_why=None):  # as train.py's plan_levers
        return levers.decide(asked, speed.situation(cfg, precision=precision, world_size=world, device=device,
                                                    seq_len=args.seq_len, micro_batch=int(micro), spec=spec,
                                                    source=args.ds, right_padded=right_padded,
                                                    patches_why=patches_why, engine_facts=engine_facts))
    try:  # as train.py: before the model and engine are built
        plan = plan_for()
    except levers.LeverError as e:
        sys.exit(f"error: {e}")
    graphs.prepare(plan, device)
    cfg = speed.apply_timer(cfg, plan)  # as train.py
    target = plan["compile"].value
    data_path = args.data or str(BENCH_DATA if BENCH_DATA.is_file() else SAMPLE_DATA)
    torch.manual_seed(args.seed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # ---- data and model, as train.py builds them
    tok = spec.tokenizer()
    enc = sftdata.load_or_build_cache(data_path, tok, args.seq_len, args.cache_dir, local_rank=local_rank)
    zero_stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if zero_stage == 3:
        # as train.py: partitioned construction through transformers' ZeRO-3 hook
        from transformers.integrations import HfDeepSpeedConfig
        _hf_ds = HfDeepSpeedConfig(cfg)  # noqa: F841  (must stay alive while the model is built)
        model = spec.build()
    else:
        with torch.device(device):
            model = spec.build()
    if plan.on("fused_kernels"):  # as train.py: before the engine wraps the model
        print(f"fused kernels: {fused.apply_liger(model)}", flush=True)
    flops_tok = spec.flops_per_token(model.config, args.seq_len)
    right_padded = bool((enc.attention_mask[:, 1:] <= enc.attention_mask[:, :-1]).all())

    if target == "blocks":
        speed.compile_blocks(spec.blocks(model), args.compile_mode)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=cfg)
    speed.compile_engine(engine, target, args.compile_mode, deepspeed=True)
    try:  # as train.py: the plan again with what DeepSpeed built, then its patches
        plan = plan_for(ds_patches.engine_facts(engine), right_padded and args.pad_mask == "auto",
                        ds_patches.patches_why())
    except levers.LeverError as e:
        sys.exit(f"error: {e}")
    ds_patches.apply(engine, plan)
    use_pad_mask, use_graphs, coalesce = plan.on("pad_mask"), plan.on("cuda_graphs"), plan.on("coalesce_reduction")
    engine.train()
    ga = engine.gradient_accumulation_steps()
    mb = engine.train_micro_batch_size_per_gpu()
    if use_graphs:  # as train.py: captured after initialize, on the first samples' shapes
        graphs.graph_engine(
            engine, {"input_ids": enc.input_ids[:mb].to(device), "labels": enc.labels[:mb].to(device),
                     "attention_mask": enc.attention_mask[:mb].to(device) if use_pad_mask else None}, plan)

    # ---- batches on the device before the clock starts (train.py's step_indices)
    need = args.steps * mb * ga
    idx_t = torch.tensor(sftdata.ShardedOrder(enc.n, rank, world, args.seed).take(need)).view(args.steps, ga, mb)
    dev_ids = enc.input_ids[idx_t].to(device)
    dev_labels = enc.labels[idx_t].to(device)
    dev_mask = enc.attention_mask[idx_t].to(device) if use_pad_mask else None
    if rank == 0:
        print(f"bare_engine: {model_name}, {args.ds} (ZeRO {zero_stage}, {precision}), world {world}, micro batch "
              f"{mb}, grad accum {ga}, seq {args.seq_len}; speed levers:", flush=True)
        print("\n".join(plan.table()), flush=True)

    # ---- the bare loop
    w = args.warmup_steps
    cuda = device.type == "cuda"
    marks: list = []  # one per step boundary: CUDA events on GPU, perf_counter on CPU
    skip: set[int] = set()  # intervals that are not a step: marks[i-1] -> marks[i] spans writing the profile
    paused_s = 0.0  # host time spent writing the profile, out of the wall-clock figure too

    def mark() -> None:
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t_meas = time.perf_counter() if w == 0 else None
    mark()
    prof = None
    for step in range(args.steps):
        if step == w and w > 0:
            sync()
            t_meas = time.perf_counter()
        if args.profile and step == w and rank == 0:
            prof = start_profiler(cuda)
        # as train.py's train_step: with the coalesced window, one step() after it
        with contextlib.ExitStack() as window:
            if coalesce:
                window.enter_context(engine.coalesce_grad_reduction())
            for micro in range(ga):
                # Named ranges in the profile (a no-op outside it): where the host's time goes, phase by phase.
                tag = "boundary" if micro == ga - 1 else "micro"
                if coalesce:
                    engine.set_gradient_accumulation_boundary(micro == ga - 1)
                with phase(prof, f"{tag}.forward"):
                    out = engine(input_ids=dev_ids[step, micro], labels=dev_labels[step, micro],
                                 attention_mask=dev_mask[step, micro] if dev_mask is not None else None)
                with phase(prof, f"{tag}.backward"):
                    engine.backward(out.loss)
                if not coalesce:
                    with phase(prof, f"{tag}.step"):
                        engine.step()
            with phase(prof, "boundary.reduce"):  # the coalesced window's exit: its one reduction (else nothing)
                window.close()
        if coalesce:
            engine.set_gradient_accumulation_boundary(True)
            with phase(prof, "boundary.step"):
                engine.step()
        mark()
        if prof is not None:
            sync()
            t_write = time.perf_counter()
            prof.stop()
            write_profile(prof, args.profile, cuda, f"{model_name} {args.ds} ZeRO {zero_stage} {precision} "
                                                    f"compile={target}/{args.compile_mode}, one optimizer step "
                                                    f"({ga} micro-batches)")
            prof = None
            # Writing the tables and the timeline takes seconds with the GPU idle: start the next step's interval
            # after it, so that neither that step nor the wall-clock figure counts it.
            paused_s = time.perf_counter() - t_write
            mark()
            skip.add(len(marks) - 1)
    sync()
    wall = time.perf_counter() - t_meas - paused_s
    pairs = [(marks[i - 1], marks[i]) for i in range(1, len(marks)) if i not in skip]
    if cuda:
        step_times = [a.elapsed_time(b) / 1000.0 for a, b in pairs]
    else:
        step_times = [b - a for a, b in pairs]
    final_loss = float(out.loss.detach().float().item())

    if rank == 0:
        device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
        args.precision = precision
        host = metrics.HostProbe()
        res = summarize("bare_engine", model_name, args.ds, args, device, device_name, flops_tok, step_times,
                        step_times, [], [host.rss_mib()], mb, ga, world,
                        extra={"step_s_wall": wall / (args.steps - w),
                               **{k: v for k, v in plan.to_log().items() if not k.endswith("_why")},
                               "zero_stage": zero_stage, "dataset_path": data_path, "dataset_samples": enc.n})
        res["final_loss"] = final_loss
        report(res, args.out)
    torch.distributed.barrier()
    return 0


def phase(prof, name: str):
    """A named range in the profile while profiling, else nothing."""
    return torch.profiler.record_function(name) if prof is not None else contextlib.nullcontext()


def start_profiler(cuda: bool):
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=acts)
    prof.start()
    return prof


def phase_table(trace: dict) -> list[str]:
    """Where the step's time goes phase by phase (the loop's named ranges: the micro-batches' forward, backward and
    step calls, the boundary micro-batch's apart): the host's wall time inside each, and the device time of the
    kernels launched from it (a kernel counts where its launch call ran). Markdown lines."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    phases = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].split(".")[0]
                     in ("micro", "boundary")), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    rows: dict[str, list[float]] = {}  # name -> [calls, host ms, kernels, device ms]
    for ph in phases:
        rows.setdefault(ph["name"], [0, 0.0, 0, 0.0])
        rows[ph["name"]][0] += 1
        rows[ph["name"]][1] += ph["dur"] / 1e3
    starts = [ph["ts"] for ph in phases]
    for k in events:
        if k.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        ts = launches.get(k.get("args", {}).get("correlation"))
        i = bisect.bisect_right(starts, ts) - 1 if ts is not None else -1
        if i >= 0 and ts <= phases[i]["ts"] + phases[i]["dur"]:
            rows[phases[i]["name"]][2] += 1
            rows[phases[i]["name"]][3] += k["dur"] / 1e3
    if not rows:
        return ["(no named phases in the trace)"]
    out = ["| phase | calls | host wall ms | kernels | device ms |", "|---|---|---|---|---|"]
    for name, (calls, host_ms, n, dev_ms) in rows.items():
        out.append(f"| {name} | {calls} | {host_ms:.2f} | {n} | {dev_ms:.2f} |")
    return out


def kernel_family(name: str) -> str:
    """The family a kernel's name puts it in (a rough cut by name, for the profile's table)."""
    n = name.lower()
    return ("gemm" if any(k in n for k in ("gemm", "cutlass", "sm90", "cublas", "nvjet", "matmul")) else
            "attention" if any(k in n for k in ("flash", "fmha", "attention", "sdpa")) else
            "memcpy/memset" if "memcpy" in n or "memset" in n else
            "optimizer" if any(k in n for k in ("adam", "multi_tensor", "foreach")) else
            "triton (compiled)" if "triton" in n else
            "reduce/norm" if any(k in n for k in ("reduce", "norm")) else "elementwise/other")


def family_table(trace: dict) -> list[str]:
    """Device busy time by kernel family, from the trace's kernels, copies and memsets only: the GPU-side ranges
    the profiler also records for every named range (the phases, a graph replay's autograd node) span kernels
    rather than being kernels, and counting them would add the same time again. Markdown lines."""
    fams: dict[str, float] = {}
    n = 0
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            fam = "memcpy/memset" if e["cat"] != "kernel" else kernel_family(e["name"])
            fams[fam] = fams.get(fam, 0.0) + e["dur"]
            n += 1
    busy_us = sum(fams.values())
    out = [f"device busy (sum of kernel times): {busy_us / 1e3:.1f} ms, {n} kernels", "",
           "| kernel family | ms | share of busy |", "|---|---|---|"]
    for fam, us in sorted(fams.items(), key=lambda kv: -kv[1]):
        out.append(f"| {fam} | {us / 1e3:.2f} | {100 * us / max(busy_us, 1):.1f}% |")
    return out


def write_profile(prof, path: str, cuda: bool, title: str) -> None:
    """Where one step's time goes: device busy time by kernel family (GEMM, attention, elementwise...), against the
    step's wall time, then the top operators by device time and by host time."""
    events = prof.key_averages()
    trace_path = Path(path).with_suffix(".trace.json")  # the timeline, for chrome://tracing or Perfetto
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text(encoding="utf-8"))
    lines = [f"# profile: {title}", ""] + phase_table(trace) + [""]
    if cuda:
        lines += family_table(trace)
        lines += ["", "## top operators by device time (the named ranges are the loop's phases, not kernels)", "",
                  events.table(sort_by="self_cuda_time_total" if not hasattr(events[0], "self_device_time_total")
                               else "self_device_time_total", row_limit=25, max_name_column_width=70)]
    lines += ["", "## top operators by host time", "",
              events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"profile written to {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
