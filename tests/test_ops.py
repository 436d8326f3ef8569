"""sftbench.ops: which DeepSpeed op build locks are stale, and that a stale one no longer hangs a build."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, run
from sftbench import ops


def _lock(root: Path, name: str, age_s: float) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    lock = d / "lock"
    lock.touch()
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return lock


def test_old_unused_lock_is_removed_young_or_busy_ones_kept(tmp_path):
    old = _lock(tmp_path, "cpu_adam", 3600)
    young = _lock(tmp_path, "fused_adam", 30)
    busy = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    said = []
    removed = ops.check_locks([tmp_path], in_use={busy.parent}, say=said.append)
    assert removed == [old] and not old.exists()
    assert young.exists() and busy.exists()
    # The removal and the young lock are both said, naming the file; the busy one (a build running) is not.
    assert any(str(old) in m and "removed" in m for m in said)
    assert any(str(young) in m and "held" in m for m in said)
    assert not any(str(busy) in m for m in said)


def test_no_locks_no_proc_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "build_dirs_in_use", lambda: pytest.fail("scanned /proc with no lock to check"))
    (tmp_path / "cpu_adam").mkdir()
    assert ops.check_locks([tmp_path, tmp_path / "missing"], say=print) == []


def test_build_dirs_in_use_sees_a_process_working_there(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path)
    try:
        deadline = time.time() + 10
        while tmp_path.resolve() not in ops.build_dirs_in_use() and time.time() < deadline:
            time.sleep(0.1)
        assert tmp_path.resolve() in ops.build_dirs_in_use()
    finally:
        p.kill()
        p.wait()


def test_ext_roots_follow_torch():
    assert ops.ext_roots({"TORCH_EXTENSIONS_DIR": "/x/ext"}) == [Path("/x/ext")]
    roots = ops.ext_roots({"XDG_CACHE_HOME": "/nonexistent-cache"})
    assert roots == [Path("/nonexistent-cache/torch_extensions")]


@pytest.mark.slow
def test_stale_lock_does_not_hang_the_build(tmp_path):
    """A build killed hard left its lock: torch alone waits on it forever; ops.build removes it and goes on."""
    ext = tmp_path / "ext"
    built = REPO / ".cache" / "torch_extensions" / "deepspeed_shm_comm"
    if built.is_dir():  # reuse the compiled op when there is one: the test is about the lock, not the compiler
        shutil.copytree(built, ext / "deepspeed_shm_comm")
    lock = _lock(ext, "deepspeed_shm_comm", 2 * ops.STALE_AFTER_S)
    p = run([sys.executable, "-m", "sftbench.ops", "build", "ShareMemCommBuilder"],
            cpu_env(TORCH_EXTENSIONS_DIR=str(ext)), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"removed {lock}" in p.stdout and "ready in" in p.stdout
    assert not lock.exists()


def test_unknown_op_fails_naming_it():
    p = run([sys.executable, "-m", "sftbench.ops", "build", "NopeBuilder"], cpu_env(), timeout=120)
    assert p.returncode == 1
    assert "error: building DeepSpeed's ops failed" in p.stderr and "NopeBuilder" in p.stderr
    assert "Traceback" not in p.stderr

