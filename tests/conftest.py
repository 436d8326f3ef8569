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


def launch_cmd(nranks: int, *train_args: str, launcher: str = "torchrun") -> list[str]:
    """train.py on ``nranks`` ranks of this machine (with a free rendezvous port). ``launcher="deepspeed"`` is
    DeepSpeed's launcher as a user types it (the README's command), whose ranks stay in its process group: the tests
    that signal or kill a job's process group use it. The default, torchrun, is the other launcher train.py supports
    (docs/multinode.md) and starts the same ranks with about 10 s less CPU a launch (one launcher process that
    imports torch, where DeepSpeed's runner and its per-node launcher each import DeepSpeed); it starts each rank in
    a session of its own, so a signal to its process group reaches torchrun alone. The multi-rank tests' loss
    curves are the reference's layout (every token in the loss, the config's WarmupLR), as the sweep runs it: the
    flags come first, so a test's own flags override them."""
    from sftbench.buildenv import free_port
    from sftbench.sweep import REFERENCE_LAYOUT
    LAST_PORT["port"] = port = free_port()
    if launcher == "deepspeed":
        start = [str(BIN / "deepspeed"), "--num_gpus", str(nranks), "--master_port", str(port)]
    else:
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nranks),
                 "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [*start, str(REPO / "train.py"), *REFERENCE_LAYOUT, *train_args]


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


# The keys a finished fp32/bf16 CPU run leaves null (docs/log_schema.md: a field that does not apply is null): the
# GPU's, and those of options these runs do not use. Every other key holds a value: a key train.py stops filling
# fails here (comparing key sets could not see it: RunLog.write fills every schema key, with null if not given).
META_NULL = {"device_name", "device_uuid", "gpu_index", "peak_tflops", "resumed_from", "eval", "save_dir",
             "offload_optimizer", "offload_param"}
NO_DS_NULL = {"ds_config_path", "ds_config", "zero_stage"}  # --ds none
STEP_NULL = {"gpu_mem_used_mib", "loss_scale", "mfu_pct", "torch_peak_alloc_mib", "torch_peak_reserved_mib"}
SUMMARY_NULL = {"error", "eval_loss", "gpu_mem_used_mib_peak", "mfu_pct", "saved", "torch_peak_alloc_mib",
                "torch_peak_reserved_mib"}


def nulls(rec: dict) -> set[str]:
    return {k for k, v in rec.items() if v is None}


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


def leaked_shm(before: set[str]) -> set[str]:
    """The DeepSpeed shm buffers that appeared since ``before`` (``ds_shm_names()``) and that no process maps: what
    a finished run left behind. A buffer a run of another test worker still maps is not one."""
    from sftbench.shm import mapped_files, own_buffers
    new = [p for p in own_buffers() if p.name not in before]
    mapped = mapped_files() if new else set()
    return {p.name for p in new if str(p) not in mapped and p.exists()}


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a launched job: its process group (DeepSpeed's launcher and its ranks) and every descendant of the
    launcher (torchrun's ranks run in sessions of their own)."""
    import psutil
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    os.killpg(proc.pid, signal.SIGKILL)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass


def run(cmd: list[str], env: dict, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group and fail the test.

    The launcher's ranks are its children: killing only the launcher (what subprocess.run does) would leave them
    running, holding the rendezvous port and the CPU, and every later test would fail or hang behind them."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {shlex.join(cmd)}\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------- recipes
# The recipes of tests/test_recipes.py (recorded losses) and tests/test_checkpoint.py (exact resume): a committed
# seeded dropout-free tiny Pangu trained STEPS steps with every flag that decides the loss on the command line.
FIX = REPO / "tests" / "fixtures"
MODEL = FIX / "tiny-pangu"
DATA = FIX / "recipe_sft.jsonl"
TOKENIZER = REPO / "data" / "tokenizer" / "spm.model"

SEED, SEQ_LEN, GRAD_ACCUM, MICRO_BATCH, STEPS, LR = 3, 64, 2, 1, 8, 3e-3

# name -> (ranks, --ds, prompt mask flag). Both mask settings are pinned: the default is being changed.
RECIPES = {
    "z1": (2, str(FIX / "recipe_z1.json"), "--mask-prompt"),
    "z2_offload": (2, str(FIX / "recipe_z2_offload.json"), "--mask-prompt"),
    "z3": (2, str(FIX / "recipe_z3.json"), "--no-mask-prompt"),
    "none": (1, "none", "--no-mask-prompt"),
}


def recipe_args(name: str) -> list[str]:
    """The recipe's train.py flags, every one that decides the loss (no run folder, cache or step count)."""
    _, ds, mask = RECIPES[name]
    return ["--ds", ds, "--model", str(MODEL), "--tokenizer", str(TOKENIZER), "--data", str(DATA),
            "--seq-len", str(SEQ_LEN), "--seed", str(SEED), "--precision", "fp32", "--lr", str(LR),
            "--lr-warmup-steps", "1", "--grad-accum", str(GRAD_ACCUM), "--micro-batch", str(MICRO_BATCH), mask,
            "--eval-split", "0", "--pad-mask", "auto", "--compile", "off", "--cuda-graphs", "off",
            "--coalesce-reduction", "off", "--grad-norm", "deepspeed", "--overflow-check", "deepspeed",
            "--warmup-steps", "1", "--lr-schedule", "config"]  # the recorded curves: the config's WarmupLR


def recipe_cmd(name: str, *extra: str, launcher: str = "torchrun") -> list[str]:
    """A launcher (``launch_cmd``'s) on the recipe's ranks, or one process for --ds none (a world of one: no
    launcher needed)."""
    ranks = RECIPES[name][0]
    if ranks == 1:
        return [sys.executable, str(REPO / "train.py"), *recipe_args(name), *extra]
    return launch_cmd(ranks, *recipe_args(name), *extra, launcher=launcher)


def curve(run_dir: Path, rank: int) -> tuple[list[float], list[float]]:
    steps = [r for r in read_jsonl(run_dir / f"rank{rank}.jsonl") if r["type"] == "step"]
    return [s["loss"] for s in steps], [s["lr"] for s in steps]


@pytest.fixture(scope="session")
def recipe_run(tmp_path_factory):
    """Each recipe trained once per session, STEPS steps: its run folder (the recipe, schema, coalesced-reduction
    and resume tests read it); the console output and rendezvous port lie beside it (``run.parent``)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            root = tmp_path_factory.mktemp(f"recipe_{name}")
            p = run(recipe_cmd(name, "--max-steps", str(STEPS), "--run-dir", str(root / "run"),
                               "--cache-dir", str(root / "cache")), cpu_env(), timeout=500)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
            # What the launch printed and its rendezvous port, beside the run folder, for the tests that read them
            # (tests/test_train.py::test_recipe_runs_log_every_field_on_every_rank).
            (root / "stdout.txt").write_text(p.stdout)
            (root / "stderr.txt").write_text(p.stderr)
            (root / "port.txt").write_text(str(LAST_PORT["port"]) if RECIPES[name][0] > 1 else "")
            done[name] = root / "run"
        return done[name]
    return get


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``./run_tests.sh`` runs workers in parallel): the tests that read the session's recipe
    runs share one worker, so each recipe trains once per session rather than once per worker; and the slow tests
    (the real processes, up to minutes each) go first and the unit tests (seconds) last, so that no worker is left
    with a multi-minute test while the others have run out of work."""
    for item in items:
        if "recipe_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("recipes"))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each kind
