"""Speed levers that change how the model runs, not what it computes: torch.compile of the model, DeepSpeed's
throughput timer next to CUDA graphs (``resolve_ds_timers``; the graphs themselves are in graphs.py), the
gradient norm of DeepSpeed's ZeRO-1/2 optimizer in one multi-tensor kernel (``resolve_grad_norm``), and ZeRO-0's
inf/NaN check of the gradients in one pass, and optimizer offload's with one sync (``resolve_overflow_check``).

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


# Both one-pass levers (--grad-norm, --overflow-check) take these: DeepSpeed's per-gradient loop, or one pass.
ONE_PASS_MODES = ("auto", "foreach", "deepspeed")

# What the one-kernel norm measured (docs/performance.md), for the log's grad_norm_why.
GRAD_NORM_MEASURED = "measured faster on Pangu-2.6B/350M ZeRO-1, 1 x H200 (docs/performance.md)"


def _check_one_pass(flag: str, mode: str) -> None:
    if mode not in ONE_PASS_MODES:
        raise SpeedError(f"{flag} must be one of {', '.join(ONE_PASS_MODES)}, got {mode!r}")


def check_grad_norm(mode: str) -> None:
    _check_one_pass("--grad-norm", mode)


def _by_name_or_unfit(flag: str, mode: str, off: str, on: str, unfit_of, engine, on_cuda: bool,
                      named: bool = False) -> tuple[bool, str] | None:
    """What every engine lever decides alike: ``off`` keeps DeepSpeed's code; ``on`` applies the lever where it fits
    (``unfit_of(engine)`` is None) and is refused (SpeedError) where it does not; ``auto`` keeps DeepSpeed's code
    where it does not fit or on CPU (measured on the GPU only). None: ``auto`` on a GPU, for the lever's own rules.
    ``named``: the why names the mode asked for (``on: asked for``)."""
    if mode == off:
        return False, f"{off}: asked for" if named else "asked for"
    unfit = unfit_of(engine)
    if mode == on:
        if unfit:
            raise SpeedError(f"{flag} {on} does not apply: {unfit}; use auto or {off}")
        return True, f"{on}: asked for" if named else "asked for"
    if unfit:
        return False, f"auto: {unfit}"
    if not on_cuda:
        return False, "auto: CPU run (measured on the GPU only)"
    return None


def _resolve_one_pass(flag: str, mode: str, unfit_of, engine, on_cuda: bool, measured: str) -> tuple[bool, str]:
    """What both one-pass levers decide alike: ``deepspeed`` keeps DeepSpeed's code; ``foreach`` applies the lever
    where it fits (``unfit_of(engine)`` is None) and is refused (SpeedError) where it does not; ``auto`` applies it
    on a GPU where it fits (``measured``: the evidence, for the log) and keeps DeepSpeed's code elsewhere."""
    _check_one_pass(flag, mode)
    decided = _by_name_or_unfit(flag, mode, "deepspeed", "foreach", unfit_of, engine, on_cuda)
    return decided or (True, f"auto: {measured}")


def _other_signature(method, expected: tuple[str, ...]) -> str | None:
    """Why a DeepSpeed method a one-pass lever replaces does not take the arguments the replacement takes (None: it
    does), so another DeepSpeed version's method is kept rather than replaced by a wrong one."""
    import inspect
    params = tuple(inspect.signature(method).parameters)
    if params != expected:
        return f"this DeepSpeed's {method.__name__} takes ({', '.join(params)}), not ({', '.join(expected)})"
    return None


def foreach_norm_unfit(engine) -> str | None:
    """Why the engine's gradient norm cannot be computed by ``foreach_grad_norm`` (None: it can). It replaces
    DeepSpeed's ZeRO-1/2 ``get_grad_norm_direct`` on GPU-resident partitions only; ZeRO-0's optimizers have their
    own code (the fused one, with FusedAdam on a GPU, takes one flat tensor's norm), so do ZeRO-3 and the BF16
    optimizer, and optimizer offload computes the norm on the CPU."""
    if not hasattr(engine, "zero_optimization"):  # the plain loop; it may run where DeepSpeed is not installed
        return "the plain loop (--ds none), whose clip_grad_norm_ is torch's multi-tensor norm already"
    opt = getattr(engine, "optimizer", None)
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return (f"the engine's optimizer is {type(opt).__name__}, not DeepSpeed's ZeRO-1/2 one (ZeRO-0's fused "
                "optimizer takes one flat tensor's norm; ZeRO-3 and the BF16 optimizer have their own code)")
    if opt.cpu_offload:
        return "optimizer offload: DeepSpeed computes the norm over the CPU partitions"
    return _other_signature(opt.get_grad_norm_direct, ("gradients", "params", "norm_type"))


def resolve_grad_norm(mode: str, engine, on_cuda: bool) -> tuple[bool, str]:
    """Whether to compute the gradient norm with ``foreach_grad_norm``, and why. ``auto``: on a GPU wherever it
    fits the engine (``foreach_norm_unfit``); ``foreach``: wherever it fits, refused (SpeedError) where it does not;
    ``deepspeed``: DeepSpeed's own code."""
    return _resolve_one_pass("--grad-norm", mode, foreach_norm_unfit, engine, on_cuda, GRAD_NORM_MEASURED)


def foreach_grad_norm(opt) -> None:
    """Replace the ZeRO-1/2 optimizer's ``get_grad_norm_direct`` (on this instance) by the same L2 norm from one
    multi-tensor kernel. DeepSpeed copies each of the partition's gradients to fp64 and reduces the copy alone: on
    Pangu-2.6B that is 517 casts writing 21 GB and 517 reductions per step (19 ms of GPU time on an H200, plus ~1,000
    launches on the host). Here ``torch._foreach_norm`` reads the bf16 gradients once and sums each tensor's squares
    in fp64 as it reads them, so the precision is DeepSpeed's and only the order of the sums differs. The same
    parameters are counted (zero-padding entries, pipeline replicas and other model-parallel ranks' copies left out,
    as DeepSpeed leaves them), the same all-reduces run, and a non-finite norm becomes -1 as in DeepSpeed. The
    infinity norm keeps DeepSpeed's code."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    deepspeeds = opt.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return deepspeeds(gradients, params, norm_type)
        counted = []
        grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
        for g, p in zip(grads, params):
            if hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated:
                continue
            if is_model_parallel_parameter(p) or opt.model_parallel_rank == 0:
                counted.append(g.detach())
        if counted:
            norms = torch._foreach_norm(counted, 2, dtype=torch.float64)
            total = torch.stack(norms).square().sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=opt.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=opt.device)
        return total

    opt.get_grad_norm_direct = get_grad_norm_direct


# What the one-pass inf/NaN check measured (docs/performance.md), for the log's overflow_check_why.
OVERFLOW_CHECK_MEASURED = "measured faster on Pangu-2.6B/350M ZeRO-0, 1 x H200 (docs/performance.md)"
# The same for ZeRO-1/2 + optimizer offload (``offload_overflow_check``).
OFFLOAD_OVERFLOW_MEASURED = (
    "measured faster on ZeRO-2 + optimizer offload (1 x H200, bf16, window and graphs on, same call, the same losses: "
    "Pangu-350M 1.29x per step, decided by 38 measured steps; Pangu-2.6B 1.08x and 1.07x by the medians of two "
    "calls; docs/performance.md)")


def check_overflow_check(mode: str) -> None:
    _check_one_pass("--overflow-check", mode)


def foreach_overflow_unfit(engine) -> str | None:
    """Why ``foreach_overflow_check`` cannot replace the engine's inf/NaN check of the gradients (None: it can). It
    covers ZeRO-0's FP16 optimizers (bf16 and fp16; DeepSpeed's ``CheckOverflow``), whose check no config key turns
    off (``bf16.check_grad_overflow`` is read by ZeRO-1/2 only, and the shipped ZeRO-1/2 configs set it false), and
    ZeRO-1/2 with optimizer offload, whose check runs per gradient as it goes to the host whatever that key says.
    ZeRO-1/2 without offload check their partitions on the device already, with one sync."""
    if not hasattr(engine, "zero_optimization"):
        return "the plain loop (--ds none) has no per-gradient check (fp16: torch's GradScaler checks in one pass)"
    opt = getattr(engine, "optimizer", None)
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.utils import CheckOverflow
    if _offloading_zero(opt):
        return (_other_signature(opt.update_offload_overflow_tracker, ("grad",))
                or _other_signature(opt.has_overflow, ("partition_gradients",)))
    if not isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return (f"the engine's optimizer is {type(opt).__name__}, not one of ZeRO-0's FP16 optimizers nor ZeRO-1/2 "
                "with optimizer offload (ZeRO-1/2 on the GPU check their partitions in one pass already; ZeRO-3, "
                "the BF16 optimizer and fp32 have their own code or none)")
    checker = getattr(opt, "overflow_checker", None)
    if not isinstance(checker, CheckOverflow):
        return f"the optimizer's overflow checker is {type(checker).__name__}, not DeepSpeed's CheckOverflow"
    return _other_signature(checker.has_overflow_serial, ("params",))


def _offloading_zero(opt) -> bool:
    """Whether ``opt`` is DeepSpeed's ZeRO-1/2 optimizer with optimizer offload, whose check
    ``offload_overflow_check`` replaces (the one place that tells it from ZeRO-0's FP16 optimizers)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    return isinstance(opt, DeepSpeedZeroOptimizer) and bool(opt.cpu_offload)


def resolve_overflow_check(mode: str, engine, on_cuda: bool) -> tuple[bool, str]:
    """Whether to check the gradients for inf/NaN with ``foreach_overflow_check``, and why. ``auto``: on a GPU
    wherever it fits the engine (``foreach_overflow_unfit``), as measured faster there (ZeRO-0:
    ``OVERFLOW_CHECK_MEASURED``; optimizer offload: ``OFFLOAD_OVERFLOW_MEASURED``); ``foreach``: wherever it fits,
    refused (SpeedError) where it does not; ``deepspeed``: DeepSpeed's own code."""
    # The plain loop may run where DeepSpeed is not installed: only an engine's optimizer is looked at.
    offload = hasattr(engine, "zero_optimization") and _offloading_zero(getattr(engine, "optimizer", None))
    measured = OFFLOAD_OVERFLOW_MEASURED if offload else OVERFLOW_CHECK_MEASURED
    return _resolve_one_pass("--overflow-check", mode, foreach_overflow_unfit, engine, on_cuda, measured)


def foreach_overflow_check(opt) -> None:
    """Replace the ZeRO-0 FP16 optimizer's per-gradient inf/NaN check (``CheckOverflow.has_overflow_serial``, on this
    instance) by one pass with one host sync. DeepSpeed's loop reduces each gradient alone and turns each result into
    a Python bool: on Pangu-2.6B, 517 device syncs and ~2,000 launches per step, with the GPU idle in between. Here
    one ``torch._foreach_norm`` with fp64 sums reads every gradient: the squares of finite bf16, fp16 or fp32 values
    cannot overflow fp64 (at most ~1.2e77 each), so a norm is non-finite exactly when its gradient holds an inf or a
    NaN, and the answer is the same bool. Sparse gradients keep DeepSpeed's loop. The all-reduces of the overflow
    flag that follow (``has_overflow``) are DeepSpeed's, unchanged. ZeRO-1/2 with optimizer offload:
    ``offload_overflow_check``."""
    import torch

    if _offloading_zero(opt):
        offload_overflow_check(opt)
        return

    checker = opt.overflow_checker
    deepspeeds = checker.has_overflow_serial

    def has_overflow_serial(params):
        params = list(params)
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if not grads:
            return False
        if any(g.is_sparse for g in grads):
            return deepspeeds(params)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
        return not bool(torch.stack(norms).isfinite().all())  # the one host sync

    checker.has_overflow_serial = has_overflow_serial


def offload_overflow_check(opt) -> None:
    """Replace the ZeRO-1/2 optimizer-offload check (``update_offload_overflow_tracker`` and ``has_overflow``, on
    this instance) by one that syncs once per step. DeepSpeed checks each gradient as it is copied to the host and
    turns each answer into a Python bool (``local_overflow``): on Pangu-2.6B 517 host syncs per step, each one
    waiting for the previous gradient's copy to the host, so the copies and the host's launches take turns instead
    of overlapping. Only ``has_overflow`` reads the answer, and ``step()`` calls it only where ``check_grad_overflow``
    is set (fp16; bf16 where its config says so). Here each gradient's check (DeepSpeed's ``has_inf_or_nan``) is or-ed
    into one flag on the device and ``has_overflow`` turns that into the bool once, before DeepSpeed's own
    ``has_overflow`` (its all-reduces) runs unchanged; where ``check_grad_overflow`` is off nothing would read the
    answer, so no check runs."""
    import torch
    from deepspeed.runtime.utils import has_inf_or_nan

    pending = []  # at most one device flag: the or of every gradient's check since has_overflow last read it
    deepspeeds = opt.has_overflow

    def update_offload_overflow_tracker(grad):
        if grad is None or not opt.check_grad_overflow:
            return
        flag = has_inf_or_nan(grad.data)
        pending[:] = [torch.logical_or(pending[0], flag) if pending else flag]

    def has_overflow(partition_gradients=True):
        if pending:
            opt.local_overflow = bool(opt.local_overflow) or bool(pending.pop())  # the one host sync
        return deepspeeds(partition_gradients)

    opt.update_offload_overflow_tracker = update_offload_overflow_tracker
    opt.has_overflow = has_overflow


def apply_one_pass_levers(engine, grad_norm: str, overflow_check: str, on_cuda: bool) -> dict:
    """Decide both one-pass levers for a built engine (``resolve_grad_norm``, ``resolve_overflow_check``; SpeedError
    where a ``foreach`` does not apply, before anything is replaced), apply those that are on, and return what ran
    and why as the meta record's keys (``grad_norm``, ``grad_norm_why``, ``overflow_check``, ``overflow_check_why``),
    as train.py and the bare loop record them."""
    norm, norm_why = resolve_grad_norm(grad_norm, engine, on_cuda)
    check, check_why = resolve_overflow_check(overflow_check, engine, on_cuda)
    if norm:
        foreach_grad_norm(engine.optimizer)
    if check:
        foreach_overflow_check(engine.optimizer)
    return {"grad_norm": "foreach" if norm else "deepspeed", "grad_norm_why": norm_why,
            "overflow_check": "foreach" if check else "deepspeed", "overflow_check_why": check_why}


# --coalesce-reduction: DeepSpeed's own ``engine.coalesce_grad_reduction()`` around the step's micro-batches.
COALESCE_MODES = ("auto", "on", "off")

# Where ``auto`` turns it on, by configuration kind: a same-call bench/levers.py measurement on one GPU with the two
# runs' measured steps apart (docs/performance.md), and that evidence for the log's coalesce_reduction_why. ZeRO-3
# is not here: 1.15x on Pangu-2.6B, not decided by the steps; ZeRO-1 reduces at the boundary only already.
COALESCE_MEASURED = {
    "ZeRO-2": "measured faster on ZeRO-2 (1 x H200, bf16, with CUDA graphs, same call: Pangu-2.6B 2.43x, "
              "Pangu-350M 6.08x per step; docs/performance.md)",
    "ZeRO-2 + optimizer offload": "measured faster on ZeRO-2 + optimizer offload (1 x H200, bf16, eager, same call: "
                                  "Pangu-2.6B 2.16x, Pangu-350M 2.02x per step; docs/performance.md)",
}


def check_coalesce(mode: str) -> None:
    if mode not in COALESCE_MODES:
        raise SpeedError(f"--coalesce-reduction must be one of {', '.join(COALESCE_MODES)}, got {mode!r}")


def coalesce_kind(stage: int, offload_optimizer: bool) -> str:
    """The configuration kind ``COALESCE_MEASURED`` is keyed by: ``ZeRO-<stage>``, plus optimizer offload."""
    return f"ZeRO-{stage}" + (" + optimizer offload" if offload_optimizer else "")


def coalesce_expected(mode: str, ds_cfg: dict | None, world_size: int, on_cuda: bool, precision: str) -> bool:
    """Whether ``resolve_coalesce`` will turn the window on, read from the config before the engine exists (for
    ``--cuda-graphs auto``, whose evidence on optimizer offload was measured inside the window; ``precision``: the
    weights' dtype that runs). The engine can still refuse it (another optimizer) or ``auto`` drop it (memory);
    the meta record says what ran."""
    check_coalesce(mode)
    if ds_cfg is None or mode == "off":
        return False
    from sftbench.dsconfig import describe, grad_accum_dtype
    layout = describe(ds_cfg)
    stage = int(layout["zero_stage"] or 0)
    if stage > 1 and (grad_accum_dtype(ds_cfg) or precision) != precision:  # coalesce_unfit refuses it
        return False
    if mode == "on":
        return stage > 0
    return on_cuda and world_size == 1 and coalesce_kind(stage, bool(layout["offload_optimizer"])) in \
        COALESCE_MEASURED


def coalesce_unfit(engine) -> str | None:
    """Why ``engine.coalesce_grad_reduction()`` cannot wrap the step's micro-batches (None: it can). DeepSpeed has
    it for its ZeRO-1/2/3 optimizers with the engine owning the accumulation boundary; not for ZeRO-0, its BF16 and
    FP16 optimizer wrappers, pipeline parallelism or the plain loop. Refused here too: a ``grad_accum_dtype`` wider
    than the weights on ZeRO-2/3, whose per-micro-batch sums the window would round to the weights' dtype."""
    if not hasattr(engine, "zero_optimization"):
        return "the plain loop (--ds none) reduces once per step already (DDP's no_sync)"
    if not hasattr(engine, "coalesce_grad_reduction"):
        return "this DeepSpeed has no engine.coalesce_grad_reduction() (DeepSpeed 0.19.2 added it)"
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return "ZeRO-0 reduces once per step already (at the boundary)"
    if not hasattr(engine.optimizer, "_coalesce_grad_reduction"):
        return f"the engine's optimizer is {type(engine.optimizer).__name__}, which DeepSpeed does not coalesce"
    if getattr(engine, "pipeline_parallelism", False):
        return "pipeline parallelism (DeepSpeed does not coalesce it)"
    if not engine.managed_gradient_accumulation():
        return "managed_gradient_accumulation is false (the caller owns the boundary)"
    weights, accum = engine.get_data_types()
    if accum != weights and (stage > 1 or not getattr(engine.optimizer, "use_grad_accum_attribute", False)):
        # ZeRO-2/3 add each micro-batch's reduced gradient into their grad_accum_dtype buffer; inside the window the
        # micro-batches would first be summed in the weights' dtype by autograd (ZeRO-1 fills its buffer after
        # every backward, window or not)
        return (f"data_types.grad_accum_dtype is {str(accum).removeprefix('torch.')} while the weights are "
                f"{str(weights).removeprefix('torch.')}: ZeRO-{stage} adds each micro-batch into a buffer of that "
                "dtype, and inside the window the micro-batches would be summed in the weights' dtype first")
    return None


def resolve_coalesce(mode: str, engine, on_cuda: bool, world_size: int,
                     fits: bool | None = None) -> tuple[bool, str]:
    """Whether to wrap each step's micro-batches in DeepSpeed's ``engine.coalesce_grad_reduction()``, and why (the
    log's ``coalesce_reduction_why``).

    Without it ZeRO-2 reduces and partitions every micro-batch's gradients through a hook per parameter, ZeRO-3
    reduce-scatters them, and optimizer offload adds each one into its host copy, 8 times per step at GA 8. Inside
    the window every backward only adds into ``param.grad`` (autograd's own accumulation, in the gradients' dtype,
    as DeepSpeed's per-micro-batch sums are; a wider ``grad_accum_dtype`` is refused on ZeRO-2/3, whose sums the
    window would round, and honoured on ZeRO-1, which fills it after every backward), and one reduction pass runs
    at the window's exit; ``engine.step()`` then updates as before. The cost: every rank holds the full 16-bit
    gradients over the window, as ZeRO-1 does (``fits``: the memory predictor's answer for this run with it).

    ``on`` applies it where DeepSpeed has it (ZeRO-1/2/3 with its own optimizers) and is refused elsewhere
    (SpeedError); ``auto`` applies it on one GPU where it was measured faster (``COALESCE_MEASURED``) and the run is
    predicted to fit with it; ``off`` keeps DeepSpeed's reduction per micro-batch."""
    check_coalesce(mode)
    decided = _by_name_or_unfit("--coalesce-reduction", mode, "off", "on", coalesce_unfit, engine, on_cuda,
                                named=True)
    if decided:
        return decided
    kind = coalesce_kind(engine.zero_optimization_stage(), bool(engine.zero_cpu_offload()))
    if world_size > 1:
        return False, ("auto: several ranks (measured on one GPU only; there it trades the partitioned gradients' "
                       "memory and the reduction's overlap with the backward for one pass; --coalesce-reduction on "
                       "applies it)")
    if kind not in COALESCE_MEASURED:
        return False, f"auto: not measured faster on a GPU for {kind} yet (--coalesce-reduction on applies it)"
    if fits is False:
        return False, (f"auto: {kind} was measured faster with it, but the full 16-bit gradients it holds are "
                       "predicted not to fit this GPU")
    return True, f"auto: {COALESCE_MEASURED[kind]}"
