"""Timing, FLOPs/MFU and memory probes (NVML, torch, psutil) for the training loop.

FLOPs formula (the one used everywhere in sftbench): training FLOPs per token =
    6 * N_matmul + 12 * L * d * S
where N_matmul counts the weights of every matrix multiply a token goes through (the attention q/k/v/out and MLP
projections of all L layers, the top query layer included, and the vocab x d output projection; embeddings lookups,
LayerNorms and biases are not matmuls and are left out), d is the hidden size and S the sequence length. The second
term is the attention score and value products (QK^T and AV: 2 * 2 * S * d multiply-adds per token per layer
forward, x3 for forward+backward), counted without the causal half, as in the PaLM paper's appendix B. MFU =
achieved FLOP/s / the device's dense peak for the precision run, from PEAK_TFLOPS below.

Any transformers causal LM (``linear_flops_per_token``, from ``sftbench.models.shape``'s dict) by the same rule,
from the model's own linear layers: with H hidden, I intermediate, V vocabulary, q = heads x head_dim and kv =
key/value heads x head_dim (grouped-query attention), per layer H*q (q) + 2*H*kv (k, v) + q*H (o) and 3*H*I for a
gated MLP (gate, up, down) or 2*H*I, plus the head V*H (tied or not, it is a matmul); x6 per token; plus the
attention scores and context 12 * L * q * S. For Pangu (q = kv = H, two-matrix MLP) it is ``flops_per_token``.
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Any

from sftbench.fmt import MIB, skipped_steps_text


# Dense (no sparsity) peak TFLOPS by GPU name fragment, from the vendors' datasheets: bf16/fp16 on tensor cores,
# fp32 on CUDA cores (TF32 off, as torch's default for matmuls). First matching fragment wins: order matters.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),   # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
]


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    if not device_name:
        return None
    for frag, peaks in PEAK_TFLOPS:
        if frag.lower() in device_name.lower():
            return peaks.get(precision) or None
    return None


def _cfg(config: Any, *names: str) -> int:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return int(v)
    raise AttributeError(f"config has none of {names}")


def matmul_params(config: Any) -> int:
    """Weights of the matmuls one token goes through (see module docstring)."""
    d = _cfg(config, "hidden_size", "n_embd")
    layers = _cfg(config, "num_layers", "n_layer", "num_hidden_layers")
    inner = getattr(config, "intermediate_size", None) or 4 * d
    vocab = _cfg(config, "vocab_size")
    per_layer = 4 * d * d + 2 * d * inner
    return layers * per_layer + vocab * d


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6 * N_matmul + 12 * L * d * S."""
    d = _cfg(config, "hidden_size", "n_embd")
    layers = _cfg(config, "num_layers", "n_layer", "num_hidden_layers")
    return 6.0 * matmul_params(config) + 12.0 * layers * d * seq_len


def linear_flops_per_token(shape: dict, seq_len: int) -> float:
    """Training FLOPs per token of a transformers causal LM from its shape dict (see the module doc)."""
    h, layers, inter, vocab = shape["hidden"], shape["n_layers"], shape["intermediate"], shape["vocab"]
    q = shape["n_heads"] * shape["head_dim"]
    kv = shape["n_kv_heads"] * shape["head_dim"]
    per_layer = 2 * h * q + 2 * h * kv + (3 if shape["gated_mlp"] else 2) * h * inter
    return 6.0 * (layers * per_layer + vocab * h) + 12.0 * layers * q * seq_len


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a list: the ceil(q/100 * n)-th smallest value."""
    if not xs:
        return None
    s = sorted(xs)
    # q * n / 100 keeps exact products exact (0.9 * 30 would not be); ceil, not round(x + 0.5), which rounds
    # half to even and so skipped one rank up whenever q * n / 100 was an odd integer.
    k = max(0, min(len(s) - 1, math.ceil(q * len(s) / 100.0) - 1))
    return s[k]


class HostProbe:
    """Host memory of this process and of the machine (psutil), and this process's peak RSS since a reset: the
    kernel's high-water mark (``VmHWM`` in /proc/self/status), which writing "5" to /proc/self/clear_refs resets to
    the current RSS (Linux 4.0+; elsewhere, or where the write is refused, the peak is None and the step records the
    RSS at its end only)."""

    def __init__(self, proc_dir: str = "/proc/self") -> None:
        import psutil
        self._psutil = psutil
        self._proc = psutil.Process(os.getpid())
        self._proc_dir = proc_dir
        self._peak_ok = os.path.exists(os.path.join(proc_dir, "clear_refs"))

    def rss_mib(self) -> float:
        return self._proc.memory_info().rss / MIB

    def reset_peak(self) -> None:
        """Start a new peak: the high-water mark becomes the current RSS (O(1) in the kernel, no page walk)."""
        if not self._peak_ok:
            return
        try:
            with open(os.path.join(self._proc_dir, "clear_refs"), "w") as f:
                f.write("5")
        except OSError:
            self._peak_ok = False  # refused (permissions, an old kernel): no peaks from here on

    def peak_rss_mib(self) -> float | None:
        """The largest RSS since the last ``reset_peak`` (None where the kernel does not offer it)."""
        if not self._peak_ok:
            return None
        try:
            with open(os.path.join(self._proc_dir, "status"), encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0  # kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    def used_mib(self) -> float:
        vm = self._psutil.virtual_memory()
        return (vm.total - vm.available) / MIB


def nvml_memory(nvml, handle):
    """Memory info as nvidia-smi reports it. The v1 call counts the driver-reserved memory as used (about
    480 MiB more than nvidia-smi on an H100 with driver 580); the v2 call, where the driver has it, does not."""
    v2 = getattr(nvml, "nvmlMemory_v2", None)
    if v2 is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=v2)
        except nvml.NVMLError:
            pass  # old driver without the v2 struct: fall back to v1
    return nvml.nvmlDeviceGetMemoryInfo(handle)


class GpuProbe:
    """NVML view of one GPU, found by its UUID (robust to CUDA_VISIBLE_DEVICES remapping and containers)."""

    def __init__(self, uuid: str | None):
        self.uuid, self.index, self.error = uuid, None, None
        self._handle, self._nvml = None, None
        if uuid is None:
            self.error = "no GPU"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self._nvml, self._handle = pynvml, h
            self.index = pynvml.nvmlDeviceGetIndex(h)
        except ImportError as e:
            self.error = f"nvidia-ml-py not installed: {e}"
        except Exception as e:  # pynvml raises NVMLError subclasses built at run time; report, don't crash a run
            self.error = f"NVML: {e}"

    def used_mib(self) -> float | None:
        if self._handle is None:
            return None
        try:
            return nvml_memory(self._nvml, self._handle).used / MIB
        except self._nvml.NVMLError as e:
            # A probe must never end a training run: the step is logged with a null reading instead.
            self.error = f"NVML: {e}"
            return None

    def total_mib(self) -> float | None:
        if self._handle is None:
            return None
        return nvml_memory(self._nvml, self._handle).total / MIB


def cpu_model() -> str:
    """The CPU's model name (for the report's hardware line)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cuda_uuid(device_index: int) -> str | None:
    """NVML-style UUID ("GPU-xxxxxxxx-...") of a torch CUDA device."""
    import torch
    props = torch.cuda.get_device_properties(device_index)
    u = getattr(props, "uuid", None)
    if u is None:
        return None
    s = str(u)
    return s if s.startswith("GPU-") else f"GPU-{s}"


def duration_text(s: float) -> str:
    """Seconds as the console prints them: '2.3 s', '12.5 min', '3.1 h'."""
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def epoch_text(measured_s: float | None, fields: dict) -> str:
    """The epoch time a run reports: measured when a full epoch ran, else the estimate (marked as one)."""
    if measured_s is not None:
        return f"{duration_text(measured_s)} (measured)"
    est = fields.get("epoch_s_est")
    return f"~{duration_text(est)} (estimated)" if est is not None else "not known"


class StepStats:
    """Collects step records of one rank and turns them into the summary fields.

    Warm-up steps and fp16 overflow steps are left out of the statistics: an overflow step (``skipped``) runs no
    optimizer update, so it is shorter than a real step. DeepSpeed's dynamic loss scale starts at
    2^initial_scale_power (32 in the reference configs) and halves per overflow, so an fp16 run's first ~20 steps
    can all be overflow steps; ``skipped_steps`` counts them.
    """

    def __init__(self, warmup_steps: int, precision: str | None = None):
        self.warmup_steps = warmup_steps
        self.precision = precision  # names the cause of skipped steps (fp16 loss scale, bf16 overflow check)
        self.records: list[dict] = []

    def add(self, rec: dict) -> None:
        self.records.append(rec)

    def no_statistics_reason(self) -> str:
        """Why no step was measured, naming only the causes that apply (warm-up, skipped updates)."""
        n = len(self.records)
        if not n:
            return "no step ran"
        warm = sum(1 for r in self.records if r["warmup"])
        overflow = sum(1 for r in self.records if r.get("skipped") and not r["warmup"])
        causes = []
        if warm:
            causes.append(f"{warm} warm-up (--warmup-steps {self.warmup_steps})")
        if overflow:
            causes.append(skipped_steps_text(overflow, self.precision))
        fix = "run more steps" + (" or lower --warmup-steps" if warm else "")
        return f"no measured step: of the {n} step(s), {' and '.join(causes)}; {fix}"

    def summary_fields(self, world_size: int, steps_per_epoch: int) -> dict:
        measured = [r for r in self.records if not r["warmup"] and not r.get("skipped")]
        step_s = [r["step_s"] for r in measured]
        med = median(step_s)

        def peak(key: str) -> float | None:
            vals = [r[key] for r in self.records if r.get(key) is not None]
            return max(vals) if vals else None

        def at_median(key: str) -> float | None:
            # Medians of the per-step rates (the median step's rate when tokens per step are constant), so one
            # slow step (GC, a checkpoint) does not move them.
            if med is None:
                return None
            vals = [r[key] for r in measured if r.get(key) is not None]
            return median(vals) if vals else None

        tok = at_median("tokens_per_s")
        return {
            "steps": len(self.records),
            "measured_steps": len(measured),
            "skipped_steps": sum(1 for r in self.records if r.get("skipped")),
            "step_s_median": med,
            "step_s_p90": percentile(step_s, 90),
            "step_s_mean": sum(step_s) / len(step_s) if step_s else None,
            "samples_per_s": at_median("samples_per_s"),
            "tokens_per_s": tok,
            "tokens_per_s_per_gpu": tok / world_size if tok is not None else None,
            "real_tokens_per_s": at_median("real_tokens_per_s"),
            "tflops": at_median("tflops"),
            "mfu_pct": at_median("mfu_pct"),
            "gpu_mem_used_mib_peak": peak("gpu_mem_used_mib"),
            "torch_peak_alloc_mib": peak("torch_peak_alloc_mib"),
            "torch_peak_reserved_mib": peak("torch_peak_reserved_mib"),
            "host_rss_mib_peak": peak("host_rss_mib"),
            "host_rss_step_peak_mib": peak("host_rss_peak_mib"),
            "host_used_mib_peak": peak("host_used_mib"),
            "steps_per_epoch": steps_per_epoch,
            "epoch_s_est": steps_per_epoch * med if med is not None else None,
            "first_loss": self.records[0]["loss"] if self.records else None,
            "final_loss": self.records[-1]["loss"] if self.records else None,
        }
