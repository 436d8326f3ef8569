"""The benchmark sweep: every model x DeepSpeed config x precision, one ``train.py`` process per run, resumable.

    python -m sftbench.sweep plan   [options]      # print the plan (same as run --dry-run)
    python -m sftbench.sweep run    [options]      # run what is not done yet
    python -m sftbench.sweep report [options]      # write results/<sweep>/ from runs/<sweep>/
    python -m sftbench.sweep name   [options]      # print the sweep name the options resolve to
    python -m sftbench.sweep restore [options]     # runs/<sweep>/ rebuilt from results/<sweep>/ (a new checkout)

The plan (``build_plan``): every model (pangu-350m, pangu-2.6b) x every ``ds_configs/*.json`` plus ``--ds none`` x
the precision(s) the reference table used for that model and file (parsed from the table in
``ds_configs/README.md``, the source of truth) plus bf16 where the GPU supports it, on the visible GPU count. On a
machine without a GPU the default plan is a small CPU sweep (2 ranks, ``DS_ACCELERATOR=cpu``, pangu-tiny, a few
configs, fp32 and bf16, few steps) so the whole pipeline can be seen in a few minutes. An fp16 DeepSpeed run gets
``loss_scale_warmup_steps`` more steps: its first steps overflow and update nothing while the loss scale comes down,
and those are never measured.

Each run: ``runs/<sweep>/<run>/`` with ``plan_entry.json`` (the plan entry), ``predicted.json`` (the memory
prediction, ``sftbench.memory``), ``console.log`` (launcher stdout+stderr) and train.py's ``rank<k>.jsonl``. A run
that dies without a summary record gets ``summary.json`` (``synthesized: true``) classified from its exit code and
console output (``classify_failure``). Runs whose plan entry matches and that ended ``ok`` are skipped on the next
invocation (``--force`` re-runs them); failed ones are re-run only with ``--retry-failed``; interrupted or
unfinished ones are always re-run. ``--max-minutes`` stops launching when the budget is spent (a later invocation
resumes), so a long sweep can be cut into bounded batches. ``runs/`` is not committed: where it is gone (a new
checkout, another machine), ``restore`` rebuilds the run folders from the committed ``results/<sweep>/`` (each run's
plan entry, meta and summaries, ``restore_runs``), so the next batch skips what is done and the report keeps it.

Every option also reads an environment variable ``SFTBENCH_<OPTION>`` (e.g. ``SFTBENCH_GPUS``, ``SFTBENCH_STEPS``)
when the flag is not given. No torch import here.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from sftbench import failures, memory, runlog
from sftbench import nodes as nodes_mod
from sftbench.hardware import (Gpu, bf16_supported, cpu_affinity, detect_gpus, gpu_slug, host_tag,
                               host_total_mib)
from sftbench.models.resolve import model_shape, resolve as resolve_model
from sftbench.reference import RefRow, read_reference_map, reference_precisions, reference_rows
from sftbench.args import planned_prediction, repo_relative
from sftbench.levers import gpu_class_of
from sftbench.paths import REPO
from sftbench.buildenv import free_port
from sftbench.dsconfig import DSConfigError, load_ds_config
from sftbench.metrics import cpu_model

CONFIG_DIR = REPO / "ds_configs"
CONFIG_README = CONFIG_DIR / "README.md"
BENCH_DATA = "data/bench_10k.jsonl"
SAMPLE_DATA = "data/sample_sft.jsonl"
GPU_MODELS = ("pangu-350m", "pangu-2.6b")
CPU_MODELS = ("pangu-tiny",)
CPU_CONFIGS = ("none", "z0", "z2_offload_5e8", "z3_offload_param")
CPU_RANKS = 2
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULTS = {
    # steps, warm-up steps, per-run wall-clock limit (s), sequence length
    "cuda": {"steps": 10, "warmup": 3, "timeout": 1200, "seq_len": 512},
    "cpu": {"steps": 4, "warmup": 1, "timeout": 600, "seq_len": 128},
}
MIN_BUDGET_LEFT_S = 30  # don't start a run with less than this left of --max-minutes


def _cfg_name(ds_config: str | None) -> str:
    return "none" if ds_config is None else Path(ds_config).stem


def available_configs(config_dir: Path = CONFIG_DIR, ref: list[RefRow] | None = None) -> list[str]:
    """Config names in plan order: 'none', then the files in the order the reference table first uses them, then
    any other file in the folder, by name."""
    names = sorted(p.stem for p in Path(config_dir).glob("*.json"))
    order: list[str] = ["none"]
    for r in ref or []:
        n = r.file or "none"
        if n not in order and (n in names):
            order.append(n)
    order += [n for n in names if n not in order]
    return order


def select_configs(spec: str | None, available: list[str], default: Iterable[str] | None = None) -> list[str]:
    """--configs: comma-separated names, globs ('z3*') or JSON paths; keeps plan order for names."""
    if not spec:
        return list(default) if default is not None else list(available)
    chosen: list[str] = []
    for tok in [t.strip() for t in spec.split(",") if t.strip()]:
        if tok.endswith(".json") and Path(tok).is_file() and Path(tok).resolve().parent != CONFIG_DIR.resolve():
            chosen.append(str(Path(tok).resolve()))
            continue
        tok = Path(tok).stem if tok.endswith(".json") else tok
        hits = [n for n in available if fnmatch.fnmatchcase(n, tok)]
        if not hits:
            raise SystemExit(f"--configs: {tok!r} matches no config (known: {', '.join(available)})")
        chosen += [h for h in hits if h not in chosen]
    named = [n for n in available if n in chosen]
    return named + [c for c in chosen if c not in available]


def resolve_precisions(spec: str, ref_precs: list[str], accelerator: str, bf16_ok: bool) -> list[str]:
    """'ref', 'ref+bf16' (default), 'bf16', 'fp32,bf16', ... -> the list to run on this hardware.

    fp16 does not run on CPU (DeepSpeed refuses it): it becomes fp32 there. bf16 on a GPU without it
    (V100, T4) becomes fp16. Duplicates are dropped, order kept."""
    out: list[str] = []
    for tok in re.split(r"[+,\s]+", spec.strip().lower()):
        if not tok:
            continue
        if tok in ("ref", "reference"):
            items = ref_precs or ["bf16"]
        elif tok in PRECISIONS:
            items = [tok]
        else:
            raise SystemExit(f"--precisions: unknown {tok!r} (use ref, fp32, fp16, bf16, joined by + or ,)")
        for p in items:
            if accelerator == "cpu" and p == "fp16":
                p = "fp32"
            if accelerator == "cuda" and p == "bf16" and not bf16_ok:
                p = "fp16"
            if p not in out:
                out.append(p)
    return out


# ================================================================================================ plan

@dataclass(frozen=True)
class NodeLaunch:
    """Where the runs of a multi-node sweep go: DeepSpeed's launcher takes ``num_nodes`` hosts from the hostfile
    (``--hostfile``, ``--num_nodes``), optionally ``--master_addr`` and a multi-node backend (``--launcher``:
    pdsh by default, openmpi, slurm, ...)."""
    hostfile: str
    num_nodes: int
    master_addr: str | None = None
    launcher: str | None = None


EPOCH_SUFFIX = runlog.EPOCH_SUFFIX
EPOCH_TIMEOUT_S = 12 * 3600.0
ENTRY_KEY_FIELDS = ("model", "ds_config", "ds_config_sha1", "precision", "num_gpus", "num_nodes", "max_steps",
                    "warmup_steps", "accelerator", "data", "seq_len", "extra_args")


@dataclass
class PlanEntry:
    run: str
    model: str
    ds_config: str | None  # path as given to train.py (relative to the repo), None = --ds none
    precision: str
    num_gpus: int
    max_steps: int
    warmup_steps: int
    accelerator: str  # "cuda" | "cpu"
    data: str
    seq_len: int
    extra_args: list[str] = field(default_factory=list)
    ref_rows: list[int] = field(default_factory=list)
    ds_config_sha1: str | None = None
    # Several nodes: num_gpus is per node. How to reach the nodes (hostfile, master address, DeepSpeed's multi-node
    # backend) is not what makes the run: it is left out of key(), so a changed hostfile path does not re-run it.
    num_nodes: int = 1
    hostfile: str | None = None
    master_addr: str | None = None
    launcher: str | None = None

    @property
    def config_name(self) -> str:
        return _cfg_name(self.ds_config)

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes

    def key(self) -> dict:
        """What makes two entries the same run (resume compares this)."""
        d = asdict(self)
        return {k: d.get(k) for k in ENTRY_KEY_FIELDS}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "PlanEntry":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def run_name(model: str, cfg: str, precision: str, num_gpus: int, accelerator: str, num_nodes: int = 1) -> str:
    m = Path(model).name if os.sep in model or "/" in model else model
    nodes = f"n{num_nodes}" if num_nodes > 1 else ""  # one machine: the names of every earlier sweep
    return f"{m}__{cfg}__{precision}__{nodes}{'cpu' if accelerator == 'cpu' else 'g'}{num_gpus}"


def _sha1(path: Path) -> str | None:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return None


def config_path(cfg: str) -> str | None:
    if cfg == "none":
        return None
    if cfg.endswith(".json"):
        return cfg
    return f"ds_configs/{cfg}.json"


def loss_scale_warmup_steps(ds_config: str | None, precision: str) -> int:
    """Optimizer steps an fp16 DeepSpeed run is expected to skip while its dynamic loss scale comes down, added to
    the run's steps so the measured ones update the model (skipped steps are never in the statistics,
    ``sftbench.metrics.StepStats``). The scale starts at 2^initial_scale_power; the first overflow only uses up the
    hysteresis, each later one halves it. Measured: from 2^32 (the reference configs) Pangu-350M skipped 15 steps and
    settled at 2^18; counting down to 2^16 leaves a margin (17 steps for the reference configs). A static scale, bf16,
    fp32 and ``--ds none`` (torch's GradScaler starts at 2^16) skip ~nothing."""
    if precision != "fp16" or not ds_config:
        return 0
    path = Path(ds_config) if Path(ds_config).is_absolute() else REPO / ds_config
    try:
        fp = load_ds_config(path).get("fp16") or {}
    except DSConfigError:
        return 0  # a config that can't be used fails in train.py with the same message, naming it
    if fp.get("loss_scale", 0) not in (0, None):
        return 0
    try:
        power, hysteresis = int(fp.get("initial_scale_power", 16)), int(fp.get("hysteresis", 2))
    except (TypeError, ValueError):
        return 0
    return max(0, hysteresis - 1) + max(0, power - 16)


def build_plan(*, models: list[str], configs: list[str], precisions: str, gpu_counts: list[int], accelerator: str,
               steps: int, warmup: int, data: str, seq_len: int, bf16_ok: bool, ref: list[RefRow],
               extra_args: list[str] | None = None, nodes: NodeLaunch | None = None) -> list[PlanEntry]:
    """Order: GPU count, model, config (reference order), precision (reference's first, then bf16). fp16 DeepSpeed
    runs get ``loss_scale_warmup_steps`` on top of ``steps``. ``nodes``: every run on those nodes, ``gpu_counts``
    per node."""
    n_nodes = nodes.num_nodes if nodes else 1
    entries: list[PlanEntry] = []
    for n in gpu_counts:
        for model in models:
            for cfg in configs:
                name = _cfg_name(cfg)
                ref_precs, rows = reference_precisions(ref, model, name)
                if name == "none" and not ref_precs:
                    ref_precs = ["fp32", "fp16", "bf16"]
                for prec in resolve_precisions(precisions, ref_precs, accelerator, bf16_ok):
                    path = config_path(cfg)
                    sha = _sha1(REPO / path) if path and not Path(path).is_absolute() else (
                        _sha1(Path(path)) if path else None)
                    entries.append(PlanEntry(
                        run=run_name(model, name, prec, n, accelerator, n_nodes), model=model, ds_config=path,
                        precision=prec, num_gpus=n, accelerator=accelerator, warmup_steps=warmup,
                        max_steps=steps + loss_scale_warmup_steps(path, prec) if steps else steps,
                        data=data, seq_len=seq_len, extra_args=list(extra_args or []),
                        ref_rows=reference_rows(ref, model, name, prec, n * n_nodes) if accelerator == "cuda" else [],
                        ds_config_sha1=sha, num_nodes=n_nodes, hostfile=nodes.hostfile if nodes else None,
                        master_addr=nodes.master_addr if nodes else None,
                        launcher=nodes.launcher if nodes else None))
    return entries


# ================================================================================================ model shapes

def _count_lines(path: Path, cache: dict = {}) -> int | None:  # noqa: B006 (a deliberate per-process cache)
    key = str(path)
    if key not in cache:
        try:
            with open(path, "rb") as f:
                cache[key] = sum(1 for line in f if line.strip())
        except OSError:
            cache[key] = None
    return cache[key]


def predict_entry(entry: PlanEntry, gpus: list[Gpu]) -> dict:
    """The memory prediction for one plan entry (never raises: an error becomes {'error': ...})."""
    try:
        shape = model_shape(entry.model)
        cfg = None
        if entry.ds_config:
            p = Path(entry.ds_config)
            p = p if p.is_absolute() else REPO / p
            cfg = json.loads(p.read_text(encoding="utf-8"))
        micro = (cfg or {}).get("train_micro_batch_size_per_gpu", 1) or 1
        gpu_total = gpus[0].memory_mib if (entry.accelerator == "cuda" and gpus) else None
        host_total = host_total_mib()  # this machine's: the nodes of a job are taken to be alike
        data = Path(entry.data) if os.path.isabs(entry.data) else REPO / entry.data
        cuda = entry.accelerator == "cuda"
        run = memory.RunShape(cfg, entry.world_size, entry.precision, seq_len=entry.seq_len, micro_batch=micro,
                              cuda=cuda, dataset_samples=_count_lines(data))
        # what train.py will run: the graphs where --cuda-graphs auto (or the entry's flags) turns them on
        gpu = gpu_class_of(gpus[0].name, gpus[0].compute_cap) if (cuda and gpus) else None
        pred = planned_prediction(memory.ModelShape.of(shape), run,
                                  memory.Limits(gpu_total, host_total if entry.num_nodes == 1 else None),
                                  entry.extra_args, gpu=gpu, family=resolve_model(entry.model).family).to_json()
        if entry.num_nodes > 1:  # one node's RAM holds its own ranks' share, not the whole job's host memory
            pred = nodes_mod.per_node_prediction(pred, entry.num_nodes, entry.num_gpus, host_total)
        return pred
    except Exception as e:  # a prediction must never stop a sweep
        return {"error": f"{type(e).__name__}: {e}"}


# ================================================================================================ failures

# The failure classes and their rules live in sftbench/failures.py (train.py follows the same ones).
classify_failure = failures.classify_failure


def _empty_summary() -> dict:
    rec = {k: None for k in runlog.SUMMARY_KEYS}
    rec["type"] = "summary"
    return rec


def synthesize_summary(rr: runlog.RunRecords, status: str, error: str | None, wall_s: float) -> dict:
    """A summary record for a run that died: status/error from the classifier, statistics from its step records."""
    from sftbench.metrics import StepStats  # no torch import in metrics at module level
    rec = _empty_summary()
    meta = rr.meta.get(0) or next(iter(rr.meta.values()), None) or {}
    rank = 0 if 0 in rr.steps else (min(rr.steps) if rr.steps else None)
    if rank is not None and rr.steps.get(rank):
        st = StepStats(int(meta.get("warmup_steps") or 0), meta.get("precision"))
        for s in rr.steps[rank]:
            st.add(s)
        try:
            rec.update(st.summary_fields(int(meta.get("world_size") or 1), int(meta.get("steps_per_epoch") or 0)))
        except (KeyError, TypeError, ValueError):
            pass
    else:
        rec["steps"] = 0
        rec["measured_steps"] = 0
    if meta.get("steps_per_epoch") is not None and rec.get("steps_per_epoch") is None:
        rec["steps_per_epoch"] = meta.get("steps_per_epoch")
    rec.update(status=status, error=error, time=time.time(), wall_s=wall_s, synthesized=True)
    return {k: runlog.clean(rec.get(k)) for k in runlog.SUMMARY_KEYS}


# ================================================================================================ running

@dataclass
class Outcome:
    run: str
    action: str  # "ran", "skipped-ok", "skipped-failed", "queued"
    status: str | None = None
    error: str | None = None
    wall_s: float | None = None
    step_s: float | None = None


def entry_state(run_dir: Path, entry: PlanEntry) -> tuple[str, dict | None]:
    """('ok'|'failed'|'interrupted'|'unfinished'|'missing'|'changed', summary) of a run directory."""
    if not run_dir.is_dir():
        return "missing", None
    pe = run_dir / runlog.PLAN_ENTRY_FILE
    try:
        old = PlanEntry.from_json(json.loads(pe.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return "changed", None
    if old.key() != entry.key():
        return "changed", None
    summ = runlog.load_run(run_dir).final_summary()
    if summ is None:
        return "unfinished", None
    st = summ.get("status")
    if st == "ok":
        return "ok", summ
    if st == "interrupted":
        return "interrupted", summ
    return "failed", summ


def launcher_command(num_gpus: int, cuda: bool, env: Mapping[str, str], nodes: NodeLaunch | None = None) -> list[str]:
    """The deepspeed launcher for num_gpus ranks on this host, on a free port. Honours CUDA_VISIBLE_DEVICES (the
    launcher itself ignores it once --num_gpus is given). ``nodes``: DeepSpeed's multi-node launch from the
    hostfile, num_gpus ranks on each of the first ``nodes.num_nodes`` hosts (``resolve`` refuses
    CUDA_VISIBLE_DEVICES there: it would not reach the other nodes)."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
    if nodes is not None:
        cmd += ["--hostfile", nodes.hostfile, "--num_nodes", str(nodes.num_nodes), "--num_gpus", str(num_gpus)]
        cmd += ["--master_addr", nodes.master_addr] if nodes.master_addr else []
        return cmd + (["--launcher", nodes.launcher] if nodes.launcher else [])
    ids = [t.strip() for t in (env.get("CUDA_VISIBLE_DEVICES") or "").split(",") if t.strip()]
    if cuda and ids and all(t.isdigit() for t in ids):
        return cmd + ["--include", f"localhost:{','.join(ids[:num_gpus])}"]
    return cmd + ["--num_gpus", str(num_gpus)]


# The reference's training layout, which train.py's defaults no longer are: every token in the loss and its WarmupLR
# schedule (constant after the warm-up). The same FLOPs and steps either way: timings do not depend on them.
REFERENCE_LAYOUT = ("--no-mask-prompt", "--lr-schedule", "config")


def train_command(entry: PlanEntry, run_dir: Path, env: dict) -> list[str]:
    """deepspeed launcher -> train.py."""
    nodes = (NodeLaunch(entry.hostfile, entry.num_nodes, entry.master_addr, entry.launcher) if entry.hostfile
             else None)
    cmd = launcher_command(entry.num_gpus, entry.accelerator == "cuda", env, nodes)
    cmd += ["train.py", "--ds", entry.ds_config or "none", "--model", entry.model, "--precision", entry.precision,
            "--max-steps", str(entry.max_steps), "--warmup-steps", str(entry.warmup_steps),
            "--run-dir", repo_relative(run_dir), "--data", entry.data, "--seq-len", str(entry.seq_len),
            *REFERENCE_LAYOUT, *entry.extra_args]
    return cmd


def run_env(entry: PlanEntry, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # ninja for op builds
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if entry.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


class _Stop(Exception):
    pass


NODES_STOP_S = 60.0  # how long DeepSpeed's launcher gets to stop the ranks of every node


def _kill_group(proc: subprocess.Popen, nodes_stop_s: float = 0.0) -> None:
    """SIGKILL the run's whole process group (launcher and every rank). No SIGTERM first on purpose: train.py
    would write an 'interrupted' summary, and the sweep's own classification (timeout, budget) must win.

    ``nodes_stop_s`` > 0 (a run on several nodes): the ranks run under ssh on their nodes, outside this process
    group, and only DeepSpeed's launcher can reach them: it gets SIGTERM first and stops them (its pdsh backend
    runs its kill command on every node), so their summaries say 'interrupted'; then the group is killed."""
    if nodes_stop_s > 0:
        try:
            proc.send_signal(signal.SIGTERM)  # the launcher only: it forwards the stop to every node
            proc.wait(timeout=nodes_stop_s)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass


def launch(cmd: list[str], env: dict, run_dir: Path, timeout_s: float,
           nodes_stop_s: float = 0.0) -> tuple[int | None, bool, float, str]:
    """Run one command in its own session, console to run_dir/console.log. (rc, timed_out, wall_s, reason).
    ``nodes_stop_s``: see ``_kill_group`` (runs on several nodes)."""
    t0 = time.time()
    with open(run_dir / runlog.CONSOLE_FILE, "ab") as log:
        log.write(("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        reason = ""
        old = {}

        def on_signal(signum, frame):
            raise _Stop(f"sweep received signal {signum}")

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                old[s] = signal.signal(s, on_signal)
            except (ValueError, OSError):  # not the main thread
                pass
        try:
            try:
                rc = proc.wait(timeout=max(1.0, timeout_s))
                timed_out = False
            except subprocess.TimeoutExpired:
                reason = "timeout"
                _kill_group(proc, nodes_stop_s)
                rc, timed_out = proc.returncode, True
        except (_Stop, KeyboardInterrupt) as e:
            _kill_group(proc, nodes_stop_s)
            rc, timed_out, reason = proc.returncode, True, f"stopped: {str(e) or 'KeyboardInterrupt'}"
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return rc, timed_out, time.time() - t0, reason


def write_json(path: Path, obj) -> None:
    """Write a JSON file whole or not at all (temporary file, then os.replace): a sweep killed mid-write never
    leaves a half-written plan.json or summary.json for the resume logic, the report or the monitor to trip on."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _merge_plan(path: Path, sweep: str, entries: list[PlanEntry]) -> None:
    """plan.json: earlier invocations' entries (a filtered later batch keeps them) merged with this one's."""
    created, old_entries = time.time(), []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            created = old.get("created", created)
            old_entries = old.get("entries", [])
        except (OSError, ValueError):
            pass
    # earlier entries keep their place (updated in place when planned again); new ones go at the end
    new = {e.run: e.to_json() for e in entries}
    merged = [new.pop(o.get("run"), o) for o in old_entries if isinstance(o, dict)] + list(new.values())
    write_json(path, {"sweep": sweep, "created": created, "updated": time.time(), "entries": merged})


def restore_runs(results_dir: Path, sweep_dir: Path, sweep: str) -> list[str]:
    """Rebuild run folders from a results folder as the report wrote it: ``summaries.jsonl`` (each run's
    ``plan_entry`` record with its prediction, its meta and its summaries) and ``sweep_info.json``. A restored run has
    ``plan_entry.json``, ``predicted.json`` and ``rank<k>.jsonl`` with its meta (rank 0) and summary records, or the
    sweep's ``summary.json`` for a run that died; its step records are not in the results folder, so it has none.
    Runs that already have a folder are left as they are; planned runs that never ran go back into ``plan.json``
    only. Returns the names restored."""
    path = results_dir / runlog.RESULTS_SUMMARIES_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: nothing to restore from (the report writes it)")
    records, bad = runlog.read_records(path)
    if bad:
        print(f"note: {path}: {bad} unparseable line(s) skipped", file=sys.stderr)
    by_run: dict[str, list[dict]] = {}
    for rec in records:
        if rec.get("run"):
            by_run.setdefault(rec["run"], []).append(rec)
    restored, entries = [], []
    for run, recs in by_run.items():
        rd = sweep_dir / run
        planned = [r for r in recs if r.get("type") == "plan_entry"]
        if planned and len(recs) == len(planned):  # planned, not run yet: back into plan.json only
            entries.append(PlanEntry.from_json(planned[0]))
            continue
        if rd.exists():
            continue
        if not planned:
            print(f"note: {path}: {run} has no plan_entry record (a report older than restore): not restored",
                  file=sys.stderr)
            continue
        entry = PlanEntry.from_json(planned[0])
        rd.mkdir(parents=True)
        write_json(rd / runlog.PLAN_ENTRY_FILE, entry.to_json())
        if isinstance(planned[0].get("predicted"), dict):
            write_json(rd / runlog.PREDICTED_FILE, planned[0]["predicted"])
        for rec in recs:
            if rec.get("type") == "meta":
                log = runlog.RunLog(rd, 0)
                log.meta(**{k: v for k, v in rec.items() if k in runlog.META_KEYS and k != "schema"})
                log.close()
            elif rec.get("type") == "summary" and rec.get("synthesized"):  # the sweep's record of a run that died
                write_json(rd / runlog.SUMMARY_FILE, {k: v for k, v in rec.items() if k not in ("run", "rank")})
            elif rec.get("type") == "summary":
                log = runlog.RunLog(rd, int(rec.get("rank") or 0))
                log.summary(**{k: v for k, v in rec.items() if k in runlog.SUMMARY_KEYS})
                log.close()
        restored.append(run)
        entries.append(entry)
    if entries:
        _merge_plan(sweep_dir / runlog.PLAN_FILE, sweep, entries)
    info = results_dir / runlog.SWEEP_INFO_FILE
    if info.is_file() and not (sweep_dir / runlog.SWEEP_INFO_FILE).exists():
        sweep_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(info, sweep_dir / runlog.SWEEP_INFO_FILE)
    return restored


def write_sweep_info(sweep_dir: Path, sweep: str, gpus: list[Gpu], accelerator: str, command: str | None) -> None:
    """sweep_info.json: the hardware and the commands, for the report's preamble (the runs' meta lacks the CPU).

    ``command`` is the latest invocation; ``commands`` keeps every invocation that wrote into this folder, with the
    GPUs and the number of cores it had, so two sweeps sharing one host (each on its own GPUs and half of the cores)
    are both on record. The read-modify-write holds a lock: such sweeps start seconds apart."""
    import platform
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / runlog.SWEEP_INFO_FILE
    with _locked(sweep_dir / ".sweep_info.lock"):
        history: list = []
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                history = [c for c in old.get("commands") or [] if isinstance(c, dict)]
                if not history and old.get("command"):  # a file written before the history existed
                    history = [{"command": old["command"], "time": old.get("time")}]
            except (OSError, ValueError):
                pass
        now = time.time()
        # each invocation's own machine: a folder filled over several device sessions mixes hosts
        machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "host_mem_mib": host_total_mib()}
        history.append({"command": command, "time": now, "gpus": [g.index for g in gpus], "cores": cpu_affinity(),
                        "host": host_tag(), **machine})
        info = {"sweep": sweep, "time": now, "command": command, "commands": history, "accelerator": accelerator,
                "hardware": {"gpus": [asdict(g) for g in gpus], **machine,
                             "platform": platform.platform(), "python": platform.python_version()}}
        write_json(path, info)


class _locked:
    """An exclusive advisory lock on a file for the ``with`` block (no-op where fcntl is missing)."""

    def __init__(self, path: Path):
        self.path, self.fh = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # closing releases the lock
        return False


def ensure_data(entries: list[PlanEntry], say: Callable[[str], None]) -> None:
    """Generate the 10,000-sample benchmark file when the plan needs it and it is missing."""
    if any(e.data == BENCH_DATA for e in entries) and not (REPO / BENCH_DATA).is_file():
        say(f"generating {BENCH_DATA} ...")
        subprocess.run([sys.executable, "data/make_bench.py", "--out", BENCH_DATA, "--n", "10000", "--seed", "0"],
                       cwd=REPO, check=True)


def run_sweep(entries: list[PlanEntry], sweep_dir: Path, *, sweep: str, timeout_s: float,
              max_minutes: float | None = None, force: bool = False, retry_failed: bool = False,
              gpus: list[Gpu] | None = None, command_fn: Callable[[PlanEntry, Path, dict], list[str]] | None = None,
              base_env: dict | None = None, say: Callable[[str], None] = print) -> list[Outcome]:
    """Run the plan in order; returns what happened to every entry. Failures never stop the sweep."""
    command_fn = command_fn or train_command
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _merge_plan(sweep_dir / runlog.PLAN_FILE, sweep, entries)
    t_start = time.time()
    deadline = t_start + max_minutes * 60 if max_minutes else None
    outcomes: list[Outcome] = []
    total = len(entries)
    for i, entry in enumerate(entries, 1):
        tag = f"[{i}/{total}] {entry.run}"
        rd = sweep_dir / entry.run
        state, summ = entry_state(rd, entry)
        if state == "ok" and not force:
            outcomes.append(Outcome(entry.run, "skipped-ok", "ok", None, None, summ.get("step_s_median")))
            say(f"{tag}: done before (ok), skipped")
            continue
        if state == "failed" and not (force or retry_failed):
            outcomes.append(Outcome(entry.run, "skipped-failed", summ.get("status"), summ.get("error")))
            say(f"{tag}: failed before ({summ.get('status')}), skipped (--retry-failed re-runs it)")
            continue
        left = deadline - time.time() if deadline else None
        if left is not None and left < MIN_BUDGET_LEFT_S:
            outcomes += [Outcome(e.run, "queued") for e in entries[i - 1:]]
            say(f"budget of --max-minutes {max_minutes:g} spent: {total - i + 1} entries left queued; "
                f"run the same command again to resume")
            break
        if rd.exists():
            shutil.rmtree(rd)
        rd.mkdir(parents=True)
        write_json(rd / runlog.PLAN_ENTRY_FILE, entry.to_json())
        pred = predict_entry(entry, gpus or [])
        write_json(rd / runlog.PREDICTED_FILE, pred)
        env = run_env(entry, base_env)
        cmd = command_fn(entry, rd, env)
        limit = timeout_s if left is None else min(timeout_s, left)
        hint = "" if "error" in pred else f" (predicted {memory.summarize(pred)})"
        say(f"{tag}: running{hint}")
        oom_kills = failures.oom_kill_count()  # the cgroup's OOM-kill count before: a rise is evidence of OOM
        rc, timed_out, wall, reason = launch(cmd, env, rd, limit, NODES_STOP_S if entry.num_nodes > 1 else 0.0)
        out = finish_run(rd, entry, rc, timed_out, wall, reason, timeout_s=limit,
                         budget_cut=timed_out and left is not None and limit < timeout_s and reason == "timeout",
                         oom_kills_before=oom_kills)
        outcomes.append(out)
        shown = f"{out.step_s:.3f} s/it" if out.step_s else (out.error or "")
        say(f"{tag}: {out.status} in {wall:.0f} s, {shown}" + ("" if out.status == "ok" else
                                                                f" (console: {rd / 'console.log'})"))
        if reason.startswith("stopped"):
            outcomes += [Outcome(e.run, "queued") for e in entries[i:]]
            say("sweep stopped by a signal; run the same command again to resume")
            break
    return outcomes


def finish_run(rd: Path, entry: PlanEntry, rc: int | None, timed_out: bool, wall: float, reason: str, *,
               timeout_s: float, budget_cut: bool = False, oom_kills_before: int | None = None) -> Outcome:
    """Keep train.py's own summary; else write summary.json (synthesized) classified from exit code and console."""
    rr = runlog.load_run(rd)
    if 0 in rr.summary:
        s = rr.summary[0]
        return Outcome(entry.run, "ran", s.get("status"), s.get("error"), wall, s.get("step_s_median"))
    log = rd / runlog.CONSOLE_FILE
    console = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    other = [s for r, s in sorted(rr.summary.items()) if s.get("status") not in (None, "ok", "interrupted")]
    if reason.startswith("stopped"):
        status, error = "interrupted", f"sweep {reason}; re-run the sweep to resume"
    elif budget_cut:
        status, error = "interrupted", ("the sweep's --max-minutes budget ran out during the run; re-run the "
                                        "sweep to resume (a run longer than one whole budget never finishes: "
                                        "lower --steps or raise --max-minutes)")
    elif other:
        status, error = other[0]["status"], other[0].get("error")
    else:
        evidence = None
        if not timed_out:
            pids = [m.get("pid") for m in rr.meta.values()]
            last = [steps[-1] for steps in rr.steps.values() if steps]
            evidence = failures.evidence_of_oom(pids, oom_kills_before, last, host_total_mib())
        status, error = failures.classify_failure(console, rc, timed_out=timed_out, timeout_s=timeout_s,
                                                  accelerator=entry.accelerator, oom_evidence=evidence)
    summ = synthesize_summary(rr, status, error, wall)
    write_json(rd / runlog.SUMMARY_FILE, summ)
    return Outcome(entry.run, "ran", status, error, wall, summ.get("step_s_median"))


# ================================================================================================ CLI

def _env(name: str, default=None):
    v = os.environ.get(f"SFTBENCH_{name}")
    return v if v not in (None, "") else default


def _env_flag(name: str) -> bool:
    """SFTBENCH_<name> as a switch: 1/true/yes/on turn it on; 0/false/no/off/empty leave it off."""
    v = (_env(name, "") or "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"error: SFTBENCH_{name}={v!r}: use 1 or 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sftbench.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run",
                   choices=("run", "plan", "report", "name", "dirs", "restore"),
                   help="run (default): run what is not done; plan: print the plan; report: write "
                        "results/<sweep>/; name: print the sweep name; dirs: print the sweep's runs folder and "
                        "results folder, tab-separated (what run_all.sh hands to python -m sftbench.report); "
                        "restore: rebuild runs/<sweep>/ from the committed results/<sweep>/, so the next run "
                        "resumes there")
    g = p.add_argument_group("plan")
    g.add_argument("--gpus", default=_env("GPUS"),
                   help="GPUs per run, e.g. 1 or '1,3' (a run per count); default all visible. On CPU: ranks (2).")
    g.add_argument("--models", default=_env("MODELS"),
                   help=f"comma list; default {','.join(GPU_MODELS)} (CPU: {','.join(CPU_MODELS)})")
    g.add_argument("--configs", default=_env("CONFIGS"),
                   help="comma list of config names, globs ('z3*') or JSON paths, 'none' = no DeepSpeed; "
                        f"default all of ds_configs/ (CPU: {','.join(CPU_CONFIGS)})")
    g.add_argument("--precisions", default=_env("PRECISIONS", "ref+bf16"),
                   help="'ref' (the reference table's precision for that row), 'ref+bf16' (default), 'bf16', "
                        "'fp32,bf16', ...; fp16 becomes fp32 on CPU, bf16 becomes fp16 on GPUs without bf16")
    g.add_argument("--steps", type=int, default=_env("STEPS"),
                   help="optimizer steps per run (GPU 10, CPU 4); fp16 DeepSpeed runs add the steps their loss "
                        "scale is expected to skip (17 for the reference configs)")
    g.add_argument("--warmup", type=int, default=_env("WARMUP"), help="warm-up steps (GPU 3, CPU 1)")
    g.add_argument("--seq-len", type=int, default=_env("SEQ_LEN"), help="tokens per sample (GPU 512, CPU 128)")
    g.add_argument("--data", default=_env("DATA"),
                   help=f"SFT JSONL (GPU: {BENCH_DATA}, generated if missing; CPU: {SAMPLE_DATA})")
    g.add_argument("--extra-args", default=_env("EXTRA_ARGS", ""),
                   help="more train.py arguments, one shell-quoted string (write --extra-args='--compile')")
    g.add_argument("--epoch", action="store_true", default=_env_flag("EPOCH"),
                   help="one full epoch per run (train.py --max-steps 0) in run directories named <run>__epoch, to "
                        "check the short runs' epoch estimate: the report compares the two (pick one config per "
                        "model: --models pangu-350m --configs z0). The default --timeout becomes 12 h")
    g.add_argument("--cpu", action="store_true", default=_env_flag("CPU"),
                   help="the CPU plan even where GPUs are visible")
    n = p.add_argument_group("several nodes (README: 'Several nodes')")
    n.add_argument("--hostfile", default=_env("HOSTFILE"),
                   help="DeepSpeed hostfile ('<host> slots=<n>' per line): every run goes through DeepSpeed's "
                        "multi-node launcher on its first --num-nodes hosts, --gpus ranks on each; start the sweep "
                        "on the first host")
    n.add_argument("--num-nodes", type=int, default=_env("NUM_NODES"),
                   help="nodes per run (default: every host of --hostfile); more than 1 needs --hostfile")
    n.add_argument("--master-addr", default=_env("MASTER_ADDR"),
                   help="rendezvous address of the first node, passed to the launcher (default: DeepSpeed asks "
                        "the first host for it over ssh)")
    n.add_argument("--launcher", default=_env("LAUNCHER"),
                   help="DeepSpeed's multi-node backend (pdsh by default; openmpi, mpich, impi, mvapich, slurm)")
    n.add_argument("--node-dir", action="append", default=[], metavar="DIR",
                   help="report: this sweep's folder as another node wrote it (node-local disks, copied back); "
                        "repeat per node")
    r = p.add_argument_group("run")
    r.add_argument("--timeout", type=float, default=_env("TIMEOUT"),
                   help="wall-clock limit per run in seconds (GPU 1200, CPU 600); the run's process group is killed")
    r.add_argument("--max-minutes", type=float, default=_env("MAX_MINUTES"),
                   help="stop launching runs after this many minutes (and cut the last one); the rest stays "
                        "queued for the next invocation")
    r.add_argument("--sweep-name", default=_env("SWEEP_NAME"),
                   help="runs go to <runs-dir>/<name>/; default <gpu>x<count> (e.g. h100x1), 'cpu' on CPU")
    r.add_argument("--runs-dir", default=_env("RUNS_DIR", "runs"))
    r.add_argument("--results-dir", default=_env("RESULTS_DIR", "results"))
    r.add_argument("--force", action="store_true", default=_env_flag("FORCE"), help="re-run finished runs too")
    r.add_argument("--retry-failed", action="store_true", default=_env_flag("RETRY_FAILED"),
                   help="re-run runs that failed (oom, cuda_error, error, timeout, killed)")
    r.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


@dataclass
class Resolved:
    entries: list[PlanEntry]
    sweep: str
    sweep_dir: Path
    results_dir: Path
    accelerator: str
    gpus: list[Gpu]
    timeout: float
    nodes: NodeLaunch | None = None


def resolve(args: argparse.Namespace, gpus: list[Gpu] | None = None) -> Resolved:
    gpus = detect_gpus() if gpus is None else gpus
    accelerator = "cpu" if (args.cpu or not gpus) else "cuda"
    d = DEFAULTS[accelerator]
    if args.gpus:
        counts = [int(x) for x in re.split(r"[,\s]+", str(args.gpus).strip()) if x]
    else:
        counts = [CPU_RANKS] if accelerator == "cpu" else [len(gpus)]
    if accelerator == "cuda" and not args.dry_run:
        too_many = [c for c in counts if c > len(gpus)]
        if too_many:
            raise SystemExit(f"--gpus {too_many[0]}: only {len(gpus)} GPU(s) visible")
    try:
        ref = read_reference_map()
    except (OSError, ValueError) as e:
        print(f"warning: {e}; using bf16 for every config", file=sys.stderr)
        ref = []
    models = [m.strip() for m in args.models.split(",")] if args.models else list(
        CPU_MODELS if accelerator == "cpu" else GPU_MODELS)
    avail = available_configs(CONFIG_DIR, ref)
    configs = select_configs(args.configs, avail, CPU_CONFIGS if accelerator == "cpu" else None)
    data = args.data or (SAMPLE_DATA if accelerator == "cpu" else BENCH_DATA)
    steps = int(args.steps) if args.steps is not None else d["steps"]
    warmup = int(args.warmup) if args.warmup is not None else min(d["warmup"], max(0, steps - 1))
    epoch = args.epoch
    if epoch:
        steps = 0  # train.py: one full epoch
    nodes = resolve_nodes(args, counts, accelerator)
    entries = build_plan(models=models, configs=configs, precisions=args.precisions, gpu_counts=counts,
                         accelerator=accelerator, steps=steps, warmup=warmup, data=data,
                         seq_len=int(args.seq_len) if args.seq_len else d["seq_len"], bf16_ok=bf16_supported(gpus),
                         ref=ref, extra_args=shlex.split(args.extra_args or ""), nodes=nodes)
    if epoch:
        for e in entries:
            e.run += EPOCH_SUFFIX
    if args.sweep_name:
        sweep = args.sweep_name
    elif accelerator == "cpu":
        sweep = "cpu"
    else:
        sweep = f"{gpu_slug(gpus[0].name)}x{'-'.join(str(c) for c in counts)}"
    if nodes is not None and nodes.num_nodes > 1 and not args.sweep_name:
        sweep += f"-{nodes.num_nodes}nodes"  # e.g. h100x8-2nodes: never mixed into one machine's folder
    runs_dir = Path(args.runs_dir)
    runs_dir = runs_dir if runs_dir.is_absolute() else REPO / runs_dir
    results = Path(args.results_dir)
    results = results if results.is_absolute() else REPO / results
    timeout = float(args.timeout) if args.timeout is not None else (EPOCH_TIMEOUT_S if epoch else d["timeout"])
    return Resolved(entries, sweep, runs_dir / sweep, results / sweep, accelerator, gpus, timeout, nodes)


def resolve_nodes(args: argparse.Namespace, counts: list[int], accelerator: str,
                  env: Mapping[str, str] | None = None) -> NodeLaunch | None:
    """--hostfile / --num-nodes / --master-addr / --launcher -> the NodeLaunch of every run, None on one machine.
    Refuses what the launcher would do differently from what was asked, naming the flag or the hostfile line."""
    env = os.environ if env is None else env
    if not args.hostfile:
        if args.num_nodes is not None and int(args.num_nodes) > 1:
            raise SystemExit(f"error: --num-nodes {args.num_nodes} needs --hostfile (DeepSpeed's launcher reads the "
                             "nodes from it)")
        for flag, v in (("--master-addr", args.master_addr), ("--launcher", args.launcher)):
            if v:
                raise SystemExit(f"error: {flag} applies only with --hostfile (one machine uses 127.0.0.1)")
        return None
    try:
        hosts = nodes_mod.read_hostfile(args.hostfile)
        n = int(args.num_nodes) if args.num_nodes is not None else len(hosts)
        if n < 1:
            raise nodes_mod.NodeError(f"--num-nodes must be >= 1, got {n}")
        for c in counts:
            nodes_mod.check_layout(hosts, n, c, args.hostfile)
    except nodes_mod.NodeError as e:
        raise SystemExit(f"error: {e}") from None
    if accelerator == "cuda" and env.get("CUDA_VISIBLE_DEVICES"):
        raise SystemExit("error: CUDA_VISIBLE_DEVICES is set, but it does not reach the other nodes and DeepSpeed's "
                         "launcher ignores it with --hostfile: unset it and give each host's GPUs in the hostfile "
                         "('<host> slots=<n>' takes the first n) or with --gpus")
    return NodeLaunch(repo_relative(args.hostfile), n, args.master_addr or None, args.launcher or None)


def print_plan(res: Resolved, say: Callable[[str], None] = print) -> None:
    hw = (f"{len(res.gpus)} x {res.gpus[0].name}" if res.accelerator == "cuda"
          else f"CPU ({'/'.join(str(n) for n in sorted({e.num_gpus for e in res.entries})) or CPU_RANKS} ranks, "
               f"DS_ACCELERATOR=cpu)")
    if res.nodes is not None:
        hw += (f" per node, {res.nodes.num_nodes} node(s) of {res.nodes.hostfile}"
               + (f" via {res.nodes.launcher}" if res.nodes.launcher else ""))
    say(f"sweep {res.sweep}: {len(res.entries)} runs on {hw} -> {res.sweep_dir}")
    hw_host = 13 if res.nodes is not None else 9  # room for 'GiB/node'
    say(f"{'#':>3}  {'run':<52} {'ref rows':<10} {'predicted GPU/rank':>18} {'host':>{hw_host}}  fits  state")
    for i, e in enumerate(res.entries, 1):
        pred = predict_entry(e, res.gpus)
        gpu = f"{pred['gpu_mib']:.0f} MiB" if "gpu_mib" in pred and e.accelerator == "cuda" else "-"
        host = f"{pred['host_mib'] / 1024:.1f} GiB" if "host_mib" in pred else "-"
        if "host_mib_per_node" in pred:  # what one node's RAM must hold
            host = f"{pred['host_mib_per_node'] / 1024:.1f} GiB/node"
        fits = {True: "yes", False: "NO", None: "?"}[pred.get("fits")]
        state, summ = entry_state(res.sweep_dir / e.run, e)
        if summ:
            state = f"{state} ({summ.get('status')})" if state != "ok" else "done"
        rows = ",".join(str(r) for r in e.ref_rows) or "-"
        say(f"{i:>3}  {e.run:<52} {rows:<10} {gpu:>18} {host:>{hw_host}}  {fits:<4}  {state}")
    for line in recommendations(res):
        say(line)


def recommendations(res: Resolved) -> list[str]:
    """On GPUs: ``python -m sftbench.plan``'s recommendation (sftbench.plan.recommend) for each model, GPU count,
    precision and sequence length of the sweep, among the sweep's own ds_configs/ configurations, on these GPUs and
    this machine's RAM: the same lines the plan prints for that hardware."""
    from sftbench import plan as plan_mod

    if res.accelerator != "cuda" or not res.gpus:
        return []
    known = set(plan_mod.config_names())
    groups: dict[tuple, list[str]] = {}
    for e in res.entries:
        if e.config_name in known:
            key = (e.model, e.num_gpus, e.num_nodes, e.precision, e.seq_len)
            groups.setdefault(key, []).append(e.config_name)
    out: list[str] = []
    results = plan_mod.measured_steps()
    for (model, n, nodes, precision, seq_len), names in groups.items():
        hw = plan_mod.Hardware(n, nodes, res.gpus[0].memory_mib, host_total_mib(), gpu_slug(res.gpus[0].name))
        rows = plan_mod.plan(model, hw, precision, seq_len, names, results)
        rec = plan_mod.recommend(rows, model, hw, precision, seq_len, results)
        out += ["", f"plan for {model}, {precision}, seq {seq_len} on {nodes} node(s) x {n} GPU(s) (python -m "
                    f"sftbench.plan, among this sweep's {len(names)} configuration(s)):"]
        out += plan_mod.render_recommendation(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        args.dry_run = True
    res = resolve(args)
    if args.command == "name":
        print(res.sweep)
        return 0
    if args.command == "dirs":  # run_all.sh: the report's folders, then other nodes' copies (--node-dir)
        print("\t".join([str(res.sweep_dir), str(res.results_dir), *args.node_dir]))
        return 0
    if args.command == "restore":
        done = restore_runs(res.results_dir, res.sweep_dir, res.sweep)
        print(f"restored {len(done)} run(s) from {res.results_dir} into {res.sweep_dir}"
              + (f": {', '.join(done)}" if done else " (every run there already has a folder)"))
        return 0
    if args.command == "report":
        if args.dry_run:
            return 0
        from sftbench import report
        if not res.sweep_dir.is_dir():
            print(f"no runs in {res.sweep_dir}", file=sys.stderr)
            return 1
        return report.main([str(res.sweep_dir), "--out", str(res.results_dir),
                            *[a for d in args.node_dir for a in ("--node-dir", d)]])
    if args.node_dir:  # ./run_all.sh hands the same options to the run and to the report
        print(f"note: --node-dir is read by the report only ({', '.join(args.node_dir)})", file=sys.stderr)
    if args.dry_run:
        print_plan(res)
        return 0
    print_plan(res)
    if res.accelerator == "cpu":
        # Runs from before train.py released DeepSpeed's CPU shm buffers each left 66 MB per rank in RAM.
        from sftbench import shm
        n, size = shm.remove_stale()
        if n:
            print(f"removed {n} stale DeepSpeed shm buffer(s) left by earlier CPU runs ({size / 2**30:.1f} GiB)")
    ensure_data(res.entries, print)
    write_sweep_info(res.sweep_dir, res.sweep, res.gpus, res.accelerator,
                     "python -m sftbench.sweep " + shlex.join(sys.argv[1:] if argv is None else argv))
    outcomes = run_sweep(res.entries, res.sweep_dir, sweep=res.sweep, timeout_s=res.timeout,
                         max_minutes=args.max_minutes, force=args.force, retry_failed=args.retry_failed,
                         gpus=res.gpus)
    ran = [o for o in outcomes if o.action == "ran"]
    queued = [o for o in outcomes if o.action == "queued"]
    by_status: dict[str, int] = {}
    for o in outcomes:
        if o.status:
            by_status[o.status] = by_status.get(o.status, 0) + 1
    print(f"sweep {res.sweep}: ran {len(ran)}, skipped {len(outcomes) - len(ran) - len(queued)}, "
          f"queued {len(queued)}; status counts {by_status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
