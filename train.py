#!/usr/bin/env python
"""Supervised fine-tuning with a hand-written DeepSpeed loop, measured step by step.

    deepspeed --num_gpus 3 train.py --ds ds_configs/z2_offload_5e8.json --model pangu-2.6b
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 train.py --ds ds_configs/z3_offload_param.json --model pangu-tiny
    deepspeed --num_gpus 1 train.py --ds none --precision bf16          # plain PyTorch baseline

Reads top to bottom: ``main()`` parses, places this rank (``Placement``), resolves the run (``RunConfig``: the
DeepSpeed config, precision, model, run folder) and the speed levers before anything is built (``plan_levers``), then
``Trainer.__init__`` builds the data, model, engine, the final lever plan, the schedule of steps, the probes, the saver
and the evaluator, and writes the meta record; ``Trainer.train()`` is the loop, ``train_step()`` one optimizer step.
Every rank writes runs/<run>/rank<k>.jsonl (schema: docs/log_schema.md); rank 0 prints. Fine-tuning (--save,
--save-every, --resume, --eval-data/--eval-split, --epochs) is done by sftbench/checkpoint.py and
sftbench/evaluate.py, called between steps.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from sftbench import checkpoint, schedule
from sftbench.args import PLAIN_DEFAULTS, HarnessArgs, parse_args, resolve_warmup, save_config_file
from sftbench.buildenv import prepare_op_builds, rank_device, single_process_env
from sftbench.dsconfig import (DSConfigError, apply_overrides, apply_precision, config_precision, describe,
                               load_ds_config, peak_lr, resolve_auto, resolve_config_path)
from sftbench.failures import classify_exception
from sftbench.fmt import MIB
from sftbench.levers import Asked, LeverError, LeverPlan, decide
from sftbench.nodes import NodeError, per_node_prediction, placement, rank0_value
from sftbench.ops import check_locks as check_build_locks
from sftbench.paths import REPO
from sftbench.report_to import open_sinks
from sftbench.runlog import RunLog
from sftbench.shm import release_own_buffer as release_shm_buffer

# The one import-order constraint: DeepSpeed's op builders read TORCH_CUDA_ARCH_LIST when they are imported, and
# this machine's value ("9.0a" on Hopper) breaks the fused-Adam build; main() fixes it (fix_cuda_arch_list) before
# torch and DeepSpeed are imported, so both are imported inside functions, after the fix.


def train_step(engine, batch: dict, coalesce=False):
    """One optimizer step: ``batch`` holds the step's micro-batches as [GA, micro batch, seq] tensors
    (``input_ids``, ``labels``, and ``attention_mask`` or, packed, ``position_ids`` and ``segment_ids``: the model's
    inputs by ``sftbench.pack.model_inputs``). The engine's three calls per micro-batch, as DeepSpeed is told
    (``engine.step()`` at every micro-batch: DeepSpeed updates only at the accumulation boundary). With ``coalesce``
    (--coalesce-reduction) the micro-batches run inside DeepSpeed's ``engine.coalesce_grad_reduction()`` window,
    which reduces once at its exit, and ``engine.step()`` follows once. Returns the mean micro-batch loss as a device
    tensor, so the caller reads it once, after its clock stopped."""
    from sftbench.pack import model_inputs

    n = batch["input_ids"].shape[0]
    loss_sum = 0.0
    with engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
        for micro in range(n):
            if coalesce:  # step() (which moves the engine's micro-step count) waits until after the window
                engine.set_gradient_accumulation_boundary(micro == n - 1)
            out = engine(**model_inputs({k: v[micro] for k, v in batch.items()}))
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
    real = f" ({rec['real_tokens_per_s']:.0f} real)" if rec.get("real_tokens_per_s") is not None else ""
    return (f"{head}step {done}/{max_steps}{flag} | loss {rec['loss']:.4f} | {rec['step_s']:.3f} s/it | "
            f"{rec['tokens_per_s']:.0f} tok/s{real}{mfu}{mem} | rss {rec['host_rss_mib']:.0f} MiB | eta {eta_s:.0f}s")


def git_commit() -> str | None:
    """The checkout's commit for the meta record (SFTBENCH_GIT_COMMIT for a copy of the tree without its history)."""
    if os.environ.get("SFTBENCH_GIT_COMMIT"):
        return os.environ["SFTBENCH_GIT_COMMIT"]
    try:
        p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


# ==================================================================================================== setup

@dataclass(frozen=True)
class Placement:
    """Where this rank runs: its device, rank and world, and its node (``sftbench.nodes.placement``)."""

    device: object
    on_cpu: bool
    local_rank: int
    rank: int
    world_size: int
    where: dict

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def multi_node(self) -> bool:
        return (self.where["num_nodes"] or 1) > 1


def init_distributed(args: HarnessArgs) -> Placement:
    """Start the process group (DeepSpeed's, or torch's for ``--ds none`` on several ranks) and place this rank."""
    import torch

    if args.deepspeed:
        import deepspeed
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
    return Placement(device, on_cpu, local_rank, rank, world_size, where)


@dataclass(frozen=True)
class RunConfig:
    """The run as resolved before anything is built: the DeepSpeed config with the flags' overrides (None for
    ``--ds none``), the precision that runs, the model, and the run folder."""

    ds_cfg: dict | None
    precision: str
    overrides: list = field(default_factory=list)  # the config keys the flags changed, for the log and the console
    model_name: str = ""
    spec: object = None  # the model seam (sftbench/models): build, tokenizer, shape, blocks, capabilities, save
    run_dir: str = ""

    @property
    def layout(self) -> dict:
        return describe(self.ds_cfg)  # ZeRO stage, offload devices (None for --ds none)


def resolve_run(args: HarnessArgs, place: Placement, ds_cfg: dict | None) -> RunConfig:
    """Precision (the config's block, or the flag; --ds none: bf16 where the GPU has it), the flags' overrides of the
    config, the model (preset, folder or Hub name, checked before any data work) and the run folder (one folder for
    every node). Exits with a message on bad input."""
    import torch

    from sftbench.models.resolve import resolve as resolve_model

    model_name = args.model or ("pangu-tiny" if place.on_cpu else "pangu-350m")
    try:  # before any data work: a longer sample has no position row (an IndexError mid-step)
        spec = resolve_model(model_name, args.tokenizer, args.trust_remote_code)
        spec.check_seq_len(args.seq_len)
    except ValueError as e:  # ModelError, or a mixture-of-experts config
        sys.exit(f"error: {e}")
    overrides: list[str] = []
    if ds_cfg is not None:
        try:
            # a config written for the transformers Trainer: its "auto" values filled in as the Trainer does
            ds_cfg, overrides = resolve_auto(
                ds_cfg, world_size=place.world_size, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                lr=args.lr, lr_warmup_steps=args.lr_warmup_steps, hidden=spec.shape()["hidden"],
                defaults=PLAIN_DEFAULTS,
                precision=args.precision or ("bf16" if place.cuda and torch.cuda.is_bf16_supported() else "fp32"))
            ds_cfg = apply_precision(ds_cfg, args.precision)
            precision = config_precision(ds_cfg)
            ds_cfg, flagged = apply_overrides(ds_cfg, lr=args.lr, grad_accum=args.grad_accum,
                                              micro_batch=args.micro_batch, lr_warmup_steps=args.lr_warmup_steps,
                                              source=args.ds)
        except DSConfigError as e:
            sys.exit(f"error: {e}")
        overrides += flagged
    else:
        precision = args.precision or ("bf16" if place.cuda and torch.cuda.is_bf16_supported() else "fp32")
    if precision == "fp16" and place.on_cpu and args.deepspeed:
        # The plain loop (--ds none) runs fp16 on CPU: torch's CPU autocast and GradScaler have it.
        sys.exit("error: fp16 with DeepSpeed is not supported on CPU (DeepSpeed's CPU accelerator refuses it); use "
                 "--precision bf16 or fp32, or --ds none for the plain PyTorch loop")
    run_dir = args.run_dir or rank0_value(args.default_run_dir(model_name, precision))
    return RunConfig(ds_cfg, precision, overrides, model_name, spec, run_dir)


def plan_levers(args: HarnessArgs, run: RunConfig, place: Placement, engine_facts=None,
                right_padded: bool = True, patches_why: str | None = None) -> LeverPlan:
    """The lever plan for this run (sftbench/levers.py): before the engine exists (``engine_facts`` None: the
    compile target, the CUDA graphs, which need their stream before the model is built, and DeepSpeed's timer) and
    again once it does. LeverError where a lever asked for by name cannot apply."""
    from sftbench import speed

    micro = (run.ds_cfg or {}).get("train_micro_batch_size_per_gpu") or args.micro_batch or 1
    situation = speed.situation(run.ds_cfg, precision=run.precision, world_size=place.world_size,
                                device=place.device, seq_len=args.seq_len, micro_batch=int(micro),
                                spec=run.spec, source=args.ds if args.deepspeed else None,
                                right_padded=right_padded and args.pad_mask == "auto", patches_why=patches_why,
                                engine_facts=engine_facts, grad_checkpointing=args.grad_checkpointing,
                                packed=args.pack)
    return decide(Asked.of(args), situation)


@dataclass
class Schedule:
    """Which optimizer steps this process runs: ``start_step`` (a resumed run's) to ``max_steps``, the epoch's
    length, and the first steps flagged warm-up."""

    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    max_steps: int
    start_step: int
    warmup_steps: int = 0
    warmup_note: str | None = None

    @property
    def per_step(self) -> int:  # samples per rank per step
        return self.micro_batch * self.grad_accum


# ================================================================================================== trainer

class Trainer:
    """One run: ``build()`` builds everything and writes the meta record, ``train()`` runs the loop (``train_step``
    per step), ``finish()`` writes the summary. Every rank makes the same calls in the same order."""

    def __init__(self, args: HarnessArgs, run: RunConfig, place: Placement, plan: LeverPlan, log: RunLog,
                 arch_env: dict):
        from sftbench import metrics

        self.args, self.run, self.place, self.plan, self.log, self.arch_env = args, run, place, plan, log, arch_env
        self.t_start = time.time()
        self.summary_extra: dict = {"epoch_s_measured": None, "eval_loss": None, "saved": None}
        self.stop = checkpoint.StopFlag(saving=bool(args.save))  # with a save folder, a signal ends in a checkpoint
        self.stats = metrics.StepStats(args.warmup_steps, run.precision)
        self.schedule: Schedule | None = None
        self.saver = self.evaluator = None

    def build(self) -> None:
        """Everything the loop needs, in order, then the meta record. Apart from ``__init__`` so that a failure
        part-way still ends in a summary record (``finish``) with what the trainer holds by then."""
        import torch

        torch.manual_seed(self.args.seed)
        # A missing or incomplete --resume folder fails here, before anything is built.
        self.resume_dir, self.resume_state = (checkpoint.resolve(self.args.resume) if self.args.resume
                                              else (None, None))
        self.build_data()
        self.build_lr_schedule()
        self.prepare_resume()
        self.build_model()
        self.build_engine()
        self.build_schedule()
        self.capture_graphs()
        self.build_saver_and_evaluator()
        self.build_probes()
        self.write_meta()
        self.put_batches_on_device()

    def say(self, msg: str) -> None:
        if self.place.rank == 0:
            print(msg, flush=True)

    def sync(self) -> None:
        """Wait for the device to finish queued work, so the clock reads what the step really cost."""
        import torch

        if self.place.cuda:
            torch.cuda.synchronize(self.place.device)

    # ------------------------------------------------------------------------------------------------ build

    def build_data(self) -> None:
        """Tokeniser, the training rows and the evaluation rows (a held-out split or a file)."""
        from sftbench import data as sftdata

        args = self.args
        self.tok = self.run.spec.tokenizer()

        def load(path):
            return sftdata.load_or_build_cache(path, self.tok, args.seq_len, args.cache_dir,
                                               mask_prompt=args.mask_prompt, strict=args.strict_data,
                                               local_rank=self.place.local_rank)
        self.dataset = load(args.data)
        self.train_rows, self.eval_set, self.eval_rows = sftdata.training_and_eval_rows(
            self.dataset, args.eval_data, args.eval_split, args.seed, load)
        d, self.n_samples = self.dataset, len(self.train_rows)
        self.say(f"data: {d.n} samples from {args.data} ({'cache hit' if d.cache_hit else 'tokenised'}), "
                 f"{d.real_tokens} real + {d.pad_tokens} padding tokens"
                 + (f"; eval: {len(self.eval_rows)} samples "
                    f"({args.eval_data or f'{args.eval_split:g} of the training file'})" if self.eval_rows else ""))
        self.packed = self.pack_rows() if args.pack else None
        self.source = d if self.packed is None else self.packed  # where the loop's rows come from (train_rows)
        self.n_train = len(self.train_rows)
        # Right-padded samples give real tokens identical results under the causal mask alone, which lets SDPA
        # take the flash kernel; padded positions are -100 in the labels, so the loss is the same.
        self.right_padded = bool((d.attention_mask[:, 1:] <= d.attention_mask[:, :-1]).all())

    def pack_rows(self):
        """--pack: the training samples packed into rows (sftbench/pack.py), which then take the samples' place
        in the data order and the epochs (evaluation stays one sample per row)."""
        from sftbench import pack

        d = self.dataset
        p = pack.pack(d.lengths.tolist(), self.train_rows, self.args.seq_len)
        self.say(f"packed: {self.n_samples} samples into {p.n} rows of {self.args.seq_len} tokens, "
                 f"{100 * p.real_share:.1f}% real tokens (one sample per row: {100 * p.unpacked_share:.1f}%)")
        packed = pack.PackedSet(d, p, self.tok.pad_id)
        self.train_rows = list(range(packed.n))
        return packed

    def build_lr_schedule(self) -> None:
        """--lr-schedule over the run's length, known now that the data is (sftbench/schedule.py); before the engine,
        whose scheduler's length is fixed in the config."""
        args, run = self.args, self.run
        ds_cfg, self.schedule_steps, changes, note = schedule.for_run(
            run.ds_cfg, args.lr_schedule, max_steps=args.max_steps, epochs=args.epochs, n_train=self.n_train,
            world_size=self.place.world_size, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
            source=args.ds)
        self.run = replace(run, ds_cfg=ds_cfg, overrides=run.overrides + changes)
        self.say(note)

    def prepare_resume(self) -> None:
        """A resume on another number of ranks than its checkpoint's: refused unless each step keeps its size
        (before anything is built), else the checkpoint converted once into DeepSpeed's universal form and the
        engine told to load that (``checkpoint.load_universal``)."""
        self.universal = None
        if self.resume_state is None or not checkpoint.reshards(self.resume_state, self.place.world_size):
            return
        world = self.place.world_size
        micro, ga = schedule.batch_shape(self.run.ds_cfg, world) if self.run.ds_cfg is not None else (1, 1)
        checkpoint.check_reshard(self.resume_dir, self.resume_state, world, micro, ga)
        failed = None
        if self.place.rank == 0:  # one conversion for the job (the folder is on a filesystem every rank reads)
            try:
                checkpoint.make_universal(self.resume_dir, self.say)
            except checkpoint.ResumeError as e:
                failed = str(e)
        failed = rank0_value(failed)  # every rank fails alike, none waits on a rank that stopped
        if failed:
            raise checkpoint.ResumeError(failed)
        self.universal = checkpoint.universal_dir(self.resume_dir)
        ds_cfg = {**self.run.ds_cfg, "checkpoint": {**self.run.ds_cfg.get("checkpoint", {}), "load_universal": True}}
        self.run = replace(self.run, ds_cfg=ds_cfg, overrides=self.run.overrides + [
            f"checkpoint.load_universal: true (resuming {self.resume_state['identity']['world_size']}-rank "
            f"checkpoint on {world} ranks)"])

    def build_model(self) -> None:
        """The model, where its weights will live. ZeRO-3 constructs it partitioned, so no rank ever holds the
        whole model (how 2.6B+ fits): through transformers' ZeRO-3 hook, so from_pretrained loads shards into
        partitions and the model's own init runs on gathered parameters (a bare zero.Init would leave torch's
        default init on every weight)."""
        import torch

        spec, t = self.run.spec, time.time()
        if self.run.layout["zero_stage"] == 3:
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds = HfDeepSpeedConfig(self.run.ds_cfg)  # must stay alive while the model is built
            self.model = spec.build()
        else:
            with torch.device(self.place.device):  # weights created where they will live: no big CPU copy on GPUs
                self.model = spec.build()
        if self.args.grad_checkpointing:
            spec.enable_grad_checkpointing(self.model)
        self.fused_found = {}
        if self.plan.on("fused_kernels"):  # before the engine wraps the model: its modules' forwards rebound
            from sftbench import fused
            what = fused.apply_liger(self.model)
            self.fused_found = {"fused_kernels_why": f"{self.plan.why('fused_kernels')}; {what}"}
            self.say(f"fused kernels: {what}")
        self.config = self.model.config
        self.n_params = spec.count_params(self.model)  # the built model's (ZeRO-3: its partitions' full sizes)
        self.flops_tok = spec.flops_per_token(self.config, self.args.seq_len)
        self.say(f"model: {self.run.model_name}, {self.n_params / 1e6:.1f}M parameters, built in "
                 f"{time.time() - t:.1f}s" + ("; RANDOM WEIGHTS (a preset: for benchmarking, not a model to keep)"
                                              if spec.random_weights else ""))

    def build_engine(self) -> None:
        """DeepSpeed's engine (or the plain loop's), then the lever plan again with what DeepSpeed built, and the
        patches it turns on."""
        from sftbench import ds_patches, engine_checks, speed
        from sftbench.plain import PlainEngine, param_groups

        args, run, plan = self.args, self.run, self.plan
        compile_target = plan["compile"].value
        if compile_target == "blocks":  # in place, before the engine wraps the model: names and hooks stay
            speed.compile_blocks(run.spec.blocks(self.model), args.compile_mode)
        if args.deepspeed:
            import deepspeed
            self.engine, *_ = deepspeed.initialize(model=self.model, model_parameters=param_groups(self.model),
                                                   config=run.ds_cfg)
            self.engine_name = "deepspeed"
        else:
            self.model.to(self.place.device)
            self.engine = PlainEngine(self.model, device=self.place.device, precision=run.precision,
                                      grad_accum=args.grad_accum, micro_batch=args.micro_batch, lr=args.lr,
                                      lr_warmup_steps=args.lr_warmup_steps, world_size=self.place.world_size,
                                      lr_schedule=args.lr_schedule, total_steps=self.schedule_steps)
            self.engine_name = "torch"
        speed.compile_engine(self.engine, compile_target, args.compile_mode, args.deepspeed)
        patches_why = ds_patches.patches_why() if args.deepspeed else None
        self.plan = plan_levers(args, run, self.place, ds_patches.engine_facts(self.engine), self.right_padded,
                                patches_why)
        if args.deepspeed:
            ds_patches.apply(self.engine, self.plan)
        defect = engine_checks.fp16_zero0_scale_defect(self.engine) if args.deepspeed else None
        self.warnings = [w for w in (defect, patches_why and f"speed levers: {patches_why}") if w]
        if args.save and run.spec.random_weights:
            self.warnings.append(f"--save: {run.model_name} is a preset with RANDOM weights; the saved model is a "
                                 "benchmark artefact, not a fine-tuned pretrained model (give a model folder or Hub "
                                 "name)")
        self.engine.train()

    def build_schedule(self) -> None:
        """The steps to run, read back from the engine (micro batch, accumulation), and a resume's state loaded."""
        from sftbench import data as sftdata
        from sftbench import ds_patches

        args, eng, world = self.args, self.engine, self.place.world_size
        micro, ga = eng.train_micro_batch_size_per_gpu(), eng.gradient_accumulation_steps()
        if self.run.ds_cfg is not None and (taken := ds_patches.accumulation_taken_by(
                eng, self.run.ds_cfg.get("gradient_accumulation_steps"))):
            self.warnings.append(f"{taken}; a step here is {ga} micro-batches")
        # The values that ran, into the harness record (None meant "the config's").
        args.grad_accum, args.micro_batch = ga, micro
        if self.run.ds_cfg is not None:
            args.lr = peak_lr(self.run.ds_cfg)
            args.lr_warmup_steps = (self.run.ds_cfg.get("scheduler") or {}).get("params", {}).get("warmup_num_steps")
        per_epoch = sftdata.steps_per_epoch(self.n_train, micro, world, ga)  # packed: over the rows
        self.unpacked_per_epoch = sftdata.steps_per_epoch(self.n_samples, micro, world, ga)
        if args.epochs is not None:
            max_steps = sftdata.steps_for_epochs(args.epochs, self.n_train, world, micro * ga)
        else:
            max_steps = args.max_steps or per_epoch  # --max-steps 0: one full epoch, its time measured
        start = self.resume_state["step"] if self.resume_state else 0
        self.schedule = s = Schedule(micro, ga, per_epoch, max_steps, start)
        self.identity = {"world_size": world, "micro_batch": micro, "grad_accum": ga, "seed": args.seed,
                         "train_samples": self.n_samples, "seq_len": args.seq_len, "engine": self.engine_name,
                         "eval_split": args.eval_split, "data": str(args.data), "model": self.run.model_name}
        if self.packed is not None:  # only then: an unpacked checkpoint of before --pack has no such key
            self.identity["packed_rows"] = self.packed.n
        if self.resume_state is not None:
            checkpoint.check_resumable(self.resume_dir, self.resume_state, self.identity, max_steps)
            checkpoint.load_engine_state(eng, self.resume_dir, is_deepspeed=args.deepspeed, rank=self.place.rank,
                                         universal=self.universal is not None, seed=args.seed)
            saved_world = self.resume_state["identity"]["world_size"]
            self.say(f"resumed from step {start} ({self.resume_dir})" + (
                f", written on {saved_world} rank(s), on {world} through {self.universal}" if self.universal else ""))
        self.data_start = self.resumed_position() if self.resume_state is not None else 0
        # The default warm-up leaves this process a measured step; args keep what was asked (the harness record).
        s.warmup_steps, s.warmup_note = resolve_warmup(args.warmup_steps, max_steps - start)
        self.stats.warmup_steps = s.warmup_steps

    def capture_graphs(self) -> None:
        """The micro-batch as CUDA graphs where the plan says so: after initialize (ZeRO re-points the weights into
        its flat buffers) and any resume, on the first samples' shapes (every micro-batch of the loop has them)."""
        from sftbench import graphs

        self.graphs_pool_mib, self.graph_found = None, {}
        if not self.plan.on("cuda_graphs"):
            return
        from sftbench import pack

        dev, mb = self.place.device, self.schedule.micro_batch
        sample = pack.model_inputs({k: getattr(self.source, k)[:mb].to(dev) for k in self.batch_keys()})
        try:
            graphed, self.graph_found = graphs.graph_engine(self.engine, sample, self.plan)
            self.graphs_pool_mib = graphed.pool_mib
        except graphs.GraphError as e:
            if self.args.cuda_graphs == "on" or self.args.graph_fuse == "on":  # asked for by name: an error
                raise
            why = f"auto: capture refused, eager ({e})"
            self.plan = _with(self.plan, cuda_graphs=(False, why))
            self.warnings.append(f"CUDA graphs not used: {e}")

    def build_saver_and_evaluator(self) -> None:
        from sftbench import data as sftdata

        args, s, place = self.args, self.schedule, self.place
        if args.save:
            self.saver = checkpoint.Saver(args.save, engine=self.engine, is_deepspeed=args.deepspeed,
                                          zero_stage=self.run.layout["zero_stage"], precision=self.run.precision,
                                          config=self.config, tok=self.tok, rank=place.rank, keep=args.save_keep,
                                          say=self.say, write_folder=self.run.spec.write_folder,
                                          overwrite=args.overwrite)
        if self.eval_rows:
            from sftbench.evaluate import Evaluator
            self.evaluator = Evaluator(self.eval_set, self.eval_rows, rank=place.rank, world_size=place.world_size,
                                       micro_batch=s.micro_batch, device=place.device,
                                       pad_token_id=self.run.spec.loss_pad_id(self.config),
                                       use_pad_mask=self.plan.on("pad_mask"))
            self.eval_steps = ({s.max_steps} | set(sftdata.epoch_end_steps(self.n_train, place.world_size, s.per_step,
                                                                           s.max_steps)))
            if args.eval_every:
                self.eval_steps |= set(range(args.eval_every, s.max_steps + 1, args.eval_every))

    def build_probes(self) -> None:
        """NVML for the GPU (as nvidia-smi shows it), psutil for the host, the GPU's peak FLOPS for MFU."""
        import torch

        from sftbench import metrics

        cuda, dev = self.place.cuda, self.place.device
        self.gpu_uuid = metrics.cuda_uuid(dev.index) if cuda else None
        self.gpu = metrics.GpuProbe(self.gpu_uuid)
        self.host = metrics.HostProbe()
        self.device_name = torch.cuda.get_device_name(dev) if cuda else "cpu"
        self.peak = metrics.peak_tflops(self.device_name, self.run.precision) if cuda else None

    def write_meta(self) -> None:
        """The meta record (one function builds it from the objects above) and the start-up lines."""
        self.log.meta(**meta_record(self))
        s, run, place = self.schedule, self.run, self.place
        for change in run.overrides:
            self.say(f"override: {change}")
        nodes_txt = f" on {place.where['num_nodes']} nodes" if place.multi_node else ""
        lr = "-" if self.args.lr is None else f"{self.args.lr:g}"
        packed = f" (packed; {self.unpacked_per_epoch} unpacked)" if self.packed is not None else ""
        self.say(f"engine: {self.engine_name}, ZeRO {run.layout['zero_stage']}, {run.precision}, world "
                 f"{place.world_size}{nodes_txt}, micro batch {s.micro_batch}, grad accum {s.grad_accum}, lr {lr}, "
                 f"{s.steps_per_epoch} steps/epoch{packed}, {s.max_steps} steps; log: {run.run_dir}")
        pool = f"; the graphs hold {self.graphs_pool_mib:.0f} MiB" if self.graphs_pool_mib is not None else ""
        self.say(f"speed levers (--help-all; docs/performance.md){pool}:")
        for line in self.plan.table():
            self.say(line)
        for w in self.warnings:
            self.say(f"warning: {w}")
        if s.warmup_note:
            self.say(f"note: {s.warmup_note}")

    def resumed_position(self) -> int:
        """Where in the job's sample stream (``ShardedOrder.take``) the resumed run starts: the checkpoint's own
        position (or, written before positions were stored, its step x its step's samples), moved to this world
        size's stream when the number of ranks changed."""
        from sftbench import data as sftdata

        saved = self.resume_state["identity"]
        pos = self.resume_state.get("data_position", {}).get("stream_position")
        if pos is None:
            pos = self.resume_state["step"] * checkpoint.samples_per_step(saved)
        if not checkpoint.reshards(self.resume_state, self.place.world_size):
            return pos
        return sftdata.ShardedOrder(self.n_train, 0, self.place.world_size, self.args.seed).continue_from(
            pos, saved["world_size"])

    def put_batches_on_device(self) -> None:
        """Every step's micro-batches of this rank, on the device before the clock starts: rank r's rows for steps
        start_step+1 .. max_steps as [steps, grad_accum, micro_batch]; epochs back to back so every step has
        grad_accum full micro-batches, and a resumed run continues the order where its checkpoint stopped."""
        import torch

        from sftbench import data as sftdata

        s, src, world, dev = self.schedule, self.source, self.place.world_size, self.place.device
        rows_t = torch.tensor(self.train_rows)

        def indices(r: int) -> torch.Tensor:
            left = s.max_steps - s.start_step
            idx = sftdata.ShardedOrder(self.n_train, r, world, self.args.seed).take(left * s.per_step,
                                                                                     start=self.data_start)
            return rows_t[torch.tensor(idx)].view(left, s.grad_accum, s.micro_batch)

        idx = indices(self.place.rank)
        self.batches = {k: getattr(src, k)[idx].to(dev) for k in self.batch_keys()}
        # Non-padding tokens of the whole job per step: every rank's order is known here, no collective needed.
        self.real_per_step = sum(src.attention_mask[indices(r)].sum(dim=(1, 2, 3)) for r in range(world)).tolist()
        self.skipped_before = getattr(self.engine, "skipped_steps", 0)
        self.tokens_per_step = s.per_step * self.args.seq_len * world  # whole job

    def batch_keys(self) -> tuple[str, ...]:
        """The tensors each micro-batch holds on the device (``sftbench.pack.model_inputs`` makes the model's)."""
        from sftbench import pack

        if self.packed is not None:
            return ("input_ids", "labels", *pack.PACKED_KEYS)
        return ("input_ids", "labels", "attention_mask") if self.plan.on("pad_mask") else ("input_ids", "labels")

    # ------------------------------------------------------------------------------------------------ the loop

    def train(self) -> None:
        """The loop: each step timed between two device syncs, logged, then evaluation and checkpoints."""
        import torch

        from sftbench import engine_checks, metrics

        s, args, cuda = self.schedule, self.args, self.place.cuda
        tty = sys.stdout.isatty()
        self.sync()
        self.t_loop = time.perf_counter()
        for step in range(s.start_step, s.max_steps):
            i = step - s.start_step  # this process's step index (the device tensors hold the remaining steps only)
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.place.device)
            self.host.reset_peak()  # the step's own host peak (CPU Adam's and a CPU run's transients), like the GPU's
            self.sync()
            t0 = time.perf_counter()
            loss_t = train_step(self.engine, {k: v[i] for k, v in self.batches.items()},
                                self.plan.on("coalesce_reduction"))
            self.sync()
            step_s = time.perf_counter() - t0
            rec = self.record(step, i, step_s, loss_t.item())  # one host read per step, after the clock stopped
            self.stats.add(rec)
            if step + 1 == s.steps_per_epoch and s.start_step == 0:
                self.summary_extra["epoch_s_measured"] = rec["elapsed_s"]
            if self.place.rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == s.max_steps):
                recent = metrics.median([r["step_s"] for r in self.stats.records[-10:]]) or step_s
                print(step_line(rec, s.max_steps, (s.max_steps - step - 1) * recent, bar=tty), flush=True)
            engine_checks.check_finite_update(step + 1, rec["loss"], rec["skipped"], self.run.ds_cfg, args.ds)
            self.between_steps(step + 1)
        if self.saver is not None:
            self.saver.save(s.max_steps, self.train_state(s.max_steps), final=True)
            self.summary_extra["saved"] = {"path": str(self.saver.root), "step": s.max_steps}
            after = " after `import sftbench`" if self.run.spec.family == "pangu" else ""
            self.say(f"model saved to {self.saver.root} (from_pretrained{after}; --resume continues from it)")

    def record(self, step: int, i: int, step_s: float, loss: float) -> dict:
        """Step ``step`` (0-based; ``i`` in this process) as this rank's log record: throughput, memory, scale."""
        import torch

        from sftbench import engine_checks

        s, dev, cuda, eng = self.schedule, self.place.device, self.place.cuda, self.engine
        tflops = self.flops_tok * s.per_step * self.args.seq_len / step_s / 1e12
        skipped_now = getattr(eng, "skipped_steps", 0)
        skipped, self.skipped_before = skipped_now > self.skipped_before, skipped_now
        if self.args.deepspeed:
            scale = engine_checks.loss_scale(eng) if self.run.precision == "fp16" else None
        else:
            scale = eng.loss_scale()
        return self.log.step(
            step=step + 1, time=time.time(), elapsed_s=time.perf_counter() - self.t_loop, step_s=step_s,
            warmup=i < s.warmup_steps,  # counted from this process's first step (a resumed run warms up again)
            samples_per_s=s.per_step * self.place.world_size / step_s, tokens_per_s=self.tokens_per_step / step_s,
            real_tokens_per_s=self.real_per_step[i] / step_s, loss=loss, lr=eng.get_lr()[0],
            loss_scale=scale, skipped=skipped, tflops=tflops, mfu_pct=100.0 * tflops / self.peak if self.peak else None,
            gpu_mem_used_mib=self.gpu.used_mib(),
            torch_peak_alloc_mib=torch.cuda.max_memory_allocated(dev) / MIB if cuda else None,
            torch_peak_reserved_mib=torch.cuda.max_memory_reserved(dev) / MIB if cuda else None,
            host_rss_mib=self.host.rss_mib(), host_rss_peak_mib=self.host.peak_rss_mib(),
            host_used_mib=self.host.used_mib(),
        )

    def train_state(self, done: int) -> dict:
        """What a checkpoint after step ``done`` records besides the engine: the run and its data position."""
        s, world = self.schedule, self.place.world_size
        unit = "samples_per_rank" if self.packed is None else "packed_rows_per_rank"
        # stream_position: where the next step's samples start in the job's order (ShardedOrder.take), which a
        # resume on any number of ranks continues from
        position = self.data_start + (done - s.start_step) * s.per_step * world
        return {"identity": self.identity, "max_steps": s.max_steps, "run": Path(self.run.run_dir).name,
                "data_position": {unit: done * s.per_step, "stream_position": position,
                                  "epoch": position / (-(-self.n_train // world) * world)}}

    def between_steps(self, done: int) -> None:
        """After a step's clock stopped: evaluation, checkpoints, and a stop request every rank agreed on."""
        s, saver = self.schedule, self.saver
        if self.evaluator is not None and done in self.eval_steps:
            ev = self.evaluator.run(self.engine, is_deepspeed=self.args.deepspeed)
            epoch = done * s.per_step / -(-self.n_train // self.place.world_size)
            self.log.eval(step=done, epoch=epoch, time=time.time(), **ev)
            self.summary_extra["eval_loss"] = ev["eval_loss"]
            self.say(f"eval step {done}: loss {ev['eval_loss']:.4f} over {ev['eval_tokens']} tokens of "
                     f"{ev['eval_samples']} samples ({ev['eval_s']:.1f}s)")
        if saver is not None and self.args.save_every and done % self.args.save_every == 0 and done < s.max_steps:
            self.say(f"checkpoint saved to {saver.save(done, self.train_state(done), final=False)}")
        if self.stop.agreed(self.place.device):
            if saver.last_saved_step != done:
                self.say(f"checkpoint saved to {saver.save(done, self.train_state(done), final=False)}")
            self.summary_extra["saved"] = {"path": str(saver.root), "step": saver.last_saved_step}
            raise checkpoint.Interrupted(f"terminated by signal {self.stop.signum or 'on another rank'} after step "
                                         f"{done}; resume with --resume {saver.root}")


def _with(plan: LeverPlan, **changes: tuple[bool, str]) -> LeverPlan:
    """The plan with some levers' decisions replaced (a capture refused at run time)."""
    from sftbench.levers import Decision

    return replace(plan, decisions=tuple((n, Decision(*changes[n]) if n in changes else d) for n, d in plan.decisions))


def meta_record(t: Trainer) -> dict:
    """The meta record's fields (docs/log_schema.md), from the trainer's objects."""
    import psutil
    import torch
    import transformers

    from sftbench import data as sftdata
    from sftbench import memory
    from sftbench import pack as sftpack

    args, run, place, s = t.args, t.run, t.place, t.schedule
    shape = memory.ModelShape.of(run.spec.shape_of(t.config, t.n_params))
    host_total = psutil.virtual_memory().total / MIB
    run_shape = memory.RunShape(run.ds_cfg, place.world_size, run.precision, seq_len=args.seq_len,
                                micro_batch=s.micro_batch, cuda=place.cuda, flash_attention=not t.plan.on("pad_mask"),
                                dataset_samples=t.dataset.n, cuda_graphs=t.plan.on("cuda_graphs"),
                                coalesce_reduction=t.plan.on("coalesce_reduction"),
                                grad_checkpointing=args.grad_checkpointing)
    predicted = memory.predict(shape, run_shape, memory.Limits(t.gpu.total_mib(),
                                                               None if place.multi_node else host_total)).to_json()
    if place.multi_node:  # one node's RAM holds only its own ranks' share of the job's host memory
        predicted = per_node_prediction(predicted, place.where["num_nodes"], place.where["local_world_size"] or 1,
                                        host_total)
    layout = run.layout
    deepspeed_version = None
    if args.deepspeed:
        import deepspeed
        deepspeed_version = deepspeed.__version__
    optimizations = {"engine": t.engine_name, "attention": "sdpa", **t.plan.to_log(), **t.graph_found, **t.fused_found,
                     "compile_mode": args.compile_mode if t.plan["compile"].on else None,
                     "cuda_graphs_pool_mib": t.graphs_pool_mib, "batches_on_device": True}
    return dict(
        run=Path(run.run_dir).name, time=t.t_start, argv=sys.argv, ds_config_path=args.ds if args.deepspeed else None,
        ds_config=run.ds_cfg, harness=vars(args), model=run.model_name, n_params=t.n_params,
        flops_per_token=t.flops_tok, world_size=place.world_size, rank=place.rank, local_rank=place.local_rank,
        **place.where, host=socket.gethostname(), pid=os.getpid(), device=str(place.device),
        device_name=t.device_name if place.cuda else None, device_uuid=t.gpu_uuid, gpu_index=t.gpu.index,
        peak_tflops=t.peak, precision=run.precision, zero_stage=layout["zero_stage"],
        offload_optimizer=layout["offload_optimizer"], offload_param=layout["offload_param"],
        micro_batch=s.micro_batch, grad_accum=s.grad_accum, seq_len=args.seq_len, dataset_path=str(args.data),
        dataset_samples=t.n_samples, real_tokens=t.dataset.real_tokens, pad_tokens=t.dataset.pad_tokens,
        steps_per_epoch=s.steps_per_epoch, max_steps=s.max_steps, warmup_steps=s.warmup_steps,
        optimizations=optimizations, predicted=predicted,
        versions={"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "deepspeed": deepspeed_version, "transformers": transformers.__version__},
        git_commit=git_commit(), warnings=t.warnings, lr=args.lr, overrides=run.overrides,
        resumed_from={"path": str(t.resume_dir), "step": s.start_step,
                      "world_size": t.resume_state["identity"]["world_size"],
                      "universal": str(t.universal) if t.universal else None} if t.resume_dir else None,
        eval={"path": args.eval_data, "split": args.eval_split or None, "samples": len(t.eval_rows),
              "every": args.eval_every or None} if t.evaluator else None,
        save_dir=args.save, model_info=run.spec.describe(), model_weights=run.spec.describe()["weights"],
        sample_layout=sftdata.sample_layout(t.tok).to_json(),
        packing=(t.packed.to_log(t.unpacked_per_epoch) if t.packed is not None
                 else sftpack.unpacked_log(t.dataset, t.train_rows, s.steps_per_epoch)),
        env={**t.arch_env, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
             "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_probe_error": t.gpu.error},
    )


# ===================================================================================================== main

def finish(trainer: Trainer, status: str, error: str | None) -> int:
    """The summary record (every run ends in one), rank 0's last line, and the process group's teardown."""
    import torch

    from sftbench import metrics

    s, stats, extra, place, log = trainer.schedule, trainer.stats, trainer.summary_extra, trainer.place, trainer.log
    fields = stats.summary_fields(place.world_size, s.steps_per_epoch) if s else {}
    log.summary(status=status, error=error, time=time.time(), wall_s=time.time() - trainer.t_start,
                synthesized=False, **fields, **extra)
    log.close()
    if status != "ok":
        print(f"error (rank {place.rank}): run ended with status {status}: {error}", file=sys.stderr, flush=True)
    elif place.rank == 0 and fields.get("step_s_median") is not None:
        gpu_peak = fields.get("gpu_mem_used_mib_peak")
        print(f"done: {fields['measured_steps']} measured steps, median {fields['step_s_median']:.3f} s/it, "
              f"{fields['tokens_per_s']:.0f} tok/s ({fields['real_tokens_per_s']:.0f} real), "
              f"epoch {metrics.epoch_text(extra['epoch_s_measured'], fields)}, "
              + (f"peak GPU {gpu_peak:.0f} MiB, " if gpu_peak is not None else "")
              + f"peak RSS {fields.get('host_rss_step_peak_mib') or fields['host_rss_mib_peak']:.0f} MiB", flush=True)
        if fields.get("skipped_steps"):
            print(f"note: {fields['skipped_steps']} overflow step(s) skipped their optimizer update and are left out "
                  "of the statistics", flush=True)
    elif place.rank == 0:
        print(f"done ({stats.no_statistics_reason()})", flush=True)
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except (RuntimeError, ValueError):
            pass  # a dead peer can make teardown fail; the summary is already written
    return 0 if status == "ok" else 1


def load_config(args: HarnessArgs) -> dict | None:
    """The DeepSpeed config (None for --ds none), read before anything starts: a bad file stops here."""
    if not args.deepspeed:
        return None
    try:
        args.ds = resolve_config_path(args.ds or "z1")  # a file, or a ds_configs/ name as the sweep takes it
        return load_ds_config(args.ds)
    except DSConfigError as e:
        sys.exit(f"error: {e}")


def main() -> int:
    args = parse_args()
    try:  # before anything is built or trained: a re-run must not replace a saved model (sftbench/checkpoint.py)
        checkpoint.check_save_target(args.save, args.resume, args.overwrite)
    except checkpoint.SaveTargetError as e:
        sys.exit(f"error: {e}")
    arch_env = prepare_op_builds()  # before anything imports DeepSpeed's op builders
    ds_cfg = load_config(args)
    import torch  # after the arch-list fix on purpose (the import-order note above)

    from sftbench import data as sftdata
    from sftbench import engine_checks, graphs, speed
    from sftbench.models.spec import ModelError

    if args.deepspeed:
        engine_checks.silence_startup_noise()  # before initialize, whose scheduler start-up message says nothing
    place = init_distributed(args)
    run = resolve_run(args, place, ds_cfg)
    try:  # before the model and engine exist: with graphs on, they are built on the capture stream
        plan = plan_levers(args, run, place)
    except LeverError as e:
        sys.exit(f"error: {e}")
    graphs.prepare(plan, place.device)
    run = replace(run, ds_cfg=speed.apply_timer(run.ds_cfg, plan))
    if place.rank == 0:
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        save_config_file(args, run.run_dir)  # --config: the run folder names every flag it was given
    log = RunLog(run.run_dir, place.rank, sinks=open_sinks(args.report_to, run.run_dir, place.rank))
    trainer = Trainer(args, run, place, plan, log, arch_env)
    try:
        trainer.build()
        trainer.train()
        status, error = "ok", None
    except checkpoint.Interrupted as e:
        status, error = "interrupted", str(e)
    except KeyboardInterrupt as e:
        status, error = classify_exception(e)
    except (sftdata.DataError, ModelError, checkpoint.ResumeError, schedule.ScheduleError, FileNotFoundError,
            TimeoutError, graphs.GraphError, LeverError, engine_checks.NonFiniteUpdate) as e:
        # Bad input: the message names the file/key/line; a traceback would only bury it.
        status, error = "error", str(e)
    except Exception as e:  # every failure still ends in a summary record, then a non-zero exit
        if not isinstance(e, torch.OutOfMemoryError):  # an OOM's message says it all
            import traceback
            traceback.print_exc()
        status, error = classify_exception(e)  # the rules the sweep follows too (sftbench/failures.py)
    return finish(trainer, status, error)


def stop_child_processes(wait_s: float = 10.0) -> None:
    """Stop the processes this one started through multiprocessing (DeepSpeed's ZenFlow with overlap_step runs its
    CPU optimizer in one, a daemon): os._exit skips the interpreter's exit handlers that would stop them, and left
    running they hold the host memory of the optimizer state and the launcher's output pipes (the job would not
    end for whoever reads them)."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(wait_s)
        if child.is_alive():
            child.kill()
            child.join(wait_s)


if __name__ == "__main__":
    code = main()
    stop_child_processes()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: native destructors of the comm backends can abort (SIGABRT) after a finished run
    # and turn a complete, logged run into a failed exit. Everything is written and flushed by now.
    os._exit(code)
