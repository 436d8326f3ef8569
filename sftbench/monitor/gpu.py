"""GPU (NVML) and host (psutil) sources.

``GpuSource.sample()`` returns a ``GpuSnapshot``; when NVML cannot be used (no GPU, no driver, ``pynvml`` not
installed, an NVMLError, or disabled with ``SFTBENCH_NO_NVML=1`` / ``--no-gpu``) the snapshot has no GPUs and
``unavailable`` holds the reason, so callers show "GPU metrics unavailable: <reason>" and carry on.
``HostSource`` samples host RAM/swap and the RSS of a pid (psutil); ``Fake*`` sources serve tests and benchmarks.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from sftbench.fmt import MIB
from sftbench.liveness import pid_alive
from sftbench.metrics import nvml_memory

NO_NVML_ENV = "SFTBENCH_NO_NVML"


@dataclass
class GpuProcess:
    pid: int
    used_mib: float | None = None


@dataclass
class GpuInfo:
    index: int
    name: str | None = None
    uuid: str | None = None
    mem_used_mib: float | None = None
    mem_total_mib: float | None = None
    util_pct: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temp_c: float | None = None
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass
class GpuSnapshot:
    time: float
    gpus: list[GpuInfo] = field(default_factory=list)
    unavailable: str | None = None       # reason GPU metrics are missing; None when they are there
    driver: str | None = None


@dataclass
class HostSnapshot:
    time: float
    hostname: str
    ram_used_mib: float | None = None    # total - available (as host_used_mib in the log)
    ram_total_mib: float | None = None
    swap_used_mib: float | None = None
    swap_total_mib: float | None = None
    cpu_pct: float | None = None
    unavailable: str | None = None


class GpuSource(Protocol):
    def sample(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


class NoGpuSource:
    """Always unavailable, with a fixed reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def sample(self) -> GpuSnapshot:
        return GpuSnapshot(time.time(), [], self.reason)

    def close(self) -> None:
        pass


class FakeGpuSource:
    """Returns the given GPUs (or what a callable returns) - for tests and benchmarks."""

    def __init__(self, gpus: Sequence[GpuInfo] | Callable[[], Sequence[GpuInfo]] | None = None,
                 unavailable: str | None = None):
        self.gpus = gpus
        self.unavailable = unavailable
        self.samples = 0

    def sample(self) -> GpuSnapshot:
        self.samples += 1
        if self.unavailable:
            return GpuSnapshot(time.time(), [], self.unavailable)
        g = self.gpus() if callable(self.gpus) else (self.gpus or [])
        return GpuSnapshot(time.time(), list(g))

    def close(self) -> None:
        pass


def _nvml_reason(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    return f"NVML error: {msg}"


class NvmlSource:
    """NVML through ``pynvml`` (package nvidia-ml-py). Initialised lazily; retried every ``retry_s`` on failure."""

    def __init__(self, retry_s: float = 30.0):
        self.retry_s = retry_s
        self._nv = None
        self._handles: list = []
        self._static: list[tuple[str | None, str | None, float | None]] = []
        self._reason: str | None = None
        self._next_try = 0.0
        self._driver: str | None = None

    def _init(self) -> None:
        now = time.monotonic()
        if self._nv is not None or now < self._next_try:
            return
        self._next_try = now + self.retry_s
        try:
            import pynvml  # noqa: PLC0415 - optional dependency, imported only when sampling
        except ImportError as e:
            self._reason = f"pynvml not installed ({e.name or 'pynvml'}; pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            n = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
            static = []
            for h in handles:
                name = _try(pynvml.nvmlDeviceGetName, h)
                if isinstance(name, bytes):
                    name = name.decode(errors="replace")
                uuid = _try(pynvml.nvmlDeviceGetUUID, h)
                if isinstance(uuid, bytes):
                    uuid = uuid.decode(errors="replace")
                lim = _try(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
                static.append((name, uuid, lim / 1000.0 if lim else None))
            drv = _try(pynvml.nvmlSystemGetDriverVersion)
            self._driver = drv.decode() if isinstance(drv, bytes) else drv
        except Exception as e:  # pynvml.NVMLError and friends (driver missing, no device, ...)
            self._reason = _nvml_reason(e)
            return
        if not handles:
            self._reason = "no GPUs visible to NVML"
            return
        self._nv, self._handles, self._static, self._reason = pynvml, handles, static, None

    def sample(self) -> GpuSnapshot:
        self._init()
        now = time.time()
        if self._nv is None:
            return GpuSnapshot(now, [], self._reason or "NVML not initialised")
        nv = self._nv
        gpus = []
        try:
            for i, h in enumerate(self._handles):
                name, uuid, lim = self._static[i]
                g = GpuInfo(i, name, uuid, power_limit_w=lim)
                mem = _try(nvml_memory, nv, h)
                if mem is not None:
                    g.mem_used_mib, g.mem_total_mib = mem.used / MIB, mem.total / MIB
                util = _try(nv.nvmlDeviceGetUtilizationRates, h)
                if util is not None:
                    g.util_pct = float(util.gpu)
                p = _try(nv.nvmlDeviceGetPowerUsage, h)
                g.power_w = p / 1000.0 if p is not None else None
                t = _try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
                g.temp_c = float(t) if t is not None else None
                procs = _try(nv.nvmlDeviceGetComputeRunningProcesses, h) or []
                for pr in procs:
                    used = getattr(pr, "usedGpuMemory", None)
                    g.processes.append(GpuProcess(int(pr.pid), used / MIB if isinstance(used, int) else None))
                gpus.append(g)
        except Exception as e:  # the driver went away mid-run
            self.close()
            self._reason = _nvml_reason(e)
            return GpuSnapshot(now, [], self._reason)
        return GpuSnapshot(now, gpus, None, self._driver)

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass
        self._nv, self._handles = None, []


def _try(fn, *args):
    """Call an NVML query; a field that is not supported on this GPU reads as None."""
    try:
        return fn(*args)
    except Exception as e:
        if type(e).__name__.startswith("NVMLError") and "Uninitialized" not in type(e).__name__ \
                and "GpuIsLost" not in type(e).__name__ and "DriverNotLoaded" not in type(e).__name__:
            return None
        raise


def default_gpu_source(disabled: bool = False) -> GpuSource:
    if disabled:
        return NoGpuSource("disabled (--no-gpu)")
    if os.environ.get(NO_NVML_ENV, "").strip() not in ("", "0"):
        return NoGpuSource(f"disabled ({NO_NVML_ENV}={os.environ[NO_NVML_ENV]})")
    return NvmlSource()


# --------------------------------------------------------------------------------------------------------------
# host

class HostSource:
    """Host RAM/swap/CPU and per-pid RSS through psutil (optional: missing psutil reads as unavailable)."""

    def __init__(self) -> None:
        self.hostname = socket.gethostname()
        try:
            import psutil  # noqa: PLC0415
        except ImportError:
            self._ps = None
        else:
            self._ps = psutil
        self._procs: dict[int, object] = {}
        self._cpu_primed = False

    def sample(self) -> HostSnapshot:
        now = time.time()
        if self._ps is None:
            return HostSnapshot(now, self.hostname, unavailable="psutil not installed")
        ps = self._ps
        vm = ps.virtual_memory()
        sw = ps.swap_memory()
        cpu = ps.cpu_percent(interval=None)
        if not self._cpu_primed:        # the first reading has no interval to measure over
            self._cpu_primed, cpu = True, None
        return HostSnapshot(now, self.hostname, (vm.total - vm.available) / MIB, vm.total / MIB,
                            sw.used / MIB, sw.total / MIB, cpu)

    def alive(self, pid: int, started: float | None = None) -> bool | None:
        """Whether a pid of this host still runs (``sftbench.liveness.pid_alive``); None when it can't be told."""
        return pid_alive(pid, started)

    def rss_mib(self, pid: int, started: float | None = None) -> float | None:
        """RSS of a live pid on this host; None when it is gone or is a different (newer) process."""
        if self._ps is None or not isinstance(pid, int) or pid <= 0:
            return None
        ps = self._ps
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = ps.Process(pid)
                # A pid reused by a process started after the run's meta record is not our rank.
                if started is not None and proc.create_time() > started + 5.0:
                    return None
                self._procs[pid] = proc
            if not proc.is_running() or proc.status() == ps.STATUS_ZOMBIE:  # is_running: the pid was not reused
                self._procs.pop(pid, None)
                return None
            return proc.memory_info().rss / MIB
        except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess, OSError):
            self._procs.pop(pid, None)
            return None


class FakeHostSource:
    def __init__(self, hostname: str = "testhost", ram_used_mib: float = 100_000.0, ram_total_mib: float = 200_000.0,
                 swap_used_mib: float = 0.0, swap_total_mib: float = 0.0, rss: dict[int, float] | None = None,
                 alive: set[int] | None = None):
        self.hostname = hostname
        self.alive_pids = alive  # None: liveness unknown (every pid reads None)
        self.snap = HostSnapshot(0.0, hostname, ram_used_mib, ram_total_mib, swap_used_mib, swap_total_mib, 12.0)
        self.rss = rss or {}

    def sample(self) -> HostSnapshot:
        self.snap.time = time.time()
        return self.snap

    def rss_mib(self, pid: int, started: float | None = None) -> float | None:
        return self.rss.get(pid)

    def alive(self, pid: int, started: float | None = None) -> bool | None:
        return None if self.alive_pids is None else pid in self.alive_pids
