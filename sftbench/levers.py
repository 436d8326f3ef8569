"""The lever plan: which speed levers a run uses, and why, decided in one function from what the run is.

A lever changes how the step runs, not what it computes (each is checked against eager in tests/). ``decide(asked,
situation)`` takes the flags (``Asked``) and the run (``Situation``: ZeRO stage, offloads, world size, GPU class,
precision, the model's capabilities, a memory oracle, and, once the engine exists, what DeepSpeed built
(``EngineFacts``, read by ``sftbench.ds_patches``)) and returns a frozen ``LeverPlan``: for every lever on/off and a
one-line reason. train.py, the bare loop (bench/bare_engine.py), the sweep's and the plan's memory predictions
(``sftbench.args.planned_prediction``) all read this plan; the console prints it as a table (``LeverPlan.table``), the
log keeps it whole (``LeverPlan.to_log``).

Under ``auto`` a lever is on only where ``EVIDENCE`` holds a row for it measured faster on that configuration kind, on
that GPU class (compute capability: sm_90 covers the H100 and the H200) and at that world size. Elsewhere it is off
and the plan says "not measured here". A lever asked for by name is applied where it can be and refused
(``LeverError``) where it cannot. Levers that change DeepSpeed's own code (``PATCH_LEVERS``) are off under ``auto``
where the installed DeepSpeed is outside the tested range (``Situation.patches_why``), and refused by name there.

This module is torch-free: it decides, ``sftbench.graphs``, ``sftbench.speed`` and ``sftbench.ds_patches`` apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable



class LeverError(ValueError):
    """A lever asked for by name cannot apply to this run, or a flag's value is not one of its choices."""


# ---------------------------------------------------------------- the flags' choices

COMPILE_TARGETS = ("auto", "off", "blocks", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
GRAPH_MODES = ("auto", "on", "off")
FUSED_MODES = ("auto", "off", "liger")  # liger: sftbench/fused.py
ACCUM_MODES = ("auto", "off")
WGRAD_MODES = ("auto", "on", "off")
QKV_MODES = ("auto", "on", "off")
FUSE_MODES = ("auto", "on", "off")
ONE_PASS_MODES = ("auto", "foreach", "deepspeed")
COALESCE_MODES = ("auto", "on", "off")
PAD_MASK_MODES = ("auto", "always")

# flag -> its choices (the argument checks and --help read this)
CHOICES = {"pad_mask": PAD_MASK_MODES, "compile": COMPILE_TARGETS, "compile_mode": COMPILE_MODES,
           "cuda_graphs": GRAPH_MODES, "graph_accum": ACCUM_MODES, "graph_wgrad": WGRAD_MODES,
           "graph_qkv": QKV_MODES, "graph_fuse": FUSE_MODES, "grad_norm": ONE_PASS_MODES,
           "overflow_check": ONE_PASS_MODES, "coalesce_reduction": COALESCE_MODES, "fused_kernels": FUSED_MODES}

# The levers that replace DeepSpeed methods or read its internals (sftbench/ds_patches.py), gated by its version.
PATCH_LEVERS = ("grad_norm", "overflow_check", "graph_accum", "coalesce_reduction")


def check_choice(name: str, value: str) -> None:
    """LeverError unless ``value`` is one of ``--name``'s choices."""
    choices = CHOICES[name]
    if value not in choices:
        raise LeverError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def check_compile(target: str, mode: str) -> None:
    check_choice("compile", target)
    check_choice("compile_mode", mode)
    if mode in CUDAGRAPH_COMPILE_MODES:
        raise LeverError(f"--compile-mode {mode} uses CUDA graphs, which fail in this loop: gradients accumulate "
                         f"over micro-batches into tensors the next graph replay overwrites (torch: 'accessing "
                         f"tensor output of CUDAGraphs that has been overwritten'); use default or "
                         f"max-autotune-no-cudagraphs")


# ---------------------------------------------------------------- the evidence

@dataclass(frozen=True)
class Evidence:
    """One measurement a lever's ``auto`` rests on: the lever, the configuration kind (``config_kind``), the GPU class
    and world size it ran on, the ratio (s/step off over on, same call), whether the two runs' step ranges came
    apart (``decided``), and where the numbers are. ``adopted``: ``auto`` turns the lever on for this kind."""

    lever: str
    kind: str
    ratio: str
    decided: bool
    results: str
    adopted: bool = True
    gpu_class: str = "sm_90"
    world_size: int = 1
    note: str = ""
    family: str = "pangu"  # the model seam's family it was measured on (sftbench/models)
    card: str = "1 x H200"  # the machine it ran on


EVIDENCE: tuple[Evidence, ...] = (
    # CUDA graphs of the micro-batch, graphs off then on (bench/levers.py).
    Evidence("cuda_graphs", "ZeRO-0", "Pangu-2.6B 1.76x, Pangu-350M 3.44x", True,
             "results/perf_h200/levers_graphs_configs.md"),
    Evidence("cuda_graphs", "ZeRO-1", "Pangu-2.6B 1.92x, Pangu-350M 3.55x (accumulation inside the graphs)", True,
             "results/perf_h200/levers_graphs_2.md"),
    Evidence("cuda_graphs", "ZeRO-2", "Pangu-350M 1.90x in one call; Pangu-2.6B 1.84x across two calls", True,
             "results/perf_h200/levers_graphs_configs.md"),
    Evidence("cuda_graphs", "ZeRO-2 + optimizer offload + coalesced reduction", "Pangu-2.6B 1.19x, Pangu-350M 2.17x",
             True, "results/perf_h200/levers_coalesce_offload_graphs_2.6b.md"),
    Evidence("cuda_graphs", "ZeRO-2 + optimizer offload", "Pangu-350M ~1.34x (ranges overlap); Pangu-2.6B 1.19x "
             "across calls", False, "results/perf_h200/levers_graphs_configs.md", adopted=False),
    Evidence("cuda_graphs", "--ds none", "Pangu-2.6B 1.59x, Pangu-350M 4.91x", True,
             "results/perf_h200/levers_graphs_configs.md"),
    # DeepSpeed's throughput timer off next to the graphs (its two device syncs per micro-batch stall the replays).
    Evidence("ds_throughput_timer", "graphed", "Pangu-2.6B 1.11x, Pangu-350M 1.08x by the median", False,
             "docs/history/performance-calls.md (CUDA graphs of the micro-batch)",
             note="adopted by the median: it removes two device syncs per micro-batch and changes nothing computed"),
    # Weight and bias gradients added inside the GEMMs (graphs on). Measured alone on ZeRO-1; on the other graphed
    # kinds it was on in every later measurement of their graphs (levers_stages, the coalesced window).
    Evidence("graph_wgrad", "ZeRO-1", "Pangu-2.6B 1.11x, Pangu-350M 1.15x and 1.23x", True,
             "results/perf_h200/levers_wgrad_2.6b.md"),
    Evidence("graph_wgrad", "ZeRO-0", "not measured alone: on in levers_stages (ZeRO-0 0.93x the time of ZeRO-1)",
             False, "results/perf_h200/levers_stages.md", note="extends the ZeRO-1 evidence"),
    Evidence("graph_wgrad", "ZeRO-2", "not measured alone: on in the coalesced-window calls", False,
             "results/perf_h200/levers_coalesce_z2_2.6b.md", note="extends the ZeRO-1 evidence"),
    Evidence("graph_wgrad", "ZeRO-2 + optimizer offload + coalesced reduction", "not measured alone: on in the "
             "graphs' offload call", False, "results/perf_h200/levers_coalesce_offload_graphs_2.6b.md",
             note="extends the ZeRO-1 evidence"),
    Evidence("graph_qkv", "ZeRO-1", "Pangu-2.6B ~1.06x and ~1.03x, Pangu-350M ~0.95x (ranges overlap)", False,
             "results/perf_h200/levers_qkv_2.6b.md", adopted=False),
    Evidence("graph_fuse", "ZeRO-1", "Pangu-2.6B ~1.02x twice, Pangu-350M ~1.03x and ~1.01x (ranges overlap)", False,
             "results/perf_h200/levers_fuse60_2.6b.md", adopted=False),
    # The boundary's gradient norm in one multi-tensor kernel (ZeRO-1/2 GPU partitions).
    Evidence("grad_norm", "ZeRO-1", "Pangu-2.6B 1.09x, Pangu-350M 1.19x", True,
             "results/perf_h200/levers_gradnorm_2.6b.md"),
    Evidence("grad_norm", "ZeRO-2", "Pangu-2.6B ~1.14x (ranges overlap)", False,
             "results/perf_h200/levers_gradnorm_2.6b.md", note="adopted by the median"),
    Evidence("grad_norm", "ZeRO-2 + coalesced reduction", "not measured alone: on in the coalesced-window calls",
             False, "results/perf_h200/levers_coalesce_z2_2.6b.md", note="extends the ZeRO-1 evidence"),
    Evidence("grad_norm", "ZeRO-1 + coalesced reduction", "not measured alone", False,
             "results/perf_h200/levers_z1_vs_z2co_2.6b.md", note="extends the ZeRO-1 evidence"),
    # The inf/NaN check of the gradients with one sync.
    Evidence("overflow_check", "ZeRO-0", "Pangu-2.6B 1.21x, Pangu-350M 1.75x", True,
             "results/perf_h200/levers_overflow_2.6b.md"),
    Evidence("overflow_check", "ZeRO-2 + optimizer offload + coalesced reduction", "Pangu-350M 1.29x (decided); "
             "Pangu-2.6B 1.08x and 1.07x by the medians of two calls", True,
             "results/perf_h200/levers_offload_overflow40_350m.md"),
    Evidence("overflow_check", "ZeRO-2 + optimizer offload", "not measured outside the window", False,
             "results/perf_h200/levers_offload_overflow.md", note="extends the in-window evidence"),
    Evidence("overflow_check", "ZeRO-1 + optimizer offload", "not measured", False,
             "results/perf_h200/levers_offload_overflow.md", note="extends the ZeRO-2 offload evidence"),
    Evidence("overflow_check", "ZeRO-1 + optimizer offload + coalesced reduction", "not measured", False,
             "results/perf_h200/levers_offload_overflow.md", note="extends the ZeRO-2 offload evidence"),
    # DeepSpeed's coalesce_grad_reduction() window around the step's micro-batches.
    Evidence("coalesce_reduction", "ZeRO-2", "Pangu-2.6B 2.43x, Pangu-350M 6.08x (with the graphs)", True,
             "results/perf_h200/levers_coalesce_z2_2.6b.md"),
    Evidence("coalesce_reduction", "ZeRO-2 + optimizer offload", "Pangu-2.6B 2.16x, Pangu-350M 2.02x (eager)", True,
             "results/perf_h200/levers_coalesce_offload_2.6b.md"),
    Evidence("coalesce_reduction", "ZeRO-3", "Pangu-2.6B ~1.15x (10 steps, ranges overlap)", False,
             "results/perf_h200/levers_coalesce_z3_2.6b.md", adopted=False),
    # Transformers models (the model seam's hf family): the graphs with the weight gradients in the GEMMs and the
    # one-kernel norm, together against eager (1 x H100 80GB, ZeRO-1, bf16, 30 measured steps each, one call).
    *(Evidence(lever, "ZeRO-1", "Llama-3.2-1B 3.85x, Qwen2.5-1.5B 4.15x (the graphs, the GEMMs' gradient adds and "
               "the one-kernel norm together, against eager)", True, "results/perf_h100/levers_hf_z1.md", family="hf",
               card="1 x H100 80GB")
      for lever in ("cuda_graphs", "graph_wgrad", "grad_norm")),
    # torch.compile: no configuration measured faster with >= 20 measured steps.
    Evidence("compile", "ZeRO-1", "1.43-1.47x with 3 measured steps on shared hosts; nothing with 20+ on the H200",
             False, "docs/history/performance-calls.md (levers measured alone)", adopted=False),
)


def gpu_class(capability: tuple[int, int] | None) -> str | None:
    """The GPU class evidence is kept by: ``sm_<major><minor>`` of the compute capability (sm_90: H100 and H200)."""
    return None if capability is None else f"sm_{capability[0]}{capability[1]}"


# Compute capabilities of the GPUs a plan is made for by name (``python -m sftbench.plan --gpu-name``), longest
# name first so that "A100" does not catch an "A10".
_CAPABILITY_BY_NAME = (("GH200", (9, 0)), ("H200", (9, 0)), ("H100", (9, 0)), ("H800", (9, 0)), ("H20", (9, 0)),
                       ("B200", (10, 0)), ("A100", (8, 0)), ("A800", (8, 0)), ("A10", (8, 6)), ("A40", (8, 6)),
                       ("L40", (8, 9)), ("L4", (8, 9)), ("4090", (8, 9)), ("3090", (8, 6)), ("V100", (7, 0)),
                       ("T4", (7, 5)))


def gpu_class_of(name: str | None = None, compute_cap: str | None = None) -> str | None:
    """The GPU class of a GPU given by its compute capability (``"9.0"``, as nvidia-smi's ``compute_cap``) or, without
    one, by a name that holds a known model (``"NVIDIA H100 80GB HBM3"``, ``"H100"``); None where neither says."""
    if compute_cap:
        major, _, minor = str(compute_cap).partition(".")
        return gpu_class((int(major), int(minor or 0)))
    upper = (name or "").upper()
    for key, cap in _CAPABILITY_BY_NAME:
        if key in upper:
            return gpu_class(cap)
    return None


def config_kind(stage: int | None, offload_optimizer: bool = False, offload_param: bool = False,
                coalesced: bool = False, zenflow: bool = False) -> str:
    """The configuration kind evidence is kept by: ``--ds none``, or ``ZeRO-<stage>`` with its offloads, ZenFlow
    (another optimizer: what was measured on ZeRO-Offload says nothing of it) and the coalesced reduction window."""
    if stage is None:
        return "--ds none"
    kind = f"ZeRO-{stage}"
    if offload_optimizer:
        kind += " + optimizer offload"
    if zenflow:
        kind += " + ZenFlow"
    if offload_param:
        kind += " + parameter offload"
    if coalesced:
        kind += " + coalesced reduction"
    return kind


def evidence_for(lever: str, kind: str, gpu: str | None, world_size: int, family: str = "pangu") -> Evidence | None:
    """The adopted evidence row for ``lever`` on this kind, GPU class, world size and model family, or None."""
    for e in EVIDENCE:
        if (e.lever, e.kind, e.gpu_class, e.world_size, e.family) == (lever, kind, gpu, world_size, family) and \
                e.adopted:
            return e
    return None


def evidence_text(e: Evidence) -> str:
    """The evidence row as the plan's reasons cite it."""
    how = "" if e.decided else ", not decided by the steps"
    where = f"{e.gpu_class} ({e.card}), world {e.world_size}" + ("" if e.family == "pangu" else f", {e.family} models")
    return f"measured faster on {e.kind}, {where}: {e.ratio}{how} ({e.results})"


# ---------------------------------------------------------------- the inputs

@dataclass(frozen=True)
class EngineFacts:
    """What DeepSpeed built, as the levers need it (read from the engine by ``sftbench.ds_patches.engine_facts``;
    None fields: no reason against). ``*_unfit``: why that lever cannot apply to this engine."""

    plain: bool = False               # the plain PyTorch loop (--ds none)
    optimizer: str = ""               # the engine's optimizer class, for messages
    norm_unfit: str | None = None     # the one-kernel gradient norm
    overflow_unfit: str | None = None  # the one-sync inf/NaN check
    offload_overflow: bool = False    # the check is optimizer offload's (ZeRO-1/2), not ZeRO-0's FP16 optimizers
    coalesce_unfit: str | None = None  # DeepSpeed's coalesce_grad_reduction() window
    accum_unfit: str | None = None    # the graphs adding the micro-batches up, whatever the window
    accum_per_micro: str | None = None  # what the engine does per micro-batch outside the window (None: nothing)
    autocast: bool = False            # the plain loop's autocast: the GEMMs run in another dtype than the weights


@dataclass(frozen=True)
class Situation:
    """The run the levers are decided for. ``stage`` None: ``--ds none``. ``gpu``: the GPU class (``gpu_class``),
    None on CPU. ``gpu_mib``: the memory predictor's GPU MiB per rank for (cuda graphs, coalesced window), and
    ``gpu_total_mib`` the GPU's memory (either None: not checked). ``capabilities``: the model seam's (``pangu_qkv``,
    ``pangu_fuse``: the Pangu modules ``--graph-qkv`` and ``--graph-fuse`` rewrite). ``patches_why``: why DeepSpeed's
    internals may not be patched (None: they may). ``engine``: None before the engine is built."""

    stage: int | None
    offload_optimizer: bool = False
    offload_param: bool = False
    world_size: int = 1
    cuda: bool = False
    gpu: str | None = None
    precision: str = "bf16"
    grad_accum_wider: bool = False    # data_types.grad_accum_dtype is wider than the weights
    deepcompile: bool = False         # the config sets compile.deepcompile
    zenflow: bool = False             # the config has a zero_optimization.zenflow block
    has_timers_block: bool = False    # the config has a 'timers' block (it keeps what it says)
    config_source: str = "the DeepSpeed config"
    right_padded: bool = True
    packed: bool = False  # --pack: rows of several samples, whose block-diagonal mask is always passed
    capabilities: frozenset = frozenset({"pangu_qkv", "pangu_fuse"})  # Pangu-α's, the model the sweep runs
    fused_unfit: str | None = "not available for this model"  # why Liger's kernels cannot run (fused.liger_unfit)
    gpu_mib: Callable[[bool, bool], float] | None = field(default=None, compare=False, repr=False)
    gpu_total_mib: float | None = None
    patches_why: str | None = None
    engine: EngineFacts | None = None
    family: str = "pangu"  # the model seam's family: evidence holds for the family it was measured on

    @property
    def plain(self) -> bool:
        return self.stage is None

    def kind(self, coalesced: bool = False) -> str:
        """This run's configuration kind (``config_kind``), inside the coalesced window or not."""
        return config_kind(self.stage, self.offload_optimizer, self.offload_param, coalesced, self.zenflow)

    @classmethod
    def of_config(cls, ds_cfg: dict | None, *, world_size: int, cuda: bool, gpu: str | None, precision: str,
                  source: str | None = None, **more) -> "Situation":
        """The situation as the (resolved) DeepSpeed config says it (None: ``--ds none``); ``more``: the other
        fields."""
        from sftbench.dsconfig import describe, grad_accum_dtype, zenflow_block

        layout = describe(ds_cfg)
        block = (ds_cfg or {}).get("compile")
        return cls(stage=None if ds_cfg is None else int(layout["zero_stage"] or 0),
                   offload_optimizer=bool(layout["offload_optimizer"]), offload_param=bool(layout["offload_param"]),
                   world_size=world_size, cuda=cuda, gpu=gpu if cuda else None, precision=precision,
                   grad_accum_wider=(grad_accum_dtype(ds_cfg) or precision) != precision,
                   deepcompile=isinstance(block, dict) and bool(block.get("deepcompile")),
                   zenflow=zenflow_block(ds_cfg) is not None,
                   has_timers_block="timers" in (ds_cfg or {}),
                   config_source=source or "the DeepSpeed config", **more)


@dataclass(frozen=True)
class Asked:
    """The lever flags as given (train.py's and the bare loop's ``--<lever>``)."""

    pad_mask: str = "auto"
    compile: str = "auto"
    compile_mode: str = "default"
    cuda_graphs: str = "auto"
    graph_accum: str = "auto"
    graph_wgrad: str = "auto"
    graph_qkv: str = "auto"
    graph_fuse: str = "auto"
    grad_norm: str = "auto"
    overflow_check: str = "auto"
    coalesce_reduction: str = "auto"
    fused_kernels: str = "auto"

    @classmethod
    def of(cls, ns) -> "Asked":
        """From an argparse namespace or the harness dataclass (any object with the flags as attributes)."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})

    def check(self) -> None:
        """LeverError for a value that is not one of a flag's choices."""
        for f in fields(self):
            if f.name != "compile_mode":
                check_choice(f.name, getattr(self, f.name))
        check_compile(self.compile, self.compile_mode)


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Decision:
    on: bool
    why: str
    value: str = ""  # the lever's own word for what runs where on/off says too little (compile target, modes)


LEVERS = ("pad_mask", "compile", "fused_kernels", "cuda_graphs", "ds_throughput_timer", "coalesce_reduction",
          "graph_accum", "graph_wgrad", "graph_qkv", "graph_fuse", "grad_norm", "overflow_check")

# The console's words for each lever, on and off.
WORDS = {
    "pad_mask": ("attention padding mask", "passed", "causal mask alone (flash)"),
    "compile": ("torch.compile", "on", "off"),
    "fused_kernels": ("norm/rotary/MLP kernels", "Liger's fused ones", "the model's own"),
    "cuda_graphs": ("CUDA graphs", "on", "off"),
    "ds_throughput_timer": ("DeepSpeed throughput timer", "off", "as configured"),
    "coalesce_reduction": ("gradient reduction", "once per step", "as DeepSpeed does"),
    "graph_accum": ("micro-batch accumulation", "in the graphs", "by the engine"),
    "graph_wgrad": ("weight gradients", "added in the GEMMs", "by autograd"),
    "graph_qkv": ("k/v/q projections", "one GEMM", "one GEMM each"),
    "graph_fuse": ("residual adds", "fused", "apart"),
    "grad_norm": ("gradient norm", "one multi-tensor kernel", "DeepSpeed's"),
    "overflow_check": ("inf/NaN check", "one sync", "DeepSpeed's"),
}


@dataclass(frozen=True)
class LeverPlan:
    decisions: tuple[tuple[str, Decision], ...]
    pending: tuple[str, ...] = ()  # levers that need the engine (decided again once it exists)

    def __getitem__(self, lever: str) -> Decision:
        return dict(self.decisions)[lever]

    def on(self, lever: str) -> bool:
        return self[lever].on

    def why(self, lever: str) -> str:
        return self[lever].why

    def to_log(self) -> dict:
        """The meta record's ``optimizations`` keys for the levers: ``<lever>`` and ``<lever>_why`` each (compile's
        value is its target; the timer's is the why, or None where it was left as configured)."""
        out: dict = {}
        for name, d in self.decisions:
            if name in ("compile", "fused_kernels"):
                out[name], out[f"{name}_why"] = d.value, d.why
            elif name == "ds_throughput_timer":
                out["ds_throughput_timer"] = d.why if d.on else None
            elif name in ("grad_norm", "overflow_check"):
                out[name], out[f"{name}_why"] = ("foreach" if d.on else "deepspeed"), d.why
            else:
                out[name], out[f"{name}_why"] = d.on, d.why
        return out

    def table(self) -> list[str]:
        """The console's start-up table: one line per lever, what runs and the one-line reason."""
        width = max(len(WORDS[n][0]) for n, _ in self.decisions)
        lines = []
        for name, d in self.decisions:
            label, on_word, off_word = WORDS[name]
            what = d.value if name == "compile" and d.on else (on_word if d.on else off_word)
            lines.append(f"  {label:<{width}}  {what:<24}  {d.why}")
        return lines


def _by_name(flag: str, mode: str, off: str, on: str, unfit: str | None, patches_why: str | None,
             patch: bool, cuda: bool, named: bool = False) -> Decision | None:
    """What every engine lever decides alike: ``off`` keeps DeepSpeed's code, ``on`` applies where it fits and is
    refused where not, ``auto`` is off where it does not fit, DeepSpeed is outside the tested range, or on CPU. None:
    ``auto`` on a GPU where it fits, for the evidence to decide."""
    asked = (lambda m: f"{m}: asked for") if named else (lambda m: "asked for")  # the window names its mode
    if mode == off:
        return Decision(False, asked(off))
    if patch and patches_why:
        if mode == on:
            raise LeverError(f"--{flag} {on} does not apply: {patches_why}; use auto or {off}")
        return Decision(False, f"auto: {patches_why}")
    if mode == on:
        if unfit:
            raise LeverError(f"--{flag} {on} does not apply: {unfit}; use auto or {off}")
        return Decision(True, asked(on))
    if unfit:
        return Decision(False, f"auto: {unfit}")
    if not cuda:
        return Decision(False, "auto: CPU run (measured on the GPU only)")
    return None


def _not_measured(lever: str, kind: str, s: Situation, flag_on: str) -> Decision:
    where = f"{kind} on {s.gpu}, world {s.world_size}" + ("" if s.family == "pangu" else f", {s.family} models")
    return Decision(False, f"auto: not measured here ({where}; --{lever.replace('_', '-')} {flag_on} applies it)")


def _auto_by_evidence(lever: str, kind: str, s: Situation, flag_on: str) -> Decision:
    e = evidence_for(lever, kind, s.gpu, s.world_size, s.family)
    return Decision(True, f"auto: {evidence_text(e)}") if e else _not_measured(lever, kind, s, flag_on)


def _pad_mask(a: Asked, s: Situation) -> Decision:
    if s.packed:  # the mask is what keeps each packed sample to itself: never left out
        return Decision(True, "packed rows (--pack): each sample's block-diagonal causal mask is passed")
    if a.pad_mask == "always":
        return Decision(True, "always: asked for")
    if not s.right_padded:
        return Decision(True, "auto: some samples are not right-padded")
    return Decision(False, "auto: every sample is right-padded, so the causal mask alone gives real tokens the same "
                           "result")


def _compile(a: Asked, s: Situation) -> Decision:
    if s.deepcompile:
        where = f"{s.config_source} sets compile.deepcompile"
        if not s.cuda:
            raise LeverError(f"{where}, which DeepSpeed runs on CUDA GPUs only; remove the key for a CPU run")
        if a.compile in ("off", "blocks"):
            raise LeverError(f"--compile {a.compile}, but {where}: DeepCompile runs only through engine.compile() "
                             "(--compile model, or auto); drop the flag or the key")
        return Decision(True, (f"auto: {where} (DeepCompile runs through engine.compile())" if a.compile == "auto"
                               else f"asked for; DeepCompile: {where}"), "model")
    if a.compile != "auto":
        return Decision(a.compile != "off", "asked for", a.compile)
    if not s.cuda:
        return Decision(False, "auto: CPU run", "off")
    return Decision(False, "auto: not measured faster with >= 20 measured steps (docs/performance.md)", "off")


def _fused(a: Asked, s: Situation) -> Decision:
    """Liger's fused RMSNorm, rotary and gated-MLP kernels (sftbench/fused.py): where the model seam, the GPU and the
    installed library allow them (``s.fused_unfit``), and under auto only with evidence for the family."""
    if a.fused_kernels == "off":
        return Decision(False, "asked for", "off")
    if a.fused_kernels == "liger":
        if s.fused_unfit:
            raise LeverError(f"--fused-kernels liger does not apply: {s.fused_unfit}; use auto or off")
        return Decision(True, "asked for", "liger")
    if s.fused_unfit:
        return Decision(False, f"auto: {s.fused_unfit}", "off")
    d = _auto_by_evidence("fused_kernels", s.kind(), s, "liger")
    return replace(d, value="liger" if d.on else "off")


def _coalesce_config_unfit(s: Situation) -> str | None:
    """Why the window cannot apply, read from the config alone (the engine can add reasons)."""
    if s.plain:
        return "the plain loop (--ds none) reduces once per step already (DDP's no_sync)"
    if s.stage == 0:
        return "ZeRO-0 reduces once per step already (at the boundary)"
    if s.stage > 1 and s.grad_accum_wider:
        return (f"data_types.grad_accum_dtype is wider than the weights: ZeRO-{s.stage} adds each micro-batch into "
                "a buffer of that dtype, and inside the window the micro-batches would be summed in the weights' "
                "dtype first")
    return None


def _coalesce(a: Asked, s: Situation, graphs_on: bool | None) -> Decision:
    """``graphs_on`` None: the graphs are not decided yet (the window's expectation, before the memory check)."""
    unfit = _coalesce_config_unfit(s) or (s.engine.coalesce_unfit if s.engine else None)
    decided = _by_name("coalesce-reduction", a.coalesce_reduction, "off", "on", unfit, s.patches_why, True, s.cuda,
                       named=True)
    if decided:
        return decided
    kind = s.kind()
    d = _auto_by_evidence("coalesce_reduction", kind, s, "on")
    if d.on and graphs_on is not None and s.gpu_mib and s.gpu_total_mib:
        need = s.gpu_mib(graphs_on, True)
        if need > s.gpu_total_mib:
            return Decision(False, f"auto: {kind} was measured faster with it, but the full 16-bit gradients it "
                                   f"holds are predicted not to fit this GPU ({need:,.0f} of {s.gpu_total_mib:,.0f} "
                                   "MiB)")
    return d


def _graphs(a: Asked, s: Situation, compile_on: bool, compile_target: str, coalescing: bool) -> Decision:
    mode = a.cuda_graphs
    if mode == "off":
        return Decision(False, "off: asked for")
    asked = mode == "on"

    def no(why: str) -> Decision:
        if asked:
            raise LeverError(f"--cuda-graphs on: {why}")
        return Decision(False, f"auto: {why}")

    if not s.cuda:  # the same command on a machine without a GPU runs eager, and says so
        return Decision(False, f"{mode}: no CUDA device, eager")
    if s.stage == 3 or s.offload_param:
        return no("ZeRO-3 / parameter offload gathers and frees parameters inside the forward, so their addresses "
                  "are not fixed between replays")
    if compile_on:
        return no(f"--compile {compile_target} is on (torch.compile and these graphs both take over the forward; "
                  "use --compile off)")
    if s.plain and s.world_size > 1:
        return no("--ds none on several ranks (DDP's reducer is not captured; use a DeepSpeed config)")
    if asked:
        return Decision(True, "on: asked for")
    kind = s.kind(coalescing and s.offload_optimizer)
    d = _auto_by_evidence("cuda_graphs", kind, s, "on")
    if d.on and s.gpu_mib and s.gpu_total_mib:
        with_graphs, eager = s.gpu_mib(True, coalescing), s.gpu_mib(False, coalescing)
        if with_graphs > s.gpu_total_mib:  # the graphs' buffers and pool would cost memory the run does not have
            return Decision(False, f"auto: eager, although {kind} was measured faster with graphs: with them this run "
                                   f"is predicted at {with_graphs:,.0f} MiB per GPU, over the GPU's "
                                   f"{s.gpu_total_mib:,.0f} MiB (eager {eager:,.0f} MiB"
                                   f"{'' if eager <= s.gpu_total_mib else ', over too'}; --cuda-graphs on forces them)")
    return d


def _timer(s: Situation, graphs_on: bool) -> Decision:
    if s.plain or not graphs_on:
        return Decision(False, "as configured (no graphs to stall)")
    if s.has_timers_block:
        return Decision(False, "as configured: the config has a 'timers' block")
    e = evidence_for("ds_throughput_timer", "graphed", s.gpu, s.world_size, s.family)
    if e is None:
        return Decision(False, f"as configured: not measured here ({s.gpu}, world {s.world_size})")
    return Decision(True, "DeepSpeed's throughput timer off (timers.throughput.enabled=false: its two device syncs "
                          "per micro-batch stall the replayed graphs; the harness times steps itself; a 'timers' "
                          "block in the config keeps DeepSpeed's)")


def _accum(a: Asked, s: Situation, graphs_on: bool, coalescing: bool) -> Decision:
    if not graphs_on:
        return Decision(False, "off: no CUDA graphs")
    if a.graph_accum == "off":
        return Decision(False, "off: asked for")
    if s.plain:
        return Decision(True, "auto: the plain loop adds each micro-batch into param.grad")
    if s.patches_why:
        return Decision(False, f"auto: {s.patches_why}")
    f = s.engine
    if f.accum_unfit:
        return Decision(False, f"auto: {f.accum_unfit}")
    if coalescing:
        return Decision(True, f"auto: ZeRO-{s.stage} inside coalesce_grad_reduction() adds each micro-batch into "
                              "param.grad and reduces once, at the window's exit")
    if f.accum_per_micro:
        return Decision(False, f"auto: {f.accum_per_micro}")
    return Decision(True, f"auto: ZeRO-{s.stage} adds each micro-batch into param.grad and reduces at the boundary")


def _wgrad(a: Asked, s: Situation, graphs_on: bool, coalescing: bool) -> Decision:
    if not graphs_on:
        return Decision(False, "off: no CUDA graphs")
    if a.graph_wgrad == "off":
        return Decision(False, "off: asked for")
    if s.engine and s.engine.autocast:  # the GEMM runs in the autocast dtype, the gradient buffers are the weights'
        if a.graph_wgrad == "on":
            raise LeverError("--graph-wgrad on: the plain loop's autocast computes in another dtype than the gradient "
                             "buffers; use a DeepSpeed config")
        return Decision(False, "auto: the plain loop's autocast computes in another dtype than the gradient buffers")
    if a.graph_wgrad == "on":
        return Decision(True, "on: asked for")
    kind = s.kind(coalescing and s.offload_optimizer)
    e = (evidence_for("graph_wgrad", kind, s.gpu, s.world_size, s.family)
         or evidence_for("graph_wgrad", "ZeRO-1", s.gpu, s.world_size, s.family))
    return Decision(True, f"auto: {evidence_text(e)}") if e else _not_measured("graph_wgrad", kind, s, "auto")


def _undecided(lever: str) -> str:
    """Why an opt-in lever stays off under ``auto``: its measurements, none of them decided by the steps."""
    rows = [e for e in EVIDENCE if e.lever == lever]
    flag = f"--{lever.replace('_', '-')} on applies it"
    if not rows:
        return f"not measured ({flag})"
    return "not decided by the steps (" + "; ".join(f"{e.ratio}, {e.results}" for e in rows) + f"; {flag})"


def _qkv(a: Asked, s: Situation, graphs_on: bool) -> Decision:
    if not graphs_on:
        return Decision(False, "off: no CUDA graphs")
    if a.graph_qkv == "off":
        return Decision(False, "off: asked for")
    if "pangu_qkv" not in s.capabilities:
        if a.graph_qkv == "on":
            raise LeverError("--graph-qkv on: not available for this model (it rewrites Pangu-alpha's attention)")
        return Decision(False, "auto: not available for this model")
    if a.graph_qkv == "on":
        return Decision(True, "on: asked for (where the weights lie side by side)")
    return Decision(False, f"auto: off, {_undecided('graph_qkv')}")


def _fuse(a: Asked, s: Situation, graphs_on: bool) -> Decision:
    if not graphs_on:
        return Decision(False, "off: no CUDA graphs")
    if a.graph_fuse == "off":
        return Decision(False, "off: asked for")
    if "pangu_fuse" not in s.capabilities:
        if a.graph_fuse == "on":
            raise LeverError("--graph-fuse on: not available for this model (it rewrites Pangu-alpha's blocks)")
        return Decision(False, "auto: not available for this model")
    if s.engine and s.engine.autocast:
        if a.graph_fuse == "on":
            raise LeverError("--graph-fuse on: the plain loop's autocast mixes dtypes in the residual stream; use "
                             "--graph-fuse off or a DeepSpeed config")
        return Decision(False, "auto: the plain loop's autocast mixes dtypes in the residual stream")
    if a.graph_fuse == "on":
        return Decision(True, "on: asked for")
    return Decision(False, f"auto: off, {_undecided('graph_fuse')}")


def _grad_norm(a: Asked, s: Situation, coalescing: bool) -> Decision:
    f = s.engine
    unfit = ("the plain loop (--ds none), whose clip_grad_norm_ is torch's multi-tensor norm already" if s.plain
             else f.norm_unfit)
    d = _by_name("grad-norm", a.grad_norm, "deepspeed", "foreach", unfit, s.patches_why, True, s.cuda)
    return d or _auto_by_evidence("grad_norm", s.kind(coalescing), s, "foreach")


def _overflow(a: Asked, s: Situation, coalescing: bool) -> Decision:
    f = s.engine
    unfit = ("the plain loop (--ds none) has no per-gradient check (fp16: torch's GradScaler checks in one pass)"
             if s.plain else f.overflow_unfit)
    d = _by_name("overflow-check", a.overflow_check, "deepspeed", "foreach", unfit, s.patches_why, True, s.cuda)
    return d or _auto_by_evidence("overflow_check", s.kind(coalescing and s.offload_optimizer), s,
                                  "foreach")


def decide(asked: Asked, s: Situation) -> LeverPlan:
    """Every lever for this run, in the order their decisions depend on each other: the compile target; the
    coalesced window as the config expects it; the graphs (whose evidence on optimizer offload was measured inside
    the window, and whose memory check counts it); the window again against memory with those graphs and the
    engine; then the levers inside the graphs and at the boundary. Without ``s.engine`` the engine's levers are
    decided as the config expects (the sweep's and the plan's predictions) and listed in ``pending``; train.py
    decides again once the engine exists and logs that plan. LeverError where a lever asked for by name cannot
    apply."""
    asked.check()
    compile_d = _compile(asked, s)
    expected = _coalesce(asked, s, None)
    graphs_d = _graphs(asked, s, compile_d.on, compile_d.value, expected.on)
    coalesce_d = _coalesce(asked, s, graphs_d.on)
    if graphs_d.on and expected.on and not coalesce_d.on and asked.cuda_graphs == "auto":
        # the graphs' evidence on this kind was measured inside the window: without it, decide them again
        graphs_d = _graphs(asked, s, compile_d.on, compile_d.value, False)
    out = [("pad_mask", _pad_mask(asked, s)), ("compile", compile_d), ("fused_kernels", _fused(asked, s)),
           ("cuda_graphs", graphs_d),
           ("ds_throughput_timer", _timer(s, graphs_d.on)), ("coalesce_reduction", coalesce_d)]
    pending: tuple[str, ...] = ()
    if s.engine is not None or s.plain:
        eng = s.engine or EngineFacts(plain=True, autocast=s.precision != "fp32")  # the plain loop's autocast
        s2 = s if s.engine is not None else replace(s, engine=eng)
        co = coalesce_d.on
        out += [("graph_accum", _accum(asked, s2, graphs_d.on, co)),
                ("graph_wgrad", _wgrad(asked, s2, graphs_d.on, co)),
                ("graph_qkv", _qkv(asked, s2, graphs_d.on)), ("graph_fuse", _fuse(asked, s2, graphs_d.on)),
                ("grad_norm", _grad_norm(asked, s2, co)), ("overflow_check", _overflow(asked, s2, co))]
    else:
        pending = ("graph_accum", "graph_wgrad", "graph_qkv", "graph_fuse", "grad_norm", "overflow_check")
    return LeverPlan(tuple(out), pending)


def evidence_markdown() -> str:
    """``EVIDENCE`` as the markdown table docs/performance.md carries (``python -m sftbench.levers`` prints it)."""
    lines = ["| lever | configuration | GPU class | world | family | measured (s/step off ÷ on, same call) "
             "| decided by the steps | on under auto | results |", "|---|---|---|---|---|---|---|---|---|"]
    for e in EVIDENCE:
        note = f" ({e.note})" if e.note else ""
        lines.append(f"| `{e.lever}` | {e.kind} | {e.gpu_class} | {e.world_size} | {e.family} | {e.ratio}{note} | "
                     f"{'yes' if e.decided else 'no'} | {'yes' if e.adopted else 'no'} | `{e.results}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(evidence_markdown(), end="")
