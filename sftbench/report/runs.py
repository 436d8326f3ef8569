"""Reading run folders into Rows: each run's rank logs, summary, plan entry and prediction, one ``Row`` a run
(``collect``), plus ``scrub`` for the repo's absolute paths. Nothing here formats a table."""
from __future__ import annotations

import functools
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from sftbench import engine_checks, liveness, runlog
from sftbench import nodes as nodes_mod
from sftbench.paths import REPO
from sftbench.dsconfig import apply_precision, describe
from sftbench.runlog import EPOCH_SUFFIX  # sweep --epoch: one full epoch of the run named without the suffix

MODEL_LABEL = {"pangu-350m": "Pangu-350M", "pangu-2.6b": "Pangu-2.6B", "pangu-13b": "Pangu-13B",
               "pangu-tiny": "Pangu-tiny"}


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

    def _host_rss(self) -> dict[int, float]:
        """Every rank's peak RSS: the in-step high-water mark where the steps logged it (``host_rss_peak_mib``),
        else the largest RSS read at a step's end (logs written before the high-water mark was recorded)."""
        return (self._per_rank("host_rss_step_peak_mib", "host_rss_peak_mib")
                or self._per_rank("host_rss_mib_peak", "host_rss_mib"))

    @property
    def host_rss_all_mib(self) -> float | None:
        """Sum of every rank's peak RSS, over every node."""
        vals = self._host_rss()
        return self._ranks_sum(vals, self.world) if vals else None

    @property
    def host_rss_mib(self) -> float | None:
        """The host memory one machine must hold: the sum of every rank's peak RSS on one node; with several
        nodes, the largest node's sum (host RAM is a per-node figure)."""
        if self.nodes <= 1:
            return self.host_rss_all_mib
        vals = self._host_rss()
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
