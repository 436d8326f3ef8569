"""Every place the harness reaches into DeepSpeed's internals: the methods it replaces on an engine's optimizer, the
private attributes it reads, and the version range these were checked against.

DeepSpeed's public API (``deepspeed.initialize``, ``engine.forward/backward/step``, ``coalesce_grad_reduction()``,
``save_checkpoint``/``load_checkpoint``, the engine's ``zero_*``/``*_enabled`` getters) is used anywhere; what is not
public lives here, each with what it replaces, why, and the upstream code it mirrors:

* ``foreach_grad_norm`` (``--grad-norm``): replaces ``DeepSpeedZeroOptimizer.get_grad_norm_direct`` on the
  instance; reads ``_zero_padding`` (on gradients), ``_model_parallel_all_reduce``, ``model_parallel_rank``,
  ``dp_process_group``, ``device``. Mirrors ``deepspeed/runtime/zero/stage_1_and_2.py``.
* ``foreach_overflow_check`` (``--overflow-check``, ZeRO-0): replaces ``CheckOverflow.has_overflow_serial`` on the
  FP16 optimizers' ``overflow_checker``. Mirrors ``deepspeed/runtime/utils.py``.
* ``offload_overflow_check`` (``--overflow-check``, ZeRO-1/2 + optimizer offload): replaces
  ``update_offload_overflow_tracker`` and ``has_overflow`` on the instance; reads and sets ``local_overflow``, reads
  ``check_grad_overflow``. Mirrors ``deepspeed/runtime/zero/stage_1_and_2.py``.
* ``engine_facts`` (the lever plan's inputs): reads ``optimizer.cpu_offload``, ``optimizer.use_grad_accum_attribute``,
  ``optimizer._coalesce_grad_reduction`` (a capability probe), ``engine.zenflow``, ``engine.pipeline_parallelism``,
  ``overflow_checker``, and the optimizer's class (``DeepSpeedZeroOptimizer``, ``FP16_Optimizer``,
  ``FP16_UnfusedOptimizer``, ``BF16_Optimizer``).

Elsewhere the harness reads only public engine attributes (``sftbench/engine_checks.py``: the fp16 loss scale,
``cur_scale`` or ``loss_scale``; the ZeRO-0 fp16 defect, from ``engine.backward``'s source).

``TESTED`` holds the DeepSpeed versions whose CPU equivalence tests (``tests/test_ds_patches.py``: each patch against
DeepSpeed's own code, bit-identical or within a stated tolerance) and GPU tests (``tests/test_speed.py``,
``tests/test_graphs.py`` on a GPU) passed. On any other version ``patches_why`` says so: the lever plan then turns
every patch off under ``auto`` with one warning and refuses a patch asked for by name. A later DeepSpeed may keep a
method's signature but change its meaning (who reads ``local_overflow``, how micro-steps are counted): the result
would be wrong gradients or unreported overflows with no error, which is why a version, not a signature, is the
gate. To admit a new version: run those tests on it (CPU and GPU), then add it to ``TESTED`` and pin it in
``requirements.txt`` and ``pyproject.toml``.

Torch-free at import; DeepSpeed is imported inside the functions that need it.
"""
from __future__ import annotations

from typing import Any

from sftbench.levers import EngineFacts

TESTED = ("0.19.8",)


def patches_why(version: str | None = None) -> str | None:
    """Why DeepSpeed's internals must not be patched here (None: they may): the installed DeepSpeed (or
    ``version``) is not one of ``TESTED``."""
    if version is None:
        try:
            import deepspeed
        except ImportError:
            return None  # the plain loop without DeepSpeed: nothing to patch
        version = deepspeed.__version__
    if version in TESTED:
        return None
    return (f"DeepSpeed {version} is not a version these patches were tested with ({', '.join(TESTED)}); "
            "its own code runs")


# ---------------------------------------------------------------- what DeepSpeed built

def engine_facts(engine: Any) -> EngineFacts:
    """What the lever plan needs to know about a built engine (DeepSpeed's or the plain loop's)."""
    if not hasattr(engine, "zero_optimization"):  # the plain loop; it may run where DeepSpeed is not installed
        return EngineFacts(plain=True, optimizer=type(getattr(engine, "optimizer", None)).__name__,
                           autocast=getattr(engine, "amp_dtype", None) is not None)
    opt = engine.optimizer
    return EngineFacts(optimizer=type(opt).__name__, norm_unfit=norm_unfit(engine),
                       overflow_unfit=overflow_unfit(engine), offload_overflow=offloading_zero(opt),
                       coalesce_unfit=coalesce_unfit(engine), accum_unfit=accum_unfit(engine),
                       accum_per_micro=accum_per_micro(engine))


def _other_signature(method, expected: tuple[str, ...]) -> str | None:
    """Why a DeepSpeed method a patch replaces does not take the arguments the replacement takes (None: it does)."""
    import inspect
    params = tuple(inspect.signature(method).parameters)
    if params != expected:
        return f"this DeepSpeed's {method.__name__} takes ({', '.join(params)}), not ({', '.join(expected)})"
    return None


# ZenFlow (``zero_optimization.zenflow``) subclasses the ZeRO-1/2 optimizer and replaces its reduction
# (``average_tensor``: the selected gradient columns) and its step (the selective GPU update, the CPU update every
# few steps): the patches and the window were checked against DeepSpeed's own code, not against these.
ZENFLOW_UNCHECKED = ("ZenFlow's optimizer replaces DeepSpeed's reduction and step with its own (zero_optimization."
                     "zenflow), which this was not checked against")


def runs_zenflow(engine) -> bool:
    """Whether the engine runs ZenFlow (DeepSpeed sets ``engine.zenflow`` from the config's block)."""
    return bool(getattr(engine, "zenflow", False))


def offloading_zero(opt) -> bool:
    """Whether ``opt`` is DeepSpeed's ZeRO-1/2 optimizer with optimizer offload (the one place that tells it from
    ZeRO-0's FP16 optimizers)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    return isinstance(opt, DeepSpeedZeroOptimizer) and bool(opt.cpu_offload)


def norm_unfit(engine) -> str | None:
    """Why ``foreach_grad_norm`` cannot replace the engine's gradient norm (None: it can). It replaces DeepSpeed's
    ZeRO-1/2 ``get_grad_norm_direct`` on GPU-resident partitions only; ZeRO-0's optimizers have their own code (the
    fused one, with FusedAdam on a GPU, takes one flat tensor's norm), so do ZeRO-3 and the BF16 optimizer, and
    optimizer offload computes the norm on the CPU."""
    opt = getattr(engine, "optimizer", None)
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return (f"the engine's optimizer is {type(opt).__name__}, not DeepSpeed's ZeRO-1/2 one (ZeRO-0's fused "
                "optimizer takes one flat tensor's norm; ZeRO-3 and the BF16 optimizer have their own code)")
    if opt.cpu_offload:
        return "optimizer offload: DeepSpeed computes the norm over the CPU partitions"
    return _other_signature(opt.get_grad_norm_direct, ("gradients", "params", "norm_type"))


def overflow_unfit(engine) -> str | None:
    """Why ``foreach_overflow_check`` cannot replace the engine's inf/NaN check of the gradients (None: it can). It
    covers ZeRO-0's FP16 optimizers (bf16 and fp16; DeepSpeed's ``CheckOverflow``), whose check no config key turns
    off (``bf16.check_grad_overflow`` is read by ZeRO-1/2 only, and the shipped ZeRO-1/2 configs set it false), and
    ZeRO-1/2 with optimizer offload, whose check runs per gradient as it goes to the host whatever that key says.
    ZeRO-1/2 without offload check their partitions on the device already, with one sync."""
    opt = getattr(engine, "optimizer", None)
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.utils import CheckOverflow
    if runs_zenflow(engine):
        return ZENFLOW_UNCHECKED
    if offloading_zero(opt):
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


def coalesce_unfit(engine) -> str | None:
    """Why ``engine.coalesce_grad_reduction()`` cannot wrap the step's micro-batches (None: it can). DeepSpeed has
    it for its ZeRO-1/2/3 optimizers with the engine owning the accumulation boundary; not for ZeRO-0, its BF16 and
    FP16 optimizer wrappers, pipeline parallelism or the plain loop. Refused here too: a ``grad_accum_dtype`` wider
    than the weights on ZeRO-2/3, whose per-micro-batch sums the window would round to the weights' dtype."""
    if not hasattr(engine, "coalesce_grad_reduction"):
        return "this DeepSpeed has no engine.coalesce_grad_reduction() (DeepSpeed 0.19.2 added it)"
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return "ZeRO-0 reduces once per step already (at the boundary)"
    if runs_zenflow(engine):
        return ZENFLOW_UNCHECKED
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


def accum_unfit(engine) -> str | None:
    """Why the CUDA graphs may not add the micro-batches' gradients up themselves in any case (None: they may, where
    the engine does nothing else per micro-batch, ``accum_per_micro``): the engine adds each micro-batch into
    another buffer or does not own the boundary."""
    opt = engine.optimizer
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    if isinstance(opt, BF16_Optimizer):
        return "DeepSpeed's BF16 optimizer adds each micro-batch into its fp32 gradient copy"
    if getattr(opt, "use_grad_accum_attribute", False):
        return "grad_accum_dtype differs from the weights' dtype (ZeRO accumulates in its own buffer)"
    if runs_zenflow(engine) or not engine.managed_gradient_accumulation():
        return "the engine does not own the accumulation boundary"
    return None


def accum_per_micro(engine) -> str | None:
    """What the engine does with each micro-batch's gradients before the boundary besides adding them into
    ``param.grad`` (None: nothing), outside DeepSpeed's coalesced reduction window."""
    if engine.zero_optimization_partition_gradients():
        return "ZeRO-2/3 reduce and partition the gradients at every micro-batch"
    if engine.zero_cpu_offload():
        return "optimizer offload moves the gradients to the host"
    return None


def accumulation_taken_by(engine, configured: int | None) -> str | None:
    """Why the engine accumulates another number of micro-batches per step than the config's
    ``gradient_accumulation_steps`` (None: it does not). ZenFlow sets the engine's accumulation to its
    ``update_interval`` (``deepspeed/runtime/zenflow/engine.py``, ``configure_zenflow``): each micro-batch then
    updates the selected gradient columns on the GPU, and the rest are applied on the CPU every ``update_interval``
    micro-batches."""
    ga = engine.gradient_accumulation_steps()
    if configured is None or ga == configured:
        return None
    if runs_zenflow(engine):
        return (f"DeepSpeed's ZenFlow runs {ga} micro-batches per optimizer step, not the config's "
                f"gradient_accumulation_steps {configured}: it takes zero_optimization.zenflow.update_interval as the "
                "accumulation, and updates the selected gradient columns at every micro-batch")
    return (f"DeepSpeed runs {ga} micro-batches per optimizer step, not the config's gradient_accumulation_steps "
            f"{configured}")


# ---------------------------------------------------------------- the patches

def apply(engine, plan) -> None:
    """Apply the patches the lever plan turned on (``grad_norm``, ``overflow_check``) to a built engine."""
    if plan.on("grad_norm"):
        foreach_grad_norm(engine.optimizer)
    if plan.on("overflow_check"):
        foreach_overflow_check(engine.optimizer)


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

    if offloading_zero(opt):
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
