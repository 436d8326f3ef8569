"""Speed levers that change how the model runs, not what it computes: torch.compile of the model, and DeepSpeed's
throughput timer next to CUDA graphs (``resolve_ds_timers``; the graphs themselves are in graphs.py).

``--compile blocks`` compiles each transformer block in place (``nn.Module.compile``): the 24-40 identical blocks
share one compiled graph, so compilation takes seconds, the parameter names and the module tree that DeepSpeed,
checkpoints and hooks see stay exactly as they were, and ZeRO's gradient hooks run between blocks as in eager mode.
``--compile model`` compiles the whole model (``engine.compile()`` under DeepSpeed, which is DeepSpeed's own
supported way), one graph with the embedding, loss and every block. ``--compile-mode`` is torch.compile's ``mode``:
The CUDA-graph modes (``reduce-overhead``, ``max-autotune``) are refused: in this loop gradients accumulate over
micro-batches into tensors that the next graph replay overwrites, and torch stops with "accessing tensor output of
CUDAGraphs that has been overwritten" (measured on an H200 with both targets, docs/performance.md).

``--compile auto`` (the default) is ``off``: the earlier 1.25-1.47x of ``model`` on bf16 ZeRO-1 came from 3 measured
steps on shared hosts, and on the 1 x H200 host with 20+ measured steps it saved nothing while costing 40-60 s of
compilation per run (docs/performance.md). ``--compile model|blocks`` still choose it by hand.

Whether a lever pays is measured (bench/levers.py, docs/performance.md); the run log records which were on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing this module (argument checks) must not import torch
    import torch

COMPILE_TARGETS = ("auto", "off", "blocks", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


class SpeedError(ValueError):
    pass


CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile(target: str, mode: str) -> None:
    if target not in COMPILE_TARGETS:
        raise SpeedError(f"--compile must be one of {', '.join(COMPILE_TARGETS)}, got {target!r}")
    if mode not in COMPILE_MODES:
        raise SpeedError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode in CUDAGRAPH_MODES:
        raise SpeedError(f"--compile-mode {mode} uses CUDA graphs, which fail in this loop: gradients accumulate "
                         f"over micro-batches into tensors the next graph replay overwrites (torch: 'accessing "
                         f"tensor output of CUDAGraphs that has been overwritten'); use default or "
                         f"max-autotune-no-cudagraphs")


def deepcompile_asked(ds_cfg: dict | None) -> bool:
    """Whether the DeepSpeed config turns on DeepCompile (``compile.deepcompile``)."""
    block = (ds_cfg or {}).get("compile")
    return isinstance(block, dict) and bool(block.get("deepcompile"))


def resolve_compile(target: str, on_cpu: bool, ds_cfg: dict | None = None,
                    source: str | None = None) -> tuple[str, str]:
    """The compile target to use and why: ``auto`` is ``off``, since no configuration was measured faster compiled
    with 20 or more measured steps (docs/performance.md: on the 1 x H200 host it saved nothing and costs 40-60 s of
    compilation per run; CUDA graphs, ``--cuda-graphs``, remove the launch cost it was meant to cut).

    A DeepSpeed config with ``compile.deepcompile: true`` decides otherwise: DeepSpeed runs DeepCompile only from
    ``engine.compile()`` and, without that call, trains eager with one log line. So ``auto`` becomes ``model`` there,
    and a flag that would leave the key without effect (``off``, ``blocks``), or a CPU run (DeepSpeed has DeepCompile
    for CUDA only), is refused naming the key (``source``: the config's path, for the message)."""
    if deepcompile_asked(ds_cfg):
        cfg_name = source or "the DeepSpeed config"
        where = f"{cfg_name} sets compile.deepcompile"
        if on_cpu:
            raise SpeedError(f"{where}, which DeepSpeed runs on CUDA GPUs only; remove the key for a CPU run")
        if target in ("off", "blocks"):
            raise SpeedError(f"--compile {target}, but {where}: DeepCompile runs only through engine.compile() "
                             "(--compile model, or auto); drop the flag or the key")
        return "model", (f"auto: {where} (DeepCompile runs through engine.compile())" if target == "auto"
                         else f"asked for; DeepCompile: {where}")
    if target != "auto":
        return target, "asked for"
    if on_cpu:
        return "off", "auto: CPU run"
    return "off", "auto: not measured faster with >= 20 measured steps (docs/performance.md)"


def resolve_ds_timers(ds_cfg: dict | None, graphs_on: bool) -> tuple[dict | None, str | None]:
    """DeepSpeed's throughput timer, off where the micro-batch runs as CUDA graphs unless the config says otherwise;
    returns the config and what was done (None: nothing). The timer is on by default and synchronises the device at
    the start and end of every micro-batch (``timers.throughput.synchronized``) for a number the harness does not
    read (it times each step itself, with one synchronisation). A replayed graph lets the host queue the next work
    while the GPU runs, and those syncs stop it: on the H200 turning the timer off gave 1.11x (Pangu-2.6B) and 1.08x
    (350M) per step by the median with graphs on (the step ranges overlap, so not decided by those steps), and
    nothing eager (0.99x / 1.01x), where the host is the bottleneck anyway (docs/performance.md). A config with a
    ``timers`` block keeps what it says; the logged config shows the change."""
    if ds_cfg is None or not graphs_on or "timers" in ds_cfg:
        return ds_cfg, None
    return ({**ds_cfg, "timers": {"throughput": {"enabled": False}}},
            "DeepSpeed's throughput timer off (timers.throughput.enabled=false: its two device syncs per micro-batch "
            "stall the replayed graphs; the harness times steps itself; a 'timers' block in the config keeps "
            "DeepSpeed's)")


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the last one is the query layer): the units compiled by ``--compile blocks``."""
    core = getattr(model, "transformer", model)
    blocks = list(getattr(core, "h", []))
    if not blocks:
        raise SpeedError(f"{type(model).__name__} has no transformer blocks (expected .transformer.h)")
    return blocks


def compile_blocks(model: torch.nn.Module, mode: str = "default") -> int:
    """Compile every block in place before the engine wraps the model; returns how many were compiled."""
    kwargs = {} if mode == "default" else {"mode": mode}
    blocks = blocks_of(model)
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
