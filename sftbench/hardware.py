"""The hardware a run or a plan sees, torch-free: visible GPUs (nvidia-smi, else NVML, filtered by
CUDA_VISIBLE_DEVICES), bf16 support, a GPU's short name, the host's RAM, cores and a tag that tells machines apart."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

@dataclass
class Gpu:
    index: int
    name: str
    memory_mib: float | None = None
    compute_cap: str | None = None
    uuid: str | None = None


def visible_filter(gpus: list[Gpu], visible: str | None) -> list[Gpu]:
    """Apply CUDA_VISIBLE_DEVICES (indices or UUIDs, in the order given) to the NVML list."""
    if visible is None:
        return gpus
    out = []
    for tok in [t.strip() for t in visible.split(",") if t.strip()]:
        if tok.lstrip("-").isdigit():
            if int(tok) < 0:
                break  # CUDA stops at the first invalid index
            out += [g for g in gpus if g.index == int(tok)]
        else:
            out += [g for g in gpus if g.uuid and g.uuid.startswith(tok)]
    return out


def detect_gpus(env: dict | None = None) -> list[Gpu]:
    """The GPUs this process may use: nvidia-smi, else NVML (nvidia-ml-py), filtered by CUDA_VISIBLE_DEVICES."""
    env = os.environ if env is None else env
    gpus: list[Gpu] = []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap,uuid", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 5 and parts[0].isdigit():
                    mem = float(parts[2]) if re.match(r"^[\d.]+$", parts[2]) else None
                    cap = parts[3] if re.match(r"^\d+\.\d+$", parts[3]) else None
                    gpus.append(Gpu(int(parts[0]), parts[1], mem, cap, parts[4]))
    except (OSError, subprocess.SubprocessError):
        pass
    if not gpus:
        try:
            import pynvml
            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else name
                uuid = pynvml.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2 ** 20
                gpus.append(Gpu(i, name, mem, f"{major}.{minor}", uuid))
        except Exception:  # no NVML library / no driver: a CPU machine
            gpus = []
    return visible_filter(gpus, env.get("CUDA_VISIBLE_DEVICES"))


def bf16_supported(gpus: list[Gpu]) -> bool:
    """bf16 needs compute capability >= 8.0 (Ampere); by name when the driver does not report it. CPU: yes."""
    if not gpus:
        return True
    for g in gpus:
        if g.compute_cap:
            if float(g.compute_cap) < 8.0:
                return False
        elif re.search(r"V100|P100|T4\b|K80|P40|P4\b|TITAN V|RTX 20", g.name, re.I):
            return False
    return True


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'Tesla V100-SXM2-16GB' -> 'v100'."""
    name = re.sub(r"(?i)\b(nvidia|tesla|geforce|quadro)\b", " ", name)
    for tok in re.findall(r"[A-Za-z]+\d+[A-Za-z0-9]*", name):
        if not re.match(r"(?i)^\d*gb$", tok) and not re.match(r"(?i)^(sxm|pcie|hbm)\d*", tok):
            return tok.lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "gpu"


def host_total_mib() -> float | None:
    """This machine's RAM in MiB (MemTotal), None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_affinity() -> int | None:
    """How many cores this process may run on (a taskset split shows here); None where the OS cannot say."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def host_tag() -> str | None:
    """A short tag that differs between machines and names none: a hash of the kernel's boot id (each VM or host
    boots its own kernel; containers on one host share it). A folder resumed on another machine then says so."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None
    return hashlib.sha1(boot.encode()).hexdigest()[:8] if boot else None
