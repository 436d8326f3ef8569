"""Load, check and resolve DeepSpeed JSON configs.

The DeepSpeed JSON owns ZeRO, precision and batch settings; this module reads it, refuses what DeepSpeed would
silently drop or crash on, applies the harness's overrides (``--precision``; ``--micro-batch``, ``--grad-accum``,
``--lr``, ``--lr-warmup-steps`` through ``apply_overrides``, which reports every key it changed) and describes the
result for the log and the report. No torch or deepspeed import here (the report and the sweep use it).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16")


class DSConfigError(ValueError):
    """A DeepSpeed config that cannot be used; the message names the file and the key."""


def _find_auto(node: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _find_auto(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _find_auto(v, f"{path}[{i}]")
    elif isinstance(node, str) and node.strip().lower() == "auto":
        found.append(path)
    return found


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def resolve_config_path(spec: str | os.PathLike, config_dir: str | os.PathLike = CONFIG_DIR) -> str:
    """A DeepSpeed config as train.py's --ds and the sweep's --configs take it: a JSON file, or the name of one in
    ds_configs/ (``z1``, ``z1.json``, ``engines/z1_deepcompile``). Raises DSConfigError naming what was given and
    the names there are."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    if not os.path.isabs(spec):  # a name inside ds_configs/, not a path that happens to be missing
        cand = os.path.join(os.fspath(config_dir), spec if spec.endswith(".json") else spec + ".json")
        if os.path.isfile(cand):
            return cand
    names = []
    for sub in ("", "engines"):
        try:
            names += sorted(os.path.join(sub, f[:-5]) for f in os.listdir(os.path.join(config_dir, sub))
                            if f.endswith(".json"))
        except OSError:
            pass
    raise DSConfigError(f"DeepSpeed config not found: {spec} (neither a file nor a name in "
                        f"{os.path.basename(os.fspath(config_dir))}/: {', '.join(names) or 'none there'})")


def load_ds_config(path: str | os.PathLike) -> dict:
    """Read a DeepSpeed JSON file; raise DSConfigError naming the file (and line/key) when it can't be used."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DSConfigError(f"DeepSpeed config not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise DSConfigError(f"{path}: top level must be a JSON object, got {type(cfg).__name__}")
    check_ds_config(cfg, path)
    return cfg


# "auto" values DeepSpeed itself reads and decides: passed through as written.
DS_AUTO_KEYS = ("zero_optimization.zenflow.select_strategy", "zero_optimization.zenflow.select_interval",
                "zero_optimization.zenflow.update_interval", "data_types.keep_in_fp32_modules")
# "auto" values the transformers Trainer fills in (its HfTrainerDeepSpeedConfig), filled in here the same way from
# the flags (resolve_auto); scheduler.params.total_num_steps once the run's length is known (sftbench.schedule).
TRAINER_AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                     "gradient_clipping", "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
                     "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr",
                     "scheduler.params.warmup_max_lr", "scheduler.params.warmup_num_steps",
                     "scheduler.params.total_num_steps", "fp16.enabled", "bf16.enabled",
                     "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                     "zero_optimization.stage3_param_persistence_threshold")
# The transformers Trainer's own defaults (TrainingArguments) for what the harness has no flag for.
TRAINER_DEFAULTS = {"gradient_clipping": 1.0, "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8,
                    "optimizer.params.weight_decay": 0.0, "scheduler.params.warmup_min_lr": 0}


def check_ds_config(cfg: dict, source: str = "<config>") -> None:
    auto = [k for k in _find_auto(cfg) if k not in DS_AUTO_KEYS + TRAINER_AUTO_KEYS]
    if auto:
        # the Trainer's "auto" keys are filled in (resolve_auto) and DeepSpeed's own pass through; any other would
        # be dropped or crash deep inside DeepSpeed
        raise DSConfigError(
            f"{source}: key {auto[0]!r} is \"auto\", which neither the harness (the keys the transformers Trainer "
            f"fills in) nor DeepSpeed resolves. Write an explicit value"
            + (f" (also: {', '.join(auto[1:])})" if len(auto) > 1 else "")
        )
    if cfg.get("fp16", {}).get("enabled") is True and cfg.get("bf16", {}).get("enabled") is True:  # not "auto"
        raise DSConfigError(f"{source}: both fp16.enabled and bf16.enabled are true; enable at most one")
    mb = cfg.get("train_micro_batch_size_per_gpu")
    if mb is not None and mb != "auto" and (not isinstance(mb, int) or mb < 1):
        raise DSConfigError(f"{source}: train_micro_batch_size_per_gpu must be a positive integer, got {mb!r}")
    ga = cfg.get("gradient_accumulation_steps")
    if ga is not None and ga != "auto" and (not isinstance(ga, int) or ga < 1):
        raise DSConfigError(f"{source}: gradient_accumulation_steps must be a positive integer, got {ga!r}")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DSConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    zenflow = zenflow_block(cfg)
    if zenflow is not None and not isinstance(zenflow.get("update_interval"), int):
        given = (f"is {zenflow['update_interval']!r}" if "update_interval" in zenflow
                 else "is not given (DeepSpeed's default: \"auto\")")
        raise DSConfigError(f"{source}: zero_optimization.zenflow.update_interval {given}: ZenFlow then ends each "
                            "optimizer step when it decides (the engine's gradient_accumulation_steps becomes 0), and "
                            "the steps here are a fixed number of micro-batches; give that number (DeepSpeed's "
                            "tutorial: 4)")


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def resolve_auto(cfg: dict, *, world_size: int, micro_batch: int | None, grad_accum: int | None, lr: float | None,
                 lr_warmup_steps: int | None, precision: str, hidden: int, defaults: dict) -> tuple[dict, list[str]]:
    """A copy of ``cfg`` with every "auto" the transformers Trainer fills in filled in as it does, from the harness's
    flags (``defaults``, the ``--ds none`` defaults of sftbench.args.PLAIN_DEFAULTS, where a flag is not given)
    and the Trainer's own defaults where the harness has no flag (``TRAINER_DEFAULTS``), and one line per key for
    the log (``'train_batch_size: "auto" -> 16 (world 2 x micro batch 1 x accumulation 8)'``). The batch keys
    follow DeepSpeed's rule (train_batch_size = world x micro x accumulation), the bucket sizes the model's hidden
    size as the Trainer sets them. ``scheduler.params.total_num_steps`` waits for the run's length
    (``sftbench.schedule.for_run``); DeepSpeed's own "auto" keys pass through."""
    out = copy.deepcopy(cfg)
    lines: list[str] = []
    auto = set(_find_auto(out))

    def fill(key: str, value, why: str) -> None:
        if key in auto:
            _set(out, key, value)
            lines.append(f'{key}: "auto" -> {value!r} ({why})')

    def flag(value, name: str, default_key: str):
        return (value, f"--{name}") if value is not None else (defaults[default_key],
                                                               f"--{name} not given: the harness's default")

    mb, mb_why = flag(micro_batch, "micro-batch", "micro_batch")
    if "train_micro_batch_size_per_gpu" not in auto and isinstance(out.get("train_micro_batch_size_per_gpu"), int):
        mb, mb_why = out["train_micro_batch_size_per_gpu"], "the config's"
    ga, ga_why = flag(grad_accum, "grad-accum", "grad_accum")
    if "gradient_accumulation_steps" not in auto and isinstance(out.get("gradient_accumulation_steps"), int):
        ga, ga_why = out["gradient_accumulation_steps"], "the config's"
    peak, lr_why = flag(lr, "lr", "lr")
    warm, warm_why = flag(lr_warmup_steps, "lr-warmup-steps", "lr_warmup_steps")
    fill("train_micro_batch_size_per_gpu", mb, mb_why)
    fill("gradient_accumulation_steps", ga, ga_why)
    fill("train_batch_size", world_size * mb * ga, f"world {world_size} x micro batch {mb} x accumulation {ga}")
    fill("optimizer.params.lr", peak, lr_why)
    fill("scheduler.params.warmup_max_lr", peak, lr_why)
    fill("scheduler.params.warmup_num_steps", warm, warm_why)
    for key, value in TRAINER_DEFAULTS.items():
        fill(key, value, "the transformers Trainer's default")
    fill("fp16.enabled", precision == "fp16", f"precision {precision}")
    fill("bf16.enabled", precision == "bf16", f"precision {precision}")
    fill("zero_optimization.reduce_bucket_size", hidden * hidden, f"hidden size {hidden} squared, as the Trainer")
    fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden * hidden),
         f"0.9 x hidden size {hidden} squared, as the Trainer")
    fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden,
         f"10 x hidden size {hidden}, as the Trainer")
    return out, lines


def config_precision(cfg: dict) -> str:
    if cfg.get("bf16", {}).get("enabled") or cfg.get("bfloat16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


# DeepSpeed's spellings of the data types (its DtypeEnum), in this project's names.
_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16",
                "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}


def zenflow_block(cfg: dict | None) -> dict | None:
    """The config's ``zero_optimization.zenflow`` block, the one that turns DeepSpeed's ZenFlow on (None: none)."""
    block = _get(cfg or {}, "zero_optimization.zenflow")
    return block if isinstance(block, dict) else None


def grad_accum_dtype(cfg: dict | None) -> str | None:
    """``data_types.grad_accum_dtype`` as fp32/fp16/bf16 (another value lower-cased as given); None where the config
    leaves it to DeepSpeed, which then accumulates in the weights' dtype."""
    value = ((cfg or {}).get("data_types") or {}).get("grad_accum_dtype")
    if value is None:
        return None
    return _DTYPE_NAMES.get(str(value).lower(), str(value).lower())


def apply_precision(cfg: dict, precision: str | None) -> dict:
    """Return a copy with exactly one precision block enabled (``precision`` None keeps the config's own)."""
    if precision is None:
        return copy.deepcopy(cfg)
    if precision not in PRECISIONS:
        raise DSConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out = copy.deepcopy(cfg)
    out.pop("bfloat16", None)  # legacy alias of bf16; one spelling only in the resolved config
    out.setdefault("fp16", {})["enabled"] = precision == "fp16"
    out.setdefault("bf16", {})["enabled"] = precision == "bf16"
    return out


def offload_device(block: Any) -> str | None:
    """The device of an ``offload_optimizer`` / ``offload_param`` block ("cpu", "nvme"); None when it is off."""
    if isinstance(block, dict):
        dev = block.get("device")
        if dev and dev != "none":
            return str(dev)
    return None


def describe(cfg: dict | None) -> dict:
    """The settings the reference table has columns for, read from a (resolved) config. None = no DeepSpeed."""
    if cfg is None:
        return {"zero_stage": None, "offload_optimizer": None, "offload_param": None, "pin_memory": None,
                "overlap_comm": None, "allgather_bucket_size": None, "reduce_bucket_size": None,
                "stage3_max_live_parameters": None, "contiguous_gradients": None, "precision": None}
    zo = cfg.get("zero_optimization", {}) or {}
    stage = zo.get("stage", 0)
    off_opt, off_par = offload_device(zo.get("offload_optimizer")), offload_device(zo.get("offload_param"))
    pin = None
    if off_opt:
        pin = bool(zo["offload_optimizer"].get("pin_memory", False))
    return {
        "zero_stage": stage,
        "offload_optimizer": off_opt,
        "offload_param": off_par,
        "pin_memory": pin,
        "overlap_comm": zo.get("overlap_comm") if stage > 0 else None,
        "allgather_bucket_size": zo.get("allgather_bucket_size") if stage > 0 else None,
        "reduce_bucket_size": zo.get("reduce_bucket_size") if stage > 0 else None,
        "stage3_max_live_parameters": zo.get("stage3_max_live_parameters") if stage == 3 else None,
        "contiguous_gradients": zo.get("contiguous_gradients") if stage > 0 else None,
        "precision": config_precision(cfg),
    }


# Schedulers whose peak LR / warm-up length the --lr / --lr-warmup-steps overrides know how to set.
_WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def apply_overrides(cfg: dict, *, lr: float | None = None, grad_accum: int | None = None,
                    micro_batch: int | None = None, lr_warmup_steps: int | None = None,
                    source: str = "<config>") -> tuple[dict, list[str]]:
    """A copy of ``cfg`` with the harness flags given (not None) written into it, and one line per changed key
    (``"optimizer.params.lr: 1e-05 -> 0.001 (--lr)"``) for the log. A flag the config has no place for is refused
    with DSConfigError naming the file and the key, never dropped."""
    out = copy.deepcopy(cfg)
    changes: list[str] = []

    def put(block: dict, key: str, value, path: str, flag: str) -> None:
        old = block.get(key)
        block[key] = value
        if old != value:
            changes.append(f"{path}: {old!r} -> {value!r} ({flag})")

    for flag, key, value in (("--micro-batch", "train_micro_batch_size_per_gpu", micro_batch),
                             ("--grad-accum", "gradient_accumulation_steps", grad_accum)):
        if value is not None:
            put(out, key, value, key, flag)
    if (micro_batch is not None or grad_accum is not None) and "train_batch_size" in out:
        # DeepSpeed checks train_batch_size = micro x accum x world; it is derived again from the two.
        changes.append(f"train_batch_size: {out.pop('train_batch_size')!r} -> removed (derived from "
                       "micro batch x accumulation x world size)")
    sched = out.get("scheduler") or None
    stype = sched.get("type") if isinstance(sched, dict) else None
    if lr is not None:
        opt = out.get("optimizer")
        if not isinstance(opt, dict) or not isinstance(opt.get("params"), dict):
            raise DSConfigError(f"{source}: --lr needs an optimizer block with params to write the lr into")
        put(opt["params"], "lr", lr, "optimizer.params.lr", "--lr")
        if stype is not None:
            if stype not in _WARMUP_SCHEDULERS:
                raise DSConfigError(f"{source}: scheduler.type {stype!r}: --lr knows how to set the peak of "
                                    f"{', '.join(_WARMUP_SCHEDULERS)} only; set it in the config instead")
            if stype != "WarmupCosineLR":  # the cosine schedule's peak is the optimizer's lr
                put(sched.setdefault("params", {}), "warmup_max_lr", lr, "scheduler.params.warmup_max_lr", "--lr")
    if lr_warmup_steps is not None:
        if stype is None:
            raise DSConfigError(f"{source}: --lr-warmup-steps needs a scheduler block (e.g. WarmupLR); the config "
                                "has none")
        if stype not in _WARMUP_SCHEDULERS:
            raise DSConfigError(f"{source}: scheduler.type {stype!r} has no warmup_num_steps for --lr-warmup-steps")
        put(sched.setdefault("params", {}), "warmup_num_steps", lr_warmup_steps,
            "scheduler.params.warmup_num_steps", "--lr-warmup-steps")
    return out, changes


def peak_lr(cfg: dict) -> float | None:
    """The optimizer's configured lr (the peak of the warm-up schedules), None without an optimizer block."""
    opt = cfg.get("optimizer")
    return opt.get("params", {}).get("lr") if isinstance(opt, dict) else None
