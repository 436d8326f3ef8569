"""Speed levers that change how the model runs, not what it computes, applied as the lever plan decided them
(``sftbench/levers.py``): torch.compile of the model, and DeepSpeed's throughput timer next to CUDA graphs (the graphs
themselves are in graphs.py; DeepSpeed's patched internals in ds_patches.py).

``--compile blocks`` compiles each transformer block in place (``nn.Module.compile``): the 24-40 identical blocks
share one compiled graph, so compilation takes seconds, the parameter names and the module tree that DeepSpeed,
checkpoints and hooks see stay exactly as they were, and ZeRO's gradient hooks run between blocks as in eager mode.
``--compile model`` compiles the whole model (``engine.compile()`` under DeepSpeed, which is DeepSpeed's own
supported way), one graph with the embedding, loss and every block. ``--compile-mode`` is torch.compile's ``mode``:
the CUDA-graph modes (``reduce-overhead``, ``max-autotune``) are refused (``levers.check_compile``): in this loop
gradients accumulate over micro-batches into tensors that the next graph replay overwrites.

This module is torch-free at import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def apply_timer(ds_cfg: dict | None, plan) -> dict | None:
    """The DeepSpeed config with its throughput timer off where the plan says so (``ds_throughput_timer``: the
    timer synchronises the device at the start and end of every micro-batch, which stalls replayed graphs; the
    harness times steps itself). The logged config shows the change."""
    if ds_cfg is None or not plan.on("ds_throughput_timer"):
        return ds_cfg
    return {**ds_cfg, "timers": {"throughput": {"enabled": False}}}


def compile_blocks(blocks: list[torch.nn.Module], mode: str = "default") -> int:
    """Compile every block (the model seam's ``blocks(model)``: its repeated decoder layers) in place before the
    engine wraps the model; returns how many were compiled."""
    kwargs = {} if mode == "default" else {"mode": mode}
    for b in blocks:
        b.compile(dynamic=False, **kwargs)
    return len(blocks)


def compile_engine(engine, target: str, mode: str, deepspeed: bool) -> None:
    """``--compile model`` after the engine exists (blocks are compiled before, see ``compile_blocks``)."""
    if target != "model":
        return
    kwargs = {"dynamic": False} if mode == "default" else {"dynamic": False, "mode": mode}
    if deepspeed:
        engine.compile(compile_kwargs=kwargs)
    else:
        import torch
        engine.model = torch.compile(engine.model, **kwargs)


def situation(ds_cfg: dict | None, *, precision: str, world_size: int, device, seq_len: int, micro_batch: int,
              spec, source: str | None = None, right_padded: bool = True, patches_why: str | None = None,
              engine_facts=None, grad_checkpointing: bool = False, packed: bool = False):
    """The lever plan's ``Situation`` for a run on this rank's ``device`` (train.py's and the bare loop's): its GPU
    class from the device's compute capability, the GPU's memory, and the memory predictor as the oracle (GPU MiB
    per rank with and without the CUDA graphs and the coalesced window, from ``model``'s shape before it is built;
    none where the shape cannot be read)."""
    import torch

    from sftbench import fused, memory
    from sftbench.fmt import MIB
    from sftbench.levers import Situation, gpu_class

    cuda = device.type == "cuda"
    flash = right_padded and not packed  # packed rows always pass their block-diagonal mask
    oracle = None
    if cuda:
        shape = memory.ModelShape.of(spec.shape())

        def gpu_mib(graphs: bool, window: bool) -> float:
            return memory.predict(shape, memory.RunShape(ds_cfg, world_size, precision, seq_len=seq_len,
                                                         micro_batch=micro_batch, flash_attention=flash,
                                                         cuda_graphs=graphs, coalesce_reduction=window,
                                                         grad_checkpointing=grad_checkpointing)).gpu_mib
        oracle = gpu_mib
    return Situation.of_config(
        ds_cfg, world_size=world_size, cuda=cuda, precision=precision, source=source, right_padded=right_padded,
        gpu=gpu_class(torch.cuda.get_device_capability(device)) if cuda else None, gpu_mib=oracle,
        gpu_total_mib=torch.cuda.get_device_properties(device).total_memory / MIB if cuda else None,
        patches_why=patches_why, engine=engine_facts, capabilities=frozenset(spec.capabilities), family=spec.family,
        packed=packed, fused_unfit=fused.liger_unfit(spec.family, spec.model_type, cuda))
