"""The process's environment: keep DeepSpeed's JIT op builds out of known traps (and say what was changed), and pick
this rank's device the way the launcher means it.

DeepSpeed 0.19.8 parses every entry of TORCH_CUDA_ARCH_LIST as ``major.minor`` integers, so an arch with a feature
suffix such as ``9.0a`` (Hopper's arch-specific target, common in images built for H100) makes its fused-Adam build
die with ``ValueError: invalid literal for int() with base 10: '0a'``. The suffix only unlocks arch-specific
instructions that DeepSpeed's kernels don't use, so ``9.0`` builds the same kernels.
"""
from __future__ import annotations

import os
import re
import socket
from typing import MutableMapping

_ARCH = re.compile(r"^(\d+)\.(\d+)([a-z]*)(\+PTX)?$")


def sanitize_arch_list(value: str) -> str:
    """'8.0;9.0a+PTX' -> '8.0;9.0+PTX'. Unknown tokens are kept as they are (let the builder report them)."""
    out: list[str] = []
    for tok in re.split(r"[;\s]+", value.strip()):
        if not tok:
            continue
        m = _ARCH.match(tok)
        fixed = f"{m.group(1)}.{m.group(2)}{m.group(4) or ''}" if m else tok
        if fixed not in out:
            out.append(fixed)
    return ";".join(out)


def fix_cuda_arch_list(env: MutableMapping[str, str] = os.environ) -> dict:
    """Rewrite TORCH_CUDA_ARCH_LIST in place when DeepSpeed can't parse it. Returns what was used, for the log."""
    before = env.get("TORCH_CUDA_ARCH_LIST")
    if not before:
        return {"TORCH_CUDA_ARCH_LIST": None, "changed_from": None}
    after = sanitize_arch_list(before)
    if after != before:
        env["TORCH_CUDA_ARCH_LIST"] = after
        return {"TORCH_CUDA_ARCH_LIST": after, "changed_from": before}
    return {"TORCH_CUDA_ARCH_LIST": before, "changed_from": None}


def extensions_dir(env: MutableMapping[str, str] = os.environ):
    """The folder torch builds JIT extensions in: ``TORCH_EXTENSIONS_DIR``, else its per-user cache (which holds one
    folder per Python and CUDA version)."""
    from pathlib import Path

    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


# /proc/cpuinfo lines that describe the processor (not its clock, which changes from one read to the next)
_CPU_KEYS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "Features", "CPU implementer",
             "CPU architecture", "CPU part")


def cpu_fingerprint(cpuinfo_text: str, machine: str, version: str) -> str:
    """What py-cpuinfo's answer depends on: the processor's identity lines, the architecture, py-cpuinfo's
    version (sha256, 16 hex digits)."""
    import hashlib
    keep = sorted({line.strip() for line in cpuinfo_text.splitlines()
                   if line.split(":", 1)[0].strip() in _CPU_KEYS})
    return hashlib.sha256("\n".join([machine, version, *keep]).encode()).hexdigest()[:16]


def cache_cpu_info(cache_dir: str | os.PathLike | None = None) -> str | None:
    """Make py-cpuinfo's ``get_cpu_info()`` answer from a cache. DeepSpeed's op builders call it twice for every op
    they load (for ``-march`` and the SIMD width of the build flags, even when the op is built), CPU Adam once more,
    and each call starts a Python subprocess: ~1.4 s of CPU, four times per rank of a CPU run. The answer depends on
    the processor only, so it is kept for the process and in a file beside the compiled ops (``cache_dir``, default
    the extensions folder), keyed by ``cpu_fingerprint``. Returns the file, or None without py-cpuinfo."""
    import json
    import platform
    from pathlib import Path

    try:
        import cpuinfo
    except ImportError:
        return None
    if getattr(cpuinfo.get_cpu_info, "sftbench_cache", None):
        return cpuinfo.get_cpu_info.sftbench_cache
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    root = Path(cache_dir) if cache_dir else extensions_dir()
    path = root / f"sftbench_cpuinfo_{cpu_fingerprint(text, platform.machine(), cpuinfo.CPUINFO_VERSION_STRING)}.json"
    original = cpuinfo.get_cpu_info
    held: dict = {}

    def get_cpu_info() -> dict:
        if not held:
            try:
                held.update(json.loads(path.read_text()))
            except (OSError, ValueError):
                held.update(original())
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{path.name}.{os.getpid()}")
                    tmp.write_text(json.dumps(held))
                    os.replace(tmp, path)
                except OSError:
                    pass  # a read-only cache folder: this process still keeps its answer
        return dict(held)

    get_cpu_info.sftbench_cache = str(path)
    cpuinfo.get_cpu_info = get_cpu_info
    return str(path)


def prepare_op_builds() -> dict:
    """Before anything imports DeepSpeed's op builders: ``fix_cuda_arch_list`` (returned, for the log) and
    ``cache_cpu_info``."""
    info = fix_cuda_arch_list()
    cache_cpu_info()
    return info


def rank_device(local_rank_arg: int = -1):
    """(on_cpu, local_rank, device) for this process; makes a CUDA device the current one.

    CPU when ``DS_ACCELERATOR=cpu`` or no CUDA device is usable; else ``cuda:<LOCAL_RANK>`` (the launcher's variable,
    then the ``--local_rank`` argument, then 0). Shared by train.py and the bench scripts so all pick alike."""
    import torch  # here, not at import time: train.py fixes the arch list before torch is imported

    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank_arg, 0)))
    if on_cpu:
        return True, local_rank, torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return False, local_rank, device


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set by the deepspeed launcher and torchrun (RANK, WORLD_SIZE), or by mpirun / a PMI launcher.
_LAUNCHED = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID")


def single_process_env(env: MutableMapping[str, str] = os.environ) -> bool:
    """Make ``python train.py --ds ...`` (no launcher) a 1-rank job. Returns True when it set the variables.

    Without a launcher's variables, ``deepspeed.init_distributed()`` falls back to MPI discovery and dies on
    ``import mpi4py``. A process that no launcher started is one rank on this host, as torchrun's standalone mode
    would make it; a process started by mpirun (or another launcher) is left alone."""
    if any(k in env for k in _LAUNCHED):
        return False
    env.update({"RANK": "0", "LOCAL_RANK": env.get("LOCAL_RANK", "0"), "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": env.get("MASTER_PORT", str(free_port()))})
    return True
