"""The results table: the reference's columns, our measurements, failures with their reasons, a plot.

    python -m sftbench.report runs/<sweep> --out results/<sweep>/
    python -m sftbench.report runs/<sweep> --node-dir node1-runs/<sweep>   # a multi-node sweep without a shared disk

Reads only what the runs wrote: ``rank<k>.jsonl`` (schema: docs/log_schema.md), the sweep's ``summary.json``
(synthesized for runs that died), ``plan.json`` / ``plan_entry.json``, ``predicted.json`` and ``sweep_info.json``.
It never reads console output. Writes into the output folder:

* ``results.md`` / ``results.html``: the reference table's columns in its order (Chinese headers as the reference
  had them, English beside them in the Markdown), rows grouped by model and GPU, epoch time marked ``~`` when
  estimated, failures as ``OOM`` / ``CUDA Error`` / ``Timeout`` / ``Error`` cells in the GPU-memory column with the
  reason in a numbered footnote, then our columns (tokens/s per GPU, TFLOPS, MFU, predicted vs measured memory),
  a preamble (hardware, versions, command) and a recommendation per model and GPU count.
* ``results.csv``: every summary field, the plan entry and the config columns, one row per run.
* ``results.png``: per model, step time against GPU memory per rank (CPU runs: host RSS), Pareto front marked,
  failures apart on a labelled band.
* ``summaries.jsonl``: rank 0's meta (minus bulky fields) and every rank's summary record of every run, each with
  ``run`` (and ``rank``) added, so the results folder stands on its own.
"""
from __future__ import annotations

import argparse
import csv
import functools
import html
import json
import math
import os
import platform
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from sftbench import engine_checks, liveness, reference, runlog
from sftbench import nodes as nodes_mod
from sftbench.paths import REPO
from sftbench.dsconfig import apply_precision, describe
from sftbench.fmt import fmt_duration, fmt_e, fmt_num, fmt_sig, fmt_step
from sftbench.metrics import StepStats, cpu_model
from sftbench.runlog import EPOCH_SUFFIX  # sweep --epoch: one full epoch of the run named without the suffix

# The reference's header row, left to right, with English; its "offloard param" is spelled right here (NOTES say so).
REF_HEADERS = [
    ("模型", "model"),
    ("整体耗时/epoch", "epoch time"),
    ("单条样本耗时", "s/it"),
    (None, "s/sample"),
    ("内存使用量", "host RAM"),
    ("显存使用量", "GPU memory"),
    ("GPU型号和数量", "GPU model and count"),
    ("fp16", None),
    ("bf16", None),
    ("deepspeed stage", None),
    ("offload optimizer", None),
    ("pin memory", None),
    ("offload param", None),
    ("overlap comm", None),
    ("allgather bucket size", None),
    ("stage3 max live parameters", None),
]
# Settings the reference held fixed: a column each where the runs of one report differ in them.
SETTING_COLUMNS = (("seq_len", "seq len"), ("micro_batch", "micro batch"), ("grad_accum", "grad accum"))
EXTRA_HEADERS = ["tokens/s/GPU", "TFLOPS/GPU", "MFU", "GPU MiB pred / meas", "host MiB pred / meas", "ref row", "run"]
STATUS_LABEL = {"oom": "OOM", "cuda_error": "CUDA Error", "timeout": "Timeout", "error": "Error",
                "interrupted": "Interrupted", "killed": "Killed (signal 9)", "dead": "Dead", "running": "Running",
                "stalled?": "Stalled?", None: "No summary"}
UNFINISHED = ("running", "stalled?")  # no summary yet, processes not known to be gone (sftbench.liveness)
MODEL_LABEL = {"pangu-350m": "Pangu-350M", "pangu-2.6b": "Pangu-2.6B", "pangu-13b": "Pangu-13B",
               "pangu-tiny": "Pangu-tiny"}
META_DROP = ("argv", "env", "host", "pid", "device_uuid")  # bulky or machine-specific; the rest goes to summaries


def scrub(value):
    """Paths inside the repo made relative (results/ is committed: no machine-specific absolute paths)."""
    root = str(REPO) + os.sep
    if isinstance(value, str):
        return value.replace(root, "")
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


# ================================================================================================ collect

@dataclass
class Row:
    run: str
    run_dir: Path
    entry: dict
    meta: dict
    summary: dict | None
    rank_summaries: dict[int, dict]
    predicted: dict | None
    desc: dict
    order: int
    steps: dict[int, list[dict]] = field(default_factory=dict)
    fallback_gpu: str | None = None  # the sweep's GPU name, for runs that died before their meta record
    live_state: str | None = None    # no summary: running, stalled? or dead (sftbench.liveness), else None
    live_note: str | None = None     # what live_state means here, with the time of the last record
    rank_metas: dict[int, dict] = field(default_factory=dict)

    # ---- identity
    @property
    def model(self) -> str:
        return str(self.meta.get("model") or self.entry.get("model") or "?")

    @property
    def model_label(self) -> str:
        return MODEL_LABEL.get(self.model, Path(self.model).name)

    @property
    def accelerator(self) -> str:
        if self.entry.get("accelerator"):
            return self.entry["accelerator"]
        return "cpu" if str(self.meta.get("device", "")).startswith("cpu") else "cuda"

    @property
    def world(self) -> int:
        return int(self.meta.get("world_size") or (self.entry.get("num_gpus") or 1) * self.nodes)

    @property
    def nodes(self) -> int:
        """Nodes the run spanned: the launcher's count in the logs, else the plan entry's (1 on one machine)."""
        return int(nodes_mod.job_nodes(self.rank_metas) or self.entry.get("num_nodes") or 1)

    @property
    def precision(self) -> str | None:
        return self.meta.get("precision") or self.entry.get("precision")

    @property
    def config_name(self) -> str:
        p = self.meta.get("ds_config_path") if self.meta else self.entry.get("ds_config")
        return "none" if not p else Path(p).stem

    @property
    def device_name(self) -> str:
        if self.accelerator == "cpu":
            return "CPU"
        name = self.meta.get("device_name") or self.fallback_gpu or "GPU"
        return name.replace("NVIDIA ", "")

    @property
    def status(self) -> str | None:
        return self.summary.get("status") if self.summary else self.live_state

    @property
    def unmeasured(self) -> bool:
        """Finished ok, but every step was warm-up or an fp16 overflow step: no numbers, not a failure."""
        return self.status == "ok" and self.step_s is None

    @property
    def epoch_twin_of(self) -> str | None:
        """For a ``sweep --epoch`` run (``<run>__epoch``): the short run it measures an epoch for; else None."""
        return self.run[:-len(EPOCH_SUFFIX)] if self.run.endswith(EPOCH_SUFFIX) else None

    @property
    def compile(self) -> str:
        """The torch.compile target the run used ("off" for logs older than the field)."""
        return str(((self.meta or {}).get("optimizations") or {}).get("compile") or "off")

    @functools.cached_property
    def warnings(self) -> list[str]:
        """Engine defects of this run (``engine_checks``): the table names them, the recommendation skips the run."""
        return engine_checks.warnings_of(self.meta or {})

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.step_s is not None

    # ---- numbers
    @property
    def step_s(self) -> float | None:
        return (self.summary or {}).get("step_s_median")

    @property
    def micro_batch(self) -> int:
        return int(self.meta.get("micro_batch") or (self.desc.get("_cfg") or {}).get("train_micro_batch_size_per_gpu")
                   or 1)

    @property
    def seq_len(self) -> int | None:
        v = self.meta.get("seq_len") or self.entry.get("seq_len")
        return int(v) if v else None

    @property
    def settings(self) -> tuple:
        """What a step is made of besides the configuration: only runs alike in these are compared."""
        return (self.seq_len, self.micro_batch, self.grad_accum)

    @property
    def grad_accum(self) -> int:
        return int(self.meta.get("grad_accum") or (self.desc.get("_cfg") or {}).get("gradient_accumulation_steps")
                   or 1)

    @property
    def s_per_sample(self) -> float | None:
        s = self.step_s
        return s / (self.micro_batch * self.grad_accum * self.world) if s is not None else None

    def _per_rank(self, key_summary: str, key_step: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for r in set(self.rank_summaries) | set(self.steps):
            v = (self.rank_summaries.get(r) or {}).get(key_summary)
            if v is None:
                vals = [s.get(key_step) for s in self.steps.get(r, []) if s.get(key_step) is not None]
                v = max(vals) if vals else None
            if v is not None:
                out[r] = float(v)
        if not out and self.summary and self.summary.get(key_summary) is not None:
            out[0] = float(self.summary[key_summary])
        return out

    @property
    def gpu_mib(self) -> float | None:
        vals = self._per_rank("gpu_mem_used_mib_peak", "gpu_mem_used_mib")
        return max(vals.values()) if vals else None

    @staticmethod
    def _ranks_sum(vals: dict[int, float], expected: int) -> float:
        total = sum(vals.values())
        missing = expected - len(vals)
        if missing > 0:  # ranks that logged nothing: assume like the others
            total += missing * total / len(vals)
        return total

    @property
    def host_rss_all_mib(self) -> float | None:
        """Sum of every rank's peak RSS, over every node."""
        vals = self._per_rank("host_rss_mib_peak", "host_rss_mib")
        return self._ranks_sum(vals, self.world) if vals else None

    @property
    def host_rss_mib(self) -> float | None:
        """The host memory one machine must hold: the sum of every rank's peak RSS on one node; with several
        nodes, the largest node's sum (host RAM is a per-node figure)."""
        if self.nodes <= 1:
            return self.host_rss_all_mib
        vals = self._per_rank("host_rss_mib_peak", "host_rss_mib")
        per_node = []
        for ranks in nodes_mod.ranks_by_node(self.rank_metas).values():
            mine = {r: v for r, v in vals.items() if r in ranks}
            if mine:
                n_local = (self.rank_metas[ranks[0]].get("local_world_size") or len(ranks))
                per_node.append(self._ranks_sum(mine, int(n_local)))
        return max(per_node) if per_node else None

    @property
    def epoch(self) -> tuple[float | None, bool]:
        s = self.summary or {}
        if s.get("epoch_s_measured") is not None:
            return float(s["epoch_s_measured"]), False
        if s.get("epoch_s_est") is not None:
            return float(s["epoch_s_est"]), True
        return None, True

    @property
    def pred_gpu(self) -> float | None:
        return (self.predicted or {}).get("gpu_mib") if self.accelerator == "cuda" else None

    @property
    def pred_host(self) -> float | None:
        """Predicted host memory, as ``host_rss_mib`` measures it: one node's share on several nodes."""
        p = self.predicted or {}
        return p.get("host_mib_per_node", p.get("host_mib"))

    @property
    def group(self) -> tuple:
        return (self.model_label, self.device_name, self.world)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _config_from_entry(entry: dict) -> dict | None:
    p = entry.get("ds_config")
    if not p:
        return None
    path = Path(p) if os.path.isabs(p) else REPO / p
    cfg = _read_json(path)
    if cfg is None:
        return None
    try:
        return apply_precision(cfg, entry.get("precision"))
    except ValueError:
        return cfg


def _liveness(rr: runlog.RunRecords) -> tuple[str, str]:
    """(running / stalled? / dead, what that means) of a run without a summary: its pids on this host, its last
    record (the rule of ``sftbench.liveness``, as the monitor shows it)."""
    alive = liveness.rank_alive(rr.meta, socket.gethostname())
    times = [s.get("time") for steps in rr.steps.values() for s in steps[-1:]] + [m.get("time") for m in
                                                                                  rr.meta.values()]
    times = [t for t in times if isinstance(t, (int, float))]
    step_s = [s.get("step_s") for steps in rr.steps.values() for s in steps
              if isinstance(s.get("step_s"), (int, float))]
    last, slowest = (max(times) if times else None), (max(step_s) if step_s else None)
    state = liveness.classify(alive.values(), last, slowest)
    return state, liveness.describe(state, last, slowest, with_state=False)  # the label says the state


def collect(runs_dir: str | os.PathLike, node_dirs: Iterable[str | os.PathLike] = ()) -> tuple[list[Row], dict, dict]:
    """All runs under runs_dir (plan order where plan.json has them), plan.json and sweep_info.json.

    ``node_dirs``: the same sweep folder as other nodes of a multi-node sweep wrote it (copied back, where the
    nodes share no file system): each run also takes the rank files of its namesake folder in each of them."""
    root = Path(runs_dir)
    node_roots = [Path(d) for d in node_dirs]
    plan = _read_json(root / runlog.PLAN_FILE) or {}
    info = _read_json(root / runlog.SWEEP_INFO_FILE) or {}
    plan_entries = {e.get("run"): e for e in plan.get("entries", []) if isinstance(e, dict)}
    plan_order = {name: i for i, name in enumerate(plan_entries)}
    gpus = (info.get("hardware") or {}).get("gpus") or []
    fallback_gpu = gpus[0].get("name") if gpus and isinstance(gpus[0], dict) else None
    dirs = [d for d in runlog.iter_run_dirs(root)
            if not any(part.startswith(".") for part in d.relative_to(root).parts)]
    # plan entries that never produced a directory with logs are left out (not run yet)
    rows: list[Row] = []
    for d in dirs:
        rr = runlog.load_run(d, *[n / d.relative_to(root) for n in node_roots])
        entry = _read_json(d / runlog.PLAN_ENTRY_FILE) or plan_entries.get(d.name) or {}
        meta = rr.meta.get(0) or (rr.meta[min(rr.meta)] if rr.meta else {})
        summary = rr.final_summary()
        if summary is None and rr.summary:
            summary = rr.summary[min(rr.summary)]
        live_state = live_note = None
        if summary is None and rr.meta:  # no summary, not even the sweep's: is it still going?
            live_state, live_note = _liveness(rr)
        predicted = meta.get("predicted") if isinstance(meta.get("predicted"), dict) else None
        if predicted is None or "gpu_mib" not in predicted:
            p = _read_json(d / runlog.PREDICTED_FILE)
            predicted = p if p and "gpu_mib" in p else predicted
        cfg = meta.get("ds_config") if meta else _config_from_entry(entry)
        desc = describe(cfg)
        desc["_cfg"] = cfg
        rows.append(Row(run=d.name, run_dir=d, entry=entry, meta=meta, summary=summary,
                        rank_summaries=dict(rr.summary), predicted=predicted, desc=desc,
                        order=plan_order.get(d.name, 10 ** 6), steps=rr.steps, fallback_gpu=fallback_gpu,
                        live_state=live_state, live_note=live_note, rank_metas=dict(rr.meta)))
    # group by model and GPU, keep plan order inside (and across groups by first appearance)
    first: dict[tuple, int] = {}
    for r in sorted(rows, key=lambda r: (r.order, r.run)):
        first.setdefault(r.group, len(first))
    rows.sort(key=lambda r: (first[r.group], r.order, r.run))
    return rows, plan, info


def _tf(v) -> str:
    return "-" if v is None else ("true" if v else "false")


def config_cells(r: Row) -> list[str]:
    """fp16, bf16, deepspeed stage, offload optimizer, pin memory, offload param, overlap comm, allgather bucket
    size, stage3 max live parameters: as the reference filled them ('-' where a setting does not apply)."""
    prec = r.precision
    fp16, bf16 = _tf(prec == "fp16"), _tf(prec == "bf16")
    d = r.desc
    stage = d.get("zero_stage")
    if stage is None:
        return [fp16, bf16, "-", "-", "-", "-", "-", "-", "-"]
    if stage < 2:
        return [fp16, bf16, str(stage), "-", "-", "-", "-", "-", "-"]
    off = d.get("offload_optimizer") is not None
    pin = _tf(d.get("pin_memory")) if off else "-"
    offp = _tf(d.get("offload_param") is not None) if stage == 3 else "-"
    live = fmt_e(d.get("stage3_max_live_parameters")) if stage == 3 else "-"
    return [fp16, bf16, str(stage), _tf(off), pin, offp, _tf(bool(d.get("overlap_comm"))),
            fmt_e(d.get("allgather_bucket_size")), live]


def gpu_cell(r: Row) -> str:
    if r.accelerator == "cpu":
        return f"{r.world}*CPU"
    return f"{r.world}*{r.device_name}"


def mem_cell(r: Row) -> str:
    if r.accelerator == "cpu":
        return "-"
    v = r.gpu_mib
    return f"{r.world}*{v:.0f}MB" if v is not None else "-"


def pred_meas(pred: float | None, meas: float | None) -> str:
    if pred is None and meas is None:
        return "-"
    return f"{fmt_num(pred)} / {fmt_num(meas)}"


@dataclass
class Table:
    rows: list[list[str]]
    groups: list[int]  # rows per group (for rowspan)
    footnotes: list[str]  # failures, numbered: the GPU-memory cell says "OOM [n]"
    any_estimated: bool
    any_compiled: bool = False
    remarks: list[str] = field(default_factory=list)  # per-run notes (fp16 overflow steps left out)
    settings: list[tuple[str, str]] = field(default_factory=list)  # SETTING_COLUMNS that vary: columns of their own
    unmeasured: list[str] = field(default_factory=list)  # ok runs without a measured step (not failures)
    unfinished: list[str] = field(default_factory=list)  # running / stalled? runs (no summary yet)

    @property
    def notes(self) -> list[str]:
        return [n for n in NOTES if self.any_compiled or not n.startswith(COMPILED_NOTE)] + self.remarks


def ref_rows(r: "Row") -> list[int]:
    """The reference rows this run compares with, by the one rule in ``reference.reference_rows`` (applied now, so
    older sweep folders follow it too); the plan entry's own list where the map cannot be read."""
    if r.accelerator == "cpu":
        return []  # the reference measured GPUs only
    try:
        ref = _reference_map()
    except (OSError, ValueError):
        return list(r.entry.get("ref_rows") or [])
    return reference.reference_rows(ref, Path(r.model).name, r.config_name, r.precision, r.world)


@functools.lru_cache(maxsize=1)
def _reference_map():
    return reference.read_reference_map()


def varying_settings(rows: list[Row]) -> list[tuple[str, str]]:
    """The SETTING_COLUMNS whose value differs between the rows."""
    return [(k, h) for k, h in SETTING_COLUMNS if len({getattr(r, k) for r in rows}) > 1]


def build_table(rows: list[Row]) -> Table:
    out, foot, groups, remarks, unmeasured, unfinished = [], [], [], [], [], []
    settings = varying_settings(rows)
    any_est = False
    cur = None
    for r in rows:
        if r.group != cur:
            groups.append(0)
            cur = r.group
        groups[-1] += 1
        cfg = config_cells(r) + ["-" if getattr(r, k) is None else str(getattr(r, k)) for k, _ in settings]
        extra_tail = [",".join(str(x) for x in ref_rows(r)) or "-", r.run]
        for w in r.warnings:
            remarks.append(f"`{r.run}`: warning: {w}")
        if (r.summary or {}).get("eval_loss") is not None:  # a fine-tuning run with --eval-data / --eval-split
            remarks.append(f"`{r.run}`: eval loss {r.summary['eval_loss']:.4f} at its last evaluation")
        if r.nodes > 1:
            seen = len(nodes_mod.ranks_by_node(r.rank_metas))
            remarks.append(f"`{r.run}`: {r.nodes} nodes; host RAM is the largest node's (the peak RSS of its ranks "
                           f"summed), GPU memory per rank; logs of {seen} of the {r.nodes} nodes read"
                           + ("" if seen >= r.nodes else " (the others: give their folders with --node-dir)"))
        skipped = (r.summary or {}).get("skipped_steps") or 0
        if r.ok and skipped:
            remarks.append(f"`{r.run}`: {skipped} fp16 overflow step(s) skipped the optimizer update while "
                           "DeepSpeed's loss scale came down; like warm-up they are left out, "
                           f"{(r.summary or {}).get('measured_steps')} step(s) measured.")
        if r.ok:
            ep, est = r.epoch
            any_est = any_est or (est and ep is not None)
            epoch = ("~" if est and ep is not None else "") + fmt_duration(ep)
            host = r.host_rss_mib
            mfu = (r.summary or {}).get("mfu_pct")
            step = fmt_step(r.step_s) + ("" if r.compile == "off" else f" (compiled: {r.compile})")
            cells = [r.model_label, epoch, step, fmt_num(r.s_per_sample, 3, "s"),
                     f"{host / 1024:.1f}G" if host is not None else "-", mem_cell(r), gpu_cell(r), *cfg,
                     fmt_num((r.summary or {}).get("tokens_per_s_per_gpu")),
                     fmt_sig((r.summary or {}).get("tflops")), fmt_num(mfu, 1, "%") if mfu is not None else "-",
                     pred_meas(r.pred_gpu, r.gpu_mib if r.accelerator == "cuda" else None),
                     pred_meas(r.pred_host, r.host_rss_mib), *extra_tail]
        else:
            label = STATUS_LABEL.get(r.status, str(r.status))
            if r.unmeasured:  # finished as asked, only too short for numbers: said so, not filed as a failure
                label = "no measured step"
                unmeasured.append(scrub(f"`{r.run}`: {_why_unmeasured(r)}"))
                cell = label
            elif r.status in UNFINISHED:
                unfinished.append(scrub(f"`{r.run}`: {label}: {r.live_note}"))
                cell = label
            else:
                err = (r.summary or {}).get("error") or r.live_note or (
                    "the run left no summary (still running, or killed before the sweep could record it)"
                    if not r.summary else "")
                synth = " (recorded by the sweep)" if (r.summary or {}).get("synthesized") else ""
                foot.append(scrub(f"{r.run}: {label}{synth}: {err}".rstrip(": ")))
                cell = f"{label} [{len(foot)}]"
            cells = [r.model_label, "-", "-", "-", "-", cell, gpu_cell(r), *cfg, "-", "-", "-",
                     pred_meas(r.pred_gpu, None), pred_meas(r.pred_host, None), *extra_tail]
        out.append(cells)
    return Table(out, groups, foot, any_est, any(r.ok and r.compile != "off" for r in rows), remarks, settings,
                 unmeasured, unfinished)


def _why_unmeasured(r: Row) -> str:
    """Why an ok run has no measured step, from its own step records (the causes that apply, as train.py says)."""
    rank = 0 if 0 in r.steps else (min(r.steps) if r.steps else None)
    if rank is not None and r.steps[rank]:
        st = StepStats(int(r.meta.get("warmup_steps") or 0))
        for rec in r.steps[rank]:
            st.add({**rec, "warmup": bool(rec.get("warmup"))})
        return st.no_statistics_reason()
    s = r.summary or {}
    return (f"no measured step: {s.get('steps')} step(s), {s.get('skipped_steps') or 0} of them fp16 overflow steps, "
            f"warm-up {r.meta.get('warmup_steps', '?')}; run more steps")


def _cpu_text(hw: dict) -> str:
    return (str(hw.get("cpu_model") or "unknown CPU")
            + (f", {hw['cpu_count']} logical cores" if hw.get("cpu_count") else "")
            + (f", {hw['host_mem_mib'] / 1024:.0f} GiB host memory" if hw.get("host_mem_mib") else ""))


def hardware_lines(rows: list[Row], info: dict) -> list[str]:
    lines = []
    cpu_runs = [r for r in rows if r.accelerator == "cpu"]
    gpu_runs = [r for r in rows if r.accelerator == "cuda"]
    if gpu_runs:
        seen = sorted({(r.device_name, r.world) for r in gpu_runs})
        lines.append("GPU: " + "; ".join(f"{n} × {name}" for name, n in seen)
                     + " (device name and world size from the runs' meta records)")
    if cpu_runs:
        ranks = sorted({r.world for r in cpu_runs})
        lines.append(f"**Ran on CPU** (DS_ACCELERATOR=cpu, {'/'.join(map(str, ranks))} ranks over gloo): these "
                     "numbers show the pipeline working; they say nothing about GPU speed or GPU memory.")
    hw = info.get("hardware") or {}
    cmds = [c for c in info.get("commands") or [] if isinstance(c, dict) and c.get("command")]
    hosts: list[str] = []  # the machines the commands ran on, in order (entries before host tags have none)
    for c in cmds:
        if c.get("host") and c["host"] not in hosts:
            hosts.append(c["host"])
    label = {h: f"host {chr(ord('A') + i)}" if i < 26 else f"host {h}" for i, h in enumerate(hosts)}
    cpu = hw.get("cpu_model")
    # Commands from before the sweep recorded its machine may have run elsewhere: the top-level hardware is the
    # latest command's, so it only stands for the whole folder when every command is of that one machine.
    untagged = hosts and any(not c.get("host") for c in cmds)
    per_host = len(hosts) > 1 or untagged
    if per_host:  # one folder filled on several machines: each one's CPU, from its first command
        for h in hosts:
            c = next(c for c in cmds if c.get("host") == h)
            lines.append(f"CPU ({label[h]}): {_cpu_text(c)} (recorded by the sweep)")
        if untagged:
            lines.append("CPU of the commands without a host: not recorded (they predate the sweep's machine record)")
    elif cpu:
        lines.append(f"CPU: {_cpu_text(hw)} (recorded by the sweep)")
    else:
        lines.append(f"CPU: {cpu_model()} ({platform.platform()}; read when this report was written, "
                     "not recorded by the runs)")
    metas = [r.meta for r in rows if r.meta.get("versions")]
    if metas:
        v: dict = {}
        for m in metas:  # --ds none runs have no deepspeed version: take each key from the first run that has it
            for k, val in m["versions"].items():
                if val and k not in v:
                    v[k] = val
        lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
        commits = sorted({m["git_commit"] for m in metas
                          if re.fullmatch(r"[0-9a-f]{7,40}", str(m.get("git_commit") or ""))})
        if commits:
            lines.append("Harness commit: " + ", ".join(c[:12] for c in commits))
    distinct: list[dict] = []
    for c in cmds:  # the same command resumed again and again on the same GPUs of one machine is one line
        if not any(d["command"] == c["command"] and d.get("gpus") == c.get("gpus") and d.get("host") == c.get("host")
                   for d in distinct):
            distinct.append(c)
    if len(distinct) > 1:  # e.g. two sweeps sharing one host, or batches resumed with other filters
        for i, c in enumerate(distinct, 1):
            where = [label[c["host"]]] if per_host and c.get("host") in label else []
            if c.get("gpus"):
                where.append("GPUs " + ",".join(str(g) for g in c["gpus"]))
            if c.get("cores"):
                where.append(f"{c['cores']} cores")
            lines.append(f"Command {i} of {len(distinct)}" + (f" ({'; '.join(where)})" if where else "")
                         + f": `{scrub(c['command'])}`")
    elif info.get("command"):
        lines.append(f"Command: `{scrub(info['command'])}`")
    first = next((r for r in rows if r.meta.get("argv")), None)
    if first is not None:
        args = [scrub(str(a)) for a in first.meta["argv"][1:] if not str(a).startswith("--local_rank")]
        # a run on several nodes was launched from a hostfile, N ranks on each node
        launcher = "deepspeed --hostfile H --num_nodes M --num_gpus N" if first.nodes > 1 else "deepspeed --num_gpus N"
        lines.append(f"Each run: `{launcher} train.py " + " ".join(args) + "` (first run shown)")
    return lines


def epoch_checks(rows: list[Row]) -> list[str]:
    """For every full-epoch run (``sweep --epoch``): the short run's estimate against the measured epoch."""
    by_run = {r.run: r for r in rows}
    out = []
    for r in rows:
        if r.epoch_twin_of is None:
            continue
        measured = (r.summary or {}).get("epoch_s_measured")
        what = f"`{r.epoch_twin_of}`"
        if not r.ok or measured is None:
            out.append(f"{what}: the full-epoch run did not finish ({r.status or 'no summary'}); nothing to compare.")
            continue
        own = (r.summary or {}).get("epoch_s_est")
        line = (f"{what}: one full epoch ({(r.summary or {}).get('steps_per_epoch')} steps) took "
                f"**{fmt_duration(measured)}** ({measured:.0f} s)")
        short = by_run.get(r.epoch_twin_of)
        s_est = (short.summary or {}).get("epoch_s_est") if short is not None and short.ok else None
        if s_est is not None:
            n = (short.summary or {}).get("measured_steps")
            line += (f"; the short run estimated ~{fmt_duration(s_est)} ({s_est:.0f} s, from {n} measured steps): "
                     f"**{(s_est / measured - 1) * 100:+.1f}%**")
        else:
            line += "; no finished short run of the same name to compare with"
        if own is not None:
            line += (f"; the epoch run's own median step × steps gives {own:.0f} s "
                     f"({(own / measured - 1) * 100:+.1f}%: warm-up and drift)")
        out.append(line + ".")
    return out


def recommendations(rows: list[Row]) -> list[str]:
    """Per model, GPU count and step settings (sequence length, micro batch, gradient accumulation: only like is
    compared with like): the fastest configuration that ran, and the one with the least GPU memory. Runs with an
    engine warning (``engine_checks``: the model does not learn) are not recommended."""
    out = []
    groups: dict[tuple, list[Row]] = {}
    vary = varying_settings(rows)
    for r in rows:
        if r.epoch_twin_of is not None:  # the same configuration again, run longer
            continue
        groups.setdefault(r.group + r.settings, []).append(r)
    for (label, dev, world, seq, mb, ga), rs in groups.items():
        ok = [r for r in rs if r.ok and not r.warnings]
        where = f"{label} on {world} × {dev}" if dev != "CPU" else f"{label} on CPU ({world} ranks)"
        if vary:  # the folder holds runs of other settings too: name this group's
            where += ", " + ", ".join(f"{h} {v}" for (k, h), v in zip(SETTING_COLUMNS, (seq, mb, ga))
                                      if k in dict(vary))
        if not ok:
            flagged = any(r.ok for r in rs)
            if not flagged and any(r.unmeasured for r in rs):
                out.append(f"**{where}**: no configuration has a measured step (see \"No measured step\").")
                continue
            out.append(f"**{where}**: no configuration finished" + (" that trains (see the warnings above)." if flagged
                                                                    else "."))
            continue
        fast = min(ok, key=lambda r: r.s_per_sample)
        if dev == "CPU":
            lean = min((r for r in ok if r.host_rss_mib is not None), key=lambda r: r.host_rss_mib, default=None)
            mem_of = lambda r: f"{r.host_rss_mib / 1024:.1f} GiB host RSS"  # noqa: E731
            what = "least host memory"
        else:
            lean = min((r for r in ok if r.gpu_mib is not None), key=lambda r: r.gpu_mib, default=None)
            mem_of = lambda r: f"{r.gpu_mib:.0f} MiB per GPU"  # noqa: E731
            what = "least GPU memory"

        def desc(r: Row) -> str:
            ep, est = r.epoch
            mem = mem_of(r) if (r.gpu_mib is not None or dev == "CPU") and (
                r.host_rss_mib is not None or dev != "CPU") else "memory not measured"
            return (f"`{r.config_name}` {r.precision} ({fmt_step(r.step_s)}, {r.s_per_sample:.3f} s/sample, "
                    f"{'~' if est else ''}{fmt_duration(ep)}/epoch, {mem})")

        line = f"**{where}**: fastest {desc(fast)}"
        if lean is not None:
            line += f"; {what}: {desc(lean)}" if lean is not fast else f"; it also uses the {what}"
        out.append(line + ".")
    return out


# ================================================================================================ writers

def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_headers(settings: list[tuple[str, str]] = ()) -> list[str]:
    hs = []
    for zh, en in REF_HEADERS:
        if zh and en:
            hs.append(f"{zh} ({en})")
        else:
            hs.append(zh or en)
    return hs + [h for _, h in settings] + EXTRA_HEADERS


def html_headers(settings: list[tuple[str, str]] = ()) -> list[str]:
    hs = []
    for zh, en in REF_HEADERS:
        if zh and en:
            hs.append(f"{html.escape(zh)}<br><small>{html.escape(en)}</small>")
        else:
            hs.append(html.escape(zh or en))
    return hs + [html.escape(h) for _, h in settings] + [html.escape(h) for h in EXTRA_HEADERS]


COMPILED_NOTE = "`(compiled: model)`"
NOTES = [
    "`~` = estimated epoch time: steps per epoch × median step time (`epoch_s_est`); without `~` it was measured "
    "over a full epoch (`epoch_s_measured`).",
    "单条样本耗时 is seconds per optimizer step (s/it), as the reference measured it; `s/sample` divides it by the "
    "samples in one step (micro batch × gradient accumulation × GPUs).",
    "内存使用量: sum over ranks of each process's peak RSS (several nodes: the largest node's sum). 显存使用量: `N*` "
    "peak NVML used memory of each GPU in MiB (what nvidia-smi shows), the largest over the ranks.",
    "Predicted memory: `sftbench/memory.py` before the run (DeepSpeed's ZeRO formulas plus buffers, activations, "
    "logits and CUDA context); measured: the NVML peak per GPU and the summed RSS.",
    COMPILED_NOTE + " after s/it: the run used torch.compile (`train.py --compile`, by default on for bf16 ZeRO-1 on a "
    "GPU, where it was measured faster); every other row ran eager.",
    "offload param: the reference's header spells it \"offloard param\".",
    "ref row: the row of the reference table (`ds_configs/README.md`) with the same model, config and GPU count, "
    "of the same precision where it has one; otherwise of its precision (the reference's 3-GPU rows are fp16 on "
    "V100), so compare the fp16/bf16 columns too.",
]


def write_md(path: Path, title: str, table: Table, hw: list[str], recs: list[str], n_runs: int,
             checks: list[str] | None = None) -> None:
    hs = md_headers(table.settings)
    lines = [f"# {title}", ""]
    lines += [f"- {h}" for h in hw]
    lines += ["", f"{n_runs} runs.", "", "| " + " | ".join(hs) + " |", "|" + "---|" * len(hs)]
    i = 0
    for g in table.groups:
        for k in range(g):
            cells = list(table.rows[i])
            if k > 0:
                cells[0] = ""  # the model once per group, as the reference's rowspan
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
            i += 1
    lines += [""] + [f"- {x}" for x in table.notes]
    if table.footnotes:
        lines += ["", "**Failures**", ""]
        lines += [f"{n}. {_md_escape(f)}" for n, f in enumerate(table.footnotes, 1)]
    if table.unmeasured:
        lines += ["", "**No measured step** (finished, but too short for statistics; not failures)", ""]
        lines += [f"- {_md_escape(f)}" for f in table.unmeasured]
    if table.unfinished:
        lines += ["", "**Not finished** (no summary yet)", ""] + [f"- {_md_escape(f)}" for f in table.unfinished]
    if checks:
        lines += ["", "## Epoch check", ""] + [f"- {c}" for c in checks]
    lines += ["", "## Recommendation", ""] + [f"- {r}" for r in recs]
    lines += ["", "![step time vs memory](results.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_html(path: Path, title: str, table: Table, hw: list[str], recs: list[str], n_runs: int,
               checks: list[str] | None = None) -> None:
    def inline(s: str) -> str:
        s = html.escape(s)
        # `code` and **bold** from the Markdown strings
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #bbb;padding:3px 6px;text-align:center}thead td{background:#eee;font-weight:bold}"
           "td.fail{color:#b00;font-weight:bold}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", "<ul>"] + [f"<li>{inline(h)}</li>" for h in hw] + [
        "</ul>", f"<p>{n_runs} runs.</p>", "<table>", "    <thead>",
        "        <tr> " + " ".join(f"<td>{h}</td>" for h in html_headers(table.settings)) + " </tr>", "    </thead>",
        "   <tbody>"]
    i = 0
    for g in table.groups:
        for k in range(g):
            cells = table.rows[i]
            tds = []
            for j, c in enumerate(cells):
                if j == 0:
                    if k == 0:
                        tds.append(f"<td rowspan=\"{g}\">{html.escape(c)}</td>")
                    continue
                cls = " class=\"fail\"" if j == 5 and "[" in c else ""
                tds.append(f"<td{cls}>{html.escape(c)}</td>")
            out.append("       <tr> " + " ".join(tds) + " </tr>")
            i += 1
    out += ["    </tbody>", "</table>", "<p>" + "<br>".join(inline(n) for n in table.notes) + "</p>"]
    if table.footnotes:
        out += ["<h3>Failures</h3>", "<ol>"] + [f"<li>{html.escape(f)}</li>" for f in table.footnotes] + ["</ol>"]
    if table.unmeasured:
        out += ["<h3>No measured step</h3>", "<ul>"] + [f"<li>{inline(f)}</li>" for f in table.unmeasured] + ["</ul>"]
    if table.unfinished:
        out += ["<h3>Not finished</h3>", "<ul>"] + [f"<li>{inline(f)}</li>" for f in table.unfinished] + ["</ul>"]
    if checks:
        out += ["<h2>Epoch check</h2>", "<ul>"] + [f"<li>{inline(c)}</li>" for c in checks] + ["</ul>"]
    out += ["<h2>Recommendation</h2>", "<ul>"] + [f"<li>{inline(r)}</li>" for r in recs] + ["</ul>"]
    out += ["<img src=\"results.png\" alt=\"step time vs memory\" style=\"max-width:100%\">", "</body></html>", ""]
    path.write_text("\n".join(out), encoding="utf-8")


CONFIG_COLUMNS = ("zero_stage", "offload_optimizer", "offload_param", "pin_memory", "overlap_comm",
                  "allgather_bucket_size", "reduce_bucket_size", "stage3_max_live_parameters", "contiguous_gradients")
PLAN_COLUMNS = ("run", "model", "ds_config", "precision", "num_gpus", "num_nodes", "max_steps", "warmup_steps",
                "accelerator", "data", "seq_len", "extra_args", "ref_rows")
META_COLUMNS = ("device_name", "world_size", "micro_batch", "grad_accum", "seq_len", "n_params", "flops_per_token",
                "peak_tflops", "dataset_samples", "real_tokens", "pad_tokens")
DERIVED_COLUMNS = ("config", "compile", "s_per_sample", "gpu_mem_used_mib_max_over_ranks",
                   "host_rss_mib_sum_over_ranks", "host_rss_mib_max_over_nodes", "predicted_gpu_mib",
                   "predicted_host_mib", "predicted_host_mib_per_node", "predicted_fits")


def csv_columns() -> list[str]:
    summ = [k for k in runlog.SUMMARY_KEYS if k != "type"]
    cols = list(PLAN_COLUMNS) + list(DERIVED_COLUMNS) + [f"meta_{k}" for k in META_COLUMNS] + list(CONFIG_COLUMNS)
    return cols + [k for k in summ if k not in cols]


def write_csv(path: Path, rows: list[Row]) -> None:
    cols = csv_columns()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d: dict = {}
            for k in PLAN_COLUMNS:
                v = r.entry.get(k)
                d[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
            d["run"] = r.run
            d["model"] = d.get("model") or r.model
            d["precision"] = d.get("precision") or r.precision
            d["config"] = r.config_name
            d["compile"] = r.compile
            d["s_per_sample"] = r.s_per_sample
            d["gpu_mem_used_mib_max_over_ranks"] = r.gpu_mib
            d["num_nodes"] = r.nodes
            d["host_rss_mib_sum_over_ranks"] = r.host_rss_all_mib
            d["host_rss_mib_max_over_nodes"] = r.host_rss_mib
            d["predicted_gpu_mib"] = (r.predicted or {}).get("gpu_mib")
            d["predicted_host_mib"] = (r.predicted or {}).get("host_mib")
            d["predicted_host_mib_per_node"] = (r.predicted or {}).get("host_mib_per_node", d["predicted_host_mib"])
            d["predicted_fits"] = (r.predicted or {}).get("fits")
            for k in META_COLUMNS:
                d[f"meta_{k}"] = r.meta.get(k)
            for k in CONFIG_COLUMNS:
                d[k] = r.desc.get(k)
            for k in runlog.SUMMARY_KEYS:
                if k != "type":
                    d[k] = (r.summary or {}).get(k)
            w.writerow({k: scrub(v) for k, v in d.items()})


def write_summaries(path: Path, rows: list[Row]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            if r.meta:
                meta = scrub({k: v for k, v in r.meta.items() if k not in META_DROP})
                meta["run"] = r.run
                f.write(json.dumps(meta, ensure_ascii=False, default=str) + "\n")
            sums = dict(r.rank_summaries)
            if r.summary is not None and (not sums or r.summary.get("synthesized")):
                sums = {**sums, (-1 if sums else 0): r.summary}
            for rank, s in sorted(sums.items()):
                rec = scrub(dict(s))
                rec["run"] = r.run
                rec["rank"] = rank if rank >= 0 else None
                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")


def pareto(points: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """Points not dominated in (x, y), both lower-is-better, sorted by x."""
    front = []
    best_y = math.inf
    for x, y, tag in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best_y:
            front.append((x, y, tag))
            best_y = y
    return front


def write_png(path: Path, rows: list[Row]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = []
    for r in rows:
        if r.model_label not in models:
            models.append(r.model_label)
    models = models or ["(no runs)"]
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 5.5), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for ax, label in zip(axes[0], models):
        rs = [r for r in rows if r.model_label == label]
        cpu = bool(rs) and all(r.accelerator == "cpu" for r in rs)
        xname = "host RSS, all ranks (MiB)" if cpu else "GPU memory per rank, NVML peak (MiB)"

        def xval(r: Row) -> float | None:
            return r.host_rss_mib if cpu else r.gpu_mib

        worlds = sorted({r.world for r in rs})
        pts_all = []
        for wi, w in enumerate(worlds):
            pts = [(xval(r), r.step_s, r) for r in rs if r.ok and r.world == w and xval(r) is not None]
            pts_all += pts
            if not pts:
                continue
            c = colors[wi % len(colors)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, zorder=3,
                       label=f"{w} {'rank' if cpu else 'GPU'}{'s' if w > 1 else ''}")
            for x, y, r in pts:
                ax.annotate(f"{r.config_name} {r.precision}", (x, y), fontsize=6.5, xytext=(3, 3),
                            textcoords="offset points")
            front = pareto(pts)
            if len(front) > 0:
                xs, ys = [p[0] for p in front], [p[1] for p in front]
                ax.step(xs, ys, where="post", color=c, alpha=0.6, linestyle="--", zorder=2,
                        label=f"Pareto front ({w})")
        fails = [r for r in rs if not r.ok]
        ys = [p[1] for p in pts_all]
        if ys and max(ys) / max(min(ys), 1e-9) > 20:
            ax.set_yscale("log")
        if fails:
            log = ax.get_yscale() == "log"
            top = (max(ys) * (2.5 if log else 1.2)) if ys else 1.0
            xs_known = [xval(r) or (r.pred_host if cpu else r.pred_gpu) for r in fails]
            span = [x for x, _, _ in pts_all] + [x for x in xs_known if x is not None] or [1.0]
            lo, hi = min(span), max(span)
            for k, (r, x) in enumerate(zip(fails, xs_known)):
                if x is None:  # no prediction either: spread along the band
                    x = lo + (hi - lo) * (k + 1) / (len(fails) + 1)
                ax.scatter([x], [top], marker="x", color="tab:red", zorder=4)
                ax.annotate(f"{r.config_name} {r.precision}: {STATUS_LABEL.get(r.status, r.status)}", (x, top),
                            fontsize=6, rotation=35, xytext=(2, 5), textcoords="offset points", color="tab:red",
                            annotation_clip=False)
            ax.axhline(top, color="tab:red", alpha=0.15, linewidth=10)
            ax.text(0.01, 0.995, "failed runs (x at their predicted memory)", transform=ax.transAxes, fontsize=7,
                    color="tab:red", va="top")
            ax.set_ylim(top=top * (3 if log else 1.25))
            if not log:
                ax.set_ylim(bottom=0)
        ax.set_xlabel(xname)
        ax.set_ylabel("median step time (s/it)")
        ax.set_title(f"{label}" + (" — CPU run" if cpu else ""))
        ax.grid(True, alpha=0.3)
        if pts_all:
            ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ================================================================================================ main

def make_report(runs_dir: str | os.PathLike, out_dir: str | os.PathLike, title: str | None = None,
                node_dirs: Iterable[str | os.PathLike] = ()) -> dict:
    rows, plan, info = collect(runs_dir, node_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = plan.get("sweep") or Path(runs_dir).resolve().name
    title = title or f"sftbench results: {name}"
    if rows and all(r.accelerator == "cpu" for r in rows):
        title += " (CPU run)"
    table = build_table(rows)
    hw = hardware_lines(rows, info)
    hw.append(f"Report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(rows)} run directories.")
    have = {r.run for r in rows}
    missing = [e.get("run") for e in plan.get("entries", []) if isinstance(e, dict) and e.get("run") not in have]
    if missing:  # a sweep cut into batches: say what the table does not have yet, by name
        hw.append(f"Planned but not run yet ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing) + ".")
    recs = recommendations(rows)
    checks = epoch_checks(rows)
    write_md(out / "results.md", title, table, hw, recs, len(rows), checks)
    write_html(out / "results.html", title, table, hw, recs, len(rows), checks)
    write_csv(out / "results.csv", rows)
    write_summaries(out / "summaries.jsonl", rows)
    write_png(out / "results.png", [r for r in rows if r.epoch_twin_of is None])  # no twin points
    return {"rows": len(rows), "failures": len(table.footnotes), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sftbench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_dir", help="a sweep's run folder (runs/<sweep>) or any folder holding run directories")
    ap.add_argument("--out", default=None, help="output folder (default results/<name of runs_dir>)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--node-dir", action="append", default=[], metavar="DIR",
                    help="the same sweep folder as another node wrote it (a multi-node sweep without a shared file "
                         "system, copied back); repeat per node")
    a = ap.parse_args(argv)
    for d in [a.runs_dir, *a.node_dir]:
        if not Path(d).exists():
            print(f"report: error: {d} does not exist", file=sys.stderr)
            return 2
        if not Path(d).is_dir():
            print(f"report: error: {d} is not a directory", file=sys.stderr)
            return 2
        try:
            os.listdir(d)
        except OSError as e:
            print(f"report: error: cannot read {d}: {e.strerror}", file=sys.stderr)
            return 2
    if next(runlog.iter_run_dirs(a.runs_dir), None) is None:
        print(f"report: error: {a.runs_dir} holds no run directories (no rank<k>.jsonl or summary.json beneath it); "
              "nothing written", file=sys.stderr)
        return 2
    out = a.out or str(REPO / "results" / Path(a.runs_dir).resolve().name)
    res = make_report(a.runs_dir, out, a.title, a.node_dir)
    print(f"report: {res['rows']} runs ({res['failures']} failed) -> {res['out']}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
