#!/usr/bin/env python
"""Peer benchmark: the transformers ``Trainer`` with DeepSpeed (how the reference table was produced), on
sftbench's Pangu-α model and batches.

    deepspeed --num_gpus 1 bench/peer_trainer.py --ds ds_configs/z1.json --model pangu-350m --steps 20 \\
        --warmup-steps 3 --out peer_trainer.json
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 bench/peer_trainer.py --ds ds_configs/z1.json --model pangu-tiny \\
        --seq-len 64 --steps 3 --warmup-steps 1

As a Trainer user runs it: ``TrainingArguments(deepspeed=<the same JSON as train.py's, as a dict>,
per_device_train_batch_size=1, gradient_accumulation_steps=8, bf16=True, max_steps, lr 1e-5, weight decay 0.01,
betas 0.9/0.95, max_grad_norm 1.0, warmup_steps, logging_steps=1, save_strategy="no", ...)`` and ``Trainer.train()``.
The Trainer checks the DeepSpeed JSON against these arguments and refuses any mismatch, so they are read from the
JSON (micro batch, accumulation, clipping, the optimizer block's lr / betas / eps / weight decay, the WarmupLR
block's warm-up steps, bf16/fp16); the JSON is used unchanged (its optimizer and scheduler blocks stay: DeepSpeed
builds both, as for train.py). ``--precision`` rewrites its fp16/bf16 blocks the way train.py does.

The same data as train.py: the tokenizer, file and cache (``sftbench.data.load_or_build_cache``), and the sample
order (``ShardedOrder(n, rank, world, seed)`` epochs back to back) through a sampler that replaces the Trainer's
shuffling one; the samples carry ``attention_mask``, as Trainer users pass it.

Timing: a ``TrainerCallback``; a step is ``on_step_begin`` -> ``on_step_end`` (``torch.cuda.synchronize()`` before each
clock read), and the period is the time between consecutive ``on_step_end`` calls (the Trainer's per-step logging and
batch fetching included). Same result fields as bench/peer_torch.py; ``--out FILE.json`` writes them (rank 0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for sftbench
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftbench.paths import BENCH_DATA, REPO, SAMPLE_DATA  # noqa: E402
from sftbench.buildenv import prepare_op_builds, rank_device  # noqa: E402

prepare_op_builds()  # before DeepSpeed's op builders are imported (an environment fix, not a speed lever)

import torch  # noqa: E402

from peer_torch import SFTDataset, parse_checked, report, run_parser, summarize  # noqa: E402
from sftbench import data as sftdata  # noqa: E402
from sftbench import metrics  # noqa: E402
from sftbench.args import repo_relative  # noqa: E402
from sftbench.dsconfig import DSConfigError, apply_precision, config_precision, load_ds_config  # noqa: E402
from sftbench.models.resolve import resolve as resolve_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__.splitlines()[0], "optimizer steps (Trainer max_steps), warm-up included")
    p.add_argument("--ds", default=str(REPO / "ds_configs" / "z1.json"), help="DeepSpeed JSON (as for train.py)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="override the JSON's fp16/bf16 blocks (default: the JSON's)")
    p.add_argument("--output-dir", default=None, help="Trainer output_dir (nothing is saved; default: a temp dir)")
    p.add_argument("--out", default=None, help="write the summary JSON here (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    return parse_checked(p, argv)


class OrderSampler(torch.utils.data.Sampler):
    """The global index sequence whose per-rank split (accelerate hands out batches round-robin across ranks) is
    exactly train.py's ``ShardedOrder(n, rank, world, seed)`` order, epochs back to back, ``need`` per rank."""

    def __init__(self, n: int, world: int, per_rank: int, micro_batch: int, seed: int):
        shards = [sftdata.ShardedOrder(n, r, world, seed).take(per_rank) for r in range(world)]
        seq = []
        for b in range(0, per_rank, micro_batch):  # batch b of rank 0, of rank 1, ...
            for r in range(world):
                seq += shards[r][b:b + micro_batch]
        self.seq = seq
        self.shards = shards

    def __iter__(self):
        return iter(self.seq)

    def __len__(self) -> int:
        return len(self.seq)


class RecordingDataset(SFTDataset):
    """The encoded samples; remembers which indices the Trainer's dataloader asked for (to check the order)."""

    def __init__(self, enc):
        super().__init__(enc)
        self.fetched: list[int] = []

    def __getitem__(self, i: int) -> dict:
        self.fetched.append(int(i))
        return super().__getitem__(i)


def ds_trainer_args(cfg: dict) -> dict:
    """The TrainingArguments values the Trainer insists match the DeepSpeed JSON, read from the JSON."""
    opt = (cfg.get("optimizer") or {}).get("params", {})
    sch = (cfg.get("scheduler") or {}).get("params", {})
    betas = opt.get("betas", [0.9, 0.95])
    prec = config_precision(cfg)
    return {
        "per_device_train_batch_size": cfg.get("train_micro_batch_size_per_gpu", 1),
        "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps", 8),
        "max_grad_norm": cfg.get("gradient_clipping", 1.0),
        "learning_rate": opt.get("lr", 1e-5),
        "weight_decay": opt.get("weight_decay", 0.01),
        "adam_beta1": betas[0], "adam_beta2": betas[1],
        "adam_epsilon": opt.get("eps", 1e-8),
        "warmup_steps": sch.get("warmup_num_steps", 0),
        "bf16": prec == "bf16", "fp16": prec == "fp16",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    on_cpu, local_rank, device = rank_device(args.local_rank)  # the device the Trainer will use too
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = apply_precision(load_ds_config(args.ds), args.precision)
    except DSConfigError as e:
        sys.exit(f"error: {e}")
    precision = config_precision(cfg)
    if precision == "fp16" and on_cpu:
        sys.exit("error: fp16 is not supported on CPU (DeepSpeed refuses it); use --precision bf16 or fp32")
    # Keep DeepSpeed's config the one given; only what the Trainer would reject is adapted: a stated
    # train_batch_size must equal world x micro batch x accumulation (the Trainer computes it), so it is dropped.
    cfg.pop("train_batch_size", None)
    model_name = args.model or ("pangu-tiny" if on_cpu else "pangu-350m")
    data_path = args.data or str(BENCH_DATA if BENCH_DATA.is_file() else SAMPLE_DATA)

    import tempfile

    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sftbench.shm import release_own_buffer

    ta = ds_trainer_args(cfg)
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="peer_trainer_")
    targs = TrainingArguments(
        output_dir=out_dir, deepspeed=cfg, max_steps=args.steps, logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, gradient_checkpointing=False, remove_unused_columns=False,
        seed=args.seed, use_cpu=on_cpu, **ta,
    )
    mb, ga = targs.per_device_train_batch_size, targs.gradient_accumulation_steps

    # ---- data: the same tokenizer, file, cache and order as train.py
    spec = resolve_model(model_name, args.tokenizer)  # as train.py: the model seam
    tok = spec.tokenizer()
    enc = sftdata.load_or_build_cache(data_path, tok, args.seq_len, args.cache_dir, local_rank=local_rank)
    sampler = OrderSampler(enc.n, world, args.steps * ga * mb, mb, args.seed)
    train_ds = RecordingDataset(enc)

    # ---- model: built after TrainingArguments, so a ZeRO-3 config constructs it partitioned (as for users)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model = spec.build()
    flops_tok = spec.flops_per_token(model.config, args.seq_len)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    host = metrics.HostProbe()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_begin = None
            self.t_last_end = None
            self.step_times, self.periods, self.rss = [], [], []

        def on_train_begin(self, targs_, state, control, **kw):
            if on_cpu:  # the Trainer has run DeepSpeed's init_distributed by now, on every rank
                release_own_buffer(rank, world)  # as train.py: DeepSpeed leaves its shm file behind on CPU

        def on_step_begin(self, targs_, state, control, **kw):
            sync()
            self.t_begin = time.perf_counter()
            if self.t_last_end is None:  # first step: the period starts here
                self.t_last_end = self.t_begin
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)

        def on_step_end(self, targs_, state, control, **kw):
            sync()
            now = time.perf_counter()
            self.step_times.append(now - self.t_begin)
            self.periods.append(now - self.t_last_end)
            self.t_last_end = now
            self.rss.append(host.rss_mib())

    class LossLog(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, targs_, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler

    timer, losslog = StepTimer(), LossLog()
    trainer = OrderedTrainer(model=model, args=targs, train_dataset=train_ds, callbacks=[timer, losslog])
    if not hasattr(model, "accepts_loss_kwargs"):
        # The model's forward takes **kwargs but computes its own mean loss (ignores num_items_in_batch); the
        # Trainer's documentation says to tell it so, else it skips the loss / accumulation scaling.
        trainer.model_accepts_loss_kwargs = False
    if rank == 0:
        print(f"peer_trainer: transformers {transformers.__version__}, {model_name}, DeepSpeed config {args.ds} "
              f"(ZeRO {cfg.get('zero_optimization', {}).get('stage', 0)}, {precision}), {enc.n} samples, "
              f"seq {args.seq_len}, micro batch {mb}, grad accum {ga}, world {world}; "
              f"model built in {time.time() - t0:.1f}s", flush=True)
    trainer.train()

    expected = sampler.shards[rank if world > 1 else 0]
    order_ok = train_ds.fetched[:len(expected)] == expected
    if not order_ok:
        print(f"warning (rank {rank}): the Trainer fed samples in another order than train.py "
              f"(first fetched {train_ds.fetched[:8]}, expected {expected[:8]})", file=sys.stderr, flush=True)
    if rank == 0:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        args.precision = precision
        ds_label = repo_relative(args.ds)
        res = summarize("peer_trainer", model_name, ds_label, args, device, device_name, flops_tok,
                        timer.step_times, timer.periods, losslog.losses, timer.rss, mb, ga, world,
                        extra={"transformers": transformers.__version__, "attention_mask": True,
                               "order_matches": order_ok, "dataset_path": data_path, "dataset_samples": enc.n})
        report(res, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
