"""The learning-rate schedule of a run (``--lr-schedule``), as DeepSpeed's own schedulers: torch-free.

``cosine`` (DeepSpeed's ``WarmupCosineLR``) and ``linear`` (``WarmupDecayLR``) warm up over the config's
``warmup_num_steps`` (or ``--lr-warmup-steps``) and then decay to 0 over the run's length, which ``--max-steps`` or
``--epochs`` gives: the LR logged at the last step (after its update) is 0, as the transformers Trainer's schedules
end. ``constant`` is ``WarmupLR`` (the reference's: constant after the warm-up); ``config`` keeps the config's
scheduler block as written. ``auto`` (the default) is ``cosine`` where the config's schedule never decays (a
``WarmupLR`` block, or none) and the config's own where it already decays. Every change to the config is a line
for the log and the console, as the other overrides are. The sweep and the bench scripts pass ``config``: the
reference's schedule (the LR's value costs nothing measurable, so timings are the same either way).

The plain loop (``--ds none``) has the same shapes in torch (``sftbench.plain``): ``lr_factor`` is the one formula.
A resumed run restores the scheduler's position; its length comes from this run's ``--max-steps``/``--epochs``.
"""
from __future__ import annotations

import copy
import math

SCHEDULES = ("auto", "config", "constant", "linear", "cosine")
DS_TYPES = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}
NON_DECAYING = ("WarmupLR",)  # DeepSpeed schedules that stay at their peak after the warm-up


class ScheduleError(ValueError):
    """A --lr-schedule that cannot be applied (names the flag, the file and the key)."""


def check(kind: str) -> None:
    if kind not in SCHEDULES:
        raise ScheduleError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")


def resolve(kind: str, cfg: dict | None) -> str:
    """What ``kind`` means for this config: ``config`` or one of ``DS_TYPES``' keys (``auto`` decided)."""
    check(kind)
    if kind != "auto":
        return kind
    sched = (cfg or {}).get("scheduler")
    stype = sched.get("type") if isinstance(sched, dict) else None
    return "cosine" if stype is None or stype in NON_DECAYING else "config"


def apply(cfg: dict, kind: str, total_steps: int, source: str = "<config>") -> tuple[dict, list[str]]:
    """A copy of ``cfg`` whose scheduler block runs ``kind`` over ``total_steps`` optimizer steps, and one line per
    changed key (the overrides' format). The warm-up keeps the config's block's length, start and shape; the peak
    is the block's ``warmup_max_lr``, else the optimizer's lr."""
    kind = resolve(kind, cfg)
    out = copy.deepcopy(cfg)
    if kind == "config":
        return out, []
    opt = out.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("params"), dict) or "lr" not in opt["params"]:
        raise ScheduleError(f"{source}: --lr-schedule {kind} needs an optimizer block with params.lr (the peak)")
    old = out.get("scheduler") if isinstance(out.get("scheduler"), dict) else {}
    params = old.get("params") or {}
    peak = params.get("warmup_max_lr", opt["params"]["lr"])
    warm = int(params.get("warmup_num_steps", 0))
    start = params.get("warmup_min_lr", 0.0)
    new = {"warmup_num_steps": warm, "warmup_type": params.get("warmup_type", "linear")}
    if kind == "cosine":  # the peak is the optimizer's lr; the start and the floor are ratios of it
        new.update(total_num_steps=max(total_steps, warm + 1), warmup_min_ratio=start / peak if peak else 0.0,
                   cos_min_ratio=0.0)
    else:
        new.update(warmup_min_lr=start, warmup_max_lr=peak)
        if kind == "linear":  # WarmupDecayLR reaches 0 one iteration later than the cosine: see lr_factor
            new["total_num_steps"] = max(total_steps - 1, warm + 1)
    changes = []
    if opt["params"]["lr"] != peak:
        changes.append(f"optimizer.params.lr: {opt['params']['lr']!r} -> {peak!r} (--lr-schedule {kind}: the peak)")
        opt["params"]["lr"] = peak
    out["scheduler"] = {"type": DS_TYPES[kind], "params": new}
    if old.get("type") != DS_TYPES[kind]:
        changes.append(f"scheduler.type: {old.get('type')!r} -> {DS_TYPES[kind]!r} (--lr-schedule {kind})")
    for key in sorted(set(new) | set(params)):
        if params.get(key) != new.get(key):
            changes.append(f"scheduler.params.{key}: {params.get(key)!r} -> {new.get(key)!r} (--lr-schedule {kind}, "
                           f"{total_steps} steps)")
    return out, changes


def lr_factor(kind: str, done: int, warmup_steps: int, total_steps: int) -> float:
    """The plain loop's LR as a share of its peak after ``done`` optimizer steps (torch's LambdaLR argument; 0 for
    the first step): a linear warm-up reaching the peak at ``warmup_steps - 1``, then ``constant`` (and ``config``,
    the plain loop's own: the reference's) stays there, ``linear`` and ``cosine`` reach 0 at ``done ==
    total_steps``, the LR logged with the last step."""
    warm = max(1, warmup_steps)
    if kind in ("constant", "config") or done < warm - 1:
        return min(1.0, (done + 1) / warm)
    progress = min(1.0, (done - (warm - 1)) / max(1, total_steps - (warm - 1)))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_shape(cfg: dict, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) as DeepSpeed derives them from a config's batch keys, before the
    engine exists (``train_batch_size`` = micro x accumulation x world)."""
    micro, ga = cfg.get("train_micro_batch_size_per_gpu"), cfg.get("gradient_accumulation_steps")
    total = cfg.get("train_batch_size")
    if micro is None and ga is None:
        micro, ga = (total // world_size if total else 1), 1
    elif micro is None:
        micro = total // (ga * world_size) if total else 1
    elif ga is None:
        ga = total // (micro * world_size) if total else 1
    return int(micro), int(ga)


def run_steps(max_steps: int | None, epochs: float | None, n_train: int, world_size: int, micro: int,
              grad_accum: int) -> int:
    """The run's optimizer steps in all, as train.py counts them: ``--epochs``, else ``--max-steps`` (0 = one
    epoch)."""
    from sftbench.data import steps_for_epochs, steps_per_epoch

    if epochs is not None:
        return steps_for_epochs(epochs, n_train, world_size, micro * grad_accum)
    return max_steps or steps_per_epoch(n_train, micro, world_size, grad_accum)


def for_run(cfg: dict | None, kind: str, *, max_steps: int | None, epochs: float | None, n_train: int,
            world_size: int, micro_batch: int | None, grad_accum: int | None,
            source: str = "<config>") -> tuple[dict | None, int, list[str], str]:
    """train.py's one call, once the data is known and before the engine: (the config with the schedule applied,
    the run's steps, the config keys changed, a line saying which schedule runs). ``cfg`` None is the plain loop
    (``micro_batch``/``grad_accum`` its own)."""
    if cfg is None:
        total = run_steps(max_steps, epochs, n_train, world_size, micro_batch or 1, grad_accum or 1)
        shape = "cosine" if kind == "auto" else kind
        shape = "constant after the warm-up" if shape in ("config", "constant") else f"{shape} to 0 at step {total}"
        return None, total, [], f"lr schedule: {shape} (--lr-schedule {kind})"
    micro, ga = batch_shape(cfg, world_size)
    total = run_steps(max_steps, epochs, n_train, world_size, micro, ga)
    out, changes = apply(cfg, kind, total, source)
    params = (out.get("scheduler") or {}).get("params") or {}
    if params.get("total_num_steps") == "auto":  # a Trainer-style config: the run's length, as the Trainer sets it
        params["total_num_steps"] = total
        changes.append(f'scheduler.params.total_num_steps: "auto" -> {total} (the run\'s steps)')
    sched = out.get("scheduler") or {}
    warm = (sched.get("params") or {}).get("warmup_num_steps")
    if str(sched.get("type", "")).startswith("Warmup") and isinstance(warm, int) and warm < 2:
        # DeepSpeed's Warmup* schedulers take max(2, warmup_num_steps): said, since the config cannot say it
        changes.append(f"scheduler.params.warmup_num_steps: {warm} runs as 2 (DeepSpeed's {sched['type']} warms up "
                       "over at least 2 steps; step 1 trains at the warm-up's start value)")
    resolved = resolve(kind, cfg)
    if resolved in ("linear", "cosine"):
        what = f"{sched['type']} to 0 at step {total}"
    else:
        what = f"the config's {sched.get('type') or 'none (constant lr)'}" if resolved == "config" else sched["type"]
    return out, total, changes, f"lr schedule: {what} (--lr-schedule {kind})"
