"""sftbench.shm: the name DeepSpeed gives its CPU shm buffers, and which leftovers are safe to remove."""
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

from sftbench import shm

UID = os.getuid()


def _touch(p: Path, age_s: float = 0.0, size: int = 16) -> Path:
    p.write_bytes(b"\0" * size)
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_buffer_path_matches_deepspeed_name(tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert shm.buffer_path(1, env, tmp_path) == tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_29500_1"
    # An unset variable is what C's printf makes of a NULL string.
    assert shm.buffer_path(0, {}, tmp_path).name == f"deepspeed_allreduce_buffer_{UID}_(null)_(null)_0"


def test_stale_means_own_unmapped_and_old(tmp_path):
    old = _touch(tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_29500_0", age_s=600)
    fresh = _touch(tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_29500_1", age_s=5)
    in_use = _touch(tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_29611_0", age_s=600)
    other_user = _touch(tmp_path / f"deepspeed_allreduce_buffer_{UID + 1}_127.0.0.1_29500_0", age_s=600)
    unrelated = _touch(tmp_path / "psm_something", age_s=600)
    got = shm.stale_buffers(tmp_path, min_age_s=60, mapped={str(in_use)})
    assert got == [old]
    assert fresh.exists() and other_user.exists() and unrelated.exists()


def test_remove_stale_counts_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "mapped_files", lambda: set())
    _touch(tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_1_0", age_s=120, size=1000)
    _touch(tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_1_1", age_s=120, size=24)
    keep = _touch(tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_2_0", age_s=1)
    assert shm.remove_stale(tmp_path, min_age_s=60) == (2, 1024)
    assert [p.name for p in tmp_path.iterdir()] == [keep.name]


def test_mapped_files_sees_a_live_mapping(tmp_path):
    p = _touch(tmp_path / "mapped.bin", size=4096)
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        m[0] = 1
        assert str(p) in shm.mapped_files()
        # Unlinked but still mapped: /proc shows "(deleted)"; the name is still reported as in use.
        p.unlink()
        assert str(p) in shm.mapped_files()


def test_missing_dir_is_empty(tmp_path):
    assert shm.stale_buffers(tmp_path / "nope") == []
