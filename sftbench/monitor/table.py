"""The sweep / results table: one ``EntryState`` per run directory, combined from its plan entry, a cheap probe of
the directory (``tail.probe_run``) and, for the run being followed, its live ``state.RunState``; its status, sort
orders, rows and JSON. Pure, like ``state``: no I/O, no Textual, no torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from sftbench import liveness
from sftbench.fmt import as_number, fmt_float, fmt_int, fmt_mib

from .state import STATUS_LABELS, STATUS_STYLES, Cell, RunState

# --------------------------------------------------------------------------------------------------------------
# sweep / results tables

@dataclass
class EntryState:
    key: str                       # run dir as string (row key)
    run: str
    run_dir: Path
    order: int                     # position in plan.json / discovery order
    model: str | None = None
    ds_config: str | None = None
    precision: str | None = None
    num_gpus: int | None = None
    max_steps: int | None = None
    status: str = "queued"         # label: done / running / queued / OOM / CUDA error / timeout / error / ...
    step: int | None = None
    median_s: float | None = None
    peak_gpu_mib: float | None = None
    host_mib: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    mtime: float = 0.0


def entry_status(exists: bool, n_rank_files: int, summary: Mapping[str, Any] | None,
                 live_state: str | None = None) -> str:
    """queued: no run dir yet; no summary: ``live_state`` (``sftbench.liveness``: running, stalled? or dead; running
    when not known); else the summary's."""
    if summary is not None:
        s = str(summary.get("status") or "error")
        return STATUS_LABELS.get(s, s)
    if exists:
        return live_state or "running"
    return "queued"


def probe_liveness(probe: Any, local_host: str | None, check=liveness.pid_alive, now: float | None = None
                   ) -> str | None:
    """running / stalled? / dead of a probed run without a summary, from rank 0's meta (pid, host) and last step."""
    if probe is None or probe.meta0 is None:
        return None
    alive = liveness.rank_alive({0: probe.meta0}, local_host, check)
    last = probe.last_step0 or {}
    t = as_number(last.get("time")) if last else None
    if t is None:
        t = as_number(probe.meta0.get("time"))
    return liveness.classify(alive.values(), t, as_number(last.get("step_s")) if last else None, now)


def make_entry(key: str, order: int, run_dir: Path, plan_entry: Mapping[str, Any] | None, probe: Any,
               live: RunState | None = None, live_state: str | None = None) -> EntryState:
    """Combine a plan entry, a cheap probe of the run dir and (when it is the run being followed) its live state.
    ``live_state``: the probed run's liveness (``probe_liveness``) when it has no summary."""
    pe = plan_entry or {}
    meta = (probe.meta0 if probe is not None else None) or {}
    if live is not None and live.meta:
        meta = live.meta
    ds = pe.get("ds_config") if "ds_config" in pe else meta.get("ds_config_path")
    e = EntryState(
        key=key, run=str(pe.get("run") or run_dir.name), run_dir=run_dir, order=order,
        model=pe.get("model") or meta.get("model"),
        ds_config=os.path.basename(ds) if isinstance(ds, str) and ds else ("none" if (pe or meta) else None),
        precision=pe.get("precision") or meta.get("precision"),
        # the job's GPUs: a plan entry's num_gpus is per node
        num_gpus=(pe["num_gpus"] * (pe.get("num_nodes") or 1) if pe.get("num_gpus") is not None
                  else meta.get("world_size")),
        max_steps=pe.get("max_steps") if pe.get("max_steps") is not None else meta.get("max_steps"),
    )
    summary = None
    if probe is not None:
        summary = probe.summaries.get(0) or probe.synth
        e.mtime = probe.mtime
    if live is not None and live.final_summary() is not None:
        summary = live.final_summary()
    exists = bool(probe is not None and probe.exists) or bool(live is not None and live.exists)
    nfiles = probe.n_rank_files if probe is not None else 0
    if live is not None:
        nfiles = max(nfiles, len(live.ranks))
    if live is not None and live.has_logs and summary is None:
        live_state = live.status()
    e.status = entry_status(exists, nfiles, summary, live_state)
    if probe is not None:
        if probe.last_step0 is not None:
            e.step = probe.last_step0.get("step")
        e.peak_gpu_mib = probe.peaks.get("gpu_mem_used_mib")
        e.host_mib = probe.peaks.get("host_used_mib")
        if e.host_mib is None:
            e.host_mib = probe.peaks.get("host_rss_mib")
    if live is not None and live.ranks:
        h = live.header()
        e.step = h["step"] if h["step"] is not None else e.step
        e.median_s = h["s_it_median"]
        e.tokens_per_s = h["tokens_per_s"]
        peaks = [rs.peaks.get("gpu_mem_used_mib") for rs in live.ranks.values()]
        peaks = [p for p in peaks if p is not None]
        if peaks:
            e.peak_gpu_mib = max(peaks)
        hosts = [rs.peaks.get("host_used_mib") for rs in live.ranks.values()]
        hosts = [p for p in hosts if p is not None]
        if hosts:
            e.host_mib = max(hosts)
    if summary is not None:
        e.error = summary.get("error")
        if as_number(summary.get("step_s_median")) is not None:
            e.median_s = as_number(summary["step_s_median"])
        if as_number(summary.get("tokens_per_s")) is not None:
            e.tokens_per_s = as_number(summary["tokens_per_s"])
        if e.step is None and isinstance(summary.get("steps"), int):
            e.step = summary["steps"]
        for k_e, k_s in (("peak_gpu_mib", "gpu_mem_used_mib_peak"), ("host_mib", "host_used_mib_peak")):
            v = as_number(summary.get(k_s))
            if v is not None and (getattr(e, k_e) is None or v > getattr(e, k_e)):
                setattr(e, k_e, v)
    return e


TABLE_COLUMNS = (
    ("run", "run"), ("model", "model"), ("ds", "ds config"), ("prec", "prec"), ("gpus", "GPUs"),
    ("status", "status"), ("step", "step"), ("median", "median s/it"), ("gpu_peak", "peak GPU mem"),
    ("host", "host RAM"), ("tps", "tokens/s"), ("error", "error"),
)
STATUS_ORDER = {k: i for i, k in enumerate(
    ("running", "stalled?", "queued", "done", "dead", "OOM", "killed (signal 9)", "CUDA error", "timeout", "error",
     "interrupted"))}
# `s` cycles through these: (label, sort key, descending?)
SORTS = (
    ("plan order", lambda e: e.order, False),
    ("run", lambda e: e.run, False),
    ("status", lambda e: (STATUS_ORDER.get(e.status, len(STATUS_ORDER)), e.status, e.order), False),
    ("median s/it", lambda e: (e.median_s is None, e.median_s or 0.0), False),
    ("peak GPU mem", lambda e: (e.peak_gpu_mib is None, -(e.peak_gpu_mib or 0.0)), False),
    ("host RAM", lambda e: (e.host_mib is None, -(e.host_mib or 0.0)), False),
    ("tokens/s", lambda e: (e.tokens_per_s is None, -(e.tokens_per_s or 0.0)), False),
)


def sort_entries(entries: Sequence[EntryState], sort_index: int) -> list[EntryState]:
    _, key, rev = SORTS[sort_index % len(SORTS)]
    return sorted(entries, key=key, reverse=rev)


def entry_row(e: EntryState) -> dict[str, Cell]:
    step = "-" if e.step is None else str(e.step)
    if e.max_steps is not None:
        step += f"/{e.max_steps}"
    err = (str(e.error).splitlines()[0][:60] if e.error else "")
    return {
        "run": Cell(e.run), "model": Cell(str(e.model or "-")), "ds": Cell(str(e.ds_config or "-")),
        "prec": Cell(str(e.precision or "-")), "gpus": Cell("-" if e.num_gpus is None else str(e.num_gpus)),
        "status": Cell(e.status, STATUS_STYLES.get(e.status, "")), "step": Cell(step),
        "median": Cell(fmt_float(e.median_s)), "gpu_peak": Cell(fmt_mib(e.peak_gpu_mib)),
        "host": Cell(fmt_mib(e.host_mib)), "tps": Cell(fmt_int(e.tokens_per_s)), "error": Cell(err, "red"),
    }


@dataclass
class TableState:
    """A sweep (entries from plan.json) or a set of discovered runs (results folder / runs root)."""
    kind: str                              # "sweep" | "runs"
    root: Path
    title: str = ""
    entries: list[EntryState] = field(default_factory=list)
    version: int = 0

    def set_entries(self, entries: list[EntryState]) -> bool:
        if entries != self.entries:
            self.entries = entries
            self.version += 1
            return True
        return False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.status] = out.get(e.status, 0) + 1
        return out


def counts_line(t: TableState) -> str:
    c = t.counts()
    parts = [f"{v} {k}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
    what = "sweep" if t.kind == "sweep" else "runs under"
    return f"{what} {t.title or t.root}: {len(t.entries)} entries" + (" - " + ", ".join(parts) if parts else "")


def entry_json(e: EntryState) -> dict[str, Any]:
    d = {k: getattr(e, k) for k in ("run", "model", "ds_config", "precision", "num_gpus", "max_steps", "status",
                                    "step", "median_s", "peak_gpu_mib", "host_mib", "tokens_per_s", "error")}
    d["run_dir"] = str(e.run_dir)
    return d
