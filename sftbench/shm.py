"""DeepSpeed's shared-memory all-reduce buffers on CPU ranks: release them so that runs don't leak host RAM.

On the CPU accelerator, ``deepspeed.init_distributed()`` builds the shm comm op, and each rank creates a 66 MB POSIX
shared-memory file ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` and maps every
peer's file. DeepSpeed 0.19.8 never unlinks them, so each CPU run leaves ``ranks x 66 MB`` of RAM-backed files behind
(a sweep picks a new port per run, so the default CPU ``./run_all.sh``, 8 runs of 2 ranks, leaves about 1 GB; a day
of sweeps, bench runs and tests left 284 such files, 19 GB, on a 24 GB machine, after which new runs crawled and
failed).

DeepSpeed creates the buffers only when every rank is on one node (``LOCAL_SIZE`` equals the world size): a job of
several nodes, or of several launchers on one machine as the 2-node test runs it, communicates through gloo and
creates none, and :func:`release_own_buffer` finds nothing to unlink (it still takes part in the barrier).

:func:`release_own_buffer` unlinks this rank's file right after initialisation, once every rank is past it (a
barrier): all peers have mapped it by then, the mappings stay valid after the unlink, and the kernel frees the memory
when the last rank exits, however it exits (SIGKILL and OOM kills included).

:func:`stale_buffers` / ``python -m sftbench.shm`` find and remove files left by runs from before this, or by ranks
killed during initialisation: only this user's files, only those that no process maps, only those untouched for a
minute (a rank creates its file and maps it in one call; a peer may still be looking for it during that minute).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def buffer_path(rank: int, env=os.environ, shm_dir: Path = SHM_DIR) -> Path:
    """The file DeepSpeed's shm op creates for ``rank`` (the name its C++ ``shm_initialize`` formats; an unset
    variable prints as ``(null)`` there)."""
    addr = env.get("MASTER_ADDR", "(null)")
    port = env.get("MASTER_PORT", "(null)")
    return shm_dir / f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_own_buffer(rank: int, world_size: int, shm_dir: Path = SHM_DIR) -> Path | None:
    """Call on every rank right after ``deepspeed.init_distributed()`` on CPU. Returns the unlinked path, if any.

    The barrier is collective, so every rank must call this (whether or not its file exists)."""
    import torch.distributed as dist  # here: the clean-up command needs no torch

    if world_size > 1 and dist.is_initialized():
        # Each rank's shm init returns only after it has mapped every peer's file; past the barrier nobody needs
        # the names any more.
        dist.barrier()
    path = buffer_path(rank, shm_dir=shm_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def mapped_files(proc: Path = Path("/proc")) -> set[str]:
    """Every file path that some readable process maps (from /proc/<pid>/maps)."""
    out: set[str] = set()
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "maps").read_text()
        except OSError:
            continue  # the process ended, or it belongs to someone we can't read (not our files then)
        for line in text.splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6:
                out.add(parts[5].removesuffix(" (deleted)").strip())
    return out


def own_buffers(shm_dir: Path = SHM_DIR) -> list[Path]:
    """This user's DeepSpeed shm buffers, live or stale."""
    return sorted(shm_dir.glob(f"{PREFIX}_{os.getuid()}_*")) if shm_dir.is_dir() else []


def stale_buffers(shm_dir: Path = SHM_DIR, min_age_s: float = 60.0, now: float | None = None,
                  mapped: set[str] | None = None) -> list[Path]:
    """This user's DeepSpeed buffers that no process maps and nobody has written for ``min_age_s``."""
    now = time.time() if now is None else now
    mapped = mapped_files() if mapped is None else mapped
    out = []
    for p in own_buffers(shm_dir):
        try:
            age = now - p.stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= min_age_s and str(p) not in mapped:
            out.append(p)
    return out


def remove_stale(shm_dir: Path = SHM_DIR, min_age_s: float = 60.0) -> tuple[int, int]:
    """Remove :func:`stale_buffers`. Returns (files, bytes) removed."""
    n = size = 0
    for p in stale_buffers(shm_dir, min_age_s):
        try:
            b = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        n, size = n + 1, size + b
    return n, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sftbench.shm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the stale files, remove nothing")
    ap.add_argument("--min-age-s", type=float, default=60.0, help="leave files written more recently than this")
    args = ap.parse_args(argv)
    if args.dry_run:
        for p in stale_buffers(min_age_s=args.min_age_s):
            print(p)
        return 0
    n, size = remove_stale(min_age_s=args.min_age_s)
    if n:
        print(f"removed {n} stale DeepSpeed shm buffer(s) from {SHM_DIR}, {size / 2**30:.1f} GiB of RAM",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
