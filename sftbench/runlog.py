"""The one JSONL log schema, shared by train.py (writer), the report and the monitor (readers).

Layout: ``runs/<run>/rank<global_rank>.jsonl``, one file per rank. Every line is one JSON object, written whole
and flushed, so a run killed at any moment leaves a file whose complete lines all parse. Records, in order:

* one ``meta`` record  (keys: ``META_KEYS``)
* one ``step`` record per optimizer step (keys: ``STEP_KEYS``)
* an ``eval`` record after each evaluation (keys: ``EVAL_KEYS``), between the step records
* at most one ``summary`` record (keys: ``SUMMARY_KEYS``); a run that died has none, and the sweep writes one for
  it into ``summary.json`` beside the rank files (``synthesized: true``).

Key names are frozen and carry their unit (``_s`` seconds, ``_mib`` MiB = 2**20 bytes, ``_pct`` percent,
``_per_s`` per second). A field that does not apply (GPU memory on CPU, loss scale without fp16) is ``null``.
See docs/log_schema.md for the meaning of every key.

This module must not import torch or deepspeed: the monitor uses it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1

META_KEYS = (
    "type", "schema", "run", "time", "argv", "ds_config_path", "ds_config", "harness", "model", "n_params",
    "flops_per_token", "world_size", "rank", "local_rank", "node", "node_rank", "num_nodes", "local_world_size",
    "host", "pid", "device", "device_name", "device_uuid",
    "gpu_index", "peak_tflops", "precision", "zero_stage", "offload_optimizer", "offload_param", "micro_batch",
    "grad_accum", "seq_len", "dataset_path", "dataset_samples", "real_tokens", "pad_tokens", "steps_per_epoch",
    "max_steps", "warmup_steps", "optimizations", "predicted", "versions", "git_commit", "warnings", "env",
    "lr", "overrides", "resumed_from", "eval", "save_dir", "model_info", "model_weights", "sample_layout",
    "packing",
)
STEP_KEYS = (
    "type", "step", "time", "elapsed_s", "step_s", "warmup", "samples_per_s", "tokens_per_s",
    "real_tokens_per_s", "loss", "lr", "loss_scale", "skipped", "tflops", "mfu_pct", "gpu_mem_used_mib",
    "torch_peak_alloc_mib", "torch_peak_reserved_mib", "host_rss_mib", "host_rss_peak_mib", "host_used_mib",
)
EVAL_KEYS = ("type", "step", "epoch", "time", "eval_loss", "eval_tokens", "eval_samples", "eval_s")
SUMMARY_KEYS = (
    "type", "status", "error", "time", "wall_s", "steps", "measured_steps", "skipped_steps", "step_s_median",
    "step_s_p90", "step_s_mean", "samples_per_s", "tokens_per_s", "tokens_per_s_per_gpu", "real_tokens_per_s",
    "tflops", "mfu_pct", "gpu_mem_used_mib_peak", "torch_peak_alloc_mib", "torch_peak_reserved_mib",
    "host_rss_mib_peak", "host_rss_step_peak_mib", "host_used_mib_peak", "steps_per_epoch", "epoch_s_est",
    "epoch_s_measured", "final_loss",
    "first_loss", "synthesized", "eval_loss", "saved",
)
STATUSES = ("ok", "oom", "cuda_error", "error", "interrupted", "timeout", "killed")


# File names of a run folder and a sweep folder: one home for the writers (train.py, the sweep) and the readers (the
# report, the monitor).
SUMMARY_FILE = "summary.json"  # the sweep's synthesized summary of a run that died
PREDICTED_FILE = "predicted.json"  # the sweep's memory prediction, written before the run starts
CONSOLE_FILE = "console.log"  # the launcher's output, as the sweep captured it
PLAN_ENTRY_FILE = "plan_entry.json"
PLAN_FILE = "plan.json"  # sweep folder: every planned run
SWEEP_INFO_FILE = "sweep_info.json"  # sweep folder: machine and commands
RESULTS_SUMMARIES_FILE = "summaries.jsonl"  # results folder: every run's plan entry, meta and summaries
RESULTS_CORRECTIONS_FILE = "corrections.json"  # results folder, optional, hand-written: a known measurement error
EPOCH_SUFFIX = "__epoch"  # sweep --epoch: <run>__epoch is one full epoch of <run> (the report compares them)


def rank_file(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / f"rank{rank}.jsonl"


def clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader parses the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


class RunLog:
    """Appends records to one rank's file. Each record is one line, written with a single write() and flushed."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, sinks=None):
        # sinks: called with (record type, record) after each record is written (--report-to: sftbench/report_to.py)
        self.sinks = sinks
        self.path = rank_file(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered text file: one write() per record, flushed at the newline.
        self._f = open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, rtype: str, keys: Iterable[str], **fields: Any) -> dict:
        allowed = set(keys)
        unknown = set(fields) - allowed
        if unknown:
            # The schema is frozen: a typo here would silently fork it.
            raise KeyError(f"{rtype} record: keys not in the schema: {sorted(unknown)}")
        rec = {k: fields.get(k) for k in keys}
        rec["type"] = rtype
        self._f.write(json.dumps(clean(rec), ensure_ascii=False, default=str) + "\n")
        self._f.flush()
        if self.sinks is not None:  # after the JSONL line: the log stays the source of truth
            self.sinks(rtype, clean(rec))
        return rec

    def meta(self, **fields: Any) -> dict:
        return self.write("meta", META_KEYS, schema=SCHEMA_VERSION, **fields)

    def step(self, **fields: Any) -> dict:
        return self.write("step", STEP_KEYS, **fields)

    def eval(self, **fields: Any) -> dict:
        return self.write("eval", EVAL_KEYS, **fields)

    def summary(self, **fields: Any) -> dict:
        return self.write("summary", SUMMARY_KEYS, **fields)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None


def parse_lines(lines: Iterable[str]) -> tuple[list[dict], list[int]]:
    """Parse JSONL lines; return (records, 1-based numbers of lines that are not a JSON object with a type)."""
    records, bad = [], []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(i)
            continue
        if not isinstance(rec, dict) or "type" not in rec:
            bad.append(i)
            continue
        records.append(rec)
    return records, bad


def read_records(path: str | os.PathLike) -> tuple[list[dict], int]:
    """All complete records of one rank file and the number of unparseable lines (a partial last line counts)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        records, bad = parse_lines(f)
    return records, len(bad)


@dataclass
class RunRecords:
    """Everything a reader needs of one run directory."""

    run_dir: Path
    meta: dict[int, dict] = field(default_factory=dict)      # rank -> meta
    steps: dict[int, list[dict]] = field(default_factory=dict)  # rank -> step records
    evals: dict[int, list[dict]] = field(default_factory=dict)  # rank -> eval records
    summary: dict[int, dict] = field(default_factory=dict)    # rank -> summary
    bad_lines: int = 0

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.meta) | set(self.steps) | set(self.summary))

    def final_summary(self) -> dict | None:
        """Rank 0's summary, else the sweep's synthesized one (summary.json), else None (still running or died)."""
        if 0 in self.summary:
            return self.summary[0]
        synth = self.run_dir / "summary.json"
        try:
            data = json.loads(synth.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
            return None
        return data if isinstance(data, dict) else None


def rank_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    out = []
    for p in Path(run_dir).glob("rank*.jsonl"):
        stem = p.stem[4:]
        if stem.isdigit():
            out.append((int(stem), p))
    return sorted(out)


def load_run(run_dir: str | os.PathLike, *node_dirs: str | os.PathLike) -> RunRecords:
    """Every rank file of run_dir; ``node_dirs``: the same run's folder as other nodes wrote it (a multi-node run
    without a shared file system), missing ones skipped. A rank found in several folders is read from the fullest
    file (a copy made while the run was still going has fewer lines)."""
    rr = RunRecords(Path(run_dir))
    chosen: dict[int, tuple[list[dict], int]] = {}
    for d in (run_dir, *node_dirs):
        for rank, path in rank_files(d):
            records, bad = read_records(path)
            if rank not in chosen or len(records) > len(chosen[rank][0]):
                chosen[rank] = (records, bad)
    for rank in sorted(chosen):
        records, bad = chosen[rank]
        rr.bad_lines += bad
        for rec in records:
            t = rec.get("type")
            if t == "meta":
                rr.meta[rank] = rec
            elif t == "step":
                rr.steps.setdefault(rank, []).append(rec)
            elif t == "eval":
                rr.evals.setdefault(rank, []).append(rec)
            elif t == "summary":
                rr.summary[rank] = rec
    return rr


def iter_run_dirs(root: str | os.PathLike) -> Iterator[Path]:
    """Every directory under root (root included) that holds rank files or a synthesized summary."""
    root = Path(root)
    seen = set()
    for p in sorted(root.rglob("rank*.jsonl")) + sorted(root.rglob(SUMMARY_FILE)):
        d = p.parent
        if d not in seen:
            seen.add(d)
            yield d
