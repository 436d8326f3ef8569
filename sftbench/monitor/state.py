"""Run state of the monitor: each rank and each run built incrementally from its records, every number of the run
header, and the status labels and styles all tables share. No I/O, no Textual, no torch: fed records by ``tail``;
read by ``rows`` and ``table`` (the formatted rows), ``app`` (Textual) and ``snapshot`` (plain text), which therefore
show the same numbers.

Statistics follow the log schema: warm-up steps (``warmup: true``) and skipped steps (``skipped: true``, no
optimizer update) are shown but excluded from the smoothed (EMA) and median s/it; histories for charts are bounded.
"""
from __future__ import annotations

import bisect
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from sftbench import liveness
from sftbench.fmt import as_number, fmt_clock, fmt_float, fmt_int, fmt_params, skipped_steps_text
from sftbench.metrics import median
from sftbench.nodes import job_nodes, ranks_by_node

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
    """A finite int/float (not bool) or None; the fast version of ``fmt.as_number`` for the per-step path."""
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
        notes.append(f"{skipped_steps_text(h['skipped_steps'], h.get('precision'))}, not measured")
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
