"""Memory prediction for one training run, made before the run starts (no torch, no deepspeed import).

``predict(ModelShape, RunShape, Limits, Constants) -> Prediction`` gives the expected GPU memory per rank and host
memory of the whole job, term by term (each ZeRO stage's model states from its own function, then the terms every
run has); ``Prediction.to_json()`` is the dict the logs keep, so the report can set each measured number beside its
prediction and the sweep can say in advance which configurations will not fit.

Notation: ``P`` parameters, ``W`` ranks (data parallel, one node), ``b`` bytes of a model-precision element (2 for
fp16/bf16, 4 for fp32), ``LL`` parameters of the largest single module (for Pangu-α the tied word embedding,
``vocab * hidden``), ``s`` sequence length, ``m`` micro batch, ``h`` hidden size, ``L`` blocks (the query layer
included), ``a`` heads, ``V`` vocabulary. 1 MiB = 2**20 bytes.

GPU terms, per rank (``gpu_breakdown_mib``)
--------------------------------------------
Model states follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` in
``deepspeed/runtime/zero/stage_1_and_2.py`` and ``estimate_zero3_model_states_mem_needs`` in
``deepspeed/runtime/zero/stage3.py``), re-implemented here in :func:`zero2_model_states` and
:func:`zero3_model_states` and checked against DeepSpeed's functions by ``tests/test_memory.py``. Their totals are
split into three terms (their sum equals DeepSpeed's number exactly for 16-bit training):

``params``
    16-bit (or fp32) weights on the GPU: ``b*P`` for stage 0-2 (replicated), ``b*P/W`` for stage 3 (partitioned,
    0 with ``offload_param``), plus for stage 3 DeepSpeed's ``4*LL`` "largest layer" term (one module gathered
    in full, with its gradient). ``--ds none`` with autocast: the fp32 weights ``4*P`` plus the low-precision
    copies autocast makes of every weight during the forward and keeps for the backward (``2*P``).
``grads``
    Gradients. Stage 0: ``b*P`` plus, for 16-bit, the two fp32 copies DeepSpeed's fused fp16/bf16 wrapper makes
    at the step (every gradient ``.to(fp32)``, then flattened: ``8*P``; activations are freed by then, so this
    term and ``activations`` overlap in time and their sum is an upper bound). Stage 1: full 16-bit gradients
    ``b*P`` plus the fp32 gradient of the rank's partition ``4*P/W``. Stage 2: partitioned ``b*P/W + 4*P/W``
    (DeepSpeed's "2 grads_16bit + 4 grads_32bit").
    Stage 3: the fp32 gradient partition ``4*P/W``. Offloaded optimizer: 0 on the GPU (they live on the host),
    except with ``data_types.grad_accum_dtype: fp32`` on stage 1/2, which keeps ``4*P/W`` on the GPU (measured).
    With ``coalesce_reduction`` (``--coalesce-reduction``) stage 1-3 hold the full 16-bit gradients ``b*P`` over
    the step's micro-batches: stage 2 in place of ``b*P/W``, stage 3 and offload on top (``_coalesced_grads``).
    ``--ds none``: fp32 gradients ``4*P`` (autocast keeps fp32 weights, so fp32 gradients).
``optimizer``
    Adam(W) momentum and variance in fp32 ``8*P`` plus the fp32 master weights ``4*P`` when the model is not
    fp32: ``12*P/W`` for stage 1-3, ``12*P`` for stage 0 16-bit, ``8*P`` for fp32 stage 0 and ``--ds none``
    (torch AdamW on fp32 weights has no master copy). 0 when the optimizer is offloaded.

Buffers and the rest (our additions; DeepSpeed's estimators leave them out):

``buffers``
    ZeRO communication buckets read from the config. Stage 1/2: the contiguous gradient ("ipg") bucket of
    ``reduce_bucket_size`` elements in the gradient dtype, twice with ``overlap_comm`` (double buffering); it is
    allocated at full size whatever the model size. The stage-1/2 ``allgather_bucket_size`` costs nothing in
    DeepSpeed 0.19 (parameters are gathered in place with ``all_gather_into_tensor``); DeepSpeed 0.8, which the
    reference used, staged them through a bucket of that size, which is why its memory grew with it. Stage 3:
    one ipg bucket of ``reduce_bucket_size * b`` plus the gathered ("live") parameters DeepSpeed may keep between
    uses, ``min(max(stage3_max_live_parameters, stage3_prefetch_bucket_size), P) * b`` (with the reference's
    ``stage3_max_reuse_distance`` of 1e9 nothing is released before that limit). Stage 0 with ``W > 1``: the
    all-reduce bucket ``min(reduce_bucket_size, P) * b``. ``--ds none`` with ``W > 1``: DDP's gradient buckets,
    a second fp32 copy of the gradients ``4*P``.
``activations``
    Saved for the backward, one micro-batch (no activation checkpointing), per block ``s*m*h*(16*b_act + 2)``
    bytes: the block input and both LayerNorm inputs/outputs, q, k, v and the attention output, the MLP's 4h
    input and GELU output (16 elements of ``b_act`` bytes) and two 1-byte dropout masks. In general
    (``ModelShape.block_elements``): the two norms' inputs and outputs ``4h``, q and the attention output ``2q``,
    k and v ``2kv`` (grouped-query attention: kv = key/value heads x head size), the MLP's ``2I`` (up, activation) or
    ``4I`` gated (gate, up, activation, product), and the masks only where the model has dropout (Llama, Qwen2 and
    Mistral have none). With ``grad_checkpointing`` (``--grad-checkpointing``) each block keeps only its input
    ``s*m*h*b_act``, and one block's activations are recomputed at a time in the backward. That is Korthikanti et
    al.'s ``34*s*m*h`` for 16-bit activations, without the ``5*a*s^2*m`` attention-score term because the
    flash/memory-efficient SDPA kernel keeps no score matrix (``flash_attention=False`` adds
    ``a*s^2*m*(2*b_act + 1)``). Autocast (``--ds none`` with fp16/bf16) keeps the residual stream and the
    LayerNorm inputs/outputs in fp32 (4 of the 16 elements at 4 bytes). Plus the embedding output
    ``s*m*h*(b_act + 1)``.
``logits``
    The loss in fp32 over the vocabulary: the ``s*m*V`` logits in the model dtype, their fp32 upcast, the fp32
    log-softmax saved by cross-entropy, and the fp32 gradient of the logits in the backward: ``14*s*m*V`` bytes
    for 16-bit models, ``16*s*m*V`` for fp32 (the shifted view is copied instead of upcast).
``cuda_context``
    What nvidia-smi counts beyond torch's reserved pool without any NCCL group: CUDA context, loaded kernels,
    cuBLAS handles (``cuda_context_mib``, 770 MiB), plus ``cuda_graphs_exec_mib`` (80 MiB) for the instantiated
    graphs of a ``cuda_graphs`` run. Measured as nvidia-smi's used minus ``torch.cuda.max_memory_reserved`` (the
    step records' ``gpu_mem_used_mib`` and ``torch_peak_reserved_mib``) on the one-GPU ``--ds none`` rows, torch 2.11
    / CUDA 13: eager fp32/fp16 751-767 MiB (H100), graphed bf16 843-845 MiB (H200).
``nccl``
    NCCL's communicator memory on the GPU, by the process groups the run has (the same measurement, per class of
    rows, medians; the NVML v1 rows of ``results/h100x1-eager`` left out, which count ~480 MiB of driver reserve as
    used): a group of one rank, every DeepSpeed run on one GPU (DeepSpeed creates one even then), ``nccl_mib`` 570 MiB
    (1,327-1,419 MiB outside the pool, 24 rows of h100x1-eager and h200x1, minus the context); a group with peers,
    ``--ds none`` on ``W > 1`` GPUs (DDP), ``nccl_peers_mib`` 855 MiB (1,615-1,621, 5 rows of h100x2/x3 and
    h200x2); DeepSpeed on ``W > 1`` GPUs, ``deepspeed_groups_mib`` 200 MiB more (1,813-2,101, median 1,821-1,825, 91
    rows of h100x2/x3 and h200x2/x3).
``cuda_graphs``
    With ``cuda_graphs=True`` (train.py ``--cuda-graphs``, sftbench/graphs.py): the static gradient buffers the
    captured backward writes, one per parameter in the weights' dtype (``b*P``; ``4*P`` for ``--ds none``, whose
    weights are fp32). The graphs' private pool also keeps one micro-batch's activations and logits reserved for
    the whole run, counted here as the ``activations`` and ``logits`` terms already. Measured on the H200 (ZeRO-1,
    bf16, 30 steps): with graphs torch's peak reservation rose 8.3 GiB for Pangu-2.6B, 4.9 GiB of it the static
    gradients and 2.2 GiB the pool, so the pool is not fully shared with eager mode's transient segments: the
    graphed 2.6B run is predicted 13.8% under nvidia-smi (eager 10.0% under), 350M 0.3% over.
``allocator``
    Caching-allocator slack (reserved minus allocated): ``allocator_slack`` (25 %) of the transient terms
    (buffers, activations, logits), which are freed and re-allocated every micro-batch and fragment the pool.

Host terms, whole job (``host_breakdown_mib``)
------------------------------------------------
``offload_optimizer``
    With ``offload_optimizer: cpu``: fp32 master weights ``4*P``, fp32 gradients ``4*P`` and Adam states
    ``8*P`` of all ranks together (``16*P`` = DeepSpeed's "per CPU" figure before its buffer factor).
``offload_params``
    With ``offload_param: cpu`` (stage 3): the 16-bit parameters ``2*P`` (DeepSpeed's ``18`` vs ``16``).
``init_copies``
    DeepSpeed's ``max(4*W, 16)`` (stage 2) / ``max(4*W, 18)`` (stage 3 without ``zero.Init``): each rank holds
    an fp32 model copy on the host while the engine is built, which exceeds the offloaded states for large W.
``pinned_buffers``
    DeepSpeed's ``additional_buffer_factor`` (1.5): pinned staging buffers for the gradient and parameter
    transfers, 0.5 times the offloaded states.
``base_rss``
    Every rank's process without model states: Python, torch, transformers, CUDA libraries
    (``base_rss_mib`` per rank: ~1500 MiB with CUDA, ~600 MiB on CPU; CPU runs have neither of the next two
    terms: gloo, and no CUDA library).
``nccl``
    CUDA runs with a NCCL process group (the same rule as the GPU's ``nccl_mib``: every DeepSpeed run, and
    ``--ds none`` with ``W > 1``): NCCL's library and its communicator's host memory, ``nccl_host_mib`` per rank.
    Measured as the plain loop's RSS per rank with DDP on 2 and 3 GPUs minus its RSS on one GPU (no process
    group), same H100 host, both models: +279 to +298 MiB (``results/h100x{1,2,3}``).
``deepspeed``
    CUDA DeepSpeed runs: the DeepSpeed library and engine beyond the NCCL term, ``deepspeed_host_mib`` per rank.
    Measured as DeepSpeed's RSS per rank without offload minus the DDP plain loop's at the same rank count
    (``results/h100x2``, ``h100x3``): ZeRO-0 +62 to +177 MiB, ZeRO-3 +142 to +203, ZeRO-1/2 +199 to +256;
    one figure between them (150 MiB): every committed DeepSpeed row without offload is then predicted 2-11%
    under its RSS.
``dataset``
    The tokenised set every rank keeps (input ids, labels, attention mask as int64): ``3*8*N*s`` per rank, when
    ``dataset_samples`` is given.
``device_tensors``
    Only with ``cuda=False`` (CPU runs): the GPU terms above (except CUDA context and NCCL) live in host memory,
    for every rank. Buckets count only up to the model's size there: host pages are committed when first
    written, and a 5e8-element bucket for a small model is never filled (cudaMalloc commits all of it on a GPU).

Stage 1/2 non-offloaded runs: DeepSpeed's estimator also prints a host figure (``4*P*W*1.5``) for building an
fp32 model on the host first; train.py creates the weights on the GPU, so it is not counted (it is returned as
``model_states['ds_cpu_bytes']`` for reference).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from sftbench.dsconfig import grad_accum_dtype, offload_device
from sftbench.fmt import MIB

PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# DeepSpeed's defaults where a config leaves a key out (deepspeed/runtime/zero/config.py).
_DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "overlap_comm": None,  # DeepSpeed: False for stage 1/2, True for stage 3
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
}


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's estimator formulas, re-implemented (same arguments, same integer rounding, same return order).

def zero2_model_states(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1, cpu_offload: bool = True,
                       additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """(cpu_bytes, gpu_bytes) as ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``.

    GPU: ``2P`` (16-bit params) with offload, else ``2P + 18P/W`` (18 = 2 grads16 + 4 grads32 + 4 params32 +
    8 Adam). CPU (per node): ``P * max(4W, 16) * 1.5`` with offload, else ``4P * gpus_per_node * 1.5``.
    """
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def zero3_model_states(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                       num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = True,
                       zero_init: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int, int]:
    """(cpu_bytes, gpu_bytes, largest_layer_bytes) as
    ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``.

    GPU: ``4*LL`` plus ``18P/W`` (nothing offloaded), ``2P/W`` (optimizer offloaded) or nothing (both offloaded).
    CPU (per node): ``18P*1.5`` / ``16P*1.5`` with offload (``zero_init``; without it at least ``4P`` per GPU),
    else the ``4*LL`` (``zero_init``) or ``4P`` per GPU staging copy, times 1.5.
    """
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            if zero_init:
                cpu_mem = total_params * 18 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 18 * gpus_factor) * additional_buffer_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            if zero_init:
                cpu_mem = total_params * 16 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 16 * gpus_factor) * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


# ---------------------------------------------------------------------------------------------------------------

def largest_layer_params(hidden: int, vocab: int, intermediate: int | None = None, max_positions: int = 1024) -> int:
    """Parameters of the largest single module of a Pangu-α/GPT-2 model (DeepSpeed's ``largest_layer_params``):
    the word embedding ``V*h`` (the tied LM head is the same tensor), or an MLP projection if that is larger."""
    inter = intermediate or 4 * hidden
    return max(vocab * hidden, hidden * inter + inter, max_positions * hidden, 3 * hidden * hidden)


def _zero_section(ds_config: dict | None) -> dict:
    if not ds_config:
        return {}
    zo = ds_config.get("zero_optimization") or {}
    return zo if isinstance(zo, dict) else {}


def _touched_buffer_cap(stage, P: int, b: int, zo: dict, zget) -> float:
    """Upper bound of the bucket bytes a CPU run actually writes: each bucket at most the model's size."""
    if stage is None:
        return 4 * P
    n = 1
    if stage in (1, 2) and zo.get("overlap_comm"):
        n = 2
    if stage == 3:
        n = 2  # the ipg bucket and the gathered parameters
    return n * P * b


def _mib(nbytes: float) -> float:
    return round(nbytes / MIB, 1)


def _load_config(ds_config: dict | str | os.PathLike | None) -> dict | None:
    if ds_config is None or isinstance(ds_config, dict):
        return ds_config
    with open(ds_config, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class ModelShape:
    """What the model contributes: its parameter count and the dimensions activations scale with. The last four
    default to a Pangu-α / GPT-2 block (multi-head attention, a two-matrix MLP, dropout); a transformers model's
    shape (``sftbench.models.shape.hf_shape``) gives its own: key/value heads (grouped-query attention), the head
    size, a gated MLP (gate, up, down) and whether its blocks keep dropout masks."""

    n_params: int
    hidden: int
    n_layers: int
    n_heads: int
    vocab: int
    intermediate: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    gated_mlp: bool = False
    dropout: bool = True

    @classmethod
    def of(cls, shape: dict) -> "ModelShape":
        """From ``presets.model_shape``'s or ``sftbench.models``' shape dict."""
        return cls(shape["n_params"], shape["hidden"], shape["n_layers"], shape["n_heads"], shape["vocab"],
                   shape.get("intermediate"), shape.get("n_kv_heads"), shape.get("head_dim"),
                   bool(shape.get("gated_mlp", False)), bool(shape.get("dropout", True)))

    @classmethod
    def of_config(cls, config, n_params: int) -> "ModelShape":
        """From a built model's config (``PanguConfig``) and its parameter count (``pangu.count_params``: under
        ZeRO-3 the model's own tensors are partitioned, so they cannot be counted)."""
        return cls(n_params, config.hidden_size, config.num_layers, config.num_heads, config.vocab_size,
                   config.intermediate_size)

    def block_elements(self) -> tuple[int, int]:
        """Elements per token one block saves for the backward: (the norms' inputs and outputs, the rest)."""
        hd = self.head_dim or self.hidden // self.n_heads
        q, kv = self.n_heads * hd, (self.n_kv_heads or self.n_heads) * hd
        inter = self.intermediate or 4 * self.hidden
        return 4 * self.hidden, 2 * q + 2 * kv + (4 if self.gated_mlp else 2) * inter


@dataclass(frozen=True)
class RunShape:
    """What the run contributes. ``ds_config``: the resolved DeepSpeed config (dict or JSON path), None for
    ``--ds none`` (torch AdamW, fp32 weights, autocast for fp16/bf16). ``precision`` (fp32/fp16/bf16) is what runs,
    whatever the config's precision blocks say. ``zero_init``: stage-3 models are built partitioned (train.py uses
    ``zero.Init``). ``cuda=False`` predicts a CPU run: nothing on a GPU, every tensor in host memory."""

    ds_config: dict | str | os.PathLike | None
    world_size: int
    precision: str
    seq_len: int = 512
    micro_batch: int = 1
    cuda: bool = True
    flash_attention: bool = True
    zero_init: bool = True
    dataset_samples: int | None = None
    cuda_graphs: bool = False
    coalesce_reduction: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision must be one of {tuple(PRECISION_BYTES)}, got {self.precision!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")


@dataclass(frozen=True)
class Limits:
    """The hardware to fit: GPU memory per rank and host memory, MiB (None: unknown, not checked)."""

    gpu_total_mib: float | None = None
    host_total_mib: float | None = None


@dataclass(frozen=True)
class Constants:
    """The measured constants of the terms without a formula (the module docstring says where each comes from)."""

    cuda_context_mib: float = 770.0
    cuda_graphs_exec_mib: float = 80.0
    nccl_mib: float = 570.0
    nccl_peers_mib: float = 855.0
    deepspeed_groups_mib: float = 200.0
    base_rss_mib: float | None = None  # None: 1500 MiB per rank with CUDA, 600 on CPU
    nccl_host_mib: float = 290.0
    deepspeed_host_mib: float = 150.0
    allocator_slack: float = 0.25
    additional_buffer_factor: float = 1.5


@dataclass
class ModelStates:
    """One ZeRO stage's model-state terms, bytes: GPU (per rank) and host (whole job)."""

    gpu: dict
    host: dict
    formula: str
    ds_cpu_bytes: int | None = None
    notes: list = field(default_factory=list)


@dataclass
class Prediction:
    """Per-GPU and whole-job host memory, term by term (bytes); ``to_json`` is what the logs and the report keep."""

    model: ModelShape
    run: RunShape
    limits: Limits
    gpu: dict
    host: dict
    states: ModelStates
    model_state_gpu_bytes: float
    largest_layer: int
    stage: int | None
    offload_optimizer: str | None
    offload_param: str | None

    @property
    def gpu_mib(self) -> float:
        return _mib(sum(self.gpu.values()))

    @property
    def host_mib(self) -> float:
        return _mib(sum(self.host.values()))

    @property
    def fits(self) -> bool | None:
        """True/False against the GPU limit (CUDA runs) and, when given, the host limit; None when none is known."""
        checks = []
        if self.run.cuda and self.limits.gpu_total_mib:
            checks.append(self.gpu_mib <= self.limits.gpu_total_mib)
        if self.limits.host_total_mib:
            checks.append(self.host_mib <= self.limits.host_total_mib)
        return all(checks) if checks else None

    def to_json(self) -> dict:
        """The JSON-ready dict: ``gpu_mib`` (per GPU), ``host_mib`` (whole job) and ``host_mib_per_rank``,
        ``gpu_breakdown_mib`` / ``host_breakdown_mib`` (the terms), ``model_states`` (bytes, DeepSpeed's formulas),
        ``fits`` and the ``inputs``."""
        h, m, r = self.host, self.model, self.run
        return {
            "version": 1,
            "gpu_mib": self.gpu_mib,
            "host_mib": self.host_mib,
            "host_mib_per_rank": _mib(sum(h.values()) / r.world_size),
            "gpu_breakdown_mib": {k: _mib(v) for k, v in self.gpu.items()},
            "host_breakdown_mib": {k: _mib(v) for k, v in h.items()},
            "model_states": {
                "formula": self.states.formula,
                "gpu_bytes": int(round(self.model_state_gpu_bytes)),
                "host_bytes": int(round(h["offload_optimizer"] + h["offload_params"] + h["init_copies"]
                                        + h["pinned_buffers"])),
                "ds_cpu_bytes": self.states.ds_cpu_bytes,
                "largest_layer_params": self.largest_layer,
            },
            "fits": self.fits,
            "gpu_total_mib": self.limits.gpu_total_mib,
            "host_total_mib": self.limits.host_total_mib,
            "inputs": {
                "n_params": m.n_params, "zero_stage": self.stage, "offload_optimizer": self.offload_optimizer,
                "offload_param": self.offload_param, "world_size": r.world_size, "precision": r.precision,
                "seq_len": r.seq_len, "micro_batch": r.micro_batch, "hidden": m.hidden, "n_layers": m.n_layers,
                "n_heads": m.n_heads, "vocab": m.vocab, "cuda": r.cuda, "flash_attention": r.flash_attention,
                "zero_init": r.zero_init, "dataset_samples": r.dataset_samples, "cuda_graphs": r.cuda_graphs,
                "coalesce_reduction": r.coalesce_reduction, "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim,
                "intermediate": m.intermediate, "gated_mlp": m.gated_mlp, "dropout": m.dropout,
                "grad_checkpointing": r.grad_checkpointing,
            },
            "notes": list(self.states.notes),
        }


def _empty_host() -> dict:
    return {"offload_optimizer": 0.0, "offload_params": 0.0, "init_copies": 0.0, "pinned_buffers": 0.0}


def _states_plain(P: int, W: int, lowp: bool) -> ModelStates:
    """``--ds none``: torch AdamW on fp32 weights, autocast's low-precision weight copies, DDP's buckets."""
    gpu = {"params": 4 * P + (2 * P if lowp else 0), "grads": 4 * P, "optimizer": 8 * P,
           "buffers": 4 * P if W > 1 else 0.0}  # DDP gradient buckets
    return ModelStates(gpu, _empty_host(), "torch AdamW, fp32 weights" + (" + autocast" if lowp else ""))


def _states_stage0(P: int, W: int, b: int, lowp: bool, zget) -> ModelStates:
    gpu = {"params": b * P, "grads": b * P + 8 * P if lowp else 4 * P, "optimizer": 12 * P if lowp else 8 * P,
           "buffers": min(int(zget("reduce_bucket_size")), P) * b if W > 1 else 0.0}
    return ModelStates(gpu, _empty_host(), "DeepSpeed stage 0 (no partitioning)")


def _states_stage12(stage: int, P: int, W: int, b: int, lowp: bool, off_opt, cfg: dict, zo: dict, zget,
                    cuda: bool, k: Constants) -> ModelStates:
    cpu_b, _ = zero2_model_states(P, W, 1, cpu_offload=bool(off_opt),
                                  additional_buffer_factor=k.additional_buffer_factor)
    st = ModelStates({"params": b * P, "grads": 0.0, "optimizer": 0.0, "buffers": 0.0}, _empty_host(),
                     f"deepspeed estimate_zero2_model_states_mem_needs (cpu_offload={bool(off_opt)})", cpu_b)
    if stage == 1 and not off_opt:
        st.formula = "ZeRO-1: full 16-bit gradients, partitioned fp32 states"
    if off_opt:
        st.host["offload_optimizer"] = 16 * P
        st.host["init_copies"] = (max(4 * W, 16) - 16) * P
        st.host["pinned_buffers"] = (k.additional_buffer_factor - 1) * max(4 * W, 16) * P
        if lowp and grad_accum_dtype(cfg) == "fp32":
            # fp32 gradient accumulation keeps the rank's fp32 gradient partition on the GPU. Measured on
            # Pangu-2.6B (bf16, H100): +10.1 / +5.1 / +3.4 GB on 1 / 2 / 3 GPUs over z2_offload_5e8, i.e. 4*P/W.
            st.gpu["grads"] = 4 * P / W
            st.formula += " + fp32 gradient accumulation partition 4P/W on the GPU"
    else:
        st.gpu["grads"] = (b * P if stage == 1 else b * P / W) + 4 * P / W
        st.gpu["optimizer"] = 12 * P / W
        if cuda:  # measured, not modelled: it depends on the allocator's history, not on tensor sizes
            st.notes.append(f"ZeRO-{stage} without offload: torch's caching allocator can reserve well beyond these "
                            "tensors (measured on Pangu-2.6B: 9.7-14.9 GB for ZeRO-1, 4.4-4.9 GB for ZeRO-2 on "
                            "1-3 GPUs; docs/performance.md), so NVML may read that much higher")
    ipg = int(zget("reduce_bucket_size")) * b if zget("contiguous_gradients") else 0
    overlap = bool(zo.get("overlap_comm")) if zo.get("overlap_comm") is not None else False
    st.gpu["buffers"] += ipg * (2 if overlap else 1)
    return st


def _states_stage3(P: int, LL: int, W: int, b: int, off_opt, off_par, zget, zero_init: bool,
                   k: Constants) -> ModelStates:
    cpu_b, _, _ = zero3_model_states(P, LL, W, 1, cpu_offload=bool(off_opt), cpu_offload_params=bool(off_par),
                                     zero_init=zero_init, additional_buffer_factor=k.additional_buffer_factor)
    st = ModelStates({"params": 4 * LL + (0 if off_par else b * P / W), "grads": 0.0, "optimizer": 0.0,
                      "buffers": 0.0}, _empty_host(),
                     f"deepspeed estimate_zero3_model_states_mem_needs (cpu_offload={bool(off_opt)}, "
                     f"cpu_offload_params={bool(off_par)}, zero_init={zero_init})", cpu_b)
    if off_opt:
        st.host["offload_optimizer"] = 16 * P
        if off_par:
            st.host["offload_params"] = 2 * P
        states = 18 if off_par else 16
        floor = states if zero_init else max(4 * W, states)
        st.host["init_copies"] = (floor - states) * P
        st.host["pinned_buffers"] = (k.additional_buffer_factor - 1) * floor * P
    else:
        st.gpu["grads"] = 4 * P / W
        st.gpu["optimizer"] = 12 * P / W
        if off_par:  # parameters offloaded, optimizer not: not covered by DeepSpeed's estimator
            st.host["offload_params"] = b * P
            st.host["pinned_buffers"] = (k.additional_buffer_factor - 1) * b * P
            st.notes.append("offload_param without offload_optimizer: our own formula (no DeepSpeed estimate)")
    st.gpu["buffers"] += int(zget("reduce_bucket_size")) * b if zget("contiguous_gradients") else 0
    live = max(int(zget("stage3_max_live_parameters")), int(zget("stage3_prefetch_bucket_size")))
    st.gpu["buffers"] += min(live, P) * b
    return st


def _coalesced_grads(st: ModelStates, stage: int, P: int, W: int, b: int, off_opt) -> None:
    """``coalesce_reduction`` (train.py ``--coalesce-reduction``, DeepSpeed's ``engine.coalesce_grad_reduction()``):
    every backward of the window adds into ``param.grad``, so every rank holds the full 16-bit gradients ``b*P``
    until the one reduction at its exit, as ZeRO-1 does without it. Stage 2 keeps that in place of its partitioned
    16-bit term ``b*P/W``; stage 3 and optimizer offload hold it on top of what they keep on the GPU."""
    if stage == 1 and not off_opt:
        return  # ZeRO-1 holds them already
    partitioned16 = b * P / W if stage == 2 and not off_opt else 0.0
    st.gpu["grads"] += b * P - partitioned16
    st.formula += " + full 16-bit gradients b*P over the coalesced window"


def _activation_terms(m: ModelShape, r: RunShape, stage: int | None, lowp: bool) -> tuple[float, float]:
    """(activations, logits) bytes of one micro-batch (with ``grad_checkpointing``: each block's input, and one
    block's activations recomputed in the backward)."""
    tokens = r.seq_len * r.micro_batch
    b_act = 2 if lowp else 4
    norms, rest = m.block_elements()
    masks = 2 * m.hidden if m.dropout else 0  # two 1-byte dropout masks per block
    if stage is None and lowp:
        per_block = tokens * (4 * norms + 2 * rest + masks)  # autocast: residual + LayerNorms stay fp32
    else:
        per_block = tokens * (b_act * (norms + rest) + masks)
    if not r.flash_attention:
        per_block += m.n_heads * r.seq_len * r.seq_len * r.micro_batch * (2 * b_act + 1)
    embedding = tokens * m.hidden * (b_act + (1 if m.dropout else 0))
    if r.grad_checkpointing:
        activations = m.n_layers * tokens * m.hidden * b_act + per_block + embedding
    else:
        activations = m.n_layers * per_block + embedding
    logits = tokens * m.vocab * (14 if lowp else 16)
    return activations, logits


def predict(model: ModelShape, run: RunShape, limits: Limits = Limits(), k: Constants = Constants()) -> Prediction:
    """Predict per-GPU and host memory of one run (see the module docstring for every term): the model states of
    the run's ZeRO stage, then one micro-batch's activations and logits, the CUDA graphs' buffers, the allocator's
    slack, the CUDA context, and the host's base processes and dataset."""
    cfg = _load_config(run.ds_config)
    P, W = int(model.n_params), int(run.world_size)
    b = PRECISION_BYTES[run.precision]
    lowp = b == 2
    LL = largest_layer_params(model.hidden, model.vocab, model.intermediate)
    zo = _zero_section(cfg)
    stage = int(zo.get("stage", 0)) if cfg is not None else None
    off_opt = offload_device(zo.get("offload_optimizer")) if stage else None
    off_par = offload_device(zo.get("offload_param")) if stage == 3 else None

    def zget(key: str):
        v = zo.get(key)
        return _DS_DEFAULTS[key] if v is None else v

    if stage is None:
        st = _states_plain(P, W, lowp)
    elif stage == 0:
        st = _states_stage0(P, W, b, lowp, zget)
    elif stage in (1, 2):
        st = _states_stage12(stage, P, W, b, lowp, off_opt, cfg, zo, zget, run.cuda, k)
    elif stage == 3:
        st = _states_stage3(P, LL, W, b, off_opt, off_par, zget, run.zero_init, k)
    else:
        raise ValueError(f"zero_optimization.stage must be 0-3, got {stage!r}")
    if run.coalesce_reduction and stage:
        _coalesced_grads(st, stage, P, W, b, off_opt)
    gpu, host, notes = dict(st.gpu), dict(st.host), st.notes

    model_state_gpu = gpu["params"] + gpu["grads"] + gpu["optimizer"]
    if not run.cuda:
        # Host pages are committed when first written: a bucket larger than the model is never touched beyond
        # the model's size (cudaMalloc, by contrast, commits the whole bucket on a GPU).
        gpu["buffers"] = min(gpu["buffers"], _touched_buffer_cap(stage, P, b, zo, zget))

    gpu["activations"], gpu["logits"] = _activation_terms(model, run, stage, lowp)
    if run.cuda_graphs:  # the static gradient buffers of the captured backward (sftbench/graphs.py)
        gpu["cuda_graphs"] = (4 if stage is None else b) * P
    gpu["allocator"] = k.allocator_slack * (gpu["buffers"] + gpu["activations"] + gpu["logits"])

    base_rss_mib = k.base_rss_mib if k.base_rss_mib is not None else (1500.0 if run.cuda else 600.0)
    host["base_rss"] = base_rss_mib * MIB * W
    host["dataset"] = 3 * 8 * run.dataset_samples * run.seq_len * W if run.dataset_samples else 0
    if run.cuda:
        nccl = stage is not None or W > 1
        gpu["cuda_context"] = (k.cuda_context_mib + (k.cuda_graphs_exec_mib if run.cuda_graphs else 0)) * MIB
        if not nccl:
            gpu["nccl"] = 0.0
        elif W == 1:  # a group of one rank (DeepSpeed makes one even for a single GPU)
            gpu["nccl"] = k.nccl_mib * MIB
        else:  # a group with peers, and DeepSpeed's own groups beside it
            gpu["nccl"] = (k.nccl_peers_mib + (k.deepspeed_groups_mib if stage is not None else 0)) * MIB
        host["nccl"] = (k.nccl_host_mib if nccl else 0) * MIB * W
        host["deepspeed"] = (k.deepspeed_host_mib if stage is not None else 0) * MIB * W
        host["device_tensors"] = 0
    else:
        host["device_tensors"] = sum(gpu.values()) * W
        gpu = {name: 0.0 for name in gpu}
        gpu["cuda_context"] = gpu["nccl"] = 0.0
        notes.append("CPU run: the device terms are host memory of every rank (device_tensors)")
    return Prediction(model, run, limits, gpu, host, st, model_state_gpu, LL, stage, off_opt, off_par)


# A prediction within this share of its measurement holds; the report marks a row outside it, the repredict
# tool counts the rows inside it.
TOLERANCE_PCT = 15.0


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured in percent (negative: under-predicted); None without both numbers."""
    if predicted is None or not measured:
        return None
    return 100.0 * (predicted - measured) / measured


def largest_term(breakdown: dict | None) -> str | None:
    """The largest term of a ``gpu_breakdown_mib`` / ``host_breakdown_mib``: where a miss is first looked for."""
    terms = {k: v for k, v in (breakdown or {}).items() if v}
    return max(terms, key=terms.get) if terms else None


OUTSIDE_POOL_TERMS = ("cuda_context", "nccl")  # GPU terms nvidia-smi counts beyond torch's reserved pool


def gpu_miss_parts(breakdown: dict | None, predicted_mib: float | None, used_mib: float | None,
                   reserved_mib: float | None) -> dict | None:
    """A GPU prediction split where a measurement can check it: outside torch's pool (nvidia-smi's used minus
    torch's peak reserved) against ``OUTSIDE_POOL_TERMS``, and the pool (the peak reserved) against the rest of the
    prediction. MiB: {"outside": (predicted, measured), "pool": (predicted, measured)}; None without the numbers."""
    if breakdown is None or predicted_mib is None or used_mib is None or not reserved_mib:
        return None
    outside = sum(v for k, v in breakdown.items() if k in OUTSIDE_POOL_TERMS)
    return {"outside": (outside, used_mib - reserved_mib), "pool": (predicted_mib - outside, reserved_mib)}


def unmodelled_terms(ds_config: dict | None) -> list[tuple[str, str]]:
    """GPU memory this predictor knows it leaves out for a config, as (name, evidence): what an under-predicted row
    of that config names first, and what the plan footnotes."""
    z = (ds_config or {}).get("zero_optimization") or {}
    stage = int(z.get("stage") or 0) if ds_config is not None else None
    out = []
    overlap = z.get("overlap_comm")
    if stage == 3 and (overlap is None or bool(overlap)):  # DeepSpeed's default for stage 3 is on
        out.append(("ZeRO-3 `overlap_comm`",
                    "what its side streams allocate (torch's allocator caches blocks per stream) is not modelled "
                    "(Pangu-2.6B with parameter offload measured 24-36% above its prediction on 1-3 GPUs, at the "
                    "allocated peak of the same config without it and 1.9-2.5 GB more reserved, "
                    "results/repredict.md); the same configs without it are predicted within ±9%"))
    return out


def locate_gpu_miss(breakdown: dict | None, predicted_mib: float | None, used_mib: float | None,
                    reserved_mib: float | None, allocated_mib: float | None, ds_config: dict | None) -> dict | None:
    """Where a GPU prediction outside the tolerance misses, for the report's and repredict's remarks (each words
    it): ``where`` is "outside" (torch's pool: context and NCCL) or "pool", whichever part carries more of the gap
    (``gpu_miss_parts`` gives both, predicted and measured); in an under-predicted pool the ``cause`` is "reserve"
    where the allocator's reserve beyond its allocated peak (``reserve_mib``) covers at least half the gap, else
    "unmodelled" where the config has ``unmodelled_terms`` (``unmodelled``), else None. None without the numbers."""
    parts = gpu_miss_parts(breakdown, predicted_mib, used_mib, reserved_mib)
    if parts is None:
        return None
    (po, mo), (pp, mp) = parts["outside"], parts["pool"]
    reserve = reserved_mib - allocated_mib if allocated_mib is not None else None
    gaps = unmodelled_terms(ds_config)
    cause = None
    if abs(po - mo) <= abs(pp - mp) and mp > pp:  # the pool, under-predicted
        if reserve is not None and reserve >= (mp - pp) / 2:  # most of the gap
            cause = "reserve"
        elif gaps:
            cause = "unmodelled"
    return {**parts, "where": "outside" if abs(po - mo) > abs(pp - mp) else "pool", "cause": cause,
            "reserve_mib": reserve, "unmodelled": gaps}


def summarize(pred: dict | None) -> str:
    """One line for the console: 'GPU ~12345 MiB/rank (params .., ..), host ~.. MiB, fits'."""
    if not pred:
        return "no prediction"
    fit = {True: "fits", False: "does NOT fit", None: "fit unknown"}[pred.get("fits")]
    if not (pred.get("inputs") or {}).get("cuda", True):
        parts = ", ".join(f"{k} {v:.0f}" for k, v in pred.get("host_breakdown_mib", {}).items() if v)
        return f"host ~{pred['host_mib']:.0f} MiB ({parts}), {fit}"
    parts = ", ".join(f"{k} {v:.0f}" for k, v in pred.get("gpu_breakdown_mib", {}).items() if v)
    more = (" (NVML may read more: allocator caching)" if any("caching allocator" in n for n in pred.get("notes", []))
            else "")
    return f"GPU ~{pred['gpu_mib']:.0f} MiB/rank ({parts}){more}, host ~{pred['host_mib']:.0f} MiB, {fit}"


def predict_both(model: ModelShape, run: RunShape, limits: Limits = Limits()) -> dict[bool, Prediction]:
    """The prediction with CUDA graphs (True) and without (False), whatever ``run.cuda_graphs`` says: what
    ``--cuda-graphs auto`` weighs (``graphs.resolve``'s ``memory_mib``) before choosing one."""
    return {g: predict(model, replace(run, cuda_graphs=g), limits) for g in (True, False)}


def graphs_memory_mib(model: str, ds_config: dict | None, world_size: int, precision: str, seq_len: int,
                      micro_batch: int, coalesce_reduction: bool = False) -> tuple[float, float] | None:
    """Predicted GPU MiB per rank with and without CUDA graphs, for a model preset or checkpoint folder, before the
    model is built (train.py's ``--cuda-graphs auto``); None where the model's shape cannot be read."""
    from sftbench.models.resolve import model_shape

    try:
        shape = ModelShape.of(model_shape(model))
    except (ValueError, OSError, KeyError, TypeError):  # not a preset, folder or Hub model with a readable config
        return None
    both = predict_both(shape, RunShape(ds_config, world_size, precision, seq_len=seq_len, micro_batch=micro_batch,
                                        coalesce_reduction=coalesce_reduction))
    return both[True].gpu_mib, both[False].gpu_mib
