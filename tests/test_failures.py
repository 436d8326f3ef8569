"""sftbench.failures: the one set of rules for how a run ended (train.py's exceptions, the sweep's dead runs).

A SIGKILL is ``oom`` only with evidence; the sweep's own timeout is ``timeout``; SIGTERM/SIGINT are
``interrupted``. The sweep-level cases with real processes are in test_sweep.py."""
from __future__ import annotations

import signal

import pytest

from sftbench import failures, sweep

LAUNCHER_KILL = "[launch.py:259:sigkill_handler] ['python', 'train.py'] exits with return code = -9\n"


@pytest.mark.parametrize("console,rc,status,needle", [
    ("Traceback (most recent call last):\n  File \"x\"\ntorch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB\n",
     1, "oom", "CUDA out of memory"),
    ("[rank0]: RuntimeError: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate\n", 1, "oom", "CUBLAS"),
    ("  File \"builder.py\"\nValueError: invalid literal for int() with base 10: '0a'\n", 1, "cuda_error", "'0a'"),
    ("RuntimeError: CUDA error: an illegal memory access was encountered\n", 1, "cuda_error", "illegal memory"),
    ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp\n", 1, "cuda_error", "NCCL error"),
    # a SIGKILL without evidence of memory is a kill, whoever sent it (these two were filed as OOM before)
    (LAUNCHER_KILL, 247, "killed", "signal 9"),
    ("Killed\n", 137, "killed", "signal 9"),
    ("step 3/10\n", -9, "killed", "SIGKILL"),
    ("[launch.py] exits with return code = -15\n", 241, "interrupted", "SIGTERM"),
    ("step 2/10\n", -2, "interrupted", "SIGINT"),
    ("step 2/10\n", -11, "error", "SIGSEGV"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 1\n    x()\nKeyError: 'foo'\nTraceback (most recent "
     "call last):\n  File \"b\"\nValueError: later\n", 1, "error", "KeyError: 'foo'"),
    ("", 2, "error", "exit code 2"),
])
def test_classify_failure(console, rc, status, needle):
    st, err = failures.classify_failure(console, rc)
    assert st == status and needle in err
    assert sweep.classify_failure is failures.classify_failure  # one home, the sweep's name kept


def test_sigkill_is_oom_only_with_evidence():
    st, err = failures.classify_failure(LAUNCHER_KILL, 247, oom_evidence="the kernel's OOM killer: Killed process 7")
    assert st == "oom" and "Killed process 7" in err
    assert failures.classify_failure(LAUNCHER_KILL, 247)[0] == "killed"


def test_classify_timeout_and_cpu_build_failure():
    assert failures.classify_failure("step 3/10\n", -9, timed_out=True, timeout_s=5)[0] == "timeout"
    # the sweep's own limit beats memory evidence read afterwards, an OOM message seen before the hang beats both
    assert failures.classify_failure("step 3\n", -9, timed_out=True, timeout_s=5, oom_evidence="x")[0] == "timeout"
    assert failures.classify_failure("CUDA out of memory\n", -9, timed_out=True, timeout_s=5)[0] == "oom"
    assert failures.classify_failure("RuntimeError: Error building extension 'cpu_adam'\n", 1,
                                     accelerator="cpu")[0] == "error"


def test_signal_of_exit_statuses():
    assert failures.signal_of(-9) == 9 and failures.signal_of(137) == 9 and failures.signal_of(247) == 9
    assert failures.signal_of(143) == 15 and failures.signal_of(0) is None and failures.signal_of(1) is None
    assert failures.signal_of(None) is None and failures.signal_name(signal.SIGKILL) == "SIGKILL"


def test_host_memory_near_its_limit_is_evidence():
    steps = [{"host_used_mib": 23_500.0}]
    ev = failures.host_memory_near_limit(steps, 24_000.0)
    assert ev is not None and "98%" in ev
    assert failures.host_memory_near_limit([{"host_used_mib": 12_000.0}], 24_000.0) is None
    assert failures.host_memory_near_limit([{"host_used_mib": None}], 24_000.0) is None
    assert failures.host_memory_near_limit(steps, None) is None


def test_evidence_from_the_kernel_log_and_the_cgroup(monkeypatch):
    monkeypatch.setattr(failures, "kernel_oom_lines", lambda pids: ["Out of memory: Killed process 4242 (python)"]
                        if 4242 in pids else [])
    assert "Killed process 4242" in failures.evidence_of_oom([4242], None, [], None)
    monkeypatch.setattr(failures, "oom_kill_count", lambda: 3)
    assert "2 process(es)" in failures.evidence_of_oom([1], 1, [], None)
    assert failures.evidence_of_oom([1], 3, [], None) is None  # the counter did not move: no evidence


def test_kernel_log_lines_name_only_the_runs_pids(monkeypatch):
    class P:
        returncode = 0
        stdout = ("[ 9.1] Out of memory: Killed process 4242 (python) total-vm:1kB\n"
                  "[ 9.2] oom-kill:constraint=CONSTRAINT_NONE,task=python,pid=777,uid=0\n"
                  "[ 9.3] Out of memory: Killed process 5 (bash)\n")
    monkeypatch.setattr(failures.subprocess, "run", lambda *a, **k: P())
    assert failures.kernel_oom_lines([4242, 777]) == [P.stdout.splitlines()[0].strip(),
                                                      P.stdout.splitlines()[1].strip()]
    assert failures.kernel_oom_lines([6]) == [] and failures.kernel_oom_lines([]) == []


def test_oom_kill_count_reads_the_cgroups_counter(tmp_path, monkeypatch):
    """cgroup v2's memory.events and v1's memory.oom_control give their oom_kill line; the first readable file
    that has one wins; none readable: None."""
    v2 = tmp_path / "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 4\noom 3\noom_kill 2\noom_group_kill 0\n")
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    missing = tmp_path / "nope" / "memory.events"
    files = {"v2": [missing, v2, v1], "v1": [missing, v1], "none": [missing]}
    got = {}
    for case, paths in files.items():
        monkeypatch.setattr(failures, "_own_memory_cgroup_files", lambda paths=paths: paths)
        got[case] = failures.oom_kill_count()
    assert got == {"v2": 2, "v1": 5, "none": None}


class FakeOOM(Exception):
    pass


FakeOOM.__name__ = "OutOfMemoryError"


def test_classify_exception():
    assert failures.classify_exception(FakeOOM("CUDA out of memory. Tried to allocate 2 GiB\nmore")) == (
        "oom", "CUDA out of memory. Tried to allocate 2 GiB")
    assert failures.classify_exception(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))[0] \
        == "oom"
    assert failures.classify_exception(RuntimeError("NCCL error: unhandled"))[0] == "cuda_error"
    assert failures.classify_exception(ValueError("bad\nsecond")) == ("error", "ValueError: bad")
    assert failures.classify_exception(KeyboardInterrupt()) == ("interrupted", "KeyboardInterrupt")
