"""The harness settings: one dataclass, one docstring per field, validation in __post_init__.

DeepSpeed's JSON owns ZeRO, precision, batch and optimizer settings; these are what the harness itself decides
(which model, which data, how many steps, where the log and the saved model go) plus the few overrides of the JSON
(``--precision``, ``--micro-batch``, ``--grad-accum``, ``--lr``, ``--lr-warmup-steps``: None = the config's value,
applied by ``sftbench.dsconfig.apply_overrides`` and logged). ``parse_args`` builds the CLI from the dataclass, so the
flags and their help can't drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sftbench.paths import BENCH_DATA, REPO, SAMPLE_DATA



def repo_relative(path) -> str:
    """A path inside the repo as a relative one (the tools run with the repo as working directory), so commands,
    logs and committed results name no machine's folders; a path outside the repo stays as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO.resolve()))
    except ValueError:
        return str(path)


class ArgsError(ValueError):
    pass


# --ds none has no config file: these stand in for it (the reference's settings).
PLAIN_DEFAULTS = {"grad_accum": 8, "micro_batch": 1, "lr": 1e-5, "lr_warmup_steps": 100}


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class HarnessArgs:
    config: str | None = _help("A YAML or JSON file of train.py's flags (keys as the flags without '--', e.g. "
                               "'ds: z1', 'lr-schedule: cosine', 'mask-prompt: false'); flags on the command line "
                               "override it. Copied into the run folder.", default=None)
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
    max_steps: int | None = _help("Optimizer steps to run in all (each = grad_accum micro-batches per rank; a resumed "
                                  "run counts from the start of the first); 0 = one full epoch (its time is then "
                                  "measured, not estimated). Default 20, or what --epochs gives.", default=None)
    epochs: float | None = _help("Train this many passes over the training set in all (instead of --max-steps; a "
                                 "fraction is allowed).", default=None)
    warmup_steps: int | None = _help("First steps of this process flagged warm-up in the log and left out of "
                                     "statistics. Default: 3, but at most max_steps - 1, so a short run still has a "
                                     "measured step.", default=None)
    grad_accum: int | None = _help("Gradient accumulation steps. DeepSpeed runs: overrides the config's "
                                   "gradient_accumulation_steps (logged). Default: the config's; 8 for --ds none.",
                                   default=None)
    micro_batch: int | None = _help("Micro batch per rank. DeepSpeed runs: overrides the config's "
                                    "train_micro_batch_size_per_gpu (logged). Default: the config's; 1 for --ds none.",
                                    default=None)
    lr: float | None = _help("Peak learning rate. DeepSpeed runs: overrides the optimizer's lr and the scheduler's "
                             "warmup_max_lr (logged). Default: the config's; 1e-5 for --ds none.", default=None)
    lr_warmup_steps: int | None = _help("Linear LR warm-up steps. DeepSpeed runs: overrides the scheduler's "
                                        "warmup_num_steps (logged). Default: the config's; 100 for --ds none.",
                                        default=None)
    lr_schedule: str = _help("LR schedule after the warm-up, over the run's length (--max-steps or --epochs): "
                             "'cosine' (DeepSpeed's WarmupCosineLR, to 0 at the last step), 'linear' "
                             "(WarmupDecayLR, to 0), 'constant' (WarmupLR), 'config' (the config's scheduler block "
                             "as written; for --ds none the reference's constant), 'auto' (default: cosine, unless "
                             "the config's scheduler already decays, which is then kept). Changes are logged.",
                             default="auto")
    seq_len: int = _help("Tokens per sample: truncated longest-first and padded to this.", default=512)
    mask_prompt: bool = _help("Leave the prompt tokens out of the loss, train on the answers only (default, as "
                              "axolotl and LLaMA-Factory do); --no-mask-prompt trains on every token, the "
                              "reference's layout (the sweep and the bench scripts pass it).", default=True)
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
                             "where measured faster on a GPU: ZeRO-0/1/2 and --ds none, not optimizer offload), "
                             "'on' (wherever the parameters stay resident: ZeRO-0/1/2, optimizer offload, --ds none "
                             "on one rank; refused for ZeRO-3, parameter offload, --compile; eager without CUDA), "
                             "'off'.", default="auto")
    graph_accum: str = _help("With CUDA graphs on: add the micro-batches' gradients up inside the graphs and hand "
                             "the engine the sum at the accumulation boundary: 'auto' (default: where the engine "
                             "would only add them into param.grad before the boundary: ZeRO-0/1 without offload, "
                             "--ds none; the same additions in the same order, the per-parameter work once per "
                             "step) or 'off' (hand every micro-batch's gradients over, as eager mode does).",
                             default="auto")
    graph_wgrad: str = _help("With CUDA graphs on: each linear layer adds its weight gradient into the gradient "
                             "buffer inside the weight-gradient GEMM (and its bias gradient in one matrix-vector "
                             "product) instead of a separate add per parameter per micro-batch: 'auto' (default: "
                             "where the weights and the GEMM share a dtype, i.e. not the plain loop's autocast) or "
                             "'off'.", default="auto")
    graph_qkv: str = _help("With CUDA graphs on: compute each attention's k, v (and q) projections in one GEMM over "
                           "their weights where these lie side by side in memory (DeepSpeed's flat parameter buffers "
                           "of ZeRO-0/1/2 place them so): 'on', or 'auto' (default) and 'off', which leave it off "
                           "(on Pangu-2.6B ZeRO-1 it was faster by the median, 1.03-1.06x, but not by the steps).",
                           default="auto")
    graph_fuse: str = _help("With CUDA graphs on: each block's residual additions run fused with the dropout "
                            "before them, the first also with the LayerNorm after it (two small functions compiled "
                            "by torch.compile and captured in the graphs; a few seconds of compilation at start): "
                            "'on', or 'auto' (default) and 'off', which leave it off (1.01-1.03x by the median "
                            "in two calls, not by the steps; with dropout the masks are inductor's own); 'on' is "
                            "refused under the plain loop's autocast.", default="auto")
    grad_norm: str = _help("The gradient norm DeepSpeed's ZeRO-1/2 optimizer takes at every step (for clipping and "
                           "the log): 'auto' (default: on a GPU, one multi-tensor kernel that sums the gradients' "
                           "squares in fp64 as it reads them, where DeepSpeed copies each gradient to fp64 and "
                           "reduces it alone: the same norm up to the order of the sums; DeepSpeed's own code "
                           "elsewhere), "
                           "'foreach' (the same, refused where it does not apply: ZeRO-0/3, the BF16 optimizer, "
                           "optimizer offload, --ds none), 'deepspeed' (DeepSpeed's own code).", default="auto")
    overflow_check: str = _help("The inf/NaN check of the gradients that ZeRO-0's FP16 optimizers (bf16 and fp16) "
                                "run at every step, and ZeRO-1/2 with optimizer offload as each gradient goes to "
                                "the host, one gradient and one device sync at a time: 'auto' (default: on a GPU "
                                "where measured faster, the same answer with one sync: ZeRO-0 1.21x on Pangu-2.6B, "
                                "1.75x on 350M per step; ZeRO-2 + offload ~1.08x and 1.29x, and no check at all "
                                "where check_grad_overflow is off, since nothing reads it; DeepSpeed's check "
                                "elsewhere), 'foreach' (the same, refused where it does not apply: ZeRO-1/2 without "
                                "offload, ZeRO-3, the BF16 optimizer, fp32 ZeRO-0, --ds none), 'deepspeed' "
                                "(DeepSpeed's own code).",
                                default="auto")
    coalesce_reduction: str = _help("Run each step's micro-batches inside DeepSpeed's own "
                                    "engine.coalesce_grad_reduction() window: ZeRO-2/3 and optimizer offload then "
                                    "reduce (and move to the host) once per step instead of once per micro-batch, "
                                    "and every rank holds the full 16-bit gradients over the window, as ZeRO-1 "
                                    "does. 'on' (refused where DeepSpeed has no such window: ZeRO-0, --ds none, "
                                    "its BF16 optimizer; and on ZeRO-2/3 with a grad_accum_dtype wider than the "
                                    "weights), 'auto' (default: on, on one GPU, where it was measured faster and the "
                                    "run is predicted to fit: ZeRO-2, 2.43x on Pangu-2.6B and 6.08x on 350M per "
                                    "step, and ZeRO-2 + optimizer offload, 2.16x and 2.02x), 'off' (DeepSpeed's "
                                    "reduction per micro-batch).", default="auto")
    save: str | None = _help("Save folder: at the end the model is saved here as a transformers folder "
                             "(from_pretrained after `import sftbench`) that also holds the state to resume from. "
                             "Nothing is saved without it.", default=None)
    save_every: int = _help("Also write DIR/checkpoint-<step>/ (same layout) every N steps; 0 = never.", default=0)
    save_keep: int = _help("Keep the last K checkpoint-<step> folders (0 = all).", default=3)
    overwrite: bool = _help("Let --save replace a folder that already holds a saved model or checkpoints (its "
                            "state and checkpoint-<step> folders are removed when saving starts). Without it such a "
                            "folder is refused before anything trains, unless --resume continues it.",
                            default=False)
    resume: str | None = _help("Resume from a save folder or a checkpoint-<step> folder (of a folder holding "
                               "several, the latest): weights, optimizer, LR schedule, loss scale, RNG and the "
                               "position in the data order; step numbers continue.", default=None)
    eval_data: str | None = _help("Evaluation JSONL file (any training format): its loss is logged every "
                                  "--eval-every steps, at the end of each epoch and at the end.", default=None)
    eval_split: float = _help("Hold out this fraction of the training file for evaluation instead (e.g. 0.05; a "
                              "seeded draw).", default=0.0)
    eval_every: int = _help("Evaluate every N steps as well (0 = only at epoch ends and at the end).", default=0)
    report_to: str | None = _help("Also write the log's step, eval and summary numbers, under the log's key names, "
                                  "to 'tensorboard' (<run>/tensorboard/), 'wandb' (when installed), or both "
                                  "(comma-separated); the JSONL log stays the source of truth. Default: none.",
                                  default=None)
    log_every: int = _help("Print a console line every N steps (rank 0).", default=1)
    local_rank: int = _help("Set by the launcher.", default=-1)

    def __post_init__(self) -> None:
        if self.ds is not None and self.ds.lower() == "none":
            self.ds = "none"
        if self.precision is not None and self.precision not in ("fp32", "fp16", "bf16"):
            raise ArgsError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        for name in ("grad_accum", "micro_batch", "seq_len", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ArgsError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ArgsError(f"--lr must be > 0, got {self.lr}")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise ArgsError(f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}")
        if self.max_steps is not None and self.epochs is not None:
            raise ArgsError("give --max-steps or --epochs, not both")
        if self.max_steps is not None and self.max_steps < 0:
            raise ArgsError(f"--max-steps must be >= 1, or 0 for one epoch, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ArgsError(f"--epochs must be > 0, got {self.epochs}")
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 20
        for name in ("save_every", "save_keep", "eval_every"):
            if getattr(self, name) < 0:
                raise ArgsError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.overwrite and not self.save:
            raise ArgsError("--overwrite applies to --save DIR only (the folder it lets a run replace)")
        if self.save_every and not self.save:
            raise ArgsError("--save-every needs --save DIR (the folder the checkpoints go into)")
        if not 0.0 <= self.eval_split < 1.0:
            raise ArgsError(f"--eval-split must be a fraction in [0, 1), got {self.eval_split}")
        if self.eval_split and self.eval_data:
            raise ArgsError("give --eval-data or --eval-split, not both")
        if self.eval_every and not (self.eval_split or self.eval_data):
            raise ArgsError("--eval-every needs --eval-data FILE or --eval-split FRACTION")
        if self.eval_data is not None and not os.path.isfile(self.eval_data):
            raise ArgsError(f"--eval-data: file not found: {self.eval_data}")
        if self.ds == "none":  # the plain loop's own defaults; DeepSpeed runs take the config's
            for name, value in PLAIN_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ArgsError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        from sftbench.report_to import ReportToError, parse as parse_report_to
        try:
            parse_report_to(self.report_to)
        except ReportToError as e:
            raise ArgsError(str(e)) from None
        from sftbench.schedule import ScheduleError, check as check_schedule
        try:
            check_schedule(self.lr_schedule)
        except ScheduleError as e:
            raise ArgsError(str(e)) from None
        if self.pad_mask not in ("auto", "always"):
            raise ArgsError(f"--pad-mask must be auto or always, got {self.pad_mask!r}")
        from sftbench.speed import SpeedError, check_coalesce, check_compile, check_grad_norm, check_overflow_check
        try:
            check_compile(self.compile, self.compile_mode)
            check_grad_norm(self.grad_norm)
            check_overflow_check(self.overflow_check)
            check_coalesce(self.coalesce_reduction)
        except SpeedError as e:
            raise ArgsError(str(e)) from None
        from sftbench.graphs import check_accum_mode, check_fuse_mode, check_mode, check_qkv_mode, check_wgrad_mode
        try:
            check_mode(self.cuda_graphs)
            check_accum_mode(self.graph_accum)
            check_wgrad_mode(self.graph_wgrad)
            check_qkv_mode(self.graph_qkv)
            check_fuse_mode(self.graph_fuse)
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


def _parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Supervised fine-tuning of Pangu-alpha under DeepSpeed, measured.",
                                exit_on_error=exit_on_error)
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
            kw["type"] = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        p.add_argument(*names, **kw)
    return p


def read_flags(argv: list[str]) -> argparse.Namespace:
    """Some of train.py's flags (the sweep's extra flags) read as train.py's parser reads them, the rest at their
    defaults, without the checks of a whole command line; ArgsError for a value the parser refuses."""
    try:
        return _parser(exit_on_error=False).parse_known_args(argv)[0]
    except argparse.ArgumentError as e:
        raise ArgsError(str(e)) from None


def graphs_planned(flags: list[str], *, on_cuda: bool, ds_cfg: dict | None, world_size: int,
                   memory_mib: tuple[float, float, float] | None = None, coalescing: bool = False) -> bool:
    """Whether a train.py run with these extra flags will run CUDA graphs, for predictions made before it starts
    (the sweep, the plan): ``--cuda-graphs`` and ``--compile`` read by train.py's parser and decided as train.py
    decides them (``sftbench.speed.resolve_compile``, then ``sftbench.graphs.resolve`` with ``memory_mib`` and
    ``coalescing``, see ``coalesce_planned``); a combination train.py would refuse counts as eager."""
    from sftbench.graphs import GraphError, resolve
    from sftbench.speed import resolve_compile

    try:
        ns = read_flags(list(flags))
        compile_target, _ = resolve_compile(ns.compile, not on_cuda, ds_cfg)
        return resolve(ns.cuda_graphs, on_cuda=on_cuda, ds_cfg=ds_cfg, world_size=world_size,
                       compile_target=compile_target, memory_mib=memory_mib, coalescing=coalescing)[0]
    except (GraphError, ValueError):  # ArgsError and SpeedError are ValueErrors: train.py would stop there
        return False


def coalesce_planned(flags: list[str], ds_cfg: dict | None, world_size: int, on_cuda: bool, precision: str) -> str:
    """The ``--coalesce-reduction`` mode of a train.py run with these extra flags where that run is expected to
    open DeepSpeed's coalesced reduction window before its memory check (``sftbench.speed.coalesce_expected``);
    '' where it is not, or where train.py would refuse the flags."""
    from sftbench.speed import coalesce_expected

    try:
        mode = read_flags(list(flags)).coalesce_reduction
        return mode if coalesce_expected(mode, ds_cfg, world_size, on_cuda, precision) else ""
    except ValueError:  # ArgsError and SpeedError: train.py would stop there
        return ""


def planned_prediction(shape, run, limits, flags: list[str] = ()):
    """The memory prediction (``sftbench.memory.Prediction``) of the run train.py will make with these extra
    flags, for the sweep's and the plan's predictions, decided in train.py's order: the coalesced window as expected
    from the config (``coalesce_planned``), then CUDA graphs as ``graphs_planned`` decides them against
    ``limits.gpu_total_mib``, then ``auto`` keeps the window only where the run with it (and those graphs) is
    predicted to fit the GPU. ``run.ds_config`` is the loaded config dict (or None for ``--ds none``)."""
    from dataclasses import replace

    from sftbench import memory

    mode = coalesce_planned(list(flags), run.ds_config, run.world_size, run.cuda, run.precision)
    run = replace(run, coalesce_reduction=bool(mode))
    preds = memory.predict_both(shape, run, limits)
    total = limits.gpu_total_mib
    fit = (preds[True].gpu_mib, preds[False].gpu_mib, total) if total else None
    graphed = graphs_planned(list(flags), on_cuda=run.cuda, ds_cfg=run.ds_config, world_size=run.world_size,
                             memory_mib=fit, coalescing=bool(mode))
    pred = preds[graphed]
    if mode == "auto" and total and pred.gpu_mib > total:  # train.py's memory check of the window
        pred = memory.predict(shape, replace(pred.run, coalesce_reduction=False), limits)
    return pred


def config_file_argv(path: str) -> list[str]:
    """The flags of a --config file (YAML or JSON: one mapping of flag names, with '-' or '_', to values) as command
    line tokens, so train.py's parser checks them as it checks typed flags. ArgsError names the file and the key."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ArgsError(f"--config: file not found: {path}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArgsError(f"--config {path}: not valid JSON at line {e.lineno}: {e.msg}") from None
    else:
        import yaml  # PyYAML, which transformers requires
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:  # its message names the line and column
            raise ArgsError(f"--config {path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ArgsError(f"--config {path}: the top level must be a mapping of flags, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(HarnessArgs)}
    out: list[str] = []
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields or name in ("config", "local_rank"):
            raise ArgsError(f"--config {path}: key {key!r} is not a train.py flag (train.py --help lists them)")
        flag = "--" + name.replace("_", "-")
        if fields[name].type in ("bool", bool):
            if not isinstance(value, bool):
                raise ArgsError(f"--config {path}: key {key!r} must be true or false, got {value!r}")
            out.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            continue  # the flag's default, as if not given
        elif isinstance(value, (dict, list)):
            raise ArgsError(f"--config {path}: key {key!r} must be one value, got {type(value).__name__}")
        else:
            out += [flag, str(value)]
    return out


def save_config_file(args: HarnessArgs, run_dir: str | os.PathLike) -> Path | None:
    """Copy the --config file into the run folder (``run_config.yaml`` or ``.json``), so the run names every flag
    it was given; None without --config."""
    if not args.config:
        return None
    import shutil
    dst = Path(run_dir) / ("run_config" + (Path(args.config).suffix or ".yaml"))
    shutil.copyfile(args.config, dst)
    return dst


def parse_args(argv: list[str] | None = None) -> HarnessArgs:
    import sys

    p = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    path = first.parse_known_args(argv)[0].config
    if path:
        try:
            argv = config_file_argv(path) + argv  # later tokens win: the command line overrides the file
        except ArgsError as e:
            p.error(str(e))
    ns = p.parse_args(argv)
    try:
        return HarnessArgs(**vars(ns))
    except ArgsError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits
