"""DeepSpeed's JIT-compiled ops: build them up front, and don't wait forever on a build that was killed.

DeepSpeed compiles its ops on first use through ``torch.utils.cpp_extension.load``, which guards each build folder
with a ``lock`` file. A build killed hard (SIGKILL, a time limit, an OOM kill) leaves that file behind, and every
later run waits on it forever, printing nothing. :func:`check_locks` removes a lock that no build on this host is
using (no process works in that folder) once it is older than any build takes; a younger one is only named, so that
a run waiting on it says why. Builds on other hosts sharing the folder (a network home directory) are invisible
here, hence the long grace before removal.

``python -m sftbench.ops build`` compiles the ops this accelerator's runs use (CPU: the shm all-reduce, fused Adam
and CPU Adam; CUDA: fused Adam and CPU Adam) and prints the time each took: CI does this before its tests, so
that no test spends its time limit compiling.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# CPU Adam and fused Adam build in about a minute on 2 cores; ten minutes means nobody is building any more.
STALE_AFTER_S = 600.0
CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")
CUDA_OPS = ("FusedAdamBuilder", "CPUAdamBuilder")


def ext_roots(env=os.environ) -> list[Path]:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR``, else its per-user cache (one folder per Python and
    CUDA version below it)."""
    from sftbench.buildenv import extensions_dir

    cache = extensions_dir(env)
    if env.get("TORCH_EXTENSIONS_DIR"):
        return [cache]
    return [cache] + (sorted(p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else [])


def build_dirs_in_use(proc: Path = Path("/proc")) -> set[Path]:
    """Folders that some process on this host works in (ninja and the compiler run inside the build folder)."""
    out: set[Path] = set()
    for d in proc.iterdir():
        if d.name.isdigit():
            try:
                out.add(Path(os.readlink(d / "cwd")))
            except OSError:
                continue  # ended meanwhile, or not ours to read
    return out


def check_locks(roots: list[Path] | None = None, *, stale_after_s: float = STALE_AFTER_S,
                in_use: set[Path] | None = None, now: float | None = None,
                say: Callable[[str], None] = print) -> list[Path]:
    """Remove build locks that no process here uses and that are older than ``stale_after_s``; name younger ones.
    Returns the removed lock files."""
    roots = ext_roots() if roots is None else roots
    now = time.time() if now is None else now
    removed: list[Path] = []
    locks = sorted({lock for root in roots if root.is_dir() for lock in root.glob("*/lock")})
    if not locks:
        return removed
    in_use = build_dirs_in_use() if in_use is None else in_use
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # the build finished meanwhile
        if lock.parent.resolve() in in_use or lock.parent in in_use:
            continue  # a build is running on this host: waiting on it is right
        if age >= stale_after_s:
            try:
                lock.unlink()
            except FileNotFoundError:
                continue
            removed.append(lock)
            say(f"removed {lock}: a DeepSpeed op build lock {age / 60:.0f} min old that no build uses "
                f"(left by a build that was killed)")
        else:
            say(f"note: {lock} is held ({age:.0f} s old) with no build running on this host; runs wait until it "
                f"goes (a build on another host sharing the folder, or one just killed: removed after "
                f"{stale_after_s / 60:.0f} min)")
    return removed


def default_ops() -> tuple[str, ...]:
    """The ops this accelerator's runs use: ``CPU_OPS`` with ``DS_ACCELERATOR=cpu`` (or no GPU), else ``CUDA_OPS``."""
    from deepspeed.accelerator import get_accelerator

    return CPU_OPS if get_accelerator().device_name() == "cpu" else CUDA_OPS


def build(names: tuple[str, ...] | None = None, say: Callable[[str], None] = print) -> dict[str, float]:
    """Compile (or load, when built) the ops this accelerator's runs use. Returns seconds per op."""
    from sftbench.buildenv import prepare_op_builds

    prepare_op_builds()  # before DeepSpeed reads it: '9.0a' breaks its CUDA builds (see buildenv)
    check_locks(say=say)
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    names = names or default_ops()
    took: dict[str, float] = {}
    for name in names:
        builder = acc.create_op_builder(name)
        if builder is None:
            say(f"{name}: not available for accelerator {acc.device_name()!r}")
            continue
        t0 = time.time()
        try:
            builder.load(verbose=False)
        except (RuntimeError, ValueError) as e:  # DeepSpeed's messages don't say which op failed
            raise type(e)(f"{name}: {e}") from e
        took[name] = time.time() - t0
        say(f"{builder.absolute_name()}: ready in {took[name]:.1f} s")
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sftbench.ops", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the ops this accelerator's runs use (DS_ACCELERATOR=cpu for CPU)")
    b.add_argument("ops", nargs="*", help=f"builder names (default: {', '.join(CPU_OPS)} on CPU, "
                                          f"{', '.join(CUDA_OPS)} on CUDA)")
    locks = sub.add_parser("locks", help="remove stale build locks, name held ones")
    locks.add_argument("--stale-after-s", type=float, default=STALE_AFTER_S)
    args = ap.parse_args(argv)
    if args.command == "locks":
        check_locks(stale_after_s=args.stale_after_s)
        return 0
    try:
        build(tuple(args.ops) or None)
    except (RuntimeError, OSError, ImportError, ValueError, subprocess.SubprocessError) as e:
        # torch reports a failed compile as RuntimeError; the arch-list trap is a ValueError: one line, no traceback
        print(f"error: building DeepSpeed's ops failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
