"""What the harness reads from, and checks in, a DeepSpeed engine after ``deepspeed.initialize``.

* ``loss_scale(engine)``: the fp16 dynamic loss scale now. DeepSpeed's ZeRO optimizers expose it as ``cur_scale``;
  its ZeRO-0 ``FP16_Optimizer`` (0.19) keeps it in ``loss_scale_config`` behind a ``loss_scale`` property.
* ``fp16_zero0_scale_defect(engine)``: a message when the engine is known not to train. In DeepSpeed 0.19.x,
  ``engine.backward`` multiplies the loss by the loss scale only for ZeRO optimizers (and torch autocast); with fp16
  and ZeRO stage 0 it calls ``loss.backward()`` on the unscaled loss, while ``FP16_Optimizer.step`` still divides
  the gradients by the scale (2^initial_scale_power). The updates are that many times too small and the loss stays
  flat (measured: 30 steps of Pangu-350M on 3 GPUs, loss 10.82 -> 10.83; bf16 drops to ~9 by then). Upstream:
  DeepSpeed pull request 8393. The step still does all its work, so its time and memory are the step's cost; the
  run is flagged rather than patched, because the harness runs the engine as configured.
* ``check_finite_update(...)``: a step whose loss is not finite and whose update the engine applied anyway (nothing
  skipped it) raises ``NonFiniteUpdate``: the weights are then no longer finite, and every later step would only
  measure NaNs. Where the engine skips such a step (fp16's loss scaler; DeepSpeed's ZeRO-1/2 with
  ``bf16.check_grad_overflow: true``; its BF16 optimizer on an invalid gradient norm) the run goes on, as DeepSpeed
  decides.
* ``silence_startup_noise()``: drops DeepSpeed's start-up messages that say nothing to the user (``STARTUP_NOISE``,
  ``STARTUP_NOISE_WARNINGS``).
"""
from __future__ import annotations

import inspect
import logging
import math
import numbers
import warnings
from typing import Any

from sftbench.dsconfig import describe


def loss_scale(engine: Any) -> float | None:
    """The optimizer's current fp16 loss scale, or None where it has none (bf16, fp32, no scaler)."""
    opt = getattr(engine, "optimizer", None)
    for name in ("cur_scale", "loss_scale"):
        v = getattr(opt, name, None)
        if hasattr(v, "item"):  # a 0-d tensor in some optimizers
            v = v.item()
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            return float(v)
    return None


def _backward_scales_fp16_optimizer(engine_cls: type) -> bool:
    """Whether the engine class's ``backward`` hands the loss to the optimizer (which scales it), as older DeepSpeed
    did and as the upstream fix does; 0.19.x's backward never calls ``optimizer.backward``."""
    try:
        src = inspect.getsource(engine_cls.backward)
    except (OSError, TypeError, AttributeError):
        return True  # source not available: nothing to say
    return "optimizer.backward(" in src


def _zero0_fp16_message(what: str) -> str:
    """The warning, whichever way the defect was found (``what`` says which DeepSpeed, or the scale it dropped)."""
    return (f"fp16 with ZeRO stage 0 {what}: engine.backward does not apply the loss scale that FP16_Optimizer.step "
            "divides the gradients by, so the model does not learn (upstream DeepSpeed pull request 8393). Step time "
            "and memory are still the step's cost; to train, use bf16 or ZeRO stage 1 or more.")


def fp16_zero0_scale_defect(engine: Any) -> str | None:
    """A warning when this engine is fp16 with ZeRO stage 0 and its backward drops the loss scale (see the module
    docstring), else None."""
    try:
        fp16 = bool(engine.fp16_enabled())
        zero = bool(engine.zero_optimization())
    except AttributeError:
        return None  # not a DeepSpeed engine
    scale = loss_scale(engine)
    if not fp16 or zero or scale is None or _backward_scales_fp16_optimizer(type(engine)):
        return None
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        return None  # torch autocast brings its own GradScaler, which engine.backward applies
    return _zero0_fp16_message(f"(loss scale {scale:g})")


def warnings_of(meta: dict) -> list[str]:
    """A run's engine warnings from its meta record. For logs written before the meta had ``warnings`` (no key, or
    null), the ZeRO-0 fp16 defect is inferred from the record: fp16, ZeRO stage 0, DeepSpeed 0.19.x (measured on
    0.19.8)."""
    if meta.get("warnings") is not None:  # train.py writes a list, empty when the checks found nothing
        return [str(w) for w in meta["warnings"]]
    ds_version = str((meta.get("versions") or {}).get("deepspeed") or "")
    engine = (meta.get("optimizations") or {}).get("engine")
    if meta.get("precision") == "fp16" and meta.get("zero_stage") == 0 and engine == "deepspeed" \
            and ds_version.startswith("0.19."):
        return [_zero0_fp16_message(f"on DeepSpeed {ds_version}")]
    return []


# DeepSpeed start-up messages that tell the user nothing, matched whole (a changed wording shows again, so no
# warning that matters is hidden by a broad pattern).
STARTUP_NOISE = (
    # WarmupLR's constructor asks itself for the learning rate before its first step, on every rank
    "Attempting to get learning rate from scheduler before it has started",
)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in STARTUP_NOISE


# Python warnings raised inside DeepSpeed for torch APIs it calls, not for anything the user wrote: (category,
# message regex matched from the start). Shown once per rank per run, they say nothing the user can act on.
STARTUP_NOISE_WARNINGS = (
    # DeepSpeed 0.19's ZeRO all-gather on torch 2.13
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. Please use "
                    r"`torch\.distributed\.all_gather_single` instead\.$"),
)


def silence_startup_noise(logger_name: str = "DeepSpeed") -> None:
    """Drop DeepSpeed's STARTUP_NOISE messages from its logger and the STARTUP_NOISE_WARNINGS (every other message
    and warning, DeepSpeed's included, stays)."""
    log = logging.getLogger(logger_name)
    if not any(isinstance(f, _NoiseFilter) for f in log.filters):
        log.addFilter(_NoiseFilter())
    for category, pattern in STARTUP_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


class NonFiniteUpdate(RuntimeError):
    """A step's loss was not finite and the optimizer applied its update: the run cannot go on meaningfully."""


def check_finite_update(step: int, loss: float, skipped: bool, ds_cfg: dict | None, ds_path: str | None) -> None:
    """Raise ``NonFiniteUpdate`` when step ``step``'s loss is NaN/inf and the engine did not skip its update. The
    message names the config key that makes DeepSpeed skip such steps where the config turned it off."""
    if math.isfinite(loss) or skipped:
        return
    hint = ""
    bf16 = (ds_cfg or {}).get("bf16") or {}
    stage = int(describe(ds_cfg)["zero_stage"] or 0)  # the ZeRO stage as the log and the report read it
    if bf16.get("enabled") and bf16.get("check_grad_overflow") is False and stage in (1, 2):
        hint = (f"; {ds_path} sets bf16.check_grad_overflow to false (it saves ZeRO-1/2 a per-parameter check and "
                "a host sync every step): set it to true to have DeepSpeed skip such steps instead")
    raise NonFiniteUpdate(f"step {step}: the loss is {loss} and the optimizer applied the step's update (nothing "
                          f"skipped it), so the weights are no longer finite; the run stopped{hint}")
