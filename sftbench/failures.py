"""How a run ended, as a summary status: one home for the rules train.py (an exception) and the sweep (a run that
left no summary: exit code, console, the kernel's word) both follow. No torch import (the sweep and the report use
it).

Statuses (``runlog.STATUSES``): ``ok``; ``oom`` only with evidence (an out-of-memory message of CUDA, torch or the
allocator; the kernel's OOM killer naming one of the run's pids, or the memory cgroup's ``oom_kill`` counter going up
during the run; host memory at ``HOST_NEAR_LIMIT_PCT`` of the total in the run's last step record);
``cuda_error``; ``timeout`` (the sweep's own ``--timeout`` killed it); ``killed`` (SIGKILL from anywhere else: a
user, a scheduler's time limit, a node failure look the same from here); ``interrupted`` (SIGTERM, SIGINT, or the
sweep stopped); ``error`` (everything else, with the first error line).
"""
from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

OOM_PATTERNS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED",
                "DefaultCPUAllocator: can't allocate memory", "Cannot allocate memory")
CUDA_ERROR_PATTERNS = ("CUDA error", "CUDA Error", "cudaError", "RuntimeError: CUDA", "NCCL error",
                       "an illegal memory access", "invalid literal for int() with base 10: '0a'",
                       "Error building extension", "CUDA_HOME does not exist", "no kernel image is available")
HOST_NEAR_LIMIT_PCT = 95.0  # host memory used / total in the last step record at or above this: evidence of OOM
_PREFIX = re.compile(r"^\s*(\[(?:default)?rank\d+\]:\s*)+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The launcher (deepspeed/launcher/launch.py) on a rank that died: "... exits with return code = -9"
_LAUNCHER_RC = re.compile(r"return code = (-?\d+)")


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def signal_of(returncode: int | None) -> int | None:
    """The signal that ended a process from its exit status as Popen (-N), a shell (128+N) or the DeepSpeed launcher
    (which exits with a rank's -N, read back as 256-N) report it; None for a normal exit."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if 128 < returncode < 128 + 32:
        return returncode - 128
    if 256 - 32 < returncode < 256:
        return 256 - returncode
    return None


def _clean_lines(text: str) -> list[str]:
    return [_PREFIX.sub("", _ANSI.sub("", line)).rstrip() for line in text.splitlines()]


def first_traceback_error(lines: list[str]) -> str | None:
    """The exception line that ends the first traceback ('ValueError: ...')."""
    for i, line in enumerate(lines):
        if line.strip().startswith("Traceback (most recent call last)"):
            for nxt in lines[i + 1:]:
                if not nxt.strip() or nxt.startswith((" ", "\t")) or nxt.startswith("Traceback"):
                    continue
                if re.match(r"^\[\d{4}-\d\d-\d\d ", nxt):  # a launcher log line interleaved
                    continue
                return nxt.strip()
    return None


# ------------------------------------------------------------------------------------------------ OOM evidence

def _own_memory_cgroup_files() -> list[Path]:
    """The files that count OOM kills of this process's memory cgroup (v2 memory.events, v1 memory.oom_control)."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ctrl, rel = parts[1], parts[2].lstrip("/")
        if ctrl == "":
            out += [Path("/sys/fs/cgroup") / rel / "memory.events", Path("/sys/fs/cgroup/memory.events")]
        elif "memory" in ctrl.split(","):
            out += [Path("/sys/fs/cgroup/memory") / rel / "memory.oom_control",
                    Path("/sys/fs/cgroup/memory/memory.oom_control")]  # a cgroup namespace shows its root
    return out


def oom_kill_count() -> int | None:
    """The memory cgroup's count of processes its OOM killer ended (None where it can't be read)."""
    for p in _own_memory_cgroup_files():
        try:
            text = p.read_text()
        except OSError:
            continue
        m = re.search(r"^oom_kill (\d+)$", text, re.M)
        if m:
            return int(m.group(1))
    return None


def kernel_oom_lines(pids: Iterable[int], since_text: str | None = None) -> list[str]:
    """The kernel log's OOM-killer lines naming one of pids (``dmesg``; [] where the log can't be read)."""
    want = {int(p) for p in pids if isinstance(p, int) and p > 0}
    if not want:
        return []
    try:
        p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if p.returncode != 0:
        return []
    out = []
    for line in p.stdout.splitlines():
        # "Out of memory: Killed process 1234 (python)" / "oom-kill:...,task=python,pid=1234,uid=0"
        m = re.search(r"Killed process (\d+)|oom-kill:.*\bpid=(\d+)", line)
        if m and int(m.group(1) or m.group(2)) in want:
            out.append(line.strip())
    return out


def host_memory_near_limit(last_steps: Sequence[dict], host_total_mib: float | None) -> str | None:
    """Evidence from the run's own last step records: host memory used at HOST_NEAR_LIMIT_PCT of the total."""
    if not host_total_mib:
        return None
    used = [s.get("host_used_mib") for s in last_steps if isinstance(s.get("host_used_mib"), (int, float))]
    if not used:
        return None
    pct = 100.0 * max(used) / host_total_mib
    if pct >= HOST_NEAR_LIMIT_PCT:
        return (f"host memory {pct:.0f}% used in the run's last step record ({max(used):.0f} of "
                f"{host_total_mib:.0f} MiB)")
    return None


# ------------------------------------------------------------------------------------------------ classification

def classify_failure(console: str, returncode: int | None, *, timed_out: bool = False, timeout_s: float | None = None,
                     accelerator: str = "cuda", oom_evidence: str | None = None) -> tuple[str, str]:
    """(status, error line) of a run that left no summary record, from its console and exit status.

    ``timed_out``: the sweep's own limit killed it. ``oom_evidence``: what the caller found outside the console (the
    kernel's OOM-killer line, the cgroup's counter, host memory at its limit); without it a SIGKILL is ``killed``."""
    lines = _clean_lines(console)

    def first_with(patterns: Iterable[str]) -> str | None:
        for line in lines:
            if any(p in line for p in patterns):
                return line.strip()[:500]
        return None

    hit = first_with(OOM_PATTERNS)
    if hit:
        return "oom", hit
    hit = first_with(CUDA_ERROR_PATTERNS)
    if hit:
        # An op build failure on a CPU run is not a CUDA problem.
        return ("cuda_error" if accelerator == "cuda" else "error"), hit
    if timed_out:
        return "timeout", f"no summary after {timeout_s:.0f} s: process group killed (--timeout)"
    if oom_evidence:
        return "oom", f"killed out of memory: {oom_evidence}"[:500]
    sig = None
    for line in lines:  # the launcher names the signal that ended a rank; that beats its own exit status
        m = _LAUNCHER_RC.search(line)
        if m and int(m.group(1)) < 0:
            sig = -int(m.group(1))
            break
    if sig is None:
        sig = signal_of(returncode)
    if sig == signal.SIGKILL:
        return "killed", ("killed by signal 9 (SIGKILL) from outside the sweep, with no sign of running out of "
                          "memory (a user's kill, a scheduler's time limit or a node failure look the same)")
    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        return "interrupted", f"stopped by signal {sig} ({signal_name(sig)}) before it wrote a summary"
    err = first_traceback_error(lines)
    if err:
        return "error", err[:500]
    for line in reversed(lines):
        if re.search(r"(?i)error|exception", line):
            return "error", line.strip()[:500]
    if sig is not None:
        return "error", f"died of signal {sig} ({signal_name(sig)}), no error message in console.log"
    if returncode == 0:
        return "error", "exited 0 without a summary record"
    return "error", f"exit code {returncode}, no error message in console.log"


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """(status, error line) of an exception that ended train.py's loop (it then writes its own summary)."""
    name = type(exc).__name__
    if name == "KeyboardInterrupt":
        return "interrupted", "KeyboardInterrupt"
    text = f"{name}: {exc}".strip()
    first = text.splitlines()[0] if text else name
    if name == "OutOfMemoryError" or "out of memory" in text.lower():  # torch.OutOfMemoryError, CUDA/CPU allocators
        return "oom", (str(exc).strip().splitlines() or [first])[0]
    if "CUDA" in text or "NCCL" in text or "cuda" in (type(exc).__module__ or ""):
        return "cuda_error", first
    return "error", first


def evidence_of_oom(pids: Iterable[int], oom_kills_before: int | None, last_steps: Sequence[dict],
                    host_total_mib: float | None) -> str | None:
    """The first piece of evidence that a run that died was killed for memory, or None: the kernel's OOM-killer line
    for one of its pids, the cgroup's oom_kill counter having gone up, host memory at its limit in its last records."""
    lines = kernel_oom_lines(pids)
    if lines:
        return f"the kernel's OOM killer: {lines[-1]}"
    after = oom_kill_count()
    if oom_kills_before is not None and after is not None and after > oom_kills_before:
        return f"the memory cgroup's OOM killer ended {after - oom_kills_before} process(es) during the run"
    return host_memory_near_limit(last_steps, host_total_mib)


__all__ = ["OOM_PATTERNS", "CUDA_ERROR_PATTERNS", "HOST_NEAR_LIMIT_PCT", "classify_failure", "classify_exception",
           "evidence_of_oom", "first_traceback_error", "host_memory_near_limit", "kernel_oom_lines",
           "oom_kill_count", "signal_of", "signal_name"]
