"""``--fused-kernels liger``: the Liger Kernel library's fused Triton kernels in place of a transformers model's
RMSNorm, rotary embedding and gated MLP activation (each its own few elementwise kernels in eager transformers, with
their fp32 casts: on Llama-3.2-1B's graphed ZeRO-1 step these kernels take as long as the GEMMs,
``results/perf_h100/profile_graphed_z1_llama-3.2-1b.md``).

Liger Kernel (``pip install liger-kernel``) keeps one function per transformers ``model_type`` that rebinds the
``forward`` of an existing model's modules and replaces its modeling module's rotary function. It is applied to the
built model before the engine wraps it, so the parameters, their names, the checkpoints and DeepSpeed's hooks stay
as they were. Its loss kernels (``cross_entropy``, ``fused_linear_cross_entropy``) are never turned on here: the
harness computes the loss itself, the same way for every lever.

This module is torch-free at import; Liger (which imports torch and Triton) only inside the functions.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from typing import Callable

# Liger's loss kernels: patched globally (some families default them on) and never used by this harness.
LOSS_KWARGS = ("cross_entropy", "fused_linear_cross_entropy")


def liger_model_types() -> frozenset[str] | None:
    """The ``model_type`` values Liger Kernel has kernels for, or None where it is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_unfit(family: str, model_type: str | None, cuda: bool,
                supported: Callable[[], frozenset[str] | None] = liger_model_types) -> str | None:
    """Why Liger's kernels cannot run on this model (None: they can). ``supported`` is asked last (it imports Liger,
    and Triton with it), only for a transformers model on a GPU."""
    if family != "hf":
        return "not available for this model (Liger Kernel replaces transformers' modules, not Pangu-α's)"
    if not cuda:
        return "Liger Kernel's kernels are Triton GPU kernels (CUDA only)"
    try:
        types = supported()
    except ImportError as e:  # installed, but it (or the Triton it needs) does not import here
        return f"liger-kernel does not import ({type(e).__name__}: {e})"
    if types is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if model_type not in types:
        return f"Liger Kernel has no kernels for model_type '{model_type}'"
    return None


def apply_liger(model) -> str:
    """Liger's kernels on ``model`` in place (its ``model_type``'s function, the loss kernels off); returns what
    was replaced, for the log (``fused_kernels_why``)."""
    from importlib.metadata import version

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    fn = MODEL_TYPE_TO_APPLY_LIGER_FN[model.config.model_type]
    accepted = inspect.signature(fn).parameters
    fn(model=model, **{k: False for k in LOSS_KWARGS if k in accepted})
    return f"liger-kernel {version('liger-kernel')}, {fn.__name__}: {replaced(model)}"


def replaced(model) -> str:
    """Which of the model's modules and functions now run Liger's code, counted by kind."""
    counts: dict[str, int] = {}
    for m in model.modules():
        fwd = getattr(getattr(m, "forward", None), "__func__", None)
        if fwd is not None and (fwd.__module__ or "").startswith("liger_kernel"):
            kind = fwd.__qualname__.split(".")[0]
            counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{n} {kind}" for kind, n in sorted(counts.items())]
    rope = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
    if rope is not None and (getattr(rope, "__module__", "") or "").startswith("liger_kernel"):
        parts.append("the rotary embedding")
    return ", ".join(parts) or "nothing"
