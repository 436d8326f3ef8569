import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from sftbench import metrics
from sftbench.pangu import count_params, preset_config


class FakeNVML:
    """v1 counts driver-reserved memory as used; v2 (what nvidia-smi shows) does not."""

    nvmlMemory_v2 = 0x02000028

    class NVMLError(Exception):
        pass

    def __init__(self, has_v2=True):
        self.has_v2 = has_v2

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version is None:
            return SimpleNamespace(used=1480 * 2**20, total=81559 * 2**20)
        if not self.has_v2:
            raise self.NVMLError("Function Not Found")
        return SimpleNamespace(used=1000 * 2**20, total=81559 * 2**20, reserved=480 * 2**20)


def test_nvml_memory_prefers_the_nvidia_smi_view():
    assert metrics.nvml_memory(FakeNVML(), None).used == 1000 * 2**20
    assert metrics.nvml_memory(FakeNVML(has_v2=False), None).used == 1480 * 2**20


def test_flops_formula_by_hand():
    cfg = preset_config("pangu-2.6b")
    d, layers, v, s = 2560, 32, 40000, 512
    matmul = layers * (4 * d * d + 8 * d * d) + v * d
    assert metrics.flops_per_token(cfg, s) == 6 * matmul + 12 * layers * d * s
    # The matmul weights are nearly all of the parameters (embeddings of positions, norms, biases are not).
    assert 0.95 < metrics.matmul_params(cfg) / count_params(cfg) < 1.0


@pytest.mark.parametrize("name,prec,peak", [("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H200", "bf16", 989.4),
                                            ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
                                            ("Tesla V100-SXM2-16GB", "fp16", 125.0),
                                            ("NVIDIA H100 PCIe", "bf16", 756.5), ("Some GPU", "bf16", None)])
def test_peak_table(name, prec, peak):
    assert metrics.peak_tflops(name, prec) == peak


def test_step_stats_exclude_warmup():
    st = metrics.StepStats(warmup_steps=2)
    for i, s in enumerate([9.0, 5.0, 1.0, 2.0, 3.0]):
        st.add({"step": i + 1, "warmup": i < 2, "step_s": s, "tokens_per_s": 100 / s, "samples_per_s": 1 / s,
                "real_tokens_per_s": 50 / s, "tflops": 1 / s, "mfu_pct": 10 / s, "loss": 10 - i,
                "gpu_mem_used_mib": 100 + i, "torch_peak_alloc_mib": None, "torch_peak_reserved_mib": None,
                "host_rss_mib": 5, "host_used_mib": 6})
    out = st.summary_fields(world_size=2, steps_per_epoch=10)
    assert out["measured_steps"] == 3 and out["step_s_median"] == 2.0
    assert out["epoch_s_est"] == 20.0
    assert out["tokens_per_s"] == 50.0 and out["tokens_per_s_per_gpu"] == 25.0
    assert out["gpu_mem_used_mib_peak"] == 104 and out["torch_peak_alloc_mib"] is None
    assert out["first_loss"] == 10 and out["final_loss"] == 6


def test_step_stats_exclude_fp16_overflow_steps():
    # An overflow step runs no optimizer update (shorter than a real step): out of the statistics, counted.
    st = metrics.StepStats(warmup_steps=1)
    for i, (s, skipped) in enumerate([(9.0, True), (0.5, True), (0.6, True), (2.0, False), (4.0, False)]):
        st.add({"step": i + 1, "warmup": i < 1, "step_s": s, "skipped": skipped, "tokens_per_s": 100 / s,
                "loss": 1.0})
    out = st.summary_fields(world_size=1, steps_per_epoch=10)
    assert out["skipped_steps"] == 3 and out["measured_steps"] == 2
    assert out["step_s_median"] == 3.0 and out["step_s_p90"] == 4.0 and out["tokens_per_s"] == 37.5
    # every step after warm-up skipped: no statistics rather than a median of steps that updated nothing
    st = metrics.StepStats(warmup_steps=1)
    for i in range(3):
        st.add({"step": i + 1, "warmup": i < 1, "step_s": 0.5, "skipped": True, "loss": 1.0})
    out = st.summary_fields(world_size=1, steps_per_epoch=10)
    assert out["measured_steps"] == 0 and out["skipped_steps"] == 3
    assert out["step_s_median"] is None and out["epoch_s_est"] is None


@pytest.mark.parametrize("n,q,rank", [(10, 90, 9), (7, 90, 7), (20, 90, 18), (30, 90, 27), (2, 50, 1), (1, 90, 1),
                                      (4, 100, 4), (4, 0, 1)])
def test_percentile_is_nearest_rank(n, q, rank):
    # nearest rank: the ceil(q/100 * n)-th smallest value (values 1..n in shuffled order)
    xs = [float(v) for v in range(n, 0, -1)]
    assert metrics.percentile(xs, q) == rank


def test_host_peak_is_the_high_water_mark_since_the_reset(tmp_path):
    """The step's host peak: a transient freed before the read still counts, one freed before the reset does not;
    without the kernel's reset file the peak is None (the record keeps only the RSS at the step's end)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("the kernel's high-water-mark reset is Linux-only")
    code = (
        "from sftbench.metrics import HostProbe\n"
        "h = HostProbe()\n"
        "big = bytearray(400 * 2**20); big[::4096] = b'x' * len(big[::4096]); del big\n"  # touched, then freed
        "h.reset_peak(); before = h.peak_rss_mib(); rss = h.rss_mib()\n"
        "t = bytearray(200 * 2**20); t[::4096] = b'x' * len(t[::4096]); del t\n"
        "print(before, rss, h.peak_rss_mib(), h.rss_mib())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    before, rss, peak, after = map(float, out.stdout.split())
    assert before < rss + 50  # the 400 MiB freed before the reset is not in the new peak
    assert peak >= rss + 190 and after < peak - 150  # the 200 MiB transient after it is
    fake = tmp_path / "proc"
    fake.mkdir()
    assert metrics.HostProbe(str(fake)).peak_rss_mib() is None  # no clear_refs: no peak, no error
