"""Pure state of the monitor: ranks, runs, table entries (sweep / results) and every derived number and formatted
row. No I/O, no Textual, no torch: fed records by ``tail`` and GPU/host samples by ``session``; read by ``app``
(Textual) and ``snapshot`` (plain text), which therefore show the same numbers.

Statistics follow the log schema: warm-up steps (``warmup: true``) and fp16 overflow steps (``skipped: true``, no
optimizer update) are shown but excluded from the smoothed (EMA) and median s/it; histories for charts are bounded.
"""
from __future__ import annotations

import bisect
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from sftbench import liveness
from sftbench.fmt import as_number, fmt_clock, fmt_float, fmt_int, fmt_mib, fmt_params
from sftbench.metrics import median
from sftbench.nodes import job_nodes, node_of, ranks_by_node

HISTORY = 1024          # points kept per rank for charts
EMA_ALPHA = 0.1         # smoothing of s/it (about a 10-step window)

# Summary status -> label in tables.
STATUS_LABELS = {
    "ok": "done", "oom": "OOM", "cuda_error": "CUDA error", "timeout": "timeout", "error": "error",
    "interrupted": "interrupted", "running": "running", "queued": "queued", "waiting": "waiting",
    "starting": "starting", "killed": "killed (signal 9)", "dead": "dead", "stalled?": "stalled?",
}
STATUS_STYLES = {
    "done": "green", "ok": "green", "running": "cyan", "queued": "dim", "waiting": "dim", "starting": "cyan",
    "OOM": "bold red",
    "oom": "bold red", "CUDA error": "bold red", "cuda_error": "bold red", "timeout": "yellow", "error": "red",
    "interrupted": "yellow", "killed": "red", "killed (signal 9)": "red", "dead": "bold red", "stalled?": "yellow",
}


class Cell(NamedTuple):
    """One table cell: text plus a Rich style name ('' = default)."""
    text: str
    style: str = ""


# --------------------------------------------------------------------------------------------------------------
# rank / run state

_INF = float("inf")
PEAK_KEYS = ("host_rss_mib", "host_used_mib")     # besides gpu_mem_used_mib


def _fin(v: Any) -> float | int | None:
    """A finite int/float (not bool) or None; the fast version of ``_num`` for the per-step path."""
    c = v.__class__
    if c is float:
        return v if (v == v and v != _INF and v != -_INF) else None
    return v if c is int else None


class StepPoint(NamedTuple):
    step: int
    step_s: float | None
    loss: float | None
    gpu_mem_mib: float | None
    reserved_mib: float | None
    warmup: bool


class RankState:
    """What the monitor knows of one rank, built incrementally from its records."""

    def __init__(self, rank: int, history: int = HISTORY):
        self.rank = rank
        self.history_len = history
        self.bad_lines = 0
        self.partial = False
        self.reset()

    def reset(self) -> None:
        self.meta: dict | None = None
        self.summary: dict | None = None
        self.last: dict | None = None          # last step record
        self.last_eval: dict | None = None     # last eval record (fine-tuning runs with --eval-*)
        self.n_steps = 0
        self.n_warmup = 0
        self.n_skipped = 0                     # fp16 overflow steps after warm-up
        self.ema: float | None = None          # EMA of measured step_s
        self.measured: list[float] = []        # sorted measured step_s (for the median)
        self.history: deque[StepPoint] = deque(maxlen=self.history_len)
        self.peaks: dict[str, float] = {}
        self.first_loss: float | None = None
        self.last_time: float | None = None    # unix time of the newest record (meta or step)
        self.slowest_s: float | None = None    # the longest step_s so far (the stall rule's yardstick)
        self.bad_lines = 0
        self.partial = False

    # -- feeding
    def feed(self, rec: Mapping[str, Any]) -> None:
        t = rec.get("type")
        if t == "step":
            self._step(rec)
        elif t == "meta":
            self.meta = dict(rec)
            tm = _fin(rec.get("time"))
            if tm is not None and (self.last_time is None or tm > self.last_time):
                self.last_time = tm
        elif t == "eval":
            self.last_eval = dict(rec)
            tm = _fin(rec.get("time"))  # an evaluation is activity too (the stall rule reads last_time)
            if tm is not None and (self.last_time is None or tm > self.last_time):
                self.last_time = tm
        elif t == "summary":
            self.summary = dict(rec)

    def _is_warmup(self, rec: Mapping[str, Any]) -> bool:
        w = rec.get("warmup")
        if isinstance(w, bool):
            return w
        ws = as_number((self.meta or {}).get("warmup_steps"))
        st = as_number(rec.get("step"))
        return ws is not None and st is not None and st <= ws

    def _step(self, rec: dict) -> None:
        # Hot path (a 10k-step file is replayed at start-up): no copies, few calls.
        self.last = rec
        self.n_steps += 1
        w = rec.get("warmup")
        warm = w if w.__class__ is bool else self._is_warmup(rec)
        s = _fin(rec.get("step_s"))
        loss = _fin(rec.get("loss"))
        tm = _fin(rec.get("time"))
        if tm is not None:
            self.last_time = tm
        if s is not None and (self.slowest_s is None or s > self.slowest_s):
            self.slowest_s = s
        if warm:
            self.n_warmup += 1
        elif rec.get("skipped") is True:
            self.n_skipped += 1
        elif s is not None:
            bisect.insort(self.measured, s)
            self.ema = s if self.ema is None else self.ema + EMA_ALPHA * (s - self.ema)
        if loss is not None and self.first_loss is None:
            self.first_loss = loss
        peaks = self.peaks
        mem = _fin(rec.get("gpu_mem_used_mib"))
        if mem is not None and mem > peaks.get("gpu_mem_used_mib", -1.0):
            peaks["gpu_mem_used_mib"] = mem
        for k in PEAK_KEYS:
            v = _fin(rec.get(k))
            if v is not None and v > peaks.get(k, -1.0):
                peaks[k] = v
        step = rec.get("step")
        self.history.append(StepPoint(step if step.__class__ is int else self.n_steps, s, loss, mem,
                                      _fin(rec.get("torch_peak_reserved_mib")), warm))

    # -- derived
    @property
    def step(self) -> int | None:
        if self.last is None:
            return None
        v = self.last.get("step")
        return v if isinstance(v, int) else self.n_steps

    @property
    def in_warmup(self) -> bool:
        return bool(self.history) and self.history[-1].warmup

    @property
    def last_s(self) -> float | None:
        return None if self.last is None else as_number(self.last.get("step_s"))

    @property
    def median_s(self) -> float | None:
        return median(self.measured)

    def get(self, key: str) -> Any:
        return None if self.last is None else self.last.get(key)


class RunState:
    """One run directory: its ranks and the sweep's synthesized summary, if any."""

    def __init__(self, run_dir: str | os.PathLike, history: int = HISTORY):
        self.run_dir = Path(run_dir)
        self.history = history
        self.ranks: dict[int, RankState] = {}
        self.synth: dict | None = None
        self.exists = False
        self.rank_files = 0  # rank<k>.jsonl files seen, empty ones included (set by the watcher)
        self.alive: dict[int, bool | None] = {}  # rank -> its process exists (None: can't tell); set by the session
        self.version = 0

    def touch(self) -> None:
        self.version += 1

    @property
    def name(self) -> str:
        m = self.meta
        if m and isinstance(m.get("run"), str):
            return m["run"]
        return self.run_dir.name

    def rank(self, r: int) -> RankState:
        rs = self.ranks.get(r)
        if rs is None:
            rs = self.ranks[r] = RankState(r, self.history)
        return rs

    def feed(self, rank: int, records: Iterable[Mapping[str, Any]], bad: int = 0) -> None:
        rs = self.rank(rank)
        for rec in records:
            rs.feed(rec)
        rs.bad_lines += bad
        self.touch()

    def reset_rank(self, rank: int) -> None:
        if rank in self.ranks:
            self.ranks[rank].reset()
            self.touch()

    def drop_rank(self, rank: int) -> None:
        if self.ranks.pop(rank, None) is not None:
            self.touch()

    def set_synth(self, summary: dict | None) -> None:
        if summary != self.synth:
            self.synth = summary
            self.touch()

    # -- derived
    @property
    def primary(self) -> RankState | None:
        """Rank 0, else the lowest rank that has logged something."""
        if 0 in self.ranks:
            return self.ranks[0]
        return self.ranks[min(self.ranks)] if self.ranks else None

    @property
    def meta(self) -> dict | None:
        p = self.primary
        if p is not None and p.meta is not None:
            return p.meta
        for r in sorted(self.ranks):
            if self.ranks[r].meta is not None:
                return self.ranks[r].meta
        return None

    @property
    def bad_lines(self) -> int:
        return sum(r.bad_lines for r in self.ranks.values())

    @property
    def has_logs(self) -> bool:
        return any(r.meta is not None or r.n_steps or r.summary is not None for r in self.ranks.values())

    def set_alive(self, alive: Mapping[int, bool | None]) -> None:
        if dict(alive) != self.alive:
            self.alive = dict(alive)
            self.touch()

    @property
    def last_record_time(self) -> float | None:
        ts = [r.last_time for r in self.ranks.values() if r.last_time is not None]
        return max(ts) if ts else None

    @property
    def slowest_step_s(self) -> float | None:
        ss = [r.slowest_s for r in self.ranks.values() if r.slowest_s is not None]
        return max(ss) if ss else None

    def final_summary(self) -> dict | None:
        """Same rule as ``runlog.RunRecords.final_summary``: rank 0's summary, else the synthesized summary.json."""
        if 0 in self.ranks and self.ranks[0].summary is not None:
            return self.ranks[0].summary
        return self.synth

    def status(self, now: float | None = None) -> str:
        """The summary's status; else waiting / starting, or ``sftbench.liveness``: running, stalled? or dead."""
        s = self.final_summary()
        if s is not None:
            return str(s.get("status") or "error")
        if not self.has_logs:
            # train.py opens its rank files first and writes the meta record only once the model and the engine
            # are built (a minute or more for 2.6B, more with --compile): the run is starting, not missing
            return "starting" if self.rank_files else "waiting"
        return liveness.classify(self.alive.values(), self.last_record_time, self.slowest_step_s, now)

    def header(self, now: float | None = None) -> dict[str, Any]:
        """Every number of the run header (raw values; ``header_lines`` formats them)."""
        m = self.meta or {}
        metas = {r: rs.meta for r, rs in self.ranks.items() if rs.meta}
        p = self.primary
        summ = self.final_summary()
        status = self.status(now)
        step = p.step if p else None
        max_steps = as_number(m.get("max_steps"))
        spe = as_number(m.get("steps_per_epoch"))
        ema = p.ema if p else None
        last_s = p.last_s if p else None
        median = p.median_s if p else None
        if summ is not None and as_number(summ.get("step_s_median")) is not None:
            median = as_number(summ["step_s_median"])
        eta = None
        cap = max_steps if max_steps is not None else spe
        rate = ema if ema is not None else last_s
        if status == "running" and cap is not None and rate is not None:
            eta = max(0.0, cap - (step or 0)) * rate
        epoch = spe * median if (spe is not None and median is not None) else None
        if summ is not None and as_number(summ.get("epoch_s_est")) is not None:
            epoch = as_number(summ["epoch_s_est"])
        tps = mfu = None
        if p is not None and p.last is not None and median:
            ls = as_number(p.last.get("step_s"))
            lt = as_number(p.last.get("tokens_per_s"))
            lm = as_number(p.last.get("mfu_pct"))
            if ls:
                tps = lt * ls / median if lt is not None else None
                mfu = lm * ls / median if lm is not None else None
        if summ is not None:
            tps = as_number(summ.get("tokens_per_s")) if as_number(summ.get("tokens_per_s")) is not None else tps
            mfu = as_number(summ.get("mfu_pct")) if as_number(summ.get("mfu_pct")) is not None else mfu
        ds_path = m.get("ds_config_path")
        return {
            "run": self.name, "run_dir": str(self.run_dir), "status": status,
            "error": (summ or {}).get("error"), "synthesized": bool((summ or {}).get("synthesized")),
            "config": os.path.basename(ds_path) if isinstance(ds_path, str) and ds_path else
            ("none" if m else None),
            "model": m.get("model"), "n_params": m.get("n_params"), "precision": m.get("precision"),
            "zero_stage": m.get("zero_stage"), "offload_optimizer": m.get("offload_optimizer"),
            "offload_param": m.get("offload_param"), "world_size": m.get("world_size"),
            "num_nodes": job_nodes(metas) if metas else None, "nodes_seen": list(ranks_by_node(metas)),
            "micro_batch": m.get("micro_batch"), "grad_accum": m.get("grad_accum"), "seq_len": m.get("seq_len"),
            "step": step, "max_steps": m.get("max_steps"), "warmup_steps": m.get("warmup_steps"),
            "in_warmup": bool(p and p.in_warmup), "s_it_ema": ema, "s_it_last": last_s, "s_it_median": median,
            "measured_steps": len(p.measured) if p else 0, "skipped_steps": p.n_skipped if p else 0, "eta_s": eta,
            "steps_per_epoch": m.get("steps_per_epoch"),
            "epoch_s_est": epoch, "tokens_per_s": tps, "mfu_pct": mfu,
            "ranks_seen": len(self.ranks), "rank_files": self.rank_files, "bad_lines": self.bad_lines,
            "partial_lines": sum(1 for r in self.ranks.values() if r.partial),
            "warnings": [str(w) for w in (m.get("warnings") or [])],  # engine defects train.py found
            "last_record_time": self.last_record_time,
            "liveness": liveness.describe(status, self.last_record_time, self.slowest_step_s, now)
            if status in ("dead", "stalled?") else None,
            "eval_loss": as_number((p.last_eval or {}).get("eval_loss")) if p else None,
            "eval_step": (p.last_eval or {}).get("step") if p else None,
            "resumed_from_step": (m.get("resumed_from") or {}).get("step"),
        }


def header_lines(h: Mapping[str, Any]) -> list[str]:
    """The run header as plain lines (the app styles the status word)."""
    if h["status"] in ("waiting", "starting"):
        lines = [f"run {h['run']}  [{h['status']}]  {h['run_dir']}",
                 "waiting: no logs in this run directory yet" if h["status"] == "waiting" else
                 f"starting: {h['rank_files']} rank file(s) open, no record yet (building the model and the engine; "
                 f"the meta record comes next)"]
        if h["bad_lines"]:
            lines.append(f"garbage lines skipped: {h['bad_lines']}")
        return lines
    zs = h["zero_stage"]
    zero = "no DeepSpeed" if zs is None and h["config"] == "none" else f"ZeRO {zs if zs is not None else '-'}"
    off = []
    if h["offload_optimizer"]:
        off.append(f"optimizer->{h['offload_optimizer']}")
    if h["offload_param"]:
        off.append(f"param->{h['offload_param']}")
    if off:
        zero += " offload " + ",".join(off)
    model = str(h["model"] if h["model"] is not None else "-")
    if h["n_params"]:
        model += f" ({fmt_params(h['n_params'])} params)"
    nodes_txt = ""
    if (h.get("num_nodes") or 1) > 1:
        seen = h.get("nodes_seen") or []
        nodes_txt = f" on {h['num_nodes']} nodes ({', '.join(seen)})"
        if len(seen) < h["num_nodes"]:  # the other nodes' rank files are on their own disks
            nodes_txt += f", logs of {len(seen)} here"
    batch = ""
    if h["micro_batch"] is not None:
        batch = f" | micro {h['micro_batch']} x accum {h['grad_accum']} x seq {h['seq_len']}"
    lines = [
        f"run {h['run']}  [{h['status']}]  {h['run_dir']}",
        f"config {h['config'] or '-'} | model {model} | {h['precision'] or '-'} | {zero} | "
        f"world {h['world_size'] if h['world_size'] is not None else '-'}{nodes_txt}{batch}",
    ]
    step = "-" if h["step"] is None else str(h["step"])
    cap = "-" if h["max_steps"] is None else str(h["max_steps"])
    warm = " (warm-up)" if h["in_warmup"] else ""
    lines.append(
        f"step {step} of {cap}{warm} | s/it EMA {fmt_float(h['s_it_ema'])} last {fmt_float(h['s_it_last'])} "
        f"median {fmt_float(h['s_it_median'])} ({h['measured_steps']} measured) | "
        + (f"ETA {fmt_clock(h['eta_s'])} | " if h["status"] == "running" else "")  # only a live run has one
        + f"epoch est {fmt_clock(h['epoch_s_est'])} "
        f"({h['steps_per_epoch'] if h['steps_per_epoch'] is not None else '-'} steps) | "
        f"tokens/s {fmt_int(h['tokens_per_s'])} | MFU {fmt_float(h['mfu_pct'], 1)}%")
    notes = []
    if h.get("liveness"):
        notes.append(h["liveness"])
    if h["error"]:
        notes.append(f"error: {str(h['error']).splitlines()[0][:160]}")
    if h["synthesized"]:
        notes.append("summary synthesized by the sweep")
    for w in h.get("warnings") or []:
        notes.append(f"warning: {w}")
    if h.get("skipped_steps"):
        notes.append(f"fp16 overflow steps (no update, not measured): {h['skipped_steps']}")
    if h.get("resumed_from_step") is not None:
        notes.append(f"resumed from step {h['resumed_from_step']}")
    if h.get("eval_loss") is not None:
        notes.append(f"eval loss {fmt_float(h['eval_loss'], 4)} (step {h['eval_step']})")
    if h["bad_lines"]:
        notes.append(f"garbage lines skipped: {h['bad_lines']}")
    if h["partial_lines"]:
        notes.append(f"incomplete last line pending in {h['partial_lines']} file(s)")
    if notes:
        lines.append(" | ".join(notes))
    return lines


# --------------------------------------------------------------------------------------------------------------
# rank table

RANK_COLUMNS = (
    ("rank", "rank"), ("host", "host"), ("gpu", "GPU"), ("step", "step"), ("loss", "loss"),
    ("s_ema", "s/it EMA"), ("s_last", "s/it last"), ("tps", "tokens/s"), ("mem", "GPU mem NVML/torch rsv"),
    ("rss", "host RSS"), ("bad", "bad"),
)


def rank_rows(run: RunState, live_rss: Mapping[int, float] | None = None) -> list[tuple[str, dict[str, Cell]]]:
    """(row key, {column key: Cell}) for every rank, sorted by rank."""
    live_rss = live_rss or {}
    rows = []
    for r in sorted(run.ranks):
        rs = run.ranks[r]
        m = rs.meta or {}
        gi, gn = m.get("gpu_index"), m.get("device_name")
        if gi is None and gn is None:
            gpu = m.get("device") or "-"
        else:
            gpu = f"{gi if gi is not None else '?'} {gn or ''}".strip()
        warm = rs.in_warmup
        step_style = "dim" if warm else ""
        step_txt = "-" if rs.step is None else str(rs.step) + (" warm-up" if warm else "")
        if rs.summary is not None:
            step_txt += f" [{rs.summary.get('status')}]"
            step_style = STATUS_STYLES.get(str(rs.summary.get("status")), "")
        used = fmt_mib(rs.get("gpu_mem_used_mib"))
        rsv = fmt_mib(rs.get("torch_peak_reserved_mib"))
        if r in live_rss:
            rss = Cell(fmt_mib(live_rss[r]) + " live")
        else:
            rss = Cell(fmt_mib(rs.get("host_rss_mib")) + (" log" if rs.get("host_rss_mib") is not None else ""),
                       "dim" if rs.get("host_rss_mib") is not None else "")
        rows.append((str(r), {
            "rank": Cell(str(r)),
            "host": Cell(node_of(m) if m else "-"),
            "gpu": Cell(gpu),
            "step": Cell(step_txt, step_style),
            "loss": Cell(fmt_float(rs.get("loss"), 4), step_style if warm else ""),
            "s_ema": Cell(fmt_float(rs.ema)),
            "s_last": Cell(fmt_float(rs.last_s), "dim" if warm else ""),
            "tps": Cell(fmt_int(rs.get("tokens_per_s")), "dim" if warm else ""),
            "mem": Cell(f"{used} / {rsv}"),
            "rss": rss,
            "bad": Cell(str(rs.bad_lines), "bold yellow" if rs.bad_lines else "dim"),
        }))
    return rows


# --------------------------------------------------------------------------------------------------------------
# charts (bounded, warm-up marked)

BLOCKS = " ▁▂▃▄▅▆▇█"

CHART_SERIES = (
    ("step_s", "s/it"), ("loss", "loss"), ("gpu_mem_mib", "GPU mem MiB"),
)


def series(rs: RankState | None, field_name: str) -> tuple[list[float | None], list[bool], list[int]]:
    if rs is None:
        return [], [], []
    vals = [getattr(p, field_name) for p in rs.history]
    return vals, [p.warmup for p in rs.history], [p.step for p in rs.history]


def downsample(values: Sequence[float | None], warm: Sequence[bool], width: int
               ) -> tuple[list[float | None], list[bool]]:
    """At most ``width`` buckets (mean of each); a bucket is warm-up only when all its points are."""
    n = len(values)
    if n <= width or width <= 0:
        return list(values), list(warm)
    out_v: list[float | None] = []
    out_w: list[bool] = []
    for i in range(width):
        a, b = i * n // width, (i + 1) * n // width
        chunk = [v for v in values[a:b] if v is not None]
        out_v.append(sum(chunk) / len(chunk) if chunk else None)
        out_w.append(all(warm[a:b]))
    return out_v, out_w


def chart(values: Sequence[float | None], warm: Sequence[bool], width: int, height: int = 1
          ) -> tuple[list[str], list[bool], float | None, float | None]:
    """Block-character bar chart: (lines top to bottom, warm-up flag per column, lo, hi).

    The scale comes from measured points only (a slow first step does not flatten the rest); warm-up points are
    clipped to it and flagged so the caller can dim them.
    """
    v, w = downsample(values, warm, width)
    meas = [x for x, ww in zip(v, w) if x is not None and not ww]
    pool = meas or [x for x in v if x is not None]
    if not pool:
        return [""] * height, w, None, None
    lo, hi = min(pool), max(pool)
    levels = height * 8
    cols = []
    for x in v:
        if x is None:
            cols.append(0)
            continue
        x = min(max(x, lo), hi)
        frac = 0.5 if hi == lo else (x - lo) / (hi - lo)
        cols.append(1 + int(round(frac * (levels - 1))))
    lines = []
    for row in range(height - 1, -1, -1):
        base = row * 8
        lines.append("".join(BLOCKS[min(8, max(0, c - base))] for c in cols))
    return lines, w, lo, hi


# --------------------------------------------------------------------------------------------------------------
# GPU / host

def level_style(value: float | None, warn: float, crit: float) -> str:
    if value is None:
        return "dim"
    if value >= crit:
        return "bold red"
    if value >= warn:
        return "yellow"
    return "green"


GPU_COLUMNS = (
    ("idx", "GPU"), ("name", "name"), ("mem", "memory used/total"), ("util", "util"), ("power", "power"),
    ("temp", "temp"), ("procs", "processes (rank)"),
)


@dataclass
class ProcMatch:
    pid: int | None
    rank: int | None
    used_mib: float | None
    how: str        # "pid", "uuid" (rank on this GPU by UUID, pid not visible), "other" (not a rank of this run)


def match_processes(gpus: Sequence[Any], run: RunState | None, local_host: str | None) -> dict[int, list[ProcMatch]]:
    """Processes on each GPU matched to ranks: by pid when the rank ran on this host, else by device UUID.

    NVML inside a container may report host pids that match nothing; then ranks are placed on the GPU whose UUID
    they logged in ``meta.device_uuid`` and, when exactly one process and one rank are left unmatched on a GPU,
    the two are paired.
    """
    metas = {}
    if run is not None:
        metas = {r: rs.meta for r, rs in run.ranks.items() if rs.meta}
    out: dict[int, list[ProcMatch]] = {}
    for g in gpus:
        matches: list[ProcMatch] = []
        matched_ranks: set[int] = set()
        others: list[ProcMatch] = []
        for p in g.processes:
            rank = None
            for r, m in metas.items():
                if m.get("pid") == p.pid and (local_host is None or m.get("host") in (None, local_host)):
                    rank = r
                    break
            if rank is not None:
                matched_ranks.add(rank)
                matches.append(ProcMatch(p.pid, rank, p.used_mib, "pid"))
            else:
                others.append(ProcMatch(p.pid, None, p.used_mib, "other"))
        by_uuid = [r for r, m in sorted(metas.items())
                   if g.uuid and m.get("device_uuid") == g.uuid and r not in matched_ranks]
        if len(by_uuid) == 1 and len(others) == 1:
            o = others.pop()
            matches.append(ProcMatch(o.pid, by_uuid[0], o.used_mib, "uuid"))
        else:
            for r in by_uuid:
                matches.append(ProcMatch(metas[r].get("pid"), r, None, "uuid"))
        out[g.index] = sorted(matches, key=lambda x: (x.rank is None, x.rank or 0)) + others
    return out


def _proc_text(pm: ProcMatch) -> str:
    mem = f" {fmt_mib(pm.used_mib)}" if pm.used_mib is not None else ""
    if pm.rank is None:
        return f"pid {pm.pid}{mem}"
    if pm.how == "pid":
        return f"rank {pm.rank} (pid {pm.pid}){mem}"
    return f"rank {pm.rank} (by UUID){mem}"


def gpu_rows(snapshot: Any, run: RunState | None, local_host: str | None) -> list[tuple[str, dict[str, Cell]]]:
    if snapshot is None or snapshot.unavailable:
        return []
    procs = match_processes(snapshot.gpus, run, local_host)
    rows = []
    for g in snapshot.gpus:
        mem_pct = (100.0 * g.mem_used_mib / g.mem_total_mib) if (g.mem_used_mib is not None and g.mem_total_mib) \
            else None
        power = "-" if g.power_w is None else f"{g.power_w:.0f} W"
        if g.power_w is not None and g.power_limit_w:
            power += f" / {g.power_limit_w:.0f} W"
        pwr_pct = (100.0 * g.power_w / g.power_limit_w) if (g.power_w is not None and g.power_limit_w) else None
        rows.append((str(g.index), {
            "idx": Cell(str(g.index)),
            "name": Cell(g.name or "-"),
            "mem": Cell(f"{fmt_mib(g.mem_used_mib)} / {fmt_mib(g.mem_total_mib)}"
                        + (f" ({mem_pct:.0f}%)" if mem_pct is not None else ""), level_style(mem_pct, 80, 95)),
            "util": Cell("-" if g.util_pct is None else f"{g.util_pct:.0f}%",
                         "dim" if g.util_pct is None else ("yellow" if g.util_pct < 30 else "green")),
            "power": Cell(power, level_style(pwr_pct, 90, 100)),
            "temp": Cell("-" if g.temp_c is None else f"{g.temp_c:.0f} C", level_style(g.temp_c, 75, 85)),
            "procs": Cell(", ".join(_proc_text(p) for p in procs.get(g.index, [])) or "-"),
        }))
    return rows


def host_line(host: Any) -> tuple[str, str]:
    """(text, style) of the host memory line."""
    if host is None:
        return "host: not sampled yet", "dim"
    if host.unavailable:
        return f"host metrics unavailable: {host.unavailable}", "yellow"
    pct = 100.0 * host.ram_used_mib / host.ram_total_mib if host.ram_total_mib else None
    swap = f"{fmt_mib(host.swap_used_mib)} / {fmt_mib(host.swap_total_mib)}" if host.swap_total_mib else "none"
    cpu = f" | CPU {host.cpu_pct:.0f}%" if host.cpu_pct is not None else ""
    return (f"host {host.hostname}: RAM {fmt_mib(host.ram_used_mib)} / {fmt_mib(host.ram_total_mib)}"
            + (f" ({pct:.0f}%)" if pct is not None else "") + f" | swap {swap}{cpu}", level_style(pct, 85, 95))


RSS_COLUMNS = (("rank", "rank"), ("host", "host"), ("pid", "pid"), ("rss", "RSS"), ("src", "source"),
               ("peak", "peak RSS logged"))


def rss_rows(run: RunState | None, live_rss: Mapping[int, float]) -> list[tuple[str, dict[str, Cell]]]:
    rows = []
    if run is None:
        return rows
    for r in sorted(run.ranks):
        rs = run.ranks[r]
        m = rs.meta or {}
        if r in live_rss:
            val, src = live_rss[r], Cell("psutil (live)", "green")
        else:
            val, src = rs.get("host_rss_mib"), Cell("last logged", "dim")
        rows.append((str(r), {
            "rank": Cell(str(r)), "host": Cell(node_of(m) if m else "-"), "pid": Cell(str(m.get("pid") or "-")),
            "rss": Cell(fmt_mib(val)), "src": src, "peak": Cell(fmt_mib(rs.peaks.get("host_rss_mib"))),
        }))
    return rows


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
