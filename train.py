#!/usr/bin/env python
"""Supervised fine-tuning of Pangu-alpha with a hand-written DeepSpeed loop, measured step by step.

    deepspeed --num_gpus 3 train.py --ds ds_configs/z2_offload_5e8.json --model pangu-2.6b
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train.py --ds ds_configs/z3_offload_param.json --model pangu-tiny
    deepspeed --num_gpus 1 train.py --ds none --precision bf16          # plain PyTorch baseline

Reads top to bottom: parse -> init -> build (data, model, engine) -> loop -> summary. Every rank writes
runs/<run>/rank<k>.jsonl (schema: docs/log_schema.md); rank 0 prints. Fine-tuning (--save, --save-every, --resume,
--eval-data/--eval-split, --epochs) is done by sftbench/checkpoint.py and sftbench/evaluate.py, called between steps.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from sftbench.args import PLAIN_DEFAULTS, parse_args, resolve_warmup, save_config_file
from sftbench.buildenv import fix_cuda_arch_list, rank_device, single_process_env
from sftbench import checkpoint, schedule
from sftbench.dsconfig import (DSConfigError, apply_overrides, apply_precision, config_precision, describe,
                               load_ds_config, peak_lr, resolve_auto, resolve_config_path)
from sftbench.failures import classify_exception
from sftbench.fmt import MIB
from sftbench.nodes import NodeError, per_node_prediction, placement, rank0_value
from sftbench.paths import REPO
from sftbench.presets import check_seq_len, model_shape as shape_of
from sftbench.ops import check_locks as check_build_locks
from sftbench.report_to import open_sinks
from sftbench.runlog import RunLog
from sftbench.shm import release_own_buffer as release_shm_buffer

# The one import-order constraint: DeepSpeed's op builders read TORCH_CUDA_ARCH_LIST when they are imported, and
# this machine's value ("9.0a" on Hopper) breaks the fused-Adam build; main() fixes it (fix_cuda_arch_list) before
# torch and DeepSpeed are imported, so both are imported inside main(), after the fix.


def train_step(engine, ids, labels, mask=None, coalesce=False):
    """One optimizer step: ``ids``, ``labels`` (and ``mask``) hold the step's micro-batches as [GA, micro batch,
    seq]. The engine's three calls per micro-batch, as DeepSpeed is told (``engine.step()`` at every micro-batch:
    DeepSpeed updates only at the accumulation boundary). With ``coalesce`` (--coalesce-reduction) the micro-batches
    run inside DeepSpeed's ``engine.coalesce_grad_reduction()`` window, which reduces once at its exit, and
    ``engine.step()`` follows once. Returns the mean micro-batch loss as a device tensor, so the caller reads it
    once, after its clock stopped."""
    n = ids.shape[0]
    loss_sum = 0.0
    with engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
        for micro in range(n):
            if coalesce:  # step() (which moves the engine's micro-step count) waits until after the window
                engine.set_gradient_accumulation_boundary(micro == n - 1)
            out = engine(input_ids=ids[micro], labels=labels[micro], attention_mask=mask[micro] if mask is not None
                         else None)
            engine.backward(out.loss)
            if not coalesce:
                engine.step()
            loss_sum = loss_sum + out.loss.detach().float()
    if coalesce:
        engine.set_gradient_accumulation_boundary(True)  # the window's exit restores the flag it found on entry
        engine.step()
    return loss_sum / n


def step_line(rec: dict, max_steps: int, eta_s: float, bar: bool = False) -> str:
    """Rank 0's console line for one step record (a progress bar in front on a terminal)."""
    done = rec["step"]
    head = ""
    if bar:
        fill = int(20 * done / max_steps)
        head = "[" + "#" * fill + "." * (20 - fill) + "] "
    mem = f" | gpu {rec['gpu_mem_used_mib']:.0f} MiB" if rec.get("gpu_mem_used_mib") is not None else ""
    mfu = f" | mfu {rec['mfu_pct']:.1f}%" if rec.get("mfu_pct") is not None else ""
    flag = " (warm-up)" if rec["warmup"] else ""
    flag += " (overflow: update skipped)" if rec.get("skipped") else ""  # fp16, or non-finite bf16 gradients
    return (f"{head}step {done}/{max_steps}{flag} | loss {rec['loss']:.4f} | {rec['step_s']:.3f} s/it | "
            f"{rec['tokens_per_s']:.0f} tok/s{mfu}{mem} | rss {rec['host_rss_mib']:.0f} MiB | eta {eta_s:.0f}s")


def git_commit() -> str | None:
    """The checkout's commit for the meta record (SFTBENCH_GIT_COMMIT for a copy of the tree without its history)."""
    if os.environ.get("SFTBENCH_GIT_COMMIT"):
        return os.environ["SFTBENCH_GIT_COMMIT"]
    try:
        p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def main() -> int:
    # ---------------------------------------------------------------- parse
    args = parse_args()
    try:  # before anything is built or trained: a re-run must not replace a saved model (sftbench/checkpoint.py)
        checkpoint.check_save_target(args.save, args.resume, args.overwrite)
    except checkpoint.SaveTargetError as e:
        sys.exit(f"error: {e}")
    arch_env = fix_cuda_arch_list()  # before anything imports DeepSpeed's op builders
    try:
        if args.deepspeed:
            args.ds = resolve_config_path(args.ds or "z1")  # a file, or a ds_configs/ name as the sweep takes it
        ds_cfg = load_ds_config(args.ds) if args.deepspeed else None
    except DSConfigError as e:
        sys.exit(f"error: {e}")

    import torch  # after the arch-list fix on purpose (the import-order note above)

    if args.deepspeed:
        import deepspeed

    from sftbench import data as sftdata
    from sftbench import engine_checks
    from sftbench import graphs
    from sftbench import metrics
    from sftbench import speed
    from sftbench.pangu import CheckpointError, build_model, count_params
    from sftbench.plain import PlainEngine, param_groups
    from sftbench.tokenizer import PanguTokenizer

    if args.deepspeed:
        engine_checks.silence_startup_noise()  # before initialize, whose scheduler start-up message says nothing

    # ---------------------------------------------------------------- init distributed and device
    if args.deepspeed:
        single_process_env()  # `python train.py` without a launcher: one rank, not DeepSpeed's MPI discovery
        if os.environ.get("LOCAL_RANK", "0") == "0":
            check_build_locks(say=lambda m: print(m, file=sys.stderr, flush=True))  # a killed op build hangs runs
    on_cpu, local_rank, device = rank_device(args.local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.deepspeed:
        deepspeed.init_distributed()
    elif world_size > 1:
        torch.distributed.init_process_group("gloo" if on_cpu else "nccl", device_id=None if on_cpu else device)
    if torch.distributed.is_initialized():
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if args.deepspeed and on_cpu:
        release_shm_buffer(rank, world_size)  # DeepSpeed never frees its 66 MB shm file per CPU rank (sftbench/shm.py)
    try:
        where = placement(rank, world_size, local_rank)  # node name, node rank and count, ranks per node (nodes.py)
    except NodeError as e:
        sys.exit(f"error: {e}")


    def sync() -> None:
        """Wait for the device to finish queued work, so the clock reads what the step really cost."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)


    model_name = args.model or ("pangu-tiny" if on_cpu else "pangu-350m")
    try:  # before the data is tokenised: a longer sample has no position row (an IndexError mid-step)
        check_seq_len(model_name, args.seq_len)
    except ValueError as e:
        sys.exit(f"error: {e}")
    # Precision: the config's block, or the flag; --ds none defaults to bf16 where the GPU has it.
    overrides: list[str] = []  # DeepSpeed config keys the flags changed, for the log and the console
    if ds_cfg is not None:
        # a config written for the transformers Trainer: its "auto" values filled in as the Trainer does
        ds_cfg, auto_filled = resolve_auto(
            ds_cfg, world_size=world_size, micro_batch=args.micro_batch, grad_accum=args.grad_accum, lr=args.lr,
            lr_warmup_steps=args.lr_warmup_steps, hidden=shape_of(model_name)["hidden"], defaults=PLAIN_DEFAULTS,
            precision=args.precision or ("bf16" if not on_cpu and torch.cuda.is_bf16_supported() else "fp32"))
        ds_cfg = apply_precision(ds_cfg, args.precision)
        precision = config_precision(ds_cfg)
        try:
            ds_cfg, overrides = apply_overrides(ds_cfg, lr=args.lr, grad_accum=args.grad_accum,
                                                micro_batch=args.micro_batch, lr_warmup_steps=args.lr_warmup_steps,
                                                source=args.ds)
        except DSConfigError as e:
            sys.exit(f"error: {e}")
        overrides = auto_filled + overrides
    else:
        precision = args.precision or ("bf16" if not on_cpu and torch.cuda.is_bf16_supported() else "fp32")
    if precision == "fp16" and on_cpu and args.deepspeed:
        # The plain loop (--ds none) runs fp16 on CPU: torch's CPU autocast and GradScaler have it.
        sys.exit("error: fp16 with DeepSpeed is not supported on CPU (DeepSpeed's CPU accelerator refuses it); use "
                 "--precision bf16 or fp32, or --ds none for the plain PyTorch loop")
    try:
        compile_target, compile_why = speed.resolve_compile(args.compile, on_cpu, ds_cfg,
                                                            args.ds if args.deepspeed else None)
    except speed.SpeedError as e:
        sys.exit(f"error: {e}")
    # --coalesce-reduction as it will resolve once the engine exists (the graphs' evidence and memory depend on it)
    coalescing = speed.coalesce_expected(args.coalesce_reduction, ds_cfg, world_size, device.type == "cuda",
                                         precision)
    graph_mem = None  # auto keeps the graphs off where only the eager run is predicted to fit on this GPU
    if args.cuda_graphs == "auto" and device.type == "cuda":
        from sftbench.memory import graphs_memory_mib
        micro = (ds_cfg or {}).get("train_micro_batch_size_per_gpu") or args.micro_batch or 1
        both = graphs_memory_mib(model_name, ds_cfg, world_size, precision, args.seq_len, int(micro), coalescing)
        graph_mem = both and (*both, torch.cuda.get_device_properties(device).total_memory / MIB)
    try:  # before the model and engine exist: with graphs on, they are built on the capture stream
        use_graphs, graphs_why = graphs.prepare(args.cuda_graphs, device, ds_cfg=ds_cfg, world_size=world_size,
                                                compile_target=compile_target, memory_mib=graph_mem,
                                                coalescing=coalescing)
    except graphs.GraphError as e:
        sys.exit(f"error: {e}")
    ds_cfg, timer_why = speed.resolve_ds_timers(ds_cfg, graphs_on=use_graphs)
    run_dir = args.run_dir or rank0_value(args.default_run_dir(model_name, precision))  # one folder for every node
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config_file(args, run_dir)  # --config: the run folder names every flag it was given
    log = RunLog(run_dir, rank, sinks=open_sinks(args.report_to, run_dir, rank))
    t_start = time.time()
    torch.manual_seed(args.seed)


    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)


    stop = checkpoint.StopFlag(saving=bool(args.save))  # with a save folder, a signal ends in one last checkpoint
    stats = metrics.StepStats(args.warmup_steps, precision)
    summary_extra: dict = {"epoch_s_measured": None, "eval_loss": None, "saved": None}
    steps_per_epoch = None
    try:
        # A missing or incomplete --resume folder fails here, before anything is built.
        resume_dir, resume_state = checkpoint.resolve(args.resume) if args.resume else (None, None)
        start_step = resume_state["step"] if resume_state else 0
        # ------------------------------------------------------------ build: tokenizer and data
        tok = PanguTokenizer.for_model(model_name, args.tokenizer)
        dataset = sftdata.load_or_build_cache(args.data, tok, args.seq_len, args.cache_dir,
                                              mask_prompt=args.mask_prompt, strict=args.strict_data,
                                              local_rank=local_rank)
        train_rows, eval_set, eval_rows = sftdata.training_and_eval_rows(
            dataset, args.eval_data, args.eval_split, args.seed,
            lambda path: sftdata.load_or_build_cache(path, tok, args.seq_len, args.cache_dir,
                                                     mask_prompt=args.mask_prompt, strict=args.strict_data,
                                                     local_rank=local_rank))
        n_train = len(train_rows)
        say(f"data: {dataset.n} samples from {args.data} ({'cache hit' if dataset.cache_hit else 'tokenised'}), "
            f"{dataset.real_tokens} real + {dataset.pad_tokens} padding tokens"
            + (f"; eval: {len(eval_rows)} samples ({args.eval_data or f'{args.eval_split:g} of the training file'})"
               if eval_rows else ""))

        # --lr-schedule over the run's length, known now that the data is (sftbench/schedule.py)
        ds_cfg, schedule_steps, schedule_changes, schedule_note = schedule.for_run(
            ds_cfg, args.lr_schedule, max_steps=args.max_steps, epochs=args.epochs, n_train=n_train,
            world_size=world_size, micro_batch=args.micro_batch, grad_accum=args.grad_accum, source=args.ds)
        overrides += schedule_changes
        say(schedule_note)

        # ------------------------------------------------------------ build: model
        ds_layout = describe(ds_cfg)  # ZeRO stage, offload devices (None for --ds none)
        t_build = time.time()
        if ds_layout["zero_stage"] == 3:
            # Construct partitioned: no rank ever holds the whole model (how 2.6B+ fits with ZeRO-3). Through
            # transformers' ZeRO-3 hook, so from_pretrained loads shards into partitions and the model's own init
            # runs on gathered parameters (a bare zero.Init would leave torch's default init on every weight).
            from transformers.integrations import HfDeepSpeedConfig
            _hf_ds = HfDeepSpeedConfig(ds_cfg)  # must stay alive while the model is built
            model = build_model(model_name)
        else:
            with torch.device(device):  # weights created where they will live; no big CPU copy on GPU runs
                model = build_model(model_name)
        config = model.config
        n_params = count_params(config)
        flops_tok = metrics.flops_per_token(config, args.seq_len)
        say(f"model: {model_name}, {n_params / 1e6:.1f}M parameters, built in {time.time() - t_build:.1f}s")

        # Right-padded samples give real tokens identical results under the causal mask alone, which lets
        # SDPA take the flash kernel; padded positions are -100 in the labels, so the loss is the same.
        right_padded = bool((dataset.attention_mask[:, 1:] <= dataset.attention_mask[:, :-1]).all())
        use_pad_mask = args.pad_mask == "always" or not right_padded

        # ------------------------------------------------------------ build: engine
        if compile_target == "blocks":  # in place, before the engine wraps the model: names and hooks stay as they are
            speed.compile_blocks(model, args.compile_mode)
        if args.deepspeed:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_cfg)
            engine_name = "deepspeed"
        else:
            model.to(device)
            engine = PlainEngine(model, device=device, precision=precision, grad_accum=args.grad_accum,
                                 micro_batch=args.micro_batch, lr=args.lr, lr_warmup_steps=args.lr_warmup_steps,
                                 world_size=world_size, lr_schedule=args.lr_schedule, total_steps=schedule_steps)
            engine_name = "torch"
        speed.compile_engine(engine, compile_target, args.compile_mode, args.deepspeed)
        one_pass = speed.apply_one_pass_levers(engine, args.grad_norm, args.overflow_check, device.type == "cuda")
        micro_batch = engine.train_micro_batch_size_per_gpu()
        from sftbench import memory
        model_shape = memory.ModelShape.of_config(config, n_params)

        def run_shape(coalesced: bool) -> "memory.RunShape":
            return memory.RunShape(ds_cfg, world_size, precision, seq_len=args.seq_len, micro_batch=micro_batch,
                                   cuda=device.type == "cuda", flash_attention=not use_pad_mask,
                                   dataset_samples=dataset.n, cuda_graphs=use_graphs, coalesce_reduction=coalesced)

        # auto coalesces only where the full 16-bit gradients the window holds are predicted to fit this GPU
        coalesce_fits = memory.predict(model_shape, run_shape(True), memory.Limits(
            torch.cuda.get_device_properties(device).total_memory / MIB)).fits if device.type == "cuda" else None
        coalesce, coalesce_why = speed.resolve_coalesce(args.coalesce_reduction, engine, device.type == "cuda",
                                                        world_size, coalesce_fits)
        defect = engine_checks.fp16_zero0_scale_defect(engine) if args.deepspeed else None
        warnings = [defect] if defect else []  # into the meta record; the report never recommends such a run
        engine.train()
        grad_accum = engine.gradient_accumulation_steps()
        # The values that ran, into the harness record (None meant "the config's").
        args.grad_accum, args.micro_batch = grad_accum, micro_batch
        if ds_cfg is not None:
            args.lr = peak_lr(ds_cfg)
            args.lr_warmup_steps = (ds_cfg.get("scheduler") or {}).get("params", {}).get("warmup_num_steps")
        steps_per_epoch = sftdata.steps_per_epoch(n_train, micro_batch, world_size, grad_accum)
        if args.epochs is not None:
            max_steps = sftdata.steps_for_epochs(args.epochs, n_train, world_size, micro_batch * grad_accum)
        else:
            max_steps = args.max_steps or steps_per_epoch  # --max-steps 0: one full epoch, its time measured
        identity = {"world_size": world_size, "micro_batch": micro_batch, "grad_accum": grad_accum, "seed": args.seed,
                    "train_samples": n_train, "seq_len": args.seq_len, "engine": engine_name,
                    "eval_split": args.eval_split, "data": str(args.data), "model": model_name}
        if resume_state is not None:
            checkpoint.check_resumable(resume_dir, resume_state, identity, max_steps)
            checkpoint.load_engine_state(engine, resume_dir, is_deepspeed=args.deepspeed, rank=rank)
            say(f"resumed from step {start_step} ({resume_dir})")
        graphs_pool_mib, graph_how = None, graphs.NOT_CAPTURED  # kept if capture fails
        if use_graphs:  # after initialize (ZeRO re-points the weights into its flat buffers) and after any resume
            first = slice(0, micro_batch)  # the first samples' shapes: every micro-batch of the loop has them
            sample = {"input_ids": dataset.input_ids[first].to(device), "labels": dataset.labels[first].to(device),
                      "attention_mask": dataset.attention_mask[first].to(device) if use_pad_mask else None}
            try:
                graphed, graph_how = graphs.graph_engine(engine, sample, args.graph_accum, args.graph_wgrad,
                                                          args.graph_qkv, args.graph_fuse, coalescing=coalesce)
                graphs_pool_mib = graphed.pool_mib
            except graphs.GraphError as e:
                if args.cuda_graphs == "on" or args.graph_fuse == "on":  # asked for by name: an error, not eager
                    raise
                use_graphs, graphs_why = False, f"auto: capture refused, eager ({e})"
                warnings.append(f"CUDA graphs not used: {e}")
        # The default warm-up leaves this process a measured step; args keep what was asked (the harness record).
        warmup_steps, warmup_note = resolve_warmup(args.warmup_steps, max_steps - start_step)
        stats.warmup_steps = warmup_steps
        saver = (checkpoint.Saver(args.save, engine=engine, is_deepspeed=args.deepspeed,
                                  zero_stage=ds_layout["zero_stage"], precision=precision, config=config, tok=tok,
                                  rank=rank, keep=args.save_keep, say=say, overwrite=args.overwrite)
                 if args.save else None)
        evaluator = None
        if eval_rows:
            from sftbench.evaluate import Evaluator
            evaluator = Evaluator(eval_set, eval_rows, rank=rank, world_size=world_size, micro_batch=micro_batch,
                                  device=device, pad_token_id=config.pad_token_id, use_pad_mask=use_pad_mask)
            eval_steps = ({max_steps} |
                          set(sftdata.epoch_end_steps(n_train, world_size, micro_batch * grad_accum, max_steps)))
            if args.eval_every:
                eval_steps |= set(range(args.eval_every, max_steps + 1, args.eval_every))

        # ------------------------------------------------------------ meta record
        gpu_uuid = metrics.cuda_uuid(device.index) if device.type == "cuda" else None
        gpu = metrics.GpuProbe(gpu_uuid)
        host = metrics.HostProbe()
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = metrics.peak_tflops(device_name, precision) if device.type == "cuda" else None

        import psutil
        host_total = psutil.virtual_memory().total / MIB
        multi_node = (where["num_nodes"] or 1) > 1
        predicted = memory.predict(model_shape, run_shape(coalesce),
                                   memory.Limits(gpu.total_mib(), None if multi_node else host_total)).to_json()
        if multi_node:  # one node's RAM holds only its own ranks' share of the job's host memory
            predicted = per_node_prediction(predicted, where["num_nodes"], where["local_world_size"] or 1, host_total)
        import transformers
        log.meta(
            run=Path(run_dir).name, time=t_start, argv=sys.argv, ds_config_path=args.ds if args.deepspeed else None,
            ds_config=ds_cfg, harness=vars(args), model=model_name, n_params=n_params, flops_per_token=flops_tok,
            world_size=world_size, rank=rank, local_rank=local_rank, **where, host=socket.gethostname(),
            pid=os.getpid(),
            device=str(device), device_name=device_name if device.type == "cuda" else None, device_uuid=gpu_uuid,
            gpu_index=gpu.index, peak_tflops=peak, precision=precision, zero_stage=ds_layout["zero_stage"],
            offload_optimizer=ds_layout["offload_optimizer"], offload_param=ds_layout["offload_param"],
            micro_batch=micro_batch, grad_accum=grad_accum, seq_len=args.seq_len, dataset_path=str(args.data),
            dataset_samples=n_train,
            real_tokens=dataset.real_tokens, pad_tokens=dataset.pad_tokens, steps_per_epoch=steps_per_epoch,
            max_steps=max_steps, warmup_steps=warmup_steps,
            optimizations={"engine": engine_name, "attention": "sdpa", "pad_mask": use_pad_mask,
                           "compile": compile_target, "compile_why": compile_why,
                           "compile_mode": args.compile_mode if compile_target != "off" else None,
                           "cuda_graphs": use_graphs, "cuda_graphs_why": graphs_why,
                           "cuda_graphs_pool_mib": graphs_pool_mib, **graph_how, "ds_throughput_timer": timer_why,
                           **one_pass, "coalesce_reduction": coalesce, "coalesce_reduction_why": coalesce_why,
                           "batches_on_device": True},
            predicted=predicted,
            versions={"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                      "deepspeed": deepspeed.__version__ if args.deepspeed else None,
                      "transformers": transformers.__version__},
            git_commit=git_commit(), warnings=warnings, lr=args.lr, overrides=overrides,
            resumed_from={"path": str(resume_dir), "step": start_step} if resume_dir else None,
            eval={"path": args.eval_data, "split": args.eval_split or None, "samples": len(eval_rows),
                  "every": args.eval_every or None} if evaluator else None,
            save_dir=args.save,
            env={**arch_env, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
                 "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_probe_error": gpu.error},
        )
        for change in overrides:
            say(f"override: {change}")
        nodes_txt = f" on {where['num_nodes']} nodes" if multi_node else ""
        say(f"engine: {engine_name}, ZeRO {ds_layout['zero_stage']}, {precision}, world {world_size}{nodes_txt}, "
            f"micro batch {micro_batch}, grad accum {grad_accum}, lr {'-' if args.lr is None else f'{args.lr:g}'}, "
            f"{steps_per_epoch} steps/epoch, {max_steps} steps; log: {run_dir}")
        say(f"speed: compile {compile_target} ({compile_why}); cuda graphs {'on' if use_graphs else 'off'} "
            f"({graphs_why})" + (f", graphs hold {graphs_pool_mib:.0f} MiB; gradients accumulated "
                                 f"{'in the graphs' if graph_how['graph_accum'] else 'by the engine'} "
                                 f"({graph_how['graph_accum_why']}); weight gradients added "
                                 f"{'in the GEMMs' if graph_how['graph_wgrad'] else 'by autograd'} "
                                 f"({graph_how['graph_wgrad_why']}); k/v/q projections "
                                 f"{'in one GEMM' if graph_how['graph_qkv'] else 'one GEMM each'} "
                                 f"({graph_how['graph_qkv_why']}); residual adds "
                                 f"{'fused with dropout and LayerNorm' if graph_how['graph_fuse'] else 'apart'} "
                                 f"({graph_how['graph_fuse_why']})"
                                 if graphs_pool_mib is not None else ""))
        if timer_why:
            say(f"speed: {timer_why}")
        if args.deepspeed:
            say(f"speed: gradient norm "
                f"{'in one multi-tensor kernel' if one_pass['grad_norm'] == 'foreach' else 'by DeepSpeed'} "
                f"({one_pass['grad_norm_why']}); inf/NaN check of the gradients "
                f"{'with one sync' if one_pass['overflow_check'] == 'foreach' else 'by DeepSpeed'} "
                f"({one_pass['overflow_check_why']}); gradients reduced "
                f"{'once per step (coalesce_grad_reduction)' if coalesce else 'as DeepSpeed does'} ({coalesce_why})")
        for w in warnings:
            say(f"warning: {w}")
        if warmup_note:
            say(f"note: {warmup_note}")

        # ------------------------------------------------------------ batches, on the device before the clock starts
        per_step = micro_batch * grad_accum
        need = max_steps * per_step

        rows_t = torch.tensor(train_rows)

        def step_indices(r: int) -> torch.Tensor:
            """Rank r's rows for steps start_step+1 .. max_steps as [steps, grad_accum, micro_batch]; epochs back to
            back so every step has grad_accum full micro-batches, and a resumed run continues the order where its
            checkpoint stopped."""
            idx = sftdata.ShardedOrder(n_train, r, world_size, args.seed).take(need)
            return rows_t[torch.tensor(idx)].view(max_steps, grad_accum, micro_batch)[start_step:]

        idx_t = step_indices(rank)
        dev_ids = dataset.input_ids[idx_t].to(device)
        dev_labels = dataset.labels[idx_t].to(device)
        dev_mask = dataset.attention_mask[idx_t].to(device) if use_pad_mask else None
        # Non-padding tokens of the whole job per step: every rank's order is known here, no collective needed.
        real_per_step = sum(dataset.attention_mask[step_indices(r)].sum(dim=(1, 2, 3))
                            for r in range(world_size)).tolist()
        skipped_before = getattr(engine, "skipped_steps", 0)

        def train_state(done: int) -> dict:
            """What a checkpoint after step ``done`` records besides the engine: the run and its data position."""
            return {"identity": identity, "max_steps": max_steps, "run": Path(run_dir).name,
                    "data_position": {"samples_per_rank": done * per_step,
                                      "epoch": done * per_step / -(-n_train // world_size)}}

        def record(step: int, i: int, step_s: float, loss: float) -> dict:
            """Step ``step`` (0-based; ``i`` in this process) as this rank's log record: throughput, memory, scale."""
            nonlocal skipped_before
            tflops = flops_tok * per_step * args.seq_len / step_s / 1e12
            skipped_now = getattr(engine, "skipped_steps", 0)
            skipped, skipped_before = skipped_now > skipped_before, skipped_now
            if args.deepspeed:
                scale = engine_checks.loss_scale(engine) if precision == "fp16" else None
            else:
                scale = engine.loss_scale()
            cuda = device.type == "cuda"
            return log.step(
                step=step + 1, time=time.time(), elapsed_s=time.perf_counter() - t_loop, step_s=step_s,
                warmup=i < warmup_steps,  # counted from this process's first step (a resumed run warms up again)
                samples_per_s=per_step * world_size / step_s, tokens_per_s=tokens_per_step / step_s,
                real_tokens_per_s=real_per_step[i] / step_s, loss=loss, lr=engine.get_lr()[0],
                loss_scale=scale, skipped=skipped, tflops=tflops, mfu_pct=100.0 * tflops / peak if peak else None,
                gpu_mem_used_mib=gpu.used_mib(),
                torch_peak_alloc_mib=torch.cuda.max_memory_allocated(device) / MIB if cuda else None,
                torch_peak_reserved_mib=torch.cuda.max_memory_reserved(device) / MIB if cuda else None,
                host_rss_mib=host.rss_mib(), host_rss_peak_mib=host.peak_rss_mib(), host_used_mib=host.used_mib(),
            )

        def between_steps(done: int) -> None:
            """After a step's clock stopped: evaluation, checkpoints, and a stop request every rank agreed on."""
            if evaluator is not None and done in eval_steps:
                ev = evaluator.run(engine, is_deepspeed=args.deepspeed)
                log.eval(step=done, epoch=done * per_step / -(-n_train // world_size), time=time.time(), **ev)
                summary_extra["eval_loss"] = ev["eval_loss"]
                say(f"eval step {done}: loss {ev['eval_loss']:.4f} over {ev['eval_tokens']} tokens of "
                    f"{ev['eval_samples']} samples ({ev['eval_s']:.1f}s)")
            if saver is not None and args.save_every and done % args.save_every == 0 and done < max_steps:
                say(f"checkpoint saved to {saver.save(done, train_state(done), final=False)}")
            if stop.agreed(device):
                if saver.last_saved_step != done:
                    say(f"checkpoint saved to {saver.save(done, train_state(done), final=False)}")
                summary_extra["saved"] = {"path": str(saver.root), "step": saver.last_saved_step}
                raise checkpoint.Interrupted(f"terminated by signal {stop.signum or 'on another rank'} after step "
                                             f"{done}; resume with --resume {saver.root}")

        # ------------------------------------------------------------ loop
        tokens_per_step = per_step * args.seq_len * world_size  # whole job
        tty = sys.stdout.isatty()
        sync()
        t_loop = time.perf_counter()
        for step in range(start_step, max_steps):
            i = step - start_step  # this process's step index (the device tensors hold the remaining steps only)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            host.reset_peak()  # the step's own host peak (CPU Adam's and a CPU run's transients), like the GPU's
            sync()
            t0 = time.perf_counter()
            loss_t = train_step(engine, dev_ids[i], dev_labels[i], dev_mask[i] if dev_mask is not None else None,
                                coalesce)
            sync()
            step_s = time.perf_counter() - t0
            rec = record(step, i, step_s, loss_t.item())  # one host read per optimizer step, after the clock stopped
            stats.add(rec)
            if step + 1 == steps_per_epoch and start_step == 0:
                summary_extra["epoch_s_measured"] = rec["elapsed_s"]
            if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == max_steps):
                eta = (max_steps - step - 1) * (metrics.median([r["step_s"] for r in stats.records[-10:]]) or step_s)
                print(step_line(rec, max_steps, eta, bar=tty), flush=True)
            engine_checks.check_finite_update(step + 1, rec["loss"], rec["skipped"], ds_cfg, args.ds)
            between_steps(step + 1)

        # ------------------------------------------------------------ summary
        if saver is not None:
            saver.save(max_steps, train_state(max_steps), final=True)
            summary_extra["saved"] = {"path": str(saver.root), "step": max_steps}
            say(f"model saved to {saver.root} (from_pretrained after `import sftbench`; --resume continues from it)")
        status, error = "ok", None
    except checkpoint.Interrupted as e:
        status, error = "interrupted", str(e)
    except KeyboardInterrupt as e:
        status, error = classify_exception(e)
    except (sftdata.DataError, CheckpointError, checkpoint.ResumeError, schedule.ScheduleError, FileNotFoundError,
            TimeoutError,
            graphs.GraphError, speed.SpeedError, engine_checks.NonFiniteUpdate) as e:
        # Bad input: the message names the file/key/line; a traceback would only bury it.
        status, error = "error", str(e)
    except Exception as e:  # every failure still ends in a summary record, then a non-zero exit
        if not isinstance(e, torch.OutOfMemoryError):  # an OOM's message says it all
            import traceback
            traceback.print_exc()
        status, error = classify_exception(e)  # the rules the sweep follows too (sftbench/failures.py)

    fields = stats.summary_fields(world_size, steps_per_epoch) if steps_per_epoch else {}
    log.summary(status=status, error=error, time=time.time(), wall_s=time.time() - t_start, synthesized=False,
                **fields, **summary_extra)
    log.close()
    if status == "ok":
        s = fields
        gpu_peak = s.get("gpu_mem_used_mib_peak")
        say(f"done: {s['measured_steps']} measured steps, median {s['step_s_median']:.3f} s/it, "
            f"{s['tokens_per_s']:.0f} tok/s, epoch {metrics.epoch_text(summary_extra['epoch_s_measured'], s)}, "
            + (f"peak GPU {gpu_peak:.0f} MiB, " if gpu_peak is not None else "")
            + f"peak RSS {s.get('host_rss_step_peak_mib') or s['host_rss_mib_peak']:.0f} MiB"
            if s.get("step_s_median") is not None else f"done ({stats.no_statistics_reason()})")
        if s.get("step_s_median") is not None and s.get("skipped_steps"):
            say(f"note: {s['skipped_steps']} overflow step(s) skipped their optimizer update and are left out of "
                "the statistics")
    else:
        print(f"error (rank {rank}): run ended with status {status}: {error}", file=sys.stderr, flush=True)
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except (RuntimeError, ValueError):
            pass  # a dead peer can make teardown fail; the summary is already written
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: native destructors of the comm backends can abort (SIGABRT) after a finished run
    # and turn a complete, logged run into a failed exit. Everything is written and flushed by now.
    os._exit(code)
