"""Hardware detection without torch (sftbench/hardware.py): CUDA_VISIBLE_DEVICES as CUDA applies it, GPU names,
bf16 support, the host's RAM."""
from __future__ import annotations

from sftbench.hardware import Gpu, bf16_supported, gpu_slug, host_total_mib, visible_filter

V100x3 = [Gpu(i, "Tesla V100-SXM2-16GB", 16384.0, "7.0", f"GPU-v{i}") for i in range(3)]


def test_visible_devices_filter():
    gpus = [Gpu(i, "NVIDIA H100", 80000.0, "9.0", f"GPU-{i}abc") for i in range(4)]
    assert [g.index for g in visible_filter(gpus, "2,0")] == [2, 0]
    assert [g.index for g in visible_filter(gpus, "GPU-1")] == [1]
    assert visible_filter(gpus, "") == []
    assert len(visible_filter(gpus, None)) == 4
    assert [g.index for g in visible_filter(gpus, "1,-1,2")] == [1]  # CUDA stops at the first invalid index
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_slug("Tesla V100-SXM2-16GB") == "v100"
    assert bf16_supported(gpus) and not bf16_supported(V100x3)
    assert bf16_supported([])  # CPU


def test_host_total_mib_reads_this_machine():
    """MemTotal of /proc/meminfo in MiB: the total psutil reads from the same line."""
    import psutil
    assert host_total_mib() == psutil.virtual_memory().total / 1024 ** 2
