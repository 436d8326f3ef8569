"""The harness settings: one dataclass, one docstring per field, validation in __post_init__.

DeepSpeed's JSON owns ZeRO, precision, batch and optimizer settings; these are only what the harness itself
decides (which model, which data, how many steps, where the log goes). ``parse_args`` builds the CLI from the
dataclass, so the flags and their help can't drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "data" / "sample_sft.jsonl"
BENCH_DATA = REPO / "data" / "bench_10k.jsonl"


def repo_relative(path) -> str:
    """A path inside the repo as a relative one (the tools run with the repo as working directory), so commands,
    logs and committed results name no machine's folders; a path outside the repo stays as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO.resolve()))
    except ValueError:
        return str(path)


class ArgsError(ValueError):
    pass


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class HarnessArgs:
    ds: str | None = _help("DeepSpeed JSON config, or 'none' for the plain PyTorch loop (DDP when several ranks).",
                           default=None)
    model: str | None = _help("Model preset (pangu-350m, pangu-2.6b, pangu-13b, pangu-tiny) or a checkpoint folder. "
                              "Default: pangu-350m on GPU, pangu-tiny on CPU.", default=None)
    tokenizer: str | None = _help("vocab.model or a folder holding it. Default: the checkpoint folder's vocab.model, "
                                  "else the small tokenizer shipped in data/tokenizer/.", default=None)
    data: str | None = _help("SFT JSONL file. Default: data/bench_10k.jsonl if generated, else data/sample_sft.jsonl.",
                             default=None)
    precision: str | None = _help("fp32, fp16 or bf16; overrides the config's fp16/bf16 blocks. Default: the "
                                  "config's (for --ds none: bf16 on GPUs that have it, else fp32).", default=None)
    max_steps: int = _help("Optimizer steps to run (each = grad_accum micro-batches per rank); 0 = one full epoch "
                           "(its time is then measured, not estimated).", default=20)
    warmup_steps: int | None = _help("First steps flagged warm-up in the log and left out of statistics. Default: "
                                     "3, but at most max_steps - 1, so a short run still has a measured step.",
                                     default=None)
    grad_accum: int = _help("Gradient accumulation for --ds none (DeepSpeed runs read it from the config).",
                            default=8)
    micro_batch: int = _help("Micro batch for --ds none (DeepSpeed runs read it from the config).", default=1)
    lr: float = _help("Peak learning rate for --ds none (DeepSpeed runs read it from the config).", default=1e-5)
    lr_warmup_steps: int = _help("Linear LR warm-up steps for --ds none (DeepSpeed runs: the config's scheduler).",
                                 default=100)
    seq_len: int = _help("Tokens per sample: truncated longest-first and padded to this.", default=512)
    mask_prompt: bool = _help("Also leave the prompt tokens out of the loss (the reference did not).", default=False)
    strict_data: bool = _help("Fail on the first broken JSONL line instead of skipping it.", default=False)
    seed: int = _help("Seed for weights, data order and dropout.", default=1234)
    run_dir: str | None = _help("Directory for rank<k>.jsonl. Default: runs/<model>__<config>__<precision>__<time>.",
                                default=None)
    cache_dir: str = _help("Where the pre-tokenised dataset is cached.", default=str(REPO / ".cache" / "data"))
    pad_mask: str = _help("'auto': skip the attention padding mask when every sample is right-padded (the causal mask "
                          "alone then gives real tokens exactly the same result, and the flash kernel applies); "
                          "'always': always pass it.", default="auto")
    compile: str = _help("torch.compile: 'auto' (default: 'off', since no configuration was measured faster compiled "
                         "with >= 20 measured steps); 'off'; 'model' (the whole model, engine.compile() under "
                         "DeepSpeed; a bare --compile means this); 'blocks' (each transformer block in place, one "
                         "shared graph).", default="auto")
    compile_mode: str = _help("torch.compile mode for --compile: default or max-autotune-no-cudagraphs (the CUDA-graph "
                              "modes are refused: they fail with gradient accumulation).", default="default")
    cuda_graphs: str = _help("CUDA graphs for the micro-batch (the model's forward and backward captured once, then "
                             "replayed; DeepSpeed's per-parameter gradient hooks still run): 'auto' (default: on "
                             "only where measured faster on a GPU, which no configuration is yet), 'on' (wherever "
                             "the parameters stay resident: ZeRO-0/1/2, optimizer offload, --ds none on one rank; "
                             "refused for ZeRO-3, parameter offload, --compile; eager without CUDA), 'off'.",
                             default="auto")
    save: str | None = _help("Save a DeepSpeed checkpoint here at the end.", default=None)
    resume: str | None = _help("Resume from a DeepSpeed checkpoint folder written by --save.", default=None)
    log_every: int = _help("Print a console line every N steps (rank 0).", default=1)
    local_rank: int = _help("Set by the launcher.", default=-1)

    def __post_init__(self) -> None:
        if self.ds is not None and self.ds.lower() == "none":
            self.ds = "none"
        if self.precision is not None and self.precision not in ("fp32", "fp16", "bf16"):
            raise ArgsError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        for name in ("grad_accum", "micro_batch", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ArgsError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ArgsError(f"--max-steps must be >= 1, or 0 for one epoch, got {self.max_steps}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ArgsError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.pad_mask not in ("auto", "always"):
            raise ArgsError(f"--pad-mask must be auto or always, got {self.pad_mask!r}")
        from sftbench.speed import SpeedError, check_compile
        try:
            check_compile(self.compile, self.compile_mode)
        except SpeedError as e:
            raise ArgsError(str(e)) from None
        from sftbench.graphs import check_mode
        try:
            check_mode(self.cuda_graphs)
        except ValueError as e:
            raise ArgsError(str(e)) from None
        if self.data is not None and not os.path.isfile(self.data):
            raise ArgsError(f"--data: file not found: {self.data}")
        if self.data is None:
            self.data = str(BENCH_DATA if BENCH_DATA.is_file() else SAMPLE_DATA)

    @property
    def deepspeed(self) -> bool:
        return self.ds != "none"

    def default_run_dir(self, model: str, precision: str) -> str:
        cfg = "none" if not self.deepspeed else Path(self.ds).stem
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return str(REPO / "runs" / f"{Path(model).name}__{cfg}__{precision}__{stamp}")


DEFAULT_WARMUP_STEPS = 3


def resolve_warmup(asked: int | None, max_steps: int) -> tuple[int, str | None]:
    """(warm-up steps, a note to print or None). Asked for (--warmup-steps N): N, with a note when it covers every
    step. Not asked for: min(DEFAULT_WARMUP_STEPS, max_steps - 1), so that at least one step is measured."""
    if asked is not None:
        if asked >= max_steps:
            return asked, (f"--warmup-steps {asked} covers all {max_steps} step(s): none will be measured (as asked; "
                           "lower --warmup-steps or raise --max-steps for statistics)")
        return asked, None
    n = max(0, min(DEFAULT_WARMUP_STEPS, max_steps - 1))
    if n < DEFAULT_WARMUP_STEPS:
        return n, (f"warm-up: {n} step(s) instead of the default {DEFAULT_WARMUP_STEPS}, so that {max_steps - n} of "
                   f"the {max_steps} step(s) are measured (--warmup-steps sets it)")
    return n, None


def parse_args(argv: list[str] | None = None) -> HarnessArgs:
    p = argparse.ArgumentParser(description="Supervised fine-tuning of Pangu-alpha under DeepSpeed, measured.")
    for f in dataclasses.fields(HarnessArgs):
        flag = "--" + f.name.replace("_", "-")
        names = [flag]
        if f.name == "ds":
            names += ["--deepspeed_config", "--deepspeed-config"]  # DeepSpeed's own flag name
        if f.name == "local_rank":
            names = ["--local_rank", "--local-rank"]
        kw = {"dest": f.name, "help": f.metadata.get("help"), "default": f.default}
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "compile":  # a bare --compile means the faster target measured (docs/performance.md)
            kw.update(nargs="?", const="model")
        else:
            kw["type"] = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
        p.add_argument(*names, **kw)
    ns = p.parse_args(argv)
    try:
        return HarnessArgs(**vars(ns))
    except ArgsError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits
