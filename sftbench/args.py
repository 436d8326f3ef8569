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
    model: str | None = _help("A preset (pangu-350m, pangu-2.6b, pangu-13b, pangu-tiny; llama-3.2-1b, llama-3.1-8b, "
                              "qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, mistral-7b, llama-tiny, qwen2-tiny, "
                              "gpt2-tiny: random weights, for benchmarking), a model folder (Pangu-α or any "
                              "transformers causal LM), or a Hub name (owner/name). Default: pangu-350m on GPU, "
                              "pangu-tiny on CPU.", default=None)
    tokenizer: str | None = _help("Pangu: vocab.model or a folder holding it (default: the checkpoint folder's "
                                  "vocab.model, else the small tokenizer shipped in data/tokenizer/); other models: a "
                                  "transformers tokenizer folder or Hub name (default: the model's own; presets: the "
                                  "small one shipped in sftbench/models/presets/tokenizer/).", default=None)
    trust_remote_code: bool = _help("Allow a model whose config.json names its own code (auto_map) to run that code.",
                                    default=False)
    grad_checkpointing: bool = _help("Activation checkpointing (transformers' gradient_checkpointing_enable, "
                                     "non-reentrant): each block keeps only its input and recomputes the rest in the "
                                     "backward; the memory predictor counts it. Off by default, as in the reference.",
                                     default=False)
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
    pack: bool = _help("Pack several samples into each --seq-len row (each attends only to itself: per-sample "
                       "positions, a block-diagonal causal mask, no label across samples): fewer, fuller rows, so "
                       "fewer steps per epoch. Evaluation stays one sample per row. Off by default (the sweep's and "
                       "the reference table's rows are padded).", default=False)
    strict_data: bool = _help("Fail on the first broken JSONL line instead of skipping it.", default=False)
    seed: int = _help("Seed for weights, data order and dropout.", default=1234)
    run_dir: str | None = _help("Directory for rank<k>.jsonl. Default: runs/<model>__<config>__<precision>__<time>.",
                                default=None)
    cache_dir: str = _help("Where the pre-tokenised dataset is cached.", default=str(REPO / ".cache" / "data"))
    # ---- Advanced performance: each lever's 'auto' is decided by the lever plan (sftbench/levers.py), printed at
    # start-up and logged; it is on only where it was measured faster on that configuration, GPU class and world size
    # (docs/performance.md). A lever asked for by name is applied where it can be and refused where it cannot.
    pad_mask: str = _help("Attention padding mask: 'auto' skips it when every sample is right-padded (the causal mask "
                          "alone then gives real tokens the same result, and SDPA's flash kernel applies); 'always' "
                          "passes it.", default="auto")
    compile: str = _help("torch.compile: 'auto' (off: never measured faster with >= 20 steps; on for a config with "
                         "compile.deepcompile), 'off', 'model' (the whole model, engine.compile(); a bare --compile "
                         "means this), 'blocks' (each transformer block in place).", default="auto")
    compile_mode: str = _help("torch.compile's mode for --compile (the CUDA-graph modes are refused: they fail with "
                              "gradient accumulation).", default="default")
    fused_kernels: str = _help("Transformers models on a GPU: 'liger' runs the Liger Kernel library's fused RMSNorm, "
                               "rotary embedding and gated-MLP kernels (pip install liger-kernel) in place of the "
                               "model's own; 'auto' (on only where measured faster for the family) or 'off'.",
                               default="auto")
    cuda_graphs: str = _help("CUDA graphs of the micro-batch's forward and backward, replayed each micro-batch "
                             "(DeepSpeed's gradient hooks still run): 'auto', 'on' (where the parameters stay "
                             "resident: ZeRO-0/1/2, optimizer offload, --ds none on one rank), 'off'.", default="auto")
    graph_accum: str = _help("With CUDA graphs: add the micro-batches' gradients up inside the graphs where the engine "
                             "would only add them into param.grad (the same additions in the same order): 'auto' or "
                             "'off'.", default="auto")
    graph_wgrad: str = _help("With CUDA graphs: each linear layer adds its weight gradient inside its GEMM instead of "
                             "a separate add per micro-batch: 'auto', 'on' or 'off'.", default="auto")
    graph_qkv: str = _help("With CUDA graphs, Pangu-alpha only: k/v/q projections in one GEMM where their weights lie "
                           "side by side: 'on' (opt-in; not decided by the steps), 'auto'/'off' leave it off.",
                           default="auto")
    graph_fuse: str = _help("With CUDA graphs, Pangu-alpha only: dropout, residual add and LayerNorm fused (compiled): "
                            "'on' (opt-in; not decided by the steps), 'auto'/'off' leave it off.", default="auto")
    grad_norm: str = _help("ZeRO-1/2's gradient norm in one multi-tensor kernel with fp64 sums (DeepSpeed's own "
                           "result up to the order of the sums): 'auto', 'foreach' (refused where it does not "
                           "apply), 'deepspeed' (DeepSpeed's code).", default="auto")
    overflow_check: str = _help("The gradients' inf/NaN check of ZeRO-0's FP16 optimizers and of ZeRO-1/2 optimizer "
                                "offload with one device sync per step instead of one per gradient: 'auto', "
                                "'foreach' (refused where it does not apply), 'deepspeed'.", default="auto")
    coalesce_reduction: str = _help("Run each step's micro-batches inside DeepSpeed's engine.coalesce_grad_reduction() "
                                    "window: ZeRO-1/2/3 and optimizer offload reduce once per step, and each rank "
                                    "holds the full 16-bit gradients meanwhile: 'auto' (also checks the memory "
                                    "prediction), 'on', 'off'.", default="auto")
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
        from sftbench.levers import Asked, LeverError
        try:
            Asked.of(self).check()
        except LeverError as e:
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


# --help's groups, in its order; a field not named here is a Training option.
ADVANCED = "Advanced performance"
GROUPS = {
    "Model & data": ("model", "tokenizer", "trust_remote_code", "data", "seq_len", "mask_prompt", "pack",
                     "strict_data", "cache_dir"),
    "Training": ("config", "ds", "precision", "max_steps", "epochs", "grad_accum", "micro_batch", "lr",
                 "lr_warmup_steps", "lr_schedule", "grad_checkpointing", "seed"),
    "Saving & evaluation": ("save", "overwrite", "save_every", "save_keep", "resume", "eval_data", "eval_split",
                            "eval_every"),
    "Logging": ("run_dir", "report_to", "log_every", "warmup_steps"),
    ADVANCED: ("pad_mask", "compile", "compile_mode", "fused_kernels", "cuda_graphs", "graph_accum", "graph_wgrad",
               "graph_qkv", "graph_fuse", "grad_norm", "overflow_check", "coalesce_reduction"),
}


def _group_of(name: str) -> str:
    return next((g for g, names in GROUPS.items() if name in names), "Training")


def _parser(exit_on_error: bool = True, show_advanced: bool = True) -> argparse.ArgumentParser:
    """train.py's parser, built from the dataclass. ``show_advanced`` False: --help lists the Advanced performance
    flags by name only (``--help-all`` lists them in full); they parse the same either way."""
    from sftbench.levers import CHOICES

    p = argparse.ArgumentParser(
        description="Supervised fine-tuning of a causal LM under DeepSpeed, measured step by step.",
        epilog="The speed levers are decided per run by the lever plan, printed at start-up; --help-all lists their "
               "flags. docs/performance.md says what runs by default and why.", exit_on_error=exit_on_error)
    p.add_argument("--help-all", action="store_true", help="Show every flag, the Advanced performance ones too.")
    groups = {}
    for title in GROUPS:
        desc = None
        if title == ADVANCED and not show_advanced:
            desc = "  ".join("--" + n.replace("_", "-") for n in GROUPS[ADVANCED]) + "  (see --help-all)"
        groups[title] = p.add_argument_group(title, desc)
    for f in dataclasses.fields(HarnessArgs):
        flag = "--" + f.name.replace("_", "-")
        names = [flag]
        if f.name == "ds":
            names += ["--deepspeed_config", "--deepspeed-config"]  # DeepSpeed's own flag name
        if f.name == "local_rank":
            names = ["--local_rank", "--local-rank"]
        text = f.metadata.get("help") or ""
        if "Default" not in text and "default" not in text and f.default is not None:
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else (
                repo_relative(f.default) if isinstance(f.default, str) else f.default)
            text += f" Default: {shown}."
        kw = {"dest": f.name, "help": text, "default": f.default}
        if f.name == "local_rank":
            kw["help"] = argparse.SUPPRESS  # the launcher's
        elif _group_of(f.name) == ADVANCED and not show_advanced:
            kw["help"] = argparse.SUPPRESS
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        elif f.name == "precision":
            kw["choices"] = ("fp32", "fp16", "bf16")
        elif f.name == "lr_schedule":
            from sftbench.schedule import SCHEDULES
            kw["choices"] = SCHEDULES
        if f.name == "compile":  # a bare --compile means the whole model (engine.compile())
            kw.update(nargs="?", const="model")
        groups[_group_of(f.name)].add_argument(*names, **kw)
    return p


def read_flags(argv: list[str]) -> argparse.Namespace:
    """Some of train.py's flags (the sweep's extra flags) read as train.py's parser reads them, the rest at their
    defaults, without the checks of a whole command line; ArgsError for a value the parser refuses."""
    try:
        return _parser(exit_on_error=False).parse_known_args(argv)[0]
    except argparse.ArgumentError as e:
        raise ArgsError(str(e)) from None


def planned_levers(run, limits, flags: list[str] = (), gpu: str | None = None, gpu_mib=None,
                   family: str = "pangu"):
    """The lever plan (``sftbench.levers.LeverPlan``) of the run train.py will make with these extra flags, decided
    before it starts as train.py decides it before its engine exists (the sweep's and the plan's predictions):
    ``run`` is the memory predictor's ``RunShape`` (``run.ds_config`` the loaded config, None for ``--ds none``),
    ``gpu`` the GPU class (``levers.gpu_class_of``), ``gpu_mib`` the memory oracle (graphs, window) -> MiB,
    ``family`` the model seam's family (evidence holds per family). None where train.py would refuse the flags (its
    parser, or a lever asked for by name that cannot apply)."""
    from sftbench.levers import Asked, LeverError, Situation, decide

    try:
        asked = Asked.of(read_flags(list(flags)))
        situation = Situation.of_config(run.ds_config, world_size=run.world_size, cuda=run.cuda, gpu=gpu,
                                        precision=run.precision, gpu_mib=gpu_mib,
                                        gpu_total_mib=limits.gpu_total_mib, right_padded=run.flash_attention,
                                        family=family)
        return decide(asked, situation)
    except (ArgsError, LeverError):
        return None


def planned_prediction(shape, run, limits, flags: list[str] = (), gpu: str | None = None, family: str = "pangu"):
    """The memory prediction (``sftbench.memory.Prediction``) of the run train.py will make with these extra flags
    on a GPU of class ``gpu`` (``levers.gpu_class_of``; None: unknown, where ``auto`` turns no lever on): the CUDA
    graphs and DeepSpeed's coalesced reduction window as the lever plan decides them against ``limits.gpu_total_mib``
    (``planned_levers``); a run train.py would refuse is predicted eager."""
    from dataclasses import replace

    from sftbench import memory

    preds: dict = {}

    def gpu_mib(graphs: bool, coalesce: bool) -> float:
        if (graphs, coalesce) not in preds:
            preds[graphs, coalesce] = memory.predict(shape, replace(run, cuda_graphs=graphs,
                                                                    coalesce_reduction=coalesce), limits)
        return preds[graphs, coalesce].gpu_mib

    plan = planned_levers(run, limits, flags, gpu, gpu_mib, family)
    graphs = bool(plan and plan.on("cuda_graphs"))
    coalesce = bool(plan and plan.on("coalesce_reduction"))
    gpu_mib(graphs, coalesce)
    return preds[graphs, coalesce]


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

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        _parser().print_help()
        raise SystemExit(0)
    p = _parser(show_advanced=False)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    path = first.parse_known_args(argv)[0].config
    if path:
        try:
            argv = config_file_argv(path) + argv  # later tokens win: the command line overrides the file
        except ArgsError as e:
            p.error(str(e))
    ns = vars(p.parse_args(argv))
    ns.pop("help_all")
    try:
        return HarnessArgs(**ns)
    except ArgsError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits
