"""Shared test helpers: where the repo is, how to launch train.py on CPU ranks, where the real vocab is."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# A few SFT lines in the reference and plain forms, Chinese and English (the recipe tests repeat them into a file).
SAMPLES = [
    {"prompt": "床前明月光，", "answers": [{"answer": "疑是地上霜。", "score": 1}], "prefix": ""},
    {"prompt": "What is the capital of France?", "answer": "Paris is the capital of France."},
    {"prompt": "上联：春风得意", "answers": [{"answer": "下联：秋月生辉", "score": 2}, {"answer": "x", "score": 1}]},
    {"prompt": "Translate: 学而时习之", "answers": [{"answer": "To learn and practise it in time.", "score": 1}],
     "prefix": "Answer: "},
]


def real_vocab() -> Path | None:
    """The real PanGu-alpha vocab.model where it exists (env PANGU_VOCAB, or the shared folder beside the repo)."""
    cands = [os.environ.get("PANGU_VOCAB"), REPO.parent / "shared" / "pangu-vocab" / "vocab.model"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


@pytest.fixture
def pangu_vocab() -> Path:
    p = real_vocab()
    if p is None:
        pytest.skip("real PanGu vocab.model not available (set PANGU_VOCAB)")
    return p


def cpu_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        # Compiled DeepSpeed ops are cached inside the clone so CI compiles them once per run, not per test.
        "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    env.update(extra)
    return env


# The rendezvous port of the last launch_cmd: each launch takes a free port, so test runs that overlap on one
# machine (two checkouts, two sessions) never meet on DeepSpeed's default 29500.
LAST_PORT = {"port": 29500}


def launch_cmd(nranks: int, *train_args: str) -> list[str]:
    """The real launcher, as a user types it (with a free rendezvous port). The multi-rank tests' loss curves are
    the reference's layout (every token in the loss, the config's WarmupLR), as the sweep runs it: the flags come
    first, so a test's own flags override them."""
    from sftbench.buildenv import free_port
    from sftbench.sweep import REFERENCE_LAYOUT
    LAST_PORT["port"] = free_port()
    return [str(BIN / "deepspeed"), "--num_gpus", str(nranks), "--master_port", str(LAST_PORT["port"]),
            str(REPO / "train.py"), *REFERENCE_LAYOUT, *train_args]


def write_overfit_config(src: str, dst: Path, lr: float = 3e-3, ga: int = 2) -> Path:
    """A shipped config with a learning rate high enough to see the loss fall within a few steps."""
    cfg = json.loads((REPO / "ds_configs" / src).read_text())
    cfg["gradient_accumulation_steps"] = ga
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["scheduler"]["params"].update({"warmup_max_lr": lr, "warmup_num_steps": 1})
    dst.write_text(json.dumps(cfg))
    return dst


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leftover_shm(nranks: int, port: int | None = None) -> list[str]:
    """DeepSpeed CPU shm buffers of a launcher run (the last launch_cmd's port by default) left in /dev/shm."""
    from sftbench.shm import buffer_path
    port = LAST_PORT["port"] if port is None else port
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [str(p) for r in range(nranks) if (p := buffer_path(r, env)).exists()]


def ds_shm_names() -> set[str]:
    """Every DeepSpeed CPU shm buffer of this user in /dev/shm (to check that runs on fresh ports add none)."""
    from sftbench.shm import own_buffers
    return {p.name for p in own_buffers()}


def run(cmd: list[str], env: dict, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group and fail the test.

    The launcher's ranks are its children: killing only the launcher (what subprocess.run does) would leave them
    running, holding the rendezvous port and the CPU, and every later test would fail or hang behind them."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {shlex.join(cmd)}\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
